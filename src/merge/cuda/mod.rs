//! The CUDA engine of `merge` (docs/CUDA.md): custom kernels in `kernels/`, compiled at run time
//! with NVRTC and launched through cudarc, which loads libcuda and libnvrtc at run time, so this
//! module builds and runs everywhere: without a GPU, a driver or NVRTC, [`backend`] says why,
//! and `--device auto` merges on the CPU.
//!
//! - [`compile`]: NVRTC, the kernel sources and their entry points.
//! - [`launch`]: host-only launch planning, staging and the two-slot pipeline; most of the GPU
//!   path is here, so that tests/cuda_host.rs can run it without a GPU (kernels/merge.cu on the
//!   CPU, through a small emulation header) and compare with the CPU engine, byte for byte.
//! - [`driver`]: the device, its streams and pinned staging, and the one kernel launch (merge
//!   and ties kernels alike).
//! - [`mod@bench`]: the kernel against a device-to-device copy (`make bench-gpu`).

pub mod bench;
pub mod compile;
pub mod driver;
pub mod launch;

pub use bench::KernelBench;
pub use compile::{
    Family, SOURCES, compile_entry_ptx, compile_helpers_ptx, compile_merge_ptx, compile_ptx,
    compile_ties_ptx, dtype_code, kernel_entries, merge_entry, nvrtc_available, ties_entry,
};
pub use driver::{Backend, backend};
pub use launch::{
    Launch, Layout, SlotDevice, WriteFn, check_status, launches, plan_slices, run_pipeline, stage,
};

/// u64 words per term descriptor (`SOTU_TERM_WORDS` in kernels/merge.cu).
pub const TERM_WORDS: usize = 14;
/// Most terms (deltas contributing to one tensor) one launch takes (`SOTU_MAX_TERMS`); a tensor
/// with more is merged on the CPU.
pub const MAX_TERMS: usize = 64;
/// Threads per block on the GPU (a multiple of 32, at most 1024).
pub const BLOCK: u32 = 512;
/// Most elements per slice, whatever the free device memory: bounds the pinned staging buffers.
const MAX_SLICE: u64 = 1 << 25;
