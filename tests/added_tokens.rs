//! A fine-tune that adds tokens, through the command line: its own files (docs/FORMAT.md
//! section 13: config, tokenizer and chat template carried by the delta, written by apply, taken
//! by `merge --files-from`) and its grown embedding and output layer (section 12).
//!
//! The fixture is fixtures/tiny/added-tokens/ (fixtures/make_fixtures.py): a base folder and a
//! fine-tune folder whose embedding and lm_head grew from 2051 to 2053 rows, with a changed
//! config.json and tokenizer_config.json, a new added_tokens.json and chat_template.jinja, and
//! tokenizer.json and generation_config.json equal to the base's. Other fine-tunes of the same
//! base are made here from it. Every test works in its own temporary folder.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use safetensors::Dtype;
use serde_json::{Value, json};
use sotu_delta::io::{Checkpoint, write_file};
use sotu_delta::mask::{DEFAULT_SEED, Interval, Mask};

mod common;
use common::{Device, device_test, noise, ok, partial_files, root, run, tmp};

const EMBED: &str = "model.embed_tokens.weight";
const LM_HEAD: &str = "lm_head.weight";
const NORM: &str = "model.norm.weight";
const BASE_ROWS: usize = 2051;
const HIDDEN: usize = 32;
/// The files the fine-tune changed or added: what its delta carries.
const CARRIED: [&str; 4] = [
    "added_tokens.json",
    "chat_template.jinja",
    "config.json",
    "tokenizer_config.json",
];
/// The files the fine-tune has equal to the base's, and README.md, which is never carried.
const NOT_CARRIED: [&str; 2] = ["generation_config.json", "tokenizer.json"];

type Tensors = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

/// Copies every file of `src` (no subfolders) into `dst`.
fn copy_dir(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).unwrap();
    for e in fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

/// Copies the fixture folders into `d` as `base/` and `tuned/`.
fn fixture(d: &Path) {
    let fx = root().join("fixtures/tiny/added-tokens");
    copy_dir(&fx.join("base"), &d.join("base"));
    copy_dir(&fx.join("tuned"), &d.join("tuned"));
}

fn tensors(path: &Path) -> Tensors {
    let ck = Checkpoint::open(path).unwrap_or_else(|e| panic!("open {}: {e:#}", path.display()));
    ck.tensors()
        .iter()
        .map(|(n, i)| {
            let data = ck.tensor(n).unwrap().whole().unwrap().into_owned();
            (n.clone(), (i.dtype, i.shape.clone(), data))
        })
        .collect()
}

/// Writes a model folder `dir` holding `model.safetensors` with `t`, and `files`.
fn write_model(dir: &Path, t: &Tensors, files: &[(&str, &[u8])]) {
    fs::create_dir_all(dir).unwrap();
    let list: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = t
        .iter()
        .map(|(n, (d, s, b))| (n.clone(), *d, s.clone(), b.clone()))
        .collect();
    let md = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write_file(&dir.join("model.safetensors"), &list, &md).unwrap();
    for (name, bytes) in files {
        fs::write(dir.join(name), bytes).unwrap();
    }
}

/// The files of folder `dir` by name (tensors aside).
fn files_of(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    // Not the model card and recipe: a merged or applied folder gets its own, in place of the
    // base's card (issue #13, tests/release.rs).
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            !name.ends_with(".safetensors") && name != "README.md" && name != "sotu-delta.json"
        })
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// A copy of `t` with the low bits of about half the elements of every BF16 tensor changed
/// (`seed` picks which): another fine-tune of the same shapes.
fn perturbed(t: &Tensors, seed: u64) -> Tensors {
    let mut t = t.clone();
    for (j, (_, (_, _, data))) in t.iter_mut().enumerate() {
        let r = noise(data.len() / 2, seed * 31 + j as u64);
        for (i, c) in data.chunks_exact_mut(2).enumerate() {
            if r[i] & 1 == 1 {
                c[0] ^= 1 + (r[i] >> 1 & 3);
            }
        }
    }
    t
}

/// `t` with `k` rows of noise appended to the embedding and lm_head.
fn grown_by(t: &Tensors, k: usize, seed: u64) -> Tensors {
    let mut t = t.clone();
    for name in [EMBED, LM_HEAD] {
        let (_, shape, data) = t.get_mut(name).unwrap();
        shape[0] += k;
        data.extend(noise(2 * k * HIDDEN, seed).chunks_exact(2).flat_map(|c| {
            // Small BF16 values: exponent 0x3c, random mantissa and sign.
            [c[0], 0x3c | (c[1] & 0x80)]
        }));
    }
    t
}

