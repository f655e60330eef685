#!/usr/bin/env python3
"""`make bench`: sotu-delta against the physical floor, in one run.

Generates (once, cached under target/bench/data/) a synthetic bf16 checkpoint with the layout of
a 1.1B Llama (`--size small`: 4 layers) and three fine-tunes of it, then, with the page cache
warm, times the floors and the operations, each run several times:

  cp of the base             the floor of merge and apply (read the input once, write once); the
                             tool runs with --no-sync here, as cp does not fsync
  cp + sync                  the floor of a durable write, for the default merge (fsync)
  cat of base + fine-tune    the floor of extract (read both once)
  extract at density 1/3, merge of the three slot deltas, apply of one

For each it prints the median, min and max seconds, GB/s and the ratio to its floor, plus the
peak RssAnon (anonymous memory, not the page cache) sampled from /proc every 2 ms. The same data
goes to target/bench/<size>.json. Uses only the standard library.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / "target" / "release"


def peak_rss_anon(proc):
    """Samples RssAnon of a running process until it exits; returns the peak in bytes."""
    peak = 0
    path = f"/proc/{proc.pid}/status"
    while proc.poll() is None:
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
                        break
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.002)
    return peak


def timed(cmd, stdout=subprocess.DEVNULL):
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE)
    holder = {}
    t = threading.Thread(target=lambda: holder.setdefault("peak", peak_rss_anon(proc)))
    t.start()
    _, err = proc.communicate()
    elapsed = time.perf_counter() - start
    t.join()
    if proc.returncode != 0:
        sys.exit(f"bench: {' '.join(map(str, cmd))} failed:\n{err.decode()}")
    return elapsed, holder.get("peak", 0)


def warm(*paths):
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def measure(name, cmd, runs, nbytes, floor=None, after=None):
    times, peaks = [], []
    for _ in range(runs):
        os.sync()  # start every run with no dirty pages left by the one before
        t, peak = timed(cmd)
        times.append(t)
        peaks.append(peak)
        if after:
            after()
    med = statistics.median(times)
    return {
        "name": name,
        "median_s": med,
        "min_s": min(times),
        "max_s": max(times),
        "gb_per_s": nbytes / med / 1e9,
        "ratio": med / floor if floor else 1.0,
        "peak_rss_anon_bytes": max(peaks),
        "bytes": nbytes,
        "cmd": [str(c) for c in cmd],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=["small", "tinyllama"], default="tinyllama")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="0: one per core")
    args = ap.parse_args()

    data = ROOT / "target" / "bench" / "data" / f"{args.size}-bf16"
    if not (data / "tune3.safetensors").exists():
        print(f"generating {data} (once) ...", flush=True)
        subprocess.run([BIN / "sotu-synth", "--preset", args.size, "--dtype", "bf16", "--tunes", "3",
                        "-o", data], check=True, stdout=subprocess.DEVNULL)
    work = ROOT / "target" / "bench" / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    base, tunes = data / "base.safetensors", [data / f"tune{k}.safetensors" for k in (1, 2, 3)]
    durable = [BIN / "sotu-delta", "-q"] + (["--threads", str(args.threads)] if args.threads else [])
    # Like for like: cp leaves its output in the page cache, so the rows against cp use
    # --no-sync; the default (fsync before rename) is measured against cp + sync.
    sd = durable + ["--no-sync"]
    deltas = [work / f"d{k}.safetensors" for k in range(3)]
    for k in range(3):
        subprocess.run(sd + ["extract", "--base", base, "--tuned", tunes[k], "--slot", f"{k}/3",
                             "-o", deltas[k]], check=True)
    warm(base, *tunes, *deltas)
    base_bytes = base.stat().st_size
    both = base_bytes + tunes[0].stat().st_size
    out = work / "out.safetensors"
    rm_out = lambda: out.unlink(missing_ok=True)

    rows = []
    cp = measure("cp base (floor)", ["cp", base, out], args.runs, base_bytes, after=rm_out)
    rows.append(cp)
    cp_sync = measure("cp base + sync (floor)", ["sh", "-c", f"cp '{base}' '{out}' && sync"],
                      args.runs, base_bytes, after=rm_out)
    rows.append(cp_sync)
    cat = measure("cat base+tuned (floor)", ["sh", "-c", f"cat '{base}' '{tunes[0]}' > /dev/null"],
                  args.runs, both)
    rows.append(cat)
    rows.append(measure("extract 1/3", sd + ["extract", "--base", base, "--tuned", tunes[0],
                                             "--slot", "0/3", "-o", out],
                        args.runs, both, cat["median_s"], rm_out))
    rows.append(measure("merge 3 x 1/3", sd + ["merge", "--base", base, *deltas, "-o", out],
                        args.runs, base_bytes, cp["median_s"], rm_out))
    rows.append(measure("merge 3 x 1/3, fsync", durable + ["merge", "--base", base, *deltas, "-o", out],
                        args.runs, base_bytes, cp_sync["median_s"], rm_out))
    rows.append(measure("apply 1/3", sd + ["apply", "--base", base, deltas[0], "-o", out],
                        args.runs, base_bytes, cp["median_s"], rm_out))

    mask = subprocess.run([BIN / "sotu-maskbench"], check=True, capture_output=True, text=True)
    mask = json.loads(mask.stdout)
    sizes = {"dense_bytes": base_bytes, "delta_bytes": [d.stat().st_size for d in deltas]}
    mergekit = shutil.which("mergekit-yaml")

    print(f"\nsotu-delta bench: {args.size} bf16, {base_bytes / 1e9:.2f} GB base, "
          f"{os.cpu_count()} cores, median of {args.runs} (page cache warm)")
    print(f"{'operation':<24} {'median s':>9} {'min s':>7} {'max s':>7} {'GB/s':>6} "
          f"{'x floor':>8} {'peak RssAnon':>13}")
    for r in rows:
        print(f"{r['name']:<24} {r['median_s']:>9.3f} {r['min_s']:>7.3f} {r['max_s']:>7.3f} "
              f"{r['gb_per_s']:>6.2f} {r['ratio']:>8.2f} {r['peak_rss_anon_bytes'] / 2**20:>10.1f} MiB")
    print(f"mask function: {mask['elements_per_second_per_core'] / 1e9:.2f} G elements/s/core "
          f"({mask['isa']})")
    for k, b in enumerate(sizes["delta_bytes"]):
        print(f"delta {k}/3: {b / 1e6:.1f} MB = {100 * b / base_bytes:.2f}% of dense")
    print("mergekit: " + ("found, but its comparison is not wired in yet" if mergekit else
                          "not installed (pip install mergekit) - comparison skipped"))
    result = {"size": args.size, "runs": args.runs, "rows": rows, "mask": mask, "sizes": sizes}
    dest = ROOT / "target" / "bench" / f"{args.size}.json"
    dest.write_text(json.dumps(result, indent=2))
    print(f"wrote {dest}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
