#!/usr/bin/env python3
"""`make bench-methods`: the speed of each merge method (docs/METHODS.md) against `sum`, and of
the SVD methods against the machine's measured matrix-multiply rate, their physical limit.

On the bench's synthetic Llama-shaped bf16 model (`--size small`: 4 layers, the default here;
`--size tinyllama`: the 1.1B model, where `tsv` takes about a quarter of an hour on 2 cores),
with three fine-tunes extracted at density 1/3 with independent seeds (cached under target/bench/methods/),
it times `merge --method M` for sum, ties, iso and tsv (page cache warm, --no-sync), each run
`--runs` times, and prints the median time, its ratio to `sum`, CPU seconds and peak RssAnon.

For iso and tsv it also counts the floating-point operations of their algorithm from the model's
shapes (`sotu-linalgbench shapes`, which applies merge::methods::tsv_flops and iso_flops: the Gram
route of docs/METHODS.md, "Speed"), and divides by the merge's whole wall time: a lower bound on
the rate of the decomposition phase, printed against the rate `sotu-linalgbench` measures for
f64 matrix products on every thread at once (each thread on its own, as the methods run).
Standard library only.
"""

import argparse
import json
import statistics
import struct
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import BIN, ROOT, bench_data, timed, warm  # noqa: E402


def method_flops(method, shapes):
    """Flops of `iso` or `tsv` (3 deltas) over the 2-D tensors `shapes`, by the binary's count."""
    unique = sorted(set(shapes))
    out = subprocess.run([BIN / "sotu-linalgbench", "shapes", *(f"{r}x{c}" for r, c in unique)],
                         check=True, capture_output=True, text=True).stdout
    per_shape = {tuple(d["shape"]): d[f"{method}_gflop"] * 1e9 for d in map(json.loads, out.splitlines())}
    return sum(per_shape[s] for s in shapes)


def shapes_2d(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return [tuple(v["shape"]) for k, v in header.items()
            if k != "__metadata__" and len(v["shape"]) == 2 and v["dtype"] in ("BF16", "F16", "F32", "F64")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=["small", "tinyllama"], default="small")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--methods", default="sum,ties,iso,tsv")
    args = ap.parse_args()

    data = bench_data(args.size)
    work = ROOT / "target" / "bench" / "methods" / args.size
    work.mkdir(parents=True, exist_ok=True)
    base = data / "base.safetensors"
    sd = [BIN / "sotu-delta", "-q", "--no-sync"]
    deltas = []
    for k in (1, 2, 3):
        d = work / f"d{k}.safetensors"
        if not d.exists():
            subprocess.run(sd + ["extract", "--base", base, "--tuned", data / f"tune{k}.safetensors",
                                 "--density", "0.3333", "--seed", str(k), "-o", d], check=True)
        deltas.append(d)

    mm = json.loads(subprocess.run([BIN / "sotu-linalgbench"], check=True, capture_output=True,
                                   text=True).stdout)
    shapes = shapes_2d(base)
    out = work / "merged.safetensors"
    rows = []
    for method in args.methods.split(","):
        times, cpus, peaks = [], [], []
        for _ in range(args.runs):
            warm(base, *deltas)
            t, peak, cpu = timed(sd + ["merge", "--method", method, "--base", base, *deltas, "-o", out])
            times.append(t)
            cpus.append(cpu)
            peaks.append(peak)
            out.unlink()
        row = {"method": method, "median_s": statistics.median(times), "cpu_s": statistics.median(cpus),
               "peak_rss_anon_bytes": max(peaks), "times_s": times}
        if method in ("iso", "tsv"):
            row["gflop"] = method_flops(method, shapes) / 1e9
            row["gflops"] = row["gflop"] / row["median_s"]
        rows.append(row)
        print(f"  {method}: {row['median_s']:.1f} s", flush=True)

    sum_s = next((r["median_s"] for r in rows if r["method"] == "sum"), None)
    print(f"\nsotu-delta merge methods: {args.size} bf16 ({base.stat().st_size / 1e9:.2f} GB base, "
          f"{len(shapes)} matrices), 3 deltas at 1/3 with independent seeds, {mm['threads']} threads")
    print(f"f64 matrix-multiply rate (sotu-linalgbench, {mm['threads']} threads, each on its own): "
          f"{mm['gflops']:.1f} GFLOP/s")
    print(f"{'method':8} {'median s':>9} {'x sum':>7} {'cpu s':>8} {'peak RssAnon':>13} {'GFLOP':>8} "
          f"{'GFLOP/s':>8} {'x matmul':>9}")
    for r in rows:
        ratio = f"{r['median_s'] / sum_s:7.1f}" if sum_s else "    n/a"
        extra = (f" {r['gflop']:8.0f} {r['gflops']:8.1f} {r['gflops'] / mm['gflops']:9.2f}"
                 if "gflops" in r else "")
        print(f"{r['method']:8} {r['median_s']:9.2f} {ratio} {r['cpu_s']:8.1f} "
              f"{r['peak_rss_anon_bytes'] / 2**20:9.1f} MiB{extra}")
    result = {"size": args.size, "matmul": mm, "rows": rows}
    path = ROOT / "target" / "bench" / f"methods-{args.size}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
