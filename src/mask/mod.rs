//! The mask function of docs/FORMAT.md section 4 and the keep interval of section 5.
//!
//! A mask is a pure function of (seed, tensor name, element index): nothing about it is stored
//! but the seed and the interval, and every backend regenerates it identically.

mod keep;

use anyhow::{Result, bail};

/// The seed used when `--seed` is not given (docs/FORMAT.md section 5).
pub const DEFAULT_SEED: u64 = 2411;

/// Elements per chunk written by this tool (docs/FORMAT.md section 6).
pub const CHUNK_ELEMS: u64 = 65536;

/// `2^32`: the keep interval lives in `[0, 2^32]`.
pub const SPAN: u64 = 1 << 32;

/// The name of the mask function recorded in `__metadata__["mask"]`.
pub const MASK_NAME: &str = "sotu-mix32-v1";

/// A 32-bit bijection with low bias (C. Wellons' hash-prospector, `[16 21f0aaad 15 735a2d97 15]`).
#[inline(always)]
pub fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x21f0_aaad);
    x ^= x >> 15;
    x = x.wrapping_mul(0x735a_2d97);
    x ^= x >> 15;
    x
}

/// The per-tensor key `(k0, k1)`, derived once per tensor with BLAKE3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaskKey {
    k0: u32,
    k1: u32,
}

impl MaskKey {
    /// `u(i)` for each `i` of `range` (which must not cross a multiple of 2^32) into `out`:
    /// the values that masks of this key share, whatever their intervals.
    pub fn fill_u(&self, range: std::ops::Range<u64>, out: &mut Vec<u32>) {
        debug_assert_eq!(range.start >> 32, (range.end.max(1) - 1) >> 32);
        out.clear();
        out.resize((range.end - range.start) as usize, 0);
        fill_u(
            range.start as u32,
            self.block_const((range.start >> 32) as u32),
            out,
        );
    }

    /// Derives the key of tensor `name` under `seed`.
    pub fn new(seed: u64, name: &str) -> Self {
        let mut h = blake3::Hasher::new();
        h.update(b"sotu-delta/mask/v1\0");
        h.update(&seed.to_le_bytes());
        h.update(name.as_bytes());
        let d = h.finalize();
        let d = d.as_bytes();
        MaskKey {
            k0: u32::from_le_bytes([d[0], d[1], d[2], d[3]]),
            k1: u32::from_le_bytes([d[4], d[5], d[6], d[7]]),
        }
    }

    /// The key words `(k0, k1)`, for backends that compute `u` themselves (the CUDA kernels).
    pub fn words(&self) -> (u32, u32) {
        (self.k0, self.k1)
    }

    /// The XOR constant of the block of 2^32 elements whose index has high word `high`.
    #[inline(always)]
    pub fn block_const(&self, high: u32) -> u32 {
        mix32(self.k1 ^ high) ^ self.k0
    }

    /// The uniform 32-bit value `u(seed, name, i)`.
    #[inline]
    pub fn u(&self, i: u64) -> u32 {
        mix32((i as u32) ^ self.block_const((i >> 32) as u32))
    }
}

/// The keep interval `[lo, hi)` with `0 ≤ lo ≤ hi ≤ 2^32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interval {
    lo: u64,
    hi: u64,
}

impl Interval {
    /// Keep words from the mask values `us` (see [`MaskKey::fill_u`]): bit `k` of word `w` is
    /// whether `us[64·w + k]` lies in the interval.
    pub fn keep_words_of(&self, us: &[u32], words: &mut Vec<u64>) {
        words.clear();
        words.resize(us.len().div_ceil(64), 0);
        keep::pack_keep_words(us, self.lo as u32, self.hi - self.lo, words);
    }

    /// An interval from its bounds; refuses `lo > hi` or `hi > 2^32`.
    pub fn new(lo: u64, hi: u64) -> Result<Self> {
        if lo > hi || hi > SPAN {
            bail!("invalid keep interval [{lo}, {hi}): need 0 <= lo <= hi <= 2^32");
        }
        Ok(Interval { lo, hi })
    }

