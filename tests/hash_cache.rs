//! The hash cache (docs/RELIABILITY.md, "The hash cache"): a base hashed once is not hashed again
//! while its file key (device, inode, size, mtime, ctime) is unchanged; `--rehash` bypasses it;
//! a changed, racy or unreadable entry is never trusted.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{BIN, Outcome, root, tmp};

/// Runs `sotu-delta` in `dir` with `line` split at whitespace and the cache in `cache`.
fn with_cache(dir: &Path, cache: &str, line: &str) -> Outcome {
    let out = Command::new(BIN)
        .current_dir(dir)
        .args(line.split_whitespace())
        .env("SOTU_DELTA_CACHE", cache)
        .stdin(Stdio::null())
        .output()
        .expect("run sotu-delta");
    Outcome {
        line: line.to_string(),
        ..Outcome::from_output(out)
    }
}

/// A copy of the bf16 fixture base and a delta of task 1 taken against it, in `dir`. The copy
/// is a new file: its times are now, so the cache stores nothing for it for two seconds.
fn base_and_delta(dir: &Path) {
    let fx = root().join("fixtures/tiny");
    std::fs::copy(
        fx.join("base-bf16.safetensors"),
        dir.join("base.safetensors"),
    )
    .unwrap();
    std::fs::copy(
        fx.join("task1-bf16.safetensors"),
        dir.join("task.safetensors"),
    )
    .unwrap();
    with_cache(
        dir,
        "off",
        "extract --base base.safetensors --tuned task.safetensors --density 0.5 -o d.safetensors",
    )
    .success();
}

/// The cache entries in `cache`.
fn entries(cache: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(cache)
        .map(|r| r.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default()
}

/// Sets every hash of the one entry in `cache` to zeros: what a change the file key missed
/// would look like.
fn falsify(cache: &Path) {
    let [entry] = entries(cache).try_into().expect("one entry");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&entry).unwrap()).unwrap();
    for h in v["tensors"].as_object_mut().unwrap().values_mut() {
        *h = "0".repeat(64).into();
    }
    std::fs::write(&entry, serde_json::to_vec(&v).unwrap()).unwrap();
}

const VERIFY: &str = "verify --base base.safetensors d.safetensors";

#[test]
fn the_cache_is_used_while_the_file_key_holds_and_rehash_bypasses_it() {
    let dir = tmp();
    let d = dir.path();
    base_and_delta(d);
    let cache = d.join("cache");
    let c = cache.to_str().unwrap();
    // A file changed within the last two seconds is hashed but not stored.
    with_cache(d, c, VERIFY).success();
    assert!(entries(&cache).is_empty(), "{:?}", entries(&cache));
    std::thread::sleep(Duration::from_millis(2100));
    with_cache(d, c, VERIFY).success();
    assert_eq!(entries(&cache).len(), 1);

    // The stored hashes are what later runs use: false ones make the base look foreign ...
    falsify(&cache);
    let out = with_cache(d, c, VERIFY);
    out.error(&["d.safetensors"]);
    assert!(out.stdout.contains("MISMATCH"), "{out}");
    with_cache(
        d,
        c,
        "merge --base base.safetensors d.safetensors -o m.safetensors",
    )
    .error(&[
        "base.safetensors",
        "not the one the deltas were taken against",
    ]);
    // ... until --rehash reads the file again, and stores what it finds.
    with_cache(d, c, &format!("--rehash {VERIFY}")).success();
    with_cache(d, c, VERIFY).success();

    // Any write to the base changes its key: the entry no longer applies, even to equal bytes.
    falsify(&cache);
    let bytes = std::fs::read(d.join("base.safetensors")).unwrap();
    std::fs::write(d.join("base.safetensors"), bytes).unwrap();
    with_cache(d, c, VERIFY).success();
}

#[test]
fn an_unreadable_entry_or_cache_folder_only_costs_a_hash() {
    let dir = tmp();
    let d = dir.path();
    base_and_delta(d);
    std::thread::sleep(Duration::from_millis(2100));
    let cache = d.join("cache");
    let c = cache.to_str().unwrap();
    with_cache(d, c, VERIFY).success();
    let [entry] = entries(&cache).try_into().expect("one entry");
    for garbage in [&b"not json"[..], b"{\"version\": 1}", b""] {
        std::fs::write(&entry, garbage).unwrap();
        with_cache(d, c, VERIFY).success();
    }
    // A cache "folder" that is a file: nothing can be stored, the merge still succeeds.
    let file = d.join("not-a-folder");
    std::fs::write(&file, b"x").unwrap();
    let merge = "merge --base base.safetensors d.safetensors -o m.safetensors";
    with_cache(d, file.to_str().unwrap(), merge).success();
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
    // Turned off: nothing is created anywhere.
    std::fs::remove_file(d.join("m.safetensors")).unwrap();
    let off = d.join("off-cache");
    with_cache(d, "off", merge).success();
    assert!(!off.exists());
}

#[test]
fn outputs_are_the_same_bytes_with_the_hashes_from_the_cache() {
    let dir = tmp();
    let d = dir.path();
    base_and_delta(d);
    std::thread::sleep(Duration::from_millis(2100));
    let c = d.join("cache");
    let c = c.to_str().unwrap();
    let run = |out: &str| {
        with_cache(
            d,
            c,
            &format!("merge --base base.safetensors d.safetensors -o {out}"),
        )
        .success();
        std::fs::read(d.join(out)).unwrap()
    };
    let hashed = run("a.safetensors");
    assert_eq!(entries(&d.join("cache")).len(), 1);
    assert_eq!(run("b.safetensors"), hashed);
}
