//! Integration tests of Hugging Face folders and shards (issue #3), written from the contract
//! of the issue, not from the implementation.
//!
//! The contract, in short:
//! - every checkpoint argument (`--base`, `--tuned`, the deltas of merge/apply/inspect/verify) is
//!   a `.safetensors` file or a folder holding `model.safetensors.index.json` (sharded; it wins
//!   when both exist) or `model.safetensors`; a folder with neither is refused (exit 1);
//! - a malformed index is refused with exit 1, naming the index file and the entry at fault;
//! - `-o OUT` ending in `.safetensors` or `.st` writes one file (issue #13); any other `-o OUT`
//!   writes a folder in Hugging Face layout: greedy shards
//!   of at most `--shard-size` tensor bytes in name order, `model-0000i-of-0000N.safetensors`
//!   plus the index, or `model.safetensors` alone when everything fits; the base folder's other
//!   files are copied by merge/apply; the folder appears only when complete;
//! - whatever the form of inputs and output, the tensors equal those of the single-file run;
//! - bounded memory: the peak RssAnon of a merge stays under 64 MiB + 4 x the largest tensor.
//!
//! Conventions (as in tests/cli.rs): every test works in its own temporary folder and runs the
//! real binary there, so paths on a command line are bare relative names and a command line is
//! one string split at whitespace; exact exit codes (0 success, 1 failed operation, 2 usage);
//! after a failure nothing is written and no `.sotu-delta-partial-*` file or temporary sibling
//! remains. These tests read and write safetensors with their own small code (below), so they
//! depend neither on the crate's library (but for tests/common asking whether a CUDA device is
//! present) nor on Python.
//!
//! Readings of the contract where it is not explicit (each also noted where it is used):
//! - "single file" output means OUT ends in `.safetensors` or `.st`; single-file outputs here are
//!   named `*.safetensors` but in the test of that rule.
//! - The shard limit counts tensor data bytes only (not the shard's header), as the packing rule
//!   says ("the current shard's tensor bytes").
//! - "Name order" is byte-wise order of the UTF-8 tensor names (Rust `String` order).
//! - Shard numbering is 1-based and 5-digit on both sides: `model-00001-of-00003.safetensors`.
//! - For a sharded delta folder, the union of the shards' tensors equals the single-file delta
//!   (every `sotu/...` tensor included), as "equal, tensor for tensor" says.
//! - Values of `__metadata__` are compared only where they do not mention an input's file name.
//! - In `inspect --json`, per-delta file sizes (`stored_bytes`, any `*path*`/`file*` field) are
//!   about files and may differ between a folder and a file; everything else must be equal.
//! - `--json` `outputs`: every listed path exists after the run, lies in the output, and the list
//!   covers every shard and the index; `output_bytes` is the sum of the listed files' sizes.
//!   Whether copied config files are listed is left open, and `output_bytes` may be the size of
//!   all listed files or of the listed `.safetensors` files only. `input_bytes` lies between the
//!   inputs' tensor bytes and the total size of everything under the input paths.
//! - Any `..` component in a shard name is refused, even `sub/../shard` (which stays inside).
//! - `weight_map` not being an object is an error whose "offending entry" is `weight_map`, so
//!   the message must say `weight_map`.
//! - A `--shard-size` beyond 64 bits (2^64 and up) is a bad value (exit 2), not a saturated one.
//! - Not tested, because the contract is silent: what happens to an existing output folder that
//!   holds no input (replaced, merged into, or refused); symbolic links among shards.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tempfile::TempDir;

mod common;
use common::{BIN, Device, Outcome, PARTIAL_PREFIX, device_test, noise, ok, run, sotu, tmp};

// ==========================================================================================
// Running the binary
// ==========================================================================================

const INDEX: &str = "model.safetensors.index.json";
const SINGLE: &str = "model.safetensors";

/// The names of the entries of `dir` (not recursive).
fn entries(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Runs `line`, which must succeed and add exactly `out` to `dir`: no temporary sibling, no
/// partial file left beside it.
#[track_caller]
fn ok_creating(dir: &Path, line: &str, out: &str) -> Outcome {
    assert!(!dir.join(out).exists(), "{out} exists before the run");
    let before = entries(dir);
    let o = ok(dir, line);
    let mut want = before;
    want.insert(out.to_string());
    assert_eq!(
        entries(dir),
        want,
        "the run should add exactly {out} to its folder\n{o}"
    );
    o
}

/// Runs `line`, which must fail with exit 1 naming every one of `all` and one of `any`, and
/// leave `dir` as it was (so `out` is not created, and no partial file or folder remains).
#[track_caller]
fn fails_writing_nothing(dir: &Path, line: &str, out: &str, all: &[&str], any: &[&str]) {
    let before = entries(dir);
    let o = run(dir, line);
    o.error_any(all, any);
    assert!(
        !dir.join(out).exists(),
        "{out} was written despite the failure\n{o}"
    );
    let after = entries(dir);
    assert_eq!(after, before, "the failed run left entries behind\n{o}");
    assert!(
        !after.iter().any(|n| n.starts_with(PARTIAL_PREFIX)),
        "partial files left behind\n{o}"
    );
}

// ==========================================================================================
// Safetensors, read and written here (independently of the crate)
// ==========================================================================================

/// One tensor: dtype as safetensors spells it ("F32", "BF16", ...), shape, raw bytes.
#[derive(Clone, PartialEq, Eq)]
struct T {
    dtype: String,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl fmt::Debug for T {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}{:?} ({} bytes)",
            self.dtype,
            self.shape,
            self.data.len()
        )
    }
}

type Tensors = BTreeMap<String, T>;
type Meta = BTreeMap<String, String>;

fn elem_size(dtype: &str) -> usize {
    match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => 1,
        "I16" | "U16" | "F16" | "BF16" => 2,
        "I32" | "U32" | "F32" => 4,
        "I64" | "U64" | "F64" => 8,
        other => panic!("unknown dtype {other}"),
    }
}

/// Parses and validates a safetensors file: 8-byte length, JSON object header, every entry with
/// a known dtype and a byte range matching dtype and shape, ranges tiling the data exactly.
fn read_st(path: &Path) -> (Tensors, Meta) {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let p = path.display();
    assert!(bytes.len() >= 8, "{p}: shorter than 8 bytes");
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert!(n <= bytes.len() - 8, "{p}: header length beyond the file");
    let header: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n])
        .unwrap_or_else(|e| panic!("{p}: the header is not a JSON object: {e}"));
    let data = &bytes[8 + n..];
    let mut meta = Meta::new();
    let mut tensors = Tensors::new();
    let mut spans = Vec::new();
    for (name, info) in &header {
        if name == "__metadata__" {
            for (k, v) in info.as_object().expect("__metadata__ is an object") {
                let v = v
                    .as_str()
                    .unwrap_or_else(|| panic!("{p}: metadata {k} not a string"));
                meta.insert(k.clone(), v.to_string());
            }
            continue;
        }
        let dtype = info["dtype"].as_str().expect("dtype").to_string();
        let shape: Vec<usize> = info["shape"]
            .as_array()
            .expect("shape")
            .iter()
            .map(|d| d.as_u64().expect("shape entry") as usize)
            .collect();
        let offs = info["data_offsets"].as_array().expect("data_offsets");
        let (s, e) = (
            offs[0].as_u64().unwrap() as usize,
            offs[1].as_u64().unwrap() as usize,
        );
        let numel: usize = shape.iter().product();
        assert!(
            s <= e && e <= data.len(),
            "{p}: {name}: offsets out of range"
        );
        assert_eq!(
            e - s,
            numel * elem_size(&dtype),
            "{p}: {name}: size mismatch"
        );
        spans.push((s, e, name.clone()));
        tensors.insert(
            name.clone(),
            T {
                dtype,
                shape,
                data: data[s..e].to_vec(),
            },
        );
    }
    spans.sort();
    let mut end = 0;
    for (s, e, name) in spans {
        assert_eq!(
            s, end,
            "{p}: {name} does not start where the previous one ends"
        );
        end = e;
    }
    assert_eq!(end, data.len(), "{p}: bytes after the last tensor");
    (tensors, meta)
}

fn tensors_of(path: &Path) -> Tensors {
    read_st(path).0
}

/// Writes a safetensors file: tensors in name order, header padded with spaces to 8 bytes.
fn write_st(path: &Path, tensors: &Tensors, meta: &Meta) {
    let mut header = serde_json::Map::new();
    if !meta.is_empty() {
        header.insert("__metadata__".into(), json!(meta));
    }
    let mut pos = 0;
    for (name, t) in tensors {
        header.insert(
            name.clone(),
            json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [pos, pos + t.data.len()]}),
        );
        pos += t.data.len();
    }
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    for t in tensors.values() {
        out.extend_from_slice(&t.data);
    }
    fs::write(path, out).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn pt_meta() -> Meta {
    [("format".to_string(), "pt".to_string())].into()
}

/// Writes `tensors` as a sharded folder: `shards` maps a shard file name to its tensor names;
/// the index maps every tensor to its shard. `extra` are other files (config, tokenizer).
fn write_sharded(
    dir: &Path,
    tensors: &Tensors,
    shards: &[(&str, Vec<String>)],
    extra: &[(&str, &[u8])],
) {
    fs::create_dir_all(dir).unwrap();
    let mut map = serde_json::Map::new();
    let mut seen = BTreeSet::new();
    for (file, names) in shards {
        let part: Tensors = names
            .iter()
            .map(|n| (n.clone(), tensors[n].clone()))
            .collect();
        write_st(&dir.join(file), &part, &pt_meta());
        for n in names {
            assert!(seen.insert(n.clone()), "generator: {n} in two shards");
            map.insert(n.clone(), json!(file));
        }
    }
    assert_eq!(seen.len(), tensors.len(), "generator: a tensor in no shard");
    let total: usize = tensors.values().map(|t| t.data.len()).sum();
    let index = json!({"metadata": {"total_size": total}, "weight_map": map});
    fs::write(dir.join(INDEX), serde_json::to_vec_pretty(&index).unwrap()).unwrap();
    for (name, bytes) in extra {
        fs::write(dir.join(name), bytes).unwrap();
    }
}

