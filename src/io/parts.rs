//! A folder output written in parts, on many machines (`merge --part K/N`), then put together
//! (`finalize`). The shards are those of the whole output, whatever N: part K writes the shards
//! `[K·S/N, (K+1)·S/N)` of the S the whole merge would write, byte for byte, into the sibling
//! folder `OUT.parts/`, with a manifest `part-K-of-N.json`. `finalize OUT` checks that all N
//! manifests are there and agree, writes the index and the files beside the weights, and renames
//! the folder into place, atomically, as a whole merge does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::checkpoint::INDEX_NAME;
use super::companions::{Companions, companions, copy_companions};
use super::place::{place_folder, sync_folder};

/// `format` of a part manifest.
pub const PART_FORMAT: &str = "sotu-delta-part";
/// The part manifest version this build writes and reads.
pub const PART_VERSION: u64 = 1;

/// Part `k` (0-based) of `n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    /// This part, 0 to `n − 1`.
    pub k: usize,
    /// How many parts.
    pub n: usize,
}

impl Part {
    /// Whether shard `shard` (0-based) of `total` is this part's: parts take consecutive runs
    /// of shards, as even as whole shards allow (a part may have none when N > S).
    pub fn holds(&self, shard: usize, total: usize) -> bool {
        shard * self.n / total.max(1) == self.k
    }

    /// The manifest's file name.
    pub fn manifest_name(&self) -> String {
        format!("part-{}-of-{}.json", self.k, self.n)
    }
}

/// Where the parts of output `out` are gathered: the sibling folder `OUT.parts`.
pub fn parts_dir(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".parts");
    out.with_file_name(name)
}

/// One shard a part wrote.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PartShard {
    /// Its file name.
    pub file: String,
    /// Its size.
    pub bytes: u64,
}

/// What a part wrote and what `finalize` needs of it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Manifest {
    /// [`PART_FORMAT`].
    pub format: String,
    /// [`PART_VERSION`].
    pub version: u64,
    /// This part, 0-based.
    pub part: usize,
    /// How many parts.
    pub parts: usize,
    /// Shards of the whole output.
    pub total_shards: usize,
    /// BLAKE3 of every shard's name and header: parts agree on it or belong to other merges.
    pub layout: String,
    /// The whole output's index (`None` for a single shard), the same in every part.
    pub index: Option<String>,
    /// The shards this part wrote.
    pub shards: Vec<PartShard>,
    /// The BLAKE3 of each base tensor this part read, hex, by name: together, the base's.
    pub base_hashes: BTreeMap<String, String>,
    /// The fine-tune's own files this part wrote beside its shards (`--files-from`, `apply`),
    /// in place of the base's files of those names.
    #[serde(default)]
    pub own_files: Vec<String>,
    /// The base folder whose other files the output copies.
    pub copy_from: Option<String>,
    /// Files the output gets beside its weights, as this part made them (the recipe); finalize
    /// completes them.
    pub files: BTreeMap<String, String>,
}

impl Manifest {
    /// Reads the manifest at `path`.
    pub fn read(path: &Path) -> Result<Manifest> {
        let at = path.display();
        let text = std::fs::read(path).with_context(|| format!("{at}: cannot read"))?;
        let m: Manifest = serde_json::from_slice(&text)
            .with_context(|| format!("{at}: not a valid part manifest"))?;
        if m.format != PART_FORMAT || m.version != PART_VERSION {
            bail!(
                "{at}: not a part manifest this build reads ({} version {})",
                m.format,
                m.version
            );
        }
        Ok(m)
    }

    /// The part.
    pub fn part(&self) -> Part {
        Part {
            k: self.part,
            n: self.parts,
        }
    }
}

