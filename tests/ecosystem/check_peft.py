"""sotu-delta's reading of PEFT LoRA adapters against PEFT itself (`make check-ecosystem`).

Not part of `make test`: it needs torch, transformers and PEFT (several GB), installed by
`make check-ecosystem` into its own venv. Without them it prints why it is skipped and exits 0.

Tiny models are built from a configuration (nothing is downloaded): a Llama (q_proj, v_proj,
down_proj and the embedding adapted, rank_pattern and alpha_pattern set, lm_head in
modules_to_save) in bf16, f16 and f32, with and without use_rslora; and a GPT-2, whose Conv1D
needs fan_in_fan_out. Each gets random LoRA factors (B nonzero, as after training), is saved with
PEFT's save_pretrained, and merged twice:

- by PEFT: `merge_and_unload()`, its weights saved as safetensors;
- by sotu-delta: `apply --base BASE ADAPTER`.

Tensors no adapter touches must be equal bit for bit, and so must modules_to_save. Adapted
tensors may differ where PEFT's own arithmetic (the r products summed in f32, the change rounded
to the weight's dtype, then added in that dtype) rounds otherwise than docs/LORA.md's single
rounding of the f64 value: each element must lie within that arithmetic's error bound,
2 ulp of max(|W|, |v|, M) + r·2^-23·M with M = s·|B|·|A| (the size of the products, which
cancellation can make far larger than the change), and the share of differing elements is
printed. A wrong scale, rank, pattern or transpose moves elements by about the change itself,
far past the bound. Exit 1 on any violation.

    SOTU_BIN=target/release/sotu-delta target/ecosystem/venv/bin/python tests/ecosystem/check_peft.py
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

try:
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
except ImportError as e:  # the venv of `make check-ecosystem` is missing
    print(f"check_peft: skipped: {e.name or e} is not installed (run `make check-ecosystem`)")
    sys.exit(0)


def binary():
    env = os.environ.get("SOTU_BIN")
    path = Path(env) if env else REPO / "target/release/sotu-delta"
    if not path.is_file():
        sys.exit(f"check_peft: sotu-delta not found at {path}: build it first")
    return str(path)


def llama(dtype):
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(dtype)


def gpt2(dtype):
    config = GPT2Config(vocab_size=96, n_positions=32, n_embd=48, n_layer=2, n_head=4)
    return GPT2LMHeadModel(config).to(dtype)


def randomize(peft_model, seed):
    """Trained-like factors: PEFT initialises B to zero, which would make the merge trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.05).to(p.dtype))


def ulps(a, b, dtype):
    """Distance in units in the last place between two tensors of one float dtype (as ints)."""
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[dtype]
    ia, ib = a.view(bits).to(torch.int64), b.view(bits).to(torch.int64)
    # Map sign-magnitude to a monotone integer line.
    top = 1 << (8 * a.element_size() - 1)
    ia = torch.where(ia < 0, -(ia + top), ia)
    ib = torch.where(ib < 0, -(ib + top), ib)
    return (ia - ib).abs()


def magnitudes(peft_model):
    """For each adapted weight, s·(|B|·|A|) in f64 (transposed like the change): the size of the
    products PEFT sums, which bounds its f32 rounding error under cancellation."""
    out = {}
    for name, module in peft_model.named_modules():
        key = name.removeprefix("base_model.model.") + ".weight"
        if hasattr(module, "lora_embedding_A") and "default" in module.lora_embedding_A:
            a, b = module.lora_embedding_A["default"], module.lora_embedding_B["default"]
            transposed = True
        elif hasattr(module, "lora_A") and "default" in module.lora_A:
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            transposed = module.fan_in_fan_out
        else:
            continue
        m = module.scaling["default"] * (b.detach().double().abs() @ a.detach().double().abs())
        out[key] = (m.T if transposed else m, a.shape[0])
    return out


