//! Checkpoint input: a safetensors file, or a Hugging Face model folder (one
//! `model.safetensors`, or shards listed by `model.safetensors.index.json`), memory-mapped and
//! validated before anything reads a tensor.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use super::hash_cache::{FileKey, HashCache};
use super::header::{diagnose_header, duplicate_key, header_span};
use super::process;

/// The index of a sharded Hugging Face checkpoint folder.
pub const INDEX_NAME: &str = "model.safetensors.index.json";
/// The weights file of an unsharded Hugging Face checkpoint folder.
pub const SINGLE_NAME: &str = "model.safetensors";
/// The largest index file read: real ones are kilobytes to a few megabytes.
const MAX_INDEX_BYTES: u64 = 256 << 20;

/// One tensor's header entry.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    /// Element type.
    pub dtype: Dtype,
    /// Shape, row-major.
    pub shape: Vec<usize>,
    /// Byte range of the data, relative to the start of its file.
    pub range: std::ops::Range<usize>,
    /// Which of the checkpoint's files holds the data.
    pub shard: usize,
}

impl TensorInfo {
    /// Number of elements (1 for a 0-d tensor).
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
}

/// One safetensors file, memory-mapped and validated.
struct Shard {
    path: PathBuf,
    /// Size and modification time when opened, to notice a file changed while it was read.
    stamp: (u64, Option<std::time::SystemTime>),
    /// The file's identity for the hash cache, when opened.
    key: FileKey,
    mmap: Mmap,
    metadata: HashMap<String, String>,
}

/// A checkpoint: one safetensors file or a model folder of shards, memory-mapped and validated.
pub struct Checkpoint {
    path: PathBuf,
    shards: Vec<Shard>,
    tensors: BTreeMap<String, TensorInfo>,
    /// Tensor hashes from and for the hash cache, once one is attached.
    hashes: Option<CachedHashes>,
}

/// The hash cache attached to a checkpoint, and per shard the hashes it had and those computed
/// since.
struct CachedHashes {
    cache: HashCache,
    /// When the cache was attached: no hashing of this checkpoint began earlier.
    attached: std::time::SystemTime,
    known: Vec<HashMap<String, [u8; 32]>>,
    fresh: Vec<std::sync::Mutex<HashMap<String, [u8; 32]>>>,
}

impl Checkpoint {
    /// Maps and validates `path`: a `.safetensors` file or a model folder. The data is not
    /// read; pages come in as they are touched.
    pub fn open(path: &Path) -> Result<Self> {
        let meta =
            std::fs::metadata(path).with_context(|| format!("{}: cannot open", path.display()))?;
        if !meta.is_dir() {
            return Self::open_single(path, path);
        }
        // Present even as a dangling link or something other than a file: opening it then
        // says what is wrong with it, rather than reading another file in its place.
        let present = |p: &Path| std::fs::symlink_metadata(p).is_ok();
        let index = path.join(INDEX_NAME);
        if present(&index) {
            return Self::open_index(path, &index);
        }
        let single = path.join(SINGLE_NAME);
        if present(&single) {
            return Self::open_single(path, &single);
        }
        bail!(
            "{}: a folder with neither {INDEX_NAME} nor {SINGLE_NAME}; not a safetensors checkpoint",
            path.display()
        )
    }

    /// Opens the one safetensors `file` of the checkpoint given as `path`.
    fn open_single(path: &Path, file: &Path) -> Result<Self> {
        let shard = Shard::open(file)?;
        let tensors = shard_tensors(&shard, 0)?.into_iter().collect();
        Ok(Checkpoint {
            path: path.to_path_buf(),
            shards: vec![shard],
            tensors,
            hashes: None,
        })
    }