    /// `[0, round(density · 2^32))`.
    pub fn from_density(density: f64) -> Result<Self> {
        Self::new(0, density_width(density)?)
    }

    /// Slot `k` of `n` (docs/FORMAT.md section 5), optionally narrowed to `density`.
    pub fn from_slot(k: u64, n: u64, density: Option<f64>) -> Result<Self> {
        if n == 0 || k >= n {
            bail!("invalid slot {k}/{n}: need 0 <= K < N");
        }
        let lo = ((k as u128 * SPAN as u128) / n as u128) as u64;
        let end = (((k + 1) as u128 * SPAN as u128) / n as u128) as u64;
        let hi = match density {
            None => end,
            Some(d) => {
                let hi = lo + density_width(d)?;
                if hi > end {
                    bail!(
                        "density {d} does not fit in slot {k}/{n}, whose width is {:.6}",
                        (end - lo) as f64 / SPAN as f64
                    );
                }
                hi
            }
        };
        Self::new(lo, hi)
    }

    /// The lower bound.
    pub fn lo(&self) -> u64 {
        self.lo
    }

    /// The upper bound (exclusive).
    pub fn hi(&self) -> u64 {
        self.hi
    }

    /// The expected kept fraction, `(hi − lo) / 2^32`.
    pub fn density(&self) -> f64 {
        (self.hi - self.lo) as f64 / SPAN as f64
    }

    /// Whether `u` lies in `[lo, hi)`.
    #[inline(always)]
    pub fn contains(&self, u: u32) -> bool {
        // One unsigned compare: values below `lo` wrap past `hi − lo`.
        (u.wrapping_sub(self.lo as u32) as u64) < self.hi - self.lo
    }

    /// The number of 32-bit values two intervals share.
    pub fn overlap(&self, other: &Interval) -> u64 {
        self.hi.min(other.hi).saturating_sub(self.lo.max(other.lo))
    }
}

fn density_width(density: f64) -> Result<u64> {
    if !(0.0..=1.0).contains(&density) {
        bail!("density {density} is outside [0, 1]");
    }
    // f64::round rounds half away from zero, as FORMAT.md specifies.
    Ok((density * SPAN as f64).round() as u64)
}

/// The instruction set the hot loops run with on this machine (the run-time detection of
/// [`crate::simd::isa`]).
pub fn isa() -> &'static str {
    crate::simd::isa::name()
}

/// A tensor's mask: its key and the interval.
#[derive(Clone, Copy, Debug)]
pub struct Mask {
    /// The tensor's key.
    pub key: MaskKey,
    /// The keep interval.
    pub interval: Interval,
}

impl Mask {
    /// The mask of tensor `name` under `seed` and `interval`.
    pub fn new(seed: u64, name: &str, interval: Interval) -> Self {
        Mask {
            key: MaskKey::new(seed, name),
            interval,
        }
    }

    /// Whether element `i` is kept.
    #[inline]
    pub fn kept(&self, i: u64) -> bool {
        self.interval.contains(self.key.u(i))
    }

    /// Calls `f(i)` for each kept index in `range`, in ascending order.
    #[inline]
    pub fn for_each_kept(&self, range: std::ops::Range<u64>, mut f: impl FnMut(u64)) {
        let mut words = Vec::new();
        self.for_each_block(range, |start, len, c| {
            self.keep_words(start, len, c, &mut words);
            for (w, &word) in words.iter().enumerate() {
                let mut bits = word;
                while bits != 0 {
                    f(start + (w as u64) * 64 + bits.trailing_zeros() as u64);
                    bits &= bits - 1;
                }
            }
        });
    }

    /// Calls `f(start, word)` for consecutive 64-index words of `range`: bit `k` of `word` is
    /// whether index `start + k` is kept (bits past the end of `range` are clear).
    #[inline]
    pub fn for_each_word(&self, range: std::ops::Range<u64>, mut f: impl FnMut(u64, u64)) {
        let mut words = Vec::new();
        self.for_each_block(range, |start, len, c| {
            self.keep_words(start, len, c, &mut words);
            for (w, &word) in words.iter().enumerate() {
                f(start + (w as u64) * 64, word);
            }
        });
    }

