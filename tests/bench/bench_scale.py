#!/usr/bin/env python3
"""`make bench-scale`: a merge of a model larger than this machine's RAM, with bounded memory.

Generates a synthetic bf16 checkpoint with the tensor shapes of Qwen2.5-14B (hidden 5120, 48
layers, MLP 13824, vocab 152064, 8 KV heads; 29.5 GB) as a Hugging Face folder of 5 GB shards,
and one fine-tune of it; extracts three deltas from the fine-tune in disjoint slots (density
--density each), then deletes the fine-tune to free the disk. Then, in one run, it times:

  cp -r of the base folder     the floor: read the base once, write it once
  merge of the three deltas    into a sharded output folder (--no-sync, like cp)

and samples the merge's peak RssAnon (anonymous memory, not the page cache) from /proc every
2 ms. Peak disk use is about twice the model's size plus the deltas; the data lives under
target/bench/scale/ (`make clean` removes it; pass --keep to keep the base for a rerun).
Uses only the standard library and the binaries of target/release.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import BIN, ROOT, timed  # noqa: E402


def folder_bytes(path):
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="qwen14b", help="sotu-synth layout (default qwen14b)")
    ap.add_argument("--density", default="0.02", help="density of each of the three deltas")
    ap.add_argument("--keep", action="store_true", help="keep the generated base for a rerun")
    args = ap.parse_args()

    data = ROOT / "target" / "bench" / "scale"
    base, tune = data / "base", data / "tune1"
    deltas = [data / f"delta{k}" for k in range(3)]
    copy, out = data / "copy", data / "merged"
    for p in (copy, out):
        shutil.rmtree(p, ignore_errors=True)
    synth = [BIN / "sotu-synth", "--preset", args.preset, "--dtype", "bf16", "--tunes", "1",
             "--shard-size", "5GB", "-o", data]
    sd = [BIN / "sotu-delta", "-q", "--no-sync"]
    t0 = time.perf_counter()
    if not (base / "model.safetensors.index.json").exists():
        print(f"generating {base} ...", flush=True)
        subprocess.run(synth + ["--only", "0"], check=True, stdout=subprocess.DEVNULL)
    if not all((d / "model.safetensors").exists() or (d / "model.safetensors.index.json").exists()
               for d in deltas):
        print(f"generating {tune} ...", flush=True)
        subprocess.run(synth + ["--only", "1"], check=True, stdout=subprocess.DEVNULL)
        for k, d in enumerate(deltas):
            print(f"extracting {d} ...", flush=True)
            shutil.rmtree(d, ignore_errors=True)
            t, peak, _ = timed(sd + ["extract", "--base", base, "--tuned", tune, "--slot", f"{k}/3",
                                  "--density", args.density, "-o", d])
            print(f"  {t:.1f} s, peak RssAnon {peak / 2**20:.1f} MiB", flush=True)
        shutil.rmtree(tune)
    print(f"prepared in {time.perf_counter() - t0:.0f} s", flush=True)

    base_bytes = folder_bytes(base)
    largest = 0
    for shard in base.glob("*.safetensors"):
        with open(shard, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                largest = max(largest, v["data_offsets"][1] - v["data_offsets"][0])
    mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    os.sync()
    cp_s, _, _ = timed(["cp", "-r", base, copy])
    shutil.rmtree(copy)
    os.sync()
    merge_s, peak, _ = timed(sd + ["merge", "--base", base, *deltas, "-o", out])
    out_bytes = folder_bytes(out)
    shutil.rmtree(out)
    if not args.keep:
        shutil.rmtree(base)

    print(f"\nsotu-delta bench-scale: {args.preset} bf16, base {base_bytes / 1e9:.2f} GB "
          f"({base_bytes / 2**30:.2f} GiB) in 5 GB shards, RAM {mem_total / 2**30:.1f} GiB, "
          f"{os.cpu_count()} cores")
    print(f"largest tensor {largest / 2**20:.0f} MiB; 3 deltas at density {args.density} "
          f"({sum(folder_bytes(d) for d in deltas) / 1e9:.2f} GB)")
    print(f"cp -r base            {cp_s:8.1f} s  {base_bytes / cp_s / 1e9:.2f} GB/s")
    print(f"merge 3 deltas        {merge_s:8.1f} s  {base_bytes / merge_s / 1e9:.2f} GB/s  "
          f"{merge_s / cp_s:.2f} x cp")
    print(f"merge peak RssAnon    {peak / 2**20:8.1f} MiB "
          f"({peak / largest:.2f} x the largest tensor); output {out_bytes / 1e9:.2f} GB")
    result = {"preset": args.preset, "base_bytes": base_bytes, "largest_tensor_bytes": largest,
              "mem_total_bytes": mem_total, "cp_s": cp_s, "merge_s": merge_s,
              "merge_peak_rss_anon_bytes": peak, "output_bytes": out_bytes,
              "density": args.density}
    dest = ROOT / "target" / "bench" / "scale.json"
    dest.write_text(json.dumps(result, indent=2))
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
