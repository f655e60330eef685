//! Checkpoint I/O: memory-mapped safetensors inputs, and outputs written through a temporary
//! file that is renamed into place only when complete.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde_json::json;

/// One tensor's header entry.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    /// Element type.
    pub dtype: Dtype,
    /// Shape, row-major.
    pub shape: Vec<usize>,
    /// Byte range of the data, relative to the file start.
    pub range: std::ops::Range<usize>,
}

impl TensorInfo {
    /// Number of elements (1 for a 0-d tensor).
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
}

/// A safetensors file, memory-mapped and validated.
pub struct Checkpoint {
    path: PathBuf,
    /// Size and modification time when opened, to notice a file changed while it was read.
    stamp: (u64, Option<std::time::SystemTime>),
    mmap: Mmap,
    tensors: BTreeMap<String, TensorInfo>,
    metadata: HashMap<String, String>,
}

impl Checkpoint {
    /// Maps and validates `path`. The data is not read; pages come in as they are touched.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        if file.metadata()?.is_dir() {
            bail!(
                "{}: is a folder; folder checkpoints are not supported yet, pass the .safetensors file",
                path.display()
            );
        }
        let meta = file.metadata()?;
        let stamp = (meta.len(), meta.modified().ok());
        // SAFETY: the map is read-only. A file truncated by another process while mapped makes
        // reads fault with SIGBUS, which `install_fault_handler` turns into exit status 1.
        let mmap = unsafe { Mmap::map(&file) }
            .with_context(|| format!("{}: cannot map", path.display()))?;
        let (n, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| {
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
        if let Some(dup) = duplicate_key(&mmap[8..8 + n]) {
            bail!(
                "{}: not a valid safetensors file: {dup} appears twice in the header",
                path.display()
            );
        }
        let data_start = 8 + n;
        let mut tensors = BTreeMap::new();
        for (name, info) in meta.tensors() {
            let (s, e) = info.data_offsets;
            tensors.insert(
                name,
                TensorInfo {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    range: data_start + s..data_start + e,
                },
            );
        }
        // Registered only once valid: a rejected file must not leave an entry behind (the
        // entry is removed when the Checkpoint drops).
        if let Ok(mut maps) = MAPS.lock() {
            maps.push((mmap.as_ptr() as usize, mmap.len(), c_path(path)));
        }
        Ok(Checkpoint {
            path: path.to_path_buf(),
            stamp,
            mmap,
            tensors,
            metadata: meta.metadata().clone().unwrap_or_default(),
        })
    }

    /// The file's path, for messages.
    pub fn path(&self) -> &Path {
        &self.path
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
        &self.mmap[info.range.clone()]
    }

    /// The `__metadata__` map (empty when absent).
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// The file's size in bytes.
    pub fn file_len(&self) -> u64 {
        self.mmap.len() as u64
    }

    /// Fails if the file's size or modification time changed since it was opened: what was
    /// read may mix old and new contents, so an output built from it must not be committed.
    pub fn check_unchanged(&self) -> Result<()> {
        let meta = std::fs::metadata(&self.path).with_context(|| {
            format!(
                "{}: input disappeared while being read",
                self.path.display()
            )
        })?;
        if (meta.len(), meta.modified().ok()) != self.stamp {
            bail!(
                "{}: the file changed while it was being read; nothing was written. Run again on a stable file",
                self.path.display()
            );
        }
        Ok(())
    }

    /// Asks the kernel to read ahead: the inputs are walked front to back.
    pub fn advise_sequential(&self) {
        let _ = self.mmap.advise(memmap2::Advice::Sequential);
    }
}

/// The first key that appears twice in the JSON object `json`, or inside its `__metadata__`
/// object (reported as `__metadata__.KEY`), if any. serde_json keeps the last of duplicate keys
/// without a word, which would hide a tensor or a setting; readers must refuse them.
pub fn duplicate_key(json: &[u8]) -> Option<String> {
    struct Dup(Option<String>);
    impl<'de> serde::Deserialize<'de> for Dup {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Dup;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut m: A,
                ) -> Result<Dup, A::Error> {
                    let mut seen = std::collections::HashSet::new();
                    let mut dup = None;
                    while let Some(k) = m.next_key::<String>()? {
                        if k == "__metadata__" {
                            // A non-object is left to the real parser's error.
                            if let Ok(Dup(Some(inner))) = m.next_value::<Dup>() {
                                dup = dup.or(Some(format!("__metadata__.{inner}")));
                            }
                        } else {
                            m.next_value::<serde::de::IgnoredAny>()?;
                        }
                        if !seen.insert(k.clone()) {
                            dup = dup.or(Some(k));
                        }
                    }
                    Ok(Dup(dup))
                }
            }
            d.deserialize_map(V)
        }
    }
    serde_json::from_slice::<Dup>(json).ok().and_then(|d| d.0)
}

