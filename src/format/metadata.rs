//! Reading a delta's metadata in the order safetensors reads a header: parse it
//! ([`read_metadata`]), then check that it is consistent ([`Metadata::validate`]) and that the
//! stored tensors are the ones it implies ([`check_stored`]), then read the chunk offsets
//! ([`read_offsets`]) and the fine-tune's own files ([`read_own_files`]).
//! [`super::Delta::open`] composes them; each fails with a message that names the file and,
//! where there is one, the tensor or the own file.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context, Result, bail};
use safetensors::Dtype;

use super::{
    BASE_HASHES, Entry, FILES_PREFIX, FORMAT_MAJOR, FORMAT_NAME, FileRecord, GROWN_PREFIX, Kind,
    MAX_FILES_BYTES, OFFSETS_PREFIX, Params, RESERVED_PREFIX, STATS, STATS_COLS, SUB_PREFIX,
    file_key, grown_key, is_own_file_name, is_subfolder_path, offsets_key, sub_prefix,
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
    /// The records of the fine-tune's own files, by name (empty when `files` is absent).
    pub files: BTreeMap<String, FileRecord>,
    /// The tensor entries of each subfolder weight file covered, by its path (docs/FORMAT.md
    /// section 15; empty when `subfolders` is absent).
    pub subfolders: BTreeMap<String, BTreeMap<String, Entry>>,
}

/// One record of `__metadata__["subfolders"]`, its table kept as text so that a name given
/// twice in it is refused as in the top-level table.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SubfolderRecord {
    tensors: Box<serde_json::value::RawValue>,
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
    let entries = json_table(get("tensors")?, "tensors", "tensor", file)?;
    let files = match md.get("files") {
        Some(text) => json_table(text, "files", "own file", file)?,
        None => BTreeMap::new(),
    };
    let subfolders = match md.get("subfolders") {
        Some(text) => {
            if let Some(dup) = crate::io::header::duplicate_key(text.as_bytes()) {
                bail!("{file}: __metadata__.subfolders: subfolder file {dup} appears twice");
            }
            // Parsed from the text, not through a `Value`, which would merge a table's
            // repeated names before `json_table` could see them.
            serde_json::from_str::<BTreeMap<String, SubfolderRecord>>(text)
                .with_context(|| {
                    format!("{file}: __metadata__.subfolders is not a JSON object of {{\"tensors\": {{...}}}} records")
                })?
                .into_iter()
                .map(|(path, rec)| {
                let key = format!("subfolders.{path}.tensors");
                let entries = json_table(rec.tensors.get(), &key, "tensor", file)?;
                    Ok((path, entries))
                })
                .collect::<Result<_>>()?
        }
        None => BTreeMap::new(),
    };
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
        files,
        subfolders,
    })
}

/// Parses `__metadata__[key]`, a JSON object of `what`s by name, each read as a `T`; a name
/// given twice is refused (serde would keep the last).
fn json_table<T: serde::de::DeserializeOwned>(
    text: &str,
    key: &str,
    what: &str,
    file: &str,
) -> Result<BTreeMap<String, T>> {
    if let Some(dup) = crate::io::header::duplicate_key(text.as_bytes()) {
        bail!("{file}: __metadata__.{key}: {what} {dup} appears twice");
    }
    let raw: BTreeMap<String, serde_json::Value> = serde_json::from_str(text)
        .with_context(|| format!("{file}: __metadata__.{key} is not a JSON object"))?;
    raw.into_iter()
        .map(|(name, v)| {
            let parsed = serde_json::from_value(v)
                .with_context(|| format!("{file}: __metadata__.{key}: {what} {name}"))?;
            Ok((name, parsed))
        })
        .collect()
}

