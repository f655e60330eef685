//! A folder ready to upload (issue #13): the model card (`README.md`) and the recipe
//! (`sotu-delta.json`) that `merge` and `apply` write into a folder output, and the replay of a
//! recipe (`merge --recipe`).
//!
//! The contract, from the issue:
//! - the card replaces the base's; its YAML front matter has `base_model` (config.json's
//!   `_name_or_path`, else the base folder's name), `base_model_relation` (`merge` / `finetune`),
//!   `tags` ([sotu-delta, merge] for a merge), `library_name: transformers` where the base has a
//!   config.json, and the base card's `license`; its body names the inputs, the method and its
//!   parameters, seeds, densities, weights, the base fingerprint, the tool version and the
//!   command;
//! - a base card that cannot be parsed gives a warning and a fresh card, never a failed merge;
//! - the recipe records the inputs with fingerprints, every parameter and the version;
//!   `merge --recipe R -o OUT` gives the same shards, index and tensors; an input whose
//!   fingerprint changed is refused, naming it, and nothing is written.
//!
//! The card's front matter is read here with serde-saphyr (the tool writes it with serde_json,
//! as YAML's flow style; tests/reference/test_card.py reads it with PyYAML, the Hub library's
//! reader); fingerprints are
//! checked against what other commands report (`extract --json`'s `output_fingerprint`,
//! `merge --json`'s `base_fingerprint`).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use serde_json::Value;

mod common;
use common::{Outcome, ok, partial_files, root, run, tmp};

const CONFIG: &str = r#"{"_name_or_path": "acme/tiny-llama", "model_type": "llama"}"#;
const BASE_CARD: &str = "---\nlicense: apache-2.0\nlanguage:\n- en\n---\n# The tiny base\n\nIt claims to be the base.\n";

/// A temporary folder with `base/` (the tiny fixture's base as `model.safetensors`, with a
/// config.json and a card), `base.safetensors`, and three slot deltas `d1.st` … `d3.st`.
fn setup() -> tempfile::TempDir {
    let dir = tmp();
    let d = dir.path();
    let fx = root().join("fixtures/tiny");
    fs::create_dir(d.join("base")).unwrap();
    fs::copy(
        fx.join("base-bf16.safetensors"),
        d.join("base/model.safetensors"),
    )
    .unwrap();
    fs::copy(fx.join("base-bf16.safetensors"), d.join("base.safetensors")).unwrap();
    fs::write(d.join("base/config.json"), CONFIG).unwrap();
    fs::write(d.join("base/README.md"), BASE_CARD).unwrap();
    for k in 1..=3 {
        fs::copy(
            fx.join(format!("task{k}-bf16.safetensors")),
            d.join(format!("t{k}.safetensors")),
        )
        .unwrap();
        ok(
            d,
            &format!(
                "extract --base base --tuned t{k}.safetensors --slot {}/3 --seed 7 -o d{k}.st",
                k - 1
            ),
        );
    }
    dir
}

/// The front matter of the card at `path`, as a YAML mapping, and its body.
fn card(path: &Path) -> (BTreeMap<String, Value>, String) {
    let text = fs::read_to_string(path).unwrap();
    let rest = text
        .strip_prefix("---\n")
        .unwrap_or_else(|| panic!("{}: no front matter\n{text}", path.display()));
    let end = rest.find("\n---\n").expect("front matter closed");
    let map = serde_saphyr::from_str(&rest[..end])
        .unwrap_or_else(|e| panic!("front matter not a mapping: {e}\n{text}"));
    (map, rest[end + 5..].to_string())
}