/// The first `rows` rows of the embedding and lm_head of `t`.
fn truncated(t: &Tensors, rows: usize) -> Tensors {
    let mut t = t.clone();
    for name in [EMBED, LM_HEAD] {
        let (_, shape, data) = t.get_mut(name).unwrap();
        shape[0] = rows;
        data.truncate(2 * rows * HIDDEN);
    }
    t
}

#[track_caller]
fn assert_same(got: &Tensors, want: &Tensors, what: &str) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{what}: tensor names"
    );
    for (name, (d, s, b)) in want {
        let g = &got[name];
        assert_eq!((&g.0, &g.1), (d, s), "{what}: {name}: dtype and shape");
        if g.2 != *b {
            let i = g.2.iter().zip(b).position(|(x, y)| x != y).unwrap_or(0);
            panic!("{what}: {name}: bytes differ, first at byte {i}");
        }
    }
}

fn bf16(data: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([data[2 * i], data[2 * i + 1]])
}

// ==========================================================================================
// The fine-tune's own files
// ==========================================================================================

#[test]
fn extract_carries_the_changed_and_new_files_and_apply_writes_them() {
    let dir = tmp();
    let d = dir.path();
    fixture(d);
    let r = ok(
        d,
        "extract --base base --tuned tuned -o d.safetensors --json",
    )
    .json();
    assert_eq!(r["files"], json!(CARRIED), "{r}");
    // The folder form carries them as files, beside model.safetensors.
    ok(d, "extract --base base --tuned tuned -o ddir");
    let in_folder = files_of(&d.join("ddir"));
    assert_eq!(in_folder.keys().collect::<Vec<_>>(), CARRIED.to_vec());
    let (single, folder) = (tensors(&d.join("d.safetensors")), tensors(&d.join("ddir")));
    for name in CARRIED {
        let key = format!("sotu/files/{name}");
        let t = &single[&key];
        assert_eq!((t.0, &t.1), (Dtype::U8, &vec![t.2.len()]), "{key}");
        assert_eq!(t.2, fs::read(d.join("tuned").join(name)).unwrap(), "{key}");
        assert_eq!(in_folder[name], t.2, "ddir/{name}");
    }
    assert!(!folder.keys().any(|k| k.starts_with("sotu/files/")));
    // inspect lists them, in text and JSON, for both forms.
    let text = ok(d, "inspect d.safetensors ddir").stdout;
    assert_eq!(
        text.matches("own files: added_tokens.json (36 B), chat_template.jinja")
            .count(),
        2,
        "{text}"
    );
    let j = ok(d, "inspect --json d.safetensors ddir").json();
    for k in 0..2 {
        let files = j["deltas"][k]["files"].as_array().unwrap();
        let names: Vec<&str> = files.iter().map(|f| f["name"].as_str().unwrap()).collect();
        assert_eq!(names, CARRIED.to_vec());
        for f in files {
            let bytes = fs::read(d.join("tuned").join(f["name"].as_str().unwrap())).unwrap();
            assert_eq!(f["bytes"], json!(bytes.len()));
            assert_eq!(
                f["blake3"],
                json!(blake3::hash(&bytes).to_hex().to_string())
            );
        }
    }
    // apply into a folder: the fine-tune's files over the base's, the base's other files kept.
    for (k, delta) in ["d.safetensors", "ddir"].into_iter().enumerate() {
        let out = format!("out{k}");
        let a = ok(d, &format!("apply --base base {delta} -o {out}"));
        assert!(!a.stderr.contains("warning"), "{a}");
        let got = files_of(&d.join(&out));
        for name in CARRIED {
            assert!(
                got[name] == fs::read(d.join("tuned").join(name)).unwrap(),
                "apply {delta}: {name} is not the fine-tune's"
            );
        }
        for name in NOT_CARRIED {
            assert!(
                got[name] == fs::read(d.join("base").join(name)).unwrap(),
                "apply {delta}: {name} is not the base's"
            );
        }
        let record: Value = serde_json::from_str(
            &Checkpoint::open(&d.join(&out)).unwrap().metadata()["sotu_delta"],
        )
        .unwrap();
        assert_eq!(record["files_from"], json!(0), "{record}");
    }
    // Into a single file there is nowhere to put them: said, not silently dropped.
    let a = ok(d, "apply --base base d.safetensors -o out.safetensors");
    assert!(
        a.stderr.contains("warning")
            && a.stderr.contains("left out")
            && a.stderr.contains("config.json"),
        "{a}"
    );
}

