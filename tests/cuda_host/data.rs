//! Test data shared by tests/cuda_host.rs and tests/cuda.rs: the known-answer vectors of
//! docs/FORMAT.md section 4, generated tensors with awkward values, and intervals.
#![allow(dead_code)]

use sotu_delta::dtype::Float;
use sotu_delta::mask::Interval;

/// (seed, name, k0, k1, [(i, u)]) from docs/FORMAT.md section 4.
pub type Kat = (u64, &'static str, u32, u32, [(u64, u32); 9]);

/// The known-answer vectors of docs/FORMAT.md section 4, shared with tests/cuda.rs.
pub const KATS: [Kat; 4] = [
    (
        2411,
        "model.embed_tokens.weight",
        0xff9c2fdf,
        0x3b51a234,
        [
            (0, 0xfb1d4194),
            (1, 0xce12928d),
            (2, 0x9d4eceb5),
            (65535, 0x9bb5e267),
            (65536, 0x0b71b362),
            (4294967295, 0x0727aed0),
            (4294967296, 0x0415d2e1),
            (4294967297, 0x4c8a6fa3),
            (21474836487, 0xc099e717),
        ],
    ),
    (
        0,
        "",
        0x45615e48,
        0x61f7b866,
        [
            (0, 0x5f264c52),
            (1, 0xc9bfe882),
            (2, 0x69d536ac),
            (65535, 0x5ae8965b),
            (65536, 0x2f8d3232),
            (4294967295, 0x50733c42),
            (4294967296, 0x4cc22425),
            (4294967297, 0x46840b45),
            (21474836487, 0x89116e5b),
        ],
    ),
    (
        2411,
        "model.layers.0.self_attn.q_proj.weight",
        0x6a38959a,
        0xca8d426c,
        [
            (0, 0x45a05254),
            (1, 0x89ea3579),
            (2, 0x095c9c05),
            (65535, 0x0c635b86),
            (65536, 0x28e0b218),
            (4294967295, 0x11ebd86c),
            (4294967296, 0xc1d16d33),
            (4294967297, 0x0c827de3),
            (21474836487, 0x1ceaf012),
        ],
    ),
    (
        18446744073709551615,
        "lm_head.weight",
        0x09d384d7,
        0x84531f2d,
        [
            (0, 0x73519ee9),
            (1, 0x3a4d08ef),
            (2, 0x866cba3d),
            (65535, 0x11dbdbf5),
            (65536, 0xe886780c),
            (4294967295, 0xc4358b45),
            (4294967296, 0xe22cf654),
            (4294967297, 0xdd8857ac),
            (21474836487, 0xc934649d),
        ],
    ),
];

pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    }
}

pub fn encode(f: Float, values: &[f64]) -> Vec<u8> {
    let mut out = Vec::new();
    f.store_all(values, &mut out);
    out
}

/// A base with the awkward values up front (NaN, ±inf, ±0, subnormals, near the dtype's
/// largest value), weight-like values after, and `tunes` fine-tunes of it, some of which flip
/// the large values' sign so that weighted sums overflow.
pub fn make(f: Float, numel: usize, tunes: usize, seed: u64) -> (Vec<u8>, Vec<Vec<u8>>) {
    let mut rng = Rng(seed);
    let big = match f {
        Float::F16 => 60000.0,
        Float::BF16 | Float::F32 => 3.0e38,
        Float::F64 => 1e308,
    };
    let specials = [
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        -0.0,
        0.0,
        big,
        -big,
        1e-40,
        6e-8,
        1.0,
    ];
    let base: Vec<f64> = (0..numel)
        .map(|i| {
            if i < specials.len() {
                specials[i]
            } else {
                rng.unit() * 0.1
            }
        })
        .collect();
    let base_bytes = encode(f, &base);
    let mut b = Vec::new();
    f.load_all(&base_bytes, &mut b);
    let tuned = (0..tunes)
        .map(|k| {
            let t: Vec<f64> = b
                .iter()
                .enumerate()
                .map(|(i, &x)| match i {
                    0 => 0.5,                               // NaN base, finite tune
                    1 if k == 0 => 1.0,                     // inf base
                    5 | 6 => -x,                            // overflows once weighted
                    3 => -0.0,                              // -0 over -0: same
                    4 if k == 1 => -0.0,                    // -0 over +0
                    _ if rng.next().is_multiple_of(7) => x, // unchanged
                    _ => x + rng.unit() * 0.01 * (k + 1) as f64,
                })
                .collect();
            encode(f, &t)
        })
        .collect();
    (base_bytes, tuned)
}

/// For the merge methods: a finite base (they refuse a non-finite estimate) with awkward values
/// up front (±0, a subnormal, values near the dtype's largest), zeros where the fine-tunes put
/// small multiples of 1/16 (repeated magnitudes, so elements equal to a threshold, and opposite
/// signs, so elected sums of exactly zero), and `tunes` fine-tunes of it.
pub fn make_finite(f: Float, numel: usize, tunes: usize, seed: u64) -> (Vec<u8>, Vec<Vec<u8>>) {
    let mut rng = Rng(seed);
    let big = match f {
        Float::F16 => 30000.0,
        Float::BF16 | Float::F32 => 1.5e38,
        Float::F64 => 1e307,
    };
    let specials = [-0.0, 0.0, big, -big, 1e-40, 6e-8, 1.0];
    let grid = |i: usize| i >= specials.len() && i.is_multiple_of(5);
    let base: Vec<f64> = (0..numel)
        .map(|i| match i {
            _ if i < specials.len() => specials[i],
            _ if grid(i) => 0.0,
            _ => rng.unit() * 0.1,
        })
        .collect();
    let base_bytes = encode(f, &base);
    let mut b = Vec::new();
    f.load_all(&base_bytes, &mut b);
    let tuned = (0..tunes)
        .map(|k| {
            let t: Vec<f64> = b
                .iter()
                .enumerate()
                .map(|(i, &x)| match i {
                    0 if k == 1 => 0.0,  // +0 over -0
                    1 if k == 1 => -0.0, // -0 over +0: an estimate of -0
                    2 | 3 => -x,         // a large estimate: b + α·m overflows
                    // ±j/16: task k's sign alternates, so equal weights elect on a zero sum.
                    _ if grid(i) => {
                        let j = (i / 5 % 4) as f64 / 16.0;
                        if (k + i / 20).is_multiple_of(2) {
                            j
                        } else {
                            -j
                        }
                    }
                    _ if rng.next().is_multiple_of(7) => x, // unchanged
                    _ => x + rng.unit() * 0.01 * (k + 1) as f64,
                })
                .collect();
            encode(f, &t)
        })
        .collect();
    (base_bytes, tuned)
}

/// `Interval::from_density(d)`, which the tests know to be valid.
pub fn iv(d: f64) -> Interval {
    Interval::from_density(d).unwrap()
}