/// Writes `tensors` as a folder holding only `model.safetensors` (plus `extra`).
fn write_single_folder(dir: &Path, tensors: &Tensors, extra: &[(&str, &[u8])]) {
    fs::create_dir_all(dir).unwrap();
    write_st(&dir.join(SINGLE), tensors, &pt_meta());
    for (name, bytes) in extra {
        fs::write(dir.join(name), bytes).unwrap();
    }
}

/// Reads a checkpoint in any form, the way the contract defines them (file, folder with index,
/// folder with model.safetensors), checking the index's consistency on the way.
fn load_any(path: &Path) -> Tensors {
    if path.is_file() {
        return tensors_of(path);
    }
    if path.join(INDEX).exists() {
        let index: Value = serde_json::from_slice(&fs::read(path.join(INDEX)).unwrap()).unwrap();
        let map = index["weight_map"].as_object().expect("weight_map");
        let files: BTreeSet<&str> = map.values().map(|v| v.as_str().unwrap()).collect();
        let mut all = Tensors::new();
        for f in files {
            let part = tensors_of(&path.join(f));
            for (n, t) in part {
                assert_eq!(map[&n], json!(f), "{}: {n} is in {f}", path.display());
                assert!(all.insert(n.clone(), t).is_none(), "{n} in two shards");
            }
        }
        assert_eq!(
            all.len(),
            map.len(),
            "{}: index lists absent tensors",
            path.display()
        );
        return all;
    }
    tensors_of(&path.join(SINGLE))
}

/// Asserts `got == want` tensor for tensor, naming the first difference.
#[track_caller]
fn assert_same_tensors(got: &Tensors, want: &Tensors, what: &str) {
    let gk: Vec<&String> = got.keys().collect();
    let wk: Vec<&String> = want.keys().collect();
    assert_eq!(gk, wk, "{what}: tensor names differ");
    for (name, w) in want {
        let g = &got[name];
        assert_eq!(
            (&g.dtype, &g.shape),
            (&w.dtype, &w.shape),
            "{what}: {name}: dtype/shape"
        );
        if g.data != w.data {
            let i = g
                .data
                .iter()
                .zip(&w.data)
                .position(|(a, b)| a != b)
                .unwrap();
            panic!("{what}: {name}: data differs, first at byte {i}");
        }
    }
}

/// Metadata equal, except values that mention one of `names` (input file names of `want`'s run)
/// or of `got_names`, which may differ; the keys must be the same.
#[track_caller]
fn assert_same_metadata(got: &Meta, want: &Meta, names: &[&str], what: &str) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{what}: metadata keys differ"
    );
    for (k, w) in want {
        if names.iter().any(|n| w.contains(n) || got[k].contains(n)) {
            continue;
        }
        assert_eq!(&got[k], w, "{what}: metadata {k} differs");
    }
}

/// Every file under `path` (a file or a folder, recursively) with its bytes.
fn snapshot(path: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    if path.is_file() {
        out.insert(path.to_path_buf(), fs::read(path).unwrap());
    } else if path.is_dir() {
        for e in fs::read_dir(path).unwrap() {
            out.extend(snapshot(&e.unwrap().path()));
        }
    }
    out
}

// ==========================================================================================
// The generated model
// ==========================================================================================

/// Finite values of magnitude in [0.5, 1) and random sign, as raw bits of `dtype`; position
/// ids 0.. for I64.
fn values(dtype: &str, numel: usize, seed: u64) -> Vec<u8> {
    let size = elem_size(dtype);
    let raw = noise(numel * size, seed);
    match dtype {
        "F32" => raw
            .chunks_exact(4)
            .flat_map(|c| {
                ((u32::from_le_bytes(c.try_into().unwrap()) & 0x807f_ffff) | 0x3f00_0000)
                    .to_le_bytes()
            })
            .collect(),
        "F16" => raw
            .chunks_exact(2)
            .flat_map(|c| {
                ((u16::from_le_bytes(c.try_into().unwrap()) & 0x83ff) | 0x3800).to_le_bytes()
            })
            .collect(),
        "BF16" => raw
            .chunks_exact(2)
            .flat_map(|c| {
                ((u16::from_le_bytes(c.try_into().unwrap()) & 0x807f) | 0x3f00).to_le_bytes()
            })
            .collect(),
        "I64" => (0..numel as i64).flat_map(|i| i.to_le_bytes()).collect(),
        other => panic!("no generator for {other}"),
    }
}

const EMBED: &str = "model.embed_tokens.weight";
const LM_HEAD: &str = "lm_head.weight";
const POSITION_IDS: &str = "model.position_ids";
const L1_NORM: &str = "model.layers.1.input_layernorm.weight";
const L0_Q: &str = "model.layers.0.self_attn.q_proj.weight";

/// The model: mixed dtypes (F32, F16, BF16, I64), a 0-d tensor, a tensor of odd byte size, and
/// an embedding (51 200 bytes) larger than the shard sizes used below.
fn spec() -> Vec<(&'static str, &'static str, Vec<usize>)> {
    vec![
        (LM_HEAD, "BF16", vec![160, 64]),
        (EMBED, "BF16", vec![400, 64]),
        ("model.layers.0.input_layernorm.weight", "F32", vec![64]),
        ("model.layers.0.mlp.down_proj.weight", "BF16", vec![64, 96]),
        ("model.layers.0.mlp.up_proj.weight", "BF16", vec![96, 64]),
        (
            "model.layers.0.self_attn.k_proj.weight",
            "F16",
            vec![32, 64],
        ),
        (L0_Q, "F16", vec![64, 64]),
        ("model.layers.0.self_attn.rotary_odd", "F16", vec![7, 3]),
        (L1_NORM, "F32", vec![64]),
        ("model.layers.1.mlp.up_proj.weight", "F32", vec![48, 64]),
        (
            "model.layers.1.self_attn.q_proj.weight",
            "F16",
            vec![64, 64],
        ),
        ("model.norm.weight", "F32", vec![64]),
        (POSITION_IDS, "I64", vec![1, 128]),
        ("model.scale", "F32", vec![]),
    ]
}

fn base_tensors() -> Tensors {
    spec()
        .into_iter()
        .enumerate()
        .map(|(i, (name, dtype, shape))| {
            let numel = shape.iter().product();
            let data = values(dtype, numel, 1000 + i as u64);
            (
                name.to_string(),
                T {
                    dtype: dtype.into(),
                    shape,
                    data,
                },
            )
        })
        .collect()
}

/// Fine-tune `k` (1..=3): the base with the low mantissa bits of about half the elements of
/// some tensors changed; task 1 also changes the I64 position ids (stored whole in a delta).
fn tuned_tensors(k: u64) -> Tensors {
    let changed: &[&str] = match k {
        1 => &[
            L0_Q,
            EMBED,
            LM_HEAD,
            "model.layers.1.self_attn.q_proj.weight",
            POSITION_IDS,
        ],
        2 => &[
            "model.layers.0.mlp.up_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.1.mlp.up_proj.weight",
            L1_NORM,
            "model.norm.weight",
        ],
        _ => &[
            EMBED,
            "model.layers.0.self_attn.k_proj.weight",
            "model.layers.0.self_attn.rotary_odd",
            "model.scale",
            L1_NORM,
        ],
    };
    let mut t = base_tensors();
    for (j, name) in changed.iter().enumerate() {
        let x = t.get_mut(*name).unwrap();
        let size = elem_size(&x.dtype);
        if x.dtype == "I64" {
            for (i, c) in x.data.chunks_exact_mut(8).enumerate() {
                c.copy_from_slice(&((i as i64) * 2 + 1).to_le_bytes());
            }
            continue;
        }
        let r = noise(x.data.len() / size, 77 * k + j as u64);
        for (i, c) in x.data.chunks_exact_mut(size).enumerate() {
            if r[i] & 1 == 1 {
                c[0] ^= 1 + (r[i] >> 1 & 3);
            }
        }
    }
    t
}

const CONFIG: &[u8] =
    b"{\n  \"architectures\": [\"LlamaForCausalLM\"],\n  \"hidden_size\": 64\n}\n";
const GEN_CONFIG: &[u8] = b"{\"bos_token_id\": 1, \"eos_token_id\": 2}\n";
const TOKENIZER: &[u8] =
    b"{\"version\": \"1.0\", \"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}}}";
const TOKENIZER_CONFIG: &[u8] = b"{\"model_max_length\": 128}";
const SPECIAL_TOKENS: &[u8] = b"{\"bos_token\": \"<s>\"}";
const README: &[u8] = b"# test model\n\nNot a real model.\n";

