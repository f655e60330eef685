//! Integration tests of the `sotu-delta` command line: happy paths on the tiny fixtures, usage
//! errors (exit 2), and failed operations (exit 1) on deliberately broken inputs.
//!
//! Every test works in its own temporary folder, into which it copies the fixtures it needs,
//! and runs the binary there, so that every path on a command line is a bare file name and a
//! command line can be written as one string. The fixtures themselves are never written to.
//!
//! Conventions checked everywhere (the CLI contract and docs/FORMAT.md):
//! - exit 0 on success, 1 on a failed operation (`sotu-delta: error: ...` naming the file, and
//!   the tensor when one is at fault), 2 on bad usage (`sotu-delta: usage error: ...`);
//! - a panic (exit 101) is a bug, so every test asserts the exact exit code;
//! - after a failure, neither the output nor a `.sotu-delta-partial-*` file is left behind.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use assert_cmd::Command;
use safetensors::Dtype;
use serde_json::{Value, json};
use sotu_delta::io::Checkpoint;
use sotu_delta::io::write_file;
use sotu_delta::mask::{DEFAULT_SEED, Interval, Mask};
use tempfile::TempDir;

mod common;
use common::{BIN, Device, Outcome, device_test, noise, ok, partial_files, root, run, tmp};

// ==========================================================================================
// Helpers
// ==========================================================================================
// (Running the binary, `Outcome`, and `device_test!` are in tests/common, shared with the
// other test binaries.)

const DTYPES: [&str; 3] = ["f32", "f16", "bf16"];

const EMBED: &str = "model.embed_tokens.weight";
const Q_PROJ0: &str = "model.layers.0.self_attn.q_proj.weight";
const UP_PROJ1: &str = "model.layers.1.mlp.up_proj.weight";
const POSITION_IDS: &str = "model.position_ids";

/// A tensor as `write_file` takes it: name, dtype, shape, raw little-endian bytes.
type Tensor = (String, Dtype, Vec<usize>, Vec<u8>);
type Metadata = BTreeMap<String, String>;
type TensorMap = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

fn fixture_path(model: &str, dtype: &str) -> PathBuf {
    root()
        .join("fixtures/tiny")
        .join(format!("{model}-{dtype}.safetensors"))
}

/// Copies `fixtures/tiny/<model>-<dtype>.safetensors` into `dir` (once); returns its name.
fn fx(dir: &Path, model: &str, dtype: &str) -> String {
    let name = format!("{model}-{dtype}.safetensors");
    if !dir.join(&name).exists() {
        fs::copy(fixture_path(model, dtype), dir.join(&name)).expect("copy a fixture");
    }
    name
}

/// After a failure: `dir/output` does not exist and `dir` holds no partial file.
#[track_caller]
fn assert_nothing_written(dir: &Path, output: &str) {
    assert!(
        !dir.join(output).exists(),
        "{output} was written despite the failure"
    );
    let left = partial_files(dir);
    assert!(left.is_empty(), "partial files left behind: {left:?}");
}

/// Copies base-`dtype` and extracts task1..3 of `dtype` at slots 0/3, 1/3, 2/3 (default
/// seed) into d1.safetensors, d2.safetensors, d3.safetensors. Returns the base's file name.
fn three_slot_deltas(dir: &Path, dtype: &str) -> String {
    let base = fx(dir, "base", dtype);
    for k in 1..=3 {
        let tuned = fx(dir, &format!("task{k}"), dtype);
        let slot = k - 1;
        ok(
            dir,
            &format!("extract --base {base} --tuned {tuned} -o d{k}.safetensors --slot {slot}/3"),
        );
    }
    base
}

/// Two f32 deltas at density 0.5 with seeds 1 and 2 (masks overlapping on about a quarter),
/// a.safetensors from task1 and b.safetensors from task2. Returns the base's file name.
fn independent_deltas(dir: &Path) -> String {
    let base = fx(dir, "base", "f32");
    let (t1, t2) = (fx(dir, "task1", "f32"), fx(dir, "task2", "f32"));
    ok(
        dir,
        &format!("extract --base {base} --tuned {t1} -o a.safetensors --density 0.5 --seed 1"),
    );
    ok(
        dir,
        &format!("extract --base {base} --tuned {t2} -o b.safetensors --density 0.5 --seed 2"),
    );
    base
}

/// All tensors and the metadata of a safetensors file, copied into memory.
fn load(path: &Path) -> (Vec<Tensor>, Metadata) {
    let ck = Checkpoint::open(path).unwrap_or_else(|e| panic!("open {}: {e:#}", path.display()));
    let tensors = ck
        .tensors()
        .iter()
        .map(|(n, i)| {
            let data = ck.tensor(n).unwrap().whole().unwrap().into_owned();
            (n.clone(), i.dtype, i.shape.clone(), data)
        })
        .collect();
    let md = ck
        .metadata()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    (tensors, md)
}

/// The tensors of a file, by name.
fn tensor_map(path: &Path) -> TensorMap {
    load(path)
        .0
        .into_iter()
        .map(|(n, d, sh, b)| (n, (d, sh, b)))
        .collect()
}

/// The `sotu_delta` record in a merged file's metadata.
fn merge_record(path: &Path) -> Value {
    let (_, md) = load(path);
    serde_json::from_str(&md["sotu_delta"]).expect("sotu_delta metadata is JSON")
}

/// Copies `src` to `dst` through `edit`, which may change tensors and metadata freely.
fn rewrite(src: &Path, dst: &Path, edit: impl FnOnce(&mut Vec<Tensor>, &mut Metadata)) {
    let (mut tensors, mut md) = load(src);
    edit(&mut tensors, &mut md);
    write_file(dst, &tensors, &md).expect("write the edited file");
}

fn tensor<'a>(tensors: &'a mut [Tensor], name: &str) -> &'a mut Tensor {
    tensors
        .iter_mut()
        .find(|t| t.0 == name)
        .unwrap_or_else(|| panic!("no tensor {name}"))
}

/// Edits the JSON object serialized in a delta's `__metadata__["tensors"]`.
fn edit_entries(md: &mut Metadata, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let mut entries: serde_json::Map<String, Value> =
        serde_json::from_str(&md["tensors"]).expect("tensors metadata is JSON");
    edit(&mut entries);
    md.insert("tensors".into(), serde_json::to_string(&entries).unwrap());
}

/// Rewrites the `sotu/offsets/<name>` tensor through `edit`.
fn edit_offsets(tensors: &mut [Tensor], name: &str, edit: impl FnOnce(&mut Vec<u64>)) {
    let t = tensor(tensors, &format!("sotu/offsets/{name}"));
    let mut offs: Vec<u64> =
        t.3.chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
    edit(&mut offs);
    t.2 = vec![offs.len()];
    t.3 = offs.iter().flat_map(|v| v.to_le_bytes()).collect();
}

/// A copy of base-`dtype` named base-perturbed-`dtype`.safetensors, with the lowest bit of the
/// first element of `name` flipped. Returns its file name.
fn perturbed_base(dir: &Path, dtype: &str, name: &str) -> String {
    let out = format!("base-perturbed-{dtype}.safetensors");
    rewrite(&fixture_path("base", dtype), &dir.join(&out), |ts, _| {
        tensor(ts, name).3[0] ^= 1
    });
    out
}

/// `n` f32 values in [1, 2) from `seed`, as bytes.
fn f32_values(n: usize, seed: u64) -> Vec<u8> {
    noise(4 * n, seed)
        .chunks_exact(4)
        .flat_map(|c| {
            let u = u32::from_le_bytes(c.try_into().unwrap());
            (1.0 + u as f32 / u32::MAX as f32).min(1.99).to_le_bytes()
        })
        .collect()
}

fn bytes_of(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// `tensors` of `inspect --json` for delta `k`, as name -> entry.
fn inspect_tensors(report: &Value, k: usize) -> BTreeMap<String, Value> {
    report["deltas"][k]["tensors"]
        .as_array()
        .expect("a tensors array")
        .iter()
        .map(|t| (t["name"].as_str().unwrap().to_string(), t.clone()))
        .collect()
}

/// docs/FORMAT.md section 1: 8-byte length, JSON padded so that the data starts 8-byte aligned,
/// tensors in ascending key order without gaps, `__metadata__` values all strings.
#[track_caller]
fn assert_container_layout(path: &Path) {
    let bytes = bytes_of(path);
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let file = path.display();
    assert_eq!(
        (8 + n) % 8,
        0,
        "{file}: the data does not start 8-byte aligned"
    );
    let header: serde_json::Map<String, Value> =
        serde_json::from_slice(&bytes[8..8 + n]).expect("the header is JSON");
    let md = header["__metadata__"]
        .as_object()
        .expect("a __metadata__ object");
    assert!(
        md.values().all(Value::is_string),
        "{file}: metadata values must be strings"
    );
    let mut keys: Vec<&String> = header.keys().filter(|k| *k != "__metadata__").collect();
    keys.sort();
    let mut pos = 0;
    for k in keys {
        let offs = header[k]["data_offsets"].as_array().unwrap();
        assert_eq!(
            offs[0].as_u64(),
            Some(pos),
            "{file}: {k} is not where key order puts it"
        );
        pos = offs[1].as_u64().unwrap();
    }
    assert_eq!(
        8 + n as u64 + pos,
        bytes.len() as u64,
        "{file}: the data does not end the file"
    );
}

// ==========================================================================================
// 1. Happy paths
// ==========================================================================================

#[test]
fn help_and_version_exit_zero() {
    let dir = tmp();
    let help = ok(dir.path(), "--help");
    assert!(
        help.stdout.contains("extract") && help.stdout.contains("merge"),
        "{help}"
    );
    let version = ok(dir.path(), "--version");
    assert!(version.stdout.contains("sotu-delta"), "{version}");
}

#[test]
fn extract_with_slots_records_the_slot_interval_in_every_dtype() {
    for dtype in DTYPES {
        let dir = tmp();
        three_slot_deltas(dir.path(), dtype);
        let mut kept_embed = 0;
        for k in 0..3u64 {
            let delta = dir.path().join(format!("d{}.safetensors", k + 1));
            let (tensors, md) = load(&delta);
            let iv = Interval::from_slot(k, 3, None).unwrap();
            assert_eq!(md["format"], "sotu-delta");
            assert_eq!(md["format_version"], "1.2");
            assert_eq!(md["mask"], "sotu-mix32-v1");
            assert_eq!(md["seed"], DEFAULT_SEED.to_string());
            assert_eq!(md["slot"], format!("{k}/3"));
            assert_eq!(md["lo"], iv.lo().to_string(), "{dtype} slot {k}");
            assert_eq!(md["hi"], iv.hi().to_string(), "{dtype} slot {k}");
            let entries: Value = serde_json::from_str(&md["tensors"]).unwrap();
            assert_eq!(
                entries[EMBED]["kind"], "masked",
                "{dtype}: {}",
                entries[EMBED]
            );
            kept_embed += entries[EMBED]["kept"].as_u64().unwrap();
            for key in [
                format!("sotu/offsets/{EMBED}"),
                "sotu/base_hashes".into(),
                "sotu/stats".into(),
            ] {
                assert!(tensors.iter().any(|t| t.0 == key), "{dtype}: no {key}");
            }
        }
        // The three slots tile [0, 2^32): together they keep every element exactly once.
        assert_eq!(kept_embed, 2051 * 32, "{dtype}");
        assert!(partial_files(dir.path()).is_empty());
    }
}

#[test]
fn extract_text_summary_names_seed_density_and_slot() {
    let dir = tmp();
    let d = dir.path();
    let (base, tuned) = (fx(d, "base", "f16"), fx(d, "task1", "f16"));
    let out = ok(
        d,
        &format!("extract --base {base} --tuned {tuned} -o d.safetensors --slot 1/4 --seed 77"),
    );
    for w in ["seed 77", "density 0.250000", "slot 1/4", "d.safetensors"] {
        assert!(out.stdout.contains(w), "stdout lacks {w:?}\n{out}");
    }
}

#[test]
fn quiet_extract_and_apply_print_nothing() {
    let dir = tmp();
    let d = dir.path();
    let (base, tuned) = (fx(d, "base", "f32"), fx(d, "task1", "f32"));
    let out = ok(
        d,
        &format!("--quiet extract --base {base} --tuned {tuned} -o d.safetensors"),
    );
    assert_eq!(out.stdout, "", "{out}");
    let out = ok(
        d,
        &format!("apply -q --base {base} d.safetensors -o m.safetensors"),
    );
    assert_eq!(out.stdout, "", "{out}");
    assert!(d.join("m.safetensors").exists());
}

#[test]
fn extract_json_summary_parses() {
    let dir = tmp();
    let d = dir.path();
    let (base, tuned) = (fx(d, "base", "bf16"), fx(d, "task1", "bf16"));
    let j = ok(
        d,
        &format!("extract --base {base} --tuned {tuned} -o d.safetensors --slot 0/3 --json"),
    )
    .json();
    let n = |k: &str| {
        j[k].as_u64()
            .unwrap_or_else(|| panic!("no integer {k}: {j}"))
    };
    // 22 tensors in the fixture; task1 changes the I64 position_ids, which is stored whole.
    assert_eq!(n("masked") + n("whole") + n("same"), 22, "{j}");
    assert_eq!(n("whole"), 1, "{j}");
    assert!(n("kept") > 0 && n("kept") < n("masked_elems"), "{j}");
    assert_eq!(
        n("output_bytes"),
        fs::metadata(d.join("d.safetensors")).unwrap().len()
    );
    assert!(n("dense_bytes") > n("output_bytes"), "{j}");
    let fp = j["base_fingerprint"].as_str().unwrap();
    assert!(
        fp.len() == 64 && fp.bytes().all(|b| b.is_ascii_hexdigit()),
        "{j}"
    );
    assert_eq!(j["inexact"], json!([]), "{j}");
}

#[test]
fn inspect_text_shows_seed_density_and_zero_collisions_for_disjoint_slots() {
    let dir = tmp();
    let d = dir.path();
    three_slot_deltas(d, "bf16");
    let out = ok(d, "inspect d1.safetensors d2.safetensors d3.safetensors");
    for w in [
        "seed 2411",
        "density 0.333333",
        "slot 0/3",
        "slot 1/3",
        "slot 2/3",
        "base fingerprint",
    ] {
        assert!(out.stdout.contains(w), "stdout lacks {w:?}\n{out}");
    }
    assert!(
        out.stdout.contains(EMBED) && out.stdout.contains("pairs:"),
        "{out}"
    );
    let pairs: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.contains("collision"))
        .collect();
    assert_eq!(pairs.len(), 3, "{out}");
    for l in pairs {
        assert!(
            l.contains("expected 0.000000") && l.contains("measured 0.000000"),
            "{l}"
        );
        assert!(l.contains("cosine 0.000000"), "{l}");
    }
    // --summary leaves the per-tensor table out.
    let summary = ok(
        d,
        "inspect --summary d1.safetensors d2.safetensors d3.safetensors",
    );
    assert!(!summary.stdout.contains(Q_PROJ0), "{summary}");
    assert!(summary.stdout.contains("seed 2411"), "{summary}");
}