#[test]
fn extract_without_files_or_from_single_files_carries_none() {
    let dir = tmp();
    let d = dir.path();
    fixture(d);
    let r = ok(
        d,
        "extract --base base --tuned tuned -o d.safetensors --no-files --json",
    )
    .json();
    assert_eq!(r["files"], json!([]));
    let (_, md) = meta(&d.join("d.safetensors"));
    assert!(!md.contains_key("files"), "{md:?}");
    fs::copy(
        d.join("tuned/model.safetensors"),
        d.join("tuned.safetensors"),
    )
    .unwrap();
    let r = ok(
        d,
        "extract --base base --tuned tuned.safetensors -o e.safetensors --json",
    )
    .json();
    assert_eq!(r["files"], json!([]));
    // A base given as a file has none of the fine-tune's files: all of them are carried.
    fs::copy(d.join("base/model.safetensors"), d.join("base.safetensors")).unwrap();
    let r = ok(
        d,
        "extract --base base.safetensors --tuned tuned -o f.safetensors --json",
    )
    .json();
    let mut all: Vec<&str> = CARRIED.to_vec();
    all.extend(["generation_config.json", "tokenizer.json"]);
    all.sort();
    assert_eq!(r["files"], json!(all));
    let j = ok(d, "inspect --json d.safetensors e.safetensors").json();
    assert_eq!(j["deltas"][0]["files"], json!([]));
    assert_eq!(j["deltas"][1]["files"], json!([]));
}

fn meta(path: &Path) -> (String, BTreeMap<String, String>) {
    let ck = Checkpoint::open(path).unwrap();
    let md: BTreeMap<String, String> = ck
        .metadata()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    (md["format_version"].clone(), md)
}

#[test]
fn merge_keeps_the_base_files_unless_files_from_names_a_delta() {
    let dir = tmp();
    let d = dir.path();
    fixture(d);
    // A second fine-tune, of the base's shapes, that changed generation_config.json only.
    let base_files = files_of(&d.join("base"));
    let gen2: &[u8] = b"{\"bos_token_id\": 1, \"eos_token_id\": 2, \"temperature\": 0.6}\n";
    let mut files2: Vec<(&str, &[u8])> = base_files
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .filter(|(n, _)| *n != "generation_config.json")
        .collect();
    files2.push(("generation_config.json", gen2));
    write_model(
        &d.join("tuned2"),
        &perturbed(&tensors(&d.join("base")), 2),
        &files2,
    );
    ok(
        d,
        "extract --base base --tuned tuned -o a.safetensors --slot 0/2",
    );
    ok(
        d,
        "extract --base base --tuned tuned2 -o b.safetensors --slot 1/2",
    );

    let m = ok(d, "merge --base base a.safetensors b.safetensors -o m0");
    assert_eq!(
        files_of(&d.join("m0")),
        base_files,
        "the default keeps the base's files"
    );
    assert!(
        m.stderr.contains("--files-from 0") && m.stderr.contains("--files-from 1"),
        "{m}"
    );
    // The output has the grown vocabulary of a.safetensors but not its tokenizer: warned.
    assert!(
        m.stderr.contains("warning") && m.stderr.contains(EMBED),
        "{m}"
    );
    let record = |out: &str| -> Value {
        let ck = Checkpoint::open(&d.join(out)).unwrap();
        serde_json::from_str(&ck.metadata()["sotu_delta"]).unwrap()
    };
    assert!(record("m0").get("files_from").is_none(), "{}", record("m0"));
    let q = ok(d, "-q merge --base base a.safetensors b.safetensors -o m0q");
    assert!(!q.stderr.contains("note"), "{q}");

    let m = ok(
        d,
        "merge --base base a.safetensors b.safetensors -o m1 --files-from 0",
    );
    assert!(
        !m.stderr.contains("warning") && !m.stderr.contains("note"),
        "{m}"
    );
    let got = files_of(&d.join("m1"));
    let tuned = files_of(&d.join("tuned"));
    for name in CARRIED {
        assert_eq!(got[name], tuned[name], "--files-from 0: {name}");
    }
    for name in NOT_CARRIED {
        assert_eq!(got[name], base_files[name], "--files-from 0: {name}");
    }
    assert_eq!(record("m1")["files_from"], json!(0));

    let m = ok(
        d,
        "merge --base base a.safetensors b.safetensors -o m2 --files-from 1",
    );
    let got = files_of(&d.join("m2"));
    let mut want = base_files.clone();
    want.insert("generation_config.json".into(), gen2.to_vec());
    assert_eq!(got, want, "--files-from 1");
    assert!(
        m.stderr.contains("warning") && m.stderr.contains(EMBED),
        "{m}"
    );
    assert_eq!(record("m2")["files_from"], json!(1));
    // The tensors do not depend on where the files come from.
    assert_same(&tensors(&d.join("m1")), &tensors(&d.join("m0")), "m1 vs m0");
    assert_same(&tensors(&d.join("m2")), &tensors(&d.join("m0")), "m2 vs m0");

    let u = run(
        d,
        "merge --base base a.safetensors b.safetensors -o m3 --files-from 2",
    );
    u.usage_error(&["--files-from 2", "2 deltas"]);
    assert!(!d.join("m3").exists());
    let s = ok(
        d,
        "merge --base base a.safetensors b.safetensors -o m.safetensors --files-from 0",
    );
    assert!(s.stderr.contains("left out"), "{s}");
}

