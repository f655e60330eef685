//! Checkpoint input: a safetensors file, or a Hugging Face model folder (one
//! `model.safetensors`, or shards listed by `model.safetensors.index.json`), opened as
//! [`IoMode`] says (memory-mapped, or read by position) and validated before anything reads a
//! tensor. Tensors are read through [`Tensor`], the same way in either mode.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail};
use safetensors::Dtype;

use super::hash_cache::{FileKey, HashCache};
use super::header::{diagnose_header, duplicate_key, header_len, parse_header};
use super::memory::MemoryImage;
use super::process;
use super::storage::{IoMode, PIECE, Storage, with_buffer};

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

/// One safetensors file, opened and validated (or an image built in memory).
struct Shard {
    path: PathBuf,
    /// Size and modification time when opened, to notice a file changed while it was read;
    /// `None` for an image in memory, which nothing else can change.
    stamp: Option<(u64, Option<std::time::SystemTime>)>,
    /// The file's identity for the hash cache, when opened; `None` for an image in memory,
    /// which the cache never holds.
    key: Option<FileKey>,
    storage: Storage,
    metadata: HashMap<String, String>,
    /// The tensors of its header: name, dtype, shape, byte range in the file.
    header: Vec<(String, Dtype, Vec<usize>, Range<usize>)>,
}

