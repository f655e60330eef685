#!/usr/bin/env python3
"""`make bench`: sotu-delta against the physical floor, in one run.

Generates (once, cached under target/bench/data/) a synthetic bf16 checkpoint with the layout of
a 1.1B Llama (`--size small`: 4 layers) and three fine-tunes of it, then, with the page cache
warm, times the floors and the operations, each run several times:

  cp of the base             the floor of merge and apply (read the input once, write once); the
                             tool runs with --no-sync here, as cp does not fsync
  cp + sync                  the floor of a durable write, for the default merge (fsync)
  cat of base + fine-tune,   the floor of extract (read both once, write the delta once)
  then cp of a delta
  extract at density 1/3; merges of three deltas at 1/3, in disjoint slots of one seed and with
  independent seeds 1, 2, 3 (a real SoTU release: masks overlap on 1/9 of the elements per pair),
  the latter also with --rehash (the base hashed again instead of its hashes taken from the hash
  cache); apply of one delta, rescaled (the default) and not

The fine-tunes change about 96% of the elements by about 5% of their scale (sotu-synth's
default), as real fine-tunes change almost every element.

`--io read` runs sotu-delta with positional reads instead of memory maps (README, "Network
filesystems").

Where mergekit is installed (`pip install mergekit`, or MERGEKIT=/path/to/mergekit-yaml), it
also times mergekit's task_arithmetic and dare_linear (density 1/3, no rescale) on the same files.

The runs go in rounds (each round times every operation once, in order), each operation right
after a run of its floor, and each ratio is taken against that run. Every run that writes
starts right after a copy of the base was written and deleted, so that all of them find the
VM's memory in the same state (see Job.run). The median over rounds is printed with its min
and max, as this machine's write speed drifts within seconds. For each operation it prints the
median, min and max seconds, GB/s and that ratio, the CPU seconds, and the peak RssAnon
(anonymous memory, not the page cache) sampled from /proc every 2 ms. The same data goes to
target/bench/<size>.json. Uses only the standard library.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / "target" / "release"


def peak_rss_anon(pid, done):
    """Samples RssAnon of a running process until `done` is set; returns the peak in bytes."""
    peak = 0
    path = f"/proc/{pid}/status"
    while not done.is_set():
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


def timed(cmd):
    """Runs `cmd`; returns its wall seconds, peak RssAnon and CPU seconds (user + system, its
    children included)."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        done, holder = threading.Event(), {}
        t = threading.Thread(target=lambda: holder.setdefault("peak", peak_rss_anon(proc.pid, done)))
        t.start()
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - start
        done.set()
        t.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            sys.exit(f"bench: {' '.join(map(str, cmd))} failed:\n{err.read().decode()}")
    return elapsed, holder.get("peak", 0), usage.ru_utime + usage.ru_stime


def warm(*paths):
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


class Job:
    """One timed command; `floor`, when given, runs just before it each time, for its ratio."""

    def __init__(self, name, cmd, nbytes, inputs, floor=None, after=None):
        self.name, self.cmd, self.nbytes, self.floor, self.after = name, cmd, nbytes, floor, after
        self.inputs = inputs
        self.times, self.peaks, self.paired, self.cpu = [], [], [], []

    def run(self):
        # The floor runs again right before the job, and the job's ratio is taken against that
        # run: this machine's write speed drifts within seconds (the same cp took 0.6 s to 6 s
        # in one bench), so only neighbours in time are compared.
        if self.floor:
            self.floor.run()
            self.paired.append(self.floor.times[-1])
        # A job that writes starts right after as many bytes were written and freed: on this
        # VM, page-cache pages that were left free for a few seconds cost far more to write
        # into again (the same cp took 3.6 s after 3 s idle, 0.7-0.9 s after a write and
        # delete), which made whichever job ran after a pause look slow.
        if self.after:
            prime = PRIME.with_name("prime.bin")
            shutil.copyfile(PRIME, prime)
            prime.unlink()
        # Inputs in the page cache (the other jobs' files may have pushed them out), and no
        # dirty pages left by the job before.
        warm(*self.inputs)
        os.sync()
        t, peak, cpu = timed(self.cmd)
        self.times.append(t)
        self.peaks.append(peak)
        self.cpu.append(cpu)
        if self.after:
            self.after()

    def row(self):
        med = statistics.median(self.times)
        ratios = [t / f for t, f in zip(self.times, self.paired)] if self.floor else [1.0]
        return {
            "name": self.name,
            "median_s": med,
            "min_s": min(self.times),
            "max_s": max(self.times),
            "gb_per_s": self.nbytes / med / 1e9,
            "ratio": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "cpu_s": statistics.median(self.cpu),
            "peak_rss_anon_bytes": max(self.peaks),
            "bytes": self.nbytes,
            "cmd": [str(c) for c in self.cmd],
            "times_s": self.times,
        }