#[test]
fn inspect_json_reports_deltas_and_disjoint_pairs() {
    let dir = tmp();
    let d = dir.path();
    three_slot_deltas(d, "bf16");
    let j = ok(
        d,
        "inspect --json d1.safetensors d2.safetensors d3.safetensors",
    )
    .json();
    let deltas = j["deltas"].as_array().expect("a deltas array");
    assert_eq!(deltas.len(), 3);
    for (k, delta) in deltas.iter().enumerate() {
        assert_eq!(delta["seed"], 2411, "{delta}");
        let density = delta["density"].as_f64().unwrap();
        assert!((density - 1.0 / 3.0).abs() < 1e-6, "{density}");
        assert_eq!(delta["slot"], format!("{k}/3"));
        let stored = delta["stored_bytes"].as_u64().unwrap();
        assert_eq!(
            stored,
            fs::metadata(d.join(format!("d{}.safetensors", k + 1)))
                .unwrap()
                .len()
        );
        assert!(delta["dense_bytes"].as_u64().unwrap() > stored, "{delta}");
    }
    let pairs = j["pairs"].as_array().expect("a pairs array");
    assert_eq!(pairs.len(), 3);
    for p in pairs {
        assert_eq!(p["measured_collision"].as_f64(), Some(0.0), "{p}");
        assert_eq!(p["expected_collision"].as_f64(), Some(0.0), "{p}");
        assert_eq!(p["cosine"].as_f64(), Some(0.0), "{p}");
        assert!(p["compared"].as_u64().unwrap() > 0, "{p}");
    }
}

fn merge_of_three_disjoint_slots_takes_each_element_from_its_slot(device: Device) {
    let dir = tmp();
    let d = dir.path();
    let base = three_slot_deltas(d, "bf16");
    ok(
        d,
        &format!(
            "merge --base {base} d1.safetensors d2.safetensors d3.safetensors -o m.safetensors --device {device}"
        ),
    );
    let merged = tensor_map(&d.join("m.safetensors"));
    let base_t = tensor_map(&d.join(&base));
    let tasks: Vec<TensorMap> = (1..=3)
        .map(|k| tensor_map(&fixture_path(&format!("task{k}"), "bf16")))
        .collect();

    let mut names: Vec<&str> = base_t.keys().map(String::as_str).collect();
    names.push("score.weight");
    names.sort();
    assert_eq!(merged.keys().map(String::as_str).collect::<Vec<_>>(), names);
    // Stored whole: the changed I64 tensor of task1, the new tensor of task3.
    assert_eq!(merged[POSITION_IDS], tasks[0][POSITION_IDS]);
    assert_eq!(merged["score.weight"], tasks[2]["score.weight"]);

    let slots: Vec<Interval> = (0..3)
        .map(|k| Interval::from_slot(k, 3, None).unwrap())
        .collect();
    for (name, (dtype, shape, data)) in &merged {
        if name == POSITION_IDS || name == "score.weight" {
            continue;
        }
        assert_eq!((dtype, shape), (&base_t[name].0, &base_t[name].1), "{name}");
        let size = dtype.bitsize() / 8;
        for i in 0..data.len() / size {
            let owner = (0..3)
                .find(|&k| Mask::new(DEFAULT_SEED, name, slots[k]).kept(i as u64))
                .expect("the slots cover every element");
            let want = &tasks[owner][name].2[i * size..(i + 1) * size];
            assert_eq!(
                &data[i * size..(i + 1) * size],
                want,
                "{name}[{i}] (slot {owner})"
            );
        }
    }
    let (_, md) = load(&d.join("m.safetensors"));
    assert_eq!(
        md.get("format").map(String::as_str),
        Some("pt"),
        "the base's metadata is kept"
    );
    let record = merge_record(&d.join("m.safetensors"));
    assert_eq!(record["deltas"].as_array().unwrap().len(), 3, "{record}");
    assert_eq!(record["forced"], false, "{record}");
}
device_test!(
    merge_of_three_disjoint_slots_takes_each_element_from_its_slot,
    merge_of_three_disjoint_slots_takes_each_element_from_its_slot_cpu,
    merge_of_three_disjoint_slots_takes_each_element_from_its_slot_cuda
);

#[test]
fn merge_json_summary_parses_and_fingerprints_agree() {
    let dir = tmp();
    let d = dir.path();
    let (base, t1, t3) = (
        fx(d, "base", "f16"),
        fx(d, "task1", "f16"),
        fx(d, "task3", "f16"),
    );
    let ex = ok(
        d,
        &format!("extract --base {base} --tuned {t1} -o d1.safetensors --slot 0/2 --json"),
    );
    ok(
        d,
        &format!("extract --base {base} --tuned {t3} -o d2.safetensors --slot 1/2"),
    );
    let j = ok(
        d,
        &format!("merge --json --base {base} d1.safetensors d2.safetensors -o m.safetensors"),
    )
    .json();
    assert_eq!(j["tensors"], 23, "{j}");
    assert!(j["changed"].as_u64().unwrap() > 0, "{j}");
    assert_eq!(
        j["output_bytes"].as_u64().unwrap(),
        fs::metadata(d.join("m.safetensors")).unwrap().len()
    );
    assert_eq!(j["mismatches"], json!([]), "{j}");
    let fp = ex.json()["base_fingerprint"].clone();
    assert_eq!(j["base_fingerprint"], fp);
    for delta in ok(d, "inspect --json d1.safetensors d2.safetensors").json()["deltas"]
        .as_array()
        .unwrap()
    {
        assert_eq!(delta["base_fingerprint"], fp);
    }
}

#[test]
fn apply_then_verify_succeeds() {
    let dir = tmp();
    let d = dir.path();
    let base = three_slot_deltas(d, "f32");
    let out = ok(
        d,
        &format!("apply --base {base} d2.safetensors -o a.safetensors"),
    );
    assert!(out.stdout.contains("apply"), "{out}");
    assert!(d.join("a.safetensors").exists());
    let v = ok(
        d,
        &format!("verify --base {base} d1.safetensors d2.safetensors d3.safetensors"),
    );
    assert_eq!(v.stdout.matches(": OK against").count(), 3, "{v}");
    let j = ok(
        d,
        &format!("verify --json --base {base} d1.safetensors d2.safetensors d3.safetensors"),
    )
    .json();
    for verdict in j.as_array().unwrap() {
        assert_eq!(verdict["ok"], true, "{verdict}");
        assert_eq!(verdict["mismatched"], json!([]), "{verdict}");
    }
}

fn apply_at_density_one_reproduces_the_tuned_checkpoint_exactly(device: Device) {
    for dtype in DTYPES {
        let dir = tmp();
        let d = dir.path();
        let base = fx(d, "base", dtype);
        for task in ["task1", "task2", "task3"] {
            let tuned = fx(d, task, dtype);
            ok(
                d,
                &format!("extract --base {base} --tuned {tuned} -o d.safetensors --density 1"),
            );
            ok(
                d,
                &format!("apply --base {base} d.safetensors -o out.safetensors --device {device}"),
            );
            let want = tensor_map(&d.join(&tuned));
            let got = tensor_map(&d.join("out.safetensors"));
            assert_eq!(
                got.keys().collect::<Vec<_>>(),
                want.keys().collect::<Vec<_>>(),
                "{tuned}"
            );
            for (name, w) in &want {
                let g = &got[name];
                assert_eq!((&g.0, &g.1), (&w.0, &w.1), "{tuned} {name}: dtype/shape");
                assert!(
                    g.2 == w.2,
                    "{tuned} {name}: the data differs from the fine-tune"
                );
            }
        }
    }
}
device_test!(
    apply_at_density_one_reproduces_the_tuned_checkpoint_exactly,
    apply_at_density_one_reproduces_the_tuned_checkpoint_exactly_cpu,
    apply_at_density_one_reproduces_the_tuned_checkpoint_exactly_cuda
);

fn apply_with_dtype_f32_widens_bf16_exactly(device: Device) {
    let dir = tmp();
    let d = dir.path();
    let (base, tuned) = (fx(d, "base", "bf16"), fx(d, "task3", "bf16"));
    ok(
        d,
        &format!("extract --base {base} --tuned {tuned} -o d.safetensors --density 1"),
    );
    ok(
        d,
        &format!(
            "apply --base {base} d.safetensors -o out.safetensors --dtype f32 --device {device}"
        ),
    );
    let got = tensor_map(&d.join("out.safetensors"));
    for (name, (dtype, shape, data)) in tensor_map(&d.join(&tuned)) {
        let g = &got[&name];
        assert_eq!(g.1, shape, "{name}");
        if dtype == Dtype::BF16 {
            assert_eq!(g.0, Dtype::F32, "{name}");
            // bf16 -> f32 is exact: the bf16 bits become the high half of the f32 bits.
            let widened: Vec<u8> = data
                .chunks_exact(2)
                .flat_map(|b| [0, 0, b[0], b[1]])
                .collect();
            assert!(
                g.2 == widened,
                "{name}: not the exact widening of the fine-tune"
            );
        } else {
            assert_eq!(
                (g.0, &g.2),
                (dtype, &data),
                "{name}: non-float tensors are copied"
            );
        }
    }
}
device_test!(
    apply_with_dtype_f32_widens_bf16_exactly,
    apply_with_dtype_f32_widens_bf16_exactly_cpu,
    apply_with_dtype_f32_widens_bf16_exactly_cuda
);