/// A checkpoint: one safetensors file or a model folder of shards, opened and validated (or
/// one image of in-memory tensors, [`Checkpoint::from_image`]).
pub struct Checkpoint {
    path: PathBuf,
    shards: Vec<Shard>,
    tensors: BTreeMap<String, TensorInfo>,
    folder: bool,
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
    /// [`Checkpoint::open_with`] memory-mapped, the default.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, IoMode::Mmap)
    }

    /// Opens and validates `path`, a `.safetensors` file or a model folder, reading its files
    /// as `io` says. Only headers are read here; tensor data is read as it is asked for.
    pub fn open_with(path: &Path, io: IoMode) -> Result<Self> {
        let meta =
            std::fs::metadata(path).with_context(|| format!("{}: cannot open", path.display()))?;
        if !meta.is_dir() {
            return Self::open_single(path, path, io);
        }
        // Present even as a dangling link or something other than a file: opening it then
        // says what is wrong with it, rather than reading another file in its place.
        let present = |p: &Path| std::fs::symlink_metadata(p).is_ok();
        let index = path.join(INDEX_NAME);
        if present(&index) {
            return Self::open_index(path, &index, io);
        }
        let single = path.join(SINGLE_NAME);
        if present(&single) {
            return Self::open_single(path, &single, io);
        }
        bail!(
            "{}: a folder with neither {INDEX_NAME} nor {SINGLE_NAME}; not a safetensors checkpoint",
            path.display()
        )
    }

    /// Opens the one safetensors `file` of the checkpoint given as `path`.
    fn open_single(path: &Path, file: &Path, io: IoMode) -> Result<Self> {
        Self::single(path, Shard::open(file, io)?)
    }

    /// Reads an image of in-memory tensors as a checkpoint, validated as a file is; `label`
    /// stands for its path in messages (e.g. "tuned state dict").
    pub fn from_image(label: &Path, image: MemoryImage) -> Result<Self> {
        let storage = Storage::Memory(image.bytes);
        Self::single(label, Shard::validate(label, None, None, storage)?)
    }

    /// The checkpoint `path` of one validated shard.
    fn single(path: &Path, shard: Shard) -> Result<Self> {
        let tensors = shard_tensors(&shard, 0)?.into_iter().collect();
        Ok(Checkpoint {
            path: path.to_path_buf(),
            folder: shard.path != path,
            shards: vec![shard],
            tensors,
            hashes: None,
        })
    }

    /// Opens the shards that `index` lists, refusing an index that does not describe them
    /// exactly: every tensor in exactly one shard, the one the index names.
    fn open_index(dir: &Path, index: &Path, io: IoMode) -> Result<Self> {
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
            let shard = Shard::open(&path, io)?;
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
            folder: true,
            hashes: None,
        })
    }

    /// How the checkpoint's files are read: [`IoMode::Read`] when they are read by positional
    /// reads, else [`IoMode::Mmap`] (an in-memory image reads as mapped).
    pub fn io_mode(&self) -> IoMode {
        match self.shards.first().map(|s| &s.storage) {
            Some(Storage::Positional(..)) => IoMode::Read,
            _ => IoMode::Mmap,
        }
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
        self.folder
    }

    /// The tensors, in name order.
    pub fn tensors(&self) -> &BTreeMap<String, TensorInfo> {
        &self.tensors
    }

    /// A tensor's header entry.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// Tensor `name`, to read.
    pub fn tensor<'a>(&'a self, name: &str) -> Option<Tensor<'a>> {
        let (name, info) = self.tensors.get_key_value(name)?;
        Some(Tensor {
            ckpt: self,
            name,
            info,
            skip: 0,
        })
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
        self.shards.iter().map(|s| s.storage.len()).sum()
    }

    /// Fails if a file's size or modification time changed since it was opened: what was read
    /// may mix old and new contents, so an output built from it must not be committed.
    pub fn check_unchanged(&self) -> Result<()> {
        for s in &self.shards {
            let Some(stamp) = s.stamp else { continue };
            let meta = std::fs::metadata(&s.path).with_context(|| {
                format!("{}: input disappeared while being read", s.path.display())
            })?;
            if (meta.len(), meta.modified().ok()) != stamp {
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
                self.shards[k]
                    .key
                    .as_ref()
                    .and_then(|key| cache.lookup(key, &names))
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
    /// Fails where the tensor cannot be read.
    pub fn hash_of(&self, name: &str) -> Result<Option<[u8; 32]>> {
        let Some(tensor) = self.tensor(name) else {
            return Ok(None);
        };
        let shard = tensor.info().shard;
        let cached = self.hashes.as_ref();
        if let Some(h) = cached.and_then(|c| c.known[shard].get(name)) {
            return Ok(Some(*h));
        }
        let h = tensor.hash()?;
        if let Some(c) = cached {
            let mut fresh = c.fresh[shard].lock().unwrap_or_else(|e| e.into_inner());
            fresh.insert(name.to_string(), h);
        }
        Ok(Some(h))
    }

    /// The fingerprint of every tensor (docs/FORMAT.md section 7: BLAKE3 of the BLAKE3 of each
    /// tensor's bytes, in name order): a base's base fingerprint, a delta's
    /// `output_fingerprint`. Tensors hash on all threads.
    pub fn fingerprint(&self) -> Result<String> {
        use rayon::prelude::*;
        let hashes = self
            .tensors
            .par_iter()
            .map(|(name, _)| Ok(self.hash_of(name)?.expect("listed")))
            .collect::<Vec<Result<[u8; 32]>>>()
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        Ok(fingerprint(&hashes))
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
            let Some(key) = &s.key else { continue };
            let unchanged = std::fs::metadata(&s.path).is_ok_and(|m| FileKey::of(&m) == *key);
            if unchanged && all.len() == self.shard_tensor_names(k).len() {
                c.cache.store(key, c.attached, &all);
            }
        }
    }

    /// Asks the kernel to read ahead: the inputs are walked front to back.
    pub fn advise_sequential(&self) {
        for s in &self.shards {
            s.storage.advise_sequential();
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
    /// Opens `path` as `io` says and validates its header as the safetensors crate does.
    fn open(path: &Path, io: IoMode) -> Result<Self> {
        let (file, meta) = open_regular(path)?;
        let stamp = Some((meta.len(), meta.modified().ok()));
        let key = Some(FileKey::of(&meta));
        let storage = Storage::open(file, meta.len(), io).with_context(|| match io {
            IoMode::Mmap => format!("{}: cannot map", path.display()),
            IoMode::Read => format!("{}: cannot open", path.display()),
        })?;
        Self::validate(path, stamp, key, storage)
    }

    /// The shard of `storage` (the bytes of `path`), once its header is validated as the
    /// safetensors crate does.
    fn validate(
        path: &Path,
        stamp: Option<(u64, Option<std::time::SystemTime>)>,
        key: Option<FileKey>,
        storage: Storage,
    ) -> Result<Self> {
        let len = storage.len();
        let cannot_read = || format!("{}: cannot read the header", path.display());
        let invalid = |e: safetensors::SafeTensorError, detail: Option<String>| match detail {
            Some(d) => anyhow::anyhow!(
                "{}: not a valid safetensors file: {d} ({e})",
                path.display()
            ),
            None => anyhow::anyhow!("{}: not a valid safetensors file: {e}", path.display()),
        };
        let mut buf = Vec::new();
        let prefix = storage
            .bytes(0..len.min(8) as usize, &mut buf)
            .with_context(cannot_read)?;
        let n = header_len(prefix, len).map_err(|e| invalid(e, None))?;
        let json = storage.whole(8..8 + n).with_context(cannot_read)?;
        let header = parse_header(&json, len).map_err(|e| {
            // Name the tensor or key at fault where the header is readable JSON.
            let detail = duplicate_key(&json)
                .map(|k| format!("{k} appears twice in the header"))
                .or_else(|| diagnose_header(&json, len - 8 - n as u64));
            invalid(e, detail)
        })?;
        if let Some(dup) = duplicate_key(&json) {
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
                (
                    name,
                    info.dtype,
                    info.shape.clone(),
                    data_start + s..data_start + e,
                )
            })
            .collect();
        Ok(Shard {
            path: path.to_path_buf(),
            stamp,
            key,
            storage,
            metadata: header.metadata().clone().unwrap_or_default(),
            header: tensors,
        })
    }
}

/// The tensors of one validated file, as entries of shard `k`. Registers the file's mapping,
/// if it is mapped, for the SIGBUS handler: only now, once the header is known valid, so that a
/// rejected file leaves no entry behind (the entry goes when the shard drops).
fn shard_tensors(shard: &Shard, k: usize) -> Result<Vec<(String, TensorInfo)>> {
    let tensors = shard
        .header
        .iter()
        .map(|(name, dtype, shape, range)| {
            let entry = TensorInfo {
                dtype: *dtype,
                shape: shape.clone(),
                range: range.clone(),
                shard: k,
            };
            (name.clone(), entry)
        })
        .collect();
    if let Some((start, len)) = shard.storage.mapping() {
        process::register_mapping(start, len, &shard.path);
    }
    Ok(tensors)
}

impl Drop for Shard {
    fn drop(&mut self) {
        // The mapping goes away: the SIGBUS handler must forget it.
        if let Some((start, _)) = self.storage.mapping() {
            process::forget_mapping(start);
        }
    }
}

/// One tensor of a checkpoint, to read: [`Tensor::read`] a byte range into a reused buffer,
/// [`Tensor::for_each_piece`] to walk it, [`Tensor::whole`] when all of it is needed at once.
/// Under `--io mmap` every read borrows from the map; under `--io read` it is a positional
/// read. A read that fails (an I/O error, a file truncated since it was opened) names the file
/// and the tensor.
#[derive(Clone, Copy)]
pub struct Tensor<'a> {
    ckpt: &'a Checkpoint,
    name: &'a str,
    info: &'a TensorInfo,
    /// Bytes of the tensor's data before this view's ([`Tensor::tail`]).
    skip: usize,
}

impl std::fmt::Debug for Tensor<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?} of {})", self.name, self.path().display())
    }
}

