//! Merge, general path: a mask word's kept values added into the f64 accumulator,
//! `acc[k] += c · (v − b[k])`, by AVX-512 (the values expanded to their places by
//! `vpexpandw`/`vpexpandd`, then f64 arithmetic 8 lanes at a time, masked, in the same IEEE
//! operations) or by the scalar loop.

use super::Kept;
use crate::dtype::elem::Elem;

/// `acc[k] += c · (v − b[k])` for each set bit of `word`, whose bit `k` is element `k0 + k` of
/// the tile (see `merge::for_each_kept_word`), `v` being the next value of `values` (exactly
/// `word.count_ones()` elements); each such element is marked in `touched`, one bit each. The
/// AVX-512 path takes a whole word that lines up with the tile's when `simd` is given.
#[inline]
#[allow(clippy::too_many_arguments)]
pub fn add_word<E: Elem>(
    simd: Option<&Kept>,
    k0: usize,
    word: u64,
    values: &[u8],
    b: &[f64],
    acc: &mut [f64],
    touched: &mut [u64],
    c: f64,
) {
    // Words line up with the tile's unless a file's chunk size is not a multiple of 64.
    let aligned = k0.is_multiple_of(64);
    if aligned {
        touched[k0 / 64] |= word;
        if let Some(x) = simd
            && k0 + 64 <= acc.len()
        {
            x.add_word(word, values, &b[k0..k0 + 64], &mut acc[k0..k0 + 64], c);
            return;
        }
    }
    let mut bits = word;
    let mut j = 0;
    while bits != 0 {
        let k = k0 + bits.trailing_zeros() as usize;
        acc[k] += c * (E::load(values, j) - b[k]);
        if !aligned {
            touched[k / 64] |= 1 << (k % 64);
        }
        j += 1;
        bits &= bits - 1;
    }
}

impl Kept {
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
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use crate::dtype::Float;
    use crate::simd::x86::{load16, load32};

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
    use super::{Kept, add_word};
    use crate::dtype::Float;

    /// The AVX-512 expansion gives the scalar loop's bits, on every dtype it handles, for
    /// masks from empty to full and values that include NaN, ±inf, ±0 and subnormals; so does
    /// [`add_word`] on either path (on a CPU without AVX-512 VBMI2, the scalar loop alone is
    /// checked).
    #[test]
    fn simd_expansion_matches_the_scalar_loop() {
        let mut next = crate::xorshift(0x9e37_79b9_7f4a_7c15u64);
        for float in [Float::BF16, Float::F16, Float::F32] {
            let x = Kept::for_dtype(float);
            if x.is_none() {
                eprintln!(
                    "skipped for {float:?}: this CPU has no AVX-512 VBMI2 (the scalar loop runs)"
                );
            }
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
                let same = |got: &[f64], how: &str| {
                    for k in 0..64 {
                        assert!(
                            got[k].to_bits() == want[k].to_bits()
                                || (got[k].is_nan() && want[k].is_nan()),
                            "{float:?} {how} word {word:#x} lane {k}: {} vs {}",
                            got[k],
                            want[k]
                        );
                    }
                };
                if let Some(x) = &x {
                    let mut got = start.clone();
                    x.add_word(word, &values, &b, &mut got, c);
                    same(&got, "Kept::add_word");
                }
                // The callers' function, on either path: the same sums, the word marked.
                for simd in [x.as_ref(), None] {
                    let (mut got, mut touched) = (start.clone(), [0u64]);
                    crate::with_elem!(float, E => add_word::<E>(
                        simd, 0, word, &values, &b, &mut got, &mut touched, c
                    ));
                    same(&got, "add_word");
                    assert_eq!(touched, [word], "{float:?} touched");
                }
            }
        }
    }
}
