//! Operational faults (docs/RELIABILITY.md): a full disk, a read-only output folder, a process
//! killed mid-merge, an input truncated or rewritten while it is read, and overflow of the
//! output dtype. After each: exit status 1 (or a warning), no file at the output path, inputs
//! untouched, and a rerun that succeeds. Then the cases of issue 17: inputs that are FIFOs or
//! devices, folder outputs of more shards than open files, outputs that would break an input
//! folder, a delta header over the safetensors limit, non-finite results in every dtype, an
//! unbounded `--threads`, and the decisions on the questionable cases.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use safetensors::Dtype;
use sotu_delta::dtype::Float;
use sotu_delta::io::write_file;

mod common;
use common::{BIN, Outcome, partial_files, sotu};

/// A checkpoint with one f32 tensor of `n` elements, base or fine-tuned.
fn checkpoint(path: &Path, n: usize, tuned: bool) {
    let values: Vec<f64> = (0..n)
        .map(|i| ((i * 7919 % 1000) as f64 - 500.0) * 1e-4 + if tuned { 1e-3 } else { 0.0 })
        .collect();
    let mut bytes = Vec::new();
    Float::F32.store_all(&values, &mut bytes);
    write_file(
        path,
        &[("w".into(), Dtype::F32, vec![n], bytes)],
        &BTreeMap::new(),
    )
    .unwrap();
}

/// A base and a delta big enough that a one-thread merge takes a good fraction of a second.
fn big_pair(dir: &Path) {
    checkpoint(&dir.join("base.safetensors"), 24 << 20, false);
    checkpoint(&dir.join("tuned.safetensors"), 24 << 20, true);
    extract_delta(dir);
}

/// Extracts `d.safetensors` (density 0.5) from `base.safetensors` and `tuned.safetensors` in `dir`.
fn extract_delta(dir: &Path) {
    let args = [
        "extract",
        "-q",
        "--base",
        "base.safetensors",
        "--tuned",
        "tuned.safetensors",
        "--density",
        "0.5",
        "-o",
        "d.safetensors",
    ];
    let o = sotu(dir, args);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
}

/// Mounts a tmpfs at `dir` (root only); `None`, with the reason printed, where that fails.
fn tmpfs(dir: &Path, opts: &str) -> Option<Mount> {
    std::fs::create_dir_all(dir).unwrap();
    let o = Command::new("mount")
        .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
        .arg(dir)
        .output();
    match o {
        Ok(o) if o.status.success() => Some(Mount(dir.to_path_buf())),
        Ok(o) => {
            eprintln!(
                "SKIPPED: cannot mount a tmpfs ({}); needs root",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            None
        }
        Err(e) => {
            eprintln!("SKIPPED: cannot run mount ({e})");
            None
        }
    }
}

struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Starts a one-thread merge of `d.safetensors` onto `base.safetensors`, reading its inputs as
/// `--io io` says, waits until its partial output exists (the data pass has begun), runs
/// `during` with the merge's pid, and returns its output.
fn merge_with(dir: &Path, io: &str, during: impl FnOnce(u32)) -> Outcome {
    let child = Command::new(BIN)
        .current_dir(dir)
        .args([
            "merge",
            "--io",
            io,
            "--threads",
            "1",
            "--no-sync",
            "--base",
            "base.safetensors",
            "d.safetensors",
            "-o",
            "out.safetensors",
        ])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while partial_files(dir).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "merge never started writing"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    during(child.id());
    Outcome::from_output(child.wait_with_output().unwrap())
}

#[test]
fn disk_full_mid_write_leaves_nothing_and_a_rerun_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    checkpoint(&d.join("base.safetensors"), 1 << 18, false);
    checkpoint(&d.join("tuned.safetensors"), 1 << 18, true);
    let small = d.join("small");
    let Some(_mount) = tmpfs(&small, "size=256k") else {
        return;
    };
    let base_before = std::fs::read(d.join("base.safetensors")).unwrap();
    for args in [
        vec![
            "extract",
            "--base",
            "../base.safetensors",
            "--tuned",
            "../tuned.safetensors",
            "--density",
            "1",
            "-o",
            "out.safetensors",
        ],
        vec![
            "merge",
            "--base",
            "../base.safetensors",
            "../d.safetensors",
            "-o",
            "out.safetensors",
        ],
    ] {
        if args[0] == "merge" {
            extract_delta(d);
        }
        let o = sotu(&small, &args);
        assert_eq!(o.code, Some(1), "{:?}: {}", args, o.stderr);
        assert!(o.stderr.contains("out.safetensors"), "{}", o.stderr);
        assert!(!small.join("out.safetensors").exists());
        assert!(
            partial_files(&small).is_empty(),
            "{:?}",
            partial_files(&small)
        );
        // The same command with room to write succeeds.
        let o = sotu(d, args.iter().map(|a| a.replace("../", "")));
        assert_eq!(o.code, Some(0), "{}", o.stderr);
    }
    assert_eq!(
        std::fs::read(d.join("base.safetensors")).unwrap(),
        base_before
    );
}

