"""Shared helpers of the Python package's tests: the command line to compare with, a reader of
safetensors files that keeps every tensor's raw bytes, and deltas of the committed fixtures.

The package under test is the one installed in the interpreter running pytest (`make test`
installs it into .venv); the command line is SOTU_BIN (target/release/sotu-delta by default).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "fixtures" / "tiny"
BAD = ROOT / "fixtures" / "bad"
BIN = Path(os.environ.get("SOTU_BIN", ROOT / "target" / "release" / "sotu-delta")).resolve()


def cli(*args, check=True, cwd=None):
    """Runs the command line binary; returns the finished process (text output)."""
    if not BIN.exists():
        pytest.fail(f"{BIN} does not exist: build it first (make build)")
    p = subprocess.run(
        [str(BIN), *map(str, args)], capture_output=True, text=True, cwd=cwd, check=False
    )
    if check and p.returncode != 0:
        raise AssertionError(f"sotu-delta {' '.join(map(str, args))} exited {p.returncode}: {p.stderr}")
    return p


def cli_json(*args, check=True):
    """The command line's --json output, parsed."""
    return json.loads(cli(*args, "--json", check=check).stdout)


def cli_error(*args):
    """The command line's error message (without its prefix) and exit status."""
    p = cli(*args, check=False)
    assert p.returncode in (1, 2), p
    line = p.stderr.strip().splitlines()[-1]
    prefix = "sotu-delta: usage error: " if p.returncode == 2 else "sotu-delta: error: "
    assert line.startswith(prefix), p.stderr
    return line[len(prefix) :], p.returncode


def read_tensors(path):
    """A safetensors file's tensors: name -> (dtype, shape, raw bytes), and its metadata.
    Written from the format's description, independent of the package under test."""
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    start = 8 + n
    out = {}
    for name, t in header.items():
        a, b = t["data_offsets"]
        out[name] = (t["dtype"], tuple(t["shape"]), data[start + a : start + b])
    return out, meta


def without_timing(report, *dirs):
    """A --json report without its wall time, and with the folders `dirs` left out of paths
    (two runs that wrote to two folders report the same otherwise)."""
    text = json.dumps({k: v for k, v in report.items() if k != "seconds"})
    for d in dirs:
        text = text.replace(str(d) + "/", "")
    return json.loads(text)


def f32_model(path, n, scale=1.0, seed=0):
    """A one-tensor f32 checkpoint of n elements: w = scale * (pseudo-random values)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(n).astype(np.float32) * np.float32(scale)).astype("<f4")
    header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, w.nbytes]}})
    header += " " * (-len(header) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(header)) + header.encode() + w.tobytes())


@pytest.fixture(scope="session")
def deltas(tmp_path_factory):
    """Three deltas of the bf16 fixtures, in disjoint slots of one seed, made by the binary."""
    d = tmp_path_factory.mktemp("deltas")
    out = []
    for k in range(3):
        p = d / f"task{k + 1}.delta.safetensors"
        cli("extract", "--base", FIX / "base-bf16.safetensors", "--tuned",
            FIX / f"task{k + 1}-bf16.safetensors", "--slot", f"{k}/3", "--seed", "7", "-o", p, "-q")
        out.append(p)
    return out


@pytest.fixture(scope="session")
def long_merge(tmp_path_factory):
    """A base and a delta whose merge, the delta given 400 times on one thread, takes seconds
    (as tests/cli.rs interrupts the binary): (base, [delta] * 400)."""
    d = tmp_path_factory.mktemp("long")
    base, tuned, delta = d / "base.safetensors", d / "tuned.safetensors", d / "delta.safetensors"
    f32_model(base, 4_000_000)
    f32_model(tuned, 4_000_000, scale=1.001)
    cli("extract", "--base", base, "--tuned", tuned, "-o", delta, "--density", "0.5", "-q")
    return base, [delta] * 400


def python_with(code, *args, **kw):
    """Starts this interpreter on `code` (the package under test importable)."""
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], **kw)
