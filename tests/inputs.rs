//! What users already have, merged without delta files: fine-tunes given to `merge --tuned`.
//!
//! A fine-tune's delta is taken on the fly exactly as `extract` takes it, so every merge here is
//! checked against the same merge of delta files that `extract` wrote with the same seed,
//! interval and order: the tensors must be the same bytes, and the output's record the same but
//! for the inputs' names. Both sides are the binary; the delta-file side is held to the numpy
//! reference elsewhere (tests/reference).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use common::{Device, device_test, ok, run, tmp};
use safetensors::Dtype;
use serde_json::Value;
use sotu_delta::dtype::Float;
use sotu_delta::io::{Checkpoint, Target, write_tensors};

// ==========================================================================================
// Models
// ==========================================================================================

/// Deterministic values in ±[0, 0.5), from splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        common::splitmix64(&mut self.0)
    }

    fn value(&mut self) -> f64 {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) - 0.5
    }
}

type Tensor = (String, Dtype, Vec<usize>, Vec<u8>);

fn encode(f: Float, values: &[f64]) -> Vec<u8> {
    let mut out = Vec::new();
    f.store_all(values, &mut out);
    out
}

/// The float tensors of the test model: two matrices (for `iso` and `tsv`), a vector, a 0-d
/// tensor and one of more than a chunk's elements, so that tiles and chunks are crossed.
fn float_shapes() -> Vec<(&'static str, Vec<usize>)> {
    vec![
        ("model.layers.0.mlp.weight", vec![48, 40]),
        ("model.layers.0.attn.weight", vec![32, 32]),
        ("model.layers.0.norm.weight", vec![40]),
        ("model.scale", vec![]),
        ("model.embed.weight", vec![70_000]),
    ]
}

/// A base in `f` and fine-tunes of it: every float tensor changed slightly (the norm left
/// equal to the base in fine-tune 1, so that one tensor is `same`), an integer tensor changed
/// in fine-tune 0 only, and a new tensor in every fine-tune (equal across them, as merge
/// requires).
fn model(f: Float, tunes: usize, seed: u64) -> (Vec<Tensor>, Vec<Vec<Tensor>>) {
    let mut rng = Rng(seed);
    let mut base = Vec::new();
    let mut tuned: Vec<Vec<Tensor>> = vec![Vec::new(); tunes];
    for (name, shape) in float_shapes() {
        let n: usize = shape.iter().product();
        let b: Vec<f64> = (0..n).map(|_| rng.value()).collect();
        let b_bytes = encode(f, &b);
        for (t, tensors) in tuned.iter_mut().enumerate() {
            let bytes = if t == 1 && name.ends_with("norm.weight") {
                b_bytes.clone()
            } else {
                let v: Vec<f64> = b.iter().map(|x| x + 0.02 * rng.value()).collect();
                encode(f, &v)
            };
            tensors.push((name.into(), f.dtype(), shape.clone(), bytes));
        }
        base.push((name.into(), f.dtype(), shape, b_bytes));
    }
    let ids: Vec<u8> = (0..16i64).flat_map(|i| i.to_le_bytes()).collect();
    base.push((
        "model.position_ids".into(),
        Dtype::I64,
        vec![16],
        ids.clone(),
    ));
    for (t, tensors) in tuned.iter_mut().enumerate() {
        let ids = if t == 0 {
            (0..16i64).rev().flat_map(|i| i.to_le_bytes()).collect()
        } else {
            ids.clone()
        };
        tensors.push(("model.position_ids".into(), Dtype::I64, vec![16], ids));
        tensors.push((
            "score.weight".into(),
            f.dtype(),
            vec![3, 4],
            encode(f, &[0.5; 12]),
        ));
    }
    (base, tuned)
}

/// Writes `tensors` at `path`: a file, or a folder sharded at `shard` bytes.
fn write_model(path: &Path, tensors: &[Tensor], shard: Option<u64>) {
    let mut target = Target::new(path);
    if let Some(s) = shard {
        target.shard_size = s;
    }
    write_tensors(&target, tensors, &BTreeMap::new()).unwrap();
}

/// The tensors of a checkpoint (file or folder), read back by the crate's reader.
fn tensors(path: &Path) -> BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    let ck = Checkpoint::open(path).unwrap();
    ck.tensors()
        .iter()
        .map(|(n, i)| {
            let bytes = ck.tensor(n).unwrap().whole().unwrap().to_vec();
            (n.clone(), (i.dtype, i.shape.clone(), bytes))
        })
        .collect()
}

