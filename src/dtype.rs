//! Element types: exact conversion of stored elements to f64, and the single rounding from f64
//! back to an output dtype (docs/FORMAT.md section 8).

use anyhow::{Result, bail};
use safetensors::Dtype;

/// The float dtypes that can be masked and that the merge arithmetic reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Float {
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
    /// IEEE binary32.
    F32,
    /// IEEE binary64.
    F64,
}

impl Float {
    /// The float kind of `dtype`, or `None` for integer, bool and 8-bit float dtypes.
    pub fn of(dtype: Dtype) -> Option<Float> {
        match dtype {
            Dtype::F16 => Some(Float::F16),
            Dtype::BF16 => Some(Float::BF16),
            Dtype::F32 => Some(Float::F32),
            Dtype::F64 => Some(Float::F64),
            _ => None,
        }
    }

    /// Parses a `--dtype` argument.
    pub fn parse(s: &str) -> Result<Float> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f16" | "float16" | "fp16" => Float::F16,
            "bf16" | "bfloat16" => Float::BF16,
            "f32" | "float32" | "fp32" => Float::F32,
            "f64" | "float64" => Float::F64,
            _ => bail!("unknown dtype {s:?}: expected f16, bf16, f32 or f64"),
        })
    }

    /// The name `--dtype` takes: `f16`, `bf16`, `f32` or `f64`.
    pub fn name(self) -> &'static str {
        match self {
            Float::F16 => "f16",
            Float::BF16 => "bf16",
            Float::F32 => "f32",
            Float::F64 => "f64",
        }
    }

    /// The safetensors dtype.
    pub fn dtype(self) -> Dtype {
        match self {
            Float::F16 => Dtype::F16,
            Float::BF16 => Dtype::BF16,
            Float::F32 => Dtype::F32,
            Float::F64 => Dtype::F64,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Float::F16 | Float::BF16 => 2,
            Float::F32 => 4,
            Float::F64 => 8,
        }
    }

    /// Element `i` of little-endian `bytes`, converted to f64 exactly.
    #[inline(always)]
    pub fn load(self, bytes: &[u8], i: usize) -> f64 {
        match self {
            Float::F16 => {
                half::f16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f64()
            }
            Float::BF16 => bf16_bits_to_f64(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])),
            Float::F32 => f32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap()) as f64,
            Float::F64 => f64::from_le_bytes(bytes[8 * i..8 * i + 8].try_into().unwrap()),
        }
    }

    /// The index of the first element of `bytes` that is NaN or infinite, read from its bits
    /// (all exponent bits set) without a conversion.
    pub fn first_nonfinite(self, bytes: &[u8]) -> Option<usize> {
        let (size, exp): (usize, u64) = match self {
            Float::F16 => (2, 0x7c00),
            Float::BF16 => (2, 0x7f80),
            Float::F32 => (4, 0x7f80_0000),
            Float::F64 => (8, 0x7ff0_0000_0000_0000),
        };
        bytes.chunks_exact(size).position(|e| {
            let mut b = [0u8; 8];
            b[..size].copy_from_slice(e);
            u64::from_le_bytes(b) & exp == exp
        })
    }

    /// Converts all of `bytes` (a whole number of elements) to f64 into `out`.
    pub fn load_all(self, bytes: &[u8], out: &mut Vec<f64>) {
        out.clear();
        match self {
            Float::F16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f64()),
            ),
            Float::BF16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| bf16_bits_to_f64(u16::from_le_bytes([c[0], c[1]]))),
            ),
            Float::F32 => out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64),
            ),
            Float::F64 => out.extend(
                bytes
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap())),
            ),
        }
    }

    /// Rounds each value once to this dtype and appends the little-endian bytes to `out`.
    pub fn store_all(self, values: &[f64], out: &mut Vec<u8>) {
        out.clear();
        out.reserve(values.len() * self.size());
        let n = self.size();
        for &x in values {
            out.extend_from_slice(&self.round_bits(x).to_le_bytes()[..n]);
        }
    }

    /// The bits of `x` rounded once to this dtype (canonical NaN), in the low bits of a u64.
    #[inline(always)]
    pub fn round_bits(self, x: f64) -> u64 {
        match self {
            Float::F16 => f64_to_f16_bits(x) as u64,
            Float::BF16 => f64_to_bf16_bits(x) as u64,
            Float::F32 => f64_to_f32_bits(x) as u64,
            Float::F64 => f64_bits(x),
        }
    }

    /// The smallest magnitude that rounds to ±infinity in this dtype: the largest finite value
    /// plus half an ulp (ties go to even, which is infinity); infinity itself for f64.
    #[inline(always)]
    pub(crate) fn overflow_limit(self) -> f64 {
        match self {
            Float::F16 => 65520.0,
            Float::BF16 => (2.0 - 2f64.powi(-8)) * 2f64.powi(127),
            Float::F32 => (2.0 - 2f64.powi(-24)) * 2f64.powi(127),
            Float::F64 => f64::INFINITY,
        }
    }

    /// Whether a finite `x` becomes ±infinity when rounded to this dtype.
    #[inline(always)]
    pub fn overflows(self, x: f64) -> bool {
        x.is_finite() && x.abs() >= self.overflow_limit()
    }

    /// Whether the merge result `x` of an element whose base value is `b` is counted as
    /// overflowed: `b` is finite and `x` is not once rounded to this dtype. That is ±infinity
    /// from an overflow of this dtype or of the f64 arithmetic itself (a huge weight), NaN from
    /// infinities of opposite signs, and a non-finite value stored in a delta (`extract
    /// --allow-nonfinite`), which the result alone cannot tell from the others. Two
    /// comparisons, branch-free, so that it folds into the loops that round (kernels/merge.cu
    /// `sotu_becomes_nonfinite` counts the same).
    #[inline(always)]
    // `!(|x| < limit)`: one comparison, true for NaN as for anything at or past the limit.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    pub fn becomes_nonfinite(self, b: f64, x: f64) -> bool {
        (b.abs() < f64::INFINITY) & !(x.abs() < self.overflow_limit())
    }

    /// The raw bits of element `i` of little-endian `bytes`.
    #[inline(always)]
    pub fn bits(self, bytes: &[u8], i: usize) -> u64 {
        let n = self.size();
        let mut b = [0u8; 8];
        b[..n].copy_from_slice(&bytes[i * n..i * n + n]);
        u64::from_le_bytes(b)
    }

    /// Whether the merge arithmetic reproduces `v` from base `b` with one delta of weight 1:
    /// `round(b + (v − b)) == v` bit for bit (docs/FORMAT.md section 8). A NaN `v` counts as
    /// reproduced when the result is a NaN: payloads are not preserved.
    #[inline(always)]
    pub fn reproduces(self, b: f64, v: f64, v_bits: u64) -> bool {
        let r = b + (v - b);
        if v.is_nan() {
            r.is_nan()
        } else {
            self.round_bits(r) == v_bits
        }
    }
}