/// The non-weight files of the base folder, which merge and apply copy unchanged.
fn base_extras() -> Vec<(&'static str, &'static [u8])> {
    vec![
        ("config.json", CONFIG),
        ("generation_config.json", GEN_CONFIG),
        ("tokenizer.json", TOKENIZER),
        ("tokenizer_config.json", TOKENIZER_CONFIG),
        ("special_tokens_map.json", SPECIAL_TOKENS),
        ("README.md", README),
    ]
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Writes into `d`:
/// - `base.safetensors`, and `base/`: 3 shards, not in name order (shard 1 holds the embedding
///   alone), the index, and config/tokenizer/README files;
/// - `t1.safetensors`, `t1/`: 4 shards with non-standard names;
/// - `t2.safetensors`, `t2/`: a folder holding `model.safetensors` only;
/// - `t3.safetensors`, `t3/`: 2 shards.
fn make_models(d: &Path) {
    let base = base_tensors();
    write_st(&d.join("base.safetensors"), &base, &pt_meta());
    let extras = base_extras();
    write_sharded(
        &d.join("base"),
        &base,
        &[
            ("model-00001-of-00003.safetensors", names(&[EMBED])),
            (
                "model-00002-of-00003.safetensors",
                names(&[
                    LM_HEAD,
                    "model.layers.0.input_layernorm.weight",
                    "model.layers.0.mlp.down_proj.weight",
                    "model.layers.0.mlp.up_proj.weight",
                    "model.layers.0.self_attn.k_proj.weight",
                    L0_Q,
                    "model.layers.0.self_attn.rotary_odd",
                    POSITION_IDS,
                ]),
            ),
            (
                "model-00003-of-00003.safetensors",
                names(&[
                    L1_NORM,
                    "model.layers.1.mlp.up_proj.weight",
                    "model.layers.1.self_attn.q_proj.weight",
                    "model.norm.weight",
                    "model.scale",
                ]),
            ),
        ],
        &extras,
    );
    for k in 1..=3u64 {
        let t = tuned_tensors(k);
        write_st(&d.join(format!("t{k}.safetensors")), &t, &pt_meta());
        let all: Vec<String> = t.keys().cloned().collect();
        let folder = d.join(format!("t{k}"));
        match k {
            1 => {
                // Round robin over 4 shards with names of another convention.
                let mut parts: Vec<Vec<String>> = vec![vec![]; 4];
                for (i, n) in all.iter().enumerate() {
                    parts[i % 4].push(n.clone());
                }
                let files: Vec<String> = (1..=4)
                    .map(|i| format!("pytorch_model-{i:05}-of-00004.safetensors"))
                    .collect();
                let shards: Vec<(&str, Vec<String>)> =
                    files.iter().map(String::as_str).zip(parts).collect();
                write_sharded(&folder, &t, &shards, &[("config.json", CONFIG)]);
            }
            2 => write_single_folder(&folder, &t, &[("config.json", CONFIG)]),
            _ => {
                let (a, b) = all.split_at(5);
                write_sharded(
                    &folder,
                    &t,
                    &[
                        ("first.safetensors", a.to_vec()),
                        ("second.safetensors", b.to_vec()),
                    ],
                    &[],
                );
            }
        }
    }
}

/// The shards a folder output must have for `tensors` under `limit` (greedy, name order).
fn expected_layout(tensors: &Tensors, limit: u64) -> Vec<Vec<String>> {
    let mut shards = Vec::new();
    let mut cur: Vec<String> = Vec::new();
    let mut bytes = 0u64;
    for (name, t) in tensors {
        let n = t.data.len() as u64;
        if !cur.is_empty() && bytes + n > limit {
            shards.push(std::mem::take(&mut cur));
            bytes = 0;
        }
        cur.push(name.clone());
        bytes += n;
    }
    if !cur.is_empty() {
        shards.push(cur);
    }
    shards
}

/// Checks a folder output against the contract: `want` tensors laid out greedily under `limit`,
/// shard names, index (total_size, weight_map), shard sizes, the `copied` files byte for byte,
/// and nothing else in the folder.
#[track_caller]
fn assert_folder_output(
    out: &Path,
    limit: u64,
    want: &Tensors,
    copied: &[(&str, &[u8])],
    what: &str,
) {
    let o = out.display();
    assert!(out.is_dir(), "{what}: {o} is not a folder");
    let layout = expected_layout(want, limit);
    let mut want_entries: BTreeSet<String> = copied.iter().map(|(n, _)| n.to_string()).collect();
    // A merged or applied folder has a model card in place of the base's README.md, and a
    // recipe (issue #13; their contents are tests/release.rs's). A delta folder has neither.
    let released = out.join("sotu-delta.json").is_file();
    if released {
        want_entries.extend(["README.md".to_string(), "sotu-delta.json".to_string()]);
        let card = fs::read_to_string(out.join("README.md")).unwrap();
        assert!(
            card.starts_with("---\nbase_model: "),
            "{what}: not a card\n{card}"
        );
    }
    let n = layout.len();
    let shard_names: Vec<String> = if n == 1 {
        vec![SINGLE.to_string()]
    } else {
        (1..=n)
            .map(|i| format!("model-{i:05}-of-{n:05}.safetensors"))
            .collect()
    };
    want_entries.extend(shard_names.iter().cloned());
    if n > 1 {
        want_entries.insert(INDEX.to_string());
    }
    assert_eq!(
        entries(out),
        want_entries,
        "{what}: the entries of {o} (expected {n} shard(s) for limit {limit})"
    );
    for (name, bytes) in copied
        .iter()
        .filter(|(n, _)| !released || *n != "README.md")
    {
        assert!(
            fs::read(out.join(name)).unwrap() == *bytes,
            "{what}: {name} is not a byte-identical copy"
        );
    }
    if n > 1 {
        let index: Value = serde_json::from_slice(&fs::read(out.join(INDEX)).unwrap())
            .unwrap_or_else(|e| panic!("{what}: {o}/{INDEX} is not JSON: {e}"));
        let total: usize = want.values().map(|t| t.data.len()).sum();
        assert_eq!(
            index["metadata"]["total_size"].as_u64(),
            Some(total as u64),
            "{what}: total_size in {o}/{INDEX}"
        );
        let map = index["weight_map"].as_object().expect("weight_map object");
        let mut want_map = serde_json::Map::new();
        for (file, names) in shard_names.iter().zip(&layout) {
            for t in names {
                want_map.insert(t.clone(), json!(file));
            }
        }
        assert_eq!(map, &want_map, "{what}: weight_map of {o}/{INDEX}");
    }
    let mut union = Tensors::new();
    for (file, names) in shard_names.iter().zip(&layout) {
        let part = tensors_of(&out.join(file));
        assert_eq!(
            part.keys().collect::<Vec<_>>(),
            names.iter().collect::<Vec<_>>(),
            "{what}: the tensors of {o}/{file}"
        );
        let bytes: u64 = part.values().map(|t| t.data.len() as u64).sum();
        assert!(
            bytes <= limit || part.len() == 1,
            "{what}: {o}/{file} holds {bytes} tensor bytes > {limit} in {} tensors",
            part.len()
        );
        union.extend(part);
    }
    assert_same_tensors(&union, want, what);
}

/// The fixture most tests start from: models, and deltas of the three tasks at slots k/3 from
/// the single files (`dk.safetensors`), which serve as the single-file reference.
fn setup() -> TempDir {
    let dir = tmp();
    let d = dir.path();
    make_models(d);
    for k in 1..=3 {
        ok(
            d,
            &format!(
                "extract --base base.safetensors --tuned t{k}.safetensors -o d{k}.safetensors --slot {}/3",
                k - 1
            ),
        );
    }
    dir
}

// ==========================================================================================
// 1. extract
// ==========================================================================================

#[test]
fn extract_from_folders_equals_extract_from_files() {
    let dir = setup();
    let d = dir.path();
    let (want, want_meta) = read_st(&d.join("d1.safetensors"));
    for (i, (base, tuned)) in [
        ("base", "t1"),
        ("base", "t1.safetensors"),
        ("base.safetensors", "t1"),
    ]
    .into_iter()
    .enumerate()
    {
        let out = format!("x{i}.safetensors");
        ok_creating(
            d,
            &format!("extract --base {base} --tuned {tuned} -o {out} --slot 0/3"),
            &out,
        );
        let (mut got, mut meta) = read_st(&d.join(&out));
        let what = format!("extract --base {base} --tuned {tuned}");
        if (base, tuned) == ("base.safetensors", "t1") {
            // A base given as a file has no config.json: the fine-tune folder's is carried
            // (docs/FORMAT.md section 13), the one difference from the delta of the files.
            let file = got
                .remove("sotu/files/config.json")
                .expect("config.json carried");
            assert_eq!(
                (file.dtype.as_str(), &file.data[..]),
                ("U8", CONFIG),
                "{what}"
            );
            let files: Value = serde_json::from_str(&meta.remove("files").unwrap()).unwrap();
            assert_eq!(
                files.as_object().unwrap().keys().collect::<Vec<_>>(),
                ["config.json"]
            );
        }
        assert_same_tensors(&got, &want, &what);
        assert_same_metadata(
            &meta,
            &want_meta,
            &["base", "t1", "x0", "x1", "x2", "d1"],
            &what,
        );
    }
    // A folder holding model.safetensors only, and a 2-shard folder.
    for k in [2, 3] {
        let out = format!("y{k}.safetensors");
        ok_creating(
            d,
            &format!(
                "extract --base base --tuned t{k} -o {out} --slot {}/3",
                k - 1
            ),
            &out,
        );
        assert_same_tensors(
            &tensors_of(&d.join(&out)),
            &tensors_of(&d.join(format!("d{k}.safetensors"))),
            &format!("extract --base base --tuned t{k}"),
        );
    }
}

#[test]
fn extract_to_a_folder_writes_the_delta_sharded_or_single() {
    let dir = setup();
    let d = dir.path();
    let want = tensors_of(&d.join("d1.safetensors"));
    // Sharded: the delta of task 1 holds a 1/3 of the embedding's values, ~17 KB, and more.
    ok_creating(
        d,
        "extract --base base --tuned t1 -o dsharded --slot 0/3 --shard-size 8000",
        "dsharded",
    );
    assert!(
        expected_layout(&want, 8000).len() >= 3,
        "test design: the delta should need 3+ shards at 8000 bytes"
    );
    assert_folder_output(&d.join("dsharded"), 8000, &want, &[], "extract -o dsharded");
    // Fits the default 5GB: model.safetensors alone.
    ok_creating(
        d,
        "extract --base base --tuned t1 -o dsingle --slot 0/3",
        "dsingle",
    );
    assert_folder_output(
        &d.join("dsingle"),
        5_000_000_000,
        &want,
        &[],
        "extract -o dsingle",
    );
}

/// The rule of every subcommand (issue #13): an output path ending in `.safetensors` or `.st`
/// is one file, any other a model folder. The file is the same bytes whatever its suffix.
#[test]
fn outputs_ending_in_st_are_files_and_others_are_folders() {
    let dir = setup();
    let d = dir.path();
    let runs = [
        (
            "extract --base base.safetensors --tuned t1.safetensors --slot 0/3 -o",
            "d1.safetensors",
        ),
        (
            "merge --base base.safetensors d1.safetensors d2.safetensors -o",
            "",
        ),
        ("apply --base base.safetensors d1.safetensors -o", ""),
    ];
    for (k, (line, reference)) in runs.iter().enumerate() {
        let want = if reference.is_empty() {
            let r = format!("ref{k}.safetensors");
            ok_creating(d, &format!("{line} {r}"), &r);
            r
        } else {
            reference.to_string()
        };
        let want_bytes = fs::read(d.join(&want)).unwrap();
        // Suffix rules: `.st` and `.safetensors` are files, even inside a `.st`-looking folder
        // name; the rest (`.delta`, `.st.d`, `st`, no suffix) are folders.
        for out in [format!("task{k}.st"), format!("a.b{k}.st")] {
            ok_creating(d, &format!("{line} {out}"), &out);
            let p = d.join(&out);
            assert!(p.is_file(), "{line} {out}: not a file");
            assert_eq!(
                fs::read(&p).unwrap(),
                want_bytes,
                "{line} {out}: not the bytes of {want}"
            );
        }
        for out in [
            format!("task{k}.delta"),
            format!("task{k}.st.d"),
            format!("st{k}"),
        ] {
            ok_creating(d, &format!("{line} {out}"), &out);
            let p = d.join(&out);
            assert!(p.is_dir(), "{line} {out}: not a folder");
            assert_same_tensors(
                &load_any(&p),
                &tensors_of(&d.join(&want)),
                &format!("{line} {out}"),
            );
        }
    }
}

// ==========================================================================================
// 2. merge
// ==========================================================================================

/// Writes the deltas in folder forms: `d2dir/` sharded (extracted from folders), `d3dir/` a
/// folder holding model.safetensors.
fn delta_folders(d: &Path) {
    ok(
        d,
        "extract --base base --tuned t2 -o d2dir --slot 1/3 --shard-size 6KB",
    );
    assert!(
        d.join("d2dir").join(INDEX).exists(),
        "test design: d2dir should be sharded"
    );
    ok(
        d,
        "extract --base base.safetensors --tuned t3 -o d3dir --slot 2/3",
    );
    assert!(d.join("d3dir").join(SINGLE).exists());
}

fn merge_folder_forms_equal_the_single_file_merge(device: Device) {
    let dir = setup();
    let d = dir.path();
    delta_folders(d);
    ok(
        d,
        &format!(
            "merge --base base.safetensors d1.safetensors d2.safetensors d3.safetensors -o ref.safetensors --device {device}"
        ),
    );
    let (want, want_meta) = read_st(&d.join("ref.safetensors"));
    let extras = base_extras();

    ok_creating(
        d,
        &format!(
            "merge --base base d1.safetensors d2dir d3dir -o m1.safetensors --device {device}"
        ),
        "m1.safetensors",
    );
    let (got, meta) = read_st(&d.join("m1.safetensors"));
    assert_same_tensors(&got, &want, "merge from folders into a file");
    assert_same_metadata(
        &meta,
        &want_meta,
        &["base", "d1", "d2", "d3", "ref", "m1", ".safetensors"],
        "merge from folders into a file",
    );

    // Everything fits 5GB: model.safetensors alone, and the base folder's other files.
    ok_creating(
        d,
        &format!("merge --base base d1.safetensors d2dir d3dir -o m2 --device {device}"),
        "m2",
    );
    assert_folder_output(&d.join("m2"), 5_000_000_000, &want, &extras, "merge -o m2");

    // Sharded: the embedding (51 200 bytes) is larger than the limit and sits alone.
    ok_creating(
        d,
        &format!(
            "merge --base base d1.safetensors d2dir d3dir -o m3 --shard-size 32KB --device {device}"
        ),
        "m3",
    );
    assert!(expected_layout(&want, 32_000).len() >= 3, "test design");
    assert_folder_output(
        &d.join("m3"),
        32_000,
        &want,
        &extras,
        "merge -o m3 --shard-size 32KB",
    );

    // From a single-file base: a folder of shards, nothing else to copy.
    ok_creating(
        d,
        &format!(
            "merge --base base.safetensors d1.safetensors d2dir d3dir -o m4 --shard-size 20000 --device {device}"
        ),
        "m4",
    );
    assert_folder_output(
        &d.join("m4"),
        20_000,
        &want,
        &[],
        "merge -o m4 from a file base",
    );

    // With --dtype f32 the shards are packed by the output's (widened) tensor sizes.
    ok(
        d,
        &format!(
            "merge --base base.safetensors d1.safetensors d2.safetensors d3.safetensors -o ref32.safetensors --dtype f32 --device {device}"
        ),
    );
    let want32 = tensors_of(&d.join("ref32.safetensors"));
    ok_creating(
        d,
        &format!(
            "merge --base base d1.safetensors d2dir d3dir -o m32 --dtype f32 --shard-size 60000 --device {device}"
        ),
        "m32",
    );
    assert_folder_output(
        &d.join("m32"),
        60_000,
        &want32,
        &extras,
        "merge --dtype f32 -o m32",
    );

    // A merged folder is a checkpoint like any other: a base for the next merge.
    ok_creating(
        d,
        &format!("merge --base m3 d1.safetensors -o m5.safetensors --force --device {device}"),
        "m5.safetensors",
    );
}
device_test!(
    merge_folder_forms_equal_the_single_file_merge,
    merge_folder_forms_equal_the_single_file_merge_cpu,
    merge_folder_forms_equal_the_single_file_merge_cuda
);

#[test]
fn the_index_wins_over_model_safetensors() {
    let dir = setup();
    let d = dir.path();
    // A decoy model.safetensors beside the index: a different value in one tensor.
    let mut decoy = base_tensors();
    decoy.get_mut(L0_Q).unwrap().data[0] ^= 0x10;
    write_st(&d.join("base").join(SINGLE), &decoy, &pt_meta());
    ok(
        d,
        "merge --base base.safetensors d1.safetensors d2.safetensors -o ref.safetensors",
    );
    ok_creating(
        d,
        "merge --base base d1.safetensors d2.safetensors -o m",
        "m",
    );
    let want = tensors_of(&d.join("ref.safetensors"));
    // The decoy is a *.safetensors file: not copied.
    assert_folder_output(
        &d.join("m"),
        5_000_000_000,
        &want,
        &base_extras(),
        "index over decoy",
    );
}

#[test]
fn folder_without_weights_is_refused_naming_it() {
    let dir = setup();
    let d = dir.path();
    fs::create_dir(d.join("empty")).unwrap();
    fs::write(d.join("empty").join("config.json"), CONFIG).unwrap();
    fails_writing_nothing(
        d,
        "merge --base empty d1.safetensors -o m",
        "m",
        &["empty"],
        &[],
    );
    fails_writing_nothing(
        d,
        "extract --base base --tuned empty -o x.safetensors",
        "x.safetensors",
        &["empty"],
        &[],
    );
    fails_writing_nothing(d, "apply --base base empty -o a", "a", &["empty"], &[]);
    run(d, "inspect empty").error(&["empty"]);
    run(d, "verify --base base empty").error(&["empty"]);
}

/// A merge that fails once the inputs are read (the base folder does not match the deltas)
/// leaves neither the output folder nor a temporary sibling.
#[test]
fn failed_merge_into_a_folder_leaves_nothing() {
    let dir = setup();
    let d = dir.path();
    let shard3 = d.join("base").join("model-00003-of-00003.safetensors");
    let (mut part, meta) = read_st(&shard3);
    part.get_mut(L1_NORM).unwrap().data[4] ^= 1;
    write_st(&shard3, &part, &meta);
    fails_writing_nothing(
        d,
        "merge --base base d1.safetensors d2.safetensors d3.safetensors -o m --shard-size 20000",
        "m",
        &[L1_NORM],
        &[],
    );
    fails_writing_nothing(
        d,
        "apply --base base d2.safetensors -o a",
        "a",
        &[L1_NORM],
        &[],
    );
}

// ==========================================================================================
// 3. apply
// ==========================================================================================

fn apply_folder_forms_equal_the_single_file_apply(device: Device) {
    let dir = setup();
    let d = dir.path();
    delta_folders(d);
    ok(
        d,
        &format!(
            "apply --base base.safetensors d2.safetensors -o ref.safetensors --device {device}"
        ),
    );
    let want = tensors_of(&d.join("ref.safetensors"));
    ok_creating(
        d,
        &format!("apply --base base d2dir -o a1.safetensors --device {device}"),
        "a1.safetensors",
    );
    assert_same_tensors(
        &tensors_of(&d.join("a1.safetensors")),
        &want,
        "apply into a file",
    );
    ok_creating(
        d,
        &format!("apply --base base d2dir -o a2 --shard-size 40KiB --device {device}"),
        "a2",
    );
    assert_folder_output(&d.join("a2"), 40_960, &want, &base_extras(), "apply -o a2");
}
device_test!(
    apply_folder_forms_equal_the_single_file_apply,
    apply_folder_forms_equal_the_single_file_apply_cpu,
    apply_folder_forms_equal_the_single_file_apply_cuda
);

fn density_one_through_folders_reproduces_the_fine_tune(device: Device) {
    let dir = tmp();
    let d = dir.path();
    make_models(d);
    ok_creating(
        d,
        "extract --base base --tuned t1 -o full --density 1 --shard-size 10000",
        "full",
    );
    assert!(
        d.join("full").join(INDEX).exists(),
        "test design: a sharded delta"
    );
    ok_creating(
        d,
        &format!("apply --base base full -o back --shard-size 30000 --device {device}"),
        "back",
    );
    assert_folder_output(
        &d.join("back"),
        30_000,
        &tuned_tensors(1),
        &base_extras(),
        "apply -o back",
    );
}
device_test!(
    density_one_through_folders_reproduces_the_fine_tune,
    density_one_through_folders_reproduces_the_fine_tune_cpu,
    density_one_through_folders_reproduces_the_fine_tune_cuda
);

// ==========================================================================================
// 4. verify and inspect
// ==========================================================================================

/// `v` without the fields that name or measure files: keys containing "path" or "file", and
/// `stored_bytes`; string values equal to one of `paths` become "<input>".
fn without_file_fields(v: &Value, paths: &[&str]) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| {
                    !(k.contains("path") || k.contains("file") || *k == "stored_bytes")
                })
                .map(|(k, x)| (k.clone(), without_file_fields(x, paths)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(|x| without_file_fields(x, paths)).collect()),
        Value::String(s)
            if paths
                .iter()
                .any(|p| s == p || s.ends_with(&format!("/{p}"))) =>
        {
            json!("<input>")
        }
        other => other.clone(),
    }
}