#[test]
fn read_only_output_folder_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    checkpoint(&d.join("base.safetensors"), 1024, false);
    checkpoint(&d.join("tuned.safetensors"), 1024, true);
    let ro = d.join("ro");
    // As root, file modes do not stop a write; a read-only mount does.
    let Some(_mount) = tmpfs(&ro, "ro,size=1m") else {
        return;
    };
    let o = sotu(
        d,
        [
            "extract",
            "--base",
            "base.safetensors",
            "--tuned",
            "tuned.safetensors",
            "-o",
            "ro/d.safetensors",
        ],
    );
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    assert!(o.stderr.contains("ro/d.safetensors"), "{}", o.stderr);
    assert!(!ro.join("d.safetensors").exists());
}

#[test]
fn killed_merge_leaves_no_output_and_a_rerun_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    big_pair(d);
    let before = std::fs::read(d.join("base.safetensors")).unwrap();
    // By pid, at once: a pkill that scans /proc can come too late on a busy machine.
    let o = merge_with(d, "mmap", |pid| {
        // SAFETY: signals the child this test spawned and has not yet reaped.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    });
    assert_eq!(o.code, None, "killed by a signal");
    // SIGKILL cannot be caught: the partial file may stay, but nothing is at the output path.
    assert!(!d.join("out.safetensors").exists());
    for p in partial_files(d) {
        std::fs::remove_file(d.join(p)).unwrap();
    }
    assert_eq!(std::fs::read(d.join("base.safetensors")).unwrap(), before);
    let o = sotu(
        d,
        [
            "merge",
            "--base",
            "base.safetensors",
            "d.safetensors",
            "-o",
            "out.safetensors",
        ],
    );
    assert_eq!(o.code, Some(0), "{}", o.stderr);
}

/// Under `--io mmap` the truncation faults (SIGBUS) in the middle of a read; under `--io read`
/// a read comes back short. Either way: exit 1 naming the file, nothing written.
#[test]
fn input_truncated_while_read_is_an_error_naming_it() {
    for io in ["mmap", "read"] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        big_pair(d);
        let o = merge_with(d, io, |_| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(d.join("base.safetensors"))
                .unwrap()
                .set_len(4096)
                .unwrap();
        });
        assert_eq!(o.code, Some(1), "--io {io}: {}", o.stderr);
        assert!(
            o.stderr.contains("base.safetensors"),
            "--io {io}: {}",
            o.stderr
        );
        assert!(!d.join("out.safetensors").exists(), "--io {io}");
        assert!(partial_files(d).is_empty(), "{:?}", partial_files(d));
    }
}

#[test]
fn input_rewritten_while_read_is_an_error_naming_it() {
    for io in ["mmap", "read"] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        big_pair(d);
        let o = merge_with(d, io, |_| {
            // Same size, new contents and modification time: an in-place rewrite.
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(d.join("d.safetensors"))
                .unwrap();
            f.set_modified(std::time::SystemTime::now() + Duration::from_secs(5))
                .unwrap();
        });
        assert_eq!(o.code, Some(1), "--io {io}: {}", o.stderr);
        assert!(
            o.stderr.contains("d.safetensors") && o.stderr.contains("changed"),
            "--io {io}: {}",
            o.stderr
        );
        assert!(!d.join("out.safetensors").exists());
        assert!(partial_files(d).is_empty());
    }
}