#[test]
fn own_files_over_64_mib_are_refused_naming_each() {
    let dir = tmp();
    let d = dir.path();
    fixture(d);
    // A sparse 65 MiB tokenizer.json: only its size matters.
    let big = fs::File::create(d.join("tuned/tokenizer.json")).unwrap();
    big.set_len(65 << 20).unwrap();
    drop(big);
    let out = run(d, "extract --base base --tuned tuned -o d.safetensors");
    out.error(&[
        "tuned",
        "tokenizer.json (68157440 bytes)",
        "config.json",
        "67108864",
        "--no-files",
    ]);
    assert!(!d.join("d.safetensors").exists());
    assert!(partial_files(d).is_empty());
    // Left out, the weights still go through.
    ok(
        d,
        "extract --base base --tuned tuned -o d.safetensors --no-files",
    );
}

#[test]
fn a_folder_delta_whose_files_were_edited_is_refused_naming_the_file() {
    let dir = tmp();
    let d = dir.path();
    fixture(d);
    ok(d, "extract --base base --tuned tuned -o ddir");
    let cfg = d.join("ddir/tokenizer_config.json");
    let mut text = fs::read(&cfg).unwrap();
    text[3] ^= 1;
    fs::write(&cfg, &text).unwrap();
    run(d, "apply --base base ddir -o out").error(&["ddir", "tokenizer_config.json", "BLAKE3"]);
    assert!(!d.join("out").exists());
    fs::remove_file(&cfg).unwrap();
    run(d, "inspect ddir").error(&["ddir", "tokenizer_config.json"]);
}

#[test]
fn a_version_1_0_delta_without_files_still_reads() {
    let dir = tmp();
    let d = dir.path();
    let old = root().join("fixtures/bad/src/good-a.delta.safetensors");
    assert_eq!(
        meta(&old).0,
        "1.0",
        "test design: a delta written by version 1.0"
    );
    fs::copy(&old, d.join("old.safetensors")).unwrap();
    fs::copy(
        root().join("fixtures/tiny/base-bf16.safetensors"),
        d.join("base.safetensors"),
    )
    .unwrap();
    ok(
        d,
        "apply --base base.safetensors old.safetensors -o out.safetensors",
    );
    ok(d, "verify --base base.safetensors old.safetensors");
    let j = ok(d, "inspect --json old.safetensors").json();
    assert_eq!(j["deltas"][0]["files"], json!([]));
}

// ==========================================================================================
// Grown vocabularies
// ==========================================================================================