fn strings(y: &Value) -> Vec<String> {
    y.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn recipe(dir: &Path) -> Value {
    serde_json::from_slice(&fs::read(dir.join("sotu-delta.json")).unwrap()).unwrap()
}

/// Every file of folder `dir` (not recursive) with its bytes.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.path().is_file())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// The weights and index of folder `dir`.
fn weights(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    files(dir)
        .into_iter()
        .filter(|(n, _)| n.ends_with(".safetensors") || n.ends_with(".index.json"))
        .collect()
}

#[test]
fn merge_into_a_folder_writes_a_card_for_the_hub_replacing_the_base_card() {
    let dir = setup();
    let d = dir.path();
    let o = ok(
        d,
        "merge --json --base base d1.st d2.st d3.st --weights 1,0.5,2 -o merged",
    );
    let report = o.json();
    let (front, body) = card(&d.join("merged/README.md"));
    assert_eq!(front["base_model"].as_str(), Some("acme/tiny-llama"));
    assert_eq!(front["base_model_relation"].as_str(), Some("merge"));
    assert_eq!(strings(&front["tags"]), ["sotu-delta", "merge"]);
    assert_eq!(front["library_name"].as_str(), Some("transformers"));
    assert_eq!(front["license"].as_str(), Some("apache-2.0"));
    assert!(
        !front.contains_key("language"),
        "only the license is carried over"
    );
    assert!(!body.contains("It claims to be the base"), "{body}");
    // The body: inputs, seeds, densities, slots, weights, method, fingerprints, tool, command.
    let fp = report["base_fingerprint"].as_str().unwrap();
    for want in [
        "base `base`",
        "delta `d1.st` | 7 | 0.333333 | 0/3 | 1 |",
        "delta `d2.st` | 7 | 0.333333 | 1/3 | 0.5 |",
        "delta `d3.st` | 7 | 0.333333 | 2/3 | 2 |",
        "method: `sum`",
        "weights: 1, 0.5, 2",
        fp,
        concat!("sotu-delta ", env!("CARGO_PKG_VERSION")),
        "sotu-delta merge --json --base base d1.st d2.st d3.st --weights 1,0.5,2 -o merged",
    ] {
        assert!(body.contains(want), "the card lacks {want:?}\n{body}");
    }
    // The base's other files still come along, the card and recipe are listed in --json.
    assert_eq!(
        fs::read_to_string(d.join("merged/config.json")).unwrap(),
        CONFIG
    );
    let outputs: Vec<&str> = report["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for name in ["README.md", "sotu-delta.json", "config.json"] {
        assert_eq!(
            outputs
                .iter()
                .filter(|p| p.ends_with(&format!("/{name}")))
                .count(),
            1,
            "{name} in {outputs:?}"
        );
    }
}

#[test]
fn apply_into_a_folder_writes_a_finetune_card_and_without_config_names_the_folder() {
    let dir = setup();
    let d = dir.path();
    fs::remove_file(d.join("base/config.json")).unwrap();
    fs::remove_file(d.join("base/README.md")).unwrap();
    fs::rename(d.join("base"), d.join("my-base")).unwrap();
    ok(d, "apply --base my-base d2.st -o task2");
    let (front, body) = card(&d.join("task2/README.md"));
    assert_eq!(front["base_model"].as_str(), Some("my-base"));
    assert_eq!(front["base_model_relation"].as_str(), Some("finetune"));
    assert_eq!(strings(&front["tags"]), ["sotu-delta"]);
    assert!(!front.contains_key("library_name"), "no config.json");
    assert!(!front.contains_key("license"), "no base card");
    assert!(body.contains("rescale by 1/density: true"), "{body}");
    assert_eq!(recipe(&d.join("task2"))["operation"], "apply");
    // A file output has neither card nor recipe.
    ok(d, "apply --base my-base d2.st -o task2.st");
    assert!(d.join("task2.st").is_file());
    assert!(!d.join("README.md").exists() && !d.join("sotu-delta.json").exists());
}

#[test]
fn a_base_card_that_cannot_be_parsed_warns_and_gets_a_fresh_card() {
    let dir = setup();
    let d = dir.path();
    let bomb = "---\na: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\ng: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]\nh: [*g, *g, *g, *g, *g, *g, *g, *g, *g]\nlicense: mit\n---\n";
    let cases: [(&str, &[u8]); 5] = [
        ("bad-yaml", b"---\nlicense: [unclosed\n---\nbody\n"),
        ("not-a-mapping", b"---\n- a list\n---\n"),
        ("unclosed", b"---\nlicense: mit\nno end\n"),
        ("not-utf8", b"---\nlicense: \xff\xfe\n---\n"),
        ("alias-bomb", bomb.as_bytes()),
    ];
    for (name, text) in cases {
        fs::write(d.join("base/README.md"), text).unwrap();
        let out = format!("m-{name}");
        let o = run(d, &format!("merge --base base d1.st d2.st -o {out}"));
        o.success();
        let warning = o.message("warning");
        assert!(
            warning.contains("base/README.md") && warning.contains("fresh card"),
            "{name}: {o}"
        );
        let (front, _) = card(&d.join(&out).join("README.md"));
        assert_eq!(
            front["base_model_relation"].as_str(),
            Some("merge"),
            "{name}"
        );
        assert!(!front.contains_key("license"), "{name}");
    }
    // A card without front matter is no error: nothing to carry over, no warning.
    fs::write(d.join("base/README.md"), "# Just a title\n").unwrap();
    let o = ok(d, "merge --base base d1.st d2.st -o m-plain");
    assert!(!o.stderr.contains("warning"), "{o}");
}

#[test]
fn the_recipe_records_inputs_with_fingerprints_and_every_parameter() {
    let dir = setup();
    let d = dir.path();
    let ex = ok(
        d,
        "extract --json --base base --tuned t1.safetensors --density 0.25 --seed 3 -o x1.st",
    )
    .json();
    let m = ok(
        d,
        "merge --json --base base x1.st d2.st --method ties --trim 0.3 --alpha 0.9 --weights 2,1 --dtype f32 --shard-size 100KB -o merged",
    )
    .json();
    let r = recipe(&d.join("merged"));
    assert_eq!(r["format"], "sotu-delta-recipe");
    assert_eq!(r["version"], 1);
    assert_eq!(r["tool"], concat!("sotu-delta ", env!("CARGO_PKG_VERSION")));
    assert_eq!(r["operation"], "merge");
    assert_eq!(r["base"]["path"], "base");
    assert_eq!(r["base"]["fingerprint"], m["base_fingerprint"]);
    assert_eq!(r["deltas"][0]["path"], "x1.st");
    assert_eq!(r["deltas"][0]["fingerprint"], ex["output_fingerprint"]);
    assert_eq!(r["deltas"][0]["seed"], 3);
    assert_eq!(r["deltas"][1]["slot"], "1/3");
    let p = &r["parameters"];
    assert_eq!(p["method"], "ties");
    assert_eq!(p["trim"], 0.3);
    assert_eq!(p["alpha"], 0.9);
    assert_eq!(p["weights"], serde_json::json!([2.0, 1.0]));
    assert_eq!(p["dtype"], "f32");
    assert_eq!(p["shard_size"], 100_000);
    assert_eq!(p["force"], false);
    assert_eq!(r["command"][1], "merge");
}

/// Runs `line` expecting exit 1 naming `what`, and no `out` nor partial file in `dir`.
#[track_caller]
fn refused(dir: &Path, line: &str, out: &str, what: &[&str]) -> Outcome {
    let o = run(dir, line);
    o.error(what);
    assert!(!dir.join(out).exists(), "{out} written\n{o}");
    assert!(partial_files(dir).is_empty(), "{o}");
    o
}

#[test]
fn a_replayed_recipe_gives_the_same_shards_and_index() {
    let dir = setup();
    let d = dir.path();
    for (line, out) in [
        (
            "merge --base base d1.st d2.st d3.st --weights 0.5,1,-1 --rescale --dtype f32 --shard-size 60KB -o",
            "m",
        ),
        ("merge --method tsv --base base d1.st d3.st -o", "tsv"),
        ("apply --base base.safetensors d2.st --no-rescale -o", "a"),
    ] {
        ok(d, &format!("{line} {out}"));
        let want = weights(&d.join(out));
        if out == "m" {
            assert!(
                want.len() > 2,
                "test design: a sharded folder {:?}",
                want.keys()
            );
        }
        let again = format!("{out}-again");
        ok(
            d,
            &format!("merge --recipe {out}/sotu-delta.json -o {again}"),
        );
        assert!(
            weights(&d.join(&again)) == want,
            "{line}: the replay wrote other weights"
        );
        // The replay's recipe has the same inputs and parameters, and replays too.
        let (r0, r1) = (recipe(&d.join(out)), recipe(&d.join(&again)));
        for k in ["operation", "base", "deltas", "parameters"] {
            assert_eq!(r0[k], r1[k], "{line}: {k}");
        }
    }
    // From another folder: the paths as given are not there, the absolute ones are.
    let elsewhere = d.join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    ok(&elsewhere, "merge --recipe ../m/sotu-delta.json -o m3");
    assert!(weights(&elsewhere.join("m3")) == weights(&d.join("m")));
    // The recipe's parameters are not given again.
    run(d, "merge --recipe m/sotu-delta.json --weights 1,1,1 -o x").usage_error(&["--recipe"]);
    run(d, "merge --recipe m/sotu-delta.json --base base -o x").usage_error(&["--recipe"]);
}

#[test]
fn a_recipe_whose_inputs_changed_is_refused_naming_the_input() {
    let dir = setup();
    let d = dir.path();
    ok(d, "merge --base base d1.st d2.st -o m");
    // A delta rewritten with other contents (another fine-tune, same slot and seed).
    let saved = fs::read(d.join("d2.st")).unwrap();
    ok(
        d,
        "extract --base base --tuned t3.safetensors --slot 1/3 --seed 7 -o d2.st",
    );
    let o = refused(
        d,
        "merge --recipe m/sotu-delta.json -o r",
        "r",
        &["d2.st", "recipe"],
    );
    assert!(!o.stderr.contains("d1.st"), "{o}");
    fs::write(d.join("d2.st"), saved).unwrap();
    // A base changed in place: one byte of a tensor.
    let base = d.join("base/model.safetensors");
    let mut bytes = fs::read(&base).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&base, bytes).unwrap();
    refused(
        d,
        "merge --recipe m/sotu-delta.json -o r",
        "r",
        &["base", "recipe"],
    );
    // A missing input, a file that is not a recipe.
    fs::remove_file(d.join("d1.st")).unwrap();
    refused(d, "merge --recipe m/sotu-delta.json -o r", "r", &["d1.st"]);
    fs::write(d.join("x.json"), r#"{"format": "other"}"#).unwrap();
    refused(d, "merge --recipe x.json -o r", "r", &["x.json", "recipe"]);
}

/// A sentence-transformers layout (all-MiniLM-L6-v2's, and a Dense layer): `modules.json`
/// names `1_Pooling/` (a config), `2_Dense/` (a checkpoint of its own) and `2_Normalize/` (empty).
/// `SentenceTransformer(folder)` needs them all; the Dense weights are not the deltas' and are
/// copied as they are, with a warning. Hidden folders (a download's `.cache/`) stay behind.
#[test]
fn merge_copies_library_subfolders_and_says_which_hold_weights() {
    let dir = setup();
    let d = dir.path();
    let b = d.join("base");
    let modules = r#"[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}, {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}, {"idx": 3, "name": "3", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]"#;
    fs::write(b.join("modules.json"), modules).unwrap();
    fs::create_dir_all(b.join("1_Pooling")).unwrap();
    let pooling = r#"{"word_embedding_dimension": 384, "pooling_mode_mean_tokens": true}"#;
    fs::write(b.join("1_Pooling/config.json"), pooling).unwrap();
    fs::create_dir_all(b.join("2_Dense/nested")).unwrap();
    fs::write(b.join("2_Dense/config.json"), r#"{"in_features": 384}"#).unwrap();
    fs::copy(
        root().join("fixtures/tiny/task1-bf16.safetensors"),
        b.join("2_Dense/model.safetensors"),
    )
    .unwrap();
    fs::write(b.join("2_Dense/nested/notes.txt"), "deeper").unwrap();
    fs::create_dir_all(b.join("2_Normalize")).unwrap();
    fs::create_dir_all(b.join(".cache/huggingface")).unwrap();
    fs::write(b.join(".cache/huggingface/download.lock"), "").unwrap();
    let o = ok(d, "merge --json --base base d1.st d2.st -o merged");
    let m = d.join("merged");
    for f in [
        "modules.json",
        "1_Pooling/config.json",
        "2_Dense/config.json",
        "2_Dense/model.safetensors",
        "2_Dense/nested/notes.txt",
    ] {
        assert_eq!(
            fs::read(m.join(f)).unwrap(),
            fs::read(b.join(f)).unwrap(),
            "{f} not copied as it was"
        );
    }
    assert!(m.join("2_Normalize").is_dir());
    assert_eq!(fs::read_dir(m.join("2_Normalize")).unwrap().count(), 0);
    assert!(!m.join(".cache").exists(), "a hidden folder was copied");
    let warning = o.message("warning");
    assert!(
        warning.contains("2_Dense") && warning.contains("copied unchanged"),
        "{o}"
    );
    assert!(!o.stderr.contains("1_Pooling"), "{o}");
    let outputs = o.json()["outputs"].to_string();
    assert!(outputs.contains("1_Pooling/config.json"), "{outputs}");
    // The top level still takes no weights from the base but its own merged ones.
    let top: Vec<String> = files(&m).into_keys().collect();
    assert_eq!(
        top.iter().filter(|n| n.ends_with(".safetensors")).count(),
        1,
        "{top:?}"
    );
}

// ==========================================================================================
// Parts for a cluster: merge --part K/N, then finalize
// ==========================================================================================

const WHOLE: &str = "merge --base base d1.st d2.st d3.st --weights 1,0.5,2 --shard-size 12KB";

/// Runs part k of n of the merge `WHOLE` for each k, each a process of its own, all at once
/// (`env` names the scheduler's variable that gives k to the job array script, or `None` for
/// `--part k/n` on the command line).
fn run_parts(d: &Path, n: usize, out: &str, env: Option<&str>) {
    let children: Vec<_> = (0..n)
        .map(|k| {
            let mut cmd = match env {
                None => {
                    let mut c = std::process::Command::new(common::BIN);
                    c.args(WHOLE.split_whitespace()).args([
                        "--part",
                        &format!("{k}/{n}"),
                        "-o",
                        out,
                    ]);
                    c
                }
                Some(var) => {
                    let mut c = std::process::Command::new("sh");
                    c.arg(root().join("docs/cluster/merge-part.sh"))
                        .args([&n.to_string(), out])
                        .args(WHOLE.split_whitespace().skip(1))
                        .env("SOTU_DELTA", common::BIN)
                        .env_remove("SLURM_ARRAY_TASK_ID")
                        .env_remove("JOB_COMPLETION_INDEX")
                        .env(var, k.to_string());
                    c
                }
            };
            cmd.current_dir(d)
                .stdin(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for (k, c) in children.into_iter().enumerate() {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "part {k}/{n} failed");
    }
}

/// The files of `dir` but the card and recipe, which record the command (and so the output's
/// name).
fn without_command(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    files(dir)
        .into_iter()
        .filter(|(n, _)| n != "README.md" && n != "sotu-delta.json")
        .collect()
}

#[test]
fn parts_as_separate_processes_then_finalize_equal_a_whole_merge() {
    let dir = setup();
    let d = dir.path();
    ok(d, &format!("{WHOLE} -o whole"));
    let want = without_command(&d.join("whole"));
    let shards = want.keys().filter(|n| n.ends_with(".safetensors")).count();
    assert!(shards >= 4, "test design: {shards} shards");
    assert!(want.contains_key("model.safetensors.index.json"));
    // 3 parts; and more parts than shards (some parts write none).
    for (n, out) in [(3, "p3"), (shards + 2, "pmany")] {
        run_parts(d, n, out, None);
        assert!(!d.join(out).exists(), "{out} appeared before finalize");
        let o = ok(d, &format!("finalize {out}"));
        assert!(o.stdout.contains(&format!("{n} parts")), "{o}");
        assert!(
            without_command(&d.join(out)) == want,
            "{n} parts: not the files of the whole merge"
        );
        assert!(!d.join(format!("{out}.parts")).exists());
        assert!(partial_files(d).is_empty(), "{:?}", partial_files(d));
        // The card and recipe are the whole merge's, its command aside.
        let (r0, r1) = (recipe(&d.join("whole")), recipe(&d.join(out)));
        for k in ["operation", "base", "deltas", "parameters"] {
            assert_eq!(r0[k], r1[k], "{n} parts: recipe {k}");
        }
        let command: Vec<&str> = r1["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w.as_str().unwrap())
            .collect();
        assert!(!command.contains(&"--part"), "{command:?}");
        assert_eq!(
            card(&d.join(out).join("README.md")).0,
            card(&d.join("whole/README.md")).0
        );
    }
}

#[test]
fn the_job_array_script_runs_the_parts_under_slurm_and_kubernetes_variables() {
    let dir = setup();
    let d = dir.path();
    ok(d, &format!("{WHOLE} -o whole"));
    let want = without_command(&d.join("whole"));
    for (var, out) in [
        ("SLURM_ARRAY_TASK_ID", "slurm"),
        ("JOB_COMPLETION_INDEX", "k8s"),
    ] {
        run_parts(d, 3, out, Some(var));
        ok(d, &format!("finalize {out}"));
        assert!(without_command(&d.join(out)) == want, "{var}");
    }
    // Without either variable the script says what it needs.
    let o = Outcome::from_output(
        std::process::Command::new("sh")
            .arg(root().join("docs/cluster/merge-part.sh"))
            .args(["3", "x", "--base", "base", "d1.st"])
            .env_remove("SLURM_ARRAY_TASK_ID")
            .env_remove("JOB_COMPLETION_INDEX")
            .current_dir(d)
            .output()
            .unwrap(),
    );
    assert_eq!(o.code, Some(2), "{o}");
    assert!(o.stderr.contains("SLURM_ARRAY_TASK_ID"), "{o}");
}

#[test]
fn finalize_refuses_missing_or_foreign_parts_naming_them() {
    let dir = setup();
    let d = dir.path();
    // Nothing yet.
    refused(d, "finalize out", "out", &["out.parts"]);
    // Parts 0 and 2 of 3: part 1 is missing.
    for k in [0, 2] {
        ok(d, &format!("{WHOLE} --part {k}/3 -o out"));
    }
    refused(d, "finalize out", "out", &["part-1-of-3.json", "missing"]);
    // Part 1 from another merge (other weights): its shards do not belong.
    ok(
        d,
        "merge --base base d1.st d2.st d3.st --weights 1,1,1 --shard-size 12KB --part 1/3 -o out",
    );
    refused(
        d,
        "finalize out",
        "out",
        &["part-1-of-3.json", "another merge"],
    );
    // The right part 1: finalize succeeds.
    ok(d, &format!("{WHOLE} --part 1/3 -o out"));
    // A shard lost after its part finished.
    let parts = d.join("out.parts");
    let shard = fs::read_dir(&parts)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .find(|n| n.ends_with(".safetensors"))
        .unwrap();
    let saved = fs::read(parts.join(&shard)).unwrap();
    fs::remove_file(parts.join(&shard)).unwrap();
    refused(d, "finalize out", "out", &[&shard, "missing"]);
    fs::write(parts.join(&shard), saved).unwrap();
    // A part of a merge in another number of parts.
    fs::write(parts.join("part-0-of-2.json"), "{}").unwrap();
    let o = run(d, "finalize out");
    o.error(&["part-0-of-2.json"]);
    fs::remove_file(parts.join("part-0-of-2.json")).unwrap();
    ok(d, "finalize out");
    assert!(d.join("out/model.safetensors.index.json").is_file());
    // Usage: a part of a single file, K not below N.
    run(d, &format!("{WHOLE} --part 0/2 -o one.st")).usage_error(&["--part", "single file"]);
    run(d, &format!("{WHOLE} --part 3/3 -o x")).usage_error(&["--part"]);
    run(d, &format!("{WHOLE} --part 1 -o x")).usage_error(&["--part"]);
}

/// Fine-tunes given in place of delta files (docs/FORMAT.md section 14) are inputs of the
/// recipe like any other: recorded with their kind, seed and interval (a fine-tune's delta is
/// taken against the base merged, so its base fingerprint is that base's), named as such on the
/// card, replayed to the same weights, refused when they changed (an adapter's configuration
/// included, since it scales the product), and gathered by `finalize` from parts.
#[test]
fn fine_tunes_and_adapters_in_a_recipe_are_recorded_replayed_and_finalized() {
    let dir = setup();
    let d = dir.path();
    let mixed = "merge --base base --tuned t1.safetensors d2.st --tuned t3.safetensors --seed 7 --density 0.5 --shard-size 12KB";
    ok(d, &format!("{mixed} -o m"));
    let r = recipe(&d.join("m"));
    let inputs = r["deltas"].as_array().unwrap();
    assert_eq!(inputs[0]["kind"], "fine-tune", "{r}");
    assert_eq!(
        (inputs[0]["seed"].as_u64(), inputs[2]["seed"].as_u64()),
        (Some(7), Some(8))
    );
    assert!(
        inputs[1].get("kind").is_none(),
        "a delta file has no kind: {r}"
    );
    assert_eq!(inputs[0]["base_fingerprint"], r["base"]["fingerprint"]);
    let body = card(&d.join("m/README.md")).1;
    assert!(
        body.contains("| fine-tune `t1.safetensors` | 7 |"),
        "{body}"
    );
    assert!(body.contains("| delta `d2.st` |"), "{body}");
    ok(d, "merge --recipe m/sotu-delta.json -o m-again");
    assert!(weights(&d.join("m-again")) == weights(&d.join("m")));

    // In parts: the same files as the whole merge.
    let want = without_command(&d.join("m"));
    for k in 0..2 {
        ok(d, &format!("{mixed} --part {k}/2 -o p"));
    }
    ok(d, "finalize p");
    assert!(
        without_command(&d.join("p")) == want,
        "parts with fine-tunes"
    );
    assert_eq!(recipe(&d.join("p"))["deltas"], r["deltas"]);

    // A LoRA adapter applied, then replayed; a changed configuration is refused.
    let fx = root().join("fixtures/tiny/lora-bf16");
    fs::create_dir(d.join("adapter")).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        fs::copy(fx.join(f), d.join("adapter").join(f)).unwrap();
    }
    ok(d, "apply --base base adapter -o a");
    let r = recipe(&d.join("a"));
    assert_eq!(r["deltas"][0]["kind"], "lora", "{r}");
    ok(d, "merge --recipe a/sotu-delta.json -o a-again");
    assert!(weights(&d.join("a-again")) == weights(&d.join("a")));
    let config = d.join("adapter/adapter_config.json");
    let text = fs::read_to_string(&config).unwrap();
    fs::write(
        &config,
        text.replace("\"lora_alpha\": 8", "\"lora_alpha\": 16"),
    )
    .unwrap();
    refused(
        d,
        "merge --recipe a/sotu-delta.json -o a-changed",
        "a-changed",
        &["adapter", "recipe"],
    );
}