    /// The keep words of `range` (which must not cross a multiple of 2^32) into `words`: bit `k`
    /// of word `w` is index `range.start + 64·w + k`; bits past the end are clear.
    pub fn words(&self, range: std::ops::Range<u64>, words: &mut Vec<u64>) {
        debug_assert_eq!(range.start >> 32, (range.end.max(1) - 1) >> 32);
        let c = self.key.block_const((range.start >> 32) as u32);
        self.keep_words(range.start, (range.end - range.start) as usize, c, words);
    }

    /// The number of kept indices in `range`.
    pub fn count_kept(&self, range: std::ops::Range<u64>) -> u64 {
        let mut n = 0u64;
        let mut words = Vec::new();
        self.for_each_block(range, |start, len, c| {
            self.keep_words(start, len, c, &mut words);
            n += words.iter().map(|w| w.count_ones() as u64).sum::<u64>();
        });
        n
    }

    /// The keep bits of `len` indices from `start` (within one 2^32 block, constant `c`): bit
    /// `k` of word `w` is index `start + 64·w + k`; bits past `len` are zero.
    fn keep_words(&self, start: u64, len: usize, c: u32, words: &mut Vec<u64>) {
        words.clear();
        words.resize(len.div_ceil(64), 0);
        let width = self.interval.hi - self.interval.lo;
        keep::fill_keep_words(start as u32, c, self.interval.lo as u32, width, words);
        if !len.is_multiple_of(64) {
            *words.last_mut().unwrap() &= (1u64 << (len % 64)) - 1;
        }
    }

    /// Splits `range` at multiples of 2^32 so each piece has one block constant.
    #[inline]
    fn for_each_block(&self, range: std::ops::Range<u64>, mut f: impl FnMut(u64, usize, u32)) {
        let mut start = range.start;
        while start < range.end {
            let block_end = ((start >> 32) + 1) << 32;
            let end = range.end.min(block_end);
            f(
                start,
                (end - start) as usize,
                self.key.block_const((start >> 32) as u32),
            );
            start = end;
        }
    }
}