fn extract_and_apply_rebuild_the_grown_fine_tune(device: Device) {
    let dir = tmp();
    let d = dir.path();
    fixture(d);
    let tuned = tensors(&d.join("tuned"));
    let base = tensors(&d.join("base"));
    assert_eq!(tuned[EMBED].1, vec![BASE_ROWS + 2, HIDDEN], "test design");
    let r = ok(
        d,
        "extract --base base --tuned tuned -o d1.safetensors --density 1 --json",
    )
    .json();
    assert_eq!(
        r["grown"],
        json!([
            {"name": LM_HEAD, "base_shape": [BASE_ROWS, HIDDEN], "shape": [BASE_ROWS + 2, HIDDEN]},
            {"name": EMBED, "base_shape": [BASE_ROWS, HIDDEN], "shape": [BASE_ROWS + 2, HIDDEN]},
        ])
    );
    ok(
        d,
        &format!("apply --base base d1.safetensors -o full --no-rescale --device {device}"),
    );
    assert_same(
        &tensors(&d.join("full")),
        &tuned,
        "apply of a density-1 delta",
    );
    ok(
        d,
        &format!("apply --base base d1.safetensors -o full.safetensors --device {device}"),
    );
    assert_same(
        &tensors(&d.join("full.safetensors")),
        &tuned,
        "into one file",
    );

    // At density 0.3: kept elements and the new rows exact, the base elsewhere.
    ok(
        d,
        "extract --base base --tuned tuned -o part.safetensors --density 0.3",
    );
    let text = ok(d, "inspect part.safetensors").stdout;
    assert!(
        text.contains(&format!("grown: {EMBED} [2051, 32] -> [2053, 32]")),
        "{text}"
    );
    ok(
        d,
        &format!("apply --base base part.safetensors -o part --no-rescale --device {device}"),
    );
    let got = tensors(&d.join("part"));
    let iv = Interval::from_density(0.3).unwrap();
    for name in [EMBED, LM_HEAD] {
        let (g, t, b) = (&got[name].2, &tuned[name].2, &base[name].2);
        assert_eq!(got[name].1, tuned[name].1, "{name}");
        let mask = Mask::new(DEFAULT_SEED, name, iv);
        let n = BASE_ROWS * HIDDEN;
        let mut kept = 0;
        for i in 0..n {
            let want = if mask.kept(i as u64) { t } else { b };
            kept += mask.kept(i as u64) as usize;
            assert_eq!(bf16(g, i), bf16(want, i), "{name}: element {i}");
        }
        assert!(
            kept > n / 4 && kept < n * 2 / 5,
            "test design: {kept} kept of {n}"
        );
        assert_eq!(g[2 * n..], t[2 * n..], "{name}: the new rows");
    }
    // With --dtype, the new rows are rounded once like every other value (bf16 widens exactly).
    ok(
        d,
        &format!(
            "apply --base base d1.safetensors -o wide.safetensors --dtype f32 --device {device}"
        ),
    );
    let wide = tensors(&d.join("wide.safetensors"));
    let (g, t) = (&wide[EMBED].2, &tuned[EMBED].2);
    assert_eq!(wide[EMBED].0, Dtype::F32);
    for i in 0..(BASE_ROWS + 2) * HIDDEN {
        let w = u32::from_le_bytes(g[4 * i..4 * i + 4].try_into().unwrap());
        assert_eq!(w, (bf16(t, i) as u32) << 16, "element {i}");
    }
}
device_test!(
    extract_and_apply_rebuild_the_grown_fine_tune,
    extract_and_apply_rebuild_the_grown_fine_tune_cpu,
    extract_and_apply_rebuild_the_grown_fine_tune_cuda
);

/// In `d`: `tuned2/`, a fine-tune of the base that does not grow, and `a.safetensors` (the
/// growing fine-tune, slot 0/2) and `b.safetensors` (`tuned2`, slot 1/2).
fn growing_and_plain_deltas(d: &Path) -> (Tensors, Tensors, Tensors) {
    fixture(d);
    let base = tensors(&d.join("base"));
    let t2 = perturbed(&base, 5);
    write_model(&d.join("tuned2"), &t2, &[]);
    ok(
        d,
        "extract --base base --tuned tuned -o a.safetensors --slot 0/2",
    );
    ok(
        d,
        "extract --base base --tuned tuned2 -o b.safetensors --slot 1/2",
    );
    (base, tensors(&d.join("tuned")), t2)
}

