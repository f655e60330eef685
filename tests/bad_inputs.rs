//! The adversarial-input corpus (fixtures/bad/, made by fixtures/bad/make_bad.py) through every
//! subcommand that reads each case.
//!
//! The contract checked, for every bad input and every command that reads it:
//! - exit code exactly 1 (never 101, a panic, nor a signal; 2 is only for bad usage);
//! - standard error has a line beginning `sotu-delta: error:` whose message names the file and
//!   every word of the case's `must_mention` (the tensor or metadata field at fault); `verify`
//!   lists the tensors that differ on standard output by design (README), so for it those words
//!   may be there instead;
//! - nothing at the output path and no `.sotu-delta-partial-*` file in the output folder;
//! - the input files unchanged, byte for byte.
//!
//! A case may expect "ok" (exit 0) or "any" (exit 0, or exit 1 under the rules above) from some
//! commands, each with a one-line reason in the manifest.
//!
//! Each family of subcommands is one test that runs every case and collects every failure, so
//! that one run lists all of them as (case, command, reason). Every run is made twice, with the
//! inputs memory-mapped (`--io mmap`, the default) and read by position (`--io read`): the two
//! readers must refuse alike.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use assert_cmd::Command;
use rayon::prelude::*;
use serde_json::Value;

mod common;
use common::{partial_files, root};

const OUTPUT: &str = "out.safetensors";

/// Valid partners of the bad cases.
const BASE: &str = "fixtures/tiny/base-bf16.safetensors";
const TUNED: &str = "fixtures/tiny/task1-bf16.safetensors";
const GOOD_A: &str = "fixtures/bad/src/good-a.delta.safetensors";
const GOOD_B: &str = "fixtures/bad/src/good-b.delta.safetensors";

/// The command ids of each role, as the manifest's `expect` names them.
const CHECKPOINT_COMMANDS: [&str; 6] = [
    "extract-base",
    "extract-tuned",
    "merge-base",
    "apply-base",
    "verify-base",
    "inspect-base",
];
const DELTA_COMMANDS: [&str; 5] = ["apply", "merge", "inspect", "inspect-base", "verify"];
const PAIR_COMMANDS: [&str; 2] = ["extract", "extract-allow-nonfinite"];

fn bad_dir() -> PathBuf {
    root().join("fixtures/bad")
}

/// One entry of fixtures/bad/manifest.json.
#[derive(Clone, Debug)]
struct Case {
    file: String,
    role: String,
    class: String,
    about: String,
    must_mention: Vec<String>,
    /// Command id -> "ok" | "any" | "error".
    expect: BTreeMap<String, String>,
    reason: Option<String>,
    /// Pairs only.
    base: Option<String>,
    tuned: Option<String>,
}

impl Case {
    fn expectation(&self, command: &str) -> &str {
        self.expect.get(command).map_or("error", String::as_str)
    }
}

fn manifest() -> Vec<Case> {
    let path = bad_dir().join("manifest.json");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run python3 fixtures/bad/make_bad.py",
            path.display()
        )
    });
    let list: Vec<Value> = serde_json::from_str(&text).expect("manifest.json is a JSON list");
    let s = |v: &Value, k: &str| -> String {
        v[k].as_str()
            .unwrap_or_else(|| panic!("manifest: a case lacks the string {k:?}: {v}"))
            .to_string()
    };
    list.iter()
        .map(|v| Case {
            file: s(v, "file"),
            role: s(v, "role"),
            class: s(v, "class"),
            about: s(v, "about"),
            must_mention: v["must_mention"]
                .as_array()
                .unwrap_or_else(|| panic!("manifest: must_mention is not a list: {v}"))
                .iter()
                .map(|w| w.as_str().expect("must_mention holds strings").to_string())
                .collect(),
            expect: v
                .get("expect")
                .and_then(Value::as_object)
                .map(|o| {
                    o.iter()
                        .map(|(k, x)| (k.clone(), x.as_str().expect("expect values").to_string()))
                        .collect()
                })
                .unwrap_or_default(),
            reason: v.get("reason").and_then(Value::as_str).map(String::from),
            base: v.get("base").and_then(Value::as_str).map(String::from),
            tuned: v.get("tuned").and_then(Value::as_str).map(String::from),
        })
        .collect()
}

/// One run of the binary: its arguments (bare file names, run in a fresh folder holding `files`).
struct Run {
    case: Case,
    command: &'static str,
    /// `--io` mode.
    io: &'static str,
    args: Vec<String>,
    /// (name in the run folder, source path)
    files: Vec<(String, PathBuf)>,
    writes_output: bool,
}

