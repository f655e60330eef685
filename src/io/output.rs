//! Checkpoint output: one safetensors file, or a Hugging Face model folder of shards with an
//! index. Either way the data goes in by positional writes from any thread, and nothing
//! appears at the output path until everything is written: a file is written as a temporary
//! sibling and renamed, a folder is built in a temporary sibling folder and renamed.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use safetensors::Dtype;
use serde_json::json;

use super::checkpoint::{INDEX_NAME, SINGLE_NAME, Tensor};
use super::companions::{companions, copy_companions, is_weight_file};

use super::layout::{MAX_HEADER_BYTES, OutTensor, header, pack};
use super::place::{place_folder, refuse_to_replace, sync_folder};
use super::process;
use super::storage::{PIECE, with_buffer};
use super::target::Target;

/// The most shard files of an output open at once. Writes go through the shards in order, so a
/// few are open at a time in practice; a file closed here is opened again if it is written
/// again. A folder of thousands of shards thus never runs out of file descriptors.
const MAX_OPEN_SHARDS: usize = 8;

/// Where an operation puts its output bytes: positional writes into named tensors, from any
/// thread, each tensor's length fixed by the layout given when the sink was made. [`Output`]
/// writes files; [`MemoryOutput`](super::memory::MemoryOutput) keeps the tensors in memory.
pub trait Sink: Sync {
    /// Writes `bytes` at byte `at` of tensor `name`'s data.
    fn write(&self, name: &str, at: u64, bytes: &[u8]) -> Result<()>;

    /// Writes the whole of input tensor `src` as tensor `name`, unchanged: its pieces of
    /// [`PIECE`] bytes read and written on all threads, each through a reused buffer.
    fn copy_tensor(&self, name: &str, src: Tensor) -> Result<()> {
        self.copy_from(name, src, 0..src.len())
    }

    /// Writes bytes `range` of input tensor `src` as tensor `name` (from its start), as
    /// [`Sink::copy_tensor`] does.
    fn copy_from(&self, name: &str, src: Tensor, range: std::ops::Range<usize>) -> Result<()> {
        use rayon::prelude::*;
        (0..range.len().div_ceil(PIECE))
            .into_par_iter()
            .try_for_each(|k| {
                with_buffer(|buf| {
                    let at = range.start + k * PIECE;
                    let bytes = src.read(at..range.end.min(at + PIECE), buf)?;
                    self.write(name, (k * PIECE) as u64, bytes)
                })
            })
    }
}

/// The temporary form of an output until it is committed.
enum Staging {
    File(tempfile::NamedTempFile),
    Folder(tempfile::TempDir),
}

impl Staging {
    /// A temporary file, or a temporary folder with the names of its `shards` shard files,
    /// beside `target.path`, registered for removal should the process be stopped.
    fn create(target: &Target, shards: usize) -> Result<(Staging, Vec<PathBuf>)> {
        let dir = staging_dir(&target.path);
        let cannot_create = || cannot_create(target);
        if target.is_folder() {
            let tmp = process::create_tracked(
                process::Partial::Dir,
                || {
                    tempfile::Builder::new()
                        .prefix(process::PARTIAL_PREFIX)
                        .permissions(std::fs::Permissions::from_mode(0o777))
                        .tempdir_in(&dir)
                },
                |t| t.path().to_path_buf(),
            )
            .with_context(cannot_create)?;
            let names = (1..=shards)
                .map(|i| match shards {
                    1 => PathBuf::from(SINGLE_NAME),
                    n => PathBuf::from(format!("model-{i:05}-of-{n:05}.safetensors")),
                })
                .collect();
            Ok((Staging::Folder(tmp), names))
        } else {
            let tmp = process::create_tracked(
                process::Partial::File,
                || {
                    tempfile::Builder::new()
                        .prefix(process::PARTIAL_PREFIX)
                        // The usual mode of a new file (0666 less the umask), not tempfile's 0600.
                        .permissions(std::fs::Permissions::from_mode(0o666))
                        .tempfile_in(&dir)
                },
                |t| t.path().to_path_buf(),
            )
            .with_context(cannot_create)?;
            Ok((Staging::File(tmp), vec![]))
        }
    }
}