fn merge_with_zero_weights_leaves_float_tensors_at_the_base(device: Device) {
    let dir = tmp();
    let d = dir.path();
    let base = three_slot_deltas(d, "f16");
    ok(
        d,
        &format!(
            "merge --base {base} d1.safetensors d2.safetensors d3.safetensors -o m.safetensors --weights 0,0,0 --device {device}"
        ),
    );
    let got = tensor_map(&d.join("m.safetensors"));
    for (name, want) in tensor_map(&d.join(&base)) {
        if name != POSITION_IDS {
            // (position_ids is replaced whole by task1: weights do not apply to it)
            assert!(
                got[&name] == want,
                "{name} moved away from the base under weight 0"
            );
        }
    }
}
device_test!(
    merge_with_zero_weights_leaves_float_tensors_at_the_base,
    merge_with_zero_weights_leaves_float_tensors_at_the_base_cpu,
    merge_with_zero_weights_leaves_float_tensors_at_the_base_cuda
);

#[test]
fn include_pattern_stores_unselected_tensors_whole() {
    let dir = tmp();
    let d = dir.path();
    let (base, tuned) = (fx(d, "base", "f32"), fx(d, "task1", "f32"));
    ok(
        d,
        &format!(
            "extract --base {base} --tuned {tuned} -o d.safetensors --include model.layers.* --density 0.25"
        ),
    );
    let tensors = inspect_tensors(&ok(d, "inspect --json d.safetensors").json(), 0);
    assert_eq!(tensors[EMBED]["kind"], "whole");
    assert_eq!(tensors["model.norm.weight"]["kind"], "whole");
    assert_eq!(tensors[Q_PROJ0]["kind"], "masked");
    assert_eq!(
        tensors["model.layers.1.input_layernorm.weight"]["kind"],
        "masked"
    );
    // A whole float tensor of the base counts every element as kept (FORMAT.md section 7)...
    let (all, kept) = (
        tensors[EMBED]["delta_norm"].as_f64(),
        tensors[EMBED]["kept_norm"].as_f64(),
    );
    assert!(all > Some(0.0) && all == kept, "{}", tensors[EMBED]);
    // ... and is applied in full.
    ok(
        d,
        &format!("apply --base {base} d.safetensors -o out.safetensors"),
    );
    assert!(tensor_map(&d.join("out.safetensors"))[EMBED] == tensor_map(&d.join(&tuned))[EMBED]);
}

#[test]
fn exclude_pattern_stores_norms_whole() {
    let dir = tmp();
    let d = dir.path();
    let (base, tuned) = (fx(d, "base", "f32"), fx(d, "task1", "f32"));
    ok(
        d,
        &format!("extract --base {base} --tuned {tuned} -o d.safetensors --exclude *norm*"),
    );
    let tensors = inspect_tensors(&ok(d, "inspect --json d.safetensors").json(), 0);
    let mut norms = 0;
    for (name, t) in &tensors {
        if name.contains("norm") {
            norms += 1;
            assert_eq!(t["kind"], "whole", "{t}");
        } else if name != POSITION_IDS {
            assert_eq!(t["kind"], "masked", "{t}");
        }
    }
    assert_eq!(norms, 5);
}

fn thread_count_does_not_change_output_bytes(device: Device) {
    // Each thread count works in a folder of its own under the same file names, because the
    // merged file records the names of its deltas.
    let dir = tmp();
    let counts = ["1", "2", "5"];
    for threads in counts {
        let sub = dir.path().join(format!("t{threads}"));
        fs::create_dir(&sub).unwrap();
        let base = fx(&sub, "base", "f32");
        for k in 1..=3 {
            let tuned = fx(&sub, &format!("task{k}"), "f32");
            let args = format!(
                "--base {base} --tuned {tuned} -o d{k}.safetensors --density 0.5 --seed {k}"
            );
            ok(&sub, &format!("extract --threads {threads} {args}"));
        }
        let deltas =
            "d1.safetensors d2.safetensors d3.safetensors --weights 0.5,1.5,-0.25 --rescale";
        ok(
            &sub,
            &format!(
                "--threads {threads} merge --base {base} {deltas} -o m.safetensors --device {device}"
            ),
        );
    }
    for f in [
        "d1.safetensors",
        "d2.safetensors",
        "d3.safetensors",
        "m.safetensors",
    ] {
        let first = bytes_of(&dir.path().join("t1").join(f));
        for threads in &counts[1..] {
            let other = bytes_of(&dir.path().join(format!("t{threads}")).join(f));
            assert!(
                first == other,
                "{f} differs between --threads 1 and --threads {threads}"
            );
        }
    }
}
device_test!(
    thread_count_does_not_change_output_bytes,
    thread_count_does_not_change_output_bytes_cpu,
    thread_count_does_not_change_output_bytes_cuda
);

#[test]
fn outputs_are_not_private_files() {
    // With the usual umask 022 a new file is 0644, where tempfile's default would be 0600.
    let dir = tmp();
    let d = dir.path();
    let (base, tuned) = (fx(d, "base", "bf16"), fx(d, "task2", "bf16"));
    ok(
        d,
        &format!("extract --base {base} --tuned {tuned} -o d.safetensors"),
    );
    ok(
        d,
        &format!("apply --base {base} d.safetensors -o m.safetensors"),
    );
    for f in ["d.safetensors", "m.safetensors"] {
        let mode = fs::metadata(d.join(f)).unwrap().permissions().mode() & 0o777;
        assert_ne!(mode, 0o600, "{f} has mode {mode:o}");
        assert!(
            mode & 0o044 != 0,
            "{f} has mode {mode:o}: not readable by group or others"
        );
    }
}

#[test]
fn delta_and_merge_files_follow_the_container_layout() {
    let dir = tmp();
    let d = dir.path();
    let base = three_slot_deltas(d, "f16");
    ok(
        d,
        &format!(
            "merge --base {base} d1.safetensors d2.safetensors d3.safetensors -o m.safetensors"
        ),
    );
    for f in [
        "d1.safetensors",
        "d2.safetensors",
        "d3.safetensors",
        "m.safetensors",
    ] {
        assert_container_layout(&d.join(f));
    }
}

fn merge_of_two_complementary_slots_of_one_fine_tune_rebuilds_it(device: Device) {
    // Both deltas carry the new tensor score.weight, with identical bytes: no conflict.
    let dir = tmp();
    let d = dir.path();
    let (base, tuned) = (fx(d, "base", "f32"), fx(d, "task3", "f32"));
    ok(
        d,
        &format!("extract --base {base} --tuned {tuned} -o a.safetensors --slot 0/2"),
    );
    ok(
        d,
        &format!("extract --base {base} --tuned {tuned} -o b.safetensors --slot 1/2"),
    );
    ok(
        d,
        &format!(
            "merge --base {base} a.safetensors b.safetensors -o m.safetensors --device {device}"
        ),
    );
    assert!(tensor_map(&d.join("m.safetensors")) == tensor_map(&d.join(&tuned)));
}
device_test!(
    merge_of_two_complementary_slots_of_one_fine_tune_rebuilds_it,
    merge_of_two_complementary_slots_of_one_fine_tune_rebuilds_it_cpu,
    merge_of_two_complementary_slots_of_one_fine_tune_rebuilds_it_cuda
);

/// Negative weights (task-vector subtraction) are meant to be accepted: the option is declared
/// with clap's allow_negative_numbers. `--weights -1,1` must parse like `--weights=-1,1`.
#[test]
fn negative_weights_are_accepted_without_an_equals_sign() {
    let dir = tmp();
    let d = dir.path();
    let base = three_slot_deltas(d, "bf16");
    ok(
        d,
        &format!(
            "merge --base {base} d1.safetensors d2.safetensors -o eq.safetensors --weights=-1,1"
        ),
    );
    ok(
        d,
        &format!(
            "merge --base {base} d1.safetensors d2.safetensors -o sp.safetensors --weights -1,1"
        ),
    );
    ok(
        d,
        &format!(
            "merge --base {base} d1.safetensors d2.safetensors -o sp2.safetensors --weights -0.5,-1"
        ),
    );
    assert!(tensor_map(&d.join("eq.safetensors")) == tensor_map(&d.join("sp.safetensors")));
}

#[test]
fn non_float_and_unusual_tensors_round_trip_through_extract_and_apply() {
    let dir = tmp();
    let d = dir.path();
    let f64_bytes = |v: &[f64]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let base_f64: Vec<f64> = (0..50).map(|i| 1.0 + i as f64 / 64.0).collect();
    // Within a factor 2 of the base, so that b + (v - b) == v exactly in f64.
    let tuned_f64: Vec<f64> = base_f64.iter().map(|b| b * 1.01).collect();
    let base: Vec<Tensor> = vec![
        (
            "a.f64".into(),
            Dtype::F64,
            vec![5, 10],
            f64_bytes(&base_f64),
        ),
        ("b.f8".into(), Dtype::F8_E4M3, vec![16], (0..16).collect()),
        ("c.bool".into(), Dtype::BOOL, vec![5], vec![0, 1, 0, 1, 0]),
        (
            "d.i32".into(),
            Dtype::I32,
            vec![3],
            vec![1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0],
        ),
        (
            "e.f4".into(),
            Dtype::F4,
            vec![8],
            vec![0x12, 0x34, 0x56, 0x78],
        ),
        ("f.c64".into(), Dtype::C64, vec![2], vec![0; 16]),
        (
            "g.scalar".into(),
            Dtype::F32,
            vec![],
            1.5f32.to_le_bytes().to_vec(),
        ),
        ("h.empty".into(), Dtype::F32, vec![0, 4], vec![]),
    ];
    let mut tuned = base.clone();
    tensor(&mut tuned, "a.f64").3 = f64_bytes(&tuned_f64);
    tensor(&mut tuned, "b.f8").3 = (16..32).collect();
    tensor(&mut tuned, "c.bool").3 = vec![1, 1, 0, 0, 1];
    tensor(&mut tuned, "e.f4").3 = vec![0x21, 0x43, 0x65, 0x87];
    tensor(&mut tuned, "f.c64").3 = (0..16).collect();
    tensor(&mut tuned, "g.scalar").3 = 1.75f32.to_le_bytes().to_vec();
    tuned.push(("i.new".into(), Dtype::U8, vec![3], vec![7, 8, 9]));
    write_file(&d.join("base.safetensors"), &base, &BTreeMap::new()).unwrap();
    write_file(&d.join("tuned.safetensors"), &tuned, &BTreeMap::new()).unwrap();

    ok(
        d,
        "extract --base base.safetensors --tuned tuned.safetensors -o delta.safetensors --density 1",
    );
    let tensors = inspect_tensors(&ok(d, "inspect --json delta.safetensors").json(), 0);
    for (name, kind) in [
        ("a.f64", "masked"),
        ("b.f8", "whole"),
        ("c.bool", "whole"),
        ("d.i32", "same"),
        ("e.f4", "whole"),
        ("f.c64", "whole"),
        ("g.scalar", "masked"),
        ("h.empty", "same"),
        ("i.new", "whole"),
    ] {
        assert_eq!(tensors[name]["kind"], kind, "{name}: {}", tensors[name]);
    }
    ok(
        d,
        "apply --base base.safetensors delta.safetensors -o out.safetensors",
    );
    assert!(tensor_map(&d.join("out.safetensors")) == tensor_map(&d.join("tuned.safetensors")));
    ok(d, "verify --base base.safetensors delta.safetensors");
}

// ==========================================================================================
// 2. Independent seeds
// ==========================================================================================

#[test]
fn inspect_independent_seeds_collide_at_the_product_of_densities() {
    let dir = tmp();
    independent_deltas(dir.path());
    let j = ok(dir.path(), "inspect --json a.safetensors b.safetensors").json();
    let p = &j["pairs"][0];
    assert_eq!(p["expected_collision"].as_f64(), Some(0.25), "{p}");
    let measured = p["measured_collision"].as_f64().unwrap();
    // About 88800 elements compared: the standard deviation is about 0.0015.
    assert!(
        (measured - 0.25).abs() < 0.01,
        "measured collision {measured}"
    );
}

#[test]
fn inspect_overlapping_masks_without_base_reports_no_cosine() {
    let dir = tmp();
    independent_deltas(dir.path());
    let text = ok(dir.path(), "inspect --summary a.safetensors b.safetensors");
    let line = text
        .stdout
        .lines()
        .find(|l| l.contains("collision"))
        .expect("a pair line");
    assert!(line.contains("cosine n/a"), "{line}");
    let j = ok(dir.path(), "inspect --json a.safetensors b.safetensors").json();
    assert!(j["pairs"][0]["cosine"].is_null(), "{}", j["pairs"][0]);
}