#[test]
fn verify_accepts_folders_and_reports_as_for_files() {
    let dir = setup();
    let d = dir.path();
    delta_folders(d);
    let want = ok(
        d,
        "verify --json --base base.safetensors d1.safetensors d2.safetensors d3.safetensors",
    )
    .json();
    let got = ok(d, "verify --json --base base d1.safetensors d2dir d3dir").json();
    let paths = [
        "base",
        "base.safetensors",
        "d1.safetensors",
        "d2.safetensors",
        "d3.safetensors",
        "d2dir",
        "d3dir",
    ];
    assert_eq!(
        without_file_fields(&got, &paths),
        without_file_fields(&want, &paths),
        "verify --json, folders vs files"
    );
    let text = ok(d, "verify --base base d1.safetensors d2dir d3dir");
    assert_eq!(text.stdout.matches(": OK against").count(), 3, "{text}");

    // A base folder with one value changed in its third shard: refused, naming the tensor.
    let mut bad = base_tensors();
    bad.get_mut(L1_NORM).unwrap().data[4] ^= 1;
    let shard3 = d.join("base").join("model-00003-of-00003.safetensors");
    let (mut part, meta) = read_st(&shard3);
    part.insert(L1_NORM.into(), bad[L1_NORM].clone());
    write_st(&shard3, &part, &meta);
    // Both deltas are refused (as for files, tests/cli.rs): stderr names them and the base,
    // stdout gives the tensor that differs.
    let out = run(d, "verify --base base d2dir d3dir");
    out.error(&["d2dir", "d3dir", "base"]);
    let differs: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.contains("differs"))
        .collect();
    assert_eq!(differs.len(), 2, "{out}");
    assert!(differs.iter().all(|l| l.contains(L1_NORM)), "{out}");
    let j = run(d, "verify --json --base base d2dir");
    j.error(&["d2dir"]);
    assert_eq!(j.json()[0]["mismatched"], json!([L1_NORM]), "{j}");
}