/// The merge record of an output (`sotu_delta` in its `__metadata__`).
fn record(path: &Path) -> Value {
    let ck = Checkpoint::open(path).unwrap();
    serde_json::from_str(&ck.metadata()["sotu_delta"]).unwrap()
}

/// The record without what names the inputs (a delta file's name and recorded base, a
/// fine-tune's name and kind), which is all that may differ between the two ways.
fn without_names(mut r: Value) -> Value {
    for d in r["deltas"].as_array_mut().unwrap() {
        let d = d.as_object_mut().unwrap();
        for k in ["file", "input", "base_fingerprint"] {
            d.remove(k);
        }
    }
    r
}

/// Asserts that two outputs hold the same tensors, byte for byte, and the same record but for
/// the inputs' names.
#[track_caller]
fn assert_same_merge(got: &Path, want: &Path, what: &str) {
    let (g, w) = (tensors(got), tensors(want));
    assert_eq!(
        g.keys().collect::<Vec<_>>(),
        w.keys().collect::<Vec<_>>(),
        "{what}: tensor names"
    );
    for (name, (gt, wt)) in g.iter().zip(w.values()).map(|((n, g), w)| (n, (g, w))) {
        assert!(
            gt == wt,
            "{what}: tensor {name} differs ({:?} {:?} vs {:?} {:?})",
            gt.0,
            gt.1,
            wt.0,
            wt.1
        );
    }
    assert_eq!(
        without_names(record(got)),
        without_names(record(want)),
        "{what}: merge records"
    );
}

// ==========================================================================================
// 1. merge --tuned is extract, then merge
// ==========================================================================================

/// One way of masking the fine-tunes, as `merge` flags and as `extract` flags for fine-tune t
/// of T.
struct Masking {
    merge: &'static str,
    extract: fn(usize, usize) -> String,
}

fn maskings() -> Vec<Masking> {
    vec![
        Masking {
            merge: "",
            extract: |t, _| format!("--density 1 --seed {}", 2411 + t),
        },
        Masking {
            merge: "--density 0.4 --seed 77",
            extract: |t, _| format!("--density 0.4 --seed {}", 77 + t),
        },
        Masking {
            merge: "--slots --seed 9",
            extract: |t, n| format!("--slot {t}/{n} --seed 9"),
        },
        Masking {
            merge: "--slots --density 0.2",
            extract: |t, n| format!("--slot {t}/{n} --density 0.2 --seed 2411"),
        },
    ]
}

/// Every method, dtype and masking: `merge --tuned` against `extract` + `merge`, with the
/// fine-tunes as files and as sharded folders.
fn merge_of_fine_tunes_equals_extract_then_merge(device: Device) {
    let dir = tmp();
    let d = dir.path();
    let methods = [
        ("sum", ""),
        ("sum", "--weights 0.5,-1.25,2 --rescale"),
        ("sum", "--dtype f32"),
        ("ties", "--trim 0.3 --alpha 1.5"),
        ("iso", ""),
        ("tsv", "--weights 1,0.5,2"),
    ];
    for (k, f) in [Float::BF16, Float::F16, Float::F32]
        .into_iter()
        .enumerate()
    {
        let (base, tuned) = model(f, 3, 100 + k as u64);
        let sub = d.join(format!("{f:?}"));
        fs::create_dir_all(&sub).unwrap();
        write_model(&sub.join("base.safetensors"), &base, None);
        for (t, tensors) in tuned.iter().enumerate() {
            write_model(&sub.join(format!("t{t}.safetensors")), tensors, None);
            // A folder of shards of about 100 KB: the big tensor alone in one.
            write_model(&sub.join(format!("t{t}")), tensors, Some(100_000));
        }
        for (m, masking) in maskings().iter().enumerate() {
            for t in 0..3 {
                ok(
                    &sub,
                    &format!(
                        "extract -q --base base.safetensors --tuned t{t}.safetensors -o d{m}-{t}.safetensors {}",
                        (masking.extract)(t, 3)
                    ),
                );
            }
            for (i, (method, flags)) in methods.iter().enumerate() {
                let common = format!("--method {method} {flags} --device {device} -q");
                let want = format!("want{m}-{i}.safetensors");
                ok(
                    &sub,
                    &format!(
                        "merge --base base.safetensors d{m}-0.safetensors d{m}-1.safetensors d{m}-2.safetensors -o {want} {common}"
                    ),
                );
                let (files, folders) = (
                    "--tuned t0.safetensors --tuned t1.safetensors --tuned t2.safetensors",
                    "--tuned t0 --tuned t1 --tuned t2",
                );
                for (form, tuned) in [("files", files), ("folders", folders)] {
                    let got = format!("got{m}-{i}-{form}.safetensors");
                    ok(
                        &sub,
                        &format!(
                            "merge --base base.safetensors {tuned} {} -o {got} {common}",
                            masking.merge
                        ),
                    );
                    assert_same_merge(
                        &sub.join(&got),
                        &sub.join(&want),
                        &format!("{f:?} {method} {flags} [{}] {form}", masking.merge),
                    );
                }
            }
        }
    }
}
device_test!(
    merge_of_fine_tunes_equals_extract_then_merge,
    merge_of_fine_tunes_equals_extract_then_merge_cpu,
    merge_of_fine_tunes_equals_extract_then_merge_cuda
);

