//! sotu-delta: sparse task deltas of model checkpoints (SoTU, arXiv 2411.02813).
//!
//! - [`mask`]: the seeded, counter-based mask function.
//! - [`dtype`]: exact loads to f64 and the single rounding back to a checkpoint dtype.
//! - [`checkpoint`]: memory-mapped safetensors input, single files and sharded model folders.
//! - [`output`]: atomic output, as one file or a sharded model folder.
//! - [`mod@format`]: the delta file of docs/FORMAT.md, and its validating reader.
//! - [`extract`], [`merge`], [`inspect`]: the operations.
//! - [`simd`]: the AVX-512 kernels of the mask, merge and extract, each beside its portable twin,
//!   chosen at run time (one detection), and the target list of the multiversioned loops.
//! - [`cuda`]: the CUDA backend of `merge` (kernels in `kernels/`, loaded at run time).
//! - [`cli`]: the command line.

pub mod checkpoint;
pub mod cli;
pub mod cuda;
pub mod dtype;
pub mod extract;
pub mod format;
pub mod inspect;
pub mod mask;
pub mod merge;
pub mod output;
pub mod simd;

/// The writer string recorded in every file this build writes.
pub const TOOL: &str = concat!("sotu-delta ", env!("CARGO_PKG_VERSION"));

/// A xorshift64 generator from `state` (nonzero): the unit tests' source of random bits.
#[cfg(test)]
pub(crate) fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}