    /// Opens the shards that `index` lists, refusing an index that does not describe them
    /// exactly: every tensor in exactly one shard, the one the index names.
    fn open_index(dir: &Path, index: &Path) -> Result<Self> {
        let at = index.display();
        let (file, meta) = open_regular(index)?;
        let len = meta.len();
        if len > MAX_INDEX_BYTES {
            bail!("{at}: {len} bytes is too large for an index");
        }
        // Bounded even where the size reported is wrong (0 for many files of /proc).
        let text = read_capped(file, MAX_INDEX_BYTES)
            .with_context(|| format!("{at}: cannot read"))?
            .with_context(|| {
                format!("{at}: more than {MAX_INDEX_BYTES} bytes is too large for an index")
            })?;
        let value: serde_json::Value =
            serde_json::from_slice(&text).with_context(|| format!("{at}: not valid JSON"))?;
        match value.get("weight_map") {
            None => bail!("{at}: not a valid index: no weight_map"),
            Some(serde_json::Value::Object(_)) => {}
            Some(v) => {
                let kind = match v {
                    serde_json::Value::Array(_) => "an array",
                    serde_json::Value::String(_) => "a string",
                    serde_json::Value::Number(_) => "a number",
                    serde_json::Value::Bool(_) => "a boolean",
                    _ => "null",
                };
                bail!("{at}: not a valid index: weight_map is {kind}, not an object")
            }
        }
        let parsed: IndexFile =
            serde_json::from_slice(&text).with_context(|| format!("{at}: not a valid index"))?;
        let entries = parsed
            .weight_map
            .with_context(|| format!("{at}: not a valid index: no weight_map"))?
            .0;
        let mut map: BTreeMap<String, String> = BTreeMap::new();
        for (name, shard) in entries {
            let serde_json::Value::String(shard) = shard else {
                bail!("{at}: weight_map entry {name:?}: the shard is {shard}, not a file name");
            };
            let p = Path::new(&shard);
            if shard.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
                bail!(
                    "{at}: weight_map entry {name:?}: shard {shard:?} is not a file inside {}; refused",
                    dir.display()
                );
            }
            if map.insert(name.clone(), shard).is_some() {
                bail!("{at}: weight_map entry {name:?} appears twice");
            }
        }
        let mut files: Vec<&String> = map.values().collect();
        files.sort();
        files.dedup();
        let mut shards = Vec::with_capacity(files.len());
        let mut tensors = BTreeMap::new();
        for (k, file) in files.iter().enumerate() {
            let path = dir.join(file);
            let problem = match std::fs::metadata(&path) {
                Err(_) => Some("does not exist".to_string()),
                Ok(m) if !m.is_file() => Some(format!("is not a regular file ({})", kind(&m))),
                Ok(_) => None,
            };
            if let Some(problem) = problem {
                let name = map.iter().find(|(_, f)| f == file).unwrap().0;
                bail!("{at}: weight_map entry {name:?}: shard {file:?} {problem}");
            }
            let shard = Shard::open(&path)?;
            for (name, info) in shard_tensors(&shard, k)? {
                match map.get(&name) {
                    Some(f) if f == *file => {}
                    Some(f) => bail!(
                        "{at}: tensor {name:?} is stored in shard {file:?}, but the index maps it to {f:?}; a tensor must be stored once, where the index says"
                    ),
                    None => bail!(
                        "{at}: shard {file:?} holds tensor {name:?}, which the index does not list"
                    ),
                }
                tensors.insert(name, info);
            }
            shards.push(shard);
        }
        if let Some((name, file)) = map.iter().find(|(n, _)| !tensors.contains_key(*n)) {
            bail!("{at}: weight_map entry {name:?}: shard {file:?} does not hold that tensor");
        }
        Ok(Checkpoint {
            path: dir.to_path_buf(),
            shards,
            tensors,
            hashes: None,
        })
    }

    /// The path given: a file or a model folder, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The safetensors files read, in shard order.
    pub fn files(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }

    /// Whether the checkpoint is a model folder (its other files can be carried over).
    pub fn is_folder(&self) -> bool {
        self.path.is_dir()
    }

    /// The tensors, in name order.
    pub fn tensors(&self) -> &BTreeMap<String, TensorInfo> {
        &self.tensors
    }

    /// A tensor's header entry.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// A tensor's raw little-endian bytes.
    pub fn data(&self, info: &TensorInfo) -> &[u8] {
        &self.shards[info.shard].mmap[info.range.clone()]
    }

    /// The `__metadata__` map of the first file (empty when absent).
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.shards[0].metadata
    }

    /// The first file whose `__metadata__` differs from the first file's, if any. The files of
    /// a sharded delta must agree.
    pub fn metadata_mismatch(&self) -> Option<&Path> {
        let first = &self.shards[0].metadata;
        self.shards
            .iter()
            .find(|s| s.metadata != *first)
            .map(|s| s.path.as_path())
    }

    /// The total size of the checkpoint's safetensors files in bytes.
    pub fn file_len(&self) -> u64 {
        self.shards.iter().map(|s| s.mmap.len() as u64).sum()
    }

    /// Fails if a file's size or modification time changed since it was opened: what was read
    /// may mix old and new contents, so an output built from it must not be committed.
    pub fn check_unchanged(&self) -> Result<()> {
        for s in &self.shards {
            let meta = std::fs::metadata(&s.path).with_context(|| {
                format!("{}: input disappeared while being read", s.path.display())
            })?;
            if (meta.len(), meta.modified().ok()) != s.stamp {
                bail!(
                    "{}: the file changed while it was being read; nothing was written. Run again on a stable file",
                    s.path.display()
                );
            }
        }
        Ok(())
    }

    /// Looks tensor hashes up in `cache` from now on, and lets [`Self::save_hashes`] store the
    /// ones computed. A shard's cached hashes count only if the cache lists exactly its tensors.
    pub fn with_hash_cache(mut self, cache: HashCache) -> Self {
        let attached = std::time::SystemTime::now();
        let known = (0..self.shards.len())
            .map(|k| {
                let names = self.shard_tensor_names(k);
                cache
                    .lookup(&self.shards[k].key, &names)
                    .unwrap_or_default()
            })
            .collect();
        let fresh = self.shards.iter().map(|_| Default::default()).collect();
        self.hashes = Some(CachedHashes {
            cache,
            attached,
            known,
            fresh,
        });
        self
    }

    fn shard_tensor_names(&self, k: usize) -> Vec<&str> {
        self.tensors
            .iter()
            .filter(|(_, i)| i.shard == k)
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// The BLAKE3 digest of tensor `name`'s bytes (docs/FORMAT.md section 7), from the hash
    /// cache where it has it; `None` if the checkpoint has no such tensor.
    pub fn hash_of(&self, name: &str) -> Option<[u8; 32]> {
        let info = self.info(name)?;
        let cached = self.hashes.as_ref();
        if let Some(h) = cached.and_then(|c| c.known[info.shard].get(name)) {
            return Some(*h);
        }
        let h = tensor_hash(self.data(info));
        if let Some(c) = cached {
            let mut fresh = c.fresh[info.shard]
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            fresh.insert(name.to_string(), h);
        }
        Some(h)
    }

    /// Stores in the hash cache the hashes of each file whose every tensor was hashed or found,
    /// if the file is still the one opened. Does nothing without a cache; never fails.
    pub fn save_hashes(&self) {
        let Some(c) = &self.hashes else { return };
        for (k, s) in self.shards.iter().enumerate() {
            let fresh = c.fresh[k].lock().unwrap_or_else(|e| e.into_inner());
            if fresh.is_empty() {
                continue;
            }
            let mut all = c.known[k].clone();
            all.extend(fresh.iter().map(|(n, h)| (n.clone(), *h)));
            let unchanged = std::fs::metadata(&s.path).is_ok_and(|m| FileKey::of(&m) == s.key);
            if unchanged && all.len() == self.shard_tensor_names(k).len() {
                c.cache.store(&s.key, c.attached, &all);
            }
        }
    }

    /// Asks the kernel to read ahead: the inputs are walked front to back.
    pub fn advise_sequential(&self) {
        for s in &self.shards {
            let _ = s.mmap.advise(memmap2::Advice::Sequential);
        }
    }
}