impl Metadata {
    /// Checks the entries and the own files' records against each other and the format's
    /// rules; returns the tensors the file must store. A `single_file` delta stores its own
    /// files as tensors, a folder delta as files (docs/FORMAT.md section 13).
    pub fn validate(&self, file: &str, single_file: bool) -> Result<Layout> {
        let mut expected = Layout::new();
        entries_layout(&self.entries, self.params.chunk, "", file, &mut expected)?;
        for (path, entries) in &self.subfolders {
            let at = format!("{file}: subfolder file {path}");
            if !is_subfolder_path(path) {
                bail!(
                    "{at}: not a valid subfolder path (components of 1 to 255 of A-Z a-z 0-9 . _ - joined by /, none beginning with a dot, at most 9, ending in .safetensors)"
                );
            }
            if let Some(other) = self
                .subfolders
                .keys()
                .find(|o| o.starts_with(&format!("{path}/")))
            {
                bail!("{at}: a file, but {other} makes it a folder");
            }
            entries_layout(
                entries,
                self.params.chunk,
                &sub_prefix(path),
                &at,
                &mut expected,
            )?;
        }
        let mut total = 0u64;
        for (name, rec) in &self.files {
            let at = || format!("{file}: own file {name:?}");
            if !is_own_file_name(name) {
                bail!(
                    "{}: not a valid own file name (1 to 255 of A-Z a-z 0-9 . _ -, not beginning with a dot, not a .safetensors or .index.json name)",
                    at()
                );
            }
            let hex = |c: u8| c.is_ascii_digit() || (b'a'..=b'f').contains(&c);
            if rec.blake3.len() != 64 || !rec.blake3.bytes().all(hex) {
                bail!(
                    "{}: blake3 {:?} is not 64 lowercase hex digits",
                    at(),
                    rec.blake3
                );
            }
            total = total
                .checked_add(rec.len)
                .filter(|&t| t <= MAX_FILES_BYTES)
                .with_context(|| {
                    format!(
                        "{}: the own files recorded come to more than the {MAX_FILES_BYTES} bytes a delta may carry",
                        at()
                    )
                })?;
            if single_file {
                let len = usize::try_from(rec.len).expect("at most MAX_FILES_BYTES");
                expected.insert(file_key(name), (Dtype::U8, vec![len]));
            }
        }
        Ok(expected)
    }
}

/// Checks the `tensors` table `entries` of one checkpoint (the top level, or a subfolder file
/// whose keys take `prefix`, docs/FORMAT.md section 15) and adds the tensors it implies to
/// `expected`; `file` names the table in errors.
fn entries_layout(
    entries: &BTreeMap<String, Entry>,
    chunk: u64,
    prefix: &str,
    file: &str,
    expected: &mut Layout,
) -> Result<()> {
    let rows = entries.len();
    let key = |k: &str| format!("{prefix}{k}");
    expected.insert(key(BASE_HASHES), (Dtype::U8, vec![rows, 32]));
    expected.insert(key(STATS), (Dtype::F64, vec![rows, STATS_COLS]));
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
                expected.insert(key(name), (e.dtype, vec![kept as usize]));
                expected.insert(key(&offsets_key(name)), (Dtype::U64, vec![offsets_len]));
            }
            Kind::Whole => {
                expected.insert(key(name), (e.dtype, e.shape.clone()));
            }
            Kind::Same if !e.in_base => {
                bail!("{}: same as the base, but marked as not in the base", at())
            }
            Kind::Same => {}
        }
        if e.kind != Kind::Masked && e.kept.is_some() {
            bail!("{}: only masked tensors have a kept count", at());
        }
        if let Some(grown) = &e.grown_shape {
            let extends = !e.shape.is_empty()
                && grown.len() == e.shape.len()
                && grown[1..] == e.shape[1..]
                && grown[0] > e.shape[0];
            if !extends {
                bail!(
                    "{}: grown_shape {grown:?} does not extend its shape {:?} along dimension 0 only",
                    at(),
                    e.shape
                );
            }
            if !e.in_base {
                bail!("{}: grown, but marked as not in the base", at());
            }
            if !e.dtype.bitsize().is_multiple_of(8) {
                bail!(
                    "{}: grown, but its dtype {:?} packs elements into bytes",
                    at(),
                    e.dtype
                );
            }
            grown
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
                .with_context(|| format!("{}: grown_shape {grown:?} overflows", at()))?;
            let rows = e.new_rows_shape().expect("checked to extend the shape");
            expected.insert(key(&grown_key(name)), (e.dtype, rows));
        }
    }
    Ok(())
}

