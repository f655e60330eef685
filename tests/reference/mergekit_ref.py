"""Independent reference for `merge --config` (docs/MERGEKIT.md), written from that page and
from mergekit's documented semantics (mergekit/merge_methods/generalized_task_arithmetic.py,
linear.py, sparsify.py of mergekit 0.1.5):

- `translate` reads a configuration the way docs/MERGEKIT.md section 2 says this tool reads it,
  and `expected` computes the merge it must give, through sotu_ref's merge and methods (this
  tool's documented arithmetic), bit for bit;
- `mergekit_order` computes the same merge in mergekit's own order of operations (the task
  vectors weighted, summed or elected, divided, scaled by lambda, added to the base), in f64 and
  rounded once: the formula that docs/MERGEKIT.md section 3 says this tool's result differs from
  by rounding only.

Fine-tunes here are checkpoints (paths); the masks are sotu_ref's (FORMAT.md section 4), model t
with seed S + t.
"""

import numpy as np

import sotu_ref as ref

GTA = {"task_arithmetic", "ties", "dare_linear", "dare_ties"}
NORMALIZE = {"task_arithmetic": False, "ties": True, "dare_linear": False, "dare_ties": False, "linear": True}


def translate(config):
    """(base, [(path, weight w_t, density d_t)], params) of a configuration, the base model
    skipped by every method but linear (docs/MERGEKIT.md section 2)."""
    method = config["merge_method"]
    base = config.get("base_model") or config["models"][0]["model"]
    params = dict(config.get("parameters") or {})
    models = []
    for m in config["models"]:
        p = m.get("parameters") or {}
        if m["model"] == base and method != "linear":
            continue
        default_w = 1.0 if method in ("sotu", "iso", "tsv") else None
        models.append((m["model"], float(p.get("weight", default_w)), p.get("density")))
    return base, models, params


def _masked(base_path, path, seed, density):
    lo, hi = ref.interval(density=density) if density is not None else (0, ref.TWO32)
    return ref.extract(base_path, path, seed=seed, lo=lo, hi=hi)


def expected(config, seed=ref.DEFAULT_SEED):
    """The tensors `merge --config` must write: {name: (dtype, shape, bytes)}."""
    method = config["merge_method"]
    base, models, params = translate(config)
    normalize = params.get("normalize", NORMALIZE.get(method, True))
    lam = float(params.get("lambda", 1.0))
    out_dtype = config.get("out_dtype") or config.get("dtype")
    out_dtype = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", None: None}[out_dtype]
    # The base model's own term is zero: only its weight counts (linear).
    merged = [(p, w, d) for p, w, d in models if p != base]
    weights = [w for _, w, _ in models]
    W = 0.0
    for w in weights:
        W = W + w
    random = method in ("dare_linear", "dare_ties", "sotu", "iso", "tsv")
    count = len(merged)
    deltas = []
    for t, (p, _, d) in enumerate(merged):
        if random:
            d = d if d is not None else (1.0 / count if method == "sotu" else 1.0)
        else:
            d = None
        deltas.append(_masked(base, p, seed + t, d))
    if method in ("task_arithmetic", "linear", "dare_linear", "sotu"):
        if method == "sotu" or not normalize:
            D = 1.0
        elif method != "linear" and abs(W) < 1e-8:
            D = 1.0
        else:
            D = W
        ws = [w / D * lam for _, w, _ in merged]
        rescale = method == "dare_linear" and params.get("rescale", True) or (method == "sotu" and params.get("rescale", False))
        return ref.merge_method(base, deltas, "sum", weights=ws, rescale=bool(rescale), out_dtype=out_dtype)
    ws = [w for _, w, _ in merged]
    if method in ("ties", "dare_ties"):
        trims = {d if d is not None else 1.0 for _, _, d in merged}
        trim = trims.pop() if method == "ties" else 1.0
        return ref.merge_method(base, deltas, "ties", weights=ws, alpha=lam, trim=trim,
                                out_dtype=out_dtype, normalize=normalize)
    return ref.merge_method(base, deltas, method, weights=ws, alpha=lam, out_dtype=out_dtype)


def mergekit_order(config, seed=ref.DEFAULT_SEED):
    """The same merge in mergekit's order of operations, in f64, rounded once per tensor:
    {name: f64 array} of the float tensors the models change (GTA methods and linear)."""
    method = config["merge_method"]
    base_path, models, params = translate(config)
    _, base = ref.read_safetensors(base_path)
    normalize = params.get("normalize", NORMALIZE[method])
    lam = float(params.get("lambda", 1.0))
    merged = [(p, w, d) for p, w, d in models if p != base_path]
    tuned = [ref.read_safetensors(p)[1] for p, _, _ in merged]
    out = {}
    for name, b in base.items():
        if b.dtype not in ref.FLOAT_DTYPES:
            continue
        bv = ref.to_f64(b.dtype, b.data)
        if method == "linear":
            xs = [bv] * sum(1 for p, _, _ in models if p == base_path) + \
                 [ref.to_f64(t[name].dtype, t[name].data) for t in tuned]
            ws = [w for p, w, _ in models if p == base_path] + [w for _, w, _ in merged]
            res = sum(w * x for w, x in zip(ws, xs))
            if normalize:
                res = res / sum(ws)
            out[name] = res
            continue
        tvs, ws = [], []
        for t, ((p, w, d), tm) in enumerate(zip(merged, tuned)):
            delta = ref.to_f64(tm[name].dtype, tm[name].data) - bv
            if method in ("dare_linear", "dare_ties") and d is not None and d < 1:
                lo, hi = ref.interval(density=d)
                keep = ref.kept_mask(seed + t, name, bv.size, lo, hi)
                delta = np.where(keep, delta, 0.0)
                if params.get("rescale", True):
                    # DARE's rescale by the mask's exact density (docs/MERGEKIT.md section 3).
                    delta = delta * (ref.TWO32 / (hi - lo))
            if method == "ties" and d is not None and d < 1:
                k = max(1, ref.round_half_even(d * bv.size))
                theta = np.sort(np.abs(delta))[::-1][k - 1]
                delta = np.where(np.abs(delta) >= theta, delta, 0.0)
            tvs.append(w * delta)
            ws.append(w)
        if method in ("ties", "dare_ties"):
            sign = np.where(sum(tvs) >= 0, 1.0, -1.0)
            masks = [np.sign(tv) == sign for tv in tvs]
            mixed = sum(tv * m for tv, m in zip(tvs, masks))
            divisor = sum(w * m for w, m in zip(ws, masks))
            divisor = np.where(divisor == 0, 1.0, divisor)
        else:
            mixed = sum(tvs)
            divisor = sum(ws)
            divisor = 1.0 if abs(divisor) < 1e-8 else divisor
        if normalize:
            mixed = mixed / divisor
        out[name] = bv + mixed * lam
    return out