/// A temporary file in `dir` for part file `to`, registered for removal should the process
/// be stopped before [`persist_part_temp`] renames it into place.
fn part_temp(dir: &Path, to: &Path) -> Result<tempfile::NamedTempFile> {
    process::create_tracked(
        process::Partial::File,
        || {
            tempfile::Builder::new()
                .prefix(process::PARTIAL_PREFIX)
                .tempfile_in(dir)
        },
        |t| t.path().to_path_buf(),
    )
    .with_context(|| format!("{}: cannot create", to.display()))
}

/// Renames a [`part_temp`] file to `to` and forgets it.
fn persist_part_temp(tmp: tempfile::NamedTempFile, to: &Path) -> Result<()> {
    let staged = tmp.path().to_path_buf();
    let kept = tmp.persist(to);
    process::untrack_file(&staged);
    kept.map(drop)
        .map_err(|e| anyhow::anyhow!("{}: cannot rename into place: {}", to.display(), e.error))
}

/// The folder the temporary form of output `dest` is made in: the output's own.
fn staging_dir(dest: &Path) -> PathBuf {
    match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The error context of a failure to create any part of `target`'s temporary form.
fn cannot_create(target: &Target) -> String {
    format!(
        "{}: cannot create a temporary {} in {}",
        target.path.display(),
        if target.is_folder() { "folder" } else { "file" },
        staging_dir(&target.path).display()
    )
}

/// A progress bar of `bytes` to write, drawn only when stderr is a terminal: a pipe or file
/// sees nothing.
fn progress_bar(bytes: u64) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(bytes), ProgressDrawTarget::stderr_with_hz(4));
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {bytes}/{total_bytes} written [{wide_bar}] {binary_bytes_per_sec}, ETA {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar
}

/// One file of the output, open only while it is being written (see [`MAX_OPEN_SHARDS`]).
struct Shard {
    /// Where it is written until the commit: in the temporary folder, or the temporary file.
    staged: PathBuf,
    /// Final path.
    path: PathBuf,
    /// The file, while it is open. Held for each write: concurrent writes to one file
    /// serialize on the kernel's inode lock anyway, and a thread waiting there spins (measured:
    /// 7–13% of a merge's CPU time, and a slower copy for the thread that holds it); waiting
    /// here sleeps.
    file: Mutex<Option<File>>,
}

/// An output checkpoint being written: headers are final from the start, data goes in by
/// positional writes from any thread, and the output appears at its path only on
/// [`Output::commit`]. Dropped uncommitted, it leaves nothing behind.
pub struct Output {
    /// `None` once committed.
    staging: Option<Staging>,
    target: Target,
    shards: Vec<Shard>,
    /// The shards whose file is open, in the order they were opened.
    open: Mutex<VecDeque<usize>>,
    /// Tensor name → (shard, absolute offset of its data in the shard file, length).
    place: HashMap<String, (usize, u64, u64)>,
    /// The index JSON of a sharded folder.
    index: Option<Vec<u8>>,
    /// Files written into a folder output beside the shards, over any copied file of the same
    /// name ([`Output::add_file`]).
    own_files: BTreeMap<String, Vec<u8>>,
    /// Files in subfolders written into the temporary folder by the tool, over the files of
    /// the same paths that would be copied ([`Output::stage_file`]).
    staged_files: Vec<PathBuf>,
    /// BLAKE3 of every shard's name and header, for the whole output (all parts).
    layout: String,
    /// Shards of the whole output (all parts).
    total_shards: usize,
    total: u64,
    progress: ProgressBar,
}

/// What a committed output holds.
#[derive(Clone, Debug)]
pub struct Written {
    /// The size of its safetensors files.
    pub bytes: u64,
    /// Its files, in place: the safetensors files, then the index and copied files of a folder.
    pub files: Vec<PathBuf>,
    /// Its fingerprint, when asked for.
    pub fingerprint: Option<String>,
}