def measure(jobs, runs):
    """Runs every job once per round, in order, for `runs` rounds; returns their rows (the
    floors' rows count every run of theirs, alone or paired with a job)."""
    for _ in range(runs):
        for job in jobs:
            if job.floor is None and any(j.floor is job for j in jobs):
                continue  # a floor runs paired with each job it is the floor of
            job.run()
    return [job.row() for job in jobs]


LAYERS = {"small": 4, "tinyllama": 22}
FLOORS = {"cp base (floor)", "cp base + sync (floor)", "cat base+tuned, cp delta (floor)"}
# What a writing job copies and deletes just before it runs (see Job.run), set in main.
PRIME = None


def bench_data(size):
    """The bench's base and three fine-tunes of `size`, generated once under target/bench/data."""
    data = ROOT / "target" / "bench" / "data" / f"{size}-bf16"
    if not (data / "tune3.safetensors").exists():
        print(f"generating {data} (once) ...", flush=True)
        subprocess.run([BIN / "sotu-synth", "--preset", size, "--dtype", "bf16", "--tunes", "3",
                        "-o", data], check=True, stdout=subprocess.DEVNULL)
    return data


def mergekit_folders(work, size, base, tunes):
    """Model folders for mergekit, which needs a config.json: links to the bench's files."""
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
              "intermediate_size": 5632, "num_hidden_layers": LAYERS[size],
              "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000,
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-05, "torch_dtype": "bfloat16",
              "tie_word_embeddings": False}
    folders = []
    for src in [base, *tunes]:
        d = work / "mergekit" / src.stem
        d.mkdir(parents=True, exist_ok=True)
        (d / "model.safetensors").symlink_to(src)
        (d / "config.json").write_text(json.dumps(config))
        folders.append(d)
    return folders[0], folders[1:]


