"""`merge --config` against docs/MERGEKIT.md (mergekit_ref.py, written from it and from
mergekit's documented semantics).

    SOTU_BIN=target/release/sotu-delta .venv/bin/python -m pytest -q tests/reference/test_mergekit.py

For every method read (task_arithmetic, linear, ties, dare_linear, dare_ties, sotu, iso, tsv) and
their parameters, on the committed fixtures:

- the binary's output is, bit for bit, the reference's translation of the configuration run
  through sotu_ref (ties and the sum methods) or within METHODS.md's tolerance (iso, tsv);
- for mergekit's own methods, it is also within one unit in the last place of the same merge in
  mergekit's order of operations (mergekit_ref.mergekit_order), on at least 99% of the elements;
- the record names the configuration and the seeds used;
- what docs/MERGEKIT.md refuses is refused, naming the key.

mergekit's own output is compared where mergekit can be installed (tests/ecosystem/check_mergekit.py).
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mergekit_ref  # noqa: E402
import sotu_bin  # noqa: E402
import sotu_ref as ref  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FIX = REPO / "fixtures" / "tiny"


def call(*args):
    return sotu_bin.call(*args, timeout=300)


def yaml(config):
    """A configuration as YAML text (JSON is YAML; mergekit reads it with PyYAML too)."""
    return json.dumps(config, indent=1)


def fixture(model, variant="f32"):
    return str(FIX / f"{model}-{variant}.safetensors")


def config_for(method, variant="f32", **over):
    base = fixture("base", variant)
    models = [{"model": base}]
    for k, (w, d) in enumerate([(0.6, 0.5), (0.3, 0.5), (0.4, 0.5)]):
        p = {"weight": w}
        if method not in ("linear", "task_arithmetic"):
            p["density"] = d
        models.append({"model": fixture(f"task{k + 1}", variant), "parameters": p})
    if method == "linear":
        models[0]["parameters"] = {"weight": 0.2}
    config = {"merge_method": method, "base_model": base, "models": models}
    config.update(over)
    return config


CASES = [
    ("task_arithmetic", {}),
    ("task_arithmetic", {"parameters": {"normalize": True, "lambda": 0.5}}),
    ("linear", {}),
    ("ties", {}),
    ("ties", {"parameters": {"normalize": False, "lambda": 1.5}}),
    ("dare_linear", {}),
    ("dare_linear", {"parameters": {"rescale": False, "normalize": True}}),
    ("dare_ties", {}),
    ("dare_ties", {"parameters": {"normalize": True, "lambda": 0.8}}),
    ("sotu", {}),
    ("iso", {"parameters": {"lambda": 1.2}}),
    ("tsv", {}),
]


def _bits(raw, dtype):
    return np.frombuffer(raw, dtype=f"<u{ref.DTYPES[dtype][0]}")


def _ordered(raw, dtype):
    """Float bits mapped to integers in the order of the values (ulps apart = integers apart)."""
    size = ref.DTYPES[dtype][0]
    b = _bits(raw, dtype).astype(np.int64)
    top = np.int64(1) << (8 * size - 1)
    return np.where(b >= top, top - b, b)


@pytest.mark.parametrize("variant", ["f32", "bf16"])
@pytest.mark.parametrize("method,over", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_config_merge_is_the_documented_formula(tmp_path, method, over, variant):
    config = config_for(method, variant, **over)
    if variant == "bf16":
        config["dtype"] = "float32"
        config["out_dtype"] = "bfloat16"
    path = tmp_path / "merge.yml"
    path.write_text(yaml(config))
    out = tmp_path / "out.safetensors"
    proc = call("merge", "--config", path, "-o", out, "--seed", 2411, "--device", "cpu", "-q")
    assert proc.returncode == 0, proc.stderr
    got = ref.read_tensors(out)
    want = mergekit_ref.expected(config, seed=2411)
    assert sorted(got) == sorted(want)
    for name, (dt, shape, data) in want.items():
        g = got[name]
        assert (g[0], tuple(g[1])) == (dt, tuple(shape)), name
        if method in ("iso", "tsv") and dt in ref.FLOAT_DTYPES:
            gb, wb = _ordered(g[2], dt), _ordered(data, dt)
            # METHODS.md: SVD methods within one ulp of the reference, 99% equal.
            diff = np.abs(gb - wb)
            assert diff.max() <= 1 and np.mean(diff == 0) >= 0.99, name
        else:
            assert g[2] == data, f"{method} {over}: {name} differs from docs/MERGEKIT.md's formula"
    # mergekit's own order of operations: the same up to rounding.
    if method in mergekit_ref.NORMALIZE:
        mk = mergekit_ref.mergekit_order(config, seed=2411)
        equal = total = 0
        for name, value in mk.items():
            dt = got[name][0]
            want_bits = _ordered(ref.round_to_bytes(value, dt), dt)
            got_bits = _ordered(got[name][2], dt)
            assert np.abs(got_bits - want_bits).max() <= 1, f"{name}: more than 1 ulp from mergekit's order"
            equal += int(np.sum(got_bits == want_bits))
            total += got_bits.size
        assert equal >= 0.99 * total, f"only {equal} of {total} elements equal mergekit's order"
    meta, _ = ref.read_safetensors(out)
    record = json.loads(meta["sotu_delta"])
    assert record["mergekit"] == {"config": "merge.yml", "merge_method": method}
    assert [d["seed"] for d in record["deltas"]] == [2411, 2412, 2413]


def test_seed_and_slots_choose_the_masks(tmp_path):
    """--seed S masks model t with S + t; --slots with slot t/T of S: the record says so, and the
    result is the extract-then-merge of those masks."""
    config = config_for("dare_linear")
    path = tmp_path / "merge.yml"
    path.write_text(yaml(config))
    out = tmp_path / "a.safetensors"
    proc = call("-v", "merge", "--config", path, "-o", out, "--seed", 7)
    assert proc.returncode == 0, proc.stderr
    assert "seed 7," in proc.stderr and "seed 9," in proc.stderr
    assert ref.read_tensors(out) == mergekit_ref.expected(config, seed=7)
    config = config_for("sotu")
    for m in config["models"][1:]:
        del m["parameters"]["density"]
    path.write_text(yaml(config))
    out = tmp_path / "b.safetensors"
    proc = call("merge", "--config", path, "-o", out, "--slots", "--seed", 5, "-q")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(ref.read_safetensors(out)[0]["sotu_delta"])
    spans = [(d["lo"], d["hi"]) for d in record["deltas"]]
    assert spans == [ref.slot_span(k, 3) for k in range(3)]
    assert {d["seed"] for d in record["deltas"]} == {5}


def test_int8_mask_is_ignored_with_a_warning(tmp_path):
    config = config_for("ties", parameters={"int8_mask": True})
    path = tmp_path / "merge.yml"
    path.write_text(yaml(config))
    proc = call("merge", "--config", path, "-o", tmp_path / "o.safetensors", "-q")
    assert proc.returncode == 0, proc.stderr
    assert "warning" in proc.stderr and "int8_mask" in proc.stderr


def _refused(tmp_path, text, words, code=1, extra=()):
    path = tmp_path / "merge.yml"
    path.write_text(text)
    proc = call("merge", "--config", path, "-o", tmp_path / "o.safetensors", *extra)
    assert proc.returncode == code, proc.stderr
    assert "panicked" not in proc.stderr
    for w in words:
        assert w in proc.stderr, f"the message lacks {w!r}:\n{proc.stderr}"
    assert not (tmp_path / "o.safetensors").exists()


def test_unknown_and_unsupported_keys_are_refused_naming_them(tmp_path):
    base, t1 = fixture("base"), fixture("task1")
    head = f"base_model: {base}\nmodels:\n  - model: {t1}\n    parameters: {{weight: 1}}\n"
    _refused(tmp_path, "merge_method: ties\n" + head + "colour: blue\n", ["colour", "unknown key"])
    _refused(tmp_path, "merge_method: ties\n" + head + "tokenizer_source: base\n", ["tokenizer_source"])
    _refused(tmp_path, "merge_method: ties\n" + head + "slices: []\n", ["slices"])
    _refused(tmp_path, "merge_method: ties\n" + head.replace("weight: 1", "weight: 1, gamma: 0.1"),
             ["models[0].parameters.gamma"])
    _refused(tmp_path, "merge_method: linear\n" + head + "parameters: {lambda: 2}\n", ["parameters.lambda", "linear"])
    _refused(tmp_path, "merge_method: ties\n" + head.replace("weight: 1", "weight: [0, 1]"),
             ["models[0].parameters.weight", "gradient"])
    _refused(tmp_path, "merge_method: della\n" + head, ["della"])
    _refused(tmp_path, "merge_method: ties\n" + head + "dtype: float8\n", ["dtype", "float8"])
    _refused(tmp_path, "merge_method: ties\nmerge_method: ties\n" + head, ["duplicate"])
    _refused(tmp_path, "merge_method: [\n", ["not a valid YAML"])
    # A billion-laughs expansion of aliases is refused by the parser's budget, quickly.
    bomb = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    bomb += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]
    _refused(tmp_path, "\n".join(bomb) + "\nmerge_method: ties\n", ["not a valid YAML", "budget"])


def test_hub_ids_are_refused_with_a_download_hint(tmp_path):
    base, t1 = fixture("base"), fixture("task1")
    _refused(tmp_path, f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
             "  - model: mistralai/Mistral-7B-v0.1\n    parameters: {weight: 1}\n",
             ["mistralai/Mistral-7B-v0.1", "Hugging Face Hub id", "download it first"])
    _refused(tmp_path, f"merge_method: task_arithmetic\nbase_model: org/base\nmodels:\n  - model: {t1}\n",
             ["org/base", "download it first"])


def test_what_docs_refuse_is_refused(tmp_path):
    base, t1, t2 = fixture("base"), fixture("task1"), fixture("task2")
    _refused(tmp_path, f"merge_method: ties\nbase_model: {base}\nmodels:\n"
             f"  - model: {t1}\n    parameters: {{weight: 1, density: 0.5}}\n"
             f"  - model: {t2}\n    parameters: {{weight: 1, density: 0.3}}\n", ["one density"])
    _refused(tmp_path, f"merge_method: dare_ties\nbase_model: {base}\nparameters: {{rescale: false}}\nmodels:\n"
             f"  - model: {t1}\n    parameters: {{weight: 1}}\n  - model: {t2}\n    parameters: {{weight: 1}}\n",
             ["rescale"])
    _refused(tmp_path, f"merge_method: linear\nparameters: {{normalize: false}}\nmodels:\n"
             f"  - model: {t1}\n    parameters: {{weight: 1}}\n  - model: {t2}\n    parameters: {{weight: 1}}\n",
             ["normalize: false", "sum"])
    _refused(tmp_path, f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {t1}\n  - model: {t2}\n",
             ["models[0].parameters.weight", "required"])
    _refused(tmp_path, f"merge_method: ties\nmodels:\n  - model: {t1}\n    parameters: {{weight: 1}}\n",
             ["base_model"])
    _refused(tmp_path, f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
             f"  - model: {t1}+{FIX / 'lora-bf16'}\n    parameters: {{weight: 1}}\n", ["LoRA over"])
    # Options the configuration takes the place of are usage errors.
    text = f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {t1}\n    parameters: {{weight: 1}}\n"
    for extra in (["--base", base], ["--tuned", t1], ["--weights", "1"], ["--method", "ties"], [t1], ["--dtype", "f32"]):
        _refused(tmp_path, text, ["usage error"], code=2, extra=extra)


def test_models_may_be_adapters_and_delta_files(tmp_path):
    """A LoRA adapter (as a folder and as MODEL+LORA over the base) and a delta file among the
    models: the same as the command line's --tuned and positional delta."""
    base = fixture("base", "bf16")
    d = tmp_path / "d.safetensors"
    assert call("extract", "-q", "--base", base, "--tuned", fixture("task2", "bf16"), "-o", d,
                "--density", "0.5", "--seed", 99).returncode == 0
    adapter = FIX / "lora-bf16"
    config = {"merge_method": "task_arithmetic", "base_model": base, "models": [
        {"model": fixture("task1", "bf16"), "parameters": {"weight": 0.5}},
        {"model": str(d), "parameters": {"weight": 0.25}},
        {"model": f"{base}+{adapter}", "parameters": {"weight": 2}},
    ]}
    path = tmp_path / "merge.yml"
    path.write_text(yaml(config))
    out = tmp_path / "got.safetensors"
    proc = call("merge", "--config", path, "-o", out, "-q", "--seed", 3)
    assert proc.returncode == 0, proc.stderr
    want = tmp_path / "want.safetensors"
    proc = call("merge", "--base", base, "--tuned", fixture("task1", "bf16"), d, "--tuned", adapter,
                "--weights", "0.5,0.25,2", "--seed", 3, "-o", want, "-q")
    assert proc.returncode == 0, proc.stderr
    assert ref.read_tensors(out) == ref.read_tensors(want)
