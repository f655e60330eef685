//! The delta file (docs/FORMAT.md): its metadata types, and a reader that validates a file
//! completely before anything uses it.
//!
//! - [`metadata`]: parse, then validate, then read the offsets, as safetensors reads a header.
//! - [`chunks`]: the one chunk walk of a masked tensor, for every reader of kept values.

pub mod chunks;
pub mod metadata;

pub use chunks::{Chunks, Ranker};
pub use metadata::{Metadata, check_stored, read_metadata, read_offsets};

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::Result;
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use crate::io::Checkpoint;
use crate::mask::{Interval, Mask};

/// `__metadata__["format"]`.
pub const FORMAT_NAME: &str = "sotu-delta";
/// `__metadata__["format_version"]` written by this tool.
pub const FORMAT_VERSION: &str = "1.0";
/// The major version this reader understands.
pub const FORMAT_MAJOR: u64 = 1;
/// Tensor names reserved for the format's own tensors.
pub const RESERVED_PREFIX: &str = "sotu/";
/// Key of the provenance tensor.
pub const BASE_HASHES: &str = "sotu/base_hashes";
/// Key of the statistics tensor.
pub const STATS: &str = "sotu/stats";
/// Columns of `sotu/stats`.
pub const STATS_COLS: usize = 3;

/// Key of the chunk offsets of tensor `name`.
pub fn offsets_key(name: &str) -> String {
    format!("sotu/offsets/{name}")
}

/// How a tensor is carried by a delta.
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Kept fine-tuned values plus chunk offsets.
    Masked,
    /// The fine-tuned tensor, stored as it is.
    Whole,
    /// Equal to the base; nothing stored.
    Same,
}

/// One tensor's entry in `__metadata__["tensors"]`.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Entry {
    /// How the tensor is carried.
    pub kind: Kind,
    /// Dtype in the fine-tuned checkpoint.
    pub dtype: Dtype,
    /// Shape in the fine-tuned checkpoint.
    pub shape: Vec<usize>,
    /// Row in `sotu/base_hashes` and `sotu/stats`.
    pub row: usize,
    /// Kept elements (masked only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub kept: Option<u64>,
    /// Whether the base has this tensor.
    pub in_base: bool,
}

impl Entry {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
}

/// The mask parameters of a delta.
#[derive(Clone, Debug)]
pub struct Params {
    /// Mask seed.
    pub seed: u64,
    /// Keep interval.
    pub interval: Interval,
    /// Elements per chunk.
    pub chunk: u64,
    /// `K/N` when the interval came from a slot.
    pub slot: Option<String>,
}

impl Params {
    /// `2^32 / (hi − lo)`: the factor of `--rescale` and of the unbiased estimate
    /// (docs/FORMAT.md section 8, docs/METHODS.md), 1 for an empty interval.
    pub fn rescale(&self) -> f64 {
        let iv = self.interval;
        if iv.hi() > iv.lo() {
            crate::mask::SPAN as f64 / (iv.hi() - iv.lo()) as f64
        } else {
            1.0
        }
    }
}

/// A delta file, opened and validated.
pub struct Delta {
    ckpt: Checkpoint,
    params: Params,
    tool: String,
    entries: BTreeMap<String, Entry>,
    offsets: HashMap<String, Vec<u64>>,
}

impl Delta {
    /// Opens `path` and checks everything docs/FORMAT.md requires of it. Chunk walks are checked
    /// later, as each chunk is decoded.
    pub fn open(path: &Path) -> Result<Delta> {
        let ckpt = Checkpoint::open(path)?;
        let file = path.display().to_string();
        let meta = read_metadata(&ckpt, &file)?;
        let expected = meta.validate(&file)?;
        check_stored(&ckpt, &expected, &file)?;
        let offsets = read_offsets(&ckpt, &meta.entries, meta.params.chunk, &file)?;
        Ok(Delta {
            ckpt,
            params: meta.params,
            tool: meta.tool,
            entries: meta.entries,
            offsets,
        })
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        self.ckpt.path()
    }

    /// The mask parameters.
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// The writer named in the metadata.
    pub fn tool(&self) -> &str {
        &self.tool
    }

    /// The tensor entries, in name order.
    pub fn entries(&self) -> &BTreeMap<String, Entry> {
        &self.entries
    }

    /// The mask of tensor `name`.
    pub fn mask(&self, name: &str) -> Mask {
        Mask::new(self.params.seed, name, self.params.interval)
    }

    /// The stored data of tensor `name` (kept values of a masked tensor, or a whole tensor).
    pub fn data(&self, name: &str) -> &[u8] {
        self.ckpt
            .data(self.ckpt.info(name).expect("validated at open"))
    }

    /// The chunk offsets of masked tensor `name`.
    pub fn offsets(&self, name: &str) -> &[u64] {
        &self.offsets[name]
    }

    /// The recorded BLAKE3 digest of the base tensor in `row`.
    pub fn base_hash(&self, row: usize) -> [u8; 32] {
        self.data(BASE_HASHES)[row * 32..row * 32 + 32]
            .try_into()
            .unwrap()
    }

    /// The statistics row `row` (docs/FORMAT.md section 7).
    pub fn stats(&self, row: usize) -> [f64; STATS_COLS] {
        let b = &self.data(STATS)[row * 8 * STATS_COLS..(row + 1) * 8 * STATS_COLS];
        std::array::from_fn(|c| f64::from_le_bytes(b[c * 8..c * 8 + 8].try_into().unwrap()))
    }

    /// The base fingerprint: BLAKE3 of the base-hash rows of the tensors in the base, in hex.
    pub fn fingerprint(&self) -> String {
        let mut h = blake3::Hasher::new();
        for e in self.entries.values().filter(|e| e.in_base) {
            h.update(&self.base_hash(e.row));
        }
        h.finalize().to_hex().to_string()
    }

    /// The checkpoint the delta is stored in.
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.ckpt
    }

    /// The safetensors files of the delta (one, or its shards).
    pub fn files(&self) -> Vec<&Path> {
        self.ckpt.files()
    }

    /// The size of the delta's files in bytes.
    pub fn file_len(&self) -> u64 {
        self.ckpt.file_len()
    }

    /// Fails if the file changed since it was opened (see [`Checkpoint::check_unchanged`]).
    pub fn check_unchanged(&self) -> Result<()> {
        self.ckpt.check_unchanged()
    }

    /// Hints sequential reading of the whole file.
    pub fn advise_sequential(&self) {
        self.ckpt.advise_sequential()
    }
}