#[test]
fn f16_overflow_warns_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let f16 = |v: &[f64]| {
        let mut b = Vec::new();
        Float::F16.store_all(v, &mut b);
        b
    };
    let tensors = |v: &[f64]| vec![("hot".to_string(), Dtype::F16, vec![2], f16(v))];
    write_file(
        &d.join("base.safetensors"),
        &tensors(&[60000.0, 1.0]),
        &BTreeMap::new(),
    )
    .unwrap();
    write_file(
        &d.join("tuned.safetensors"),
        &tensors(&[65504.0, 2.0]),
        &BTreeMap::new(),
    )
    .unwrap();
    let o = sotu(
        d,
        [
            "extract",
            "--base",
            "base.safetensors",
            "--tuned",
            "tuned.safetensors",
            "--density",
            "1",
            "-o",
            "d.safetensors",
        ],
    );
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    // 60000 + 2·(65504 − 60000) = 71008: past the largest f16.
    let o = sotu(
        d,
        [
            "merge",
            "--base",
            "base.safetensors",
            "d.safetensors",
            "--weights",
            "2",
            "-o",
            "out.safetensors",
        ],
    );
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let err = &o.stderr;
    assert!(
        err.contains("warning") && err.contains("hot") && err.contains("1 element"),
        "{err}"
    );
    // Weight 1 stays finite: no warning.
    let o = sotu(
        d,
        [
            "merge",
            "--base",
            "base.safetensors",
            "d.safetensors",
            "-o",
            "out2.safetensors",
        ],
    );
    assert!(!o.stderr.contains("overflow"), "{}", o.stderr);
}

// ==========================================================================================
// Issue 17: hangs, unbounded reads, partial folders, outputs that break inputs, silent
// overflow, unbounded --threads; and the decisions on the questionable cases.
// ==========================================================================================

const GOOD_A: &str = "fixtures/bad/src/good-a.delta.safetensors";

/// `path` under the repository root, as a string for an argument.
fn fixture(path: &str) -> String {
    common::root().join(path).display().to_string()
}

/// Runs `sotu-delta args` in `dir` with `setup` applied to the command, killing it after
/// `secs` seconds: a hang fails the test instead of stalling the suite.
fn sotu_within(dir: &Path, secs: u64, args: &[&str], setup: impl FnOnce(&mut Command)) -> Outcome {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    setup(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(secs) {
            let _ = child.kill();
            let o = Outcome::from_output(child.wait_with_output().unwrap());
            panic!("sotu-delta {args:?} still running after {secs} s; killed\n{o}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Outcome {
        line: args.join(" "),
        ..Outcome::from_output(child.wait_with_output().unwrap())
    }
}

/// `--threads` (and RAYON_NUM_THREADS) above 1024 is a usage error, refused before any
/// thread starts; 1024 itself is accepted.
#[test]
fn threads_above_the_bound_are_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = fixture(GOOD_A);
    for n in ["1025", "100000", "18446744073709551615"] {
        let o = sotu_within(d, 20, &["--threads", n, "inspect", &good], |_| {});
        o.usage_error(&["--threads", "1024"]);
    }
    let o = sotu_within(d, 20, &["inspect", "--summary", &good], |c| {
        c.env("RAYON_NUM_THREADS", "100000");
    });
    o.usage_error(&["RAYON_NUM_THREADS", "1024"]);
    sotu_within(
        d,
        60,
        &["--threads", "1024", "inspect", "--summary", &good],
        |_| {},
    )
    .success();
}

const BASE_BF16: &str = "fixtures/tiny/base-bf16.safetensors";

/// Makes a FIFO at `path`.
fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
}

#[test]
fn fifo_inputs_are_refused_naming_them_without_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (base, good) = (fixture(BASE_BF16), fixture(GOOD_A));
    // A FIFO given directly: as a delta, and as a base.
    mkfifo(&d.join("f.safetensors"));
    for args in [
        vec!["inspect", "f.safetensors"],
        vec!["verify", "--base", "f.safetensors", &good],
        vec![
            "merge",
            "--base",
            &base,
            "f.safetensors",
            "-o",
            "out.safetensors",
        ],
    ] {
        let o = sotu_within(d, 20, &args, |_| {});
        o.error(&["f.safetensors", "not a regular file"]);
    }
    // A model folder whose model.safetensors, or whose index, is a FIFO.
    for name in ["model.safetensors", "model.safetensors.index.json"] {
        let folder = d.join(format!("fifo-{name}"));
        std::fs::create_dir(&folder).unwrap();
        mkfifo(&folder.join(name));
        let f = folder.file_name().unwrap().to_str().unwrap();
        for args in [
            vec!["verify", "--base", f, &good],
            vec!["merge", "--base", f, &good, "-o", "out.safetensors"],
            vec!["inspect", f],
        ] {
            let o = sotu_within(d, 20, &args, |_| {});
            o.error(&[name, "not a regular file"]);
        }
    }
    assert!(!d.join("out.safetensors").exists());
    assert!(partial_files(d).is_empty());
}

