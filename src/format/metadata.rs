//! Reading a delta's metadata in the order safetensors reads a header: parse it
//! ([`read_metadata`]), then check that it is consistent ([`Metadata::validate`]) and that the
//! stored tensors are the ones it implies ([`check_stored`]), then read the chunk offsets
//! ([`read_offsets`]). [`super::Delta::open`] composes them; each fails with a message that
//! names the file and, where there is one, the tensor.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context, Result, bail};
use safetensors::Dtype;

use super::{
    BASE_HASHES, Entry, FORMAT_MAJOR, FORMAT_NAME, Kind, Params, RESERVED_PREFIX, STATS,
    STATS_COLS, offsets_key,
};
use crate::dtype::Float;
use crate::io::Checkpoint;
use crate::mask::{Interval, MASK_NAME};

/// What `__metadata__` says of a delta, parsed but not yet checked against the stored tensors.
pub struct Metadata {
    /// The mask parameters.
    pub params: Params,
    /// The writer named in the metadata.
    pub tool: String,
    /// The tensor entries, in name order.
    pub entries: BTreeMap<String, Entry>,
}

/// The dtype and shape of each tensor a delta must store, by key.
pub type Layout = BTreeMap<String, (Dtype, Vec<usize>)>;

/// Parses the format's keys of `ckpt`'s `__metadata__` (`file` names it in errors).
pub fn read_metadata(ckpt: &Checkpoint, file: &str) -> Result<Metadata> {
    if let Some(shard) = ckpt.metadata_mismatch() {
        bail!(
            "{}: __metadata__ differs from that of {}; the shards of a delta must carry the same metadata",
            shard.display(),
            ckpt.files()[0].display()
        );
    }
    let md = ckpt.metadata();
    let get = |k: &str| -> Result<&String> {
        md.get(k)
            .with_context(|| format!("{file}: not a sotu-delta file: __metadata__ has no {k:?}"))
    };
    if get("format")? != FORMAT_NAME {
        bail!(
            "{file}: not a sotu-delta file: __metadata__.format is {:?}",
            md["format"]
        );
    }
    let version = get("format_version")?;
    // Exactly two decimal integers: "1", "1.0.0" or "+1.0" are not versions of this format.
    let num = |t: &str| {
        (!t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
            .then(|| t.parse::<u64>().ok())
            .flatten()
    };
    let (major, _minor) = version
        .split_once('.')
        .and_then(|(major, minor)| Some((num(major)?, num(minor)?)))
        .with_context(|| {
            format!("{file}: __metadata__.format_version {version:?} is not MAJOR.MINOR (two decimal integers, as 1.0)")
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
    if let Some(dup) = crate::io::header::duplicate_key(tensors_json.as_bytes()) {
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
    Ok(Metadata {
        params,
        tool,
        entries,
    })
}

impl Metadata {
    /// Checks the entries against each other and the format's rules; returns the tensors the
    /// file must store.
    pub fn validate(&self, file: &str) -> Result<Layout> {
        let (entries, chunk) = (&self.entries, self.params.chunk);
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
        Ok(expected)
    }
}

/// Checks that `ckpt` stores exactly the tensors of `expected`, with their dtypes and shapes.
/// Reserved names it does not know are let through: a later minor version added them.
pub fn check_stored(ckpt: &Checkpoint, expected: &Layout, file: &str) -> Result<()> {
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

    Ok(())
}

/// Reads and checks the chunk offsets of every masked tensor (docs/FORMAT.md section 6).
pub fn read_offsets(
    ckpt: &Checkpoint,
    entries: &BTreeMap<String, Entry>,
    chunk: u64,
    file: &str,
) -> Result<HashMap<String, Vec<u64>>> {
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
    Ok(offsets)
}
