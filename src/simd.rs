//! AVX-512 kernels for kept values, each with a portable loop beside it in its caller that gives
//! the same bits:
//! - merge, general path: the expansion of a mask word's kept values to their places
//!   (`vpexpandw`/`vpexpandd`), then f64 arithmetic 8 lanes at a time, masked, in the same IEEE
//!   operations as the scalar loop ([`Kept::add_word`]);
//! - merge, placing path: the expansion of kept values into a buffer ([`Kept::place_word`]) and
//!   the output settled from base and values by `Elem::replaces` on whole vectors
//!   ([`Kept::settle_word`]);
//! - extract: the compression of the kept elements among 64 to consecutive places
//!   (`vpcompressw`/`vpcompressd`, [`Kept::gather_word`]) and the statistics of docs/FORMAT.md
//!   section 7 ([`Kept::sums`]).
//!
//! Used where the CPU has AVX-512 F, BW, VL, DQ and VBMI2 and POPCNT (checked at run time, once);
//! everywhere else, or under `SOTU_DELTA_SCALAR=1`, the callers' portable loops run.

use crate::dtype::Float;

/// Counts from [`Kept::sums`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sums {
    /// Differences that are NaN or infinite.
    pub nonfinite: u64,
    /// Kept elements that the merge arithmetic would not give back.
    pub inexact: u64,
    /// Whether some kept elements were left for an exact check.
    pub undecided: bool,
}

/// A checked handle: exists only when the CPU can run these kernels for this dtype.
pub struct Kept {
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    float: Float,
}