/// Checks that `ckpt` stores exactly the tensors of `expected`, with their dtypes and shapes.
/// Reserved names under a prefix this version does not define are let through: a later minor
/// version added them (docs/FORMAT.md section 11).
pub fn check_stored(ckpt: &Checkpoint, expected: &Layout, file: &str) -> Result<()> {
    // The prefixes of the subfolder files recorded: every one expects its `sotu/base_hashes`.
    let hashes_suffix = format!("/{BASE_HASHES}");
    let subfolder_prefixes: Vec<&str> = expected
        .keys()
        .filter(|k| k.starts_with(SUB_PREFIX) && k.ends_with(&hashes_suffix))
        .map(|k| &k[..k.len() - BASE_HASHES.len()])
        .collect();
    for (key, info) in ckpt.tensors() {
        let Some((dtype, shape)) = expected.get(key) else {
            // Within a subfolder file's keys, the rules of the top level's (docs/FORMAT.md
            // section 15).
            let local = match key.starts_with(SUB_PREFIX) {
                true => match subfolder_prefixes.iter().find(|p| key.starts_with(**p)) {
                    Some(p) => &key[p.len()..],
                    None => bail!(
                        "{file}: tensor {key} is stored but no file of __metadata__.subfolders accounts for it"
                    ),
                },
                false => key.as_str(),
            };
            let known = [OFFSETS_PREFIX, GROWN_PREFIX, FILES_PREFIX, SUB_PREFIX];
            if local.starts_with(RESERVED_PREFIX) && !known.iter().any(|p| local.starts_with(p)) {
                continue;
            }
            let by = if key.starts_with(FILES_PREFIX) {
                if ckpt.is_folder() {
                    "__metadata__.files (a folder delta carries its own files as files)"
                } else {
                    "__metadata__.files"
                }
            } else {
                "__metadata__.tensors"
            };
            bail!("{file}: tensor {key} is stored but not described by {by}");
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
/// `prefix` is that of a subfolder file's keys (docs/FORMAT.md section 15), or empty.
pub fn read_offsets(
    ckpt: &Checkpoint,
    entries: &BTreeMap<String, Entry>,
    chunk: u64,
    prefix: &str,
    file: &str,
) -> Result<HashMap<String, Vec<u64>>> {
    let mut offsets = HashMap::new();
    for (name, e) in entries.iter().filter(|(_, e)| e.kind == Kind::Masked) {
        let offs: Vec<u64> = ckpt
            .tensor(&format!("{prefix}{}", offsets_key(name)))
            .unwrap()
            .whole()?
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

/// Reads the fine-tune's own files of `files` and checks each against its record: from the
/// `sotu/files/` tensors of a single file, or from the files of a folder delta (docs/FORMAT.md
/// section 13).
pub fn read_own_files(
    ckpt: &Checkpoint,
    files: &BTreeMap<String, FileRecord>,
    file: &str,
) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    for (name, rec) in files {
        let bytes = if ckpt.is_folder() {
            let path = ckpt.path().join(name);
            crate::io::read_small_file(&path, rec.len).with_context(|| {
                format!("{file}: own file {name}, which __metadata__.files records")
            })?
        } else {
            let stored = ckpt
                .tensor(&file_key(name))
                .expect("checked by check_stored");
            stored.whole()?.into_owned()
        };
        let got = FileRecord::of(&bytes);
        if got != *rec {
            bail!(
                "{file}: own file {name} is {} bytes with BLAKE3 {}, but __metadata__.files records {} bytes with BLAKE3 {}; the file was changed after extract",
                got.len,
                got.blake3,
                rec.len,
                rec.blake3
            );
        }
        out.insert(name.clone(), bytes);
    }
    Ok(out)
}