impl Output {
    /// Creates the temporary output beside `target.path` and writes the headers of `tensors`
    /// (in the given order, which is the order of the data in the files). Every file gets
    /// `metadata` as its `__metadata__`.
    pub fn create(
        target: &Target,
        tensors: &[OutTensor],
        metadata: &BTreeMap<String, String>,
    ) -> Result<Self> {
        let dest = &target.path;
        if target.is_folder() {
            refuse_to_replace(dest)?;
        }
        let groups = if target.is_folder() {
            pack(tensors, target.shard_size)
        } else {
            std::iter::once(0..tensors.len()).collect()
        };
        let (staging, names) = Staging::create(target, groups.len())?;
        let cannot_create = || cannot_create(target);

        let mut out = Output {
            staging: Some(staging),
            target: target.clone(),
            shards: Vec::new(),
            open: Mutex::default(),
            place: HashMap::new(),
            index: None,
            own_files: BTreeMap::new(),
            staged_files: Vec::new(),
            layout: String::new(),
            total_shards: 0,
            total: 0,
            progress: ProgressBar::hidden(),
        };
        let mut weight_map = BTreeMap::new();
        let mut data_bytes = 0u64;
        let mut layout = blake3::Hasher::new();
        let total_shards = groups.len();
        for (k, group) in groups.into_iter().enumerate() {
            let ts = &tensors[group];
            let (head, offsets, metadata_len) = header(ts, metadata)?;
            let name = names.get(k).map(|n| n.to_string_lossy().into_owned());
            let path = name.as_ref().map_or(dest.clone(), |n| dest.join(n));
            if head.len() - 8 > MAX_HEADER_BYTES {
                bail!(
                    "{}: its safetensors header would be {} bytes, over the limit of {MAX_HEADER_BYTES} bytes that safetensors readers (this tool's too) accept: {} tensors, and {metadata_len} bytes of __metadata__ (in every shard of a folder); nothing was written",
                    path.display(),
                    head.len() - 8,
                    ts.len()
                );
            }
            // What every part of a merge must agree on: each shard's name and header.
            layout.update(name.as_deref().unwrap_or_default().as_bytes());
            layout.update(&head);
            if let Some(n) = &name {
                for t in ts {
                    weight_map.insert(t.name.clone(), n.clone());
                }
            }
            let len = head.len() as u64 + ts.iter().map(|t| t.len).sum::<u64>();
            if !target.part.is_none_or(|p| p.holds(k, total_shards)) {
                continue;
            }
            let (file, staged) = match out.staging.as_ref().unwrap() {
                Staging::File(tmp) => (
                    tmp.as_file().try_clone().with_context(cannot_create)?,
                    tmp.path().to_path_buf(),
                ),
                Staging::Folder(tmp) => {
                    let staged = tmp.path().join(&names[k]);
                    let file = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&staged)
                        .with_context(cannot_create)?;
                    process::track_file(&staged);
                    (file, staged)
                }
            };
            let io = |r: std::io::Result<()>| {
                r.with_context(|| format!("{}: cannot write", path.display()))
            };
            io(file.set_len(len))?;
            io(file.write_all_at(&head, 0))?;
            for (t, off) in ts.iter().zip(offsets) {
                out.place
                    .insert(t.name.clone(), (out.shards.len(), off, t.len));
                data_bytes += t.len;
            }
            out.total += len;
            // The one file of a file output stays open; a folder's shard is opened again
            // when it is written.
            let single = matches!(out.staging, Some(Staging::File(_)));
            out.shards.push(Shard {
                staged,
                path,
                file: Mutex::new(single.then_some(file)),
            });
        }
        out.layout = layout.finalize().to_hex().to_string();
        out.total_shards = total_shards;
        if total_shards > 1 {
            let total: u64 = tensors.iter().map(|t| t.len).sum();
            let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
            out.index = Some(serde_json::to_vec_pretty(&index)?);
        }
        if target.progress {
            out.progress = progress_bar(data_bytes);
        }
        Ok(out)
    }

    /// Adds the file `name` (a plain file name) with `bytes` to a folder output, written at the
    /// commit beside the shards and over a file of that name copied from `Target::copy_from`:
    /// the fine-tune's own files of a delta (docs/FORMAT.md section 13).
    pub fn add_file(&mut self, name: &str, bytes: Vec<u8>) -> Result<()> {
        let dest = self.target.path.display();
        if !self.target.is_folder() {
            bail!("{dest}: a single-file output cannot hold the file {name}");
        }
        let plain = matches!(
            Path::new(name).components().collect::<Vec<_>>()[..],
            [std::path::Component::Normal(_)]
        );
        if !plain || is_weight_file(name) || name.starts_with(process::PARTIAL_PREFIX) {
            bail!("{dest}: {name:?} is not a file name an output folder may be given");
        }
        self.own_files.insert(name.to_string(), bytes);
        Ok(())
    }

    /// Where to write the file at `rel` (a path inside a subfolder: a merged subfolder weight
    /// file, docs/FORMAT.md section 15) so that it becomes part of this folder output: its
    /// folders are made in the temporary folder, and the file copied from `Target::copy_from`
    /// at that path, if any, is left out. Whatever is written there goes with the output if it
    /// is not committed.
    pub fn stage_file(&mut self, rel: &str) -> Result<PathBuf> {
        let dest = self.target.path.display();
        let inside = Path::new(rel)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        let dir = match &self.staging {
            Some(Staging::Folder(tmp)) if inside && self.target.part.is_none() => {
                tmp.path().to_path_buf()
            }
            _ => bail!("{dest}: cannot hold the file {rel}"),
        };
        let mut at = dir.clone();
        let parts: Vec<_> = Path::new(rel).components().collect();
        for c in &parts[..parts.len() - 1] {
            at.push(c);
            match std::fs::create_dir(&at) {
                Ok(()) => process::track_dir(&at),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("{}: cannot create", self.target.path.join(rel).display())
                    });
                }
            }
        }
        let path = dir.join(rel);
        process::track_file(&path);
        self.staged_files.push(PathBuf::from(rel));
        Ok(path)
    }

    /// Whether this output writes tensor `name` (all of them, but in a part of a merge).
    pub fn holds(&self, name: &str) -> bool {
        self.place.contains_key(name)
    }

    /// Whether `file` (relative to the folder) is one of the [`Output::add_file`] files.
    fn is_added(&self, file: &Path) -> bool {
        self.own_files.keys().any(|a| Path::new(a) == file)
            || self.staged_files.iter().any(|s| s == file)
    }

    /// Runs `op` on shard `k`'s file, holding it (writers of the shard wait their turn), and
    /// opening it first if it is closed.
    fn with_file<T>(
        &self,
        k: usize,
        op: impl FnOnce(&File) -> std::io::Result<T>,
    ) -> std::io::Result<T> {
        let shard = &self.shards[k];
        let mut file = shard.file.lock().unwrap_or_else(|e| e.into_inner());
        if file.is_none() {
            // Readable too: `fingerprint` reads the data back.
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&shard.staged)?;
            *file = Some(f);
            self.opened(k);
        }
        op(file.as_ref().unwrap())
    }

    /// Records that shard `k` was opened, and closes the shards opened longest ago beyond
    /// [`MAX_OPEN_SHARDS`], except those being written this moment (they are only tried, so
    /// two threads never wait for each other here).
    fn opened(&self, k: usize) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.push_back(k);
        let mut tries = open.len();
        while open.len() > MAX_OPEN_SHARDS && tries > 0 {
            tries -= 1;
            let j = open.pop_front().expect("longer than the limit");
            match self.shards[j].file.try_lock() {
                Ok(mut f) if j != k => *f = None,
                Err(std::sync::TryLockError::Poisoned(e)) if j != k => *e.into_inner() = None,
                _ => open.push_back(j),
            }
        }
    }

    /// Closes every shard file, after an fsync when `sync`: at most one descriptor more is open
    /// meanwhile.
    fn close_all(&self, sync: bool) -> Result<()> {
        for (k, s) in self.shards.iter().enumerate() {
            if sync {
                self.with_file(k, File::sync_all)
                    .with_context(|| format!("{}: cannot flush", s.path.display()))?;
            }
            *s.file.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        self.open.lock().unwrap_or_else(|e| e.into_inner()).clear();
        Ok(())
    }

    /// The fingerprint of what was written (docs/FORMAT.md section 7: BLAKE3 over the BLAKE3
    /// digests of every tensor's data, in name order), read back from the page cache: what a
    /// later `verify` or `extract` against this output computes as its base fingerprint.
    fn fingerprint(&self) -> Result<String> {
        let mut names: Vec<&String> = self.place.keys().collect();
        names.sort();
        let hashes = names
            .iter()
            .map(|name| {
                let (k, at, len) = self.place[*name];
                let shard = &self.shards[k];
                let mut h = blake3::Hasher::new();
                let mut buf = vec![0u8; len.min(8 << 20) as usize];
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(buf.len() as u64) as usize;
                    self.with_file(k, |f| f.read_exact_at(&mut buf[..n], at + done))
                        .with_context(|| format!("{}: cannot read back", shard.path.display()))?;
                    h.update_rayon(&buf[..n]);
                    done += n as u64;
                }
                Ok(*h.finalize().as_bytes())
            })
            .collect::<Result<Vec<[u8; 32]>>>()?;
        Ok(crate::io::fingerprint(&hashes))
    }

    /// The total size of the output's safetensors files.
    fn total_len(&self) -> u64 {
        self.total
    }

    /// The paths the output's files have once committed: the safetensors files, then the
    /// index and the copied files of a folder.
    fn files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = self.shards.iter().map(|s| s.path.clone()).collect();
        if self.index.is_some() {
            files.push(self.target.path.join(INDEX_NAME));
        }
        if self.target.is_folder() {
            files.extend(
                self.companion_names()
                    .unwrap_or_default()
                    .iter()
                    .map(|f| self.target.path.join(f)),
            );
            files.extend(self.own_files.keys().map(|f| self.target.path.join(f)));
            files.extend(self.staged_files.iter().map(|f| self.target.path.join(f)));
        }
        files
    }

    /// The files copied from `Target::copy_from`: its companion files but those that
    /// [`Output::add_file`] replaces.
    fn companion_names(&self) -> Result<Vec<PathBuf>> {
        let Some(src) = &self.target.copy_from else {
            return Ok(Vec::new());
        };
        let mut names = companions(src)?.files;
        names.retain(|n| !self.is_added(n));
        Ok(names)
    }

    /// Flushes everything to disk and renames the output into place; with `fingerprint`, first
    /// reads the data back once to hash it (docs/FORMAT.md section 7: BLAKE3 over the BLAKE3 of every tensor).
    pub fn commit(self, fingerprint: bool) -> Result<Written> {
        let written = Written {
            bytes: self.total_len(),
            files: self.files(),
            fingerprint: fingerprint.then(|| self.fingerprint()).transpose()?,
        };
        self.place_files()?;
        Ok(written)
    }

    /// Commits part `target.part` of a folder output: its shards go into the parts folder
    /// ([`super::parts::parts_dir`]) with a manifest recording `base_hashes` (the BLAKE3 of the
    /// base tensors this part read, by name) and `files` (for `finalize` to complete), each
    /// renamed into place; the folder itself appears at the output path only on `finalize`.
    pub fn commit_part(
        self,
        base_hashes: BTreeMap<String, String>,
        files: BTreeMap<String, String>,
    ) -> Result<Written> {
        use super::parts::{Manifest, PART_FORMAT, PART_VERSION, PartShard, parts_dir};
        let part = self.target.part.expect("a part");
        self.progress.finish_and_clear();
        let dest = self.target.path.clone();
        let dir = parts_dir(&dest);
        match std::fs::create_dir(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(e).with_context(|| format!("{}: cannot create", dir.display()));
            }
            _ => {}
        }
        self.close_all(self.target.durable)?;
        let mut shards = Vec::new();
        let mut placed = Vec::new();
        for s in &self.shards {
            let name = s.path.file_name().expect("a shard file name");
            let to = dir.join(name);
            std::fs::rename(&s.staged, &to)
                .with_context(|| format!("{}: cannot rename into place", to.display()))?;
            process::untrack_file(&s.staged);
            let bytes = std::fs::metadata(&to)
                .with_context(|| format!("{}: cannot read back", to.display()))?
                .len();
            shards.push(PartShard {
                file: name.to_string_lossy().into_owned(),
                bytes,
            });
            placed.push(to);
        }
        // The own files taken from a delta (docs/FORMAT.md section 13): the same in every part.
        for (name, bytes) in &self.own_files {
            let to = dir.join(name);
            let mut tmp = part_temp(&dir, &to)?;
            std::io::Write::write_all(&mut tmp, bytes)
                .with_context(|| format!("{}: cannot write", to.display()))?;
            persist_part_temp(tmp, &to)?;
            placed.push(to);
        }
        let manifest = Manifest {
            format: PART_FORMAT.into(),
            version: PART_VERSION,
            part: part.k,
            parts: part.n,
            total_shards: self.total_shards,
            layout: self.layout.clone(),
            index: self
                .index
                .as_ref()
                .map(|i| String::from_utf8_lossy(i).into_owned()),
            shards,
            base_hashes,
            own_files: self.own_files.keys().cloned().collect(),
            copy_from: self
                .target
                .copy_from
                .as_ref()
                .map(|p| p.display().to_string()),
            files,
        };
        // Written beside, then renamed: a manifest is there whole or not at all.
        let path = dir.join(part.manifest_name());
        let mut tmp = part_temp(&dir, &path)?;
        serde_json::to_writer_pretty(&mut tmp, &manifest)?;
        if self.target.durable {
            tmp.as_file().sync_all()?;
        }
        persist_part_temp(tmp, &path)?;
        placed.push(path);
        if self.target.durable {
            sync_folder(&dir)?;
        }
        // The staging folder is empty now: dropped, it goes.
        Ok(Written {
            bytes: self.total,
            files: placed,
            fingerprint: None,
        })
    }

    fn place_files(mut self) -> Result<()> {
        self.progress.finish_and_clear();
        let dest = self.target.path.clone();
        let durable = self.target.durable;
        if let Some(Staging::Folder(tmp)) = &self.staging {
            let dir = tmp.path().to_path_buf();
            if let Some(index) = &self.index {
                let path = dir.join(INDEX_NAME);
                process::track_file(&path);
                std::fs::write(&path, index).with_context(|| {
                    format!("{}: cannot write", dest.join(INDEX_NAME).display())
                })?;
            }
            if let Some(src) = &self.target.copy_from {
                let mut skip: Vec<&Path> = self.own_files.keys().map(Path::new).collect();
                skip.extend(self.staged_files.iter().map(PathBuf::as_path));
                copy_companions(src, &companions(src)?, &dir, &dest, &skip)?;
            }
            for (name, bytes) in &self.own_files {
                let to = dir.join(name);
                process::track_file(&to);
                std::fs::write(&to, bytes)
                    .with_context(|| format!("{}: cannot write", dest.join(name).display()))?;
            }
        }
        self.close_all(durable)?;
        match self.staging.take().expect("not yet committed") {
            Staging::File(tmp) => {
                let path = tmp.path().to_path_buf();
                let persisted = tmp.persist(&dest);
                process::untrack_file(&path);
                persisted.map_err(|e| {
                    anyhow::anyhow!("{}: cannot rename into place: {}", dest.display(), e.error)
                })?;
            }
            Staging::Folder(tmp) => {
                let staged = tmp.keep();
                if durable {
                    sync_folder(&staged)?;
                }
                let placed = place_folder(&staged, &dest);
                // From here the files are either in place or removed below: forget them.
                process::untrack_dir(&staged);
                if let Err(e) = placed {
                    let _ = std::fs::remove_dir_all(&staged);
                    return Err(e);
                }
            }
        }
        if durable && let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            let _ = sync_folder(parent);
        }
        Ok(())
    }
}

