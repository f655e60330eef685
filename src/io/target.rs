//! Where an output goes and how it is written: the path (a file or a model folder, by its
//! name), the shard size, durability, progress, the stop request and the part of a merge in
//! parts. [`super::output::Output`] writes to a [`Target`].

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::parts::Part;

/// The default largest shard of a folder output (`--shard-size`), as Hugging Face writes.
pub const DEFAULT_SHARD_SIZE: u64 = 5_000_000_000;

/// Where and how an output is written.
#[derive(Clone, Debug)]
pub struct Target {
    /// The output path: a file when it ends in `.safetensors` or `.st`, else a folder
    /// ([`is_folder_path`]).
    pub path: PathBuf,
    /// Largest tensor bytes per shard of a folder output.
    pub shard_size: u64,
    /// A model folder whose non-weight files (config, tokenizer, …) are copied into a folder
    /// output.
    pub copy_from: Option<PathBuf>,
    /// Flush to disk (fsync) before the rename into place. Without it (`--no-sync`), a crash of
    /// the process still leaves no partial file at the output path, but a power loss may.
    pub durable: bool,
    /// Show a progress bar while writing; drawn only when stderr is a terminal.
    pub progress: bool,
    /// Stops the writing when set: every write fails from then on, and the output is never
    /// committed.
    pub cancel: Cancel,
    /// Write only this part of a folder's shards (`merge --part K/N`, [`super::parts`]).
    pub part: Option<Part>,
}

/// An operation's stop request: a flag that another thread sets (the Python package sets it on
/// a KeyboardInterrupt) and that every output write checks, so a long merge or extract ends
/// within one write and leaves nothing behind. The command line never sets it: its signal
/// handler removes the partial outputs and exits instead.
#[derive(Clone, Debug, Default)]
pub struct Cancel(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Cancel {
    /// Asks the operation to stop.
    pub fn set(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether a stop was asked for.
    pub fn is_set(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Fails once a stop was asked for.
    pub fn check(&self) -> Result<()> {
        if self.is_set() {
            bail!("interrupted; nothing was written");
        }
        Ok(())
    }
}
impl Target {
    /// A durable single-file or folder output at `path` with the default shard size, copying
    /// nothing, with no progress bar.
    pub fn new(path: &Path) -> Self {
        Target {
            path: path.to_path_buf(),
            shard_size: DEFAULT_SHARD_SIZE,
            copy_from: None,
            durable: true,
            progress: false,
            cancel: Cancel::default(),
            part: None,
        }
    }

    /// Whether the output is a model folder rather than one `.safetensors` file.
    pub fn is_folder(&self) -> bool {
        is_folder_path(&self.path)
    }
}

/// The name endings of a single-file output: `.safetensors`, and the `.st` that users (and this
/// tool's own usage) give deltas.
pub const FILE_SUFFIXES: [&str; 2] = [".safetensors", ".st"];

/// Whether an output path names a model folder: every path but a name ending in one of
/// [`FILE_SUFFIXES`].
pub fn is_folder_path(path: &Path) -> bool {
    !path.file_name().is_some_and(|n| {
        let n = n.to_string_lossy();
        FILE_SUFFIXES.iter().any(|s| n.ends_with(s))
    })
}

/// Parses a size such as `5GB`, `500MB`, `2GiB` or `1000` (bytes): B, KB, MB, GB, TB are powers
/// of 1000, KiB, MiB, GiB, TiB powers of 1024.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit_bytes: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        u => bail!("{s:?}: unknown unit {u:?} (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)"),
    };
    let n: f64 = num
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite())
        .with_context(|| format!("{s:?} is not a size such as 500MB or 2GiB"))?;
    let bytes = n * unit_bytes as f64;
    if bytes < 1.0 {
        bail!("{s:?}: a shard size must be at least 1 byte");
    }
    // `u64::MAX as f64` is 2^64 itself, one past the largest u64.
    if bytes >= u64::MAX as f64 {
        bail!("{s:?}: too large for a shard size");
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_decimal_and_binary_units() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("500MB").unwrap(), 500_000_000);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert_eq!(parse_size("1.5KiB").unwrap(), 1536);
        for bad in [
            "",
            "GB",
            "0",
            "-1MB",
            "5 parsecs",
            "1e3",
            "18446744073709551616",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} parsed");
        }
    }
}