def ulp(x, dtype):
    """The spacing of `dtype` at |x| (x: f64 tensor), normal range."""
    p = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[dtype]
    return torch.ldexp(torch.ones_like(x), torch.frexp(x.abs().clamp_min(1e-30)).exponent - 1 - p)


def run_case(name, make, dtype, lora_kwargs, seed, tmp):
    torch.manual_seed(seed)
    model = make(dtype)
    base_dir, adapter_dir, merged_dir = tmp / f"{name}-base", tmp / f"{name}-adapter", tmp / f"{name}-merged"
    model.save_pretrained(base_dir, safe_serialization=True)
    peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
    randomize(peft_model, seed)
    peft_model.save_pretrained(adapter_dir)
    sizes = magnitudes(peft_model)
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(merged_dir, safe_serialization=True)
    ours = tmp / f"{name}-ours.safetensors"
    proc = subprocess.run([binary(), "apply", "-q", "--base", base_dir, adapter_dir, "-o", ours],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{name}: sotu-delta apply failed:\n{proc.stderr}")
        return False
    want = load_file(merged_dir / "model.safetensors")
    base = load_file(base_dir / "model.safetensors")
    got = load_file(ours)
    ok = True
    if sorted(got) != sorted(want):
        print(f"{name}: tensor names differ: {sorted(set(got) ^ set(want))}")
        return False
    changed = differ = 0
    worst = 0.0
    for key in sorted(want):
        g, w, b = got[key], want[key], base[key]
        if g.dtype != w.dtype or g.shape != w.shape:
            print(f"{name}: {key}: {g.dtype}{list(g.shape)} against PEFT's {w.dtype}{list(w.shape)}")
            ok = False
            continue
        if not g.is_floating_point():
            ok &= torch.equal(g, w)
            continue
        n_diff = int((g != w).sum())
        if key not in sizes:
            if n_diff:
                print(f"{name}: {key}: not adapted, yet {n_diff} element(s) differ from PEFT's")
                ok = False
            continue
        changed += w.numel()
        differ += n_diff
        # PEFT rounds twice in the dtype (the change, then the sum) where docs/LORA.md rounds
        # once, and sums the r products in f32: |ours − PEFT| ≤ 2 ulp of the largest of |W|,
        # |v| and M = s·|B|·|A|, plus r · 2^-23 · M.
        m, r = sizes[key]
        bd, gd, wd = b.double(), g.double(), w.double()
        mag = torch.maximum(torch.maximum(bd.abs(), gd.abs()), m)
        bound = 2 * ulp(mag, dtype) + r * 2.0**-23 * m
        excess = (gd - wd).abs() / bound
        worst = max(worst, float(excess.max()))
        if float(excess.max()) > 1:
            print(f"{name}: {key}: {int((excess > 1).sum())} element(s) beyond the rounding bound "
                  f"from PEFT's (worst {float(excess.max()):.2f} x the bound)")
            ok = False
    share = differ / max(changed, 1)
    print(f"{name}: {changed} adapted elements, {differ} ({100 * share:.3f}%) differ from PEFT's "
          f"merge_and_unload, all within the rounding bound (worst {worst:.2f} x); every other tensor "
          f"bit for bit: {'ok' if ok else 'FAILED'}")
    return ok


def main():
    torch.set_num_threads(1)
    llama_lora = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                      rank_pattern={"layers\\.1\\..*q_proj": 4}, alpha_pattern={"down_proj": 24},
                      modules_to_save=["lm_head"])
    gpt2_lora = dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    ok = True
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            short = str(dtype).removeprefix("torch.")
            for rslora in (False, True):
                ok &= run_case(f"llama-{short}{'-rslora' if rslora else ''}", llama, dtype,
                               dict(llama_lora, use_rslora=rslora), 1, tmp)
            ok &= run_case(f"gpt2-{short}-fan_in_fan_out", gpt2, dtype, gpt2_lora, 2, tmp)
    print("check_peft:", "passed" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