/// `model.safetensors.index.json`, as far as this tool reads it.
#[derive(serde::Deserialize)]
struct IndexFile {
    weight_map: Option<Pairs>,
}

/// A JSON object's members in file order, duplicates included (serde_json would keep only the
/// last of two equal keys, hiding a tensor listed twice, and would sort them).
pub struct Pairs(pub Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for Pairs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Pairs;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object mapping tensor names to shard files")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Pairs, A::Error> {
                let mut v = Vec::new();
                while let Some(kv) = m.next_entry()? {
                    v.push(kv);
                }
                Ok(Pairs(v))
            }
        }
        d.deserialize_map(V)
    }
}

impl Shard {
    fn open(path: &Path) -> Result<Self> {
        let (file, meta) = open_regular(path)?;
        let stamp = (meta.len(), meta.modified().ok());
        let key = FileKey::of(&meta);
        // SAFETY: the map is read-only. A file truncated by another process while mapped makes
        // reads fault with SIGBUS, which [`process::install_handlers`] turns into exit status 1.
        let mmap = unsafe { Mmap::map(&file) }
            .with_context(|| format!("{}: cannot map", path.display()))?;
        let (_, header) = SafeTensors::read_metadata(&mmap).map_err(|e| {
            // Name the tensor or key at fault where the header is readable JSON.
            let detail = header_span(&mmap).and_then(|(json, data_len)| {
                duplicate_key(json)
                    .map(|k| format!("{k} appears twice in the header"))
                    .or_else(|| diagnose_header(json, data_len))
            });
            match detail {
                Some(d) => {
                    anyhow::anyhow!(
                        "{}: not a valid safetensors file: {d} ({e})",
                        path.display()
                    )
                }
                None => anyhow::anyhow!("{}: not a valid safetensors file: {e}", path.display()),
            }
        })?;
        let metadata = header.metadata().clone().unwrap_or_default();
        Ok(Shard {
            path: path.to_path_buf(),
            stamp,
            key,
            mmap,
            metadata,
        })
    }
}

