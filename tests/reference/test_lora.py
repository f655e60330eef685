"""PEFT LoRA adapters against the formula of docs/LORA.md (lora_ref.py, written from it).

    SOTU_BIN=target/release/sotu-delta .venv/bin/python -m pytest -q tests/reference/test_lora.py

Adapters are written here in PEFT's exact layout (lora_ref.write_adapter); the binary reads them
with `extract --tuned ADAPTER`, `apply --base B ADAPTER` and `merge --tuned ADAPTER`:

- the delta `extract` writes at density 1 holds, at every element of an adapted tensor, the value
  of docs/LORA.md section 2 bit for bit (lora_ref.fine_tune), the tensors the adapter stores whole
  as `whole` (cast to the base's dtype), every other tensor as `same`;
- `apply` gives the reference merge (sotu_ref.apply) of that delta, and the fine-tune itself;
- `merge --tuned ADAPTER --density D` gives the bytes of `extract` at D followed by `merge`;
- what docs/LORA.md refuses is refused (exit 1, naming the folder and what is wrong), nothing written.

That PEFT's own merge_and_unload agrees is checked where torch and PEFT can be installed, outside
`make test` (tests/ecosystem/check_peft.py).
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lora_ref  # noqa: E402
import sotu_ref as ref  # noqa: E402
from sotu_bin import call  # noqa: E402
from sotu_bin import run as run_bin  # noqa: E402



def tensor(values, dtype, shape):
    return ref.Tensor(dtype, tuple(shape), ref.round_to_bytes(np.asarray(values, np.float64).ravel(), dtype))


# A Llama-shaped model: adapted projections of several shapes, an embedding, a head saved whole,
# a norm, an integer buffer; and a GPT-2 Conv1D weight (in × out) for fan_in_fan_out.
SHAPES = {
    "model.embed_tokens.weight": (40, 16),
    "model.layers.0.self_attn.q_proj.weight": (16, 16),
    "model.layers.0.self_attn.v_proj.weight": (8, 16),
    "model.layers.1.self_attn.q_proj.weight": (16, 16),
    "model.layers.1.self_attn.v_proj.weight": (8, 16),
    "model.layers.1.mlp.down_proj.weight": (16, 300),
    "model.norm.weight": (16,),
    "score.weight": (3, 16),
    "transformer.h.0.attn.c_attn.weight": (16, 48),
}


def base_model(dtype, seed):
    rng = np.random.default_rng(seed)
    tensors = {name: tensor(rng.normal(0, 0.5, shape), dtype, shape) for name, shape in SHAPES.items()}
    tensors["model.position_ids"] = ref.Tensor("I64", (6,), np.arange(6, dtype="<i8").tobytes())
    return tensors


def adapter_tensors(base, modules, rng, factor_dtype, ranks, embedding=(), transposed=False, scale=0.05):
    """Random A and B (B nonzero, as after training) for each module, rank from `ranks`."""
    out = {}
    for module in modules:
        rows, cols = base[module + ".weight"].shape
        r = ranks.get(module, ranks["*"])
        if module in embedding:
            out[module + ".lora_embedding_A"] = lora_ref.factor(rng.normal(0, scale, (r, rows)), factor_dtype)
            out[module + ".lora_embedding_B"] = lora_ref.factor(rng.normal(0, scale, (cols, r)), factor_dtype)
            continue
        inner, outer = (rows, cols) if transposed else (cols, rows)
        out[module + ".lora_A.weight"] = lora_ref.factor(rng.normal(0, scale, (r, inner)), factor_dtype)
        out[module + ".lora_B.weight"] = lora_ref.factor(rng.normal(0, scale, (outer, r)), factor_dtype)
    return out


ATTN = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
        "model.layers.1.mlp.down_proj"]


def case(tmp_path, name, base_dtype, factor_dtype, rslora=False, patterns=False):
    """A base and one adapter over it; returns (base path, base tensors, adapter folder)."""
    rng = np.random.default_rng(abs(hash((name, base_dtype, factor_dtype))) % 2**32)
    base = base_model(base_dtype, 1)
    base_path = tmp_path / "base.safetensors"
    ref.write_safetensors(base_path, base, {"format": "pt"})
    overrides = {"use_rslora": rslora, "modules_to_save": ["score"]}
    ranks = {"*": 4}
    if patterns:
        # Regular expressions as PEFT matches them; the first match in the file's order wins
        # (PEFT sorts the keys when it saves: "layers\\.1\\..*q_proj" before "q_proj").
        ranks = {"*": 4, "model.layers.1.self_attn.q_proj": 6, "model.layers.0.self_attn.q_proj": 2}
        overrides["rank_pattern"] = {"layers\\.1\\..*q_proj": 6, "q_proj": 2}
        overrides["alpha_pattern"] = {"down_proj": 3.5, "v_proj": 32}
    tensors = adapter_tensors(base, ATTN + ["model.embed_tokens"], rng, factor_dtype, ranks,
                              embedding=("model.embed_tokens",))
    # modules_to_save: the head, whole, in the factors' dtype (cast to the base's on reading).
    tensors["score.weight"] = tensor(rng.normal(0, 1, (3, 16)), factor_dtype, (3, 16))
    config = lora_ref.peft_config(r=4, lora_alpha=16,
                                  target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                                  **overrides)
    folder = tmp_path / "adapter"
    lora_ref.write_adapter(folder, config, tensors)
    return base_path, base, folder


def bits(t):
    return np.frombuffer(t.data, dtype=f"<u{ref.DTYPES[t.dtype][0]}")


def check_extract(base_path, base, folder, tmp_path):
    """extract at density 1 holds the reference fine-tune; apply gives it back."""
    want = lora_ref.fine_tune(base, folder)
    delta_path = tmp_path / "lora.delta.safetensors"
    run_bin("extract", "-q", "--base", base_path, "--tuned", folder, "-o", delta_path, "--density", "1")
    delta = ref.decode_delta(delta_path)
    _, stored = ref.read_safetensors(folder / "adapter_model.safetensors")
    saved = {k[len(lora_ref.PREFIX):] for k in stored if ".lora_" not in k}
    for name, b in base.items():
        e = delta.entries[name]
        w = want[name]
        if name in saved:
            assert e.kind == "whole", name
            assert e.whole.data == w.data, f"{name}: the whole tensor is not the adapter's, cast"
        elif w.data == b.data:
            assert e.kind == "same", name
        else:
            assert e.kind == "masked", name
            assert e.kept == w.numel, name
            got = np.frombuffer(np.ascontiguousarray(e.values).tobytes(), bits(w).dtype)
            bad = np.flatnonzero(got != bits(w))
            assert bad.size == 0, (f"{name}: {bad.size} of {w.numel} values differ from docs/LORA.md "
                                   f"section 2; first at {bad[0]}: {got[bad[0]]:#x} != {bits(w)[bad[0]]:#x}")
    out = tmp_path / "applied.safetensors"
    run_bin("apply", "-q", "--base", base_path, folder, "-o", out)
    got = ref.read_tensors(out)
    assert got == ref.apply(base_path, delta_path), "apply differs from the reference merge of its delta"
    inexact = int(delta.stats[:, 2].sum())
    assert inexact == 0, "test design: a kept value the merge arithmetic cannot give back"
    for name, w in want.items():
        assert got[name] == (w.dtype, w.shape, w.data), f"{name}: apply is not the fine-tune"
    # Positional reads (--io read) form the same product as the memory maps.
    read_delta, read_out = tmp_path / "lora.read.safetensors", tmp_path / "applied.read.safetensors"
    run_bin("--io", "read", "extract", "-q", "--base", base_path, "--tuned", folder, "-o", read_delta,
            "--density", "1")
    assert read_delta.read_bytes() == delta_path.read_bytes(), "extract --io read wrote another delta"
    run_bin("--io", "read", "apply", "-q", "--base", base_path, folder, "-o", read_out)
    assert read_out.read_bytes() == out.read_bytes(), "apply --io read wrote other bytes"
    return delta_path


@pytest.mark.parametrize("base_dtype,factor_dtype", [
    ("BF16", "F32"), ("BF16", "BF16"), ("F16", "F32"), ("F16", "F16"), ("F32", "F32"), ("F32", "BF16"),
])
def test_adapter_is_the_formula(tmp_path, base_dtype, factor_dtype):
    base_path, base, folder = case(tmp_path, "plain", base_dtype, factor_dtype)
    check_extract(base_path, base, folder, tmp_path)


@pytest.mark.parametrize("rslora,patterns", [(True, False), (False, True), (True, True)])
def test_rslora_and_patterns_follow_peft(tmp_path, rslora, patterns):
    base_path, base, folder = case(tmp_path, "patterns", "F32", "F32", rslora=rslora, patterns=patterns)
    check_extract(base_path, base, folder, tmp_path)


def test_fan_in_fan_out_transposes(tmp_path):
    """GPT-2's Conv1D stores its weight in × out: δ = (B·A)ᵀ."""
    rng = np.random.default_rng(5)
    base = base_model("BF16", 2)
    base_path = tmp_path / "base.safetensors"
    ref.write_safetensors(base_path, base, {"format": "pt"})
    tensors = adapter_tensors(base, ["transformer.h.0.attn.c_attn"], rng, "F32", {"*": 3}, transposed=True)
    config = lora_ref.peft_config(r=3, lora_alpha=6, target_modules=["c_attn"], fan_in_fan_out=True)
    folder = tmp_path / "adapter"
    lora_ref.write_adapter(folder, config, tensors)
    check_extract(base_path, base, folder, tmp_path)
    # The same factors read without fan_in_fan_out do not fit the base weight's shape.
    config["fan_in_fan_out"] = False
    lora_ref.write_adapter(folder, config, tensors)
    proc = call("apply", "--base", base_path, folder, "-o", tmp_path / "no.safetensors")
    assert proc.returncode == 1 and "fan_in_fan_out" in proc.stderr, proc.stderr
    assert not (tmp_path / "no.safetensors").exists()