#[test]
fn inspect_accepts_delta_folders_and_reports_as_for_files() {
    let dir = setup();
    let d = dir.path();
    delta_folders(d);
    ok(
        d,
        "extract --base base --tuned t1 -o d1dir --slot 0/3 --shard-size 8000",
    );
    let want = ok(
        d,
        "inspect --json d1.safetensors d2.safetensors d3.safetensors",
    )
    .json();
    let got = ok(d, "inspect --json d1dir d2dir d3dir").json();
    let paths = [
        "d1.safetensors",
        "d2.safetensors",
        "d3.safetensors",
        "d1dir",
        "d2dir",
        "d3dir",
    ];
    assert_eq!(
        without_file_fields(&got, &paths),
        without_file_fields(&want, &paths),
        "inspect --json, folders vs files"
    );
    // With the base given as a folder too (cosines), when inspect takes --base.
    let with_base = run(d, "inspect --json --base base d1dir d2dir");
    if with_base.code != Some(2) {
        with_base.success();
        let want = ok(
            d,
            "inspect --json --base base.safetensors d1.safetensors d2.safetensors",
        )
        .json();
        assert_eq!(
            without_file_fields(&with_base.json(), &paths),
            without_file_fields(&want, &paths),
            "inspect --json --base, folders vs files"
        );
    }
    // The text report: the same collision lines.
    let lines = |o: &Outcome| -> Vec<String> {
        o.stdout
            .lines()
            .filter(|l| l.contains("collision") || l.contains("seed") || l.contains("density"))
            .map(|l| {
                let mut l = l.to_string();
                for (a, b) in [
                    ("d1dir", "d1.safetensors"),
                    ("d2dir", "d2.safetensors"),
                    ("d3dir", "d3.safetensors"),
                ] {
                    l = l.replace(a, b);
                }
                l
            })
            .collect()
    };
    let t_files = ok(
        d,
        "inspect --summary d1.safetensors d2.safetensors d3.safetensors",
    );
    let t_dirs = ok(d, "inspect --summary d1dir d2dir d3dir");
    assert!(!lines(&t_files).is_empty(), "{t_files}");
    assert_eq!(
        lines(&t_dirs),
        lines(&t_files),
        "inspect text\n{t_dirs}\n{t_files}"
    );
}

// ==========================================================================================
// 5. --shard-size
// ==========================================================================================

#[test]
fn shard_size_accepts_bytes_and_units() {
    let dir = setup();
    let d = dir.path();
    ok(
        d,
        "merge --base base.safetensors d1.safetensors d3.safetensors -o ref.safetensors",
    );
    let want = tensors_of(&d.join("ref.safetensors"));
    let merge = |size: &str, out: &str| {
        ok_creating(
            d,
            &format!(
                "merge --base base d1.safetensors d3.safetensors -o {out} --shard-size {size}"
            ),
            out,
        );
    };
    merge("500MB", "big");
    assert_folder_output(&d.join("big"), 500_000_000, &want, &base_extras(), "500MB");
    merge("2GiB", "huge");
    assert_folder_output(&d.join("huge"), 2 << 30, &want, &base_extras(), "2GiB");
    merge("1000", "tiny");
    assert_folder_output(&d.join("tiny"), 1000, &want, &base_extras(), "1000");
    merge("1024B", "b");
    assert_folder_output(&d.join("b"), 1024, &want, &base_extras(), "1024B");
    // KB (1000) and KiB (1024) must be told apart: pick n where the two layouts differ.
    let n = (2..200u64)
        .find(|n| expected_layout(&want, n * 1000) != expected_layout(&want, n * 1024))
        .expect("test design: some n where nKB and nKiB pack differently");
    merge(&format!("{n}KB"), "kb");
    assert_folder_output(&d.join("kb"), n * 1000, &want, &base_extras(), "KB");
    merge(&format!("{n}KiB"), "kib");
    assert_folder_output(&d.join("kib"), n * 1024, &want, &base_extras(), "KiB");
    merge("1MiB", "mib");
    assert_folder_output(&d.join("mib"), 1 << 20, &want, &base_extras(), "1MiB");
}

#[test]
fn bad_shard_sizes_are_usage_errors() {
    let dir = setup();
    let d = dir.path();
    // Passed as `--shard-size=VALUE`, so that a value like -1 reaches the option's parser
    // rather than being taken for a flag; an empty value too.
    for bad in [
        "abc",
        "12XB",
        "-1",
        "MB",
        "1.2.3GB",
        "5GBB",
        "GiB5",
        "99999999999999GiB",
        "",
    ] {
        let before = entries(d);
        let opt = format!("--shard-size={bad}");
        for args in [
            vec![
                "merge",
                "--base",
                "base",
                "d1.safetensors",
                "-o",
                "out",
                &opt,
            ],
            vec![
                "extract", "--base", "base", "--tuned", "t1", "-o", "out", &opt,
            ],
            vec![
                "apply",
                "--base",
                "base",
                "d1.safetensors",
                "-o",
                "out",
                &opt,
            ],
        ] {
            sotu(d, &args).usage_error(&["shard-size"]);
            assert_eq!(entries(d), before, "{opt}: something was written");
        }
    }
}

/// A byte count beyond what 64 bits hold (2^64) is out of range, hence a bad value; it must not
/// be taken silently as some other size (reading of the contract: "a bad value is a usage
/// error").
#[test]
fn shard_size_beyond_64_bits_is_a_usage_error() {
    let dir = setup();
    let d = dir.path();
    for bad in ["18446744073709551616", "20000000000000000000"] {
        let before = entries(d);
        let opt = format!("--shard-size={bad}");
        sotu(
            d,
            [
                "merge",
                "--base",
                "base",
                "d1.safetensors",
                "-o",
                "out",
                &opt,
            ],
        )
        .usage_error(&["shard-size"]);
        assert_eq!(entries(d), before, "{opt}: something was written");
    }
}

// ==========================================================================================
// 6. Malformed indexes: exit 1, naming the index file and the entry; nothing written
// ==========================================================================================

/// A damage done to the sharded folder `dir` (whose parent is the test folder); returns the
/// names of which the message must give at least one (empty: the index path alone).
type Damage = fn(&Path) -> Vec<String>;

fn read_index(dir: &Path) -> serde_json::Map<String, Value> {
    serde_json::from_slice(&fs::read(dir.join(INDEX)).unwrap()).unwrap()
}

fn write_index(dir: &Path, index: &serde_json::Map<String, Value>) {
    fs::write(dir.join(INDEX), serde_json::to_vec_pretty(index).unwrap()).unwrap();
}