fn merge_of_a_growing_and_a_plain_delta_grows_the_output(device: Device) {
    let dir = tmp();
    let d = dir.path();
    let (base, t1, t2) = growing_and_plain_deltas(d);
    for order in ["a.safetensors b.safetensors", "b.safetensors a.safetensors"] {
        ok(
            d,
            &format!("merge --base base {order} -o m.safetensors --device {device}"),
        );
        let got = tensors(&d.join("m.safetensors"));
        // Disjoint slots, weight 1: each element is the fine-tune's that keeps it, exactly.
        for name in [EMBED, LM_HEAD, NORM] {
            let (g, b) = (&got[name].2, &base[name].2);
            assert_eq!(got[name].1, t1[name].1, "{order}: {name}: shape");
            let (ma, mb) = (
                Mask::new(DEFAULT_SEED, name, Interval::from_slot(0, 2, None).unwrap()),
                Mask::new(DEFAULT_SEED, name, Interval::from_slot(1, 2, None).unwrap()),
            );
            let n: usize = base[name].1.iter().product();
            for i in 0..n {
                let want = match (ma.kept(i as u64), mb.kept(i as u64)) {
                    (true, false) => bf16(&t1[name].2, i),
                    (false, true) => bf16(&t2[name].2, i),
                    _ => bf16(b, i),
                };
                assert_eq!(bf16(g, i), want, "{order}: {name}: element {i}");
            }
            assert_eq!(
                g[2 * n..],
                t1[name].2[2 * n..],
                "{order}: {name}: the new rows"
            );
        }
    }
    // Weights and --rescale leave the new rows as the fine-tune has them.
    ok(
        d,
        &format!(
            "merge --base base a.safetensors b.safetensors -o w.safetensors --weights 0.5,2 --rescale --device {device}"
        ),
    );
    let got = tensors(&d.join("w.safetensors"));
    let n = BASE_ROWS * HIDDEN;
    assert_eq!(got[EMBED].2[2 * n..], t1[EMBED].2[2 * n..]);
    assert_ne!(
        got[EMBED].2[..2 * n],
        tensors(&d.join("m.safetensors"))[EMBED].2[..2 * n]
    );
}
device_test!(
    merge_of_a_growing_and_a_plain_delta_grows_the_output,
    merge_of_a_growing_and_a_plain_delta_grows_the_output_cpu,
    merge_of_a_growing_and_a_plain_delta_grows_the_output_cuda
);

#[test]
fn deltas_that_grow_a_tensor_differently_are_refused_naming_both() {
    let dir = tmp();
    let d = dir.path();
    fixture(d);
    let t1 = tensors(&d.join("tuned"));
    write_model(
        &d.join("more"),
        &grown_by(&truncated(&t1, BASE_ROWS), 3, 9),
        &[],
    );
    write_model(
        &d.join("other"),
        &grown_by(&truncated(&t1, BASE_ROWS), 2, 9),
        &[],
    );
    ok(
        d,
        "extract --base base --tuned tuned -o a.safetensors --slot 0/2",
    );
    ok(
        d,
        "extract --base base --tuned more -o c.safetensors --slot 1/2",
    );
    ok(
        d,
        "extract --base base --tuned other -o e.safetensors --slot 1/2",
    );
    ok(
        d,
        "extract --base base --tuned tuned -o a2.safetensors --slot 1/2",
    );
    run(
        d,
        "merge --base base a.safetensors c.safetensors -o m.safetensors",
    )
    .error(&["a.safetensors", "c.safetensors", "[2053, 32]", "[2054, 32]"]);
    run(
        d,
        "merge --base base a.safetensors e.safetensors -o m.safetensors",
    )
    .error_any(
        &["a.safetensors", "e.safetensors", "different new rows"],
        &[EMBED, LM_HEAD],
    );
    assert!(!d.join("m.safetensors").exists() && partial_files(d).is_empty());
    // The same rows from two deltas of one fine-tune: nothing to choose.
    ok(
        d,
        "merge --base base a.safetensors a2.safetensors -o same.safetensors",
    );
    assert_same(
        &tensors(&d.join("same.safetensors")),
        &t1,
        "two complementary slots of the growing fine-tune",
    );
}

