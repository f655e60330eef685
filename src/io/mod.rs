//! Files in and out, and the process state that keeps them safe.
//!
//! - [`checkpoint`]: safetensors input, single files and sharded model folders, memory-mapped
//!   and validated ([`header`] names what is wrong with a bad header).
//! - [`hash_cache`]: base tensor hashes remembered per file, keyed as git's index keys files.
//! - [`output`]: atomic output, as one file or a sharded model folder; nothing appears at the
//!   output path until it is complete.
//! - [`overwrite`]: refusing an output that would overwrite or delete an input.
//! - [`process`]: the one owner of process-wide state: mapped inputs, partial outputs, and the
//!   SIGBUS, SIGINT and SIGTERM handlers.

pub mod checkpoint;
pub mod hash_cache;
pub mod header;
pub mod output;
pub mod overwrite;
pub mod process;

pub use checkpoint::{
    Checkpoint, INDEX_NAME, Pairs, SINGLE_NAME, TensorInfo, fingerprint, read_small_file,
    tensor_hash,
};
pub use hash_cache::HashCache;
pub use output::{
    DEFAULT_SHARD_SIZE, OutTensor, Output, Target, Written, companion_files, is_folder_path,
    parse_size, write_file, write_tensors,
};
pub use overwrite::{refuse_output_over_checkpoints, refuse_output_over_input};