crate::simd::multiversioned! {
    /// `u` of consecutive 32-bit counters from `first` under block constant `c`.
    fn fill_u(first: u32, c: u32, out: &mut [u32]) {
        for (k, u) in out.iter_mut().enumerate() {
            *u = mix32(first.wrapping_add(k as u32) ^ c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Known-answer vectors from docs/FORMAT.md section 4, confirmed by tests/reference.
    #[test]
    fn mix32_known_answers() {
        assert_eq!(mix32(0), 0);
        assert_eq!(mix32(1), 0x86d2fa73);
        assert_eq!(mix32(2), 0x0da7f4e7);
        assert_eq!(mix32(0xffff_ffff), 0x99b5e683);
        assert_eq!(mix32(0x1234_5678), 0x16e776bd);
    }

    #[test]
    fn u_known_answers() {
        let idx = [
            0u64,
            1,
            2,
            65535,
            65536,
            4294967295,
            4294967296,
            4294967297,
            21474836487,
        ];
        /// (seed, name, (k0, k1), u at each index of `idx`)
        type Case<'a> = (u64, &'a str, (u32, u32), [u32; 9]);
        let cases: [Case; 4] = [
            (
                2411,
                "model.embed_tokens.weight",
                (0xff9c2fdf, 0x3b51a234),
                [
                    0xfb1d4194, 0xce12928d, 0x9d4eceb5, 0x9bb5e267, 0x0b71b362, 0x0727aed0,
                    0x0415d2e1, 0x4c8a6fa3, 0xc099e717,
                ],
            ),
            (
                0,
                "",
                (0x45615e48, 0x61f7b866),
                [
                    0x5f264c52, 0xc9bfe882, 0x69d536ac, 0x5ae8965b, 0x2f8d3232, 0x50733c42,
                    0x4cc22425, 0x46840b45, 0x89116e5b,
                ],
            ),
            (
                2411,
                "model.layers.0.self_attn.q_proj.weight",
                (0x6a38959a, 0xca8d426c),
                [
                    0x45a05254, 0x89ea3579, 0x095c9c05, 0x0c635b86, 0x28e0b218, 0x11ebd86c,
                    0xc1d16d33, 0x0c827de3, 0x1ceaf012,
                ],
            ),
            (
                u64::MAX,
                "lm_head.weight",
                (0x09d384d7, 0x84531f2d),
                [
                    0x73519ee9, 0x3a4d08ef, 0x866cba3d, 0x11dbdbf5, 0xe886780c, 0xc4358b45,
                    0xe22cf654, 0xdd8857ac, 0xc934649d,
                ],
            ),
        ];
        for (seed, name, words, us) in cases {
            let key = MaskKey::new(seed, name);
            assert_eq!(key.words(), words, "key of {name:?}");
            for (i, u) in idx.iter().zip(us) {
                assert_eq!(key.u(*i), u, "u({i}) of {name:?}");
            }
        }
    }

    #[test]
    fn slots_tile_the_span() {
        for n in 1..=20u64 {
            let mut next = 0;
            for k in 0..n {
                let iv = Interval::from_slot(k, n, None).unwrap();
                assert_eq!(iv.lo(), next);
                next = iv.hi();
            }
            assert_eq!(next, SPAN);
        }
    }

    #[test]
    fn contains_matches_definition() {
        for (lo, hi) in [
            (0, 0),
            (0, SPAN),
            (5, 9),
            (SPAN - 3, SPAN),
            (SPAN, SPAN),
            (0, 1),
        ] {
            let iv = Interval::new(lo, hi).unwrap();
            for u in [0u32, 1, 4, 5, 8, 9, u32::MAX - 3, u32::MAX - 2, u32::MAX] {
                assert_eq!(
                    iv.contains(u),
                    lo <= u as u64 && (u as u64) < hi,
                    "{lo} {hi} {u}"
                );
            }
        }
    }

    #[test]
    fn count_matches_for_each_across_block_boundary() {
        let m = Mask::new(9, "t", Interval::from_density(0.3).unwrap());
        let r = (SPAN - 1000)..(SPAN + 1000);
        let mut n = 0;
        m.for_each_kept(r.clone(), |i| {
            assert!(m.kept(i));
            n += 1
        });
        assert_eq!(n, m.count_kept(r));
    }

    #[test]
    fn shared_u_gives_the_same_words_as_each_mask() {
        let key = MaskKey::new(5, "w");
        for range in [0..1000u64, (SPAN - 100)..SPAN, SPAN..(SPAN + 65536), 7..8] {
            let mut us = Vec::new();
            key.fill_u(range.clone(), &mut us);
            for iv in [
                Interval::from_slot(0, 3, None).unwrap(),
                Interval::from_slot(2, 3, None).unwrap(),
                Interval::from_density(1.0).unwrap(),
                Interval::from_density(0.0).unwrap(),
                Interval::new(17, 123_456_789).unwrap(),
            ] {
                let m = Mask { key, interval: iv };
                let (mut a, mut b) = (Vec::new(), Vec::new());
                m.words(range.clone(), &mut a);
                iv.keep_words_of(&us, &mut b);
                assert_eq!(a, b, "{range:?} {iv:?}");
            }
        }
    }

    #[test]
    fn bad_intervals_are_refused() {
        assert!(Interval::from_density(1.5).is_err());
        assert!(Interval::from_density(-0.1).is_err());
        assert!(Interval::from_density(f64::NAN).is_err());
        assert!(Interval::new(5, 4).is_err());
        assert!(Interval::from_slot(3, 3, None).is_err());
        assert!(Interval::from_slot(0, 3, Some(0.5)).is_err());
    }
}
