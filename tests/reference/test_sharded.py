"""Hugging Face folders and shards (issue #3), checked from Python against the binary.

    SOTU_BIN=target/release/sotu-delta .venv/bin/python -m pytest -q tests/reference/test_sharded.py

The contract checked here: a folder output (merge, apply, extract with `-o DIR`) loads with the
`safetensors` package shard by shard, and the union of its shards equals, tensor for tensor
(names, dtypes, shapes, bytes), the single-file output of the same operation; for merge and apply
both also equal the independent numpy reference (sotu_ref.merge) computed from single files.

Each shard is read three ways, which must agree: `safetensors.safe_open(framework="numpy")`
(keys, and the values of every dtype numpy holds), `safetensors.deserialize` (raw bytes of every
tensor, BF16 included, which numpy cannot hold), and the reference's own header parser
(sotu_ref.read_safetensors). Where a model has no BF16, `safetensors.numpy.load_file` must load
every shard. `test_the_comparison_can_fail` shows that a one-byte change is caught.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.numpy
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sotu_ref as ref  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
CONFIG = b'{"architectures": ["LlamaForCausalLM"], "hidden_size": 64}\n'
TOKENIZER = b'{"version": "1.0", "model": {"type": "BPE"}}'


def sotu_bin():
    env = os.environ.get("SOTU_BIN")
    path = Path(env) if env else Path("target/release/sotu-delta")
    path = path if path.is_absolute() else REPO / path
    if not path.exists():
        pytest.fail(f"no binary at {path}: run `cargo build --release` (or point SOTU_BIN at it)")
    return path


def run(cwd, *args):
    proc = subprocess.run([str(sotu_bin()), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=120)
    if proc.returncode != 0:
        pytest.fail(f"`sotu-delta {' '.join(map(str, args))}` exited {proc.returncode}:\n{proc.stderr}")
    return proc


# ---------------------------------------------------------------------------------------------
# A generated model, written with the reference's own writer
# ---------------------------------------------------------------------------------------------

def values(dtype, shape, seed):
    """Finite values of magnitude in [0.5, 1) with random signs, as raw little-endian bytes."""
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    rng = np.random.default_rng(seed)
    if dtype == "I64":
        return np.arange(n, dtype="<i8").tobytes()
    x = (rng.random(n) * 0.5 + 0.5) * np.where(rng.random(n) < 0.5, -1.0, 1.0)
    if dtype == "F32":
        return x.astype("<f4").tobytes()
    if dtype == "F16":
        return x.astype("<f2").tobytes()
    if dtype == "BF16":
        return (x.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
    raise ValueError(dtype)


MIXED = [
    ("lm_head.weight", "BF16", (160, 64)),
    ("model.embed_tokens.weight", "BF16", (400, 64)),  # 51 200 bytes: larger than the shards
    ("model.layers.0.input_layernorm.weight", "F32", (64,)),
    ("model.layers.0.mlp.up_proj.weight", "BF16", (96, 64)),
    ("model.layers.0.self_attn.q_proj.weight", "F16", (64, 64)),
    ("model.layers.0.self_attn.odd", "F16", (7, 3)),
    ("model.layers.1.mlp.up_proj.weight", "F32", (48, 64)),
    ("model.layers.1.self_attn.q_proj.weight", "F16", (64, 64)),
    ("model.norm.weight", "F32", (64,)),
    ("model.position_ids", "I64", (1, 128)),
]
NO_BF16 = [(n, "F16" if d == "BF16" else d, s) for n, d, s in MIXED]


def model(spec, seed):
    return {name: ref.Tensor(dtype, tuple(shape), values(dtype, shape, seed * 100 + i))
            for i, (name, dtype, shape) in enumerate(spec)}


def tuned(base, k):
    """The base with the low bits of about half the elements of every other float tensor changed."""
    rng = np.random.default_rng(1000 + k)
    out = {}
    for i, (name, t) in enumerate(sorted(base.items())):
        data = bytearray(t.data)
        if t.dtype in ref.FLOAT_DTYPES and (i + k) % 2 == 0:
            size = ref.DTYPES[t.dtype][0]
            flips = rng.random(len(data) // size) < 0.5
            for j in np.flatnonzero(flips):
                data[j * size] ^= 1 + int(j % 3)
        out[name] = ref.Tensor(t.dtype, t.shape, bytes(data))
    return out


def write_sharded(folder, tensors, groups, extra=()):
    """A Hugging Face folder: `groups` lists the tensor names of each shard, in shard order."""
    folder.mkdir()
    n = len(groups)
    weight_map = {}
    for i, names in enumerate(groups, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        ref.write_safetensors(folder / fname, {k: tensors[k] for k in names}, {"format": "pt"})
        weight_map.update({k: fname for k in names})
    assert sorted(weight_map) == sorted(tensors)
    total = sum(len(t.data) for t in tensors.values())
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    for name, data in extra:
        (folder / name).write_bytes(data)


def make(tmp_path, spec):
    """base.safetensors and base/ (3 shards, not in name order), t1..t3 .safetensors, t1/ (4 shards)."""
    base = model(spec, 1)
    ref.write_safetensors(tmp_path / "base.safetensors", base, {"format": "pt"})
    names = sorted(base)
    embed = "model.embed_tokens.weight"
    rest = [n for n in names if n != embed]
    write_sharded(tmp_path / "base", base, [[embed], rest[::2], rest[1::2]],
                  [("config.json", CONFIG), ("tokenizer.json", TOKENIZER)])
    for k in (1, 2, 3):
        t = tuned(base, k)
        ref.write_safetensors(tmp_path / f"t{k}.safetensors", t, {"format": "pt"})
        if k == 1:
            write_sharded(tmp_path / "t1", t, [names[j::4] for j in range(4)])
    return base


# ---------------------------------------------------------------------------------------------
# Reading outputs, three ways
# ---------------------------------------------------------------------------------------------

def read_file(path):
    """{name: (dtype, shape, bytes)} of one safetensors file, read by the reference's parser, by
    safetensors.deserialize, and by safe_open (numpy) for every dtype numpy holds; all must agree."""
    own = {k: (t.dtype, tuple(t.shape), bytes(t.data)) for k, t in ref.read_safetensors(path)[1].items()}
    pkg = {name: (info["dtype"], tuple(info["shape"]), bytes(info["data"]))
           for name, info in safetensors.deserialize(Path(path).read_bytes())}
    assert_same(pkg, own, f"{path}: safetensors.deserialize vs the reference parser")
    with safe_open(str(path), framework="numpy") as f:
        assert sorted(f.keys()) == sorted(own), f"{path}: safe_open keys"
        for k in f.keys():
            dtype, shape, data = own[k]
            if dtype == "BF16":
                continue  # numpy has no bfloat16; deserialize gave its raw bytes above
            a = f.get_tensor(k)
            assert tuple(a.shape) == shape, f"{path}: {k}: shape via safe_open"
            assert np.ascontiguousarray(a).tobytes() == data, f"{path}: {k}: bytes via safe_open"
    return own


def read_folder(folder):
    """The union of a folder output's shards, with the index checked against them."""
    folder = Path(folder)
    if (folder / INDEX).exists():
        index = json.loads((folder / INDEX).read_text())
        wm = index["weight_map"]
        files = sorted(set(wm.values()))
        n = len(files)
        assert n >= 2, f"{folder}: an index for a single shard"
        assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)], files
    else:
        wm, files = None, [SINGLE]
    union = {}
    for fname in files:
        part = read_file(folder / fname)
        for k, v in part.items():
            assert k not in union, f"{folder}: {k} in two shards"
            if wm is not None:
                assert wm.get(k) == fname, f"{folder}: {k} is in {fname}, the index says {wm.get(k)}"
            union[k] = v
    if wm is not None:
        assert sorted(wm) == sorted(union), f"{folder}: weight_map vs shards"
        assert index["metadata"]["total_size"] == sum(len(v[2]) for v in union.values())
    return union


