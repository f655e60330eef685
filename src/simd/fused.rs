//! Merge, general path: a tile's output computed a word (64 elements) at a time in registers.
//! Per word: the base to f64; each term's kept values expanded to their places and added,
//! `acc += c · (v − b)` from `acc = −0`, in the terms' order; then `b + acc` rounded once to the
//! base's dtype (docs/FORMAT.md section 8). No f64 buffer is written and read back, and the base
//! is converted once per word. By AVX-512 (`vpexpandw`/`vpexpandd`, f64 arithmetic 8 lanes at a
//! time, masked, then the rounding of `dtype` on whole vectors) or by the portable loop, in the
//! same IEEE operations.

use super::Kept;
use crate::dtype::elem::Elem;

/// One term of a merge over a tile.
#[derive(Clone, Copy)]
pub struct TermRun<'a> {
    /// Its keep bits, one word per 64 elements of the tile (bit `k` of word `w` is element
    /// `64·w + k`), none past the tile's end.
    pub words: &'a [u64],
    /// Its kept values in element order (`Chunks::kept_run`): `popcount` of each word in turn.
    pub values: &'a [u8],
    /// Its coefficient `c`.
    pub coeff: f64,
}

/// A tile's output in the base's own dtype `E` (`base` and `out` hold its elements): the base's
/// bits where no term keeps an element, elsewhere `round(b + (−0 + c₁·(v₁ − b) + …))` over the
/// terms that keep it, in their order (docs/FORMAT.md section 8). Returns how many results are
/// infinite or NaN where the base is finite ([`Float::becomes_nonfinite`]). The AVX-512 path
/// runs when `simd` is given ([`Kept::merge_tile`]).
///
/// [`Float::becomes_nonfinite`]: crate::dtype::Float::becomes_nonfinite
pub fn merge_tile<E: Elem>(
    simd: Option<&Kept>,
    base: &[u8],
    terms: &[TermRun],
    out: &mut [u8],
) -> u64 {
    match simd {
        Some(x) => x.merge_tile(base, terms, out),
        None => portable::merge_tile::<E>(base, terms, out),
    }
}

impl Kept {
    /// [`merge_tile`] by AVX-512: the output of a tile of the handle's dtype, each word's f64
    /// sums in registers. The terms' words must cover the tile, with no bit past its end.
    pub fn merge_tile(&self, base: &[u8], terms: &[TermRun], out: &mut [u8]) -> u64 {
        let n = check_tile(self.size(), base, terms, out);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU features were detected when `self` was made; `base` and `out` hold
        // `n` elements, the kernel reads and writes only those, and it checks each term's
        // values against its words before reading any.
        unsafe {
            avx512::merge_tile(self.float, n, base.as_ptr(), terms, out.as_mut_ptr())
        }
    }
}

/// The elements of a tile of `size`-byte elements, after checking that `out` matches `base`
/// and that each term's words cover the tile with no bit past its end.
fn check_tile(size: usize, base: &[u8], terms: &[TermRun], out: &[u8]) -> usize {
    let n = base.len() / size;
    assert!(base.len() == n * size && out.len() == base.len());
    for t in terms {
        assert_eq!(
            t.words.len(),
            n.div_ceil(64),
            "one keep word per 64 elements"
        );
        if !n.is_multiple_of(64) {
            assert_eq!(t.words[n / 64] >> (n % 64), 0, "no keep bit past the tile");
        }
    }
    n
}

mod portable {
    use super::TermRun;
    use crate::dtype::elem::Elem;
    use crate::simd::add_word;