/// The tensors of one validated file, as entries of shard `k`. Registers the file's mapping
/// for the SIGBUS handler: only now, once the header is known valid, so that a rejected file
/// leaves no entry behind (the entry goes when the shard drops).
fn shard_tensors(shard: &Shard, k: usize) -> Result<Vec<(String, TensorInfo)>> {
    let path = &shard.path;
    let (n, header) = SafeTensors::read_metadata(&shard.mmap)
        .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e}", path.display()))?;
    if let Some(dup) = duplicate_key(&shard.mmap[8..8 + n]) {
        bail!(
            "{}: not a valid safetensors file: {dup} appears twice in the header",
            path.display()
        );
    }
    let data_start = 8 + n;
    let tensors = header
        .tensors()
        .into_iter()
        .map(|(name, info)| {
            let (s, e) = info.data_offsets;
            let entry = TensorInfo {
                dtype: info.dtype,
                shape: info.shape.clone(),
                range: data_start + s..data_start + e,
                shard: k,
            };
            (name, entry)
        })
        .collect();
    process::register_mapping(shard.mmap.as_ptr() as usize, shard.mmap.len(), path);
    Ok(tensors)
}

impl Drop for Shard {
    fn drop(&mut self) {
        // The mapping goes away: the SIGBUS handler must forget it.
        process::forget_mapping(self.mmap.as_ptr() as usize);
    }
}

/// What a file that is not a regular file is, for messages.
fn kind(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "a folder"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "an unknown kind of file"
    }
}

/// Opens `path` for reading, refusing anything but a regular file (a link to one is followed):
/// a FIFO would block the open until a writer came, a device would never end. Checked before
/// opening, and again on the file opened (without blocking), in case the path changed between.
fn open_regular(path: &Path) -> Result<(File, std::fs::Metadata)> {
    use std::os::unix::fs::OpenOptionsExt;
    let cannot_open = || format!("{}: cannot open", path.display());
    let refuse = |meta: &std::fs::Metadata| -> Result<()> {
        if meta.is_file() {
            return Ok(());
        }
        bail!(
            "{}: not a regular file ({}); refusing to read it",
            path.display(),
            kind(meta)
        )
    };
    refuse(&std::fs::metadata(path).with_context(cannot_open)?)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .with_context(cannot_open)?;
    let meta = file.metadata().with_context(cannot_open)?;
    refuse(&meta)?;
    Ok((file, meta))
}

/// Reads at most `cap` bytes from `from`: `None` if there is more (at most `cap + 1` bytes are
/// read to find out).
fn read_capped(from: impl std::io::Read, cap: u64) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let mut buf = Vec::new();
    from.take(cap.saturating_add(1)).read_to_end(&mut buf)?;
    Ok((buf.len() as u64 <= cap).then_some(buf))
}

/// Reads the regular file `path` (a link to one is followed) whole, refusing anything else and a
/// file of more than `cap` bytes: for the small files of a model folder (config, tokenizer).
pub fn read_small_file(path: &Path, cap: u64) -> Result<Vec<u8>> {
    let (file, _) = open_regular(path)?;
    read_capped(file, cap)
        .with_context(|| format!("{}: cannot read", path.display()))?
        .with_context(|| format!("{}: more than {cap} bytes", path.display()))
}

/// The BLAKE3 digest of a tensor's raw bytes (docs/FORMAT.md section 7).
pub fn tensor_hash(data: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    if data.len() >= 1 << 20 {
        h.update_rayon(data);
    } else {
        h.update(data);
    }
    *h.finalize().as_bytes()
}

/// The base fingerprint (docs/FORMAT.md section 7) of per-tensor hashes given in name order.
pub fn fingerprint(hashes: &[[u8; 32]]) -> String {
    blake3::hash(hashes.as_flattened()).to_hex().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn capped_reads_stop_one_byte_past_the_cap() {
        // An endless reader: the read stops at the cap plus one byte.
        assert_eq!(read_capped(std::io::repeat(7), 1000).unwrap(), None);
        let mut counted = std::io::repeat(7).take(u64::MAX);
        assert_eq!(read_capped(&mut counted, 10).unwrap(), None);
        assert_eq!(counted.limit(), u64::MAX - 11);
        assert_eq!(read_capped(&b"abc"[..], 3).unwrap(), Some(b"abc".to_vec()));
        assert_eq!(read_capped(&b"abcd"[..], 3).unwrap(), None);
    }
}