/// The (tensor, shard) pairs of the index, in the index's order.
fn weight_map(dir: &Path) -> Vec<(String, String)> {
    read_index(dir)["weight_map"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect()
}

/// Two different shard files of the folder, and a tensor of the first.
fn two_shards(dir: &Path) -> (String, String, String) {
    let wm = weight_map(dir);
    let (t, a) = wm[0].clone();
    let b = wm
        .iter()
        .find(|(_, s)| *s != a)
        .expect("two shards")
        .1
        .clone();
    (t, a, b)
}

fn damage_absolute(dir: &Path) -> Vec<String> {
    let mut index = read_index(dir);
    let map = index["weight_map"].as_object_mut().unwrap();
    let (t, shard) = {
        let (t, s) = map.iter().next().unwrap();
        (t.clone(), s.as_str().unwrap().to_string())
    };
    // An absolute path to a perfectly good copy of the shard.
    let abs = fs::canonicalize(dir.join(&shard)).unwrap();
    let abs = abs.to_str().unwrap().to_string();
    map.insert(t.clone(), json!(abs));
    write_index(dir, &index);
    vec![t, abs]
}

fn damage_dotdot(dir: &Path) -> Vec<String> {
    let mut index = read_index(dir);
    let map = index["weight_map"].as_object_mut().unwrap();
    let shard = map.values().next().unwrap().as_str().unwrap().to_string();
    // A good copy of the shard outside the folder, reached through "..".
    let outside = dir.parent().unwrap().join(format!("escaped-{shard}"));
    fs::copy(dir.join(&shard), &outside).unwrap();
    let name = format!("../escaped-{shard}");
    let mut tensors = vec![];
    for (t, s) in map.iter_mut() {
        if s.as_str() == Some(&shard) {
            *s = json!(name);
            tensors.push(t.clone());
        }
    }
    write_index(dir, &index);
    fs::remove_file(dir.join(&shard)).unwrap();
    let mut any = tensors;
    any.push(name);
    any
}

/// Reading of the contract: any `..` component is refused ("escapes the folder (absolute path,
/// or a `..` component)"), even one that comes back inside, like `sub/../shard`.
fn damage_inner_dotdot(dir: &Path) -> Vec<String> {
    let mut index = read_index(dir);
    let map = index["weight_map"].as_object_mut().unwrap();
    let shard = map.values().next().unwrap().as_str().unwrap().to_string();
    fs::create_dir(dir.join("sub")).unwrap();
    let name = format!("sub/../{shard}");
    let mut any = vec![name.clone()];
    for (t, s) in map.iter_mut() {
        if s.as_str() == Some(&shard) {
            *s = json!(name);
            any.push(t.clone());
        }
    }
    write_index(dir, &index);
    any
}

fn damage_missing_shard(dir: &Path) -> Vec<String> {
    let (_, a, _) = two_shards(dir);
    fs::remove_file(dir.join(&a)).unwrap();
    vec![a]
}

fn damage_duplicate_key(dir: &Path) -> Vec<String> {
    // The same tensor twice in weight_map, both times with its own shard (a last-wins parser
    // would see nothing wrong).
    let wm = weight_map(dir);
    let (t, s) = wm[0].clone();
    let mut text = String::from("{\"metadata\": {\"total_size\": 1}, \"weight_map\": {");
    text += &format!("{}: {}, ", json!(t), json!(s));
    let body: Vec<String> = wm
        .iter()
        .map(|(k, v)| format!("{}: {}", json!(k), json!(v)))
        .collect();
    text += &body.join(", ");
    text += "}}";
    fs::write(dir.join(INDEX), text).unwrap();
    vec![t]
}

fn damage_in_two_shards(dir: &Path) -> Vec<String> {
    // Tensor t of shard a is also stored in shard b; the index says a.
    let (t, a, b) = two_shards(dir);
    let x = tensors_of(&dir.join(&a))[&t].clone();
    let (mut part, meta) = read_st(&dir.join(&b));
    part.insert(t.clone(), x);
    write_st(&dir.join(&b), &part, &meta);
    vec![t]
}

fn damage_unlisted_tensor(dir: &Path) -> Vec<String> {
    let (_, _, b) = two_shards(dir);
    let (mut part, meta) = read_st(&dir.join(&b));
    let name = "zz.unlisted.weight".to_string();
    part.insert(
        name.clone(),
        T {
            dtype: "F32".into(),
            shape: vec![2],
            data: vec![0; 8],
        },
    );
    write_st(&dir.join(&b), &part, &meta);
    vec![name]
}

fn damage_absent_tensor(dir: &Path) -> Vec<String> {
    let (_, a, _) = two_shards(dir);
    let mut index = read_index(dir);
    let name = "zz.ghost.weight".to_string();
    index["weight_map"]
        .as_object_mut()
        .unwrap()
        .insert(name.clone(), json!(a));
    write_index(dir, &index);
    vec![name]
}

fn damage_wrong_shard(dir: &Path) -> Vec<String> {
    // The index maps tensor t to shard b, but t is in shard a.
    let (t, _, b) = two_shards(dir);
    let mut index = read_index(dir);
    index["weight_map"]
        .as_object_mut()
        .unwrap()
        .insert(t.clone(), json!(b));
    write_index(dir, &index);
    vec![t]
}

fn damage_no_weight_map(dir: &Path) -> Vec<String> {
    let mut index = read_index(dir);
    index.remove("weight_map");
    write_index(dir, &index);
    vec!["weight_map".into()]
}

fn damage_weight_map_not_object(dir: &Path) -> Vec<String> {
    let mut index = read_index(dir);
    let files: Vec<Value> = weight_map(dir).into_iter().map(|(_, s)| json!(s)).collect();
    index.insert("weight_map".into(), Value::Array(files));
    write_index(dir, &index);
    vec!["weight_map".into()]
}

fn damage_invalid_json(dir: &Path) -> Vec<String> {
    let text = fs::read(dir.join(INDEX)).unwrap();
    fs::write(dir.join(INDEX), &text[..text.len() / 2]).unwrap();
    vec![]
}

/// Damages a copy of the base folder (`bad/`) and of a sharded delta folder (`baddelta/`) and
/// checks that every command that reads them fails the same way: exit 1, a message naming
/// `bad/model.safetensors.index.json` and one of the names `damage` returns, nothing written.
fn assert_bad_index_refused(damage: Damage) {
    let dir = setup();
    let d = dir.path();
    ok(
        d,
        "extract --base base --tuned t1 -o gooddelta --slot 0/3 --shard-size 8000",
    );
    // The base folder, copied.
    fs::create_dir(d.join("bad")).unwrap();
    for e in fs::read_dir(d.join("base")).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), d.join("bad").join(e.file_name())).unwrap();
    }
    let any = damage(&d.join("bad"));
    let any: Vec<&str> = any.iter().map(String::as_str).collect();
    let index = format!("bad/{INDEX}");
    let all = [index.as_str()];
    fails_writing_nothing(
        d,
        "merge --base bad d1.safetensors -o out",
        "out",
        &all,
        &any,
    );
    fails_writing_nothing(
        d,
        "merge --base bad d1.safetensors -o out.safetensors",
        "out.safetensors",
        &all,
        &any,
    );
    fails_writing_nothing(
        d,
        "apply --base bad d1.safetensors -o out",
        "out",
        &all,
        &any,
    );
    fails_writing_nothing(
        d,
        "extract --base base --tuned bad -o out --slot 0/3",
        "out",
        &all,
        &any,
    );
    fails_writing_nothing(
        d,
        "extract --base bad --tuned t1 -o out.safetensors --slot 0/3",
        "out.safetensors",
        &all,
        &any,
    );
    run(d, "verify --base bad d1.safetensors").error_any(&all, &any);

    // The same damage to a sharded delta folder.
    fs::rename(d.join("gooddelta"), d.join("bad2")).unwrap();
    let any = damage(&d.join("bad2"));
    let any: Vec<&str> = any.iter().map(String::as_str).collect();
    let index = format!("bad2/{INDEX}");
    let all = [index.as_str()];
    fails_writing_nothing(d, "merge --base base bad2 -o out", "out", &all, &any);
    fails_writing_nothing(
        d,
        "apply --base base bad2 -o out.safetensors",
        "out.safetensors",
        &all,
        &any,
    );
    run(d, "inspect bad2").error_any(&all, &any);
    run(d, "verify --base base bad2").error_any(&all, &any);
}

#[test]
fn index_with_an_absolute_shard_path_is_refused() {
    assert_bad_index_refused(damage_absolute);
}

#[test]
fn index_with_a_dotdot_shard_path_is_refused() {
    assert_bad_index_refused(damage_dotdot);
}

#[test]
fn index_with_a_dotdot_component_inside_the_folder_is_refused() {
    assert_bad_index_refused(damage_inner_dotdot);
}

#[test]
fn index_naming_a_missing_shard_is_refused() {
    assert_bad_index_refused(damage_missing_shard);
}

#[test]
fn index_listing_a_tensor_twice_is_refused() {
    assert_bad_index_refused(damage_duplicate_key);
}

#[test]
fn tensor_stored_in_two_shards_is_refused() {
    assert_bad_index_refused(damage_in_two_shards);
}

#[test]
fn shard_holding_a_tensor_the_index_omits_is_refused() {
    assert_bad_index_refused(damage_unlisted_tensor);
}

#[test]
fn index_listing_a_tensor_its_shard_lacks_is_refused() {
    assert_bad_index_refused(damage_absent_tensor);
}

#[test]
fn index_mapping_a_tensor_to_the_wrong_shard_is_refused() {
    assert_bad_index_refused(damage_wrong_shard);
}

#[test]
fn index_without_weight_map_is_refused() {
    assert_bad_index_refused(damage_no_weight_map);
}

#[test]
fn index_with_a_non_object_weight_map_is_refused() {
    assert_bad_index_refused(damage_weight_map_not_object);
}

#[test]
fn index_that_is_not_json_is_refused() {
    assert_bad_index_refused(damage_invalid_json);
}

// ==========================================================================================
// 7. An output folder that is or holds an input
// ==========================================================================================

#[test]
fn output_folder_that_is_or_holds_an_input_is_refused() {
    let dir = setup();
    let d = dir.path();
    delta_folders(d);
    fs::create_dir(d.join("work")).unwrap();
    fs::copy(
        d.join("d1.safetensors"),
        d.join("work").join("d1.safetensors"),
    )
    .unwrap();
    fs::create_dir(d.join("outer")).unwrap();
    fs::rename(d.join("t3"), d.join("outer").join("t3")).unwrap();
    let cases = [
        // The output is the base folder.
        ("merge --base base d1.safetensors -o base", "base"),
        ("apply --base base d2dir -o base", "base"),
        // The output is a delta folder.
        ("merge --base base d1.safetensors d2dir -o d2dir", "d2dir"),
        // The output folder holds a delta file.
        ("merge --base base work/d1.safetensors -o work", "work"),
        ("apply --base base work/d1.safetensors -o work", "work"),
        // The output folder holds the fine-tune's folder.
        ("extract --base base --tuned outer/t3 -o outer", "outer"),
        // The output is the fine-tune's folder.
        ("extract --base base --tuned t1 -o t1", "t1"),
    ];
    for (line, out) in cases {
        let before = snapshot(d);
        let top = entries(d);
        let o = run(d, line);
        o.error(&[out]);
        assert!(snapshot(d) == before, "an input was touched\n{o}");
        assert_eq!(entries(d), top, "entries left behind\n{o}");
    }
}