/// Element types as types, so that hot loops are compiled once per dtype with fixed-size loads
/// and stores instead of matching on [`Float`] per element. [`with_elem!`](crate::with_elem)
/// picks the instance for a run-time [`Float`].
pub mod elem {
    /// A float element type of a checkpoint.
    pub trait Elem: Send + Sync + 'static {
        /// Bytes per element.
        const SIZE: usize;
        /// The run-time name of this type.
        const FLOAT: super::Float;
        /// The raw bits of one element.
        type Bits: Copy + PartialEq;
        /// Element `i` of little-endian `bytes`, exactly, as f64.
        fn load(bytes: &[u8], i: usize) -> f64;
        /// Rounds `x` once to this type and writes it as element `i` of `bytes`.
        fn store(bytes: &mut [u8], i: usize, x: f64);
        /// The raw bits of one little-endian element.
        fn bits(bytes: &[u8]) -> Self::Bits;
        /// The value of raw bits, exactly, as f64.
        fn value(bits: Self::Bits) -> f64;
        /// `x` rounded once to this type (canonical NaN), without branches, so that loops
        /// over it vectorize.
        fn round(x: f64) -> Self::Bits;
        /// Writes raw bits as one little-endian element.
        fn put(bytes: &mut [u8], bits: Self::Bits);
        /// The result of one term with coefficient 1 over base `b`, when it is simply the kept
        /// value `v`: `round(b + (−0 + 1·(v − b)))` (docs/FORMAT.md section 8) equals `v` (`+0`
        /// for a zero `v`) whenever both are finite and `v − b` is exact in f64, which holds
        /// when their exponents are at most `51 − mantissa bits` apart or either is zero.
        /// Returns the result's bits then, and `None` when the f64 arithmetic must decide.
        /// Branch-free, so that loops over it vectorize.
        fn replaces(b: Self::Bits, v: Self::Bits) -> Option<Self::Bits>;
    }

    macro_rules! elem {
        ($name:ident, $size:expr, $bits:ty, $exp:expr, $man:expr, $to_f64:expr, $round:expr) => {
            #[doc = concat!("The ", stringify!($name), " element type.")]
            pub struct $name;
            impl Elem for $name {
                const SIZE: usize = $size;
                const FLOAT: super::Float = super::Float::$name;
                type Bits = $bits;
                #[inline(always)]
                fn load(bytes: &[u8], i: usize) -> f64 {
                    Self::value(Self::bits(&bytes[i * $size..i * $size + $size]))
                }
                #[inline(always)]
                fn store(bytes: &mut [u8], i: usize, x: f64) {
                    Self::put(&mut bytes[i * $size..i * $size + $size], Self::round(x));
                }
                #[inline(always)]
                fn bits(bytes: &[u8]) -> $bits {
                    <$bits>::from_le_bytes(bytes[..$size].try_into().unwrap())
                }
                #[inline(always)]
                fn value(bits: $bits) -> f64 {
                    $to_f64(bits)
                }
                #[inline(always)]
                fn round(x: f64) -> $bits {
                    $round(x)
                }
                #[inline(always)]
                fn put(bytes: &mut [u8], bits: $bits) {
                    bytes[..$size].copy_from_slice(&bits.to_le_bytes());
                }
                #[inline(always)]
                fn replaces(b: $bits, v: $bits) -> Option<$bits> {
                    // |v − b| < 2^(emax+2) in units of 2^(emin − mantissa): exact in 53 bits
                    // when emax − emin ≤ 51 − mantissa. Subnormals share exponent 1's unit.
                    const ALL: $bits = (1 << $exp) - 1;
                    let eb = ((b >> $man) & ALL).max(1);
                    let ev = ((v >> $man) & ALL).max(1);
                    let finite = (eb != ALL) & (ev != ALL);
                    let zero_b = (b << 1) == 0;
                    let zero_v = (v << 1) == 0;
                    let near = eb.abs_diff(ev) + $man <= 51;
                    let ok = finite & (near | zero_b | zero_v);
                    ok.then_some(if zero_v { 0 } else { v })
                }
            }
        };
    }
    elem!(
        F16,
        2,
        u16,
        5,
        10,
        |b| half::f16::from_bits(b).to_f64(),
        super::f64_to_f16_bits
    );
    elem!(
        BF16,
        2,
        u16,
        8,
        7,
        super::bf16_bits_to_f64,
        super::f64_to_bf16_bits
    );
    elem!(
        F32,
        4,
        u32,
        8,
        23,
        |b| f32::from_bits(b) as f64,
        super::f64_to_f32_bits
    );
    elem!(F64, 8, u64, 11, 52, f64::from_bits, super::f64_bits);
}