    crate::simd::multiversioned! {
        /// [`super::merge_tile`] without AVX-512, a word at a time: the scalar loop of
        /// [`add_word`] into a word's accumulator, then one pass that rounds. Compiled for
        /// AVX-512, AVX2 and the baseline, chosen at run time.
        pub fn merge_tile<E: Elem>(base: &[u8], terms: &[TermRun<'_>], out: &mut [u8]) -> u64 {
            super::check_tile(E::SIZE, base, terms, out);
            let mut at = vec![0usize; terms.len()];
            let mut overflows = 0u64;
            let words = base.chunks(64 * E::SIZE).zip(out.chunks_mut(64 * E::SIZE));
            for (w, (base, out)) in words.enumerate() {
                let mut b = [0.0f64; 64];
                for (b, e) in b.iter_mut().zip(base.chunks_exact(E::SIZE)) {
                    *b = E::value(E::bits(e));
                }
                // −0.0 is the additive identity (docs/FORMAT.md section 8).
                let mut acc = [-0.0f64; 64];
                let mut touched = [0u64];
                for (t, at) in terms.iter().zip(&mut at) {
                    let word = t.words[w];
                    let len = word.count_ones() as usize * E::SIZE;
                    let values = &t.values[*at..*at + len];
                    add_word::<E>(None, 0, word, values, &b, &mut acc, &mut touched, t.coeff);
                    *at += len;
                }
                // A select per element rather than a branch, so that it vectorizes (the base
                // is read again from its bits, which keeps it so).
                let elems = base.chunks_exact(E::SIZE).zip(out.chunks_exact_mut(E::SIZE));
                for (k, ((e, o), &a)) in elems.zip(&acc).enumerate() {
                    let bits = E::bits(e);
                    let b = E::value(bits);
                    let x = b + a;
                    let hit = (touched[0] >> k) & 1 != 0;
                    overflows += (hit & E::FLOAT.becomes_nonfinite(b, x)) as u64;
                    E::put(o, if hit { E::round(x) } else { bits });
                }
            }
            for (t, at) in terms.iter().zip(at) {
                assert_eq!(at, t.values.len(), "a term's values are its kept elements'");
            }
            overflows
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::TermRun;
    use crate::dtype::Float;
    use crate::simd::x86::{load16, load32};

    /// 16 f32 lanes as two vectors of 8 f64 (exact).
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq")]
    fn widen(ps: __m512) -> [__m512d; 2] {
        [
            _mm512_cvtps_pd(_mm512_castps512_ps256(ps)),
            _mm512_cvtps_pd(_mm512_extractf32x8_ps::<1>(ps)),
        ]
    }

    /// 16 lanes of 16-bit floats as f32 (exact): a BF16 is the high half of its f32.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn half_to_f32(float: Float, h: __m256i) -> __m512 {
        if float == Float::BF16 {
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        } else {
            _mm512_cvtph_ps(h)
        }
    }

    /// `x` rounded to f32 "to odd" (as `dtype::f64_to_f32_round_odd`), as bits: truncated
    /// toward zero, the last bit set where anything was lost; for NaN lanes, anything.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl")]
    fn round_odd(x: __m512d) -> __m256i {
        let r = _mm512_cvt_roundpd_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(x);
        let lost = _mm512_cmp_pd_mask::<_CMP_NEQ_OQ>(_mm512_cvtps_pd(r), x);
        let bits = _mm256_castps_si256(r);
        _mm256_mask_or_epi32(bits, lost, bits, _mm256_set1_epi32(1))
    }

    /// `acc += c · (v − b)` on the lanes of `m` (16 lanes as two vectors of 8), with the same
    /// bits in fewer operations (docs/NOTES.md, "The fused kernel"): `1 · y` is `y` and
    /// `−0 + y` is `y` for every `y` but NaN, which stays a NaN; so with `UNIT` (`c` is 1) there
    /// is no product, and with `FRESH` (no earlier term touched the word: the accumulator is
    /// `−0` on every lane) no sum.
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq")]
    fn add16<const FRESH: bool, const UNIT: bool>(
        v: __m512,
        m: u16,
        c: __m512d,
        b: &[__m512d],
        acc: &mut [__m512d],
    ) {
        let zero = _mm512_set1_pd(-0.0);
        for (e, v) in widen(v).into_iter().enumerate() {
            let m = (m >> (8 * e)) as u8;
            acc[e] = match (FRESH, UNIT) {
                (true, true) => _mm512_mask_sub_pd(zero, m, v, b[e]),
                (true, false) => _mm512_mask_mul_pd(zero, m, c, _mm512_sub_pd(v, b[e])),
                (false, true) => _mm512_mask_add_pd(acc[e], m, acc[e], _mm512_sub_pd(v, b[e])),
                (false, false) => {
                    let t = _mm512_mul_pd(c, _mm512_sub_pd(v, b[e]));
                    _mm512_mask_add_pd(acc[e], m, acc[e], t)
                }
            };
        }
    }

    /// One term's kept values of a word (bits `word`, the values from `*p` on, which moves
    /// past them) added into the word's accumulator `acc`, over its base `b` ([`add16`]).
    ///
    /// # Safety
    /// `*p` holds `popcount(word)` elements of `float`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vbmi2,popcnt")]
    unsafe fn add_term<const FRESH: bool, const UNIT: bool>(
        float: Float,
        word: u64,
        p: &mut *const u8,
        c: __m512d,
        b: &[__m512d; 8],
        acc: &mut [__m512d; 8],
    ) {
        // SAFETY (whole body): the expanding loads read as many elements as their mask has
        // bits, popcount(word) in all.
        unsafe {
            if float == Float::F32 {
                for g in 0..4 {
                    let m = (word >> (16 * g)) as u16;
                    let v = _mm512_maskz_expand_epi32(m, load32(*p as *const i32, m));
                    *p = p.add(4 * m.count_ones() as usize);
                    let (b, acc) = (&b[2 * g..2 * g + 2], &mut acc[2 * g..2 * g + 2]);
                    add16::<FRESH, UNIT>(_mm512_castsi512_ps(v), m, c, b, acc);
                }
            } else {
                for half in 0..2 {
                    let m32 = (word >> (32 * half)) as u32;
                    let v = _mm512_maskz_expand_epi16(m32, load16(*p as *const i16, m32));
                    *p = p.add(2 * m32.count_ones() as usize);
                    let h = [_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64::<1>(v)];
                    for (q, h) in h.into_iter().enumerate() {
                        let (g, m) = (2 * half + q, (m32 >> (16 * q)) as u16);
                        let (b, acc) = (&b[2 * g..2 * g + 2], &mut acc[2 * g..2 * g + 2]);
                        add16::<FRESH, UNIT>(half_to_f32(float, h), m, c, b, acc);
                    }
                }
            }
        }
    }

    /// See [`super::Kept::merge_tile`]: `n` elements of `base` and `out`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,popcnt")]
    pub unsafe fn merge_tile(
        float: Float,
        n: usize,
        base: *const u8,
        terms: &[TermRun],
        out: *mut u8,
    ) -> u64 {
        let size = float.size();
        // Each term's next value; checked here, not in the caller, for the POPCNT instruction.
        let mut next: Vec<*const u8> = terms
            .iter()
            .map(|t| {
                let kept: usize = t.words.iter().map(|w| w.count_ones() as usize).sum();
                assert_eq!(
                    t.values.len(),
                    kept * size,
                    "a term's values are its kept elements'"
                );
                t.values.as_ptr()
            })
            .collect();
        let mut overflows = 0u64;
        for w in 0..n.div_ceil(64) {
            // The word's elements: all 64 but in the tile's last word.
            let live = if 64 * (w + 1) <= n {
                !0
            } else {
                (1u64 << (n % 64)) - 1
            };
            // SAFETY: the word's live elements lie within the `n` of `base` and `out`.
            let (b_in, b_out) = unsafe { (base.add(64 * w * size), out.add(64 * w * size)) };
            let mut b = [_mm512_setzero_pd(); 8];
            for g in 0..4 {
                let m = (live >> (16 * g)) as u16;
                // SAFETY: masked loads of the live elements.
                let ps = unsafe {
                    let p = b_in.add(16 * g * size);
                    match float {
                        Float::F32 => _mm512_maskz_loadu_ps(m, p as *const f32),
                        _ => half_to_f32(float, _mm256_maskz_loadu_epi16(m, p as *const i16)),
                    }
                };
                [b[2 * g], b[2 * g + 1]] = widen(ps);
            }
            // −0.0 is the additive identity (docs/FORMAT.md section 8).
            let mut acc = [_mm512_set1_pd(-0.0); 8];
            let mut touched = 0u64;
            for (t, p) in terms.iter().zip(&mut next) {
                let word = t.words[w];
                if word == 0 {
                    continue;
                }
                let c = _mm512_set1_pd(t.coeff);
                // SAFETY: the values hold popcount(word) elements from `p` on (checked above
                // for the whole tile).
                unsafe {
                    match (touched == 0, t.coeff == 1.0) {
                        (true, true) => add_term::<true, true>(float, word, p, c, &b, &mut acc),
                        (true, false) => add_term::<true, false>(float, word, p, c, &b, &mut acc),
                        (false, true) => add_term::<false, true>(float, word, p, c, &b, &mut acc),
                        (false, false) => add_term::<false, false>(float, word, p, c, &b, &mut acc),
                    }
                }
                touched |= word;
            }
            // `Float::becomes_nonfinite`, read off the bits: a result rounds to infinity or
            // NaN exactly where `!(|x| < overflow_limit)`, and the base is finite.
            let mut over = 0u64;
            for g in 0..4 {
                let (hit, m) = ((touched >> (16 * g)) as u16, (live >> (16 * g)) as u16);
                let x = [
                    _mm512_add_pd(b[2 * g], acc[2 * g]),
                    _mm512_add_pd(b[2 * g + 1], acc[2 * g + 1]),
                ];
                let nan = _mm512_cmp_pd_mask::<_CMP_UNORD_Q>(x[0], x[0]) as u16
                    | (_mm512_cmp_pd_mask::<_CMP_UNORD_Q>(x[1], x[1]) as u16) << 8;
                // SAFETY: masked loads and stores of the live elements.
                unsafe {
                    if float == Float::F32 {
                        let p = b_in.add(64 * g) as *const i32;
                        let r = _mm512_insertf32x8::<1>(
                            _mm512_castps256_ps512(_mm512_cvt_roundpd_ps::<
                                { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
                            >(x[0])),
                            _mm512_cvt_roundpd_ps::<
                                { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
                            >(x[1]),
                        );
                        let r = _mm512_mask_mov_epi32(
                            _mm512_castps_si512(r),
                            nan,
                            _mm512_set1_epi32(0x7fc0_0000),
                        );
                        let old = _mm512_maskz_loadu_epi32(m, p);
                        let all = _mm512_set1_epi32(0x7f80_0000);
                        let nonfinite = |x| _mm512_cmpeq_epi32_mask(_mm512_and_si512(x, all), all);
                        over |= ((hit & nonfinite(r) & !nonfinite(old)) as u64) << (16 * g);
                        let r = _mm512_mask_blend_epi32(hit, old, r);
                        _mm512_mask_storeu_epi32(b_out.add(64 * g) as *mut i32, m, r);
                    } else {
                        let odd = _mm512_inserti64x4::<1>(
                            _mm512_castsi256_si512(round_odd(x[0])),
                            round_odd(x[1]),
                        );
                        let r = if float == Float::BF16 {
                            // Round to nearest even on the low 16 bits, as `f64_to_bf16_bits`.
                            let even = _mm512_and_si512(
                                _mm512_srli_epi32::<16>(odd),
                                _mm512_set1_epi32(1),
                            );
                            let sum = _mm512_add_epi32(
                                odd,
                                _mm512_add_epi32(_mm512_set1_epi32(0x7fff), even),
                            );
                            let r = _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(sum));
                            _mm256_mask_mov_epi16(r, nan, _mm256_set1_epi16(0x7fc0))
                        } else {
                            let r = _mm512_cvtps_ph::<
                                { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
                            >(_mm512_castsi512_ps(odd));
                            _mm256_mask_mov_epi16(r, nan, _mm256_set1_epi16(0x7e00))
                        };
                        let old = _mm256_maskz_loadu_epi16(m, b_in.add(32 * g) as *const i16);
                        let all =
                            _mm256_set1_epi16(if float == Float::BF16 { 0x7f80 } else { 0x7c00 });
                        let nonfinite = |x| _mm256_cmpeq_epi16_mask(_mm256_and_si256(x, all), all);
                        over |= ((hit & nonfinite(r) & !nonfinite(old)) as u64) << (16 * g);
                        let r = _mm256_mask_blend_epi16(hit, old, r);
                        _mm256_mask_storeu_epi16(b_out.add(32 * g) as *mut i16, m, r);
                    }
                }
            }
            overflows += over.count_ones() as u64;
        }
        overflows
    }
}

#[cfg(test)]
mod tests {
    use super::{Kept, TermRun, merge_tile, portable};
    use crate::dtype::Float;

    /// The AVX-512 tile, the portable one and the arithmetic of docs/FORMAT.md section 8 taken
    /// element by element give the same bytes and the same overflow count, on every dtype, for
    /// 1 to 4 terms (coefficients 1 and others, words from empty to full), tiles with and
    /// without a partial last word, and bit patterns drawn at random (NaN, ±inf, ±0 and
    /// subnormals among them) or near the largest finite value, so that sums overflow (on a
    /// CPU without AVX-512 VBMI2, the portable tile alone is checked against the arithmetic).
    #[test]
    fn fused_tile_matches_the_arithmetic() {
        let mut next = crate::xorshift(0x5851_f42d_4c95_7f2du64);
        for float in [Float::BF16, Float::F16, Float::F32, Float::F64] {
            let x = Kept::for_dtype(float);
            if x.is_none() {
                eprintln!(
                    "no AVX-512 VBMI2 path for {float:?} on this CPU: the portable tile is checked alone"
                );
            }
            let size = float.size();
            let top = float.round_bits(f64::MAX) - 1; // the largest finite value's bits
            let mut overflowed = 0;
            for round in 0..300 {
                let n: usize = [64 * 3, 64 * 2 + 17, 5, 64][round % 4];
                // Near the largest finite value (either sign), moderate values, any pattern.
                let mask = if size == 8 {
                    !0
                } else {
                    (1u64 << (8 * size)) - 1
                };
                let bits = |next: &mut dyn FnMut() -> u64| match next() % 4 {
                    0 => (top - next() % 4) | ((next() & 1) << (8 * size - 1)),
                    1 => float.round_bits((next() % 4001) as f64 / 64.0 - 30.0),
                    _ => next() & mask,
                };
                let elem = |b: u64| b.to_le_bytes()[..size].to_vec();
                let base: Vec<u8> = (0..n).flat_map(|_| elem(bits(&mut next))).collect();
                let terms = 1 + round % 4;
                let mut words = vec![vec![0u64; n.div_ceil(64)]; terms];
                let mut values = vec![Vec::new(); terms];
                for (t, words) in words.iter_mut().enumerate() {
                    for (w, word) in words.iter_mut().enumerate() {
                        *word = match (round + t + w) % 6 {
                            0 => 0,
                            1 => !0,
                            2 => next() | next(),
                            _ => next() & next(),
                        };
                        let live = n - 64 * w;
                        if live < 64 {
                            *word &= (1u64 << live) - 1;
                        }
                        for _ in 0..word.count_ones() {
                            values[t].extend(elem(bits(&mut next)));
                        }
                    }
                }
                let coeff = |t: usize| [1.0, -0.5, 3.0, 1.0 / 3.0][(round / 4 + t) % 4];
                let runs: Vec<TermRun> = (0..terms)
                    .map(|t| TermRun {
                        words: &words[t],
                        values: &values[t],
                        coeff: coeff(t),
                    })
                    .collect();
                // The arithmetic, element by element.
                let (mut want, mut want_over) = (base.clone(), 0u64);
                let mut at = vec![0usize; terms];
                for k in 0..n {
                    let b = float.load(&base, k);
                    let (mut acc, mut hit) = (-0.0f64, false);
                    for t in 0..terms {
                        if (words[t][k / 64] >> (k % 64)) & 1 != 0 {
                            acc += coeff(t) * (float.load(&values[t], at[t]) - b);
                            at[t] += 1;
                            hit = true;
                        }
                    }
                    if hit {
                        let r = b + acc;
                        want_over += float.becomes_nonfinite(b, r) as u64;
                        want[k * size..(k + 1) * size].copy_from_slice(&elem(float.round_bits(r)));
                    }
                }
                overflowed += want_over;
                let mut got = vec![0u8; base.len()];
                let over = crate::with_elem!(float, E => portable::merge_tile::<E>(&base, &runs, &mut got));
                assert_eq!(
                    (&got, over),
                    (&want, want_over),
                    "{float:?} portable, round {round}"
                );
                if let Some(x) = &x {
                    let mut got = vec![0u8; base.len()];
                    let over = x.merge_tile(&base, &runs, &mut got);
                    assert_eq!(
                        (&got, over),
                        (&want, want_over),
                        "{float:?} AVX-512, round {round}"
                    );
                }
                // The callers' function, on either path.
                for simd in [x.as_ref(), None] {
                    let mut got = vec![0u8; base.len()];
                    let over = crate::with_elem!(float, E => merge_tile::<E>(simd, &base, &runs, &mut got));
                    assert_eq!((&got, over), (&want, want_over), "{float:?} merge_tile");
                }
            }
            assert!(
                float == Float::F64 || overflowed > 0,
                "{float:?}: no sum overflowed"
            );
        }
    }
}
