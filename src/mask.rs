//! The mask function of docs/FORMAT.md section 4 and the keep interval of section 5.
//!
//! A mask is a pure function of (seed, tensor name, element index): nothing about it is stored
//! but the seed and the interval, and every backend regenerates it identically.

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
        let width = self.hi - self.lo;
        if width < SPAN && avx512::available() {
            let whole = us.len() / 64;
            // SAFETY: the CPU has AVX-512 F (checked at run time).
            unsafe {
                avx512::pack_keep_words(
                    &us[..whole * 64],
                    self.lo as u32,
                    width as u32,
                    &mut words[..whole],
                )
            };
            pack_keep_words(
                &us[whole * 64..],
                self.lo as u32,
                width,
                &mut words[whole..],
            );
        } else {
            pack_keep_words(us, self.lo as u32, width, words);
        }
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

/// The instruction set the hot loops run with on this machine (run-time detection).
pub fn isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
        {
            return "x86_64+avx512";
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return "x86_64+avx2";
        }
        "x86_64 baseline"
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::env::consts::ARCH
    }
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
        if width < SPAN && avx512::available() {
            // SAFETY: the CPU has AVX-512 F (checked at run time).
            unsafe {
                avx512::fill_keep_words(
                    start as u32,
                    c,
                    self.interval.lo as u32,
                    width as u32,
                    words,
                )
            };
        } else {
            fill_keep_words(start as u32, c, self.interval.lo as u32, width, words);
        }
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

/// Keep bits of consecutive 32-bit counters from `first`, 64 per word. One portable loop,
/// compiled for AVX-512, AVX2 and the baseline and chosen at run time: it hashes 8 or 16 lanes
/// at a time.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx512dq",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn fill_keep_words(first: u32, c: u32, lo: u32, width: u64, words: &mut [u64]) {
    if width >= SPAN {
        words.fill(!0);
        return;
    }
    let width = width as u32;
    for (w, word) in words.iter_mut().enumerate() {
        let base = first.wrapping_add((w as u32) << 6);
        let mut flags = [0u8; 64];
        for (k, flag) in flags.iter_mut().enumerate() {
            let u = mix32(base.wrapping_add(k as u32) ^ c);
            *flag = (u.wrapping_sub(lo) < width) as u8;
        }
        *word = pack_flags(&flags);
    }
}

/// The keep bits with AVX-512 F: `mix32` on 16 lanes, and the interval test as a compare into a
/// mask register, which is the keep bits themselves. The portable loops above leave the
/// packing of flags into bits to a multiply that AMD Zen 4 runs slowly (70% of their time).
mod avx512 {
    /// Whether this CPU can run these (`SOTU_DELTA_SCALAR=1` says no, for comparisons).
    pub fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
            *AVAILABLE.get_or_init(|| {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::env::var_os("SOTU_DELTA_SCALAR").is_none()
            })
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    #[cfg(target_arch = "x86_64")]
    pub use x86::*;

    /// Stand-ins where there is no AVX-512: never called, as [`available`] is false there.
    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn fill_keep_words(_: u32, _: u32, _: u32, _: u32, _: &mut [u64]) {
        unreachable!()
    }
    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn pack_keep_words(_: &[u32], _: u32, _: u32, _: &mut [u64]) {
        unreachable!()
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use std::arch::x86_64::*;

        /// `mix32` (docs/FORMAT.md section 4) on 16 lanes.
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn mix32(mut x: __m512i) -> __m512i {
            x = _mm512_xor_si512(x, _mm512_srli_epi32::<16>(x));
            x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x21f0aaad));
            x = _mm512_xor_si512(x, _mm512_srli_epi32::<15>(x));
            x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x735a2d97));
            _mm512_xor_si512(x, _mm512_srli_epi32::<15>(x))
        }

        /// Bits `k` of a 16-lane group: `u − lo < width`, as unsigned 32-bit integers.
        #[inline]
        #[target_feature(enable = "avx512f")]
        fn kept(u: __m512i, lo: u32, width: u32) -> u64 {
            let d = _mm512_sub_epi32(u, _mm512_set1_epi32(lo as i32));
            _mm512_cmplt_epu32_mask(d, _mm512_set1_epi32(width as i32)) as u64
        }

        /// As the portable `fill_keep_words`, for `width < 2^32`; every word is filled whole.
        #[target_feature(enable = "avx512f")]
        pub unsafe fn fill_keep_words(first: u32, c: u32, lo: u32, width: u32, words: &mut [u64]) {
            let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
            let c = _mm512_set1_epi32(c as i32);
            for (w, word) in words.iter_mut().enumerate() {
                let base = first.wrapping_add((w as u32) << 6);
                let mut bits = 0u64;
                for q in 0..4 {
                    let i = _mm512_add_epi32(
                        _mm512_set1_epi32(base.wrapping_add(16 * q) as i32),
                        lanes,
                    );
                    bits |= kept(mix32(_mm512_xor_si512(i, c)), lo, width) << (16 * q);
                }
                *word = bits;
            }
        }

        /// As the portable `pack_keep_words`, for `width < 2^32` and whole words: `us` holds
        /// 64 values per word of `words`.
        #[target_feature(enable = "avx512f")]
        pub unsafe fn pack_keep_words(us: &[u32], lo: u32, width: u32, words: &mut [u64]) {
            assert_eq!(us.len(), 64 * words.len());
            for (word, us) in words.iter_mut().zip(us.chunks_exact(64)) {
                let mut bits = 0u64;
                for q in 0..4 {
                    // SAFETY: `us` holds 64 values, 16 read at a time.
                    let u =
                        unsafe { _mm512_loadu_si512(us.as_ptr().add(16 * q) as *const __m512i) };
                    bits |= kept(u, lo, width) << (16 * q);
                }
                *word = bits;
            }
        }
    }
}

