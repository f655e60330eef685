//! The delta file (docs/FORMAT.md): its metadata types, and a reader that validates a file
//! completely before anything uses it.
//!
//! - [`metadata`]: parse, then validate, then read the offsets, as safetensors reads a header.
//! - [`chunks`]: the one chunk walk of a masked tensor, for every reader of kept values.

pub mod chunks;
pub mod metadata;

pub use chunks::{Chunks, Dense, Ranker};
pub use metadata::{Metadata, check_stored, read_metadata, read_offsets, read_own_files};

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use crate::io::{Checkpoint, IoMode, Tensor};
use crate::mask::{Interval, Mask};

/// `__metadata__["format"]`.
pub const FORMAT_NAME: &str = "sotu-delta";
/// `__metadata__["format_version"]` written by this tool.
pub const FORMAT_VERSION: &str = "1.2";
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
/// Prefix of the chunk offsets of masked tensors.
pub const OFFSETS_PREFIX: &str = "sotu/offsets/";
/// Prefix of the new rows of grown tensors (docs/FORMAT.md section 12).
pub const GROWN_PREFIX: &str = "sotu/grown/";
/// Prefix of the fine-tune's own files in a single-file delta (docs/FORMAT.md section 13).
pub const FILES_PREFIX: &str = "sotu/files/";
/// Prefix of the tensors of the weight files in subfolders (docs/FORMAT.md section 15).
pub const SUB_PREFIX: &str = "sotu/sub/";
/// The most bytes of own files a delta carries, all files together (docs/FORMAT.md section 13).
pub const MAX_FILES_BYTES: u64 = 64 << 20;

/// Key of the chunk offsets of tensor `name`.
pub fn offsets_key(name: &str) -> String {
    format!("{OFFSETS_PREFIX}{name}")
}

/// Key of the new rows of grown tensor `name`.
pub fn grown_key(name: &str) -> String {
    format!("{GROWN_PREFIX}{name}")
}

/// Key of own file `name` in a single-file delta.
pub fn file_key(name: &str) -> String {
    format!("{FILES_PREFIX}{name}")
}

/// The prefix of the keys of subfolder weight file `path`: `sotu/sub/<path>/` (docs/FORMAT.md
/// section 15). A tensor's key under it is also the name its mask is keyed with.
pub fn sub_prefix(path: &str) -> String {
    format!("{SUB_PREFIX}{path}/")
}

/// Whether `path` may name a weight file in a subfolder (docs/FORMAT.md section 15): 2 to 9
/// components of 1 to 255 bytes of `A–Z a–z 0–9 . _ -` joined by `/`, none beginning with `.`,
/// ending in `.safetensors`. Such a path stays inside the folder it is written into.
pub fn is_subfolder_path(path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    (2..=9).contains(&parts.len())
        && path.ends_with(".safetensors")
        && parts.iter().all(|c| {
            (1..=255).contains(&c.len())
                && !c.starts_with('.')
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        })
}

/// Whether `name` may name one of the fine-tune's own files (docs/FORMAT.md section 13): 1 to
/// 255 bytes of `A–Z a–z 0–9 . _ -`, not beginning with `.`, not ending in `.safetensors` or
/// `.index.json`. Such a name stays inside the folder it is written into and is never taken for
/// a shard or an index.
pub fn is_own_file_name(name: &str) -> bool {
    (1..=255).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !name.starts_with('.')
        && !name.ends_with(".safetensors")
        && !name.ends_with(".index.json")
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
    /// A grown tensor's shape in the fine-tune: `shape` with more rows (docs/FORMAT.md
    /// section 12). `shape` is then the base's.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub grown_shape: Option<Vec<usize>>,
}

impl Entry {
    /// Number of elements of `shape`: for a grown tensor, of the part the base has.
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }

    /// The tensor's shape in the fine-tune (and in a merge's output): `grown_shape` or `shape`.
    pub fn tuned_shape(&self) -> &[usize] {
        self.grown_shape.as_deref().unwrap_or(&self.shape)
    }

    /// The shape of a grown tensor's new rows: `[grown rows − base rows, …]`.
    pub fn new_rows_shape(&self) -> Option<Vec<usize>> {
        let g = self.grown_shape.as_ref()?;
        let mut rows = g.clone();
        rows[0] = g[0].checked_sub(self.shape[0])?;
        Some(rows)
    }
}

/// The record of one of the fine-tune's own files in `__metadata__["files"]` (docs/FORMAT.md
/// section 13).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct FileRecord {
    /// Its size in bytes.
    pub len: u64,
    /// The BLAKE3 digest of its bytes, in lowercase hex.
    pub blake3: String,
}

impl FileRecord {
    /// The record of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        FileRecord {
            len: bytes.len() as u64,
            blake3: blake3::hash(bytes).to_hex().to_string(),
        }
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

/// A delta file, opened and validated; or a view of the part of one that covers a subfolder
/// weight file (docs/FORMAT.md section 15), which reads as the delta of that file alone.
#[derive(Clone)]
pub struct Delta {
    ckpt: Arc<Checkpoint>,
    /// The prefix of this view's keys: empty for the delta's top-level checkpoint,
    /// `sotu/sub/<path>/` for a subfolder file.
    prefix: String,
    params: Params,
    tool: String,
    entries: BTreeMap<String, Entry>,
    offsets: HashMap<String, Vec<u64>>,
    own_files: BTreeMap<String, Vec<u8>>,
    /// `sotu/base_hashes`, read at open (32 bytes a row).
    base_hashes: Vec<u8>,
    /// `sotu/stats`, read at open (`STATS_COLS` little-endian f64 a row).
    stats: Vec<u8>,
    /// The views of the subfolder weight files the delta covers, by path.
    subfolders: BTreeMap<String, Delta>,
    /// A view of a subfolder file that the delta does not cover ([`Delta::subfolder`]).
    uncovered: bool,
}