#[test]
fn inspect_overlapping_masks_with_base_reports_a_cosine() {
    let dir = tmp();
    let base = independent_deltas(dir.path());
    let j = ok(
        dir.path(),
        &format!("inspect --json --base {base} a.safetensors b.safetensors"),
    )
    .json();
    let c = j["pairs"][0]["cosine"].as_f64().expect("a numeric cosine");
    assert!((-1.0..=1.0).contains(&c), "cosine {c}");
    let text = ok(
        dir.path(),
        &format!("inspect --summary --base {base} a.safetensors b.safetensors"),
    );
    let line = text
        .stdout
        .lines()
        .find(|l| l.contains("collision"))
        .expect("a pair line");
    let shown: f64 = line
        .rsplit("cosine ")
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("the cosine is not a number ({e}): {line}"));
    assert!((shown - c).abs() < 1e-6, "{line} vs {c}");
    // A delta with itself: cosine 1.
    let j = ok(
        dir.path(),
        &format!("inspect --json --base {base} a.safetensors a.safetensors"),
    )
    .json();
    let c = j["pairs"][0]["cosine"].as_f64().expect("a numeric cosine");
    assert!((c - 1.0).abs() < 1e-9, "cosine of a delta with itself: {c}");
}

#[test]
fn inspect_subspaces_reports_alignment_beside_the_cosine() {
    let dir = tmp();
    let d = dir.path();
    let base = independent_deltas(d);
    // A delta with itself: the same top subspaces, alignment 1.
    let j = ok(
        d,
        &format!("inspect --json --subspaces --base {base} a.safetensors a.safetensors"),
    )
    .json();
    let same = j["pairs"][0]["subspace_alignment"]
        .as_f64()
        .expect("a numeric alignment");
    assert!(
        (same - 1.0).abs() < 1e-9,
        "alignment of a delta with itself: {same}"
    );
    // Two unrelated fine-tunes: well below 1, and of the order of random subspaces (the
    // fixtures' deltas are independent noise).
    let j = ok(
        d,
        &format!("inspect --json --subspaces --base {base} a.safetensors b.safetensors"),
    )
    .json();
    let p = &j["pairs"][0];
    let (a, r) = (
        p["subspace_alignment"].as_f64().unwrap(),
        p["subspace_random"].as_f64().unwrap(),
    );
    assert!(a < 0.6 && r > 0.0 && r < 1.0, "alignment {a}, random {r}");
    assert!(
        (a - r).abs() < 0.15,
        "independent deltas: alignment {a} vs random {r}"
    );
    assert!(p["cosine"].as_f64().is_some());
    // The text form shows it under the pair's line; without --subspaces it is absent.
    let text = ok(
        d,
        &format!("inspect --summary --subspaces --base {base} a.safetensors b.safetensors"),
    );
    assert!(
        text.stdout.contains("top singular subspaces: alignment"),
        "{}",
        text.stdout
    );
    let j = ok(
        d,
        &format!("inspect --json --base {base} a.safetensors b.safetensors"),
    )
    .json();
    assert!(j["pairs"][0].get("subspace_alignment").is_none());
    // It needs the base.
    run(d, "inspect --subspaces a.safetensors b.safetensors").usage_error(&["--base"]);
}

#[test]
fn merge_records_the_method_and_its_parameters() {
    let dir = tmp();
    let d = dir.path();
    let base = independent_deltas(d);
    ok(
        d,
        &format!(
            "merge --base {base} a.safetensors b.safetensors --method ties --trim 0.5 --alpha 1.5 -o t.safetensors"
        ),
    );
    let r = merge_record(&d.join("t.safetensors"));
    assert_eq!(r["method"], "ties");
    assert_eq!(r["alpha"], 1.5);
    assert_eq!(r["trim"], 0.5);
    ok(
        d,
        &format!("merge --base {base} a.safetensors b.safetensors -o s.safetensors"),
    );
    let r = merge_record(&d.join("s.safetensors"));
    assert_eq!(r["method"], "sum");
    assert!(r.get("alpha").is_none() && r.get("trim").is_none(), "{r}");
}

// ==========================================================================================
// 3. Usage errors (exit 2)
// ==========================================================================================

/// `extract` of task1-f32 into out.safetensors with `extra` arguments is a usage error naming `words`.
#[track_caller]
fn assert_extract_usage_error(extra: &str, words: &[&str]) {
    let dir = tmp();
    let d = dir.path();
    let (base, tuned) = (fx(d, "base", "f32"), fx(d, "task1", "f32"));
    run(
        d,
        &format!("extract --base {base} --tuned {tuned} -o out.safetensors {extra}"),
    )
    .usage_error(words);
    assert_nothing_written(d, "out.safetensors");
}

/// `merge` of two f32 slot deltas into m.safetensors with `extra` arguments is a usage error.
#[track_caller]
fn assert_merge_usage_error(extra: &str, words: &[&str]) {
    let dir = tmp();
    let d = dir.path();
    let (base, t1, t2) = (
        fx(d, "base", "f32"),
        fx(d, "task1", "f32"),
        fx(d, "task2", "f32"),
    );
    ok(
        d,
        &format!("extract --base {base} --tuned {t1} -o d1.safetensors --slot 0/2"),
    );
    ok(
        d,
        &format!("extract --base {base} --tuned {t2} -o d2.safetensors --slot 1/2"),
    );
    run(
        d,
        &format!("merge --base {base} d1.safetensors d2.safetensors -o m.safetensors {extra}"),
    )
    .usage_error(words);
    assert_nothing_written(d, "m.safetensors");
}

#[test]
fn no_arguments_is_a_usage_error() {
    let dir = tmp();
    run(dir.path(), "").usage_error(&[]);
}

#[test]
fn unknown_subcommand_is_a_usage_error() {
    let dir = tmp();
    run(dir.path(), "frobnicate").usage_error(&["frobnicate"]);
}

#[test]
fn unknown_option_is_a_usage_error() {
    assert_extract_usage_error("--frobnicate", &["--frobnicate"]);
}

#[test]
fn density_above_one_is_a_usage_error() {
    assert_extract_usage_error("--density 1.5", &["density", "1.5"]);
}

#[test]
fn negative_density_is_a_usage_error() {
    assert_extract_usage_error("--density -0.1", &[]);
    assert_extract_usage_error("--density=-0.1", &["density", "-0.1"]);
}

#[test]
fn non_finite_density_is_a_usage_error() {
    assert_extract_usage_error("--density NaN", &["density"]);
    assert_extract_usage_error("--density inf", &["density"]);
}

#[test]
fn slot_index_out_of_range_is_a_usage_error() {
    assert_extract_usage_error("--slot 3/3", &["slot", "3/3"]);
    assert_extract_usage_error("--slot 0/0", &["slot"]);
}

#[test]
fn malformed_slot_is_a_usage_error() {
    assert_extract_usage_error("--slot abc", &["slot", "abc"]);
    assert_extract_usage_error("--slot 1/", &["slot"]);
}

#[test]
fn density_wider_than_its_slot_is_a_usage_error() {
    assert_extract_usage_error("--slot 0/3 --density 0.5", &["slot", "0.5"]);
}

#[test]
fn invalid_glob_is_a_usage_error() {
    assert_extract_usage_error("--include model.[layers", &["model.[layers"]);
}

#[test]
fn wrong_number_of_weights_is_a_usage_error() {
    assert_merge_usage_error("--weights 1,2,3", &["weights"]);
    assert_merge_usage_error("--weights 1", &["weights"]);
}

#[test]
fn non_finite_weight_is_a_usage_error() {
    assert_merge_usage_error("--weights 1,NaN", &["weights"]);
}

#[test]
fn unknown_output_dtype_is_a_usage_error() {
    assert_merge_usage_error("--dtype f8", &["dtype", "f8"]);
}

#[test]
fn zero_threads_is_a_usage_error() {
    assert_merge_usage_error("--threads 0", &["threads"]);
    assert_extract_usage_error("--threads 0", &["threads"]);
}

#[test]
fn merge_without_deltas_is_a_usage_error() {
    let dir = tmp();
    let d = dir.path();
    let base = fx(d, "base", "f32");
    run(d, &format!("merge --base {base} -o m.safetensors")).usage_error(&[]);
    assert_nothing_written(d, "m.safetensors");
}

// ==========================================================================================
// 4. Failed operations (exit 1): unreadable inputs
// ==========================================================================================

#[test]
fn missing_input_file_fails_naming_it() {
    let dir = tmp();
    let d = dir.path();
    let base = fx(d, "base", "f32");
    run(
        d,
        &format!("extract --base {base} --tuned nope.safetensors -o d.safetensors"),
    )
    .error(&["nope.safetensors"]);
    assert_nothing_written(d, "d.safetensors");
    run(
        d,
        &format!("apply --base {base} gone.safetensors -o m.safetensors"),
    )
    .error(&["gone.safetensors"]);
    assert_nothing_written(d, "m.safetensors");
    run(
        d,
        "apply --base nobase.safetensors gone.safetensors -o m.safetensors",
    )
    .error(&["nobase.safetensors"]);
    assert_nothing_written(d, "m.safetensors");
    run(d, "inspect gone.safetensors").error(&["gone.safetensors"]);
    run(d, "verify --base nobase.safetensors gone.safetensors").error(&["nobase.safetensors"]);
}

/// Writes `file` with `bytes`, and checks that every subcommand refuses it by name, in each
/// role it can play, writing nothing.
#[track_caller]
fn assert_unreadable_refused(file: &str, bytes: &[u8]) {
    let dir = tmp();
    let d = dir.path();
    fs::write(d.join(file), bytes).unwrap();
    let (base, tuned) = (fx(d, "base", "bf16"), fx(d, "task1", "bf16"));
    run(
        d,
        &format!("extract --base {base} --tuned {file} -o d.safetensors"),
    )
    .error(&[file]);
    assert_nothing_written(d, "d.safetensors");
    run(
        d,
        &format!("extract --base {file} --tuned {tuned} -o d.safetensors"),
    )
    .error(&[file]);
    assert_nothing_written(d, "d.safetensors");
    ok(
        d,
        &format!("extract --base {base} --tuned {tuned} -o good.safetensors"),
    );
    run(
        d,
        &format!("apply --base {file} good.safetensors -o m.safetensors"),
    )
    .error(&[file]);
    assert_nothing_written(d, "m.safetensors");
    run(
        d,
        &format!("merge --base {base} good.safetensors {file} -o m.safetensors"),
    )
    .error(&[file]);
    assert_nothing_written(d, "m.safetensors");
    run(d, &format!("inspect {file}")).error(&[file]);
    run(d, &format!("verify --base {base} {file}")).error(&[file]);
}

#[test]
fn random_bytes_are_refused() {
    assert_unreadable_refused("random.safetensors", &noise(4096, 1));
}

#[test]
fn empty_file_is_refused() {
    assert_unreadable_refused("empty.safetensors", &[]);
}

#[test]
fn truncated_checkpoint_is_refused() {
    let full = bytes_of(&fixture_path("task1", "bf16"));
    assert_unreadable_refused("truncated.safetensors", &full[..full.len() / 2]);
    assert_unreadable_refused("truncated-header.safetensors", &full[..100]);
}

#[test]
fn plausible_length_with_garbage_header_is_refused() {
    let mut bytes = 64u64.to_le_bytes().to_vec();
    bytes.extend(noise(64 + 32, 7));
    assert_unreadable_refused("garbage-header.safetensors", &bytes);
}

#[test]
fn folder_given_as_checkpoint_is_refused() {
    let dir = tmp();
    let d = dir.path();
    fs::create_dir(d.join("ckpt")).unwrap();
    let tuned = fx(d, "task1", "f32");
    run(
        d,
        &format!("extract --base ckpt --tuned {tuned} -o d.safetensors"),
    )
    .error(&["ckpt"]);
    assert_nothing_written(d, "d.safetensors");
}

#[test]
fn plain_checkpoint_given_as_delta_is_refused() {
    let dir = tmp();
    let d = dir.path();
    let (base, task) = (fx(d, "base", "f32"), fx(d, "task1", "f32"));
    run(d, &format!("apply --base {base} {task} -o m.safetensors"))
        .error(&[&task, "not a sotu-delta file"]);
    assert_nothing_written(d, "m.safetensors");
    run(d, &format!("inspect {task}")).error(&[&task]);
}

