#!/usr/bin/env python3
"""Regenerates the committed seed inputs of the fuzz targets (fuzz/seeds/<target>/).

Run from the repository root, after `cargo build --release`, with the project's virtual
environment (it has numpy and blake3, which the reference needs):

    .venv/bin/python fuzz/make_seeds.py

Seeds come from two writers: the `sotu-delta` binary (`extract` on the committed fixtures, at low
densities so that each seed stays a few KiB) and the independent Python reference
(tests/reference/sotu_ref.py), which can also write chunk sizes other than 65536, so that the
fuzzer starts from files whose tensors span several chunks. A few tiny hand-made deltas cover
what the fixtures lack: F64, a 0-d tensor, an empty tensor, BOOL/I64 whole tensors, NaN and
infinite values, a later minor version with an extra `sotu/` tensor, and a delta with no tensors.
Version 1.1's grown tensors and own files (docs/FORMAT.md sections 12 and 13) come from the
added-tokens fixture folders, through both writers.
Files named regress-* are the inputs of fixed findings (copied from fuzz/artifacts-found/ when
the fix landed, so that every run replays them first); this script leaves them alone.
"""

import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "reference"))
import sotu_ref as ref  # noqa: E402

BIN = os.environ.get("SOTU_BIN", os.path.join(ROOT, "target", "release", "sotu-delta"))
FIX = os.path.join(ROOT, "fixtures", "tiny")
SEEDS = os.path.join(ROOT, "fuzz", "seeds")
READER = os.path.join(SEEDS, "delta_reader")
MERGE = os.path.join(SEEDS, "merge_fuzzed_delta")


def fixture(name):
    return os.path.join(FIX, name + ".safetensors")


def extract(out, base, tuned, *args):
    subprocess.run([BIN, "extract", "-q", "--no-sync", "--base", fixture(base), "--tuned",
                    fixture(tuned), "-o", out, *args], check=True)


def ref_delta(out, base, tuned, lo, hi, chunk, seed=ref.DEFAULT_SEED, slot=None):
    d = ref.extract(base, tuned, seed=seed, lo=lo, hi=hi, chunk=chunk)
    ref.write_delta(out, d, slot=slot)


def t(dtype, values, shape):
    arr = np.asarray(values, dtype=ref.DTYPES[dtype][1]).reshape(shape)
    return ref.Tensor(dtype, tuple(shape), arr.tobytes())


def bf16(values, shape):
    """BF16 bit patterns of f32 values (truncated; fine for seeds)."""
    bits = (np.asarray(values, dtype="<f4").view("<u4") >> 16).astype("<u2")
    return ref.Tensor("BF16", tuple(shape), bits.reshape(shape).tobytes())


def tiny_checkpoints():
    """A small base and fine-tune covering the dtypes and shapes the fixtures lack."""
    rng = np.random.default_rng(7)
    a = rng.standard_normal((3, 5))
    base = {
        "a.f64": t("F64", a, (3, 5)),
        "b.f16": t("F16", [1.0, -2.0, 0.5, 0.0, 3.0, -0.0], (2, 3)),
        "c.bf16": bf16([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0], (9,)),
        "d.scalar": t("F32", [1.5], ()),
        "e.empty": t("F32", [], (0, 4)),
        "f.ids": t("I64", [0, 1, 2, 3], (1, 4)),
        "g.flags": t("BOOL", [1, 0, 1], (3,)),
        "h.same": t("F32", [7.0, 8.0], (2,)),
    }
    tuned = dict(base)
    tuned["a.f64"] = t("F64", a + 0.25, (3, 5))
    tuned["b.f16"] = t("F16", [1.5, np.inf, 0.25, -0.0, np.nan, 1e-7], (2, 3))
    tuned["c.bf16"] = bf16([1.0, 2.5, 3.0, 4.5, 5.0, 6.5, 7.0, 8.5, 9.0], (9,))
    tuned["d.scalar"] = t("F32", [-1.5], ())
    tuned["f.ids"] = t("I64", [3, 2, 1, 0], (1, 4))
    tuned["g.flags"] = t("BOOL", [0, 0, 1], (3,))
    tuned["new.f32"] = t("F32", [0.5, 0.25], (2,))
    return base, tuned


