"""The Python package's in-memory merge against the command line writing a file.

Three deltas at 1/3 (disjoint slots) of the bench's bf16 model (`small`: 614 MB; generated
once under target/bench/data by sotu-synth, or --data DIR) are merged, each round:
- `sotu-delta merge -o FILE` (fsync before the rename, the default), and with --no-sync;
- `sotu_delta.numpy.load_merged` in this process (the arrays handed out, no file).
Prints the median wall time of each, its ratio to the file merge, and the median CPU time (user +
system: of the child for the command line, of this process for load_merged), steadier than the
wall time on a shared machine. Run with the venv that has the package (`make bench-python`).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import BIN, ROOT, bench_data, warm  # noqa: E402

import sotu_delta.numpy as sdnp  # noqa: E402


def cpu(who):
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=["small", "tinyllama"], default="small")
    ap.add_argument("--data", type=Path, help="a folder of base.safetensors and tune1-3 (read only)")
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    data = a.data or bench_data(a.size)
    exe = BIN / "sotu-delta"
    base = data / "base.safetensors"
    work = Path(tempfile.mkdtemp(prefix="bench-python-", dir=ROOT / "target"))
    deltas = []
    for k in range(3):
        d = work / f"d{k}.safetensors"
        subprocess.run([exe, "extract", "--base", base, "--tuned", data / f"tune{k + 1}.safetensors",
                        "--slot", f"{k}/3", "-o", d, "-q"], check=True)
        deltas.append(d)
    out = work / "merged.safetensors"
    names = ["cli merge -o file", "cli merge -o file --no-sync", "numpy.load_merged"]
    times = {n: [] for n in names}
    cpus = {n: [] for n in names}
    for _ in range(a.runs):
        for name, extra in [(names[0], []), (names[1], ["--no-sync"])]:
            warm(base, *deltas)
            out.unlink(missing_ok=True)
            c, t = cpu(resource.RUSAGE_CHILDREN), time.perf_counter()
            subprocess.run([exe, "merge", "--base", base, *deltas, "-o", out, "-q", *extra], check=True)
            times[name].append(time.perf_counter() - t)
            cpus[name].append(cpu(resource.RUSAGE_CHILDREN) - c)
        out.unlink(missing_ok=True)
        warm(base, *deltas)
        c, t = cpu(resource.RUSAGE_SELF), time.perf_counter()
        arrays = sdnp.load_merged(base, deltas)
        times[names[2]].append(time.perf_counter() - t)
        cpus[names[2]].append(cpu(resource.RUSAGE_SELF) - c)
        del arrays
    size = base.stat().st_size
    ref = statistics.median(times["cli merge -o file"])
    print(f"{data.name}: base {size / 1e6:.0f} MB, 3 deltas at 1/3, median of {a.runs}")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"  {name:30s} {m:7.3f} s  {size / 1e6 / m:7.0f} MB/s  {m / ref:5.2f}x the file merge"
              f"  CPU {statistics.median(cpus[name]):6.2f} s")
    for d in deltas:
        d.unlink()
    work.rmdir()


if __name__ == "__main__":
    main()
