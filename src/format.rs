//! The delta file (docs/FORMAT.md): its metadata types, and a reader that validates a file
//! completely before anything uses it.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{Context, Result, bail};
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use crate::checkpoint::Checkpoint;
use crate::dtype::Float;
use crate::mask::{Interval, MASK_NAME, Mask};

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
        if let Some(shard) = ckpt.metadata_mismatch() {
            bail!(
                "{}: __metadata__ differs from that of {}; the shards of a delta must carry the same metadata",
                shard.display(),
                ckpt.files()[0].display()
            );
        }
        let md = ckpt.metadata();
        let get = |k: &str| -> Result<&String> {
            md.get(k).with_context(|| {
                format!("{file}: not a sotu-delta file: __metadata__ has no {k:?}")
            })
        };
        if get("format")? != FORMAT_NAME {
            bail!(
                "{file}: not a sotu-delta file: __metadata__.format is {:?}",
                md["format"]
            );
        }
        let version = get("format_version")?;
        let major: u64 = version
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .with_context(|| {
                format!("{file}: __metadata__.format_version {version:?} is not MAJOR.MINOR")
            })?;
        if major != FORMAT_MAJOR {
            bail!(
                "{file}: format version {version} is not supported (this build reads {FORMAT_MAJOR}.x); use a sotu-delta that does"
            );
        }
        if get("mask")? != MASK_NAME {
            bail!(
                "{file}: unknown mask function {:?} (this build knows {MASK_NAME})",
                md["mask"]
            );
        }
        let num = |k: &str| -> Result<u64> {
            let v = get(k)?;
            v.parse()
                .with_context(|| format!("{file}: __metadata__.{k} = {v:?} is not an integer"))
        };
        let seed = num("seed")?;
        let interval = Interval::new(num("lo")?, num("hi")?)
            .with_context(|| format!("{file}: __metadata__ lo/hi"))?;
        let chunk = num("chunk")?;
        if chunk == 0 {
            bail!("{file}: __metadata__.chunk is 0");
        }
        let tensors_json = get("tensors")?;
        if let Some(dup) = crate::checkpoint::duplicate_key(tensors_json.as_bytes()) {
            bail!("{file}: __metadata__.tensors: tensor {dup} appears twice");
        }
        let raw: BTreeMap<String, serde_json::Value> = serde_json::from_str(tensors_json)
            .with_context(|| format!("{file}: __metadata__.tensors is not a JSON object"))?;
        let mut entries = BTreeMap::new();
        for (name, v) in raw {
            let e: Entry = serde_json::from_value(v)
                .with_context(|| format!("{file}: __metadata__.tensors: tensor {name}"))?;
            entries.insert(name, e);
        }
        let params = Params {
            seed,
            interval,
            chunk,
            slot: md.get("slot").cloned(),
        };
        let tool = md.get("tool").cloned().unwrap_or_default();

        let rows = entries.len();
        let mut expected: BTreeMap<String, (Dtype, Vec<usize>)> = BTreeMap::new();
        expected.insert(BASE_HASHES.into(), (Dtype::U8, vec![rows, 32]));
        expected.insert(STATS.into(), (Dtype::F64, vec![rows, STATS_COLS]));
        for (row, (name, e)) in entries.iter().enumerate() {
            let at = || format!("{file}: tensor {name}");
            if name.starts_with(RESERVED_PREFIX) {
                bail!(
                    "{}: the name uses the reserved prefix {RESERVED_PREFIX}",
                    at()
                );
            }
            if e.row != row {
                bail!(
                    "{}: row is {}, expected {row} (rows follow name order)",
                    at(),
                    e.row
                );
            }
            e.shape
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
                .with_context(|| format!("{}: shape {:?} overflows", at(), e.shape))?;
            match e.kind {
                Kind::Masked => {
                    if Float::of(e.dtype).is_none() {
                        bail!(
                            "{}: masked, but its dtype {:?} is not a float",
                            at(),
                            e.dtype
                        );
                    }
                    if !e.in_base {
                        bail!("{}: masked, but marked as not in the base", at());
                    }
                    let kept = e
                        .kept
                        .with_context(|| format!("{}: masked, but has no kept count", at()))?;
                    if kept > e.numel() {
                        bail!("{}: kept {kept} exceeds its {} elements", at(), e.numel());
                    }
                    let offsets_len = usize::try_from(e.numel().div_ceil(chunk))
                        .ok()
                        .and_then(|c| c.checked_add(1))
                        .with_context(|| {
                            format!("{}: {} chunks of {chunk} are too many", at(), e.numel())
                        })?;
                    expected.insert(name.clone(), (e.dtype, vec![kept as usize]));
                    expected.insert(offsets_key(name), (Dtype::U64, vec![offsets_len]));
                }
                Kind::Whole => {
                    expected.insert(name.clone(), (e.dtype, e.shape.clone()));
                }
                Kind::Same if !e.in_base => {
                    bail!("{}: same as the base, but marked as not in the base", at())
                }
                Kind::Same => {}
            }
            if e.kind != Kind::Masked && e.kept.is_some() {
                bail!("{}: only masked tensors have a kept count", at());
            }
        }
        for (key, info) in ckpt.tensors() {
            let Some((dtype, shape)) = expected.get(key) else {
                if key.starts_with(RESERVED_PREFIX) {
                    continue; // added by a later minor version (docs/FORMAT.md section 10)
                }
                bail!("{file}: tensor {key} is stored but not described by __metadata__.tensors");
            };
            if info.dtype != *dtype || &info.shape != shape {
                bail!(
                    "{file}: tensor {key} is stored as {:?} {:?}, but the metadata implies {:?} {:?}",
                    info.dtype,
                    info.shape,
                    dtype,
                    shape
                );
            }
        }
        if let Some(key) = expected.keys().find(|k| ckpt.info(k).is_none()) {
            bail!("{file}: tensor {key} is described by the metadata but not stored");
        }

        let mut offsets = HashMap::new();
        for (name, e) in entries.iter().filter(|(_, e)| e.kind == Kind::Masked) {
            let info = ckpt.info(&offsets_key(name)).unwrap();
            let offs: Vec<u64> = ckpt
                .data(info)
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let n = e.numel();
            for (j, w) in offs.windows(2).enumerate() {
                let len = chunk.min(n - j as u64 * chunk);
                if w[1] < w[0] || w[1] - w[0] > len {
                    bail!(
                        "{file}: tensor {name}: chunk offsets are inconsistent at chunk {j} ({} then {})",
                        w[0],
                        w[1]
                    );
                }
            }
            if offs[0] != 0 || *offs.last().unwrap() != e.kept.unwrap() {
                bail!(
                    "{file}: tensor {name}: chunk offsets run from {} to {}, expected 0 to {}",
                    offs[0],
                    offs.last().unwrap(),
                    e.kept.unwrap()
                );
            }
            offsets.insert(name.clone(), offs);
        }
        Ok(Delta {
            ckpt,
            params,
            tool,
            entries,
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
