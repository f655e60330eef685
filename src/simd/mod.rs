//! The vector kernels of the hot loops, each beside its portable twin and the unit test that
//! they give the same bits, with the one run-time detection of what the CPU has ([`isa`]) and
//! the one list of targets of the multiversioned loops (`multiversioned!`).
//!
//! - [`fused`]: merge, general path, output in the base's dtype: a tile's output a word at a
//!   time, the base, each term's expanded values and their f64 sums in registers, then rounded
//!   once on whole vectors ([`merge_tile`], [`Kept::merge_tile`]);
//! - [`add`]: merge, general path, output cast to another dtype: the expansion of a mask word's kept values to their places
//!   (`vpexpandw`/`vpexpandd`), then f64 arithmetic 8 lanes at a time, masked, in the same IEEE
//!   operations as the scalar loop ([`add_word`], [`Kept::add_word`]);
//! - [`place`](mod@place): merge, placing path: the expansion of kept values into a buffer
//!   ([`place()`], [`Kept::place_word`]); extract: the compression of the kept elements among
//!   64 to consecutive places (`vpcompressw`/`vpcompressd`, [`gather`], [`Kept::gather_word`]);
//! - [`settle`]: merge, placing path: the output settled from base and values by
//!   `Elem::replaces` on whole vectors ([`settle_word`], [`Kept::settle_word`]);
//! - [`sums`]: extract: the statistics of docs/FORMAT.md section 7 ([`chunk_sums`],
//!   [`Kept::sums`]).
//!
//! The mask's own kernel (its keep bits: `mix32` and the interval test on 16 lanes) lives with
//! the mask, in `mask::keep`, built the same way from [`isa`] and `multiversioned!`: this module
//! depends on no other of the crate but `dtype`.
//!
//! The functions the callers use ([`merge_tile`], [`add_word`], [`place()`], [`gather`], [`settle_word`],
//! [`chunk_sums`]) take the AVX-512 path
//! where the CPU has it (checked once per tile or chunk: a [`Kept`] handle, or [`isa::avx512`])
//! and the portable loop everywhere else, or under `SOTU_DELTA_SCALAR=1`.

pub mod add;
pub mod fused;
pub mod isa;
pub mod place;
pub mod settle;
pub mod sums;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use add::add_word;
pub use fused::{TermRun, merge_tile};
pub use place::{gather, place};
pub use settle::settle_word;
pub use sums::{SUMS, Sums, chunk_sums};

use crate::dtype::Float;

/// Applies `#[multiversion]` with the one target list of the portable loops to a function:
/// compiled for AVX-512 (the level of [`isa::avx512`]), AVX2 and the baseline (and NEON), and
/// chosen at run time.
macro_rules! multiversioned {
    ($(#[$meta:meta])* $vis:vis fn $($rest:tt)*) => {
        $(#[$meta])*
        #[multiversion::multiversion(targets(
            "x86_64+avx512f+avx512bw+avx512vl+avx512dq",
            "x86_64+avx2+fma",
            "aarch64+neon"
        ))]
        $vis fn $($rest)*
    };
}
pub(crate) use multiversioned;

/// A checked handle: exists only when the CPU can run the kernels of [`Kept`] for this dtype
/// (its methods are in the kernels' modules).
pub struct Kept {
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    float: Float,
}

impl Kept {
    /// The handle for `float`, if this CPU has the instructions ([`isa::avx512_vbmi2`]) and
    /// the dtype is one they handle (F16, BF16, F32). `SOTU_DELTA_SCALAR=1` turns them off,
    /// for comparisons.
    pub fn for_dtype(float: Float) -> Option<Self> {
        (isa::avx512_vbmi2() && float != Float::F64).then_some(Kept { float })
    }

    fn size(&self) -> usize {
        self.float.size()
    }
}
