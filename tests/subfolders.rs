//! Weight files in subfolders (docs/FORMAT.md section 15), through the command line, on
//! fixtures/tiny/sentence-transformers/ (fixtures/make_fixtures.py): a base folder whose Dense
//! layer is a checkpoint of its own in `2_Dense/model.safetensors`, and fine-tunes that change it.
//! What the merged tensors are is checked against the numpy reference in
//! tests/reference/test_subfolders.py; here, what is covered, copied, refused, and never left
//! half-written. Every test works in its own temporary folder.

use std::fs;
use std::path::Path;

use sotu_delta::io::{Checkpoint, write_file};

mod common;
use common::{ok, partial_files, root, run, tmp};

const DENSE: &str = "2_Dense/model.safetensors";

/// Copies folder `src` into `dst`, subfolders too.
fn copy_dir(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).unwrap();
    for e in fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            fs::copy(e.path(), &to).unwrap();
        }
    }
}

/// A temporary folder holding copies of the fixture's `base`, `tuned` and `tuned2` folders.
fn setup() -> tempfile::TempDir {
    let dir = tmp();
    let fx = root().join("fixtures/tiny/sentence-transformers");
    for f in ["base", "tuned", "tuned2"] {
        copy_dir(&fx.join(f), &dir.path().join(f));
    }
    dir
}

/// The tensors of checkpoint `path`: name → (dtype, shape, bytes).
fn tensors(path: &Path) -> Vec<(String, String, Vec<usize>, Vec<u8>)> {
    let ck = Checkpoint::open(path).unwrap();
    ck.tensors()
        .iter()
        .map(|(name, info)| {
            let bytes = ck.tensor(name).unwrap().whole().unwrap().into_owned();
            (
                name.clone(),
                format!("{:?}", info.dtype),
                info.shape.clone(),
                bytes,
            )
        })
        .collect()
}

/// Asserts that `line` fails (exit 1) naming every one of `what`, and leaves neither `out` nor
/// a partial output in `dir`.
#[track_caller]
fn refused(dir: &Path, line: &str, out: &str, what: &[&str]) {
    let o = run(dir, line);
    o.error(what);
    assert!(!dir.join(out).exists(), "{out} written\n{o}");
    assert!(partial_files(dir).is_empty(), "{o}");
}

#[test]
fn a_covered_dense_layer_is_merged_listed_and_verified() {
    let dir = setup();
    let d = dir.path();
    let x = ok(
        d,
        "extract --json --base base --tuned tuned --density 1 -o full.st",
    );
    assert_eq!(x.json()["subfolders"], serde_json::json!([DENSE]), "{x}");
    let o = ok(
        d,
        "apply --json --no-rescale --base base full.st -o applied",
    );
    assert!(
        !o.stderr.contains("2_Dense"),
        "a covered file is not copied\n{o}"
    );
    assert_eq!(o.json()["subfolders"], serde_json::json!([DENSE]), "{o}");
    let outputs = o.json()["outputs"].to_string();
    assert!(
        outputs.contains("applied/2_Dense/model.safetensors"),
        "{outputs}"
    );
    // Density 1, no rescale: the fine-tune's Dense layer itself, to the bit.
    assert_eq!(
        tensors(&d.join("applied").join(DENSE)),
        tensors(&d.join("tuned").join(DENSE))
    );
    assert_eq!(
        tensors(&d.join("applied/model.safetensors")),
        tensors(&d.join("tuned/model.safetensors"))
    );
    let merged = Checkpoint::open(&d.join("applied").join(DENSE)).unwrap();
    assert!(
        merged.metadata().contains_key("sotu_delta"),
        "the output's metadata records the merge"
    );
    for f in [
        "modules.json",
        "1_Pooling/config.json",
        "2_Dense/config.json",
    ] {
        assert_eq!(
            fs::read(d.join("applied").join(f)).unwrap(),
            fs::read(d.join("base").join(f)).unwrap(),
            "{f}"
        );
    }
    let i = ok(d, "inspect full.st");
    assert!(
        i.stdout
            .contains("2_Dense/model.safetensors: linear.weight"),
        "{i}"
    );
    let v = ok(d, "verify --json --base base full.st");
    let matched = v.json()[0]["matched"].to_string();
    assert!(
        matched.contains("2_Dense/model.safetensors: linear.bias"),
        "{v}"
    );
}