/// A shard named by an index that is a FIFO or a folder is "not a regular file", not "missing".
#[test]
fn index_naming_a_fifo_or_a_folder_says_what_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = fixture(GOOD_A);
    for (kind, make) in [
        ("fifo", mkfifo as fn(&Path)),
        ("folder", |p: &Path| std::fs::create_dir(p).unwrap()),
    ] {
        let folder = d.join(kind);
        std::fs::create_dir(&folder).unwrap();
        let index = r#"{"weight_map": {"model.norm.weight": "shard.safetensors"}}"#;
        std::fs::write(folder.join("model.safetensors.index.json"), index).unwrap();
        make(&folder.join("shard.safetensors"));
        let o = sotu_within(d, 20, &["verify", "--base", kind, &good], |_| {});
        o.error(&["shard.safetensors", "not a regular file"]);
        assert!(!o.stderr.contains("does not exist"), "{o}");
    }
}

/// Sets a resource limit (soft and hard) of the child, between fork and exec.
fn limit(cmd: &mut Command, resource: libc::__rlimit_resource_t, value: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let r = libc::rlimit {
                rlim_cur: value,
                rlim_max: value,
            };
            if libc::setrlimit(resource, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// An index that is a link to an endless device is refused at once, in bounded memory (the
/// run is limited to 1 GiB of address space: an unbounded read dies of it).
#[test]
fn index_linked_to_a_device_is_refused_without_reading_it_all() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = fixture(GOOD_A);
    std::fs::create_dir(d.join("z")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", d.join("z/model.safetensors.index.json")).unwrap();
    for args in [
        vec!["verify", "--base", "z", &good],
        vec!["merge", "--base", "z", &good, "-o", "out.safetensors"],
    ] {
        let o = sotu_within(d, 20, &args, |c| limit(c, libc::RLIMIT_AS, 1 << 30));
        o.error(&["model.safetensors.index.json", "not a regular file"]);
        assert!(!o.stderr.contains("memory"), "{o}");
    }
    assert!(!d.join("out.safetensors").exists());
}

/// A checkpoint of `n` one-element f32 tensors, base or fine-tuned.
fn many_tensors(path: &Path, n: usize, tuned: bool) {
    let tensors: Vec<_> = (0..n)
        .map(|i| {
            let v = i as f32 + if tuned { 0.5 } else { 0.0 };
            (
                format!("t{i:04}"),
                Dtype::F32,
                vec![1],
                v.to_le_bytes().to_vec(),
            )
        })
        .collect();
    write_file(path, &tensors, &BTreeMap::new()).unwrap();
}

/// A folder output of many more shards than the process may open files holds one descriptor
/// at a time, not one per shard: merge, apply and extract into 300-plus shards succeed under a
/// limit of 64 open files, and leave nothing else behind.
#[test]
fn folder_output_of_more_shards_than_open_files_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    many_tensors(&d.join("base.safetensors"), 300, false);
    many_tensors(&d.join("tuned.safetensors"), 300, true);
    extract_delta(d);
    let fds = |c: &mut Command| limit(c, libc::RLIMIT_NOFILE, 64);
    let base = ["--base", "base.safetensors"];
    for (args, shards) in [
        (vec!["merge", "d.safetensors", "-o", "merged"], 300),
        (vec!["apply", "d.safetensors", "-o", "applied"], 300),
        (
            vec!["extract", "--tuned", "tuned.safetensors", "-o", "delta"],
            0,
        ),
    ] {
        let mut all = vec![args[0], "-q", "--no-sync", "--shard-size", "1"];
        all.extend(base);
        all.extend(&args[1..]);
        let o = sotu_within(d, 60, &all, fds);
        o.success();
        assert!(partial_files(d).is_empty(), "{:?}", partial_files(d));
        let out = d.join(args.last().unwrap());
        let n = std::fs::read_dir(&out).unwrap().count();
        if shards > 0 {
            // And the model card and recipe of a merged or applied folder (issue #13).
            assert_eq!(
                n,
                shards + 3,
                "{shards} shards, the index, the card and the recipe"
            );
        } else {
            assert!(n > 300, "{n} files");
        }
    }
    // Fewer descriptors than even that: whether it fails or not, nothing is left behind.
    let o = sotu_within(
        d,
        60,
        &[
            "merge",
            "-q",
            "--device",
            "cpu",
            "--shard-size",
            "1",
            "--base",
            "base.safetensors",
            "d.safetensors",
            "-o",
            "starved",
        ],
        |c| limit(c, libc::RLIMIT_NOFILE, 8),
    );
    if o.code != Some(0) {
        o.error(&["starved"]);
        assert!(!d.join("starved").exists(), "{o}");
    }
    assert!(partial_files(d).is_empty(), "{:?}\n{o}", partial_files(d));
    // What was written reads back: the extracted folder applies, the merged folder opens.
    let o = sotu(
        d,
        [
            "apply",
            "--base",
            "base.safetensors",
            "delta",
            "-o",
            "again.safetensors",
        ],
    );
    o.success();
    let o = sotu(d, ["verify", "--base", "merged", "d.safetensors"]);
    assert_eq!(
        o.code,
        Some(1),
        "the merged folder is the fine-tune, not the base\n{o}"
    );
}

/// An output that a reader of an input folder would read (its index, its weights) is refused,
/// and the folder still opens afterwards.
#[test]
fn output_over_the_index_or_weights_of_an_input_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = fixture(GOOD_A);
    std::fs::create_dir(d.join("single")).unwrap();
    std::fs::copy(fixture(BASE_BF16), d.join("single/model.safetensors")).unwrap();
    for out in [
        "single/model.safetensors.index.json",
        "single/./model.safetensors.index.json",
        "single/model.safetensors",
    ] {
        let o = sotu(d, ["merge", "--base", "single", &good, "-o", out]);
        o.error(&[out, "single"]);
        assert!(
            !d.join("single/model.safetensors.index.json").exists(),
            "{o}"
        );
        assert!(partial_files(&d.join("single")).is_empty());
        sotu(d, ["verify", "--base", "single", &good]).success();
    }
    // Another file in the folder is no part of the checkpoint: writing it is fine.
    sotu(
        d,
        [
            "merge",
            "--base",
            "single",
            &good,
            "-o",
            "single/merged.safetensors",
        ],
    )
    .success();
    sotu(d, ["verify", "--base", "single", &good]).success();
}