fn name_of(path: &str) -> String {
    Path::new(path)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// Builds the run of `command` on `case`, reading inputs as `--io io` says.
fn build(case: &Case, command: &'static str, io: &'static str) -> Run {
    let bad = |f: &str| (name_of(f), bad_dir().join(f));
    let good = |f: &str| (name_of(f), root().join(f));
    let x = case.file.as_str();
    let (args, files): (Vec<&str>, Vec<(String, PathBuf)>) = match command {
        "extract-base" => (
            vec!["extract", "--base", x, "--tuned", "@tuned", "-o", OUTPUT],
            vec![bad(x), good(TUNED)],
        ),
        "extract-tuned" => (
            vec!["extract", "--base", "@base", "--tuned", x, "-o", OUTPUT],
            vec![good(BASE), bad(x)],
        ),
        "merge-base" => (
            vec!["merge", "--base", x, "@a", "@b", "-o", OUTPUT],
            vec![bad(x), good(GOOD_A), good(GOOD_B)],
        ),
        "apply-base" => (
            vec!["apply", "--base", x, "@a", "-o", OUTPUT],
            vec![bad(x), good(GOOD_A)],
        ),
        "verify-base" => (
            vec!["verify", "--base", x, "@a"],
            vec![bad(x), good(GOOD_A)],
        ),
        "inspect-base" if case.role == "checkpoint" => (
            vec!["inspect", "--base", x, "@a", "@b"],
            vec![bad(x), good(GOOD_A), good(GOOD_B)],
        ),
        "apply" => (
            vec!["apply", "--base", "@base", x, "-o", OUTPUT],
            vec![good(BASE), bad(x)],
        ),
        "merge" => (
            vec!["merge", "--base", "@base", "@b", x, "-o", OUTPUT],
            vec![good(BASE), good(GOOD_B), bad(x)],
        ),
        "inspect" => (vec!["inspect", x], vec![bad(x)]),
        "inspect-base" => (
            vec!["inspect", "--base", "@base", x, "@b"],
            vec![good(BASE), bad(x), good(GOOD_B)],
        ),
        "verify" => (
            vec!["verify", "--base", "@base", x],
            vec![good(BASE), bad(x)],
        ),
        "extract" | "extract-allow-nonfinite" => {
            let (b, t) = (
                case.base.as_deref().expect("a pair names its base"),
                case.tuned.as_deref().expect("a pair names its fine-tune"),
            );
            let mut files = vec![bad(b)];
            if t != b {
                files.push(bad(t));
            }
            let mut args = vec!["extract", "--base", "@pb", "--tuned", "@pt", "-o", OUTPUT];
            if command == "extract-allow-nonfinite" {
                args.push("--allow-nonfinite");
            }
            (args, files)
        }
        _ => unreachable!("unknown command {command}"),
    };
    let args = ["--io", io]
        .into_iter()
        .chain(args)
        .map(|a| match a {
            "@tuned" => name_of(TUNED),
            "@base" => name_of(BASE),
            "@a" => name_of(GOOD_A),
            "@b" => name_of(GOOD_B),
            "@pb" => name_of(case.base.as_deref().unwrap()),
            "@pt" => name_of(case.tuned.as_deref().unwrap()),
            a => a.to_string(),
        })
        .collect();
    Run {
        case: case.clone(),
        command,
        io,
        args,
        files,
        writes_output: ["extract", "merge", "apply"]
            .iter()
            .any(|c| command.starts_with(c)),
    }
}

/// Runs `run` in a fresh folder and returns what broke the contract, if anything.
fn check(run: &Run) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| format!("temporary folder: {e}"))?;
    let mut before = Vec::new();
    for (name, src) in &run.files {
        let bytes = fs::read(src).map_err(|e| format!("read {}: {e}", src.display()))?;
        fs::write(dir.path().join(name), &bytes).map_err(|e| format!("copy {name}: {e}"))?;
        before.push((name.clone(), bytes));
    }
    let out = Command::cargo_bin("sotu-delta")
        .map_err(|e| format!("the sotu-delta binary: {e}"))?
        .current_dir(dir.path())
        .args(&run.args)
        .timeout(Duration::from_secs(60))
        .output()
        .map_err(|e| format!("run: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let code = out.status.code();
    let line = format!("sotu-delta {}", run.args.join(" "));
    let shown = || {
        let cut = |s: &str| -> String {
            let s = s.trim_end();
            if s.len() > 600 {
                let mut at = 600;
                while !s.is_char_boundary(at) {
                    at -= 1;
                }
                format!("{}…", &s[..at])
            } else {
                s.to_string()
            }
        };
        format!(
            "\n      $ {line}\n      exit {code:?}; stderr: {}\n      stdout: {}",
            cut(&stderr),
            cut(&stdout)
        )
    };
    let mut problems: Vec<String> = Vec::new();

    // Inputs unchanged, and nothing left behind unless the command succeeded.
    for (name, bytes) in &before {
        match fs::read(dir.path().join(name)) {
            Ok(now) if now == *bytes => {}
            Ok(_) => problems.push(format!("input {name} was modified")),
            Err(e) => problems.push(format!("input {name} is gone: {e}")),
        }
    }
    let partials = partial_files(dir.path());
    if !partials.is_empty() {
        problems.push(format!("partial files left: {partials:?}"));
    }
    if stderr.contains("panicked") || code == Some(101) {
        problems.push("panicked".into());
    }
    if code.is_none() {
        problems.push("killed by a signal".into());
    }

    let expect = run.case.expectation(run.command);
    let succeeded = code == Some(0);
    let error_ok = |problems: &mut Vec<String>| {
        if code != Some(1) {
            problems.push(format!("exit code {code:?}, expected 1"));
        }
        if dir.path().join(OUTPUT).exists() {
            problems.push(format!("{OUTPUT} was written despite the failure"));
        }
        let prefix = "sotu-delta: error:";
        let Some(at) = stderr
            .match_indices(prefix)
            .map(|(i, _)| i)
            .find(|&i| i == 0 || stderr.as_bytes()[i - 1] == b'\n')
        else {
            problems.push(format!("stderr has no line beginning {prefix:?}"));
            return;
        };
        let message = &stderr[at + prefix.len()..];
        let file = name_of(&run.case.file);
        if !message.contains(&file) {
            problems.push(format!("the error message does not name the file {file}"));
        }
        // verify lists the tensors that differ on stdout (README).
        let lenient = run.command.starts_with("verify");
        for w in &run.case.must_mention {
            if !(message.contains(w.as_str()) || lenient && stdout.contains(w.as_str())) {
                problems.push(format!("the error message does not mention {w:?}"));
            }
        }
    };
    match expect {
        "ok" => {
            if !succeeded {
                problems.push(format!("exit code {code:?}, expected success"));
            } else if run.writes_output && !dir.path().join(OUTPUT).exists() {
                problems.push(format!("succeeded but wrote no {OUTPUT}"));
            }
        }
        "any" if succeeded => {}
        "any" | "error" => error_ok(&mut problems),
        other => problems.push(format!("manifest: unknown expectation {other:?}")),
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("{}{}", problems.join("; "), shown()))
    }
}