impl<'a> Tensor<'a> {
    /// The tensor's name.
    pub fn name(&self) -> &'a str {
        self.name
    }

    /// Its header entry.
    pub fn info(&self) -> &'a TensorInfo {
        self.info
    }

    /// Its data length in bytes (of the view, after [`Tensor::tail`]).
    pub fn len(&self) -> usize {
        self.info.range.len() - self.skip
    }

    /// The view of its bytes from byte `at` on: the new rows of a grown tensor, read as a
    /// tensor of their own (docs/FORMAT.md section 12). `info` stays the whole tensor's.
    pub fn tail(self, at: usize) -> Tensor<'a> {
        assert!(
            at <= self.len(),
            "a tail past the end of tensor {}",
            self.name
        );
        Tensor {
            skip: self.skip + at,
            ..self
        }
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The file that holds it.
    fn path(&self) -> &'a Path {
        &self.ckpt.shards[self.info.shard].path
    }

    fn storage(&self) -> &'a Storage {
        &self.ckpt.shards[self.info.shard].storage
    }

    /// The file range of bytes `range` of the tensor.
    fn in_file(&self, range: Range<usize>) -> Range<usize> {
        debug_assert!(range.start <= range.end && range.end <= self.len());
        let at = self.info.range.start + self.skip;
        at + range.start..at + range.end
    }

    /// The error of a failed read, naming the file and the tensor.
    fn failed(&self, e: std::io::Error) -> anyhow::Error {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            anyhow::anyhow!(
                "{}: tensor {}: the file ended before the tensor's data did: it was truncated while being read; nothing was written",
                self.path().display(),
                self.name
            )
        } else {
            anyhow::anyhow!(
                "{}: tensor {}: cannot read: {e}",
                self.path().display(),
                self.name
            )
        }
    }

    /// Bytes `range` of the tensor's data: borrowed from the map, or read into `buf` (resized
    /// to fit; reuse it from call to call).
    pub fn read<'b>(&self, range: Range<usize>, buf: &'b mut Vec<u8>) -> Result<&'b [u8]>
    where
        'a: 'b,
    {
        self.storage()
            .bytes(self.in_file(range), buf)
            .map_err(|e| self.failed(e))
    }

    /// Fills `dst` with the tensor's bytes from byte `at` on.
    pub fn read_into(&self, at: usize, dst: &mut [u8]) -> Result<()> {
        let range = self.in_file(at..at + dst.len());
        self.storage()
            .read_into(range.start, dst)
            .map_err(|e| self.failed(e))
    }

    /// The whole tensor at once: borrowed from the map, or read into a new buffer. For readers
    /// that hold the tensor whole anyway (in f64, several times its size).
    pub fn whole(&self) -> Result<Cow<'a, [u8]>> {
        self.storage()
            .whole(self.in_file(0..self.len()))
            .map_err(|e| self.failed(e))
    }

    /// Calls `f(at, piece)` for the tensor's bytes in order, in pieces of at most [`PIECE`]
    /// bytes (`at` the piece's offset), through one reused buffer.
    pub fn for_each_piece(&self, mut f: impl FnMut(usize, &[u8]) -> Result<()>) -> Result<()> {
        with_buffer(|buf| {
            let mut at = 0;
            while at < self.len() {
                let end = self.len().min(at + PIECE);
                f(at, self.read(at..end, buf)?)?;
                at = end;
            }
            Ok(())
        })
    }

    /// The BLAKE3 digest of its bytes ([`tensor_hash`]), read piece by piece.
    pub fn hash(&self) -> Result<[u8; 32]> {
        let mut h = blake3::Hasher::new();
        self.for_each_piece(|_, piece| {
            hash_update(&mut h, piece);
            Ok(())
        })?;
        Ok(*h.finalize().as_bytes())
    }

    /// Whether `other` holds the same bytes, compared piece by piece up to the first
    /// difference.
    pub fn same_bytes(&self, other: &Tensor) -> Result<bool> {
        Ok(self.len() == other.len() && self.starts_with(other)?)
    }

    /// Whether the tensor's bytes begin with all of `prefix`'s (a grown tensor's rows that
    /// its base has), compared piece by piece up to the first difference.
    pub fn starts_with(&self, prefix: &Tensor) -> Result<bool> {
        let (other, len) = (prefix, prefix.len());
        if self.len() < len {
            return Ok(false);
        }
        let mut same = true;
        with_buffer(|buf| {
            let mut at = 0;
            while same && at < len {
                let end = len.min(at + PIECE);
                let theirs = other.read(at..end, buf)?;
                with_buffer(|mine| -> Result<()> {
                    same = self.read(at..end, mine)? == theirs;
                    Ok(())
                })?;
                at = end;
            }
            Ok(same)
        })
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
    hash_update(&mut h, data);
    *h.finalize().as_bytes()
}

/// Adds `data` to `h`, on all threads when it is large. BLAKE3 gives the same digest however
/// the input is split between calls.
fn hash_update(h: &mut blake3::Hasher, data: &[u8]) {
    if data.len() >= 1 << 20 {
        h.update_rayon(data);
    } else {
        h.update(data);
    }
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