/// Replacing an output folder would delete a file that an input folder links to: refused,
/// naming the file; the input and the output folder stay as they were.
#[test]
fn replacing_an_output_folder_that_an_input_links_into_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = fixture(GOOD_A);
    std::fs::create_dir(d.join("out5")).unwrap();
    std::fs::copy(fixture(BASE_BF16), d.join("out5/model.safetensors")).unwrap();
    std::fs::write(d.join("out5/config.json"), "{}").unwrap();
    std::fs::create_dir(d.join("hf")).unwrap();
    std::fs::copy(fixture(BASE_BF16), d.join("hf/model.safetensors")).unwrap();
    std::os::unix::fs::symlink("../out5/config.json", d.join("hf/config.json")).unwrap();
    let o = sotu(d, ["merge", "--base", "hf", &good, "-o", "out5"]);
    o.error(&["out5", "config.json"]);
    assert_eq!(
        std::fs::read_to_string(d.join("hf/config.json")).unwrap(),
        "{}"
    );
    assert!(partial_files(d).is_empty());
}

/// Writes a safetensors file of `n` four-element f32 tensors named like a mixture of experts,
/// quickly (the header by hand): value `i + add` in every element of tensor `i`.
fn moe_checkpoint(path: &Path, n: usize, add: f32) {
    use std::fmt::Write as _;
    let mut names: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "model.layers.{}.mlp.experts.{}.down_proj.weight",
                i / 1000,
                i % 1000
            )
        })
        .collect();
    names.sort();
    let mut header = String::from("{");
    for (i, name) in names.iter().enumerate() {
        let at = 16 * i;
        write!(
            header,
            "\"{name}\":{{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[{at},{}]}},",
            at + 16
        )
        .unwrap();
    }
    header.pop();
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    for i in 0..n {
        for _ in 0..4 {
            bytes.extend_from_slice(&(i as f32 + add).to_le_bytes());
        }
    }
    std::fs::write(path, bytes).unwrap();
}