def assert_same(got, want, what):
    """got, want: {name: (dtype, shape, bytes)}; bit-exact."""
    assert sorted(got) == sorted(want), f"{what}: tensor names differ: {sorted(set(got) ^ set(want))}"
    for name in sorted(want):
        gd, gs, gb = got[name]
        wd, ws, wb = want[name]
        assert (gd, tuple(gs)) == (wd, tuple(ws)), f"{what}: {name}: {gd}{list(gs)} != {wd}{list(ws)}"
        if bytes(gb) != bytes(wb):
            i = next(j for j, (a, b) in enumerate(zip(gb, wb)) if a != b)
            pytest.fail(f"{what}: {name}: bytes differ, first at byte {i}")


def as_triples(tensors):
    return {k: (v[0], tuple(v[1]), bytes(v[2])) for k, v in tensors.items()}


def shard_count(folder):
    return len(list(Path(folder).glob("model-*-of-*.safetensors")))


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def mixed(tmp_path):
    make(tmp_path, MIXED)
    for k in (1, 2, 3):
        run(tmp_path, "extract", "--base", "base.safetensors", "--tuned", f"t{k}.safetensors",
            "-o", f"d{k}.safetensors", "--slot", f"{k - 1}/3")
    return tmp_path


def test_sharded_merge_loads_and_equals_the_single_file_merge_and_the_reference(mixed):
    d = mixed
    run(d, "extract", "--base", "base", "--tuned", "t1", "-o", "d1dir", "--slot", "0/3",
        "--shard-size", "8000")
    assert (d / "d1dir" / INDEX).exists()
    run(d, "merge", "--base", "base.safetensors", "d1.safetensors", "d2.safetensors",
        "d3.safetensors", "-o", "ref.safetensors")
    run(d, "merge", "--base", "base", "d1dir", "d2.safetensors", "d3.safetensors", "-o", "m",
        "--shard-size", "30000")
    assert shard_count(d / "m") >= 3
    got = read_folder(d / "m")
    single = read_file(d / "ref.safetensors")
    assert_same(got, single, "sharded merge vs single-file merge")
    want = as_triples(ref.merge(d / "base.safetensors",
                                [d / f"d{k}.safetensors" for k in (1, 2, 3)]))
    assert_same(got, want, "sharded merge vs the numpy reference")
    assert (d / "m" / "config.json").read_bytes() == CONFIG
    assert (d / "m" / "tokenizer.json").read_bytes() == TOKENIZER


