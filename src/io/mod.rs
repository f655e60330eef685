//! Files in and out, and the process state that keeps them safe.
//!
//! - [`checkpoint`]: safetensors input, single files and sharded model folders, validated
//!   ([`header`] parses headers and names what is wrong with a bad one), their tensors read
//!   through [`Tensor`].
//! - [`hash_cache`]: base tensor hashes remembered per file, keyed as git's index keys files.
//! - [`storage`]: how an input file's bytes are reached (`--io mmap|read`), chosen once per
//!   checkpoint.
//! - [`target`]: where an output goes and how (file or folder, shard size, durability, the
//!   stop request, a part of a merge in parts).
//! - [`output`]: atomic output, as one file or a sharded model folder; nothing appears at the
//!   output path until it is complete. [`layout`] lays out its shards and headers, [`place`]
//!   puts a finished folder at its destination.
//! - [`mod@companions`]: what a folder output carries over from the base's folder besides weights
//!   (config, tokenizer, card, library subfolders).
//! - [`memory`]: tensors in memory instead of files: a merge's output as buffers, and a
//!   checkpoint built from in-memory tensors.
//! - [`parts`]: a folder output written in parts on many machines (`merge --part`), and put
//!   together (`finalize`).
//! - [`overwrite`]: refusing an output that would overwrite or delete an input.
//! - [`process`]: the one owner of process-wide state: mapped inputs, partial outputs, and the
//!   SIGBUS, SIGINT and SIGTERM handlers.

pub mod checkpoint;
pub mod companions;
pub mod hash_cache;
pub mod header;
pub mod layout;
pub mod memory;
pub mod output;
pub mod overwrite;
pub mod parts;
pub mod place;
pub mod process;
pub mod storage;
pub mod target;

pub use checkpoint::{
    Checkpoint, INDEX_NAME, Pairs, SINGLE_NAME, Tensor, TensorInfo, fingerprint, read_small_file,
    tensor_hash,
};
pub use companions::{Companions, companions, subfolder_weights};
pub use hash_cache::HashCache;
pub use layout::OutTensor;
pub use memory::{AlignedBytes, MemoryImage, MemoryOutput, MemoryTensor};
pub use output::{Output, Sink, Written, write_file, write_tensors};
pub use overwrite::{refuse_output_over_checkpoints, refuse_output_over_input};
pub use storage::{IoMode, PIECE, with_buffer};
pub use target::{Cancel, DEFAULT_SHARD_SIZE, Target, is_folder_path, parse_size};