/// A delta whose header would exceed the 100 MB safetensors limit (300,000 tensors) is refused
/// at extract, naming the limit, instead of being written unreadable.
#[test]
fn extract_refuses_a_delta_whose_header_exceeds_the_safetensors_limit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    moe_checkpoint(&d.join("base.safetensors"), 300_000, 0.0);
    moe_checkpoint(&d.join("tuned.safetensors"), 300_000, 0.5);
    for out in ["d.safetensors", "d"] {
        let o = sotu(
            d,
            [
                "extract",
                "-q",
                "--base",
                "base.safetensors",
                "--tuned",
                "tuned.safetensors",
                "--density",
                "1",
                "-o",
                out,
            ],
        );
        o.error(&[out, "100000000"]);
        assert!(!d.join(out).exists());
        assert!(partial_files(d).is_empty());
    }
}

/// A merge result that is infinite or NaN where the base is finite warns, naming the tensor,
/// for f32 and f64 outputs too, and `--json` lists it under `overflowed`: weight 1e307 of a
/// delta of +100 overflows f64 itself, and weights 1e307 and -1e307 make inf - inf = NaN.
fn nonfinite_results_warn_in_every_dtype(device: common::Device) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let w = |v: f64| -> Vec<u8> {
        (0..4)
            .flat_map(|i| ((i as f64 + 1.0 + v) as f32).to_le_bytes())
            .collect()
    };
    let one = |v| vec![("w".to_string(), Dtype::F32, vec![4], w(v))];
    write_file(&d.join("base.safetensors"), &one(0.0), &BTreeMap::new()).unwrap();
    write_file(&d.join("tuned.safetensors"), &one(100.0), &BTreeMap::new()).unwrap();
    let o = sotu(
        d,
        [
            "extract",
            "-q",
            "--base",
            "base.safetensors",
            "--tuned",
            "tuned.safetensors",
            "--density",
            "1",
            "-o",
            "d.safetensors",
        ],
    );
    o.success();
    let dev = device.as_str();
    for dtype in ["f32", "f64", "bf16", "f16"] {
        for weights in [
            &["--weights=1e307"][..],
            &["--weights=1e307,-1e307", "d.safetensors"],
        ] {
            let mut args = vec!["merge", "--json", "--device", dev, "--dtype", dtype];
            args.extend([
                "--base",
                "base.safetensors",
                "d.safetensors",
                "-o",
                "out.safetensors",
            ]);
            args.extend(weights);
            let o = sotu(d, &args);
            o.success();
            let warned = o.stderr.lines().any(|l| {
                l.contains("warning") && l.contains("tensor w:") && l.contains("4 element")
            });
            assert!(warned, "{dtype} {weights:?}: no warning naming w\n{o}");
            assert_eq!(
                o.json()["overflowed"],
                serde_json::json!([["w", 4]]),
                "{dtype} {weights:?}\n{o}"
            );
        }
    }
    // Finite results: no warning.
    let o = sotu(
        d,
        [
            "merge",
            "--json",
            "--device",
            dev,
            "--base",
            "base.safetensors",
            "d.safetensors",
            "-o",
            "out.safetensors",
        ],
    );
    o.success();
    assert!(!o.stderr.contains("warning"), "{o}");
    assert_eq!(o.json()["overflowed"], serde_json::json!([]));
}
common::device_test!(
    nonfinite_results_warn_in_every_dtype,
    nonfinite_results_warn_in_every_dtype_cpu,
    nonfinite_results_warn_in_every_dtype_cuda
);

/// `--slot` takes `K/N` in decimal digits only: a sign or a space is a usage error, not a slot
/// stored as typed. What is stored is the canonical `K/N`.
#[test]
fn slots_with_signs_or_spaces_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    checkpoint(&d.join("base.safetensors"), 64, false);
    checkpoint(&d.join("tuned.safetensors"), 64, true);
    // `--slot=…`, so that "-0/2" is the slot's value, not a flag.
    let extract = |slot: &str, out: &str| {
        let slot = format!("--slot={slot}");
        sotu(
            d,
            [
                "extract",
                "-q",
                "--base",
                "base.safetensors",
                "--tuned",
                "tuned.safetensors",
                &slot,
                "-o",
                out,
            ],
        )
    };
    for slot in [
        "0/2 ", " 0/2", "+1/2", "1/+2", "0 /2", "-0/2", "0/", "/2", "0/2/3", "٠/2",
    ] {
        extract(slot, "bad.safetensors").usage_error(&["--slot", "K/N"]);
        assert!(!d.join("bad.safetensors").exists());
    }
    extract("01/2", "ok.safetensors").success();
    let o = sotu(d, ["inspect", "--json", "ok.safetensors"]);
    o.success();
    assert!(
        o.stdout.contains("\"1/2\""),
        "the slot is stored as 1/2\n{o}"
    );
    assert!(!o.stdout.contains("01/2"), "{o}");
}

