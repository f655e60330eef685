"""Independent reference for PEFT LoRA adapters, written from docs/LORA.md alone.

- `write_adapter` writes an adapter in PEFT's exact layout: `adapter_config.json` with every
  field of PEFT's LoraConfig (as `save_pretrained` writes it: `json.dumps(..., indent=2,
  sort_keys=True)`), and `adapter_model.safetensors` with `base_model.model.<module>.lora_A.weight`
  / `.lora_B.weight` keys and `{"format": "pt"}` metadata.
- `fine_tune` computes the fine-tune an adapter stands for (docs/LORA.md section 2) in numpy:
  one numpy operation per IEEE operation, the sum over the rank in ascending order, so it is a
  bit-for-bit target for the binary.
"""

import json
import math
import re
from pathlib import Path

import numpy as np

import sotu_ref as ref

PREFIX = "base_model.model."


def peft_config(r=8, lora_alpha=8, target_modules=("q_proj", "v_proj"), **overrides):
    """adapter_config.json as PEFT 0.21 writes it for a LoraConfig (every field, defaults)."""
    config = {
        "alora_invocation_tokens": None,
        "alpha_pattern": {},
        "arrow_config": None,
        "auto_mapping": None,
        "base_model_name_or_path": "base",
        "bias": "none",
        "corda_config": None,
        "ensure_weight_tying": False,
        "eva_config": None,
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": lora_alpha,
        "lora_bias": False,
        "lora_dropout": 0.0,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "peft_type": "LORA",
        "peft_version": "0.21.2",
        "qalora_group_size": 16,
        "r": r,
        "rank_pattern": {},
        "revision": None,
        "target_modules": list(target_modules),
        "target_parameters": None,
        "task_type": "CAUSAL_LM",
        "trainable_token_indices": None,
        "use_dora": False,
        "use_qalora": False,
        "use_rslora": False,
    }
    config.update(overrides)
    return config


def write_adapter(folder, config, tensors):
    """Write an adapter folder. tensors: {key without the base_model.model. prefix: Tensor}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    ref.write_safetensors(folder / "adapter_model.safetensors",
                          {PREFIX + k: t for k, t in tensors.items()}, {"format": "pt"})


def factor(values, dtype):
    """A factor matrix (numpy float64 array) rounded to `dtype`, as a Tensor."""
    values = np.asarray(values, dtype=np.float64)
    return ref.Tensor(dtype, values.shape, ref.round_to_bytes(values.ravel(), dtype))


def _as_matrix(t):
    return ref.to_f64(t.dtype, t.data).reshape(t.shape)


def _pattern_value(patterns, module, default):
    """PEFT's get_pattern_key: the first pattern (in order) with re.match((.*\\.)?(P)$)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def fine_tune(base, folder):
    """The fine-tune that the adapter in `folder` stands for over `base` ({name: Tensor}), as
    {name: Tensor} (docs/LORA.md section 2)."""
    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    _, stored = ref.read_safetensors(folder / "adapter_model.safetensors")
    out = dict(base)
    factors = {}
    for key, t in stored.items():
        assert key.startswith(PREFIX), key
        rest = key[len(PREFIX):]
        m = re.fullmatch(r"(.*)\.lora_(A\.weight|B\.weight|embedding_A|embedding_B)", rest)
        if m is None:
            b = base.get(rest)
            if b is not None and b.dtype != t.dtype:
                t = ref.Tensor(b.dtype, t.shape, ref.round_to_bytes(ref.to_f64(t.dtype, t.data), b.dtype))
            out[rest] = t
            continue
        module, part = m.groups()
        f = factors.setdefault(module, {})
        f["A" if part in ("A.weight", "embedding_A") else "B"] = t
        f["embedding"] = part.startswith("embedding")
    for module, f in sorted(factors.items()):
        a, b = _as_matrix(f["A"]), _as_matrix(f["B"])
        r = a.shape[0]
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8)))
        want_r = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
        assert want_r == r, (module, want_r, r)
        s = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / float(r)
        transposed = f["embedding"] or config.get("fan_in_fan_out", False)
        name = module + ".weight"
        w = base[name]
        rows, cols = w.shape
        p = np.full((rows, cols), -0.0)
        for k in range(r):
            if transposed:
                p = p + a[k, :][:, None] * b[:, k][None, :]   # B[j, k] · A[k, i]
            else:
                p = p + b[:, k][:, None] * a[k, :][None, :]   # B[i, k] · A[k, j]
        delta = (s * p).ravel()
        wv = ref.to_f64(w.dtype, w.data)
        with np.errstate(invalid="ignore", over="ignore"):
            rounded = ref.round_from_f64(wv + delta, w.dtype)
        keep = delta == 0.0
        uint = f"<u{ref.DTYPES[w.dtype][0]}"
        bits = np.where(keep, w.array().view(uint), rounded.view(uint))
        out[name] = ref.Tensor(w.dtype, w.shape, np.ascontiguousarray(bits).tobytes())
    return out
