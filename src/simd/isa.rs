//! The one run-time detection of the instruction sets the kernels of this module need, made
//! once per process.
//!
//! One AVX-512 level for every kernel: F, BW, VL, DQ and POPCNT ([`avx512`]), the features of
//! the AVX-512 target of `multiversioned!` (plus POPCNT). The kernels of [`Kept`] also
//! compress and expand, which takes VBMI2 besides ([`avx512_vbmi2`]). Each kernel's
//! `#[target_feature]` list is a subset of the list it is run under. `SOTU_DELTA_SCALAR=1`
//! turns the intrinsic kernels off, for comparisons: their callers then take the portable
//! twins (the multiversioned loops still pick their own clone).
//!
//! The mask's kernels use AVX-512 F alone but run at the level too, so that there is one list:
//! every AVX-512 CPU since Skylake-SP has it (Xeon Phi, with F and not BW, VL, DQ, now takes
//! the portable loops).
//!
//! [`Kept`]: crate::simd::Kept

/// What the kernels may use here, decided once.
#[derive(Clone, Copy, Debug)]
struct Detected {
    /// See [`avx512`].
    avx512: bool,
    /// See [`avx512_vbmi2`].
    avx512_vbmi2: bool,
    /// See [`name`].
    name: &'static str,
}

/// The features of the list, all detected.
#[cfg(target_arch = "x86_64")]
macro_rules! detected {
    ($($feature:tt),+) => {
        true $(&& std::arch::is_x86_feature_detected!($feature))+
    };
}

/// Detected on the first call.
fn detected() -> Detected {
    static DETECTED: std::sync::OnceLock<Detected> = std::sync::OnceLock::new();
    *DETECTED.get_or_init(|| {
        let on = std::env::var_os("SOTU_DELTA_SCALAR").is_none();
        #[cfg(target_arch = "x86_64")]
        {
            let level = detected!("avx512f", "avx512bw", "avx512vl", "avx512dq", "popcnt");
            Detected {
                avx512: level && on,
                avx512_vbmi2: level && detected!("avx512vbmi2") && on,
                name: if level {
                    "x86_64+avx512"
                } else if detected!("avx2") {
                    "x86_64+avx2"
                } else {
                    "x86_64 baseline"
                },
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = on;
            Detected {
                avx512: false,
                avx512_vbmi2: false,
                name: std::env::consts::ARCH,
            }
        }
    })
}

/// Whether the AVX-512 kernels may run: the CPU has the level (F, BW, VL, DQ, POPCNT) and
/// `SOTU_DELTA_SCALAR` is unset. The keep bits of the mask ([`crate::mask`]) use it.
#[inline]
pub fn avx512() -> bool {
    detected().avx512
}

/// [`avx512`] with VBMI2 besides: the kernels of [`Kept`](crate::simd::Kept).
#[inline]
pub fn avx512_vbmi2() -> bool {
    detected().avx512_vbmi2
}

/// The instruction set the hot loops run with on this CPU, as the benchmarks report it:
/// `x86_64+avx512` at the AVX-512 level of [`avx512`] (`SOTU_DELTA_SCALAR` aside, which the
/// multiversioned loops ignore), else `x86_64+avx2` or `x86_64 baseline`; elsewhere the
/// architecture.
pub fn name() -> &'static str {
    detected().name
}