def test_zero_factors_leave_the_base(tmp_path):
    """A freshly initialised adapter (B = 0) changes nothing: every tensor `same`, apply = base."""
    base = base_model("BF16", 3)
    base_path = tmp_path / "base.safetensors"
    ref.write_safetensors(base_path, base, {"format": "pt"})
    rng = np.random.default_rng(1)
    tensors = adapter_tensors(base, ATTN, rng, "F32", {"*": 4})
    for k in tensors:
        if ".lora_B." in k:
            tensors[k] = lora_ref.factor(np.zeros(tensors[k].shape), "F32")
    folder = tmp_path / "adapter"
    lora_ref.write_adapter(folder, lora_ref.peft_config(r=4, lora_alpha=8), tensors)
    run_bin("extract", "-q", "--base", base_path, "--tuned", folder, "-o", tmp_path / "d.safetensors")
    delta = ref.decode_delta(tmp_path / "d.safetensors")
    assert {e.kind for e in delta.entries.values()} == {"same"}
    run_bin("apply", "-q", "--base", base_path, folder, "-o", tmp_path / "out.safetensors")
    assert ref.read_tensors(tmp_path / "out.safetensors") == ref.read_tensors(base_path)


@pytest.mark.parametrize("method", ["sum", "ties", "tsv"])
def test_merge_of_adapters_is_extract_then_merge(tmp_path, method):
    """merge --tuned of two adapters and a full fine-tune, at density 0.5: the bytes of extract
    at that density (seeds S, S+1, S+2) followed by merge."""
    base_path, base, folder = case(tmp_path, "merge", "BF16", "F32")
    rng = np.random.default_rng(9)
    second = tmp_path / "adapter2"
    lora_ref.write_adapter(second, lora_ref.peft_config(r=2, lora_alpha=4),
                           adapter_tensors(base, ATTN, rng, "BF16", {"*": 2}))
    full = {k: (ref.Tensor(t.dtype, t.shape, ref.round_to_bytes(ref.to_f64(t.dtype, t.data) * 1.01, t.dtype))
                if t.dtype == "BF16" else t) for k, t in base.items()}
    full_path = tmp_path / "full.safetensors"
    ref.write_safetensors(full_path, full, {"format": "pt"})
    inputs = [folder, second, full_path]
    deltas = []
    for t, p in enumerate(inputs):
        d = tmp_path / f"d{t}.safetensors"
        run_bin("extract", "-q", "--base", base_path, "--tuned", p, "-o", d, "--density", "0.5", "--seed", 30 + t)
        deltas.append(d)
    run_bin("merge", "-q", "--method", method, "--base", base_path, *deltas, "-o", tmp_path / "want.safetensors")
    tuned = [a for p in inputs for a in ("--tuned", p)]
    run_bin("merge", "-q", "--method", method, "--base", base_path, *tuned, "--density", "0.5", "--seed", 30,
            "-o", tmp_path / "got.safetensors")
    assert ref.read_tensors(tmp_path / "got.safetensors") == ref.read_tensors(tmp_path / "want.safetensors")
    meta, _ = ref.read_safetensors(tmp_path / "got.safetensors")
    record = json.loads(meta["sotu_delta"])
    assert [d.get("input") for d in record["deltas"]] == ["lora", "lora", "fine-tune"]