/// Runs `$body` with `$E` bound to the [`elem`] type of the [`Float`] `$f`.
#[macro_export]
macro_rules! with_elem {
    ($f:expr, $E:ident => $body:expr) => {
        match $f {
            $crate::dtype::Float::F16 => {
                type $E = $crate::dtype::elem::F16;
                $body
            }
            $crate::dtype::Float::BF16 => {
                type $E = $crate::dtype::elem::BF16;
                $body
            }
            $crate::dtype::Float::F32 => {
                type $E = $crate::dtype::elem::F32;
                $body
            }
            $crate::dtype::Float::F64 => {
                type $E = $crate::dtype::elem::F64;
                $body
            }
        }
    };
}

#[inline(always)]
fn bf16_bits_to_f64(b: u16) -> f64 {
    f32::from_bits((b as u32) << 16) as f64
}

// The conversions below are written as selects, not branches, so that loops over them
// vectorize; a NaN input goes through the arithmetic harmlessly and is replaced at the end.

#[inline(always)]
fn f64_bits(x: f64) -> u64 {
    if x.is_nan() {
        0x7ff8_0000_0000_0000
    } else {
        x.to_bits()
    }
}

#[inline(always)]
fn f64_to_f32_bits(x: f64) -> u32 {
    // `as` rounds f64 to f32 to nearest even, once.
    let r = (x as f32).to_bits();
    if x.is_nan() { 0x7fc0_0000 } else { r }
}