/// The same delta given twice (by any path) warns: its changes are added twice.
#[test]
fn the_same_delta_given_twice_warns() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    checkpoint(&d.join("base.safetensors"), 64, false);
    checkpoint(&d.join("tuned.safetensors"), 64, true);
    extract_delta(d);
    std::fs::hard_link(d.join("d.safetensors"), d.join("same.safetensors")).unwrap();
    let merge = |deltas: &[&str]| {
        let mut args = vec!["merge", "-q", "--base", "base.safetensors"];
        args.extend(deltas);
        args.extend(["-o", "out.safetensors"]);
        sotu(d, &args)
    };
    for twice in [
        ["d.safetensors", "d.safetensors"],
        ["d.safetensors", "./same.safetensors"],
    ] {
        let o = merge(&twice);
        o.success();
        let w = o.message("warning");
        assert!(w.contains(twice[1]) && w.contains("twice"), "{o}");
    }
    // Two different deltas: no warning.
    std::fs::copy(d.join("d.safetensors"), d.join("copy.safetensors")).unwrap();
    let o = merge(&["d.safetensors", "copy.safetensors"]);
    o.success();
    assert!(!o.stderr.contains("warning"), "{o}");
}

/// A folder output whose path is a symbolic link is refused before anything is computed,
/// naming the link; the link and the folder it points to stay as they were.
#[test]
fn folder_output_that_is_a_symbolic_link_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    checkpoint(&d.join("base.safetensors"), 64, false);
    checkpoint(&d.join("tuned.safetensors"), 64, true);
    extract_delta(d);
    let o = sotu(
        d,
        [
            "merge",
            "-q",
            "--base",
            "base.safetensors",
            "d.safetensors",
            "-o",
            "real",
        ],
    );
    o.success();
    let before = std::fs::read(d.join("real/model.safetensors")).unwrap();
    std::os::unix::fs::symlink("real", d.join("link")).unwrap();
    std::os::unix::fs::symlink("nowhere", d.join("dangling")).unwrap();
    for out in ["link", "dangling"] {
        let o = sotu(
            d,
            [
                "merge",
                "--base",
                "base.safetensors",
                "d.safetensors",
                "-o",
                out,
            ],
        );
        o.error(&[out, "symbolic link"]);
        assert!(
            std::fs::symlink_metadata(d.join(out))
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }
    assert_eq!(
        std::fs::read(d.join("real/model.safetensors")).unwrap(),
        before
    );
    assert!(partial_files(d).is_empty());
}

/// A mergekit configuration or an adapter's configuration that is a FIFO is refused at once,
/// naming it, rather than waited on.
#[test]
fn configuration_fifos_are_refused_naming_them_without_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = fixture(BASE_BF16);
    mkfifo(&d.join("merge.yml"));
    let o = sotu_within(
        d,
        20,
        &["merge", "--config", "merge.yml", "-o", "out.safetensors"],
        |_| {},
    );
    o.error(&["merge.yml", "not a regular file"]);
    let adapter = d.join("adapter");
    std::fs::create_dir(&adapter).unwrap();
    std::fs::copy(
        fixture("fixtures/tiny/lora-bf16/adapter_model.safetensors"),
        adapter.join("adapter_model.safetensors"),
    )
    .unwrap();
    mkfifo(&adapter.join("adapter_config.json"));
    for args in [
        vec!["apply", "--base", &base, "adapter", "-o", "out.safetensors"],
        vec![
            "extract",
            "--base",
            &base,
            "--tuned",
            "adapter",
            "-o",
            "out.safetensors",
        ],
    ] {
        let o = sotu_within(d, 20, &args, |_| {});
        o.error(&["adapter_config.json", "not a regular file"]);
    }
    assert!(!d.join("out.safetensors").exists());
}