// ==========================================================================================
// 4. Failed operations: a base and a fine-tune that do not correspond
// ==========================================================================================

/// Writes tuned-bad.safetensors = task1-f32 through `edit`, extracts it against base-f32, and
/// asserts that the refusal names the fine-tune and `words`.
#[track_caller]
fn assert_bad_tuned_refused(edit: impl FnOnce(&mut Vec<Tensor>, &mut Metadata), words: &[&str]) {
    let dir = tmp();
    let d = dir.path();
    let base = fx(d, "base", "f32");
    rewrite(
        &fixture_path("task1", "f32"),
        &d.join("tuned-bad.safetensors"),
        edit,
    );
    let mut all = vec!["tuned-bad.safetensors"];
    all.extend_from_slice(words);
    run(
        d,
        &format!("extract --base {base} --tuned tuned-bad.safetensors -o d.safetensors"),
    )
    .error(&all);
    assert_nothing_written(d, "d.safetensors");
}

#[test]
fn shape_mismatch_between_base_and_tuned_names_the_tensor() {
    let name = "model.layers.0.self_attn.k_proj.weight";
    assert_bad_tuned_refused(|ts, _| tensor(ts, name).2 = vec![32, 16], &[name]);
}

#[test]
fn dtype_mismatch_between_base_and_tuned_names_the_tensor() {
    let edit = |ts: &mut Vec<Tensor>, _: &mut Metadata| {
        let t = tensor(ts, UP_PROJ1);
        t.1 = Dtype::F16;
        t.3.truncate(t.3.len() / 2);
    };
    assert_bad_tuned_refused(edit, &[UP_PROJ1]);
}

#[test]
fn base_tensor_missing_from_tuned_names_the_tensor() {
    let name = "model.layers.1.self_attn.v_proj.weight";
    assert_bad_tuned_refused(|ts, _| ts.retain(|t| t.0 != name), &[name]);
}

#[test]
fn reserved_prefix_in_tuned_names_the_tensor() {
    let add = |name: &'static str| {
        move |ts: &mut Vec<Tensor>, _: &mut Metadata| {
            ts.push((name.into(), Dtype::F64, vec![1], vec![0; 8]))
        }
    };
    assert_bad_tuned_refused(add("sotu/stats"), &["sotu/stats"]);
    assert_bad_tuned_refused(add("sotu/extra"), &["sotu/extra"]);
}

#[test]
fn reserved_prefix_in_base_names_the_tensor() {
    let dir = tmp();
    let d = dir.path();
    let tuned = fx(d, "task1", "f32");
    rewrite(
        &fixture_path("base", "f32"),
        &d.join("base-bad.safetensors"),
        |ts, _| ts.push(("sotu/offsets/x".into(), Dtype::U64, vec![1], vec![0; 8])),
    );
    run(
        d,
        &format!("extract --base base-bad.safetensors --tuned {tuned} -o d.safetensors"),
    )
    .error(&["base-bad.safetensors", "sotu/offsets/x"]);
    assert_nothing_written(d, "d.safetensors");
}

// ==========================================================================================
// 4. Failed operations: the wrong base at merge, apply and verify time
// ==========================================================================================

#[test]
fn apply_onto_a_perturbed_base_names_the_tensor_and_writes_nothing() {
    let dir = tmp();
    let d = dir.path();
    three_slot_deltas(d, "bf16");
    let bad = perturbed_base(d, "bf16", UP_PROJ1);
    run(
        d,
        &format!("apply --base {bad} d1.safetensors -o m.safetensors"),
    )
    .error(&[&bad, UP_PROJ1, "--force"]);
    assert_nothing_written(d, "m.safetensors");
}

#[test]
fn merge_onto_a_perturbed_base_names_the_tensor_and_writes_nothing() {
    let dir = tmp();
    let d = dir.path();
    three_slot_deltas(d, "bf16");
    let bad = perturbed_base(d, "bf16", EMBED);
    run(
        d,
        &format!(
            "merge --base {bad} d1.safetensors d2.safetensors d3.safetensors -o m.safetensors"
        ),
    )
    .error(&[&bad, EMBED]);
    assert_nothing_written(d, "m.safetensors");
}

#[test]
fn apply_onto_a_perturbed_base_with_force_warns_and_succeeds() {
    let dir = tmp();
    let d = dir.path();
    three_slot_deltas(d, "bf16");
    let bad = perturbed_base(d, "bf16", UP_PROJ1);
    let out = ok(
        d,
        &format!("apply --force --base {bad} d1.safetensors -o m.safetensors"),
    );
    assert!(out.message("warning").contains(UP_PROJ1), "{out}");
    assert!(d.join("m.safetensors").exists());
    assert!(partial_files(d).is_empty());
    assert_eq!(merge_record(&d.join("m.safetensors"))["forced"], true);
}

/// Under --force the merged file's record must not pass the deltas' base off as the base used:
/// it keeps each delta's own fingerprint and says `forced`; the --json report gives the
/// fingerprint of the base actually read.
#[test]
fn forced_merge_records_the_deltas_fingerprints_and_the_flag() {
    let dir = tmp();
    let d = dir.path();
    three_slot_deltas(d, "bf16");
    let bad = perturbed_base(d, "bf16", UP_PROJ1);
    let used = ok(
        d,
        &format!(
            "merge --force --json --base {bad} d1.safetensors d2.safetensors -o m.safetensors"
        ),
    )
    .json()["base_fingerprint"]
        .clone();
    let deltas_base =
        ok(d, "inspect --json d1.safetensors").json()["deltas"][0]["base_fingerprint"].clone();
    assert_ne!(
        used, deltas_base,
        "the perturbed base must have a fingerprint of its own"
    );
    let record = merge_record(&d.join("m.safetensors"));
    assert_eq!(record["forced"], true);
    assert_eq!(
        record["deltas"][0]["base_fingerprint"], deltas_base,
        "{record}"
    );
    // The record claims no base fingerprint of its own: only what each delta was taken
    // against, plus `forced` (docs/FORMAT.md section 9).
    assert!(record.get("base_fingerprint").is_none(), "{record}");
}

#[test]
fn merge_onto_a_base_of_another_dtype_names_the_tensor() {
    let dir = tmp();
    let d = dir.path();
    three_slot_deltas(d, "bf16");
    let other = fx(d, "base", "f32");
    run(
        d,
        &format!("merge --force --base {other} d1.safetensors d2.safetensors -o m.safetensors"),
    )
    .error(&[&other, EMBED]);
    assert_nothing_written(d, "m.safetensors");
}

#[test]
fn apply_onto_a_base_lacking_a_tensor_names_it() {
    let dir = tmp();
    let d = dir.path();
    three_slot_deltas(d, "f16");
    let name = "model.layers.0.mlp.gate_proj.weight";
    rewrite(
        &fixture_path("base", "f16"),
        &d.join("base-short.safetensors"),
        |ts, _| ts.retain(|t| t.0 != name),
    );
    run(
        d,
        "apply --force --base base-short.safetensors d2.safetensors -o m.safetensors",
    )
    .error(&["base-short.safetensors", name]);
    assert_nothing_written(d, "m.safetensors");
}

#[test]
fn apply_onto_a_base_with_an_extra_tensor_is_refused_unless_forced() {
    let dir = tmp();
    let d = dir.path();
    let (base, tuned) = (fx(d, "base", "f32"), fx(d, "task2", "f32"));
    ok(
        d,
        &format!("extract --base {base} --tuned {tuned} -o d.safetensors"),
    );
    let extra: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|x| x.to_le_bytes()).collect();
    rewrite(
        &d.join(&base),
        &d.join("base-bigger.safetensors"),
        |ts, _| ts.push(("extra.bias".into(), Dtype::F32, vec![2], extra.clone())),
    );
    run(
        d,
        "apply --base base-bigger.safetensors d.safetensors -o m.safetensors",
    )
    .error(&["base-bigger.safetensors", "extra.bias"]);
    assert_nothing_written(d, "m.safetensors");
    let v = run(d, "verify --base base-bigger.safetensors d.safetensors");
    v.error(&["d.safetensors"]);
    assert!(v.stdout.contains("extra.bias"), "{v}");
    let out = ok(
        d,
        "apply --force --base base-bigger.safetensors d.safetensors -o m.safetensors",
    );
    assert!(out.message("warning").contains("extra.bias"), "{out}");
    assert_eq!(tensor_map(&d.join("m.safetensors"))["extra.bias"].2, extra);
}

#[test]
fn verify_against_a_perturbed_base_fails_and_lists_the_tensor() {
    let dir = tmp();
    let d = dir.path();
    three_slot_deltas(d, "bf16");
    let bad = perturbed_base(d, "bf16", UP_PROJ1);
    let out = run(
        d,
        &format!("verify --base {bad} d1.safetensors d2.safetensors"),
    );
    out.error(&["d1.safetensors", "d2.safetensors", &bad]);
    assert_eq!(out.stdout.matches("MISMATCH").count(), 2, "{out}");
    let differs: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.contains("differs"))
        .collect();
    assert_eq!(differs.len(), 2, "{out}");
    assert!(differs.iter().all(|l| l.contains(UP_PROJ1)), "{out}");

    let j = run(d, &format!("verify --json --base {bad} d1.safetensors"));
    j.error(&["d1.safetensors"]);
    let verdict = &j.json()[0];
    assert_eq!(verdict["ok"], false, "{verdict}");
    assert_eq!(verdict["mismatched"], json!([UP_PROJ1]), "{verdict}");
}

#[test]
fn verify_fails_naming_only_the_foreign_delta() {
    let dir = tmp();
    let d = dir.path();
    let (base, t1, t2) = (
        fx(d, "base", "f16"),
        fx(d, "task1", "f16"),
        fx(d, "task2", "f16"),
    );
    ok(
        d,
        &format!("extract --base {base} --tuned {t1} -o good.safetensors"),
    );
    // Taken against task2 as if it were the base.
    ok(
        d,
        &format!("extract --base {t2} --tuned {t1} -o foreign.safetensors"),
    );
    let out = run(
        d,
        &format!("verify --base {base} good.safetensors foreign.safetensors"),
    );
    out.error(&["foreign.safetensors"]);
    assert!(!out.message("error").contains("good.safetensors"), "{out}");
    assert!(out.stdout.contains("good.safetensors: OK"), "{out}");
}

// ==========================================================================================
// 4. Failed operations: damaged or foreign delta files
// ==========================================================================================

/// Copies base-bf16, extracts task1-bf16 at density 0.5 as good.safetensors, and writes bad.safetensors from it
/// through `edit`.
fn damaged_delta(edit: impl FnOnce(&mut Vec<Tensor>, &mut Metadata)) -> TempDir {
    let dir = tmp();
    let d = dir.path();
    let (base, tuned) = (fx(d, "base", "bf16"), fx(d, "task1", "bf16"));
    ok(
        d,
        &format!("extract --base {base} --tuned {tuned} -o good.safetensors --density 0.5"),
    );
    rewrite(
        &d.join("good.safetensors"),
        &d.join("bad.safetensors"),
        edit,
    );
    dir
}

/// apply, merge and forced merge of bad.safetensors (from `damaged_delta`) all fail naming it and
/// `words`, and write nothing.
#[track_caller]
fn assert_damaged_delta_refused(dir: &Path, words: &[&str]) {
    let mut all = vec!["bad.safetensors"];
    all.extend_from_slice(words);
    for line in [
        "apply --base base-bf16.safetensors bad.safetensors -o m.safetensors",
        "merge --base base-bf16.safetensors good.safetensors bad.safetensors -o m.safetensors",
        "merge --force --base base-bf16.safetensors bad.safetensors good.safetensors -o m.safetensors",
    ] {
        run(dir, line).error(&all);
        assert_nothing_written(dir, "m.safetensors");
    }
}

#[test]
fn unknown_major_format_version_is_refused_naming_the_version() {
    let dir = damaged_delta(|_, md| {
        md.insert("format_version".into(), "2.0".into());
    });
    assert_damaged_delta_refused(dir.path(), &["2.0"]);
    run(dir.path(), "inspect bad.safetensors").error(&["bad.safetensors", "2.0"]);
    run(
        dir.path(),
        "verify --base base-bf16.safetensors bad.safetensors",
    )
    .error(&["bad.safetensors", "2.0"]);
}