#[test]
fn an_uncovered_dense_layer_is_copied_byte_for_byte_with_a_warning() {
    let dir = setup();
    let d = dir.path();
    fs::remove_file(d.join("tuned2").join(DENSE)).unwrap();
    let x = ok(
        d,
        "extract --json --base base --tuned tuned2 --density 0.5 -o d.st",
    );
    assert_eq!(x.json()["subfolders"], serde_json::json!([]), "{x}");
    let o = ok(d, "merge --base base d.st -o merged");
    assert_eq!(
        fs::read(d.join("merged").join(DENSE)).unwrap(),
        fs::read(d.join("base").join(DENSE)).unwrap()
    );
    let warning = o.message("warning");
    assert!(
        warning.contains(DENSE) && warning.contains("copied unchanged"),
        "{o}"
    );
}

#[test]
fn a_single_file_output_leaves_a_covered_layer_out_and_says_so() {
    let dir = setup();
    let d = dir.path();
    ok(d, "extract --base base --tuned tuned --density 0.5 -o d.st");
    let o = ok(d, "merge --base base d.st -o merged.st");
    let warning = o.message("warning");
    assert!(
        warning.contains(DENSE) && warning.contains("left out"),
        "{o}"
    );
}

#[test]
fn extract_refuses_a_subfolder_tensor_of_another_shape() {
    let dir = setup();
    let d = dir.path();
    let bad: Vec<_> = tensors(&d.join("tuned").join(DENSE))
        .into_iter()
        .map(|(name, _, shape, bytes)| match name.as_str() {
            "linear.weight" => {
                let cut = bytes[..24 * 15 * 4].to_vec();
                (name, safetensors::Dtype::F32, vec![24, 15], cut)
            }
            _ => (name, safetensors::Dtype::F32, shape, bytes),
        })
        .collect();
    write_file(&d.join("tuned").join(DENSE), &bad, &Default::default()).unwrap();
    refused(
        d,
        "extract --base base --tuned tuned --density 0.5 -o d.st",
        "d.st",
        &[DENSE, "linear.weight", "[24, 15]", "[24, 16]"],
    );
    refused(
        d,
        "extract --base base --tuned tuned --density 0.5 -o dfolder",
        "dfolder",
        &[DENSE, "linear.weight"],
    );
}

#[test]
fn extract_refuses_a_weight_file_only_in_the_fine_tune() {
    let dir = setup();
    let d = dir.path();
    fs::create_dir(d.join("tuned/3_Dense")).unwrap();
    fs::copy(
        d.join("tuned").join(DENSE),
        d.join("tuned/3_Dense/model.safetensors"),
    )
    .unwrap();
    refused(
        d,
        "extract --base base --tuned tuned --density 0.5 -o d.st",
        "d.st",
        &["3_Dense/model.safetensors", "lacks"],
    );
}

#[test]
fn merge_refuses_another_base_dense_layer_and_writes_nothing() {
    let dir = setup();
    let d = dir.path();
    ok(d, "extract --base base --tuned tuned --density 0.5 -o d.st");
    // The base folder's Dense layer is not the one the delta was taken against.
    fs::copy(d.join("tuned2").join(DENSE), d.join("base").join(DENSE)).unwrap();
    refused(
        d,
        "merge --base base d.st -o merged",
        "merged",
        &[DENSE, "linear.weight", "--force"],
    );
    refused(d, "apply --base base d.st -o applied", "applied", &[DENSE]);
    let v = run(d, "verify --base base d.st");
    assert_eq!(v.code, Some(1), "{v}");
    assert!(
        v.stdout
            .contains("2_Dense/model.safetensors: linear.weight"),
        "{v}"
    );
    let forced = ok(d, "merge --force --base base d.st -o merged");
    assert!(forced.message("warning").contains(DENSE), "{forced}");
}

