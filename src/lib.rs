//! sotu-delta: sparse task deltas of model checkpoints (SoTU, arXiv 2411.02813).
//!
//! - [`mask`]: the seeded, counter-based mask function.
//! - [`dtype`]: exact loads to f64 and the single rounding back to a checkpoint dtype.
//! - [`io`]: memory-mapped safetensors input (single files and sharded model folders), atomic
//!   output, and the process state that keeps both safe (signal handlers, partial outputs).
//! - [`mod@format`]: the delta file of docs/FORMAT.md, and its validating reader.
//! - [`tuned`]: fine-tunes as inputs (checkpoints, PEFT LoRA adapters) and the one decision of
//!   how a delta carries each of their tensors.
//! - [`extract`], [`merge`], [`inspect`]: the operations; [`merge`] executes its plan on the
//!   CPU or, through [`merge::cuda`], on a GPU (kernels in `kernels/`, loaded at run time).
//! - [`release`]: the model card and the recipe of a folder output, ready to upload.
//! - [`linalg`]: dense f64 linear algebra on tensors (faer), for the SVD merge methods.
//! - [`simd`]: the AVX-512 kernels of the mask, merge and extract, each beside its portable twin,
//!   chosen at run time (one detection), and the target list of the multiversioned loops.
//! - [`ops`]: the operations from the values a user gives to reports and warnings, shared by
//!   the command line and the Python package (bindings/python).
//! - [`mergekit`]: the mergekit configuration subset that `merge --config` reads.
//! - [`cli`]: the command line.

pub mod cli;
pub mod dtype;
pub mod extract;
pub mod format;
pub mod inspect;
pub mod io;
pub mod linalg;
pub mod mask;
pub mod merge;
pub mod mergekit;
pub mod ops;
pub mod release;
pub mod simd;
pub mod tuned;

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