#[test]
fn format_version_that_is_not_a_number_is_refused() {
    let dir = damaged_delta(|_, md| {
        md.insert("format_version".into(), "one".into());
    });
    assert_damaged_delta_refused(dir.path(), &["one"]);
}

#[test]
fn newer_minor_format_version_with_an_added_key_is_readable() {
    let dir = damaged_delta(|_, md| {
        md.insert("format_version".into(), "1.7".into());
        md.insert("added_in_1_7".into(), "anything".into());
    });
    let d = dir.path();
    ok(d, "inspect bad.safetensors");
    ok(
        d,
        "apply --base base-bf16.safetensors bad.safetensors -o m.safetensors",
    );
    ok(
        d,
        "apply --base base-bf16.safetensors good.safetensors -o m2.safetensors",
    );
    assert!(tensor_map(&d.join("m.safetensors")) == tensor_map(&d.join("m2.safetensors")));
}

/// docs/FORMAT.md sections 2 and 10: "a larger minor only adds keys and stays readable", and
/// "a change that only adds metadata keys or tensors raises the minor". So a 1.x file holding
/// a tensor that this 1.0 reader does not know must still be readable.
#[test]
fn newer_minor_format_version_with_an_added_tensor_is_readable() {
    let dir = damaged_delta(|ts, md| {
        md.insert("format_version".into(), "1.1".into());
        ts.push((
            "sotu/added_in_1_1".into(),
            Dtype::U8,
            vec![4],
            vec![1, 2, 3, 4],
        ));
    });
    ok(dir.path(), "inspect bad.safetensors");
    ok(
        dir.path(),
        "apply --base base-bf16.safetensors bad.safetensors -o m.safetensors",
    );
}

#[test]
fn missing_format_key_is_refused() {
    let dir = damaged_delta(|_, md| {
        md.remove("format");
    });
    assert_damaged_delta_refused(dir.path(), &["format"]);
}

#[test]
fn unknown_mask_function_is_refused() {
    let dir = damaged_delta(|_, md| {
        md.insert("mask".into(), "sotu-mix32-v9".into());
    });
    assert_damaged_delta_refused(dir.path(), &["sotu-mix32-v9"]);
    run(dir.path(), "inspect bad.safetensors").error(&["bad.safetensors", "sotu-mix32-v9"]);
}

#[test]
fn non_integer_seed_is_refused() {
    let dir = damaged_delta(|_, md| {
        md.insert("seed".into(), "twenty-four".into());
    });
    assert_damaged_delta_refused(dir.path(), &["seed"]);
}

#[test]
fn interval_with_lo_above_hi_is_refused() {
    let dir = damaged_delta(|_, md| {
        md.insert("lo".into(), "3000000000".into());
        md.insert("hi".into(), "1000".into());
    });
    assert_damaged_delta_refused(dir.path(), &["lo"]);
    run(dir.path(), "inspect bad.safetensors").error(&["bad.safetensors"]);
}

#[test]
fn interval_beyond_2_pow_32_is_refused() {
    let dir = damaged_delta(|_, md| {
        md.insert("hi".into(), "4294967297".into());
    });
    assert_damaged_delta_refused(dir.path(), &["hi"]);
}

#[test]
fn zero_chunk_size_is_refused() {
    let dir = damaged_delta(|_, md| {
        md.insert("chunk".into(), "0".into());
    });
    assert_damaged_delta_refused(dir.path(), &["chunk"]);
}

#[test]
fn informational_metadata_is_not_relied_on() {
    // `density` and `slot` are for people, `tool` names the writer: lo/hi are the truth.
    let dir = damaged_delta(|_, md| {
        md.insert("density".into(), "0.9".into());
        md.insert("slot".into(), "7/8".into());
        md.remove("tool");
    });
    let d = dir.path();
    let j = ok(d, "inspect --json bad.safetensors").json();
    assert_eq!(
        j["deltas"][0]["density"].as_f64(),
        Some(0.5),
        "{}",
        j["deltas"][0]
    );
    ok(
        d,
        "apply --base base-bf16.safetensors bad.safetensors -o m.safetensors",
    );
    ok(
        d,
        "apply --base base-bf16.safetensors good.safetensors -o m2.safetensors",
    );
    assert!(tensor_map(&d.join("m.safetensors")) == tensor_map(&d.join("m2.safetensors")));
}

#[test]
fn swapped_chunk_offsets_are_refused_naming_the_tensor() {
    let dir = damaged_delta(|ts, _| {
        edit_offsets(ts, EMBED, |offs| {
            assert_eq!(offs.len(), 3, "65632 elements: two chunks");
            offs.swap(0, 1);
        })
    });
    assert_damaged_delta_refused(dir.path(), &[EMBED]);
    run(dir.path(), "inspect bad.safetensors").error(&["bad.safetensors", EMBED]);
}

#[test]
fn inflated_chunk_offset_is_refused_naming_the_tensor() {
    // [0, a, kept] -> [0, a + 1, kept]: monotonic, ends at kept, each step within its chunk;
    // only the chunk walk shows that chunk 0 keeps a elements, not a + 1.
    let dir = damaged_delta(|ts, _| {
        edit_offsets(ts, EMBED, |offs| {
            assert!(
                offs[2] > offs[1],
                "the 96-element chunk keeps something at density 0.5"
            );
            offs[1] += 1;
        })
    });
    assert_damaged_delta_refused(dir.path(), &[EMBED]);
}

#[test]
fn deflated_chunk_offset_is_refused_naming_the_tensor() {
    let dir = damaged_delta(|ts, _| edit_offsets(ts, EMBED, |offs| offs[1] -= 1));
    assert_damaged_delta_refused(dir.path(), &[EMBED]);
}

#[test]
fn corrupt_offsets_are_refused_by_inspect_when_it_decodes() {
    // With a second delta under another seed the masks overlap, and inspect --base decodes
    // every chunk to compute the cosine.
    let dir = damaged_delta(|ts, _| edit_offsets(ts, EMBED, |offs| offs[1] += 1));
    let d = dir.path();
    let (base, tuned) = (fx(d, "base", "bf16"), fx(d, "task2", "bf16"));
    ok(
        d,
        &format!(
            "extract --base {base} --tuned {tuned} -o other.safetensors --density 0.5 --seed 5"
        ),
    );
    run(
        d,
        &format!("inspect --base {base} bad.safetensors other.safetensors"),
    )
    .error(&["bad.safetensors", EMBED]);
}

#[test]
fn kept_count_disagreeing_with_the_stored_values_is_refused() {
    let dir = damaged_delta(|_, md| {
        edit_entries(md, |e| {
            let kept = e[Q_PROJ0]["kept"].as_u64().unwrap();
            e[Q_PROJ0]["kept"] = (kept + 1).into();
        })
    });
    assert_damaged_delta_refused(dir.path(), &[Q_PROJ0]);
    run(dir.path(), "inspect bad.safetensors").error(&["bad.safetensors", Q_PROJ0]);
}

#[test]
fn kept_count_disagreeing_with_the_mask_is_refused() {
    // One value dropped, with kept, shape and offsets all made to agree: the file is consistent
    // in itself, but the mask keeps one element more than it stores.
    let dir = damaged_delta(|ts, md| {
        let values = tensor(ts, Q_PROJ0);
        let kept = values.2[0] - 1;
        values.2 = vec![kept];
        values.3.truncate(kept * 2); // bf16
        edit_offsets(ts, Q_PROJ0, |offs| *offs = vec![0, kept as u64]);
        edit_entries(md, |e| e[Q_PROJ0]["kept"] = (kept as u64).into());
    });
    assert_damaged_delta_refused(dir.path(), &[Q_PROJ0]);
}

#[test]
fn kept_count_above_the_element_count_is_refused() {
    let dir = damaged_delta(|_, md| edit_entries(md, |e| e[Q_PROJ0]["kept"] = 5000.into()));
    assert_damaged_delta_refused(dir.path(), &[Q_PROJ0]);
}

#[test]
fn undeclared_tensor_in_a_delta_is_refused() {
    let dir = damaged_delta(|ts, _| {
        ts.push((
            "extra.weight".into(),
            Dtype::BF16,
            vec![2],
            vec![0x80, 0x3f, 0x80, 0x3f],
        ));
    });
    assert_damaged_delta_refused(dir.path(), &["extra.weight"]);
    run(dir.path(), "inspect bad.safetensors").error(&["bad.safetensors", "extra.weight"]);
}

#[test]
fn declared_tensor_missing_from_a_delta_is_refused() {
    let dir = damaged_delta(|ts, _| {
        let key = format!("sotu/offsets/{Q_PROJ0}");
        ts.retain(|t| t.0 != key);
    });
    assert_damaged_delta_refused(dir.path(), &[Q_PROJ0]);
}

#[test]
fn stored_tensor_of_the_wrong_dtype_is_refused() {
    let dir = damaged_delta(|ts, _| tensor(ts, Q_PROJ0).1 = Dtype::F16);
    assert_damaged_delta_refused(dir.path(), &[Q_PROJ0]);
}

#[test]
fn entry_using_the_reserved_prefix_is_refused() {
    let dir = damaged_delta(|_, md| {
        edit_entries(md, |e| {
            let entry = e["model.logit_scale"].clone();
            e.insert("sotu/sneaky".into(), entry);
        })
    });
    run(dir.path(), "inspect bad.safetensors").error(&["bad.safetensors", "sotu/sneaky"]);
}

#[test]
fn masked_entry_of_an_integer_dtype_is_refused() {
    let dir = damaged_delta(|_, md| {
        edit_entries(md, |e| {
            e[POSITION_IDS]["kind"] = "masked".into();
            e[POSITION_IDS]["kept"] = 3.into();
        })
    });
    assert_damaged_delta_refused(dir.path(), &[POSITION_IDS]);
}

#[test]
fn tensors_metadata_that_is_not_json_is_refused() {
    let dir = damaged_delta(|_, md| {
        md.insert("tensors".into(), "{not json".into());
    });
    assert_damaged_delta_refused(dir.path(), &["tensors"]);
}

/// A checkpoint of one 300000-element f32 tensor (more than one 262144-element merge tile, and
/// several 65536-element chunks) and a small one, from `seed`.
fn big_checkpoint(path: &Path, seed: u64) {
    let tensors = vec![
        (
            "big.weight".to_string(),
            Dtype::F32,
            vec![300, 1000],
            f32_values(300_000, seed),
        ),
        (
            "small.weight".to_string(),
            Dtype::F32,
            vec![10],
            f32_values(10, seed + 1),
        ),
    ];
    write_file(path, &tensors, &BTreeMap::new()).unwrap();
}

