#!/usr/bin/env python3
"""`make bench-gpu`: the CUDA backend against its floors, on a machine with a GPU.

1. Kernel: `sotu-gpubench` times the merge kernel (3 masked deltas in disjoint slots, bf16,
   2^28 elements, all resident on the device) with CUDA events, and a device-to-device copy of
   the base (bytes read + written). It reports the kernel's effective bandwidth (base in, kept
   values in, offsets and ranks in, output out) as a ratio to the copy's. Target: >= 0.85.
2. End to end: merge of 3 slot deltas onto a synthetic Llama-shaped bf16 checkpoint
   (`sotu-synth`, cached under target/bench/data/), `--device cuda` against `--device cpu` on
   this machine, page cache warm, --no-sync, median of --runs. Target: CUDA faster. The two
   outputs must be identical byte for byte.

Without a usable GPU it prints why it skipped and exits 0. Results also go to
target/bench/gpu.json. Uses only the standard library.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / "target" / "release"


def timed(cmd, runs):
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            sys.exit(f"{cmd}: exit {r.returncode}: {r.stderr}")
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=["small", "tinyllama"], default="tinyllama")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--numel", type=int, default=1 << 28, help="elements of the kernel benchmark")
    args = ap.parse_args()

    k = subprocess.run([BIN / "sotu-gpubench", "--numel", str(args.numel)], capture_output=True,
                       text=True)
    if k.returncode != 0:
        sys.exit(f"sotu-gpubench failed: {k.stderr}")
    kernel = json.loads(k.stdout)
    if "skipped" in kernel:
        print(f"make bench-gpu: skipped: {kernel['skipped']}")
        return
    print(f"device: {kernel['device']}")
    print(f"device-to-device copy: {kernel['copy_gbps']:.1f} GB/s")
    print(f"merge kernel (3 x 1/3, bf16, {kernel['result']['numel']} elements): "
          f"{kernel['kernel_gbps']:.1f} GB/s = {100 * kernel['ratio']:.1f}% of the copy "
          f"(target >= 85%)")

    data = ROOT / "target" / "bench" / "data" / f"{args.size}-bf16"
    if not (data / "tune3.safetensors").exists():
        print(f"generating {data} (once) ...", flush=True)
        subprocess.run([BIN / "sotu-synth", "--preset", args.size, "--dtype", "bf16", "--tunes", "3",
                        "-o", data], check=True, stdout=subprocess.DEVNULL)
    work = ROOT / "target" / "bench" / "work-gpu"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    base = data / "base.safetensors"
    sd = [BIN / "sotu-delta", "-q", "--no-sync"]
    deltas = [work / f"d{k}.safetensors" for k in range(3)]
    for k in range(3):
        subprocess.run(sd + ["extract", "--base", base, "--tuned", data / f"tune{k + 1}.safetensors",
                             "--slot", f"{k}/3", "-o", deltas[k]], check=True)
    for p in [base, *deltas]:
        subprocess.run(["cat", p], stdout=subprocess.DEVNULL, check=True)
    rows = {}
    for device in ["cpu", "cuda"]:
        out = work / f"{device}.safetensors"
        med, all_ = timed(sd + ["merge", "--base", base, *deltas, "--device", device, "-o", out],
                          args.runs)
        rows[device] = {"median_s": med, "runs_s": all_}
    same = (work / "cpu.safetensors").read_bytes() == (work / "cuda.safetensors").read_bytes()
    print(f"end to end, merge 3 x 1/3 onto {base.stat().st_size / 1e9:.2f} GB ({args.size}), "
          f"median of {args.runs}: cpu {rows['cpu']['median_s']:.3f} s, "
          f"cuda {rows['cuda']['median_s']:.3f} s "
          f"({rows['cpu']['median_s'] / rows['cuda']['median_s']:.2f}x; target > 1)")
    print(f"outputs identical: {same}")
    dest = ROOT / "target" / "bench" / "gpu.json"
    dest.write_text(json.dumps({"kernel": kernel, "end_to_end": rows, "identical": same}, indent=2))
    print(f"wrote {dest}")
    shutil.rmtree(work, ignore_errors=True)
    if not same:
        sys.exit("CUDA and CPU outputs differ")


if __name__ == "__main__":
    main()