/// Rounds to f32 "to odd": truncate toward zero, and set the last bit when anything was lost.
/// A value rounded to odd with 2+ extra bits of precision rounds to nearest-even correctly in a
/// second step, so f64 → f32 (odd) → bf16/f16 (even) is one correct rounding, not a double one.
#[inline(always)]
fn f64_to_f32_round_odd(x: f64) -> f32 {
    let r = x as f32;
    let back = r as f64;
    // One step toward zero in magnitude (sign-magnitude encoding) where rounding went away
    // from zero (an overflow to infinity included), then the sticky bit where anything was lost.
    let bits = r.to_bits() - (back.abs() > x.abs()) as u32;
    f32::from_bits(bits | (back != x) as u32)
}

#[inline(always)]
fn f64_to_bf16_bits(x: f64) -> u16 {
    let b = f64_to_f32_round_odd(x).to_bits();
    // Round to nearest even on the low 16 bits; a carry into the exponent is the right answer,
    // including the overflow to infinity.
    let r = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    if x.is_nan() { 0x7fc0 } else { r }
}

#[inline(always)]
fn f64_to_f16_bits(x: f64) -> u16 {
    if x.is_nan() {
        return 0x7e00;
    }
    // half's f32 → f16 conversion rounds to nearest even with sticky bits (and uses F16C where
    // the target has it); its f64 → f16 path is not relied on.
    half::f16::from_f32(f64_to_f32_round_odd(x)).to_bits()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_nonfinite_finds_infinities_and_nans_of_every_float() {
        for (float, finite, inf, nan) in [
            (Float::F16, 0x3c00u64, 0x7c00u64, 0xfe01u64),
            (Float::BF16, 0x3f80, 0xff80, 0x7fc1),
            (Float::F32, 0x3f80_0000, 0x7f80_0000, 0xffc0_0001),
            (
                Float::F64,
                0x3ff0_0000_0000_0000,
                0xfff0_0000_0000_0000,
                0x7ff8_0000_0000_0001,
            ),
        ] {
            let size = float.size();
            let bytes = |xs: &[u64]| -> Vec<u8> {
                xs.iter()
                    .flat_map(|x| x.to_le_bytes()[..size].to_vec())
                    .collect()
            };
            assert_eq!(float.first_nonfinite(&bytes(&[finite, 0, finite])), None);
            assert_eq!(float.first_nonfinite(&bytes(&[finite, inf, nan])), Some(1));
            assert_eq!(float.first_nonfinite(&bytes(&[0, finite, nan])), Some(2));
        }
    }

    /// `Elem::replaces`, where it decides, gives the bits of the f64 arithmetic of
    /// docs/FORMAT.md section 8 for one term of coefficient 1; and it decides every finite
    /// pair within its exponent bound. 16-bit types: every base against 1024 values and every
    /// value against 1024 bases (random, plus ±0, ±inf, NaN, subnormals); F32: pairs whose
    /// exponents are 0 to 40 apart, around the bound of 28.
    #[test]
    fn replaces_agrees_with_the_arithmetic() {
        use elem::Elem;
        fn check<E: Elem>(b: E::Bits, v: E::Bits, near: bool) -> bool {
            let (x, y) = (E::value(b), E::value(v));
            let want = E::round(x + (-0.0 + 1.0 * (y - x)));
            match E::replaces(b, v) {
                Some(r) => {
                    assert!(r == want, "{:?}: b {x:e} v {y:e}", E::FLOAT);
                    true
                }
                None => {
                    assert!(
                        !(near && x.is_finite() && y.is_finite()),
                        "{:?}: b {x:e} v {y:e} undecided",
                        E::FLOAT
                    );
                    false
                }
            }
        }
        let mut next = crate::xorshift(0x2545_f491_4f6c_dd1du64);
        let specials: [u16; 8] = [0, 0x8000, 1, 0x8001, 0x7f80, 0xff80, 0x7fc1, 0x0080];
        let specials_f16: [u16; 8] = [0, 0x8000, 1, 0x8001, 0x7c00, 0xfc00, 0x7e01, 0x0400];
        let exponent = |x: u16, man: u32, all: u16| ((x >> man) & all).max(1);
        for a in 0..=u16::MAX {
            for k in 0..1024 {
                let (bf, f16) = if k < 8 {
                    (specials[k], specials_f16[k])
                } else {
                    let r = next() as u16;
                    (r, r)
                };
                for (b, v) in [(a, bf), (bf, a)] {
                    let near = exponent(b, 7, 0xff).abs_diff(exponent(v, 7, 0xff)) <= 44;
                    check::<elem::BF16>(b, v, near);
                }
                for (b, v) in [(a, f16), (f16, a)] {
                    check::<elem::F16>(b, v, true);
                }
            }
        }
        let mut decided = 0;
        for _ in 0..4_000_000 {
            let r = next();
            let eb = 1 + (r % 200) as u32;
            let gap = ((r >> 8) % 41) as u32;
            let ev = if r >> 20 & 1 == 0 {
                eb + gap
            } else {
                eb.saturating_sub(gap).max(1)
            };
            let sign = |s: u64| ((s & 1) as u32) << 31;
            let b = sign(r >> 21) | eb << 23 | (next() as u32 & 0x7f_ffff);
            let v = sign(r >> 22) | ev.min(254) << 23 | (next() as u32 & 0x7f_ffff);
            let near = ((b >> 23) & 0xff).abs_diff((v >> 23) & 0xff) <= 28;
            decided += check::<elem::F32>(b, v, near) as u32;
        }
        assert!(decided > 2_000_000, "only {decided} decided");
    }

    fn bf16(x: f64) -> u16 {
        f64_to_bf16_bits(x)
    }

    #[test]
    fn bf16_rounding_is_single() {
        // 1 + 2^-8 is the midpoint between 1 and 1 + 2^-7: ties to even gives 1.
        assert_eq!(bf16(1.0 + 2f64.powi(-8)), 0x3f80);
        // Just above the midpoint, by less than f32 can hold: a double rounding through f32
        // would land on the midpoint and then go to even (down); the single rounding goes up.
        assert_eq!(bf16(1.0 + 2f64.powi(-8) + 2f64.powi(-40)), 0x3f81);
        assert_eq!(bf16(-(1.0 + 2f64.powi(-8) + 2f64.powi(-40))), 0xbf81);
        assert_eq!(bf16(f64::INFINITY), 0x7f80);
        assert_eq!(bf16(1e300), 0x7f80);
        assert_eq!(bf16(-1e300), 0xff80);
        assert_eq!(bf16(1e-300), 0x0000);
        assert_eq!(bf16(-0.0), 0x8000);
        assert_eq!(bf16(f64::NAN), 0x7fc0);
        // Largest finite bf16 is 0x7f7f; halfway to the next binade goes to infinity (even).
        let max = f32::from_bits(0x7f7f_0000) as f64;
        let half_ulp = 2f64.powi(127 - 8);
        assert_eq!(bf16(max + half_ulp * 0.999), 0x7f7f);
        assert_eq!(bf16(max + half_ulp), 0x7f80);
        // Smallest subnormal bf16 is 2^-133; half of it ties to even (zero), above goes up.
        assert_eq!(bf16(2f64.powi(-134)), 0x0000);
        assert_eq!(bf16(2f64.powi(-134) * 1.0001), 0x0001);
    }

    #[test]
    fn f16_rounding_is_single() {
        let f16 = f64_to_f16_bits;
        assert_eq!(f16(1.0 + 2f64.powi(-11)), 0x3c00);
        assert_eq!(f16(1.0 + 2f64.powi(-11) + 2f64.powi(-40)), 0x3c01);
        assert_eq!(f16(65504.0), 0x7bff);
        assert_eq!(f16(65519.99), 0x7bff);
        assert_eq!(f16(65520.0), 0x7c00);
        assert_eq!(f16(2f64.powi(-25)), 0x0000);
        assert_eq!(f16(2f64.powi(-25) * 1.0001), 0x0001);
        assert_eq!(f16(f64::NAN), 0x7e00);
    }

    #[test]
    fn overflow_limits_are_where_rounding_reaches_infinity() {
        for f in [Float::F16, Float::BF16, Float::F32] {
            for x in [
                1.0,
                60000.0,
                65519.0,
                65520.0,
                3.3e38,
                3.4028235e38,
                3.5e38,
                1e300,
            ] {
                for x in [x, -x] {
                    let inf = f.round_bits(x) == f.round_bits(f64::INFINITY * x.signum());
                    assert_eq!(f.overflows(x), inf, "{f:?} {x}");
                }
            }
        }
        assert!(!Float::F16.overflows(f64::INFINITY));
    }

    #[test]
    fn nonfinite_results_of_finite_bases_are_counted_in_every_dtype() {
        let (inf, nan) = (f64::INFINITY, f64::NAN);
        for f in [Float::F16, Float::BF16, Float::F32, Float::F64] {
            for (b, x, counted) in [
                (1.0, 2.0, false),
                (1.0, inf, true),
                (1.0, -inf, true),
                (1.0, nan, true),
                (-0.0, nan, true),
                (inf, inf, false),
                (-inf, nan, false),
                (nan, nan, false),
                (nan, 1.0, false),
                (1.0, 1e300, f != Float::F64),
                (1.0, f64::MAX, f != Float::F64),
            ] {
                assert_eq!(f.becomes_nonfinite(b, x), counted, "{f:?} b {b} x {x}");
            }
            // Where the base is finite, the count is the overflow count plus the non-finite.
            for x in [1.0, 65519.0, 65520.0, 3.3e38, 3.5e38, 1e300, inf, -inf, nan] {
                assert_eq!(
                    f.becomes_nonfinite(0.5, x),
                    f.overflows(x) || !x.is_finite()
                );
            }
        }
    }

    #[test]
    fn loads_are_exact() {
        for bits in [0u16, 1, 0x3f80, 0x7f7f, 0x8001, 0xff80] {
            let b = bits.to_le_bytes();
            let x = Float::BF16.load(&b, 0);
            assert_eq!(f64_to_bf16_bits(x), bits);
            let x = Float::F16.load(&b, 0);
            if !x.is_nan() {
                assert_eq!(f64_to_f16_bits(x), bits);
            }
        }
    }
}