/// Rewrites a delta's chunk size to `chunk`, recomputing the offsets of its masked tensors.
fn rechunk(src: &Path, dst: &Path, chunk: u64) {
    rewrite(src, dst, |ts, md| {
        let seed: u64 = md["seed"].parse().unwrap();
        let iv = Interval::new(md["lo"].parse().unwrap(), md["hi"].parse().unwrap()).unwrap();
        let entries: serde_json::Map<String, Value> = serde_json::from_str(&md["tensors"]).unwrap();
        for (name, e) in entries.iter().filter(|(_, e)| e["kind"] == "masked") {
            let numel: u64 = e["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .product();
            let mask = Mask::new(seed, name, iv);
            edit_offsets(ts, name, |offs| {
                *offs = vec![0];
                for c in 0..numel.div_ceil(chunk) {
                    let kept = mask.count_kept(c * chunk..numel.min((c + 1) * chunk));
                    offs.push(offs.last().unwrap() + kept);
                }
            });
        }
        md.insert("chunk".into(), chunk.to_string());
    });
}

/// docs/FORMAT.md: `chunk` is any integer >= 1 ("the writer uses 65536"); a reader decodes the
/// same values whatever the chunk size.
#[test]
fn delta_with_another_chunk_size_is_decoded_the_same() {
    let dir = tmp();
    let d = dir.path();
    big_checkpoint(&d.join("base.safetensors"), 11);
    big_checkpoint(&d.join("tuned.safetensors"), 12);
    ok(
        d,
        "extract --base base.safetensors --tuned tuned.safetensors -o delta.safetensors --density 0.3",
    );
    ok(
        d,
        "apply --base base.safetensors delta.safetensors -o want.safetensors",
    );
    let want = tensor_map(&d.join("want.safetensors"));
    for chunk in [1000u64, 7, 1 << 40] {
        rechunk(
            &d.join("delta.safetensors"),
            &d.join(format!("delta-{chunk}.safetensors")),
            chunk,
        );
        ok(d, &format!("inspect delta-{chunk}.safetensors"));
        ok(
            d,
            &format!("verify --base base.safetensors delta-{chunk}.safetensors"),
        );
        ok(
            d,
            &format!(
                "apply --base base.safetensors delta-{chunk}.safetensors -o got-{chunk}.safetensors"
            ),
        );
        assert!(
            tensor_map(&d.join(format!("got-{chunk}.safetensors"))) == want,
            "chunk {chunk}"
        );
    }
}

#[test]
fn merge_of_conflicting_new_tensors_names_the_tensor() {
    let dir = tmp();
    let d = dir.path();
    let (base, tuned) = (fx(d, "base", "f32"), fx(d, "task3", "f32"));
    rewrite(&d.join(&tuned), &d.join("variant.safetensors"), |ts, _| {
        tensor(ts, "score.weight").3[0] ^= 1
    });
    ok(
        d,
        &format!("extract --base {base} --tuned {tuned} -o a.safetensors --slot 0/2"),
    );
    ok(
        d,
        &format!("extract --base {base} --tuned variant.safetensors -o b.safetensors --slot 1/2"),
    );
    run(
        d,
        &format!("merge --base {base} a.safetensors b.safetensors -o m.safetensors"),
    )
    .error(&["score.weight", "a.safetensors", "b.safetensors"]);
    assert_nothing_written(d, "m.safetensors");
}

#[test]
fn merge_of_conflicting_whole_integer_tensors_names_the_tensor() {
    let dir = tmp();
    let d = dir.path();
    let (base, tuned) = (fx(d, "base", "f32"), fx(d, "task1", "f32"));
    rewrite(&d.join(&tuned), &d.join("variant.safetensors"), |ts, _| {
        tensor(ts, POSITION_IDS).3[0] ^= 4
    });
    ok(
        d,
        &format!("extract --base {base} --tuned {tuned} -o a.safetensors --slot 0/2"),
    );
    ok(
        d,
        &format!("extract --base {base} --tuned variant.safetensors -o b.safetensors --slot 1/2"),
    );
    run(
        d,
        &format!("merge --base {base} a.safetensors b.safetensors -o m.safetensors"),
    )
    .error(&[POSITION_IDS, "a.safetensors", "b.safetensors"]);
    assert_nothing_written(d, "m.safetensors");
}

// ==========================================================================================
// 4. Failed operations: where the output goes
// ==========================================================================================

/// The bytes of `files` in `dir`.
fn snapshot(dir: &Path, files: &[&str]) -> Vec<Vec<u8>> {
    files.iter().map(|f| bytes_of(&dir.join(f))).collect()
}

#[test]
fn output_equal_to_an_input_is_refused_and_the_input_is_unchanged() {
    let dir = tmp();
    let d = dir.path();
    let (base, tuned) = (fx(d, "base", "bf16"), fx(d, "task1", "bf16"));
    ok(
        d,
        &format!("extract --base {base} --tuned {tuned} -o delta.safetensors"),
    );
    let files = [base.as_str(), tuned.as_str(), "delta.safetensors"];
    let before = snapshot(d, &files);
    run(
        d,
        &format!("extract --base {base} --tuned {tuned} -o {tuned}"),
    )
    .error(&[&tuned]);
    run(
        d,
        &format!("extract --base {base} --tuned {tuned} -o {base}"),
    )
    .error(&[&base]);
    run(
        d,
        &format!("apply --base {base} delta.safetensors -o delta.safetensors"),
    )
    .error(&["delta.safetensors"]);
    run(
        d,
        &format!("apply --base {base} delta.safetensors -o ./{base}"),
    )
    .error(&[&base]);
    run(
        d,
        &format!("merge --force --base {base} delta.safetensors -o delta.safetensors"),
    )
    .error(&["delta.safetensors"]);
    assert!(before == snapshot(d, &files), "an input was modified");
    assert!(partial_files(d).is_empty(), "{:?}", partial_files(d));
}

#[test]
fn output_that_is_a_link_to_an_input_is_refused_and_the_input_is_unchanged() {
    let dir = tmp();
    let d = dir.path();
    let (base, tuned) = (fx(d, "base", "f16"), fx(d, "task2", "f16"));
    ok(
        d,
        &format!("extract --base {base} --tuned {tuned} -o delta.safetensors"),
    );
    fs::hard_link(d.join(&tuned), d.join("tuned-hardlink.safetensors")).unwrap();
    fs::hard_link(d.join(&base), d.join("base-hardlink.safetensors")).unwrap();
    std::os::unix::fs::symlink(
        d.join("delta.safetensors"),
        d.join("delta-symlink.safetensors"),
    )
    .unwrap();
    let files = [base.as_str(), tuned.as_str(), "delta.safetensors"];
    let before = snapshot(d, &files);
    run(
        d,
        &format!("extract --base {base} --tuned {tuned} -o tuned-hardlink.safetensors"),
    )
    .error(&["tuned-hardlink.safetensors"]);
    run(
        d,
        &format!("apply --base {base} delta.safetensors -o base-hardlink.safetensors"),
    )
    .error(&["base-hardlink.safetensors"]);
    run(
        d,
        &format!("apply --base {base} delta.safetensors -o delta-symlink.safetensors"),
    )
    .error(&["delta-symlink.safetensors"]);
    assert!(before == snapshot(d, &files), "an input was modified");
    assert!(
        fs::symlink_metadata(d.join("delta-symlink.safetensors"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert!(partial_files(d).is_empty(), "{:?}", partial_files(d));
}

#[test]
fn output_in_a_missing_folder_fails() {
    let dir = tmp();
    let d = dir.path();
    let (base, tuned) = (fx(d, "base", "f32"), fx(d, "task1", "f32"));
    run(
        d,
        &format!("extract --base {base} --tuned {tuned} -o no/such/dir/d.safetensors"),
    )
    .error(&["d.safetensors"]);
    assert!(!d.join("no").exists());
    assert!(partial_files(d).is_empty());
    ok(
        d,
        &format!("extract --base {base} --tuned {tuned} -o d.safetensors"),
    );
    run(
        d,
        &format!("apply --base {base} d.safetensors -o missing/m.safetensors"),
    )
    .error(&["m.safetensors"]);
    assert!(!d.join("missing").exists());
    assert!(partial_files(d).is_empty());
}

/// On a terminal, a merge draws a progress bar on stderr (bytes written, throughput, ETA);
/// `--quiet` draws none. The terminal is a pseudo-terminal from util-linux `script`; without it
/// the test says so and checks only the pipe case (no bar), which every other test covers too.
#[test]
fn progress_bar_only_on_a_terminal_and_not_quiet() {
    let dir = tmp();
    let d = dir.path();
    let base = three_slot_deltas(d, "f32");
    let line = format!("{BIN} merge --base {base} d1.safetensors d2.safetensors d3.safetensors -o");
    let piped = ok(
        d,
        &format!(
            "merge --base {base} d1.safetensors d2.safetensors d3.safetensors -o p.safetensors"
        ),
    );
    assert!(!piped.stderr.contains("written"), "{piped}");
    let on_tty = |args: &str| -> Option<String> {
        let o = std::process::Command::new("script")
            .current_dir(d)
            .args(["-qec", &format!("{line} {args}"), "/dev/null"])
            .output()
            .ok()?;
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        Some(String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let Some(shown) = on_tty("t.safetensors") else {
        eprintln!("skipped the terminal half: util-linux `script` is not installed");
        return;
    };
    assert!(
        shown.contains("written") && shown.contains("ETA"),
        "{shown}"
    );
    let quiet = on_tty("q.safetensors --quiet").unwrap();
    assert!(!quiet.contains("written"), "{quiet}");
    assert_eq!(
        bytes_of(&d.join("t.safetensors")),
        bytes_of(&d.join("p.safetensors"))
    );
}

/// `--json` reports the output's fingerprint, read back before the rename: it must equal the
/// base fingerprint that an extract against the committed output computes (a separate path:
/// hashes of the mapped file), for a single file and a sharded folder alike. Without `--json`
/// nothing is read back and no fingerprint is reported.
#[test]
fn json_output_fingerprint_is_what_a_later_extract_sees() {
    let dir = tmp();
    let d = dir.path();
    let base = three_slot_deltas(d, "bf16");
    for out in ["m.safetensors", "m-folder"] {
        let j = ok(
            d,
            &format!("merge --json --shard-size 40KB --base {base} d1.safetensors d2.safetensors d3.safetensors -o {out}"),
        )
        .json();
        let fp = j["output_fingerprint"]
            .as_str()
            .expect("output_fingerprint")
            .to_string();
        assert_eq!(fp.len(), 64);
        assert_ne!(fp, j["base_fingerprint"].as_str().unwrap());
        let e = ok(
            d,
            // The fine-tune: the merged model itself (it has the deltas' new tensors too).
            &format!("extract --json --base {out} --tuned m.safetensors -o x-{out}.safetensors"),
        )
        .json();
        assert_eq!(e["base_fingerprint"].as_str().unwrap(), fp, "{out}");
        // The delta's own fingerprint: hashes of its tensors as a reader sees them.
        let delta = Checkpoint::open(&d.join(format!("x-{out}.safetensors"))).unwrap();
        let hashes: Vec<[u8; 32]> = delta
            .tensors()
            .keys()
            .map(|n| *blake3::hash(&delta.tensor(n).unwrap().whole().unwrap()).as_bytes())
            .collect();
        let flat: Vec<u8> = hashes.concat();
        assert_eq!(
            e["output_fingerprint"].as_str().unwrap(),
            blake3::hash(&flat).to_hex().as_str()
        );
    }
    assert!(d.join("m-folder/model.safetensors.index.json").exists());
    let text = ok(
        d,
        &format!("apply --base {base} d1.safetensors -o a.safetensors"),
    );
    assert!(!text.stdout.contains("fingerprint"));
}

#[test]
fn file_output_that_is_an_existing_folder_fails_and_leaves_no_partial_file() {
    let dir = tmp();
    let d = dir.path();
    let (base, tuned) = (fx(d, "base", "f32"), fx(d, "task1", "f32"));
    ok(
        d,
        &format!("extract --base {base} --tuned {tuned} -o d.safetensors"),
    );
    fs::create_dir(d.join("outdir.safetensors")).unwrap();
    run(
        d,
        &format!("apply --base {base} d.safetensors -o outdir.safetensors"),
    )
    .error(&["outdir.safetensors"]);
    assert!(d.join("outdir.safetensors").is_dir());
    assert!(
        fs::read_dir(d.join("outdir.safetensors"))
            .unwrap()
            .next()
            .is_none()
    );
    assert!(partial_files(d).is_empty(), "{:?}", partial_files(d));
}

/// An output path without the `.safetensors` suffix is a model folder; one that exists already
/// is replaced whole (its old files do not survive), and nothing is left beside it.
#[test]
fn folder_output_replaces_an_existing_folder_whole() {
    let dir = tmp();
    let d = dir.path();
    let (base, tuned) = (fx(d, "base", "f32"), fx(d, "task1", "f32"));
    ok(
        d,
        &format!("extract --base {base} --tuned {tuned} -o d.safetensors"),
    );
    fs::create_dir(d.join("outdir")).unwrap();
    fs::write(d.join("outdir/stale.txt"), "old").unwrap();
    // Not a model folder: refused, left as it was.
    run(d, &format!("apply --base {base} d.safetensors -o outdir"))
        .error(&["outdir", "not a model folder"]);
    assert_eq!(fs::read(d.join("outdir/stale.txt")).unwrap(), b"old");
    // A model folder (an earlier output, say) is replaced whole.
    fs::write(d.join("outdir/model.safetensors"), "old weights").unwrap();
    ok(d, &format!("apply --base {base} d.safetensors -o outdir"));
    // Again where the filesystem cannot exchange two names (NFS): moved aside, then in.
    fs::write(d.join("outdir/stale.txt"), "old").unwrap();
    let o = Command::new(BIN)
        .current_dir(d)
        .env("SOTU_DELTA_NO_RENAME_EXCHANGE", "1")
        .args(["apply", "--base", &base, "d.safetensors", "-o", "outdir"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut names: Vec<String> = fs::read_dir(d.join("outdir"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    // The weights, and the model card and recipe every folder output gets (issue #13).
    assert_eq!(names, ["README.md", "model.safetensors", "sotu-delta.json"]);
    ok(
        d,
        &format!("apply --base {base} d.safetensors -o m.safetensors"),
    );
    assert_eq!(
        bytes_of(&d.join("outdir/model.safetensors")),
        bytes_of(&d.join("m.safetensors"))
    );
    assert!(partial_files(d).is_empty(), "{:?}", partial_files(d));
}

/// A write that fails (here past the file-size limit, with SIGXFSZ ignored so that the write
/// returns EFBIG) fails the run and removes the partial file.
#[test]
fn failed_write_leaves_no_partial_file() {
    let dir = tmp();
    let d = dir.path();
    let (base, tuned) = (fx(d, "base", "f32"), fx(d, "task1", "f32"));
    ok(
        d,
        &format!("extract --base {base} --tuned {tuned} -o delta.safetensors"),
    );
    for (args, out) in [
        (
            format!("extract --base {base} --tuned {tuned} -o d.safetensors"),
            "d.safetensors",
        ),
        (
            format!("apply --base {base} delta.safetensors -o m.safetensors"),
            "m.safetensors",
        ),
    ] {
        let script = format!("trap '' XFSZ; ulimit -f 8; exec '{BIN}' {args}");
        let o = std::process::Command::new("sh")
            .current_dir(d)
            .args(["-c", &script])
            .output();
        Outcome::from_output(o.expect("run sh")).error(&[out]);
        assert_nothing_written(d, out);
    }
}

/// An interrupted run (Ctrl-C: SIGINT) is a failed run too: the
/// (possibly many-gigabyte) `.sotu-delta-partial-*` file it was writing must not stay behind.
#[test]
fn interrupted_merge_leaves_no_partial_file() {
    interrupt_merge("m.safetensors");
}

/// The same for a folder output: its temporary sibling folder and the shards in it go.
#[test]
fn interrupted_folder_merge_leaves_no_partial_folder() {
    interrupt_merge("merged");
}

/// Ctrl-C while the shards of a folder output are created and registered, at many moments: the
/// stop takes the registries' locks (a `try_lock` that lost to a writer registering a shard once
/// left the partial folder behind in a loaded run) and removes the staging folder whole.
#[test]
fn interrupts_while_shards_are_created_leave_nothing() {
    let dir = tmp();
    let d = dir.path();
    // 300 tensors of 32K f32 elements, a shard each.
    let n = 32_768;
    let (mut base, mut tuned) = (Vec::new(), Vec::new());
    for i in 0..300u64 {
        let b = f32_values(n, 100 + i);
        let t: Vec<u8> = b
            .chunks_exact(4)
            .flat_map(|c| (f32::from_le_bytes(c.try_into().unwrap()) * 1.001).to_le_bytes())
            .collect();
        base.push((format!("w{i:03}"), Dtype::F32, vec![n], b));
        tuned.push((format!("w{i:03}"), Dtype::F32, vec![n], t));
    }
    let md = BTreeMap::new();
    write_file(&d.join("base.safetensors"), &base, &md).unwrap();
    write_file(&d.join("tuned.safetensors"), &tuned, &md).unwrap();
    ok(
        d,
        "extract --base base.safetensors --tuned tuned.safetensors -o delta.safetensors --density 0.5",
    );
    let mut interrupted = 0;
    for delay in 0..16u64 {
        let out = format!("merged{delay}");
        let mut args = vec![
            "merge",
            "--base",
            "base.safetensors",
            "--shard-size",
            "150KB",
        ];
        args.extend(std::iter::repeat_n("delta.safetensors", 8));
        args.extend(["-o", out.as_str()]);
        let mut child = std::process::Command::new(BIN)
            .current_dir(d)
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sotu-delta");
        let start = Instant::now();
        while partial_files(d).is_empty() && child.try_wait().unwrap().is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no partial file appeared"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(3 * delay));
        let pid = child.id().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-INT", &pid])
            .status();
        let status = child.wait().unwrap();
        if status.success() {
            // Finished before the interrupt: its output is whole; nothing partial either way.
            assert!(partial_files(d).is_empty(), "{:?}", partial_files(d));
            continue;
        }
        interrupted += 1;
        assert_ne!(status.code(), Some(101), "panicked on SIGINT");
        assert_nothing_written(d, &out);
    }
    assert!(
        interrupted >= 8,
        "test design: only {interrupted} of 16 runs were interrupted"
    );
}

fn interrupt_merge(output: &str) {
    let dir = tmp();
    let d = dir.path();
    // 4M f32 elements merged 400 times over on one thread: long enough to be interrupted
    // (40 times took only 0.14 s once the mask went to AVX-512, and the interrupt could come
    // after the commit on a loaded machine).
    let n = 4_000_000;
    let base = f32_values(n, 21);
    let tuned: Vec<u8> = base
        .chunks_exact(4)
        .flat_map(|c| (f32::from_le_bytes(c.try_into().unwrap()) * 1.001).to_le_bytes())
        .collect();
    let md = BTreeMap::new();
    write_file(
        &d.join("base.safetensors"),
        &[("w".into(), Dtype::F32, vec![n], base)],
        &md,
    )
    .unwrap();
    write_file(
        &d.join("tuned.safetensors"),
        &[("w".into(), Dtype::F32, vec![n], tuned)],
        &md,
    )
    .unwrap();
    ok(
        d,
        "extract --base base.safetensors --tuned tuned.safetensors -o delta.safetensors --density 0.5",
    );

    let mut args = vec![
        "--threads",
        "1",
        "merge",
        "--base",
        "base.safetensors",
        "--shard-size",
        "4MB",
        "-o",
        output,
    ];
    args.extend(std::iter::repeat_n("delta.safetensors", 400));
    let mut child = std::process::Command::new(BIN)
        .current_dir(d)
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sotu-delta");
    let start = Instant::now();
    while partial_files(d).is_empty() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("finished ({status}) before its partial file was seen: make the input larger");
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no partial file appeared"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let pid = child.id().to_string();
    let kill = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status();
    assert!(kill.expect("run kill").success());
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "the merge finished before the interrupt: make the input larger"
    );
    assert_ne!(status.code(), Some(101), "panicked on SIGINT");
    assert_nothing_written(d, output);
}

// ==========================================================================================
// 5. No panics where a clean error (or quiet exit) is due
// ==========================================================================================

/// `inspect --base` decodes the deltas against the base it is given. A base of another dtype
/// than the deltas' is a user mistake to report, not a reason to index out of range.
#[test]
fn inspect_with_a_base_of_another_dtype_fails_cleanly() {
    let dir = tmp();
    let d = dir.path();
    independent_deltas(d); // f32 deltas with overlapping masks: the cosine needs the base
    let other = fx(d, "base", "bf16");
    run(
        d,
        &format!("inspect --base {other} a.safetensors b.safetensors"),
    )
    .error(&[&other]);
}

/// Two deltas of models that disagree on a tensor's shape (the embedding: masked in one,
/// stored whole with 10 rows in the other). Comparing them needs the base; whatever the
/// answer, it must not be an out-of-range index.
#[test]
fn inspect_of_deltas_with_different_shapes_fails_cleanly() {
    let dir = tmp();
    let d = dir.path();
    let shrink = |ts: &mut Vec<Tensor>, _: &mut Metadata| {
        let t = tensor(ts, EMBED);
        t.2 = vec![10, 32];
        t.3.truncate(10 * 32 * 4);
    };
    rewrite(
        &fixture_path("base", "f32"),
        &d.join("small-base.safetensors"),
        shrink,
    );
    rewrite(
        &fixture_path("task2", "f32"),
        &d.join("small-tuned.safetensors"),
        shrink,
    );
    let exclude = format!("--exclude {EMBED}");
    ok(
        d,
        &format!(
            "extract --base small-base.safetensors --tuned small-tuned.safetensors -o small.safetensors {exclude}"
        ),
    );
    let (base, tuned) = (fx(d, "base", "f32"), fx(d, "task1", "f32"));
    ok(
        d,
        &format!("extract --base {base} --tuned {tuned} -o full.safetensors --slot 0/2"),
    );
    // Deltas of two different models: refused whether or not a base is given.
    run(d, "inspect full.safetensors small.safetensors").error(&[
        EMBED,
        "full.safetensors",
        "small.safetensors",
    ]);
    run(
        d,
        &format!("inspect --base {base} full.safetensors small.safetensors"),
    )
    .error(&[EMBED]);
}

/// `sotu-delta inspect ... | head` closes the pipe early; the tool must not panic over it.
#[test]
fn output_into_a_closed_pipe_does_not_panic() {
    let dir = tmp();
    let d = dir.path();
    three_slot_deltas(d, "bf16");
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader); // every write to stdout now fails with EPIPE
    let out = std::process::Command::new(BIN)
        .current_dir(d)
        .args([
            "inspect",
            "d1.safetensors",
            "d2.safetensors",
            "d3.safetensors",
        ])
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("run sotu-delta");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(
        out.status.code(),
        Some(101),
        "panicked on a closed stdout:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// The AVX-512 kernels (placing, settling, gathering, statistics, keep bits) write the same
/// bytes as the portable loops (`SOTU_DELTA_SCALAR=1`), on values drawn from every bit pattern
/// (NaN, ±inf, ±0, subnormals, exponents far apart) as well as ordinary fine-tunes, in every
/// dtype: extract, a merge of disjoint slots (the placing path), a weighted merge (the f64
/// path) and apply. On a CPU without AVX-512 both runs take the portable loops.
#[test]
fn simd_and_portable_paths_write_the_same_bytes() {
    let d = tmp();
    let d = d.path();
    let n = 3 * 65536 + 77;
    for (dtype, st, size) in [
        ("f32", Dtype::F32, 4),
        ("f16", Dtype::F16, 2),
        ("bf16", Dtype::BF16, 2),
    ] {
        let file = |name: &str, bytes: Vec<u8>| {
            let t = vec![
                ("w".to_string(), st, vec![n], bytes),
                ("s".to_string(), st, vec![], vec![0x3c; size]),
            ];
            write_file(
                &d.join(format!("{name}-{dtype}.safetensors")),
                &t,
                &BTreeMap::new(),
            )
            .unwrap();
        };
        let base = noise(n * size, 1);
        file("base", base.clone());
        for k in 1..=3u64 {
            // Half the elements any bit pattern, half the base's with the lowest bits changed.
            let wild = noise(n * size, 10 + k);
            let tuned: Vec<u8> = base
                .chunks_exact(size)
                .zip(wild.chunks_exact(size))
                .enumerate()
                .flat_map(|(i, (b, w))| {
                    if i % 2 == 0 {
                        w.to_vec()
                    } else {
                        let mut b = b.to_vec();
                        b[0] ^= w[0] & 7;
                        b
                    }
                })
                .collect();
            file(&format!("task{k}"), tuned);
        }
        // The same names in two folders: a merge records its deltas' file names.
        for (env, tag) in [(None, "simd"), (Some("1"), "portable")] {
            fs::create_dir_all(d.join(tag)).unwrap();
            let run = |line: String| {
                let mut cmd = Command::cargo_bin("sotu-delta").unwrap();
                cmd.current_dir(d.join(tag)).args(line.split_whitespace());
                if let Some(v) = env {
                    cmd.env("SOTU_DELTA_SCALAR", v);
                }
                Outcome::from_output(cmd.output().unwrap()).success();
            };
            let base = format!("../base-{dtype}.safetensors");
            for k in 1..=3 {
                let (tuned, slot) = (format!("../task{k}-{dtype}.safetensors"), k - 1);
                run(format!(
                    "extract --allow-nonfinite --base {base} --tuned {tuned} --slot {slot}/3 -o d{k}.safetensors"
                ));
            }
            let deltas = "d1.safetensors d2.safetensors d3.safetensors";
            run(format!("merge --base {base} {deltas} -o m.safetensors"));
            run(format!(
                "merge --base {base} {deltas} --weights 1,0.5,1 -o w.safetensors"
            ));
            run(format!(
                "apply --base {base} d1.safetensors -o a.safetensors"
            ));
        }
        for out in ["d1", "d2", "d3", "m", "w", "a"] {
            let name = format!("{out}.safetensors");
            let (s, p) = (d.join("simd").join(&name), d.join("portable").join(&name));
            assert!(
                bytes_of(&s) == bytes_of(&p),
                "{dtype}: {out} differs between the AVX-512 and the portable paths"
            );
        }
    }
}