/// Fine-tunes and delta files mixed on the command line keep their order (weights follow it),
/// and fine-tune t counts the fine-tunes only: the second `--tuned` gets seed S + 1 even after a
/// delta file. Written to a folder, sharded, and from a base folder, too.
#[test]
fn fine_tunes_mixed_with_delta_files_keep_the_command_line_order() {
    let dir = tmp();
    let d = dir.path();
    let (base, tuned) = model(Float::BF16, 3, 7);
    write_model(&d.join("base"), &base, Some(100_000));
    for (t, tensors) in tuned.iter().enumerate() {
        write_model(&d.join(format!("t{t}.safetensors")), tensors, None);
    }
    ok(
        d,
        "extract -q --base base --tuned t0.safetensors -o e0.safetensors --density 0.5 --seed 40",
    );
    ok(
        d,
        "extract -q --base base --tuned t1.safetensors -o e1.safetensors --density 0.5 --seed 3",
    );
    ok(
        d,
        "extract -q --base base --tuned t2.safetensors -o e2.safetensors --density 0.5 --seed 41",
    );
    ok(
        d,
        "merge -q --base base e0.safetensors e1.safetensors e2.safetensors --weights 2,-1,0.5 -o want --shard-size 100KB",
    );
    ok(
        d,
        "merge -q --base base --tuned t0.safetensors e1.safetensors --tuned t2.safetensors --density 0.5 --seed 40 --weights 2,-1,0.5 -o got --shard-size 100KB",
    );
    assert_same_merge(&d.join("got"), &d.join("want"), "mixed");
    // The summary counts both kinds.
    let o = ok(
        d,
        "merge --base base --tuned t0.safetensors e1.safetensors --tuned t2.safetensors -o summary.st",
    );
    assert!(
        o.stdout
            .contains("merge: 1 delta(s) and 2 fine-tune(s) onto base -> summary.st"),
        "{o}"
    );
    let r = record(&d.join("got"));
    let kinds: Vec<&str> = r["deltas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["input"].as_str().unwrap_or("delta"))
        .collect();
    assert_eq!(kinds, ["fine-tune", "delta", "fine-tune"]);
    assert_eq!(r["deltas"][0]["file"], "t0.safetensors");
    assert!(r["deltas"][0].get("base_fingerprint").is_none());
    assert!(r["deltas"][1]["base_fingerprint"].is_string());
    // The folder output carries the base folder's other files and is sharded the same way.
    let names = |p: &str| -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(d.join(p))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names("got"), names("want"));
}

/// The bytes do not depend on the thread count, and `apply` of one fine-tune at density 1 gives
/// the fine-tune back.
#[test]
fn merge_of_fine_tunes_is_the_same_for_any_thread_count() {
    let dir = tmp();
    let d = dir.path();
    let (base, tuned) = model(Float::F32, 2, 21);
    write_model(&d.join("base.safetensors"), &base, None);
    for (t, tensors) in tuned.iter().enumerate() {
        write_model(&d.join(format!("t{t}.safetensors")), tensors, None);
    }
    let line = "merge -q --base base.safetensors --tuned t0.safetensors --tuned t1.safetensors --density 0.3";
    ok(d, &format!("--threads 1 {line} -o one.safetensors"));
    ok(d, &format!("--threads 3 {line} -o three.safetensors"));
    assert_eq!(
        fs::read(d.join("one.safetensors")).unwrap(),
        fs::read(d.join("three.safetensors")).unwrap()
    );
    ok(
        d,
        "merge -q --base base.safetensors --tuned t0.safetensors -o back.safetensors",
    );
    let (back, t0) = (
        tensors(&d.join("back.safetensors")),
        tensors(&d.join("t0.safetensors")),
    );
    assert_eq!(back.len(), t0.len());
    for (name, t) in &t0 {
        assert!(back[name] == *t, "tensor {name} is not the fine-tune's");
    }
}

