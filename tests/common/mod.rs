//! The harness shared by the integration tests (`mod common;` in each): running the binary and
//! judging what it did ([`Outcome`]), the files a failed write may leave, deterministic bytes,
//! and [`device_test!`], which defines a test once per merge backend (`--device cpu|cuda`).
//!
//! Each test binary uses a part of this module, hence the `allow`s of unused items.
#![allow(dead_code)]

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;
use tempfile::TempDir;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_sotu-delta");

/// Prefix of the temporary files that outputs are written through.
pub const PARTIAL_PREFIX: &str = ".sotu-delta-partial-";

/// The repository root (fixtures/ lies there).
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn tmp() -> TempDir {
    tempfile::tempdir().expect("temporary folder")
}

// ==========================================================================================
// Running the binary
// ==========================================================================================

/// What one run of the binary did.
pub struct Outcome {
    /// The arguments, joined by spaces (empty where the run was not made by [`sotu`]).
    pub line: String,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.line.is_empty() {
            writeln!(f, "$ sotu-delta {}", self.line)?;
        }
        write!(
            f,
            "exit code {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

impl Outcome {
    /// The outcome of a run made some other way (a shell, other environment variables).
    pub fn from_output(o: std::process::Output) -> Outcome {
        Outcome {
            line: String::new(),
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// Exit 0, no panic, and no progress output on stderr (stderr is a pipe here).
    #[track_caller]
    pub fn success(&self) -> &Self {
        assert_eq!(self.code, Some(0), "expected success\n{self}");
        assert!(!self.stderr.contains("panicked"), "{self}");
        assert!(
            !self.stderr.contains('\r') && !self.stderr.contains("ETA"),
            "progress output on a stderr that is not a terminal\n{self}"
        );
        self
    }

    /// The text after `sotu-delta: <kind>:`, which must begin a line of stderr.
    #[track_caller]
    pub fn message(&self, kind: &str) -> &str {
        let prefix = format!("sotu-delta: {kind}:");
        let at = self
            .stderr
            .find(&prefix)
            .unwrap_or_else(|| panic!("stderr has no {prefix:?}\n{self}"));
        assert!(
            at == 0 || self.stderr.as_bytes()[at - 1] == b'\n',
            "{prefix:?} does not start a line\n{self}"
        );
        &self.stderr[at + prefix.len()..]
    }

    /// Exit 1 with `sotu-delta: error:` whose message contains every one of `words`.
    #[track_caller]
    pub fn error(&self, words: &[&str]) -> &Self {
        self.error_any(words, &[])
    }

    /// Exit 1 with `sotu-delta: error:` whose message contains every one of `all`, and at
    /// least one of `any` (when `any` is not empty).
    #[track_caller]
    pub fn error_any(&self, all: &[&str], any: &[&str]) -> &Self {
        assert_eq!(
            self.code,
            Some(1),
            "expected exit 1 (failed operation)\n{self}"
        );
        assert!(!self.stderr.contains("panicked"), "{self}");
        let msg = self.message("error");
        for w in all {
            assert!(msg.contains(w), "the error message lacks {w:?}\n{self}");
        }
        assert!(
            any.is_empty() || any.iter().any(|w| msg.contains(w)),
            "the error message names none of {any:?}\n{self}"
        );
        self
    }

    /// Exit 2 with `sotu-delta: usage error:` whose message contains every one of `words`.
    #[track_caller]
    pub fn usage_error(&self, words: &[&str]) -> &Self {
        assert_eq!(self.code, Some(2), "expected exit 2 (usage error)\n{self}");
        assert!(!self.stderr.contains("panicked"), "{self}");
        let msg = self.message("usage error");
        for w in words {
            assert!(msg.contains(w), "the usage message lacks {w:?}\n{self}");
        }
        self
    }

    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e})\n{self}"))
    }
}

/// Runs `sotu-delta args..` in `dir`, with no standard input.
pub fn sotu<I, A>(dir: &Path, args: I) -> Outcome
where
    I: IntoIterator<Item = A>,
    A: AsRef<OsStr>,
{
    let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let out = Command::new(BIN)
        .current_dir(dir)
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .expect("run sotu-delta");
    Outcome {
        line: args
            .iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" "),
        ..Outcome::from_output(out)
    }
}

/// Runs `sotu-delta` in `dir` with `line` split at whitespace (test file names have none).
pub fn run(dir: &Path, line: &str) -> Outcome {
    sotu(dir, line.split_whitespace())
}

/// Runs `line` and asserts success.
#[track_caller]
pub fn ok(dir: &Path, line: &str) -> Outcome {
    let out = run(dir, line);
    out.success();
    out
}

/// The temporary files left in `dir` by a failed write (names; none where `dir` is missing).
pub fn partial_files(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(PARTIAL_PREFIX))
                .collect()
        })
        .unwrap_or_default()
}

// ==========================================================================================
// Data
// ==========================================================================================

/// The next value of splitmix64 from `state` (advanced).
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Deterministic pseudo-random bytes (splitmix64).
pub fn noise(len: usize, mut state: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&splitmix64(&mut state).to_le_bytes());
    }
    out.truncate(len);
    out
}

// ==========================================================================================
// Devices
// ==========================================================================================

/// The backend a merge or apply runs on, as `--device` names it: `format!("--device {d}")`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
}

impl Device {
    pub fn as_str(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `Ok` where `--device cuda` can run here, else why not (no driver, no NVRTC, no device...).
/// The one place the tests ask the library about CUDA.
pub fn cuda_device() -> Result<(), String> {
    sotu_delta::merge::cuda::backend().map(|_| ())
}

/// `a == b`, in a constant (for [`device_test!`]'s check of the test names).
pub const fn same_str(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Defines a test once per device, after candle's `test_device!`:
///
/// ```ignore
/// fn merge_rebuilds_it(device: Device) { ... ok(d, &format!("merge ... --device {device}")); ... }
/// device_test!(merge_rebuilds_it, merge_rebuilds_it_cpu, merge_rebuilds_it_cuda);
/// ```
///
/// makes `merge_rebuilds_it_cpu`, which runs the body with [`Device::Cpu`], and
/// `merge_rebuilds_it_cuda`, which runs it with [`Device::Cuda`] where [`cuda_device`] finds a
/// CUDA device, and otherwise says on stderr why it is skipped and passes. (Without a crate
/// that pastes identifiers, the two names are spelled out; they must be `<body>_cpu` and
/// `<body>_cuda`, which is checked when the test compiles.)
#[allow(unused_macros)]
macro_rules! device_test {
    ($body:ident, $cpu:ident, $cuda:ident) => {
        const _: () = assert!(
            $crate::common::same_str(stringify!($cpu), concat!(stringify!($body), "_cpu"))
                && $crate::common::same_str(stringify!($cuda), concat!(stringify!($body), "_cuda")),
            "device_test!(body, body_cpu, body_cuda): name the tests <body>_cpu and <body>_cuda"
        );

        #[test]
        fn $cpu() {
            $body($crate::common::Device::Cpu)
        }

        #[test]
        fn $cuda() {
            match $crate::common::cuda_device() {
                Ok(()) => $body($crate::common::Device::Cuda),
                Err(why) => eprintln!(
                    "skipped: {}: no usable CUDA device ({why})",
                    stringify!($cuda)
                ),
            }
        }
    };
}
#[allow(unused_imports)]
pub(crate) use device_test;