/// The manifests of all the parts of `out`, checked: all N present, each once, agreeing on the
/// layout and the index, their shards present at their sizes and together the whole output's.
pub fn gather(out: &Path) -> Result<Vec<Manifest>> {
    let dir = parts_dir(out);
    let at = dir.display();
    let entries = std::fs::read_dir(&dir).with_context(|| {
        format!(
            "{at}: cannot list the parts of {} (run `merge --part K/N -o {}` first)",
            out.display(),
            out.display()
        )
    })?;
    let mut names: Vec<String> = Vec::new();
    for e in entries {
        let name = e
            .with_context(|| format!("{at}: cannot list"))?
            .file_name()
            .to_string_lossy()
            .into_owned();
        if name.starts_with("part-") && name.ends_with(".json") {
            names.push(name);
        }
    }
    names.sort();
    let Some(first) = names.first() else {
        bail!(
            "{at}: no part manifest (part-K-of-N.json); run `merge --part K/N -o {}` for each part first",
            out.display()
        );
    };
    let n = Manifest::read(&dir.join(first))?.parts;
    let mut manifests = Vec::with_capacity(n);
    for k in 0..n {
        let part = Part { k, n };
        let path = dir.join(part.manifest_name());
        if !path.exists() {
            bail!(
                "{}: missing: part {k}/{n} of {} has not finished (run `merge --part {k}/{n} -o {}`)",
                path.display(),
                out.display(),
                out.display()
            );
        }
        let m = Manifest::read(&path)?;
        if m.part() != part {
            bail!(
                "{}: says it is part {}/{}, not {k}/{n}",
                path.display(),
                m.part,
                m.parts
            );
        }
        manifests.push(m);
    }
    if let Some(other) = names
        .iter()
        .find(|name| !(0..n).any(|k| **name == Part { k, n }.manifest_name()))
    {
        bail!(
            "{}: a part of a merge in another number of parts than {n}; remove it (or the other parts) and run again",
            dir.join(other).display()
        );
    }
    let m0 = &manifests[0];
    for m in &manifests[1..] {
        let path = dir.join(m.part().manifest_name());
        if m.layout != m0.layout
            || m.index != m0.index
            || m.total_shards != m0.total_shards
            || m.own_files != m0.own_files
        {
            bail!(
                "{}: part {}/{n} was written by another merge than part 0/{n} (other inputs, parameters or shard size): its shards do not belong with theirs",
                path.display(),
                m.part
            );
        }
    }
    let mut seen = BTreeMap::new();
    for m in &manifests {
        for s in &m.shards {
            let path = dir.join(&s.file);
            let len = std::fs::metadata(&path).map(|x| x.len()).ok();
            if len != Some(s.bytes) {
                bail!(
                    "{}: shard of part {}/{n} {}",
                    path.display(),
                    m.part,
                    match len {
                        None => "is missing".to_string(),
                        Some(l) => format!("is {l} bytes, its manifest says {}", s.bytes),
                    }
                );
            }
            if seen.insert(s.file.clone(), m.part).is_some() {
                bail!("{}: written by two parts", path.display());
            }
        }
    }
    if seen.len() != m0.total_shards {
        bail!(
            "{at}: the parts hold {} shards of the {} of the whole output",
            seen.len(),
            m0.total_shards
        );
    }
    Ok(manifests)
}

/// The base fingerprint of the parts' base hashes together (docs/FORMAT.md section 7), or the
/// name of a base tensor two parts hashed differently.
pub fn base_fingerprint(manifests: &[Manifest]) -> Result<String> {
    let mut all: BTreeMap<&str, &str> = BTreeMap::new();
    for m in manifests {
        for (name, h) in &m.base_hashes {
            if all.insert(name, h).is_some_and(|old| old != h) {
                bail!("tensor {name}: the parts read two different bases");
            }
        }
    }
    let hashes = all
        .values()
        .map(|h| {
            let mut b = [0u8; 32];
            for (i, byte) in b.iter_mut().enumerate() {
                *byte = u8::from_str_radix(h.get(2 * i..2 * i + 2).unwrap_or("zz"), 16)
                    .map_err(|_| anyhow::anyhow!("a part manifest holds a malformed hash {h}"))?;
            }
            Ok(b)
        })
        .collect::<Result<Vec<[u8; 32]>>>()?;
    Ok(super::fingerprint(&hashes))
}

/// Puts the parts of `out` together ([`gather`]d into `manifests`): the index, the base
/// folder's other files, `files` (name, bytes) in place of those of the same names; the
/// manifests go, and the folder is renamed to `out` (an existing folder there is swapped out
/// atomically). Returns the output's files.
pub fn finalize(
    out: &Path,
    manifests: &[Manifest],
    files: &[(String, Vec<u8>)],
    durable: bool,
) -> Result<Vec<PathBuf>> {
    let dir = parts_dir(out);
    let m0 = &manifests[0];
    let mut placed: Vec<PathBuf> = manifests
        .iter()
        .flat_map(|m| m.shards.iter().map(|s| out.join(&s.file)))
        .collect();
    placed.sort();
    if let Some(index) = &m0.index {
        let path = dir.join(INDEX_NAME);
        std::fs::write(&path, index)
            .with_context(|| format!("{}: cannot write", out.join(INDEX_NAME).display()))?;
        placed.push(out.join(INDEX_NAME));
    }
    let added: Vec<&Path> = files
        .iter()
        .map(|(n, _)| Path::new(n))
        .chain(m0.own_files.iter().map(Path::new))
        .collect();
    placed.extend(m0.own_files.iter().map(|f| out.join(f)));
    if let Some(src) = &m0.copy_from {
        let src = Path::new(src);
        let c: Companions = companions(src)?;
        copy_companions(src, &c, &dir, out, &added)?;
        placed.extend(
            c.files
                .iter()
                .filter(|f| !added.contains(&f.as_path()))
                .map(|f| out.join(f)),
        );
    }
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes)
            .with_context(|| format!("{}: cannot write", out.join(name).display()))?;
        placed.push(out.join(name));
    }
    for m in manifests {
        let path = dir.join(m.part().manifest_name());
        std::fs::remove_file(&path)
            .with_context(|| format!("{}: cannot remove", path.display()))?;
    }
    if durable {
        sync_folder(&dir)?;
    }
    super::place::refuse_to_replace(out)?;
    place_folder(&dir, out)?;
    if durable && let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        let _ = sync_folder(parent);
    }
    Ok(placed)
}