// ==========================================================================================
// 2. Mistakes
// ==========================================================================================

#[test]
fn fine_tune_flags_without_a_fine_tune_are_usage_errors() {
    let dir = tmp();
    let d = dir.path();
    let (base, tuned) = model(Float::BF16, 1, 3);
    write_model(&d.join("base.safetensors"), &base, None);
    write_model(&d.join("t0.safetensors"), &tuned[0], None);
    ok(
        d,
        "extract -q --base base.safetensors --tuned t0.safetensors -o d.safetensors",
    );
    for flag in ["--density 0.5", "--seed 3", "--slots", "--allow-nonfinite"] {
        run(
            d,
            &format!("merge --base base.safetensors d.safetensors -o o.safetensors {flag}"),
        )
        .usage_error(&["--tuned"]);
    }
    run(d, "merge --base base.safetensors -o o.safetensors").usage_error(&["--tuned"]);
    run(
        d,
        "merge --base base.safetensors --tuned t0.safetensors --density 1.5 -o o.safetensors",
    )
    .usage_error(&["--density"]);
    run(
        d,
        "merge --base base.safetensors --tuned t0.safetensors --tuned t0.safetensors --slots --density 0.6 -o o.safetensors",
    )
    .usage_error(&["--slots", "fine-tune 0 of 2"]);
    run(
        d,
        "merge --base base.safetensors --tuned t0.safetensors --tuned t0.safetensors --seed 18446744073709551615 -o o.safetensors",
    )
    .usage_error(&["--seed", "fine-tune 1"]);
    run(
        d,
        "merge --base base.safetensors --tuned t0.safetensors d.safetensors --weights 1 -o o.safetensors",
    )
    .usage_error(&["--weights"]);
    assert!(!d.join("o.safetensors").exists());
}

/// What extract refuses of a fine-tune, merge --tuned refuses too, naming the file and the
/// tensor and writing nothing.
#[test]
fn fine_tunes_extract_would_refuse_are_refused() {
    let dir = tmp();
    let d = dir.path();
    let (base, tuned) = model(Float::BF16, 1, 5);
    write_model(&d.join("base.safetensors"), &base, None);
    // A base tensor the fine-tune lacks.
    let lacking: Vec<Tensor> = tuned[0]
        .iter()
        .filter(|t| t.0 != "model.scale")
        .cloned()
        .collect();
    write_model(&d.join("lacking.safetensors"), &lacking, None);
    // Another shape.
    let mut reshaped = tuned[0].clone();
    let at = reshaped
        .iter()
        .position(|t| t.0 == "model.layers.0.attn.weight")
        .unwrap();
    reshaped[at].2 = vec![16, 64];
    write_model(&d.join("reshaped.safetensors"), &reshaped, None);
    // A NaN in a tensor the merge reads, and one in a new tensor.
    let mut nan = tuned[0].clone();
    let at = nan
        .iter()
        .position(|t| t.0 == "model.embed.weight")
        .unwrap();
    nan[at].3[2 * 69_999..2 * 70_000].copy_from_slice(&0x7fc0u16.to_le_bytes());
    write_model(&d.join("nan.safetensors"), &nan, None);
    let mut new_inf = tuned[0].clone();
    let at = new_inf.iter().position(|t| t.0 == "score.weight").unwrap();
    new_inf[at].3[..2].copy_from_slice(&0xff80u16.to_le_bytes());
    write_model(&d.join("newinf.safetensors"), &new_inf, None);
    let cases = [
        (
            "lacking.safetensors",
            vec!["lacking.safetensors", "model.scale"],
        ),
        (
            "reshaped.safetensors",
            vec!["reshaped.safetensors", "model.layers.0.attn.weight"],
        ),
        (
            "nan.safetensors",
            vec!["nan.safetensors", "model.embed.weight", "--allow-nonfinite"],
        ),
        (
            "newinf.safetensors",
            vec!["newinf.safetensors", "score.weight", "--allow-nonfinite"],
        ),
    ];
    for (file, words) in &cases {
        for density in ["1", "0.1"] {
            let out = run(
                d,
                &format!(
                    "merge --base base.safetensors --tuned {file} --density {density} -o o.safetensors"
                ),
            );
            out.error(words);
            assert!(!d.join("o.safetensors").exists(), "{out}");
            assert!(common::partial_files(d).is_empty(), "{out}");
        }
    }
    // With --allow-nonfinite, as extract --allow-nonfinite then merge.
    ok(
        d,
        "extract -q --base base.safetensors --tuned nan.safetensors -o dn.safetensors --density 0.5 --allow-nonfinite",
    );
    ok(
        d,
        "merge -q --base base.safetensors dn.safetensors -o want.safetensors",
    );
    ok(
        d,
        "merge -q --base base.safetensors --tuned nan.safetensors --density 0.5 --allow-nonfinite -o got.safetensors",
    );
    assert_same_merge(
        &d.join("got.safetensors"),
        &d.join("want.safetensors"),
        "allowed NaN",
    );
}

