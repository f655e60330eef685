"""`merge --config` against mergekit itself (`make check-ecosystem`).

Not part of `make test`: it needs mergekit, torch and transformers (several GB), installed by
`make check-ecosystem` into its own venv. Without them it prints why it is skipped and exits 0.

A tiny Llama (built from a configuration, nothing downloaded) and three fine-tunes of it (every
weight moved a little) are saved as model folders, in float32 and in bfloat16. Each configuration
is then merged by mergekit 0.1.5 (`mergekit-yaml`, on the CPU) and by `sotu-delta merge --config`,
and every output tensor is compared. mergekit computes in the merge dtype, rounding after each
operation, where sotu-delta reads the inputs exactly and rounds once (docs/MERGEKIT.md section 3),
so they may differ by rounding: each element must lie within the rounding error of mergekit's own
arithmetic, a few units in the last place of the largest term it sums (bounded below), and the
share of elements that differ is printed. For ties, an element on which the two decide otherwise, in the trim
(mergekit ranks the differences as rounded to the merge dtype, floors the count and breaks ties
arbitrarily) or in the sign election (a sum near zero), may differ by a whole change; those are
counted apart, and every element beyond the rounding bound must be one of them. Methods with random masks (dare_*) are not compared:
their masks differ by design (docs/MERGEKIT.md section 3).

    SOTU_BIN=target/release/sotu-delta target/ecosystem/venv/bin/python tests/ecosystem/check_mergekit.py
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

try:
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM
except ImportError as e:
    print(f"check_mergekit: skipped: {e.name or e} is not installed (run `make check-ecosystem`)")
    sys.exit(0)

MERGEKIT = Path(sys.executable).parent / "mergekit-yaml"
if not MERGEKIT.exists():
    print(f"check_mergekit: skipped: mergekit is not installed ({MERGEKIT} is missing; run `make check-ecosystem`)")
    sys.exit(0)


def binary():
    env = os.environ.get("SOTU_BIN")
    path = Path(env) if env else REPO / "target/release/sotu-delta"
    if not path.is_file():
        sys.exit(f"check_mergekit: sotu-delta not found at {path}: build it first")
    return str(path)


def models(tmp, dtype):
    torch.manual_seed(11)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    base = LlamaForCausalLM(config).to(dtype)
    short = str(dtype).removeprefix("torch.")
    paths = [tmp / f"base-{short}"]
    base.save_pretrained(paths[0], safe_serialization=True)
    for k in range(3):
        tuned = LlamaForCausalLM(config).to(dtype)
        tuned.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in tuned.parameters():
                p.add_((torch.randn(p.shape) * 0.01).to(dtype))
        paths.append(tmp / f"task{k}-{short}")
        tuned.save_pretrained(paths[-1], safe_serialization=True)
    return paths


def configs(paths, dtype):
    base, tasks = str(paths[0]), [str(p) for p in paths[1:]]
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    out = {}
    w = [0.5, 0.3, 0.4]
    out["linear"] = {"merge_method": "linear", "dtype": name,
                     "models": [{"model": t, "parameters": {"weight": x}} for t, x in zip(tasks, w)]}
    for normalize, lam in ((False, 1.0), (True, 0.7)):
        out[f"task_arithmetic-normalize-{normalize}"] = {
            "merge_method": "task_arithmetic", "base_model": base, "dtype": name,
            "parameters": {"normalize": normalize, "lambda": lam},
            "models": [{"model": base}] + [{"model": t, "parameters": {"weight": x}} for t, x in zip(tasks, w)]}
    for normalize in (True, False):
        out[f"ties-normalize-{normalize}"] = {
            "merge_method": "ties", "base_model": base, "dtype": name,
            "parameters": {"normalize": normalize},
            "models": [{"model": t, "parameters": {"weight": x, "density": 0.5}} for t, x in zip(tasks, w)]}
    return out


def ulp(x, dtype):
    p = {torch.bfloat16: 7, torch.float32: 23}[dtype]
    return torch.ldexp(torch.ones_like(x), torch.frexp(x.abs().clamp_min(1e-30)).exponent - 1 - p)


def ties_disagreements(key, loaded, density, weights):
    """Where the two TIES merges may decide differently for some task: the trim (this tool ranks
    the exact differences, docs/METHODS.md; mergekit ranks them as computed in the merge dtype,
    floors the count and breaks ties at the threshold arbitrarily, docs/MERGEKIT.md section 3),
    or the elected sign (a sum near zero, formed exactly here and in the merge dtype there)."""
    base = loaded[0][key]
    shape, n = base.shape, base.numel()
    out = torch.zeros(n, dtype=torch.bool)
    s_exact = torch.zeros(n, dtype=torch.float64)
    trimmed_mk = []
    for tuned, w in zip(loaded[1:], weights):
        exact = (tuned[key].double() - base.double()).flatten()
        rounded = (tuned[key] - base).flatten()  # in the merge dtype, as mergekit forms it
        k_ours = max(1, round(density * n))
        k_mk = int(density * n)
        theta = exact.abs().sort(descending=True).values[k_ours - 1]
        theta_mk = rounded.double().abs().sort(descending=True).values[k_mk - 1]
        ours = exact.abs() >= theta
        theirs = rounded.double().abs() > theta_mk
        out |= (ours != theirs) | (rounded.double().abs() == theta_mk)
        s_exact += w * torch.where(ours, exact, 0.0)
        # mergekit's weights are a tensor of the merge dtype: the product rounds there too.
        w_mk = torch.tensor(w, dtype=rounded.dtype)
        trimmed_mk.append(torch.where(theirs, rounded, torch.zeros_like(rounded)) * w_mk)
    s_mk = torch.stack(trimmed_mk).sum(dim=0).double()
    out |= (s_exact >= 0) != (s_mk >= 0)
    return out.reshape(shape)


def compare(name, got_path, want_dir, inputs, dtype, ties_density=None, weights=None):
    want = {}
    for f in sorted(Path(want_dir).glob("*.safetensors")):
        want.update(load_file(f))
    got = load_file(got_path)
    if sorted(got) != sorted(want):
        print(f"{name}: tensor names differ: {sorted(set(got) ^ set(want))}")
        return False
    loaded = [{} for _ in inputs]
    for i, p in enumerate(inputs):
        loaded[i] = load_file(Path(p) / "model.safetensors")
    ok, total, differ, worst, trimmed = True, 0, 0, 0.0, 0
    for key in sorted(want):
        g, w = got[key].double(), want[key].double()
        # The largest term mergekit's arithmetic holds at each element: the inputs (and their
        # differences, which are no larger than twice them).
        mag = torch.stack([l[key].double().abs() for l in loaded]).amax(0) * 2
        mag = torch.maximum(mag, w.abs())
        # Several roundings in the merge dtype: a handful of its ulps of that size.
        bound = 8 * ulp(mag, dtype)
        ratio = (g - w).abs() / bound
        if ties_density is not None:
            # An element the two decide differently for may differ by a whole change.
            explained = ties_disagreements(key, loaded, ties_density, weights)
            trimmed += int(((ratio > 1) & explained).sum())
            ratio = torch.where(explained, 0.0, ratio)
        beyond = ratio > 1
        worst = max(worst, float(ratio.max()))
        total += g.numel()
        differ += int((g != w).sum())
        if bool(beyond.any()):
            print(f"{name}: {key}: {int(((g - w).abs() > bound).sum())} element(s) beyond mergekit's rounding error")
            ok = False
    trims = f", {trimmed} more where the trim or the sign election decides otherwise" if ties_density is not None else ""
    print(f"{name}: {total} elements, {differ} ({100 * differ / total:.2f}%) differ from mergekit's, "
          f"worst {worst:.3f} of the rounding bound{trims}: {'ok' if ok else 'FAILED'}")
    return ok


def main():
    ok = True
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        for dtype in (torch.float32, torch.bfloat16):
            paths = models(tmp, dtype)
            for name, config in configs(paths, dtype).items():
                label = f"{name}-{str(dtype).removeprefix('torch.')}"
                yml = tmp / f"{label}.yml"
                yml.write_text(json.dumps(config, indent=1))
                mk_out = tmp / f"{label}-mergekit"
                proc = subprocess.run([str(MERGEKIT), str(yml), str(mk_out), "--random-seed", "1",
                                       "--no-copy-tokenizer", "--no-write-model-card"],
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"{label}: mergekit failed:\n{proc.stderr[-2000:]}")
                    ok = False
                    continue
                ours = tmp / f"{label}-ours.safetensors"
                proc = subprocess.run([binary(), "merge", "-q", "--config", str(yml), "-o", str(ours)],
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"{label}: sotu-delta merge --config failed:\n{proc.stderr}")
                    ok = False
                    continue
                density = config["models"][0]["parameters"]["density"] if name.startswith("ties") else None
                weights = [m["parameters"]["weight"] for m in config["models"] if "parameters" in m]
                ok &= compare(label, ours, mk_out, paths, dtype, density, weights)
                shutil.rmtree(mk_out)
    print("check_mergekit:", "passed" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
