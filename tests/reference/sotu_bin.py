"""The sotu-delta binary that the reference tests run: `SOTU_BIN`, or else
target/release/sotu-delta (a relative path is taken from the repository root)."""

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def path():
    env = os.environ.get("SOTU_BIN")
    p = Path(env) if env else Path("target/release/sotu-delta")
    return p if p.is_absolute() else REPO / p


def call(*args, cwd=None, timeout=120):
    """Runs the binary with `args` and returns the finished process; fails the test when there
    is no binary."""
    binary = path()
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(f"sotu-delta binary not found at {binary}: build it with `cargo build --release` "
                    "(or point SOTU_BIN at it)")
    return subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd)


def run(*args, cwd=None, timeout=120):
    """`call`, failing the test unless the binary exits 0."""
    proc = call(*args, cwd=cwd, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"`sotu-delta {' '.join(map(str, args))}` exited {proc.returncode}:\n{proc.stderr}")
    return proc