REFUSALS = [
    ("peft_type IA3", {"peft_type": "IA3"}, None, ["IA3"]),
    ("peft_type LOHA", {"peft_type": "LOHA"}, None, ["LOHA"]),
    ("DoRA", {"use_dora": True}, None, ["use_dora", "DoRA"]),
    ("DoRA vector", {}, ("model.layers.0.self_attn.q_proj.lora_magnitude_vector", (16,)), ["DoRA"]),
    ("lora_bias", {"lora_bias": True}, None, ["lora_bias"]),
    ("PiSSA", {"init_lora_weights": "pissa"}, None, ["init_lora_weights", "PiSSA"]),
    ("layer replication", {"layer_replication": [[0, 1]]}, None, ["layer_replication"]),
    ("rank", {"r": 5}, None, ["model.layers.0.self_attn.q_proj", "rank 5"]),
    ("pattern", {"rank_pattern": {"q_proj(?=x)": 2}}, None, ["rank_pattern", "q_proj(?=x)"]),
    ("lonely factor", {}, ("model.layers.0.mlp.up_proj.lora_A.weight", (4, 16)), ["up_proj", "only one"]),
    ("unknown module", {}, None, ["model.layers.9.self_attn.q_proj.weight"]),
    ("conv", {}, ("model.layers.0.conv.lora_A.weight", (4, 16, 3, 3)), ["conv", "2-D"]),
    ("no prefix", {}, ("q_proj.lora_A.weight", (4, 16)), ["does not begin with base_model.model."]),
]