def mergekit_config(path, method, base, tunes, density):
    """A mergekit-yaml config (JSON is YAML) for the same merge as sotu-delta's."""
    models = [{"model": str(t), "parameters": {"weight": 1.0}
               | ({"density": density} if density else {})} for t in tunes]
    params = {"normalize": False} | ({"rescale": False} if density else {})
    path.write_text(json.dumps({"merge_method": method, "base_model": str(base), "models": models,
                                "parameters": params, "dtype": "bfloat16"}))
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=["small", "tinyllama"], default="tinyllama")
    ap.add_argument("--runs", type=int, default=5, help="rounds; each times every operation once")
    ap.add_argument("--threads", type=int, default=0, help="0: one per core")
    ap.add_argument("--io", choices=["mmap", "read"], default="mmap",
                    help="how sotu-delta reads its inputs (--io): memory maps, or positional reads")
    ap.add_argument("--mergekit-runs", type=int, default=1,
                    help="runs of each mergekit merge (they take tens of seconds each)")
    args = ap.parse_args()

    data = bench_data(args.size)
    work = ROOT / "target" / "bench" / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    base, tunes = data / "base.safetensors", [data / f"tune{k}.safetensors" for k in (1, 2, 3)]
    global PRIME
    PRIME = work / "prime-source"
    PRIME.symlink_to(base)
    durable = [BIN / "sotu-delta", "-q", "--io", args.io] + (
        ["--threads", str(args.threads)] if args.threads else [])
    # Like for like: cp leaves its output in the page cache, so the rows against cp use
    # --no-sync; the default (fsync before rename) is measured against cp + sync.
    sd = durable + ["--no-sync"]
    slots = [work / f"slot{k}.safetensors" for k in range(3)]
    seeds = [work / f"seed{k + 1}.safetensors" for k in range(3)]
    for k in range(3):
        subprocess.run(sd + ["extract", "--base", base, "--tuned", tunes[k], "--slot", f"{k}/3",
                             "-o", slots[k]], check=True)
        subprocess.run(sd + ["extract", "--base", base, "--tuned", tunes[k], "--seed", str(k + 1),
                             "--density", str(1 / 3), "-o", seeds[k]], check=True)
    base_bytes = base.stat().st_size
    both = base_bytes + tunes[0].stat().st_size
    out = work / "out.safetensors"
    rm_out = lambda: out.unlink(missing_ok=True)

    cp = Job("cp base (floor)", ["cp", base, out], base_bytes, [base], after=rm_out)
    cp_sync = Job("cp base + sync (floor)", ["sh", "-c", f"cp '{base}' '{out}' && sync"],
                  base_bytes, [base], after=rm_out)
    cat = Job("cat base+tuned, cp delta (floor)",
              ["sh", "-c", f"cat '{base}' '{tunes[0]}' > /dev/null && cp '{seeds[0]}' '{out}'"],
              both, [base, tunes[0], seeds[0]], after=rm_out)
    merge = sd + ["merge", "--base", base]
    jobs = [
        cp, cp_sync, cat,
        Job("extract 1/3", sd + ["extract", "--base", base, "--tuned", tunes[0], "--seed", "1",
                                 "--density", str(1 / 3), "-o", out], both, [base, tunes[0]], cat,
            rm_out),
        Job("merge 3 x 1/3, slots", merge + [*slots, "-o", out], base_bytes, [base, *slots], cp,
            rm_out),
        Job("merge 3 x 1/3, seeds", merge + [*seeds, "-o", out], base_bytes, [base, *seeds], cp,
            rm_out),
        Job("merge seeds, --rehash", sd + ["--rehash"] + merge[len(sd):] + [*seeds, "-o", out],
            base_bytes, [base, *seeds], cp, rm_out),
        # apply rescales by default (README); --no-rescale is the exact-placement path that
        # earlier versions measured as "apply".
        Job("apply 1/3", sd + ["apply", "--base", base, seeds[0], "-o", out], base_bytes,
            [base, seeds[0]], cp, rm_out),
        Job("apply 1/3, --no-rescale", sd + ["apply", "--no-rescale", "--base", base, seeds[0],
                                             "-o", out], base_bytes, [base, seeds[0]], cp, rm_out),
        # Last in the round: deleting a file that reached the disk slowed the writes that
        # followed (the cp paired with apply took 1.4-2.6 s after this job, 0.6-0.75 s elsewhere).
        Job("merge seeds, fsync", durable + ["merge", "--base", base, *seeds, "-o", out],
            base_bytes, [base, *seeds], cp_sync, rm_out),
    ]
    rows = measure(jobs, args.runs)

    mask = subprocess.run([BIN / "sotu-maskbench"], check=True, capture_output=True, text=True)
    mask = json.loads(mask.stdout)
    sizes = {"dense_bytes": base_bytes, "delta_bytes": [d.stat().st_size for d in seeds]}
    mergekit = os.environ.get("MERGEKIT") or shutil.which("mergekit-yaml")
    mk_rows = []
    if mergekit:
        # The same merge in mergekit (torch, CPU): plain task arithmetic of the three dense
        # fine-tunes, and DARE at density 1/3 without rescaling (its own random masks).
        mk_base, mk_tunes = mergekit_folders(work, args.size, base, tunes)
        mk_out = work / "mergekit-out"
        rm_mk = lambda: shutil.rmtree(mk_out, ignore_errors=True)
        for method, density in [("task_arithmetic", None), ("dare_linear", 1 / 3)]:
            cfg = mergekit_config(work / f"{method}.yml", method, mk_base, mk_tunes, density)
            cmd = [mergekit, cfg, mk_out, "--lazy-unpickle", "--no-cuda", "-j",
                   str(args.threads or os.cpu_count())]
            job = Job(f"mergekit {method}", cmd, base_bytes, [base, *tunes], after=rm_mk)
            mk_rows += measure([job], args.mergekit_runs)

    print(f"\nsotu-delta bench: {args.size} bf16, {base_bytes / 1e9:.2f} GB base, "
          f"{os.cpu_count()} cores, {args.runs} rounds (page cache warm), --io {args.io}")
    print("x floor: the median over rounds of (time / the time of its floor run just before), "
          "with min-max")
    print("cpu s: median user + system seconds, all threads")
    print(f"{'operation':<33} {'median s':>9} {'min s':>7} {'max s':>7} {'GB/s':>6} "
          f"{'x floor':>8} {'(min-max)':>11} {'cpu s':>6} {'peak RssAnon':>13}")
    for r in rows:
        spread = f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}" if r["name"] not in FLOORS else ""
        print(f"{r['name']:<33} {r['median_s']:>9.3f} {r['min_s']:>7.3f} {r['max_s']:>7.3f} "
              f"{r['gb_per_s']:>6.2f} {r['ratio']:>8.2f} {spread:>11} {r['cpu_s']:>6.2f} "
              f"{r['peak_rss_anon_bytes'] / 2**20:>9.1f} MiB")
    for r in mk_rows:
        print(f"{r['name']:<33} {r['median_s']:>9.3f} {r['min_s']:>7.3f} {r['max_s']:>7.3f} "
              f"{r['gb_per_s']:>6.2f} {'':>8} {'':>11} {r['cpu_s']:>6.2f} "
              f"{r['peak_rss_anon_bytes'] / 2**20:>9.1f} MiB")
    print(f"mask function: {mask['elements_per_second_per_core'] / 1e9:.2f} G elements/s/core "
          f"({mask['isa']})")
    for k, b in enumerate(sizes["delta_bytes"]):
        print(f"delta, seed {k + 1}: {b / 1e6:.1f} MB = {100 * b / base_bytes:.2f}% of dense")
    merge_s = next(r["median_s"] for r in rows if r["name"] == "merge 3 x 1/3, seeds")
    for r in mk_rows:
        print(f"{r['name']}: {r['median_s'] / merge_s:.1f}x the time of sotu-delta's merge "
              f"(both without fsync)")
    if not mergekit:
        print("mergekit: not installed (pip install mergekit; or MERGEKIT=/path/to/mergekit-yaml)"
              " - comparison skipped")
    result = {"size": args.size, "io": args.io, "runs": args.runs, "rows": rows + mk_rows, "mask": mask,
              "sizes": sizes}
    dest = ROOT / "target" / "bench" / f"{args.size}.json"
    dest.write_text(json.dumps(result, indent=2))
    print(f"wrote {dest}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