/// The output may not overwrite a fine-tune, a file of a fine-tune folder, or the folder.
#[test]
fn output_over_a_fine_tune_is_refused() {
    let dir = tmp();
    let d = dir.path();
    let (base, tuned) = model(Float::BF16, 1, 9);
    write_model(&d.join("base.safetensors"), &base, None);
    write_model(&d.join("t0.safetensors"), &tuned[0], None);
    write_model(&d.join("tf"), &tuned[0], Some(100_000));
    let before = fs::read(d.join("t0.safetensors")).unwrap();
    for (tuned, out) in [
        ("t0.safetensors", "t0.safetensors"),
        ("tf", "tf"),
        ("tf", "tf/model.safetensors.index.json"),
    ] {
        run(
            d,
            &format!("merge --base base.safetensors --tuned {tuned} -o {out}"),
        )
        .error(&["input"]);
    }
    assert_eq!(fs::read(d.join("t0.safetensors")).unwrap(), before);
    assert!(Checkpoint::open(&d.join("tf")).is_ok());
}

/// A fine-tune folder that grew its vocabulary and changed its tokenizer and config
/// (fixtures/tiny/added-tokens): `merge --tuned` with `--files-from` gives the tensors (the new
/// rows included) and the own files of extract followed by merge (docs/FORMAT.md sections 12-14).
#[test]
fn a_grown_fine_tune_with_its_own_files_merges_as_its_delta() {
    let dir = tmp();
    let d = dir.path();
    let fx = common::root().join("fixtures/tiny/added-tokens");
    let (base, tuned) = (fx.join("base"), fx.join("tuned"));
    let (b, t) = (base.display(), tuned.display());
    ok(
        d,
        &format!("extract -q --base {b} --tuned {t} -o delta --density 0.5 --seed 4"),
    );
    ok(
        d,
        &format!("merge -q --base {b} delta --files-from 0 -o want"),
    );
    ok(
        d,
        &format!("merge -q --base {b} --tuned {t} --density 0.5 --seed 4 --files-from 0 -o got"),
    );
    assert_same_merge(&d.join("got"), &d.join("want"), "grown fine-tune");
    let files = |p: &str| -> BTreeMap<String, Vec<u8>> {
        fs::read_dir(d.join(p))
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| !e.file_name().to_string_lossy().ends_with(".safetensors"))
            .filter(|e| !e.file_name().to_string_lossy().ends_with(".index.json"))
            // The model card and recipe record the command, which names the inputs.
            .filter(|e| {
                !["README.md", "sotu-delta.json"].contains(&&*e.file_name().to_string_lossy())
            })
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    fs::read(e.path()).unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(files("got"), files("want"));
    assert!(
        files("got").contains_key("tokenizer.json") || files("got").contains_key("config.json")
    );
    // The output grew: every tensor the fine-tune grew has the fine-tune's shape.
    let (got, tuned_t, base_t) = (tensors(&d.join("got")), tensors(&tuned), tensors(&base));
    let grown: Vec<&String> = base_t
        .iter()
        .filter(|(n, t)| tuned_t[*n].1 != t.1)
        .map(|(n, _)| n)
        .collect();
    assert!(!grown.is_empty(), "test design: the fixture grows a tensor");
    for n in grown {
        assert_eq!(got[n].1, tuned_t[n].1, "{n} did not grow");
    }
}
