//! Merge, placing path: one word of a tile's output settled from the base and the placed
//! values by `Elem::replaces` (see `merge::settle`), by AVX-512 on whole vectors or by the
//! portable loop.

use super::Kept;
use crate::dtype::elem::Elem;

/// One word of `merge::settle`: up to 64 elements (64 for the AVX-512 path, taken when
/// `simd` is given and the word is whole); returns the bits of the undecided ones. See
/// [`Kept::settle_word`].
#[inline]
pub fn settle_word<E: Elem>(
    simd: Option<&Kept>,
    word: u64,
    b: &[u8],
    v: &[u8],
    out: &mut [u8],
) -> u64 {
    match simd {
        Some(x) if out.len() == 64 * E::SIZE => x.settle_word(word, b, v, out),
        _ => portable::settle_word::<E>(word, b, v, out),
    }
}

impl Kept {
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
}

mod portable {
    use crate::dtype::elem::Elem;

    crate::simd::multiversioned! {
        /// One word of `merge::settle` without AVX-512 (see [`Kept::settle_word`]): up to 64
        /// elements; returns the bits of the undecided ones. Branch-free, so that it
        /// vectorizes.
        ///
        /// [`Kept::settle_word`]: crate::simd::Kept::settle_word
        #[inline]
        pub fn settle_word<E: Elem>(word: u64, b: &[u8], v: &[u8], out: &mut [u8]) -> u64 {
            let mut undecided = false;
            let elems = b.chunks_exact(E::SIZE).zip(v.chunks_exact(E::SIZE));
            for (k, ((b, v), o)) in elems.zip(out.chunks_exact_mut(E::SIZE)).enumerate() {
                let (b, v) = (E::bits(b), E::bits(v));
                let r = E::replaces(b, v);
                let hit = (word >> k) & 1 != 0;
                undecided |= hit & r.is_none();
                E::put(o, if hit { r.unwrap_or(v) } else { b });
            }
            if !undecided {
                return 0;
            }
            let mut bits = 0;
            for (k, (b, v)) in b
                .chunks_exact(E::SIZE)
                .zip(v.chunks_exact(E::SIZE))
                .enumerate()
            {
                let hit = (word >> k) & 1 != 0;
                bits |= ((hit && E::replaces(E::bits(b), E::bits(v)).is_none()) as u64) << k;
            }
            bits
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use crate::dtype::Float;
    use crate::simd::x86::decided_word;

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
}

#[cfg(test)]
mod tests {
    use super::{Kept, portable};
    use crate::dtype::elem::{BF16, Elem, F16, F32};

    /// The AVX-512 settle gives the portable loop's output and undecided bits, on bits that
    /// include ±0, ±inf, NaN, subnormals and exponents far apart.
    #[test]
    fn simd_settle_matches_the_portable_loop() {
        fn check<E: Elem>(next: &mut impl FnMut() -> u64, special: &[u64]) {
            let Some(x) = Kept::for_dtype(E::FLOAT) else {
                eprintln!("skipped for {:?}: no AVX-512 VBMI2 here", E::FLOAT);
                return;
            };
            let mask = (1u64 << (8 * E::SIZE)) - 1;
            for round in 0..3000 {
                let mut elem = |_| {
                    let r = next();
                    let bits = if r.is_multiple_of(5) {
                        special[(r >> 8) as usize % special.len()]
                    } else {
                        r >> 16
                    };
                    (bits & mask).to_le_bytes()[..E::SIZE].to_vec()
                };
                let b: Vec<u8> = (0..64).flat_map(&mut elem).collect();
                let v: Vec<u8> = (0..64).flat_map(&mut elem).collect();
                let word = [0, !0, next(), next() & next()][round % 4];
                let (mut want, mut got) = (vec![0u8; 64 * E::SIZE], vec![0u8; 64 * E::SIZE]);
                let w = portable::settle_word::<E>(word, &b, &v, &mut want);
                let g = x.settle_word(word, &b, &v, &mut got);
                assert_eq!((g, &got), (w, &want), "{:?} word {word:#x}", E::FLOAT);
            }
        }
        let mut next = crate::xorshift(0x9e37_79b9_7f4a_7c15u64);
        check::<BF16>(
            &mut next,
            &[0, 0x8000, 1, 0x7f80, 0xff80, 0x7fc0, 0x0080, 0x3f80, 0x0a00],
        );
        check::<F16>(
            &mut next,
            &[0, 0x8000, 1, 0x7c00, 0xfc00, 0x7e00, 0x0400, 0x3c00],
        );
        check::<F32>(
            &mut next,
            &[
                0,
                0x8000_0000,
                1,
                0x7f80_0000,
                0xff80_0000,
                0x7fc0_0000,
                0x3f80_0000,
                0x0d80_0000,
            ],
        );
    }
}