/// Why the safetensors header `json` (followed by `data_len` bytes) is invalid, naming the
/// tensor or metadata key at fault: the safetensors crate's own errors do not name them.
fn diagnose_header(json: &[u8], data_len: u64) -> Option<String> {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(json) else {
        return None;
    };
    let mut spans = Vec::new();
    for (name, v) in &map {
        if name == "__metadata__" {
            if let Some((k, _)) = v
                .as_object()
                .and_then(|o| o.iter().find(|(_, v)| !v.is_string()))
            {
                return Some(format!("__metadata__.{k} is not a string"));
            }
            continue;
        }
        let info: safetensors::tensor::TensorInfo = match serde_json::from_value(v.clone()) {
            Ok(i) => i,
            Err(e) => return Some(format!("tensor {name}: {e}")),
        };
        let bits = info
            .shape
            .iter()
            .try_fold(info.dtype.bitsize() as u64, |a, &d| a.checked_mul(d as u64));
        let Some(bits) = bits else {
            return Some(format!("tensor {name}: shape {:?} overflows", info.shape));
        };
        let (s, e) = (info.data_offsets.0 as u64, info.data_offsets.1 as u64);
        if e < s || e > data_len {
            return Some(format!(
                "tensor {name}: data offsets [{s}, {e}) are outside the {data_len} data bytes"
            ));
        }
        if bits.div_ceil(8) != e - s {
            return Some(format!(
                "tensor {name}: {:?} {:?} needs {} bytes, its offsets span {}",
                info.dtype,
                info.shape,
                bits.div_ceil(8),
                e - s
            ));
        }
        spans.push((s, e, name));
    }
    spans.sort();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return Some(format!("tensors {} and {} overlap", w[0].2, w[1].2));
        }
    }
    None
}

/// The header JSON of a safetensors buffer and the length of the data after it, when the
/// length prefix is sane.
fn header_span(buf: &[u8]) -> Option<(&[u8], u64)> {
    let n = u64::from_le_bytes(buf.get(..8)?.try_into().ok()?);
    let end = 8usize.checked_add(usize::try_from(n).ok()?)?;
    Some((buf.get(8..end)?, (buf.len() - end) as u64))
}

impl Drop for Checkpoint {
    fn drop(&mut self) {
        // The mapping goes away: the SIGBUS handler must forget it.
        let start = self.mmap.as_ptr() as usize;
        if let Ok(mut maps) = MAPS.lock() {
            maps.retain(|(s, _, _)| *s != start);
        }
    }
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

/// A tensor to be written: name, dtype, shape and byte length.
#[derive(Clone, Debug)]
pub struct OutTensor {
    /// Tensor key.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Data length in bytes.
    pub len: u64,
}

/// Whether outputs are flushed to disk before they are renamed into place (`--no-sync` clears
/// it). A process-wide I/O policy, set once by the command line.
static DURABLE: AtomicBool = AtomicBool::new(true);

/// Sets whether outputs are flushed to disk (fsync) before the rename. Without it, a crash of
/// the process still leaves no partial file at the output path, but a power loss may.
pub fn set_durable(durable: bool) {
    DURABLE.store(durable, Ordering::Relaxed);
}

/// Temporary files being written, for the signal handlers to remove. C strings, so that a
/// handler can unlink them without allocating.
static PARTIALS: Mutex<Vec<CString>> = Mutex::new(Vec::new());

/// Mapped input files (start address, length, path), so that a SIGBUS can name its file.
static MAPS: Mutex<Vec<(usize, usize, CString)>> = Mutex::new(Vec::new());

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap_or_default()
}

/// Removes every partial output of this process (called on SIGINT, SIGTERM and SIGBUS). Uses
/// only `try_lock` and `unlink`, so it is safe in a signal handler.
pub fn remove_partial_outputs() {
    if let Ok(list) = PARTIALS.try_lock() {
        for p in list.iter() {
            // SAFETY: a valid NUL-terminated path; unlink is async-signal-safe.
            unsafe { libc::unlink(p.as_ptr()) };
        }
    }
}

fn forget_partial(path: &Path) {
    let c = c_path(path);
    if let Ok(mut list) = PARTIALS.lock() {
        list.retain(|p| *p != c);
    }
}

/// Installs the SIGBUS handler: reading a memory-mapped input that another process truncated
/// faults, and instead of dying with a signal the process removes its partial outputs, names
/// the file and exits with status 1.
pub fn install_fault_handler() {
    extern "C" fn on_sigbus(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
        // SAFETY: the kernel passes a valid siginfo; only async-signal-safe calls follow
        // (try_lock never blocks, write, unlink, _exit).
        unsafe {
            let addr = (*info).si_addr() as usize;
            let say = |b: &[u8]| {
                libc::write(2, b.as_ptr().cast(), b.len());
            };
            say(b"sotu-delta: error: ");
            if let Ok(maps) = MAPS.try_lock()
                && let Some((_, _, path)) = maps.iter().find(|(s, l, _)| addr >= *s && addr < s + l)
            {
                say(path.as_bytes());
                say(b": ");
            }
            say(b"an input file was truncated while it was being read; nothing was written\n");
            remove_partial_outputs();
            libc::_exit(1);
        }
    }
    // SAFETY: installs a handler with SA_SIGINFO and an empty mask; the handler is above.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigbus as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
    }
}