#[test]
fn shrinking_or_another_dimension_stays_refused() {
    let dir = tmp();
    let d = dir.path();
    fixture(d);
    let base = tensors(&d.join("base"));
    write_model(&d.join("fewer"), &truncated(&base, BASE_ROWS - 1), &[]);
    run(d, "extract --base base --tuned fewer -o x.safetensors").error(&[
        "fewer",
        LM_HEAD,
        "[2050, 32]",
        "dimension 0",
    ]);
    let mut wider = base.clone();
    let (_, shape, data) = wider.get_mut(NORM).unwrap();
    shape[0] += 1;
    data.extend([0x80, 0x3f]);
    let mut wider_emb = base.clone();
    let (_, shape, data) = wider_emb.get_mut(EMBED).unwrap();
    *shape = vec![BASE_ROWS, HIDDEN + 1];
    data.extend(vec![0u8; 2 * BASE_ROWS]);
    write_model(&d.join("wider"), &wider_emb, &[]);
    run(d, "extract --base base --tuned wider -o x.safetensors").error(&[
        "wider",
        EMBED,
        "[2051, 33]",
    ]);
    // A 1-D tensor may grow: a vector of one value per token.
    write_model(&d.join("longer"), &wider, &[]);
    let r = ok(
        d,
        "extract --base base --tuned longer -o x.safetensors --json",
    )
    .json();
    assert_eq!(r["grown"][0]["name"], json!(NORM));
    // Its base part is unchanged: `same`, and only its new row is stored.
    let j = ok(d, "inspect --json x.safetensors").json();
    let norm = j["deltas"][0]["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == NORM)
        .unwrap()
        .clone();
    assert_eq!(norm["kind"], json!("same"), "{norm}");
    assert_eq!(norm["grown_shape"], json!([HIDDEN + 1]), "{norm}");
    ok(d, "verify --base base x.safetensors");
    ok(d, "apply --base base x.safetensors -o x");
    assert_same(
        &tensors(&d.join("x")),
        &wider,
        "apply of a grown `same` tensor",
    );
    assert!(partial_files(d).is_empty());
}

#[test]
fn grown_tensors_go_through_folder_deltas_and_sharded_outputs() {
    let dir = tmp();
    let d = dir.path();
    growing_and_plain_deltas(d);
    ok(
        d,
        "extract --base base --tuned tuned -o adir --slot 0/2 --shard-size 20KB",
    );
    assert!(
        d.join("adir/model.safetensors.index.json").exists(),
        "test design: sharded"
    );
    ok(
        d,
        "merge --base base a.safetensors b.safetensors -o m.safetensors",
    );
    ok(
        d,
        "merge --base base adir b.safetensors -o m --shard-size 100KB --files-from 0",
    );
    assert!(
        d.join("m/model.safetensors.index.json").exists(),
        "test design: sharded"
    );
    assert_same(
        &tensors(&d.join("m")),
        &tensors(&d.join("m.safetensors")),
        "sharded merge",
    );
    let got = files_of(&d.join("m"));
    assert_eq!(
        got["added_tokens.json"],
        fs::read(d.join("tuned/added_tokens.json")).unwrap()
    );
    ok(d, "apply --base base adir -o ap --shard-size 100KB");
    ok(d, "apply --base base a.safetensors -o ap.safetensors");
    assert_same(
        &tensors(&d.join("ap")),
        &tensors(&d.join("ap.safetensors")),
        "sharded apply",
    );
}

#[test]
fn merge_methods_act_on_the_rows_the_base_has_and_append_the_new_ones() {
    let dir = tmp();
    let d = dir.path();
    let (_, t1, _) = growing_and_plain_deltas(d);
    // The same fine-tune without its new rows: what the methods must see.
    write_model(&d.join("cut"), &truncated(&t1, BASE_ROWS), &[]);
    ok(
        d,
        "extract --base base --tuned cut -o acut.safetensors --slot 0/2",
    );
    let n = 2 * BASE_ROWS * HIDDEN;
    for method in ["ties", "iso", "tsv"] {
        ok(
            d,
            &format!(
                "merge --base base a.safetensors b.safetensors -o g.safetensors --method {method}"
            ),
        );
        ok(
            d,
            &format!(
                "merge --base base acut.safetensors b.safetensors -o c.safetensors --method {method}"
            ),
        );
        let (g, c) = (
            tensors(&d.join("g.safetensors")),
            tensors(&d.join("c.safetensors")),
        );
        for name in [EMBED, LM_HEAD] {
            assert_eq!(g[name].1, t1[name].1, "{method}: {name}");
            assert!(
                g[name].2[..n] == c[name].2[..],
                "{method}: {name}: the rows the base has"
            );
            assert!(
                g[name].2[n..] == t1[name].2[n..],
                "{method}: {name}: the new rows"
            );
        }
        assert_eq!(g[NORM], c[NORM], "{method}: {NORM}");
    }
}