def test_sharded_delta_is_the_single_file_delta_split(mixed):
    d = mixed
    run(d, "extract", "--base", "base", "--tuned", "t1", "-o", "d1dir", "--slot", "0/3",
        "--shard-size", "8000")
    assert shard_count(d / "d1dir") >= 3
    assert_same(read_folder(d / "d1dir"), read_file(d / "d1.safetensors"),
                "sharded delta vs single-file delta")


def test_sharded_apply_equals_the_reference(mixed):
    d = mixed
    run(d, "apply", "--base", "base", "d2.safetensors", "-o", "a", "--shard-size", "20KB")
    assert shard_count(d / "a") >= 3
    run(d, "apply", "--base", "base.safetensors", "d2.safetensors", "-o", "a.safetensors")
    got = read_folder(d / "a")
    assert_same(got, read_file(d / "a.safetensors"), "sharded apply vs single-file apply")
    assert_same(got, as_triples(ref.apply(d / "base.safetensors", d / "d2.safetensors")),
                "sharded apply vs the numpy reference")


def test_load_file_loads_every_shard_and_their_union_is_the_single_file(tmp_path):
    d = tmp_path
    make(d, NO_BF16)
    for k in (1, 2):
        run(d, "extract", "--base", "base", "--tuned", f"t{k}.safetensors", "-o",
            f"d{k}.safetensors", "--slot", f"{k - 1}/2")
    run(d, "merge", "--base", "base.safetensors", "d1.safetensors", "d2.safetensors",
        "-o", "ref.safetensors")
    run(d, "merge", "--base", "base", "d1.safetensors", "d2.safetensors", "-o", "m",
        "--shard-size", "16KiB")
    shards = sorted((d / "m").glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3
    union = {}
    for s in shards:
        for k, a in safetensors.numpy.load_file(str(s)).items():
            assert k not in union, k
            union[k] = a
    single = safetensors.numpy.load_file(str(d / "ref.safetensors"))
    assert sorted(union) == sorted(single)
    for k, want in single.items():
        got = union[k]
        assert (got.dtype, got.shape) == (want.dtype, want.shape), k
        assert got.tobytes() == want.tobytes(), f"{k}: values differ"
    # And the shards agree with what the three readers see.
    assert_same(read_folder(d / "m"), read_file(d / "ref.safetensors"), "no-bf16 merge")


def test_the_comparison_can_fail(mixed):
    """A one-byte change in one BF16 tensor of one shard must make the comparison fail."""
    d = mixed
    run(d, "merge", "--base", "base.safetensors", "d1.safetensors", "-o", "ref.safetensors")
    run(d, "merge", "--base", "base", "d1.safetensors", "-o", "m", "--shard-size", "30000")
    assert_same(read_folder(d / "m"), read_file(d / "ref.safetensors"), "before the change")
    shutil.copytree(d / "m", d / "m2")
    target = "model.embed_tokens.weight"
    wm = json.loads((d / "m2" / INDEX).read_text())["weight_map"]
    path = d / "m2" / wm[target]
    meta, tensors = ref.read_safetensors(path)
    t = tensors[target]
    data = bytearray(t.data)
    data[len(data) // 2] ^= 0x01
    tensors[target] = ref.Tensor(t.dtype, t.shape, bytes(data))
    ref.write_safetensors(path, tensors, meta)
    with pytest.raises(BaseException) as e:  # pytest.fail raises an Exception subclass (Failed)
        assert_same(read_folder(d / "m2"), read_file(d / "ref.safetensors"), "after the change")
    assert target in str(e.value)
