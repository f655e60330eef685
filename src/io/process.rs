//! Process state, owned here alone: the memory-mapped inputs (so that a SIGBUS can name its
//! file), the partial outputs being written (so that a signal can remove them), and the
//! handlers of SIGBUS, SIGINT and SIGTERM that use both.
//!
//! The registries are kept as C strings behind mutexes that the handlers only `try_lock`, so a
//! handler never allocates or blocks. Readers and writers register and forget their own
//! entries; a program (the command line, a binding) calls [`install_handlers`] once.

use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

/// Mapped input files: start address, length, path.
static MAPS: Mutex<Vec<(usize, usize, CString)>> = Mutex::new(Vec::new());
/// Temporary output files being written.
static PARTIAL_FILES: Mutex<Vec<CString>> = Mutex::new(Vec::new());
/// Temporary output folders being written (removed after the files in them).
static PARTIAL_DIRS: Mutex<Vec<CString>> = Mutex::new(Vec::new());

/// `path` as a C string (empty if it holds a NUL byte).
pub(super) fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap_or_default()
}

/// Records that `path` is mapped at `[start, start + len)`.
pub fn register_mapping(start: usize, len: usize, path: &Path) {
    if let Ok(mut maps) = MAPS.lock() {
        maps.push((start, len, c_path(path)));
    }
}

/// Forgets the mapping that starts at `start` (it is being unmapped).
pub fn forget_mapping(start: usize) {
    if let Ok(mut maps) = MAPS.lock() {
        maps.retain(|(s, _, _)| *s != start);
    }
}

/// Records a temporary output file, to be removed if the process is stopped.
pub fn track_file(path: &Path) {
    if let Ok(mut l) = PARTIAL_FILES.lock() {
        l.push(c_path(path));
    }
}

/// Forgets a temporary output file (renamed into place, or removed).
pub fn untrack_file(path: &Path) {
    let c = c_path(path);
    if let Ok(mut l) = PARTIAL_FILES.lock() {
        l.retain(|p| *p != c);
    }
}

/// The kind of a temporary output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Partial {
    /// A file.
    File,
    /// A folder.
    Dir,
}

/// Makes a temporary output with `make` and records it (at the path `path` gives) in one step,
/// under its registry's lock: a stop (SIGINT, SIGTERM) then finds it recorded, or comes before
/// it exists. For outputs whose path is chosen as they are made (`tempfile`'s).
pub fn create_tracked<T>(
    kind: Partial,
    make: impl FnOnce() -> std::io::Result<T>,
    path: impl FnOnce(&T) -> PathBuf,
) -> std::io::Result<T> {
    let registry = match kind {
        Partial::File => &PARTIAL_FILES,
        Partial::Dir => &PARTIAL_DIRS,
    };
    let mut l = registry.lock().unwrap_or_else(PoisonError::into_inner);
    let made = make()?;
    l.push(c_path(&path(&made)));
    Ok(made)
}

/// Records a temporary output folder, to be removed (once emptied) if the process is stopped.
pub fn track_dir(path: &Path) {
    if let Ok(mut l) = PARTIAL_DIRS.lock() {
        l.push(c_path(path));
    }
}

/// Forgets a temporary output folder and every temporary file and folder recorded inside it.
pub fn untrack_dir(dir: &Path) {
    let prefix = c_path(dir);
    if let Ok(mut l) = PARTIAL_FILES.lock() {
        l.retain(|p| !p.as_bytes().starts_with(prefix.as_bytes()));
    }
    if let Ok(mut l) = PARTIAL_DIRS.lock() {
        l.retain(|p| !p.as_bytes().starts_with(prefix.as_bytes()));
    }
}

/// Removes every partial output of this process: the files first, then the folders they were
/// in. Uses only `try_lock`, `unlink` and `rmdir`, so it is safe in a signal handler (SIGBUS's;
/// a stop by SIGINT or SIGTERM runs outside one and does more, [`install_handlers`]).
pub fn remove_partial_outputs() {
    if let Ok(list) = PARTIAL_FILES.try_lock() {
        for p in list.iter() {
            // SAFETY: a valid NUL-terminated path; unlink is async-signal-safe.
            unsafe { libc::unlink(p.as_ptr()) };
        }
    }
    if let Ok(list) = PARTIAL_DIRS.try_lock() {
        // Last tracked first: a subfolder before the folder that holds it.
        for p in list.iter().rev() {
            // SAFETY: as above; rmdir is async-signal-safe.
            unsafe { libc::rmdir(p.as_ptr()) };
        }
    }
}

/// Installs the process's handlers, once:
/// - SIGINT and SIGTERM remove the partial outputs and exit with status 130 (SIGKILL cannot be
///   caught: it leaves a `.sotu-delta-partial-*` file, never a file at the output path);
/// - SIGBUS, raised when a memory-mapped input is truncated by another process while it is
///   read, removes the partial outputs, names the file and exits with status 1.
pub fn install_handlers() {
    install_fault_handler();
    // An error means a handler is already set (by an earlier call, or by the embedding
    // program, whose choice stands).
    let _ = ctrlc::set_handler(|| stop());
}

/// The prefix of the temporary file or folder an output is made in, beside it.
pub const PARTIAL_PREFIX: &str = ".sotu-delta-partial-";

/// What SIGINT and SIGTERM do, in the thread the `ctrlc` crate runs its handler in (not in a
/// signal handler, so it may block and allocate): removes every partial output and exits with
/// status 130. The registries are locked, not tried, so that a writer registering a shard at
/// that moment cannot make the removal skip them (a `try_lock` that failed once left a partial
/// folder), and they stay locked until the exit, so that nothing is registered after. A
/// partial output folder is removed whole, with any file a writer created in it and had not
/// registered yet; writers go on until the exit, so that is tried again while it fails.
fn stop() -> ! {
    let files = PARTIAL_FILES.lock().unwrap_or_else(PoisonError::into_inner);
    let dirs = PARTIAL_DIRS.lock().unwrap_or_else(PoisonError::into_inner);
    for p in files.iter() {
        // SAFETY: a valid NUL-terminated path.
        unsafe { libc::unlink(p.as_ptr()) };
    }
    for p in dirs.iter().rev() {
        let path = Path::new(OsStr::from_bytes(p.as_bytes()));
        let staging = path
            .file_name()
            .is_some_and(|n| n.as_bytes().starts_with(PARTIAL_PREFIX.as_bytes()));
        if !staging {
            // A subfolder of a staging folder: removed with it.
            continue;
        }
        for _ in 0..200 {
            match std::fs::remove_dir_all(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                _ => break,
            }
        }
    }
    std::process::exit(130);
}

/// Makes the allocator return large blocks to the system when they are freed: every
/// allocation of 1 MiB or more is its own mapping. glibc otherwise raises that threshold to
/// the largest block freed so far (up to 32 MiB) and keeps later blocks in its heaps, where
/// the merge methods' per-tensor matrices and SVD workspaces, freed tensor after tensor, stayed
/// resident: `merge --method tsv` peaked at 146 MiB of anonymous memory instead of 84 MiB on
/// 512×1024 tensors (docs/NOTES.md). A process-wide choice, for programs (the command line)
/// to make; the library does not.
pub fn return_freed_memory() {
    // SAFETY: mallopt only sets a tunable of glibc's allocator.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// The SIGBUS half of [`install_handlers`].
fn install_fault_handler() {
    extern "C" fn on_sigbus(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
        // SAFETY: the kernel passes a valid siginfo; only async-signal-safe calls follow
        // (try_lock never blocks, write, unlink, rmdir, _exit).
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
