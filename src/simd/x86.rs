//! AVX-512 pieces that several kernels share: the masked loads of kept values, and
//! `Elem::replaces` on whole vectors.

use std::arch::x86_64::*;

use crate::dtype::Float;

/// The next `popcount(m)` 16-bit elements at `p`, in the low lanes. A masked load, then
/// the expansion in registers: the expanding load from memory is microcoded and several
/// times slower on AMD Zen 4; masked-off lanes are not read, so `p` may end the mapping.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,popcnt")]
pub(super) unsafe fn load16(p: *const i16, m: u32) -> __m512i {
    let n = m.count_ones();
    let low = if n == 32 { !0 } else { (1u32 << n) - 1 };
    // SAFETY: the caller's `p` has `n` readable elements.
    unsafe { _mm512_maskz_loadu_epi16(low, p) }
}

/// As [`load16`], for 32-bit elements.
#[inline]
#[target_feature(enable = "avx512f,popcnt")]
pub(super) unsafe fn load32(p: *const i32, m: u16) -> __m512i {
    let n = m.count_ones();
    let low = if n == 16 { !0 } else { (1u16 << n) - 1 };
    // SAFETY: the caller's `p` has `n` readable elements.
    unsafe { _mm512_maskz_loadu_epi32(low, p) }
}

/// `Elem::replaces` on 64 elements of base `b` and value `v`: the bits where it decides,
/// and those where its result is `+0` for a `−0` value (the one decided case that is not
/// the value itself).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,popcnt")]
pub(super) unsafe fn decided_word(float: Float, b: *const u8, v: *const u8) -> (u64, u64) {
    let (man, all, size) = match float {
        Float::BF16 => (7, 0xff, 2),
        Float::F16 => (10, 0x1f, 2),
        Float::F32 => (23, 0xff, 4),
        Float::F64 => unreachable!("no handle is made for F64"),
    };
    let (mut ok, mut minus_zero) = (0u64, 0u64);
    for q in 0..size {
        // SAFETY: the caller's `b` and `v` hold 64 elements, read 64 bytes at a time.
        let (bv, vv) = unsafe {
            (
                _mm512_loadu_si512(b.add(64 * q) as *const __m512i),
                _mm512_loadu_si512(v.add(64 * q) as *const __m512i),
            )
        };
        let (o, z) = if size == 2 {
            decided16(man, all, bv, vv)
        } else {
            decided32(bv, vv)
        };
        let lanes = 64 / size;
        ok |= o << (lanes * q);
        minus_zero |= z << (lanes * q);
    }
    (ok, minus_zero)
}

/// [`decided_word`] on 32 lanes of 16-bit bits.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,popcnt")]
fn decided16(man: u32, all: i16, b: __m512i, v: __m512i) -> (u64, u64) {
    let all_v = _mm512_set1_epi16(all);
    let one = _mm512_set1_epi16(1);
    let abs = _mm512_set1_epi16(0x7fff);
    let shift = _mm_cvtsi32_si128(man as i32);
    let exp = |x| _mm512_max_epu16(_mm512_and_si512(_mm512_srl_epi16(x, shift), all_v), one);
    let (eb, ev) = (exp(b), exp(v));
    let finite = _mm512_cmpneq_epu16_mask(eb, all_v) & _mm512_cmpneq_epu16_mask(ev, all_v);
    let gap = _mm512_sub_epi16(_mm512_max_epu16(eb, ev), _mm512_min_epu16(eb, ev));
    let close = _mm512_cmple_epu16_mask(gap, _mm512_set1_epi16(51 - man as i16));
    let zb = _mm512_testn_epi16_mask(b, abs);
    let zv = _mm512_testn_epi16_mask(v, abs);
    let ok = finite & (close | zb | zv);
    let minus_zero = ok & _mm512_cmpeq_epi16_mask(v, _mm512_set1_epi16(i16::MIN));
    (ok as u64, minus_zero as u64)
}

/// [`decided_word`] on 16 lanes of 32-bit bits.
#[inline]
#[target_feature(enable = "avx512f,popcnt")]
fn decided32(b: __m512i, v: __m512i) -> (u64, u64) {
    let all_v = _mm512_set1_epi32(0xff);
    let one = _mm512_set1_epi32(1);
    let abs = _mm512_set1_epi32(0x7fff_ffff);
    let exp = |x| _mm512_max_epu32(_mm512_and_si512(_mm512_srli_epi32::<23>(x), all_v), one);
    let (eb, ev) = (exp(b), exp(v));
    let finite = _mm512_cmpneq_epu32_mask(eb, all_v) & _mm512_cmpneq_epu32_mask(ev, all_v);
    let gap = _mm512_sub_epi32(_mm512_max_epu32(eb, ev), _mm512_min_epu32(eb, ev));
    let close = _mm512_cmple_epu32_mask(gap, _mm512_set1_epi32(51 - 23));
    let zb = _mm512_testn_epi32_mask(b, abs);
    let zv = _mm512_testn_epi32_mask(v, abs);
    let ok = finite & (close | zb | zv);
    let minus_zero = ok & _mm512_cmpeq_epi32_mask(v, _mm512_set1_epi32(i32::MIN));
    (ok as u64, minus_zero as u64)
}
