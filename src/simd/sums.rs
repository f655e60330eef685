//! Extract: the statistics of docs/FORMAT.md section 7 over a chunk ([`chunk_sums`]), whole
//! words by AVX-512 ([`Kept::sums`]: 16 elements a step into the same 8 lanes in the same
//! order, the round-trip check by `Elem::replaces` on whole vectors, non-finite differences
//! counted by `vfpclasspd`) and the rest by the portable loop, which carries on the same lanes.

use super::Kept;
use crate::dtype::elem::Elem;

/// The sums per chunk: the columns of docs/FORMAT.md section 7's statistics (`sotu/stats`).
pub const SUMS: usize = 3;

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

crate::simd::multiversioned! {
    /// The sums of docs/FORMAT.md section 7 over one chunk, with `words` its keep bits: each
    /// sum in 8 lanes by index mod 8, in index order from +0.0. A kept element adds `δ²` to the
    /// kept lane and an element not kept adds +0.0, which leaves a lane that started at +0.0
    /// unchanged, NaN and infinity included; so the loop has no branches and vectorizes
    /// (AVX-512, AVX2, baseline, chosen at run time). Whole words go by AVX-512 when `simd` is
    /// given ([`Kept::sums`]). Also counts non-finite differences.
    #[inline]
    pub fn chunk_sums<E: Elem>(
        simd: Option<&Kept>,
        b: &[u8],
        t: &[u8],
        words: &[u64],
    ) -> ([f64; SUMS], u64) {
        let all_words = words;
        let mut all = [0.0f64; 8];
        let mut kept = [0.0f64; 8];
        let mut inexact = [0u64; 8];
        let mut nonfinite = [0u64; 8];
        let mut undecided = false;
        // Whole words by AVX-512 where the CPU has it, then the rest by the portable loop, which
        // carries on the same lanes in the same order.
        let mut done = 0;
        let mut simd_counts = Sums::default();
        if let Some(x) = simd {
            let n = b.len() / E::SIZE / 64;
            done = n * 64 * E::SIZE;
            simd_counts = x.sums(&b[..done], &t[..done], &words[..n], &mut all, &mut kept);
            undecided = simd_counts.undecided;
        }
        let (b_all, t_all) = (b, t);
        let (b, t) = (&b[done..], &t[done..]);
        let words = &words[done / E::SIZE / 64..];
        // Whole groups of 8 first, with a fixed trip count, so that the lanes stay in registers.
        let whole = b.len() / (8 * E::SIZE) * (8 * E::SIZE);
        let groups = b[..whole]
            .chunks_exact(8 * E::SIZE)
            .zip(t[..whole].chunks_exact(8 * E::SIZE));
        let mut lane = |p: usize, be: &[u8], te: &[u8], hit: bool| {
            let (b_bits, t_bits) = (E::bits(be), E::bits(te));
            let d = E::value(t_bits) - E::value(b_bits);
            all[p] += d * d;
            kept[p] += if hit { d * d } else { 0.0 };
            nonfinite[p] += !d.is_finite() as u64;
            // docs/FORMAT.md section 8: the merge must give v back. `replaces` decides nearly
            // every element without the rounding; the rest are checked below.
            let r = E::replaces(b_bits, t_bits);
            undecided |= hit & r.is_none();
            inexact[p] += (hit & r.is_some_and(|r| r != t_bits)) as u64;
        };
        for (g, (bg, tg)) in groups.enumerate() {
            let word = (words[g / 8] >> (8 * (g % 8))) as u8;
            for p in 0..8 {
                let at = p * E::SIZE..(p + 1) * E::SIZE;
                lane(p, &bg[at.clone()], &tg[at], (word >> p) & 1 != 0);
            }
        }
        let k0 = whole / E::SIZE;
        let rest = b[whole..]
            .chunks_exact(E::SIZE)
            .zip(t[whole..].chunks_exact(E::SIZE));
        for (p, (be, te)) in rest.enumerate() {
            let k = k0 + p;
            lane(p, be, te, (words[k / 64] >> (k % 64)) & 1 != 0);
        }
        let mut inexact: u64 = inexact.iter().sum::<u64>() + simd_counts.inexact;
        if undecided {
            let words = all_words;
            for (k, (be, te)) in b_all
                .chunks_exact(E::SIZE)
                .zip(t_all.chunks_exact(E::SIZE))
                .enumerate()
            {
                let (b_bits, t_bits) = (E::bits(be), E::bits(te));
                if (words[k / 64] >> (k % 64)) & 1 == 0 || E::replaces(b_bits, t_bits).is_some() {
                    continue;
                }
                let (bv, tv) = (E::value(b_bits), E::value(t_bits));
                // round(b + (v − b)) must give v back (a NaN, some NaN).
                let r = bv + (tv - bv);
                let back = if tv.is_nan() {
                    r.is_nan()
                } else {
                    E::round(r) == t_bits
                };
                inexact += !back as u64;
            }
        }
        let total = |lanes: [f64; 8]| lanes.iter().fold(0.0, |a, &x| a + x);
        (
            [total(all), total(kept), inexact as f64],
            nonfinite.iter().sum::<u64>() + simd_counts.nonfinite,
        )
    }
}

impl Kept {
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
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use crate::dtype::Float;
    use crate::simd::x86::decided_word;

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
}

#[cfg(test)]
mod tests {
    use super::{Kept, chunk_sums};
    use crate::dtype::elem::{BF16, Elem, F16, F32};

    /// The AVX-512 statistics equal the portable loop's (bits, or both NaN) on chunks of every
    /// bit pattern and of ordinary differences, with lengths that leave a tail of part of a word.
    #[test]
    fn simd_statistics_match_the_portable_loop() {
        fn check<E: Elem>(next: &mut impl FnMut() -> u64) {
            let Some(x) = Kept::for_dtype(E::FLOAT) else {
                eprintln!("skipped for {:?}: no AVX-512 VBMI2 here", E::FLOAT);
                return;
            };
            let mask = (1u64 << (8 * E::SIZE)) - 1;
            for round in 0..300 {
                let n: usize = [64, 640, 1000, 4096 + 13][round % 4];
                let b: Vec<u8> = (0..n)
                    .flat_map(|_| (next() & mask).to_le_bytes()[..E::SIZE].to_vec())
                    .collect();
                // Ordinary fine-tunes (the low bits changed) in even rounds, any bits in odd ones.
                let t: Vec<u8> = b
                    .chunks_exact(E::SIZE)
                    .flat_map(|e| {
                        let r = next();
                        if round % 2 == 0 {
                            let mut e = e.to_vec();
                            e[0] ^= (r & 0xf) as u8;
                            e
                        } else {
                            (r & mask).to_le_bytes()[..E::SIZE].to_vec()
                        }
                    })
                    .collect();
                let words: Vec<u64> = (0..n.div_ceil(64)).map(|_| next() & next()).collect();
                let (want, want_nf) = chunk_sums::<E>(None, &b, &t, &words);
                let (got, got_nf) = chunk_sums::<E>(Some(&x), &b, &t, &words);
                assert_eq!(got_nf, want_nf, "{:?} round {round}", E::FLOAT);
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                        "{:?} round {round}: {got:?} vs {want:?}",
                        E::FLOAT
                    );
                }
            }
        }
        let mut next = crate::xorshift(0x2545_f491_4f6c_dd1du64);
        check::<BF16>(&mut next);
        check::<F16>(&mut next);
        check::<F32>(&mut next);
    }
}