/// Runs `commands` on every case of `role`, in parallel, and fails listing every failure.
fn run_family(family: &str, selection: &[(&str, &[&'static str])]) {
    let cases = manifest();
    let mut runs = Vec::new();
    for (role, commands) in selection {
        for case in cases.iter().filter(|c| c.role == *role) {
            for command in commands.iter() {
                for io in ["mmap", "read"] {
                    runs.push(build(case, command, io));
                }
            }
        }
    }
    assert!(!runs.is_empty(), "{family}: no case to run");
    let failures: Vec<String> = runs
        .par_iter()
        .filter_map(|r| {
            check(r).err().map(|why| {
                format!(
                    "  [{}] {} ({}), {} --io {}: {why}",
                    r.case.role, r.case.file, r.case.class, r.command, r.io
                )
            })
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{family}: {} of {} run(s) broke the contract:\n{}\n",
        failures.len(),
        runs.len(),
        failures.join("\n")
    );
}

#[test]
fn extract_refuses_bad_checkpoints_and_pairs() {
    run_family(
        "extract",
        &[
            ("checkpoint", &["extract-base", "extract-tuned"]),
            ("pair", &PAIR_COMMANDS),
        ],
    );
}

#[test]
fn merge_and_apply_refuse_bad_bases_and_deltas() {
    run_family(
        "merge/apply",
        &[
            ("checkpoint", &["merge-base", "apply-base"]),
            ("delta", &["merge", "apply"]),
        ],
    );
}

#[test]
fn inspect_refuses_bad_deltas_and_bases() {
    run_family(
        "inspect",
        &[
            ("checkpoint", &["inspect-base"]),
            ("delta", &["inspect", "inspect-base"]),
        ],
    );
}

#[test]
fn verify_refuses_bad_deltas_and_bases() {
    run_family(
        "verify",
        &[("checkpoint", &["verify-base"]), ("delta", &["verify"])],
    );
}

#[test]
fn manifest_is_complete() {
    let cases = manifest();
    assert!(
        cases.len() >= 40,
        "only {} cases in fixtures/bad/manifest.json",
        cases.len()
    );
    let mut problems = Vec::new();
    for c in &cases {
        let commands: &[&str] = match c.role.as_str() {
            "checkpoint" => &CHECKPOINT_COMMANDS,
            "delta" => &DELTA_COMMANDS,
            "pair" => &PAIR_COMMANDS,
            other => {
                problems.push(format!("{}: unknown role {other:?}", c.file));
                continue;
            }
        };
        for f in [Some(&c.file), c.base.as_ref(), c.tuned.as_ref()]
            .into_iter()
            .flatten()
        {
            if !bad_dir().join(f).is_file() {
                problems.push(format!("{}: fixtures/bad/{f} does not exist", c.file));
            }
        }
        if c.about.trim().is_empty() || c.class.trim().is_empty() {
            problems.push(format!("{}: a case needs a class and an about", c.file));
        }
        if c.role == "pair" && (c.base.is_none() || c.tuned.is_none()) {
            problems.push(format!("{}: a pair needs base and tuned", c.file));
        }
        for (k, v) in &c.expect {
            if !commands.contains(&k.as_str()) {
                problems.push(format!(
                    "{}: expect names {k:?}, not a {} command",
                    c.file, c.role
                ));
            }
            if !["ok", "any", "error"].contains(&v.as_str()) {
                problems.push(format!("{}: expect {k:?} is {v:?}", c.file));
            }
        }
        if !c.expect.is_empty() && c.reason.as_deref().is_none_or(str::is_empty) {
            problems.push(format!("{}: an expect override without a reason", c.file));
        }
    }
    // Every error class the corpus promises.
    let classes: BTreeSet<&str> = cases.iter().map(|c| c.class.as_str()).collect();
    for class in [
        "truncated",
        "header-too-large",
        "header-past-eof",
        "not-json-object",
        "duplicate-name",
        "overlapping-offsets",
        "offset-out-of-range",
        "shape-overflow",
        "unknown-dtype",
        "empty-file",
        "unknown-version",
        "missing-metadata",
        "contradictory-metadata",
        "kept-count-mismatch",
        "lying-offsets",
        "density-out-of-range",
        "lo-greater-than-hi",
        "wrong-base",
        "shape-mismatch",
        "dtype-mismatch",
        "name-mismatch",
        "empty-checkpoint",
        "nonfinite",
    ] {
        if !classes.contains(class) {
            problems.push(format!("no case of class {class:?}"));
        }
    }
    for key in [
        "format",
        "format_version",
        "mask",
        "seed",
        "lo",
        "hi",
        "chunk",
        "tensors",
    ] {
        if !cases
            .iter()
            .any(|c| c.class == "missing-metadata" && c.must_mention == [key])
        {
            problems.push(format!("no case of a delta missing __metadata__.{key}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn make_bad_py_reproduces_the_committed_corpus() {
    let out = tempfile::tempdir().expect("temporary folder");
    let script = bad_dir().join("make_bad.py");
    let run = std::process::Command::new("python3")
        .arg(&script)
        .arg("--out")
        .arg(out.path())
        .output()
        .expect("run python3 (Python 3 is needed to regenerate fixtures/bad)");
    assert!(
        run.status.success(),
        "{} failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&run.stderr)
    );
    let listing = |dir: &Path| -> BTreeSet<String> {
        fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".safetensors") || n == "manifest.json")
            .collect()
    };
    let made = listing(out.path());
    let committed = listing(&bad_dir());
    let mut problems = Vec::new();
    for f in made.symmetric_difference(&committed) {
        problems.push(if made.contains(f) {
            format!("{f}: generated but not committed")
        } else {
            format!("{f}: committed but no longer generated")
        });
    }
    for f in made.intersection(&committed) {
        if fs::read(out.path().join(f)).unwrap() != fs::read(bad_dir().join(f)).unwrap() {
            problems.push(format!(
                "{f}: the generated bytes differ from the committed file"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "python3 fixtures/bad/make_bad.py does not reproduce fixtures/bad (rerun it):\n{}",
        problems.join("\n")
    );
    assert!(made.len() > 40, "only {} files generated", made.len());
}