def write_raw(out, tensors, meta):
    ref.write_safetensors(out, tensors, meta)


def bf16_subset():
    """Four tensors of base-bf16 (0-d, I64, two norms), changed, plus a new one: a small delta
    that matches the merge target's base where it speaks (a merge needs `force` to accept it,
    since it omits the other base tensors)."""
    base = ref.read_safetensors(fixture("base-bf16"))[1]
    keep = ["model.logit_scale", "model.norm.weight", "model.position_ids",
            "model.layers.0.input_layernorm.weight"]
    base = {k: base[k] for k in keep}
    tuned = dict(base)
    for k in keep[:2] + keep[3:]:
        bits = np.frombuffer(base[k].data, dtype="<u2") ^ np.uint16(0x0041)
        tuned[k] = ref.Tensor("BF16", base[k].shape, bits.tobytes())
    ids = np.frombuffer(base["model.position_ids"].data, dtype="<i8")[::-1].copy()
    tuned["model.position_ids"] = ref.Tensor("I64", base["model.position_ids"].shape, ids.tobytes())
    tuned["score.bias"] = bf16([0.5, -0.5, 2.0], (3,))
    return base, tuned


def hand_made():
    base, tuned = tiny_checkpoints()
    for d in (READER,):
        # All kinds, all four float dtypes, chunk 4: several chunks per tensor.
        ref_delta(os.path.join(d, "ref-tiny-all-kinds-chunk4.delta.safetensors"), base, tuned,
                  0, ref.TWO32 // 2, 4, seed=1)
        # Keep everything, chunk 1.
        ref_delta(os.path.join(d, "ref-tiny-keep-all-chunk1.delta.safetensors"), base, tuned,
                  0, ref.TWO32, 1, seed=0)

    # A later minor version with an unknown sotu/ tensor and an unknown metadata key (readable).
    d = ref.extract(base, tuned, seed=18446744073709551615, lo=1 << 31, hi=ref.TWO32, chunk=3)
    tmp = os.path.join(READER, "ref-tiny-minor-1.9.delta.safetensors")
    ref.write_delta(tmp, d, slot="1/2")
    meta, tensors = ref.read_safetensors(tmp)
    meta["format_version"] = "1.9"
    meta["future_key"] = "x"
    tensors["sotu/future"] = t("U8", [1, 2, 3], (3,))
    write_raw(tmp, tensors, meta)

    # A delta of an empty checkpoint: no tensors at all, zero-row hashes and stats.
    d = ref.extract({}, {}, lo=0, hi=0, chunk=65536)
    ref.write_delta(os.path.join(READER, "ref-empty.delta.safetensors"), d)


def grown_and_files():
    """Deltas with grown tensors and own files: the binary's from the added-tokens folders, and
    the reference's with small chunks (reader's target only: the merge target's base is another
    model)."""
    fx = os.path.join(FIX, "added-tokens")
    subprocess.run([BIN, "extract", "-q", "--no-sync", "--base", os.path.join(fx, "base"), "--tuned",
                    os.path.join(fx, "tuned"), "-o",
                    os.path.join(READER, "bin-bf16-added-tokens-d0.01.delta.safetensors"),
                    "--density", "0.01"], check=True)
    base = ref.read_checkpoint(os.path.join(fx, "base"))[1]
    tuned = ref.read_checkpoint(os.path.join(fx, "tuned"))[1]
    # The first 8 rows of each tensor the base has, and 2 new rows: a few KiB.
    small = lambda t, rows: ref.Tensor(t.dtype, (rows,) + t.shape[1:],
                                       t.data[:rows * ref.numel(t.shape[1:]) * 2])
    b = {k: small(v, 8) if len(v.shape) == 2 else v for k, v in base.items()}
    t = {k: ref.Tensor(v.dtype, (10,) + v.shape[1:],
                       small(v, 8).data + v.data[2051 * 64:2053 * 64]) if len(v.shape) == 2 else v
         for k, v in tuned.items()}
    d = ref.extract(b, t, seed=4, lo=0, hi=ref.TWO32 // 3, chunk=64)
    d.files = {"config.json": b'{"vocab_size": 10}', "added_tokens.json": b'{"[PAD]": 8}'}
    ref.write_delta(os.path.join(READER, "ref-bf16-grown-files-chunk64.delta.safetensors"), d)


def main():
    if not os.path.exists(BIN):
        sys.exit(f"{BIN} not found: run `cargo build --release` first")
    for d in (READER, MERGE):
        os.makedirs(d, exist_ok=True)
        for f in os.listdir(d):
            # regress-*: inputs of fixed findings (fuzz/artifacts-found), kept as they are.
            if not f.startswith("regress-"):
                os.remove(os.path.join(d, f))

    # Written by the binary against the fixture base that merge_fuzzed_delta embeds
    # (base-bf16): every kind occurs (task1 changes position_ids: whole I64 in the base;
    # task3 adds score.weight: whole, not in the base; logit_scale is the same everywhere).
    for d in (READER, MERGE):
        extract(os.path.join(d, "bin-bf16-task1-d0.01.delta.safetensors"),
                "base-bf16", "task1-bf16", "--density", "0.01")
        extract(os.path.join(d, "bin-bf16-task2-slot1of4-d0.005.delta.safetensors"),
                "base-bf16", "task2-bf16", "--slot", "1/4", "--density", "0.005", "--seed", "9")
        extract(os.path.join(d, "bin-bf16-task3-d0.003-exclude-norms.delta.safetensors"),
                "base-bf16", "task3-bf16", "--density", "0.003", "--exclude", "*norm*")
        extract(os.path.join(d, "bin-bf16-task1-d0.delta.safetensors"),
                "base-bf16", "task1-bf16", "--density", "0")
    # Other dtypes (the reader's target only: merge_fuzzed_delta's base is BF16).
    extract(os.path.join(READER, "bin-f16-task2-slot2of3-d0.004.delta.safetensors"),
            "base-f16", "task2-f16", "--slot", "2/3", "--density", "0.004")
    extract(os.path.join(READER, "bin-f32-task3-d0.002.delta.safetensors"),
            "base-f32", "task3-f32", "--density", "0.002", "--seed", "18446744073709551615")

    # Written by the reference, against base-bf16, with small chunks (many offsets per tensor).
    ref_delta(os.path.join(MERGE, "ref-bf16-task1-d0.01-chunk512.delta.safetensors"),
              fixture("base-bf16"), fixture("task1-bf16"), 0, round(0.01 * ref.TWO32), 512)
    ref_delta(os.path.join(MERGE, "ref-bf16-task3-d0.005-chunk2048.delta.safetensors"),
              fixture("base-bf16"), fixture("task3-bf16"), 3 * ref.TWO32 // 4,
              3 * ref.TWO32 // 4 + round(0.005 * ref.TWO32), 2048, seed=5)

    hand_made()
    grown_and_files()
    base, tuned = bf16_subset()
    for d in (READER, MERGE):
        ref_delta(os.path.join(d, "ref-bf16-subset-chunk5.delta.safetensors"), base, tuned,
                  ref.TWO32 // 3, ref.TWO32, 5, seed=3)

    total = 0
    for d in (READER, MERGE):
        for f in sorted(os.listdir(d)):
            n = os.path.getsize(os.path.join(d, f))
            total += n
            print(f"{n:8d}  {os.path.relpath(os.path.join(d, f), ROOT)}")
    print(f"{total:8d}  total")


if __name__ == "__main__":
    main()