impl Sink for Output {
    fn write(&self, name: &str, at: u64, bytes: &[u8]) -> Result<()> {
        self.target
            .cancel
            .check()
            .with_context(|| self.target.path.display().to_string())?;
        let (k, base, _) = self.place[name];
        self.with_file(k, |f| f.write_all_at(bytes, base + at))
            .with_context(|| {
                format!(
                    "{}: cannot write tensor {name}",
                    self.shards[k].path.display()
                )
            })?;
        self.progress.inc(bytes.len() as u64);
        Ok(())
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        // Closed before the staging folder goes: its removal needs descriptors of its own,
        // which a process out of them would not have.
        let _ = self.close_all(false);
        // Uncommitted: the staging file or folder deletes itself as it drops.
        match &self.staging {
            Some(Staging::File(tmp)) => process::untrack_file(tmp.path()),
            Some(Staging::Folder(tmp)) => process::untrack_dir(tmp.path()),
            None => {}
        }
    }
}

/// Writes a whole safetensors file or folder from in-memory tensors (name, dtype, shape,
/// data), through the same atomic [`Output`] path as every other output. For fixtures, tests
/// and benchmarks.
pub fn write_file(
    path: &Path,
    tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    write_tensors(&Target::new(path), tensors, metadata)
}

/// [`write_file`] to any [`Target`] (a folder with a chosen shard size, say).
pub fn write_tensors(
    target: &Target,
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
    let out = Output::create(target, &layout, metadata)?;
    for (name, _, _, data) in sorted {
        out.write(name, 0, data)?;
    }
    out.commit(false).map(|_| ())
}