#[test]
fn merge_refuses_a_base_folder_without_the_covered_file() {
    let dir = setup();
    let d = dir.path();
    ok(d, "extract --base base --tuned tuned --density 0.5 -o d.st");
    fs::remove_file(d.join("base").join(DENSE)).unwrap();
    refused(
        d,
        "merge --base base d.st -o merged",
        "merged",
        &[DENSE, "d.st"],
    );
    let v = run(d, "verify --base base d.st");
    assert_eq!(v.code, Some(1), "{v}");
    assert!(
        v.stdout
            .contains("2_Dense/model.safetensors: linear.weight"),
        "{v}"
    );
    // A single-file base has no subfolders to check, as a merge onto it leaves them out.
    ok(d, "verify --base base/model.safetensors d.st");
}

/// The missing file is found before the top-level merge runs: with the top level's base changed
/// too (which the merge finds only once it has read every tensor), the error is the missing
/// file's.
#[test]
fn a_missing_covered_file_is_refused_before_the_top_level_is_merged() {
    let dir = setup();
    let d = dir.path();
    ok(d, "extract --base base --tuned tuned --density 0.5 -o d.st");
    fs::remove_file(d.join("base").join(DENSE)).unwrap();
    let top = "model.safetensors";
    fs::copy(d.join("tuned2").join(top), d.join("base").join(top)).unwrap();
    refused(
        d,
        "merge --base base d.st -o merged",
        "merged",
        &[DENSE, "d.st", "has no such file"],
    );
}

#[test]
fn a_merge_in_parts_refuses_covered_subfolder_files() {
    let dir = setup();
    let d = dir.path();
    ok(d, "extract --base base --tuned tuned --density 0.5 -o d.st");
    let o = run(d, "merge --part 0/2 --base base d.st -o merged");
    o.usage_error(&["--part", DENSE]);
    assert!(
        !d.join("merged").exists() && partial_files(d).is_empty(),
        "{o}"
    );
}

/// A fine-tune given in place of a delta (`merge --tuned`, docs/FORMAT.md section 14) covers
/// its subfolder weight files as its extract would: the merge is the bytes of extract followed
/// by merge, the Dense layer included, mixed with a delta file or alone, at any density.
#[test]
fn a_fine_tune_given_in_place_of_a_delta_covers_its_subfolder_files_as_its_extract() {
    let dir = setup();
    let d = dir.path();
    ok(d, "extract --base base --tuned tuned --density 0.5 -o d.st");
    ok(
        d,
        "extract --base base --tuned tuned2 --seed 2412 --density 0.5 -o d2.st",
    );
    ok(d, "merge --base base d.st d2.st -o want");
    ok(
        d,
        "merge --base base d.st --tuned tuned2 --seed 2412 --density 0.5 -o got",
    );
    for file in ["model.safetensors", DENSE] {
        assert_eq!(
            tensors(&d.join("got").join(file)),
            tensors(&d.join("want").join(file)),
            "{file}: merge --tuned is not extract + merge"
        );
    }
    ok(d, "merge --base base d.st -o alone");
    assert_ne!(
        tensors(&d.join("alone").join(DENSE)),
        tensors(&d.join("got").join(DENSE)),
        "test design: the fine-tune changes the Dense layer"
    );
    // Two fine-tunes, no delta file: the same as their extracts in slots.
    ok(d, "extract --base base --tuned tuned --slot 0/2 -o s0.st");
    ok(d, "extract --base base --tuned tuned2 --slot 1/2 -o s1.st");
    ok(d, "merge --base base s0.st s1.st -o slots-want");
    ok(
        d,
        "merge --base base --tuned tuned --tuned tuned2 --slots -o slots-got",
    );
    assert_eq!(
        tensors(&d.join("slots-got").join(DENSE)),
        tensors(&d.join("slots-want").join(DENSE))
    );
}