/// An output safetensors file being written: the header is final, data goes in by positional
/// writes from any thread, and the file appears at its path only on [`Output::commit`].
pub struct Output {
    /// `None` once committed.
    tmp: Option<tempfile::NamedTempFile>,
    dest: PathBuf,
    offsets: HashMap<String, u64>,
    total: u64,
}

impl Output {
    /// Creates the temporary file beside `dest` and writes the header for `tensors`, whose data
    /// is laid out in the given order without gaps.
    pub fn create(
        dest: &Path,
        tensors: &[OutTensor],
        metadata: &BTreeMap<String, String>,
    ) -> Result<Self> {
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), json!(metadata));
        let mut offsets = HashMap::new();
        let mut pos = 0u64;
        for t in tensors {
            header.insert(
                t.name.clone(),
                json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [pos, pos + t.len]}),
            );
            offsets.insert(t.name.clone(), pos);
            pos += t.len;
        }
        let mut hbytes = serde_json::to_vec(&header)?;
        // Pad with spaces so the data starts 8-byte aligned, as the safetensors writer does.
        while (hbytes.len() + 8) % 8 != 0 {
            hbytes.push(b' ');
        }
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let tmp = tempfile::Builder::new()
            .prefix(".sotu-delta-partial-")
            // The usual mode of a new file (0666 less the umask), not tempfile's private 0600.
            .permissions(std::fs::Permissions::from_mode(0o666))
            .tempfile_in(&dir)
            .with_context(|| {
                format!(
                    "{}: cannot create a temporary file in {}",
                    dest.display(),
                    dir.display()
                )
            })?;
        let data_start = 8 + hbytes.len() as u64;
        let total = data_start + pos;
        let file = tmp.as_file();
        let io =
            |r: std::io::Result<()>| r.with_context(|| format!("{}: cannot write", dest.display()));
        io(file.set_len(total))?;
        io(file.write_all_at(&(hbytes.len() as u64).to_le_bytes(), 0))?;
        io(file.write_all_at(&hbytes, 8))?;
        let offsets = offsets
            .into_iter()
            .map(|(k, v)| (k, v + data_start))
            .collect();
        if let Ok(mut list) = PARTIALS.lock() {
            list.push(c_path(tmp.path()));
        }
        Ok(Output {
            tmp: Some(tmp),
            dest: dest.to_path_buf(),
            offsets,
            total,
        })
    }

    /// Writes `bytes` at byte `at` of tensor `name`'s data.
    pub fn write(&self, name: &str, at: u64, bytes: &[u8]) -> Result<()> {
        let base = self.offsets[name];
        self.file()
            .write_all_at(bytes, base + at)
            .with_context(|| format!("{}: cannot write tensor {name}", self.dest.display()))
    }

    /// The final file size.
    pub fn total_len(&self) -> u64 {
        self.total
    }

    fn file(&self) -> &File {
        self.tmp.as_ref().expect("not yet committed").as_file()
    }

    /// Flushes to disk and renames the file into place.
    pub fn commit(mut self) -> Result<()> {
        let dest = self.dest.clone();
        if DURABLE.load(Ordering::Relaxed) {
            self.file()
                .sync_all()
                .with_context(|| format!("{}: cannot flush", dest.display()))?;
        }
        let tmp = self.tmp.take().expect("not yet committed");
        let path = tmp.path().to_path_buf();
        let persisted = tmp.persist(&dest);
        forget_partial(&path);
        persisted.map_err(|e| {
            anyhow::anyhow!("{}: cannot rename into place: {}", dest.display(), e.error)
        })?;
        Ok(())
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        // An uncommitted output: NamedTempFile deletes the file as it drops.
        if let Some(tmp) = &self.tmp {
            forget_partial(tmp.path());
        }
    }
}

/// Refuses an output path that names one of the inputs, directly, through a link, or as a hard
/// link of the same file.
pub fn refuse_output_over_input(output: &Path, inputs: &[&Path]) -> Result<()> {
    let Ok(out_meta) = std::fs::metadata(output) else {
        return Ok(()); // nothing there yet, so it cannot be an input
    };
    for input in inputs {
        if let Ok(m) = std::fs::metadata(input)
            && m.dev() == out_meta.dev()
            && m.ino() == out_meta.ino()
        {
            bail!(
                "{}: the output path is the input {}; refusing to overwrite an input",
                output.display(),
                input.display()
            );
        }
    }
    Ok(())
}

/// Writes a whole safetensors file from in-memory tensors (name, dtype, shape, data), through
/// the same atomic [`Output`] path as every other output. For fixtures, tests and benchmarks.
pub fn write_file(
    path: &Path,
    tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut sorted: Vec<&(String, Dtype, Vec<usize>, Vec<u8>)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let layout: Vec<OutTensor> = sorted
        .iter()
        .map(|(name, dtype, shape, data)| OutTensor {
            name: name.clone(),
            dtype: *dtype,
            shape: shape.clone(),
            len: data.len() as u64,
        })
        .collect();
    let out = Output::create(path, &layout, metadata)?;
    for (name, _, _, data) in sorted {
        out.write(name, 0, data)?;
    }
    out.commit()
}