impl Kept {
    /// The handle for `float`, if this CPU has the instructions and the dtype is one they
    /// handle (F16, BF16, F32). `SOTU_DELTA_SCALAR=1` turns them off, for comparisons.
    pub fn for_dtype(float: Float) -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
            let ok = *AVAILABLE.get_or_init(|| {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                    && std::arch::is_x86_feature_detected!("avx512vbmi2")
                    && std::arch::is_x86_feature_detected!("popcnt")
                    && std::env::var_os("SOTU_DELTA_SCALAR").is_none()
            });
            (ok && float != Float::F64).then_some(Kept { float })
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = float;
            None
        }
    }

    /// `acc[k] += c · (v − b[k])` for each set bit `k` of `word`, `v` being the next value
    /// of `values` (which must hold exactly `word.count_ones()` little-endian elements).
    #[inline]
    pub fn add_word(&self, word: u64, values: &[u8], b: &[f64], acc: &mut [f64], c: f64) {
        assert!(b.len() == 64 && acc.len() == 64);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU features were detected when `self` was made; the asserts above
        // bound every access (the expanding loads read only as many elements as bits set).
        unsafe {
            avx512::add_word(
                self.float,
                word,
                values.as_ptr(),
                values.len(),
                b.as_ptr(),
                acc.as_mut_ptr(),
                c,
            )
        }
    }

    /// Writes the elements of `src` (64 little-endian elements) at the set bits of `word` to
    /// the start of `dst`, in order: `word.count_ones()` elements. `dst` must have room for 64
    /// (what lies past the kept ones is scratch).
    #[inline]
    pub fn gather_word(&self, word: u64, src: &[u8], dst: &mut [u8]) {
        assert_eq!(src.len(), 64 * self.size());
        assert!(dst.len() >= 64 * self.size());
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU features were detected when `self` was made; `src` holds 64 elements
        // and `dst` room for 64, and each store writes within the first 64.
        unsafe {
            avx512::gather_word(self.float, word, src.as_ptr(), dst.as_mut_ptr())
        }
    }

    /// One word of a tile's output after placing (see `merge::settle`): for each of 64
    /// elements, the base's `b` where `word` has no bit, else `v` as [`Elem::replaces`] turns
    /// it, or `v` itself where that cannot decide; returns the bits of the undecided elements.
    ///
    /// [`Elem::replaces`]: crate::dtype::elem::Elem::replaces
    #[inline]
    pub fn settle_word(&self, word: u64, b: &[u8], v: &[u8], out: &mut [u8]) -> u64 {
        let n = 64 * self.size();
        assert!(b.len() == n && v.len() == n && out.len() == n);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU features were detected when `self` was made; all three hold 64
        // elements, read and written one vector at a time.
        unsafe {
            avx512::settle_word(self.float, word, b.as_ptr(), v.as_ptr(), out.as_mut_ptr())
        }
    }

    /// The statistics of docs/FORMAT.md section 7 over whole words of a chunk (`words.len()`
    /// times 64 elements of base `b` and fine-tune `t`), added to the 8 lanes `all` and `kept`
    /// in the order the format fixes (element `k` into lane `k mod 8`, in index order). Returns
    /// the differences that are not finite, the kept elements the merge would not give back
    /// (decided by `Elem::replaces`: a kept `−0` over a base that is not), and whether some kept
    /// elements are left undecided (for the caller's exact check).
    pub fn sums(
        &self,
        b: &[u8],
        t: &[u8],
        words: &[u64],
        all: &mut [f64; 8],
        kept: &mut [f64; 8],
    ) -> Sums {
        let n = 64 * self.size() * words.len();
        assert!(b.len() == n && t.len() == n);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU features were detected when `self` was made; `b` and `t` hold 64
        // elements per word, read 16 at a time.
        unsafe {
            avx512::sums(self.float, b.as_ptr(), t.as_ptr(), words, all, kept)
        }
    }

    /// Writes the next kept value over element `k` of `out` (64 little-endian elements)
    /// for each set bit `k` of `word`; `values` must hold exactly `word.count_ones()` elements.
    #[inline]
    pub fn place_word(&self, word: u64, values: &[u8], out: &mut [u8]) {
        assert_eq!(out.len(), 64 * self.size());
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU features were detected when `self` was made; the asserts above
        // bound every access (the expanding loads read only as many elements as bits set).
        unsafe {
            avx512::place_word(
                self.float,
                word,
                values.as_ptr(),
                values.len(),
                out.as_mut_ptr(),
            )
        }
    }

    fn size(&self) -> usize {
        self.float.size()
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use crate::dtype::Float;

    /// The next `popcount(m)` 16-bit elements at `p`, in the low lanes. A masked load, then
    /// the expansion in registers: the expanding load from memory is microcoded and several
    /// times slower on AMD Zen 4; masked-off lanes are not read, so `p` may end the mapping.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,popcnt")]
    unsafe fn load16(p: *const i16, m: u32) -> __m512i {
        let n = m.count_ones();
        let low = if n == 32 { !0 } else { (1u32 << n) - 1 };
        // SAFETY: the caller's `p` has `n` readable elements.
        unsafe { _mm512_maskz_loadu_epi16(low, p) }
    }

    /// As [`load16`], for 32-bit elements.
    #[inline]
    #[target_feature(enable = "avx512f,popcnt")]
    unsafe fn load32(p: *const i32, m: u16) -> __m512i {
        let n = m.count_ones();
        let low = if n == 16 { !0 } else { (1u16 << n) - 1 };
        // SAFETY: the caller's `p` has `n` readable elements.
        unsafe { _mm512_maskz_loadu_epi32(low, p) }
    }

    /// `acc[off..off+8] += c · (v − b)` on the lanes of `m8`.
    #[target_feature(enable = "avx512f")]
    unsafe fn lanes(v: __m512d, m8: u8, b: *const f64, acc: *mut f64, c: __m512d) {
        // SAFETY: the caller passes pointers to 8 readable (and, for acc, writable) f64.
        unsafe {
            let a = _mm512_loadu_pd(acc);
            let t = _mm512_mul_pd(c, _mm512_sub_pd(v, _mm512_loadu_pd(b)));
            _mm512_storeu_pd(acc, _mm512_mask_add_pd(a, m8, a, t));
        }
    }

    /// `Elem::replaces` on 64 elements of base `b` and value `v`: the bits where it decides,
    /// and those where its result is `+0` for a `−0` value (the one decided case that is not
    /// the value itself).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,popcnt")]
    unsafe fn decided_word(float: Float, b: *const u8, v: *const u8) -> (u64, u64) {
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

    /// See [`super::Kept::settle_word`].
    #[target_feature(enable = "avx512f,avx512bw,popcnt")]
    pub unsafe fn settle_word(
        float: Float,
        word: u64,
        b: *const u8,
        v: *const u8,
        out: *mut u8,
    ) -> u64 {
        // SAFETY (whole body): each pointer holds 64 elements = 128 or 256 bytes, taken 64
        // bytes at a time.
        unsafe {
            let (ok, minus_zero) = decided_word(float, b, v);
            // The value where placed (and `+0` for a decided `−0`), else the base.
            let (hit, zero) = (word, word & minus_zero);
            let at = |p: *const u8, q: usize| p.add(64 * q) as *const __m512i;
            for q in 0..float.size() {
                let (bv, vv) = (_mm512_loadu_si512(at(b, q)), _mm512_loadu_si512(at(v, q)));
                let o = if float.size() == 2 {
                    let (h, z) = ((hit >> (32 * q)) as u32, (zero >> (32 * q)) as u32);
                    _mm512_maskz_mov_epi16(!z, _mm512_mask_blend_epi16(h, bv, vv))
                } else {
                    let (h, z) = ((hit >> (16 * q)) as u16, (zero >> (16 * q)) as u16);
                    _mm512_maskz_mov_epi32(!z, _mm512_mask_blend_epi32(h, bv, vv))
                };
                _mm512_storeu_si512(out.add(64 * q) as *mut __m512i, o);
            }
            word & !ok
        }
    }

    /// 16 elements as f32 (exactly), in two halves as f64.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,popcnt")]
    unsafe fn load16_f64(float: Float, p: *const u8) -> (__m512d, __m512d) {
        // SAFETY: the caller's `p` holds 16 elements.
        let ps = unsafe {
            match float {
                Float::BF16 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                    _mm256_loadu_si256(p as *const __m256i),
                ))),
                Float::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
                _ => _mm512_loadu_ps(p as *const f32),
            }
        };
        (
            _mm512_cvtps_pd(_mm512_castps512_ps256(ps)),
            _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
                _mm512_castps_pd(ps),
            ))),
        )
    }

    /// See [`super::Kept::sums`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,popcnt")]
    pub unsafe fn sums(
        float: Float,
        b: *const u8,
        t: *const u8,
        words: &[u64],
        all: &mut [f64; 8],
        kept: &mut [f64; 8],
    ) -> super::Sums {
        let size = float.size();
        // SAFETY: eight f64 each.
        let (mut acc_all, mut acc_kept) = unsafe {
            (
                _mm512_loadu_pd(all.as_ptr()),
                _mm512_loadu_pd(kept.as_ptr()),
            )
        };
        let mut out = super::Sums::default();
        // QNaN, +inf, −inf, SNaN.
        const NONFINITE: i32 = 0x01 | 0x08 | 0x10 | 0x80;
        for (w, &word) in words.iter().enumerate() {
            // SAFETY: the word's 64 elements of `b` and `t`, which the caller holds.
            let (ok, minus_zero) =
                unsafe { decided_word(float, b.add(64 * w * size), t.add(64 * w * size)) };
            out.inexact += (word & minus_zero).count_ones() as u64;
            out.undecided |= word & !ok != 0;
            for q in 0..4 {
                let at = (64 * w + 16 * q) * size;
                let hit = (word >> (16 * q)) as u16;
                // SAFETY (this block): 16 elements of `b` and `t` from element 64w + 16q, within
                // the 64 per word the caller holds.
                let (b16, t16) = unsafe { (b.add(at), t.add(at)) };
                let ((b0, b1), (t0, t1)) =
                    unsafe { (load16_f64(float, b16), load16_f64(float, t16)) };
                let (d0, d1) = (_mm512_sub_pd(t0, b0), _mm512_sub_pd(t1, b1));
                let (s0, s1) = (_mm512_mul_pd(d0, d0), _mm512_mul_pd(d1, d1));
                acc_all = _mm512_add_pd(_mm512_add_pd(acc_all, s0), s1);
                acc_kept = _mm512_mask_add_pd(acc_kept, hit as u8, acc_kept, s0);
                acc_kept = _mm512_mask_add_pd(acc_kept, (hit >> 8) as u8, acc_kept, s1);
                out.nonfinite += (_mm512_fpclass_pd_mask::<NONFINITE>(d0).count_ones()
                    + _mm512_fpclass_pd_mask::<NONFINITE>(d1).count_ones())
                    as u64;
            }
        }
        // SAFETY: eight f64 each.
        unsafe {
            _mm512_storeu_pd(all.as_mut_ptr(), acc_all);
            _mm512_storeu_pd(kept.as_mut_ptr(), acc_kept);
        }
        out
    }

    /// See [`super::Kept::gather_word`]. 64 elements of `src`, room for 64 in `dst`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi2,popcnt")]
    pub unsafe fn gather_word(float: Float, word: u64, src: *const u8, dst: *mut u8) {
        // SAFETY (whole body): each step reads one 64-byte vector of `src` and stores one
        // 64-byte vector at most `popcount` of the earlier steps' elements into `dst`, which
        // stays within its 64 elements' room (the compressed lanes first, then zeros).
        unsafe {
            let mut d = dst;
            let (steps, lanes) = match float {
                Float::BF16 | Float::F16 => (2, 32),
                Float::F32 => (4, 16),
                Float::F64 => unreachable!("no handle is made for F64"),
            };
            for q in 0..steps {
                let m = (word >> (lanes * q)) & ((1u64 << lanes) - 1);
                if m == 0 {
                    continue;
                }
                let v = _mm512_loadu_si512(src.add(64 * q) as *const __m512i);
                let c = if lanes == 32 {
                    _mm512_maskz_compress_epi16(m as u32, v)
                } else {
                    _mm512_maskz_compress_epi32(m as u16, v)
                };
                _mm512_storeu_si512(d as *mut __m512i, c);
                d = d.add(m.count_ones() as usize * (64 / lanes));
            }
        }
    }

    /// See [`super::Kept::place_word`]. 64 elements of `out`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi2,popcnt")]
    pub unsafe fn place_word(float: Float, word: u64, values: *const u8, len: usize, out: *mut u8) {
        // Here, not in the caller, for the POPCNT instruction.
        assert_eq!(len, word.count_ones() as usize * float.size());
        // SAFETY (whole body): `values` holds popcount(word) elements and the expanding
        // loads read exactly as many as their mask has bits; `out` holds 64 elements.
        unsafe {
            match float {
                Float::BF16 | Float::F16 => {
                    let mut p = values as *const i16;
                    for half in 0..2 {
                        let m32 = (word >> (32 * half)) as u32;
                        if m32 == 0 {
                            continue;
                        }
                        let o = out.add(64 * half) as *mut __m512i;
                        let v =
                            _mm512_mask_expand_epi16(_mm512_loadu_si512(o), m32, load16(p, m32));
                        _mm512_storeu_si512(o, v);
                        p = p.add(m32.count_ones() as usize);
                    }
                }
                Float::F32 => {
                    let mut p = values as *const i32;
                    for q in 0..4 {
                        let m16 = (word >> (16 * q)) as u16;
                        if m16 == 0 {
                            continue;
                        }
                        let o = out.add(64 * q) as *mut __m512i;
                        let v =
                            _mm512_mask_expand_epi32(_mm512_loadu_si512(o), m16, load32(p, m16));
                        _mm512_storeu_si512(o, v);
                        p = p.add(m16.count_ones() as usize);
                    }
                }
                Float::F64 => unreachable!("no expander is made for F64"),
            }
        }
    }

    /// See [`super::Kept::add_word`]. 64 elements of `b` and `acc`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi2,popcnt")]
    pub unsafe fn add_word(
        float: Float,
        word: u64,
        values: *const u8,
        len: usize,
        b: *const f64,
        acc: *mut f64,
        c: f64,
    ) {
        // Here, not in the caller, for the POPCNT instruction.
        assert_eq!(len, word.count_ones() as usize * float.size());
        let cv = _mm512_set1_pd(c);
        // SAFETY (whole body): `values` holds popcount(word) elements and the expanding
        // loads read exactly as many as their mask has bits; `b` and `acc` hold 64.
        unsafe {
            match float {
                Float::BF16 | Float::F16 => {
                    let mut p = values as *const i16;
                    for half in 0..2 {
                        let m32 = (word >> (32 * half)) as u32;
                        if m32 == 0 {
                            continue;
                        }
                        let v = _mm512_maskz_expand_epi16(m32, load16(p, m32));
                        p = p.add(m32.count_ones() as usize);
                        for q in 0..2 {
                            let m16 = (m32 >> (16 * q)) as u16;
                            if m16 == 0 {
                                continue;
                            }
                            let h = if q == 0 {
                                _mm512_castsi512_si256(v)
                            } else {
                                _mm512_extracti64x4_epi64::<1>(v)
                            };
                            let ps = if float == Float::BF16 {
                                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                                    h,
                                )))
                            } else {
                                _mm512_cvtph_ps(h)
                            };
                            let lo = _mm512_castps512_ps256(ps);
                            let hi =
                                _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(ps)));
                            let off = 32 * half + 16 * q;
                            for (e, f) in [lo, hi].into_iter().enumerate() {
                                let m8 = (m16 >> (8 * e)) as u8;
                                if m8 != 0 {
                                    let at = off + 8 * e;
                                    lanes(_mm512_cvtps_pd(f), m8, b.add(at), acc.add(at), cv);
                                }
                            }
                        }
                    }
                }
                Float::F32 => {
                    let mut p = values as *const i32;
                    for q in 0..4 {
                        let m16 = (word >> (16 * q)) as u16;
                        if m16 == 0 {
                            continue;
                        }
                        let ps =
                            _mm512_castsi512_ps(_mm512_maskz_expand_epi32(m16, load32(p, m16)));
                        p = p.add(m16.count_ones() as usize);
                        let lo = _mm512_castps512_ps256(ps);
                        let hi =
                            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(ps)));
                        for (e, f) in [lo, hi].into_iter().enumerate() {
                            let m8 = (m16 >> (8 * e)) as u8;
                            if m8 != 0 {
                                let at = 16 * q + 8 * e;
                                lanes(_mm512_cvtps_pd(f), m8, b.add(at), acc.add(at), cv);
                            }
                        }
                    }
                }
                Float::F64 => unreachable!("no expander is made for F64"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Kept;
    use crate::dtype::Float;

    /// Placing and gathering by AVX-512 move the same elements as the scalar loops, for every
    /// dtype handled and masks from empty to full.
    #[test]
    fn simd_place_and_gather_match_the_scalar_loops() {
        let mut next = crate::xorshift(0x2545_f491_4f6c_dd1du64);
        for float in [Float::BF16, Float::F16, Float::F32] {
            let Some(x) = Kept::for_dtype(float) else {
                eprintln!(
                    "skipped for {float:?}: this CPU has no AVX-512 VBMI2 (the scalar loops run)"
                );
                continue;
            };
            let size = float.size();
            for round in 0..2000 {
                let word = match round % 5 {
                    0 => 0,
                    1 => !0,
                    2 => next() | next(),
                    _ => next() & next(),
                };
                let n = word.count_ones() as usize;
                let bytes = |len: usize, next: &mut dyn FnMut() -> u64| -> Vec<u8> {
                    (0..len).map(|_| next() as u8).collect()
                };
                let src = bytes(64 * size, &mut next);
                let mut want = Vec::new();
                for k in (0..64).filter(|k| (word >> k) & 1 != 0) {
                    want.extend_from_slice(&src[k * size..(k + 1) * size]);
                }
                let mut dst = bytes(64 * size, &mut next);
                x.gather_word(word, &src, &mut dst);
                assert_eq!(&dst[..n * size], &want[..], "{float:?} gather {word:#x}");

                let values = bytes(n * size, &mut next);
                let mut want = src.clone();
                for (j, k) in (0..64).filter(|k| (word >> k) & 1 != 0).enumerate() {
                    want[k * size..(k + 1) * size]
                        .copy_from_slice(&values[j * size..(j + 1) * size]);
                }
                let mut out = src.clone();
                x.place_word(word, &values, &mut out);
                assert_eq!(out, want, "{float:?} place {word:#x}");
            }
        }
    }

    /// The AVX-512 expansion gives the scalar loop's bits, on every dtype it handles, for
    /// masks from empty to full and values that include NaN, ±inf, ±0 and subnormals.
    #[test]
    fn simd_expansion_matches_the_scalar_loop() {
        let mut next = crate::xorshift(0x9e37_79b9_7f4a_7c15u64);
        for float in [Float::BF16, Float::F16, Float::F32] {
            let Some(x) = Kept::for_dtype(float) else {
                eprintln!(
                    "skipped for {float:?}: this CPU has no AVX-512 VBMI2 (the scalar loop runs)"
                );
                continue;
            };
            let specials: [f64; 8] = [
                f64::NAN,
                f64::INFINITY,
                -f64::INFINITY,
                0.0,
                -0.0,
                1e-40,
                -3.5,
                65504.0,
            ];
            for round in 0..2000 {
                let word = match round % 5 {
                    0 => 0,
                    1 => !0,
                    _ => next() & next() | (next() & 1),
                };
                let n = word.count_ones() as usize;
                let bits_of = |r: u64| -> Vec<u8> {
                    let v = if r.is_multiple_of(7) {
                        specials[(r as usize / 7) % 8]
                    } else {
                        (r % 2001) as f64 / 97.0 - 10.0
                    };
                    float.round_bits(v).to_le_bytes()[..float.size()].to_vec()
                };
                let values: Vec<u8> = (0..n).flat_map(|_| bits_of(next())).collect();
                let b: Vec<f64> = (0..64)
                    .map(|_| {
                        let r = next();
                        float.load(&bits_of(r), 0)
                    })
                    .collect();
                let start: Vec<f64> = (0..64)
                    .map(|k| {
                        if k % 3 == 0 {
                            -0.0
                        } else {
                            (next() % 100) as f64 * 0.25
                        }
                    })
                    .collect();
                let c = [1.0, -0.5, 3.0, 1.0 / 3.0][round % 4];
                let mut want = start.clone();
                let (mut j, mut bits) = (0, word);
                while bits != 0 {
                    let k = bits.trailing_zeros() as usize;
                    want[k] += c * (float.load(&values, j) - b[k]);
                    j += 1;
                    bits &= bits - 1;
                }
                let mut got = start.clone();
                x.add_word(word, &values, &b, &mut got, c);
                for k in 0..64 {
                    assert!(
                        got[k].to_bits() == want[k].to_bits()
                            || (got[k].is_nan() && want[k].is_nan()),
                        "{float:?} word {word:#x} lane {k}: {} vs {}",
                        got[k],
                        want[k]
                    );
                }
            }
        }
    }
}