impl Delta {
    /// [`Delta::open_with`] memory-mapped, the default.
    pub fn open(path: &Path) -> Result<Delta> {
        Self::open_with(path, IoMode::Mmap)
    }

    /// Opens `path`, reading it as `io` says, and checks everything docs/FORMAT.md requires of
    /// it. Chunk walks are checked later, as each chunk is decoded.
    pub fn open_with(path: &Path, io: IoMode) -> Result<Delta> {
        let ckpt = Arc::new(Checkpoint::open_with(path, io)?);
        let file = path.display().to_string();
        let meta = read_metadata(&ckpt, &file)?;
        let expected = meta.validate(&file, !ckpt.is_folder())?;
        check_stored(&ckpt, &expected, &file)?;
        let mut delta = Self::view(&ckpt, String::new(), meta.entries, &meta.params, &file)?;
        delta.tool = meta.tool;
        delta.own_files = read_own_files(&ckpt, &meta.files, &file)?;
        for (sub, entries) in meta.subfolders {
            let at = format!("{file}: subfolder file {sub}");
            let view = Self::view(&ckpt, sub_prefix(&sub), entries, &meta.params, &at)?;
            delta.subfolders.insert(sub, view);
        }
        Ok(delta)
    }

    /// The delta of the tensors `entries`, whose keys in `ckpt` take `prefix`, with its offsets,
    /// hashes and statistics read; `file` names it in errors.
    fn view(
        ckpt: &Arc<Checkpoint>,
        prefix: String,
        entries: BTreeMap<String, Entry>,
        params: &Params,
        file: &str,
    ) -> Result<Delta> {
        let offsets = read_offsets(ckpt, &entries, params.chunk, &prefix, file)?;
        let small = |name: &str| -> Result<Vec<u8>> {
            let key = format!("{prefix}{name}");
            Ok(ckpt.tensor(&key).expect("validated").whole()?.into_owned())
        };
        let (base_hashes, stats) = (small(BASE_HASHES)?, small(STATS)?);
        Ok(Delta {
            ckpt: Arc::clone(ckpt),
            prefix,
            params: params.clone(),
            tool: String::new(),
            entries,
            offsets,
            own_files: BTreeMap::new(),
            base_hashes,
            stats,
            subfolders: BTreeMap::new(),
            uncovered: false,
        })
    }

    /// The subfolder weight files the delta covers, each as the delta of that file alone, by
    /// path (docs/FORMAT.md section 15).
    pub fn subfolders(&self) -> &BTreeMap<String, Delta> {
        &self.subfolders
    }

    /// The delta of subfolder weight file `path`: its view, or, when the delta does not cover
    /// it, a delta with no entries (which contributes nothing to a merge).
    pub fn subfolder(&self, path: &str) -> Delta {
        self.subfolders
            .get(path)
            .cloned()
            .unwrap_or_else(|| Self::uncovered(Arc::clone(&self.ckpt), self.params.clone(), path))
    }

    /// A delta of subfolder weight file `path` with no entries, which contributes nothing to a
    /// merge, under mask parameters `params`; `ckpt` stands for its file (nothing is read
    /// from it).
    pub fn uncovered(ckpt: Arc<Checkpoint>, params: Params, path: &str) -> Delta {
        Delta {
            ckpt,
            prefix: sub_prefix(path),
            params,
            tool: String::new(),
            entries: BTreeMap::new(),
            offsets: HashMap::new(),
            own_files: BTreeMap::new(),
            base_hashes: Vec::new(),
            stats: Vec::new(),
            subfolders: BTreeMap::new(),
            uncovered: true,
        }
    }

    /// Whether this is the view of a subfolder file that the delta does not cover: it has no
    /// entries, and no base hashes to check.
    pub fn is_uncovered(&self) -> bool {
        self.uncovered
    }

    /// The key under which this view stores `key` (docs/FORMAT.md section 15).
    fn key<'k>(&self, key: &'k str) -> std::borrow::Cow<'k, str> {
        match self.prefix.is_empty() {
            true => key.into(),
            false => format!("{}{key}", self.prefix).into(),
        }
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
        Mask::new(self.params.seed, &self.key(name), self.params.interval)
    }

    /// The stored data of tensor `name` (kept values of a masked tensor, or a whole tensor).
    pub fn stored(&self, name: &str) -> Tensor<'_> {
        self.ckpt
            .tensor(&self.key(name))
            .expect("validated at open")
    }

    /// The new rows of grown tensor `name` (docs/FORMAT.md section 12), `None` for a tensor that
    /// did not grow.
    pub fn grown_rows(&self, name: &str) -> Option<Tensor<'_>> {
        self.entries.get(name)?.grown_shape.as_ref()?;
        Some(self.stored(&grown_key(name)))
    }

    /// The fine-tune's own files the delta carries, by name (docs/FORMAT.md section 13),
    /// checked against their records.
    pub fn own_files(&self) -> &BTreeMap<String, Vec<u8>> {
        &self.own_files
    }

    /// The chunk offsets of masked tensor `name`.
    pub fn offsets(&self, name: &str) -> &[u64] {
        &self.offsets[name]
    }

    /// The recorded BLAKE3 digest of the base tensor in `row`.
    pub fn base_hash(&self, row: usize) -> [u8; 32] {
        self.base_hashes[row * 32..row * 32 + 32]
            .try_into()
            .unwrap()
    }

    /// The statistics row `row` (docs/FORMAT.md section 7).
    pub fn stats(&self, row: usize) -> [f64; STATS_COLS] {
        let b = &self.stats[row * 8 * STATS_COLS..(row + 1) * 8 * STATS_COLS];
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