// ==========================================================================================
// 8. --json and --quiet with folders
// ==========================================================================================

/// Resolves a path printed by the binary run in `d`.
fn resolve(d: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        d.join(p)
    }
}

/// Checks the common keys of a --json summary of a run in `d` that read `inputs` and wrote the
/// folder or file `out`.
#[track_caller]
fn assert_summary(j: &Value, d: &Path, inputs: &[&str], out: &str) {
    let ins = j["inputs"]
        .as_array()
        .unwrap_or_else(|| panic!("no inputs list: {j}"));
    let ins: Vec<PathBuf> = ins
        .iter()
        .map(|v| fs::canonicalize(resolve(d, v.as_str().expect("a path string"))).unwrap())
        .collect();
    // Every argument is listed itself or through files inside it.
    let mut tensor_bytes = 0u64;
    let mut all_bytes = 0u64;
    for a in inputs {
        let p = fs::canonicalize(d.join(a)).unwrap();
        assert!(
            ins.iter().any(|i| i.starts_with(&p)),
            "input {a} not in {j}"
        );
        tensor_bytes += load_any(&p)
            .values()
            .map(|t| t.data.len() as u64)
            .sum::<u64>();
        all_bytes += snapshot(&p).values().map(|b| b.len() as u64).sum::<u64>();
    }
    let ib = j["input_bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("no input_bytes: {j}"));
    assert!(
        (tensor_bytes..=all_bytes).contains(&ib),
        "input_bytes {ib} outside [{tensor_bytes}, {all_bytes}]: {j}"
    );
    let outdir = fs::canonicalize(d.join(out)).unwrap();
    let outs = j["outputs"]
        .as_array()
        .unwrap_or_else(|| panic!("no outputs list: {j}"));
    let (mut sum, mut sum_st) = (0, 0);
    let mut listed = BTreeSet::new();
    for o in outs {
        let p = fs::canonicalize(resolve(d, o.as_str().expect("a path string")))
            .unwrap_or_else(|e| panic!("output {o} does not exist ({e}): {j}"));
        assert!(p.starts_with(&outdir), "output {o} is not in {out}: {j}");
        let len = fs::metadata(&p).unwrap().len();
        sum += len;
        if p.extension().is_some_and(|e| e == "safetensors") {
            sum_st += len;
        }
        listed.insert(p);
    }
    if outdir.is_dir() {
        for e in entries(&outdir) {
            if e.ends_with(".safetensors") || e == INDEX {
                assert!(listed.contains(&outdir.join(&e)), "{e} not in outputs: {j}");
            }
        }
    } else {
        assert!(listed.contains(&outdir), "{out} not in outputs: {j}");
    }
    // output_bytes: the size of every listed file, or of the listed checkpoint files only
    // (the index and copied files left out); the contract does not say which.
    let ob = j["output_bytes"].as_u64();
    assert!(
        ob == Some(sum) || ob == Some(sum_st),
        "output_bytes is neither {sum} (all listed files) nor {sum_st} (the .safetensors): {j}"
    );
    let s = j["seconds"]
        .as_f64()
        .unwrap_or_else(|| panic!("no seconds: {j}"));
    assert!((0.0..600.0).contains(&s), "seconds: {j}");
}

#[test]
fn json_summaries_list_inputs_and_outputs_with_folders() {
    let dir = setup();
    let d = dir.path();
    delta_folders(d);
    let j = ok(
        d,
        "merge --json --base base d1.safetensors d2dir -o m --shard-size 30000",
    )
    .json();
    assert_summary(&j, d, &["base", "d1.safetensors", "d2dir"], "m");
    let j = ok(
        d,
        "extract --json --base base --tuned t1 -o dx --slot 0/3 --shard-size 8000",
    )
    .json();
    assert_summary(&j, d, &["base", "t1"], "dx");
    let j = ok(d, "apply --json --base base dx -o ax.safetensors").json();
    assert_summary(&j, d, &["base", "dx"], "ax.safetensors");
}

#[test]
fn quiet_runs_print_nothing_with_folders() {
    let dir = setup();
    let d = dir.path();
    for line in [
        "--quiet extract --base base --tuned t1 -o dq --slot 0/3 --shard-size 8000",
        "--quiet merge --base base dq d2.safetensors -o mq --shard-size 30000",
        "--quiet apply --base base dq -o aq",
    ] {
        let o = ok(d, line);
        assert_eq!(o.stdout, "", "{o}");
        assert_eq!(o.stderr, "", "nothing to warn about here\n{o}");
    }
    assert!(d.join("mq").join(INDEX).exists() && d.join("aq").join(SINGLE).exists());
}

// ==========================================================================================
// 9. Bounded memory
// ==========================================================================================

/// A mebibyte, the unit of the bounds below.
const MIB: u64 = 1 << 20;

/// Runs the binary with `args` in `dir`, sampling RssAnon of /proc/PID/status about every
/// millisecond; returns (exit code, stderr, peak RssAnon in bytes).
fn run_sampling_rss(dir: &Path, args: &[&str]) -> (Option<i32>, String, u64) {
    let mut child = Command::new(BIN)
        .current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sotu-delta");
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak_kb = 0u64;
    let mut samples = 0u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Ok(s) = fs::read_to_string(&status_path)
            && let Some(line) = s.lines().find(|l| l.starts_with("RssAnon:"))
        {
            let kb: u64 = line
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            peak_kb = peak_kb.max(kb);
            samples += 1;
        }
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the merge ran past 120 s");
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(samples > 0, "no RssAnon sample taken");
    println!("{samples} RssAnon samples");
    (status.code(), err, peak_kb * 1024)
}

/// Runs the binary with `args` in `dir` ([`run_sampling_rss`]) and asserts that it succeeds and
/// that its peak RssAnon stays within `bound` bytes; `what` names the run in the messages.
fn assert_peak_rss_within(dir: &Path, args: &[&str], bound: u64, what: &str) {
    let (code, err, peak) = run_sampling_rss(dir, args);
    assert_eq!(code, Some(0), "{what} failed: {err}");
    println!(
        "{what}: peak RssAnon {:.1} MiB, bound {:.1} MiB",
        peak as f64 / MIB as f64,
        bound as f64 / MIB as f64
    );
    assert!(
        peak <= bound,
        "{what}: peak RssAnon {peak} bytes > bound {bound} bytes"
    );
}

/// bf16 values in ±[0.5, 1) (finite), quickly.
fn bf16_bytes(numel: usize, seed: u64) -> Vec<u8> {
    let mut v = noise(numel * 2, seed);
    for c in v.chunks_exact_mut(2) {
        let x = (u16::from_le_bytes([c[0], c[1]]) & 0x807f) | 0x3f00;
        c.copy_from_slice(&x.to_le_bytes());
    }
    v
}

#[test]
fn merge_peak_anonymous_memory_stays_within_the_bound() {
    let dir = tmp();
    let d = dir.path();
    // 22 bf16 tensors of 4 MiB ([1024, 2048]) and a few smaller ones: ~90 MiB, > 20 x the
    // largest tensor.
    let mut base = Tensors::new();
    for i in 0..22 {
        base.insert(
            format!("model.layers.{i:02}.mlp.weight"),
            T {
                dtype: "BF16".into(),
                shape: vec![1024, 2048],
                data: bf16_bytes(2 * MIB as usize, i),
            },
        );
    }
    for i in 0..4 {
        base.insert(
            format!("model.layers.{i:02}.norm.weight"),
            T {
                dtype: "BF16".into(),
                shape: vec![256 * 1024],
                data: bf16_bytes(256 * 1024, 100 + i),
            },
        );
    }
    let largest = base.values().map(|t| t.data.len()).max().unwrap();
    let total: usize = base.values().map(|t| t.data.len()).sum();
    assert!(
        total >= 20 * largest,
        "test design: base {total} < 20 x {largest}"
    );
    // The base as a folder of 4 shards, and 3 fine-tunes (single files).
    let all: Vec<String> = base.keys().cloned().collect();
    let shards: Vec<(String, Vec<String>)> = all
        .chunks(all.len().div_ceil(4))
        .enumerate()
        .map(|(i, c)| {
            (
                format!("model-{:05}-of-00004.safetensors", i + 1),
                c.to_vec(),
            )
        })
        .collect();
    let shards: Vec<(&str, Vec<String>)> = shards
        .iter()
        .map(|(f, c)| (f.as_str(), c.clone()))
        .collect();
    write_sharded(&d.join("base"), &base, &shards, &[("config.json", CONFIG)]);
    for k in 1..=3u8 {
        let mut t = base.clone();
        for x in t.values_mut() {
            for c in x.data.chunks_exact_mut(2) {
                c[0] ^= k; // low mantissa bits: finite, a small change everywhere
            }
        }
        write_st(&d.join(format!("t{k}.safetensors")), &t, &Meta::new());
        drop(t);
        ok(
            d,
            &format!(
                "extract --base base --tuned t{k}.safetensors -o d{k}.safetensors --slot {}/3",
                k - 1
            ),
        );
    }
    // Maps are file-backed (not anonymous); positional reads go into buffers that are: the
    // bound holds for both.
    for io in ["mmap", "read"] {
        let args = [
            "--io",
            io,
            "merge",
            "--base",
            "base",
            "d1.safetensors",
            "d2.safetensors",
            "d3.safetensors",
            "-o",
            "merged",
            "--shard-size",
            "20MB",
        ];
        let bound = 64 * MIB + 4 * largest as u64;
        let what = format!(
            "merge --io {io} of 3 deltas onto a {:.1} MiB sharded base (largest tensor {:.1} MiB; bound 64 MiB + 4 x {largest})",
            total as f64 / MIB as f64,
            largest as f64 / MIB as f64,
        );
        assert_peak_rss_within(d, &args, bound, &what);
        // And the result is complete: 20MB shards, every tensor present.
        let index: Value =
            serde_json::from_slice(&fs::read(d.join("merged").join(INDEX)).unwrap()).unwrap();
        assert_eq!(index["weight_map"].as_object().unwrap().len(), base.len());
        assert_eq!(index["metadata"]["total_size"].as_u64(), Some(total as u64));

        // The same merge from the fine-tunes themselves (`--tuned`, their deltas taken as
        // they are read): the same bound, and the same tensors.
        let out = format!("from-tuned-{io}");
        let args = [
            "--io",
            io,
            "merge",
            "--base",
            "base",
            "--tuned",
            "t1.safetensors",
            "--tuned",
            "t2.safetensors",
            "--tuned",
            "t3.safetensors",
            "--slots",
            "-o",
            &out,
            "--shard-size",
            "20MB",
        ];
        let what =
            format!("merge --io {io} --tuned of 3 fine-tunes (bound 64 MiB + 4 x {largest})");
        assert_peak_rss_within(d, &args, bound, &what);
        assert_same_tensors(
            &load_any(&d.join(&out)),
            &load_any(&d.join("merged")),
            "merge --tuned against extract + merge",
        );
    }
}

#[test]
fn merge_methods_peak_anonymous_memory_stays_within_the_bound() {
    // docs/METHODS.md, "Memory": a worker holds T + 3 copies of one tensor in f64 for `ties`;
    // for `iso` and `tsv` 4 copies plus faer's SVD factors and workspace (7 copies at most,
    // for a square matrix), whatever T. With 2 threads and T = 3: 64 MiB + 2 x that.
    let dir = tmp();
    let d = dir.path();
    let (rows, cols) = (512usize, 1024usize);
    let mut base = Tensors::new();
    for i in 0..6 {
        base.insert(
            format!("model.layers.{i:02}.mlp.weight"),
            T {
                dtype: "BF16".into(),
                shape: vec![rows, cols],
                data: bf16_bytes(rows * cols, 200 + i),
            },
        );
    }
    write_st(&d.join("base.safetensors"), &base, &Meta::new());
    for k in 1..=3u8 {
        let mut t = base.clone();
        for x in t.values_mut() {
            for c in x.data.chunks_exact_mut(2) {
                c[0] ^= k.wrapping_mul(c[1]); // a small change of most elements
            }
        }
        write_st(&d.join(format!("t{k}.safetensors")), &t, &Meta::new());
        ok(
            d,
            &format!(
                "extract --base base.safetensors --tuned t{k}.safetensors -o d{k}.safetensors --density 0.34 --seed {k}"
            ),
        );
    }
    let largest_f64 = (rows * cols * 8) as u64;
    let runs = [("ties", 3 + 3), ("iso", 4 + 7), ("tsv", 4 + 7)]
        .into_iter()
        .flat_map(|m| ["mmap", "read"].map(|io| (m, io)));
    for ((method, copies), io) in runs {
        let bound = 64 * MIB + 2 * copies * largest_f64;
        let out = format!("{method}.safetensors");
        let args = [
            "--io",
            io,
            "--threads",
            "2",
            "merge",
            "--method",
            method,
            "--base",
            "base.safetensors",
            "d1.safetensors",
            "d2.safetensors",
            "d3.safetensors",
            "-o",
            &out,
        ];
        let what = format!(
            "merge --io {io} --method {method} of 3 deltas, 6 tensors of {rows}x{cols} ({:.1} MiB in f64 each), 2 threads",
            largest_f64 as f64 / MIB as f64,
        );
        assert_peak_rss_within(d, &args, bound, &what);
    }
}

// ===================================================================================
// 10. --io read: positional reads give the bytes of the memory maps
// ==========================================================================================

/// Every file under `root` by its path relative to `root` (`""` for a file), with its bytes.
fn relative_snapshot(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    snapshot(root)
        .into_iter()
        .map(|(p, b)| (p.strip_prefix(root).unwrap().to_path_buf(), b))
        .collect()
}

/// For every subcommand that reads checkpoints or deltas, on single files, single-file folders
/// and sharded folders: `--io read` writes the files and prints the reports `--io mmap` does.
#[test]
fn io_read_gives_the_bytes_of_mmap_for_every_subcommand() {
    let dir = setup();
    let d = dir.path();
    delta_folders(d);
    let writes = [
        (
            "extract --base base --tuned t1 --slot 0/3 --shard-size 6KB -o",
            "x",
        ),
        (
            "extract --base base.safetensors --tuned t3 --density 0.3 --seed 9 -o",
            "x.st",
        ),
        (
            "merge --base base d1.safetensors d2dir d3dir --shard-size 40KiB -o",
            "m",
        ),
        (
            "merge --base base.safetensors d1.safetensors d2dir --weights 0.5,2 --rescale --dtype f32 -o",
            "m.st",
        ),
        (
            "merge --method ties --base base d1.safetensors d2dir d3dir -o",
            "ties.st",
        ),
        (
            "merge --method iso --base base.safetensors d1.safetensors d3dir -o",
            "iso.st",
        ),
        ("merge --method tsv --base base d2dir d3dir -o", "tsv.st"),
        (
            "merge --base base --tuned t1 d2dir --tuned t3 --density 0.5 --seed 3 --shard-size 40KiB -o",
            "tuned",
        ),
        (
            "merge --method ties --base base.safetensors --tuned t1 --tuned t3 -o",
            "tuned-ties.st",
        ),
        ("apply --base base d2dir -o", "a"),
        (
            "apply --base base.safetensors d1.safetensors --no-rescale -o",
            "a.st",
        ),
    ];
    for (line, out) in writes {
        let (mapped, read) = (format!("mmap-{out}"), format!("read-{out}"));
        ok_creating(d, &format!("--io mmap {line} {mapped}"), &mapped);
        ok_creating(d, &format!("--io read {line} {read}"), &read);
        let (a, b) = (
            relative_snapshot(&d.join(&mapped)),
            relative_snapshot(&d.join(&read)),
        );
        assert!(!a.is_empty(), "{line}: wrote nothing");
        assert_eq!(
            a.keys().collect::<Vec<_>>(),
            b.keys().collect::<Vec<_>>(),
            "{line}: --io read wrote other files"
        );
        // The card and recipe record the command, `--io` and the output's name with it.
        let recorded = [Path::new("README.md"), Path::new("sotu-delta.json")];
        for (k, v) in a.iter().filter(|(k, _)| !recorded.contains(&k.as_path())) {
            assert!(
                b[k] == *v,
                "{line}: --io read wrote other bytes in {}",
                k.display()
            );
        }
        if let Some(r) = a.get(Path::new("sotu-delta.json")) {
            let (ra, rb): (Value, Value) = (
                serde_json::from_slice(r).unwrap(),
                serde_json::from_slice(&b[Path::new("sotu-delta.json")]).unwrap(),
            );
            for k in ["base", "deltas", "parameters"] {
                assert_eq!(ra[k], rb[k], "{line}: the recipes' {k}");
            }
        }
    }
    for line in [
        "inspect --json --base base d1.safetensors d2dir d3dir",
        "inspect --json --subspaces --base base.safetensors d1.safetensors d2dir",
        "verify --json --base base d1.safetensors d2dir d3dir",
    ] {
        let mapped = ok(d, &format!("--io mmap {line}"));
        let read = ok(d, &format!("--io read {line}"));
        assert_eq!(mapped.json(), read.json(), "{line}: the reports differ");
    }
    // Not mmap or read: a usage error.
    run(d, "--io direct verify --base base d1.safetensors").usage_error(&["--io", "direct"]);
}

#[test]
fn lora_apply_peak_anonymous_memory_stays_within_the_bound() {
    // docs/LORA.md: an adapter's product is formed a piece at a time as it is read. Six bf16
    // weights of 2048 x 4096 (16 MiB each; 64 MiB in f64), each adapted at rank 16: holding one
    // whole product in f64 per thread would pass 64 MiB + 4 x 16 MiB with two threads.
    let dir = tmp();
    let d = dir.path();
    let (rows, cols, r) = (2048usize, 4096usize, 16usize);
    let mut base = Tensors::new();
    let mut adapter = Tensors::new();
    for i in 0..6u64 {
        let module = format!("model.layers.{i}.mlp.up_proj");
        base.insert(
            format!("{module}.weight"),
            T {
                dtype: "BF16".into(),
                shape: vec![rows, cols],
                data: bf16_bytes(rows * cols, 300 + i),
            },
        );
        // f32 factors of about ±0.01: ±[0.5, 1) bf16 noise widened and scaled.
        let factor = |n: usize, seed: u64| -> Vec<u8> {
            bf16_bytes(n, seed)
                .chunks_exact(2)
                .flat_map(|c| {
                    let x = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
                    (x * 0.01).to_le_bytes()
                })
                .collect()
        };
        adapter.insert(
            format!("base_model.model.{module}.lora_A.weight"),
            T {
                dtype: "F32".into(),
                shape: vec![r, cols],
                data: factor(r * cols, 400 + i),
            },
        );
        adapter.insert(
            format!("base_model.model.{module}.lora_B.weight"),
            T {
                dtype: "F32".into(),
                shape: vec![rows, r],
                data: factor(rows * r, 500 + i),
            },
        );
    }
    write_st(&d.join("base.safetensors"), &base, &Meta::new());
    fs::create_dir_all(d.join("adapter")).unwrap();
    write_st(
        &d.join("adapter").join("adapter_model.safetensors"),
        &adapter,
        &pt_meta(),
    );
    let config =
        json!({"peft_type": "LORA", "r": r, "lora_alpha": 32, "target_modules": ["up_proj"]});
    fs::write(
        d.join("adapter").join("adapter_config.json"),
        config.to_string(),
    )
    .unwrap();
    let largest = (rows * cols * 2) as u64;
    let bound = 64 * MIB + 4 * largest;
    let args = [
        "--threads",
        "2",
        "apply",
        "--base",
        "base.safetensors",
        "adapter",
        "-o",
        "out.safetensors",
    ];
    let what =
        format!("apply of a rank-{r} adapter onto 6 weights of {rows}x{cols} bf16, 2 threads");
    assert_peak_rss_within(d, &args, bound, &what);
    // Every weight changed.
    let out = tensors_of(&d.join("out.safetensors"));
    for (name, t) in &base {
        assert_ne!(out[name].data, t.data, "{name} was not changed");
    }
}