/// 64 flags of 0 or 1 as the bits of a word (flag `k` is bit `k`): eight bytes at a time, the
/// multiply gathers byte `i`'s low bit into bit `56 + i` without carries.
#[inline(always)]
fn pack_flags(flags: &[u8; 64]) -> u64 {
    let mut word = 0u64;
    for (g, bytes) in flags.chunks_exact(8).enumerate() {
        let x = u64::from_le_bytes(bytes.try_into().unwrap());
        word |= (x.wrapping_mul(0x0102_0408_1020_4080) >> 56) << (8 * g);
    }
    word
}

/// `u` of consecutive 32-bit counters from `first` under block constant `c`.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx512dq",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn fill_u(first: u32, c: u32, out: &mut [u32]) {
    for (k, u) in out.iter_mut().enumerate() {
        *u = mix32(first.wrapping_add(k as u32) ^ c);
    }
}

/// Keep bits of `us` against `[lo, lo + width)`, 64 per word.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx512dq",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn pack_keep_words(us: &[u32], lo: u32, width: u64, words: &mut [u64]) {
    if width >= SPAN {
        words.fill(!0);
        let tail = us.len() % 64;
        if tail != 0 {
            *words.last_mut().unwrap() = (1u64 << tail) - 1;
        }
        return;
    }
    let width = width as u32;
    let flag = |u: u32| (u.wrapping_sub(lo) < width) as u8;
    // Whole words with a fixed trip count (which vectorizes), then the tail.
    let full = us.chunks_exact(64);
    let tail = full.remainder();
    for (word, us) in words.iter_mut().zip(full) {
        let us: &[u32; 64] = us.try_into().unwrap();
        *word = pack_flags(&us.map(flag));
    }
    if !tail.is_empty() {
        let mut flags = [0u8; 64];
        for (f, &u) in flags.iter_mut().zip(tail) {
            *f = flag(u);
        }
        *words.last_mut().unwrap() = pack_flags(&flags);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX-512 keep bits equal the portable loops' on random keys, offsets and intervals,
    /// including empty, one-wide and nearly full ones and intervals that end at 2^32.
    #[test]
    fn avx512_keep_words_match_the_portable_loops() {
        if !avx512::available() {
            eprintln!("skipped: this CPU has no AVX-512 F (the portable loops run)");
            return;
        }
        let mut next = crate::xorshift(0x9e37_79b9_7f4a_7c15u64);
        for round in 0..400 {
            let (first, c) = (next() as u32, next() as u32);
            let lo = [0, 1, u32::MAX, next() as u32][round % 4];
            let width = match round % 5 {
                0 => 0,
                1 => 1,
                2 => SPAN - 1 - lo as u64,
                3 => (SPAN - lo as u64).min(next() % SPAN),
                _ => (SPAN - 1 - lo as u64) / 3,
            } as u32;
            let (mut want, mut got) = (vec![0u64; 17], vec![0u64; 17]);
            fill_keep_words(first, c, lo, width as u64, &mut want);
            unsafe { avx512::fill_keep_words(first, c, lo, width, &mut got) };
            assert_eq!(got, want, "fill: first {first} c {c} lo {lo} width {width}");
            let us: Vec<u32> = (0..17 * 64).map(|_| next() as u32).collect();
            pack_keep_words(&us, lo, width as u64, &mut want);
            unsafe { avx512::pack_keep_words(&us, lo, width, &mut got) };
            assert_eq!(got, want, "pack: lo {lo} width {width}");
        }
    }

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