@pytest.mark.parametrize("what,config,extra,words", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_what_lora_md_refuses_is_refused(tmp_path, what, config, extra, words):
    base = base_model("BF16", 4)
    base_path = tmp_path / "base.safetensors"
    ref.write_safetensors(base_path, base, {"format": "pt"})
    rng = np.random.default_rng(2)
    tensors = adapter_tensors(base, ATTN, rng, "F32", {"*": 4})
    if extra:
        key, shape = extra
        t = lora_ref.factor(rng.normal(0, 0.1, shape), "F32")
        if key.startswith("q_proj"):
            folder = tmp_path / "adapter"
            lora_ref.write_adapter(folder, lora_ref.peft_config(r=4), tensors)
            # Rewrite the weights with one key outside base_model.model.
            raw = {lora_ref.PREFIX + k: v for k, v in tensors.items()}
            raw[key] = t
            ref.write_safetensors(folder / "adapter_model.safetensors", raw, {"format": "pt"})
        else:
            tensors[key] = t
            if what == "conv":
                tensors["model.layers.0.conv.lora_B.weight"] = lora_ref.factor(rng.normal(0, 0.1, (8, 4, 1, 1)), "F32")
    if what == "unknown module":
        rng2 = np.random.default_rng(3)
        tensors["model.layers.9.self_attn.q_proj.lora_A.weight"] = lora_ref.factor(rng2.normal(0, 0.1, (4, 16)), "F32")
        tensors["model.layers.9.self_attn.q_proj.lora_B.weight"] = lora_ref.factor(rng2.normal(0, 0.1, (16, 4)), "F32")
    folder = tmp_path / "adapter"
    if not (extra and extra[0].startswith("q_proj")):
        lora_ref.write_adapter(folder, lora_ref.peft_config(**{"r": 4, **config}), tensors)
    for args in (["apply", "--base", base_path, folder, "-o", tmp_path / "out.safetensors"],
                 ["extract", "--base", base_path, "--tuned", folder, "-o", tmp_path / "out.safetensors"],
                 ["merge", "--base", base_path, "--tuned", folder, "-o", tmp_path / "out.safetensors"]):
        proc = call(*args)
        assert proc.returncode == 1, f"{what}: {args[0]} exited {proc.returncode}\n{proc.stderr}"
        msg = proc.stderr
        assert "panicked" not in msg
        assert str(folder) in msg, f"{what}: the message does not name the adapter\n{msg}"
        for w in words:
            assert w in msg, f"{what}: the message lacks {w!r}\n{msg}"
        assert not (tmp_path / "out.safetensors").exists()
