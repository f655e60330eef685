//! Shared by the fuzz targets: where temporary files go, how a fuzz input becomes a file, and
//! removing those files when an input panics.
// Each target uses its own part of this module.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, Once, OnceLock};

/// A tmpfs when the machine has one (/dev/shm), else the system temporary folder: every
/// iteration writes and maps a file, so this keeps the targets off the disk.
pub fn tmp_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = PathBuf::from("/dev/shm");
        if tempfile::NamedTempFile::new_in(&shm).is_ok() {
            shm
        } else {
            std::env::temp_dir()
        }
    })
}

/// Temporary paths of the input being run. A panic aborts the process (libFuzzer's hook), so
/// their destructors never run; the hook below removes them first, so that `cargo fuzz tmin`,
/// which crashes thousands of times, does not fill /dev/shm. (A timeout or out-of-memory kill
/// still leaves one `sotu-fuzz-*` entry behind.)
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn install_cleanup_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        // Installed on the first input, after libfuzzer-sys has installed its own hook (print,
        // then abort), which this one calls last.
        let next = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Ok(live) = LIVE.try_lock() {
                for p in live.iter() {
                    let _ = std::fs::remove_file(p);
                    let _ = std::fs::remove_dir_all(p);
                }
            }
            next(info)
        }));
    });
}

/// A temporary file or folder, removed on drop, and by the panic hook when an input panics.
pub struct Temp<T: AsRef<Path>>(pub T);

impl<T: AsRef<Path>> Temp<T> {
    fn register(inner: T) -> Self {
        install_cleanup_hook();
        if let Ok(mut live) = LIVE.lock() {
            live.push(inner.as_ref().to_path_buf());
        }
        Temp(inner)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        self.0.as_ref()
    }
}

impl<T: AsRef<Path>> Drop for Temp<T> {
    fn drop(&mut self) {
        if let Ok(mut live) = LIVE.lock() {
            let p = self.0.as_ref();
            live.retain(|q| q != p);
        }
    }
}

/// The fuzz input written to a fresh temporary file.
pub fn input_file(data: &[u8]) -> Temp<tempfile::TempPath> {
    let mut f = tempfile::Builder::new()
        .prefix("sotu-fuzz-")
        .suffix(".delta.safetensors")
        .tempfile_in(tmp_dir())
        .expect("cannot create a temporary file");
    f.write_all(data).expect("cannot write the temporary file");
    f.flush().expect("cannot flush the temporary file");
    Temp::register(f.into_temp_path())
}

/// A fresh temporary folder (for outputs).
pub fn out_dir() -> Temp<tempfile::TempDir> {
    let d = tempfile::Builder::new()
        .prefix("sotu-fuzz-out-")
        .tempdir_in(tmp_dir())
        .expect("cannot create a temporary folder");
    Temp::register(d)
}
