"""How the package behaves in a Python process: the GIL released during a merge, merges after
fork, and Ctrl-C stopping a merge without leaving a partial output."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import warnings

import pytest

import sotu_delta
import sotu_delta.numpy as sdnp
from conftest import FIX, cli, python_with, read_tensors

BASE = FIX / "base-bf16.safetensors"


# The long merge gives one delta many times, which the package warns of.
pytestmark = pytest.mark.filterwarnings("ignore::sotu_delta.SotuDeltaWarning")


def test_other_threads_run_during_a_merge(tmp_path, long_merge):
    base, deltas = long_merge
    deltas = deltas[:60]
    ticks, stop = [0], threading.Event()

    def count():
        while not stop.is_set():
            ticks[0] += 1

    t = threading.Thread(target=count)
    t.start()
    try:
        time.sleep(0.05)
        start_ticks, start = ticks[0], time.perf_counter()
        sotu_delta.merge(base, deltas, tmp_path / "m.safetensors", threads=1, quiet=True, no_sync=True)
        seconds, during = time.perf_counter() - start, ticks[0] - start_ticks
    finally:
        stop.set()
        t.join()
    # Holding the GIL for the whole merge would leave the counting thread at a standstill.
    assert seconds > 0.1, f"the merge took {seconds:.3f} s: too short to tell"
    print(f"merge {seconds:.2f} s; the other thread counted {during} times meanwhile")
    assert during > 10_000 * seconds, (during, seconds)


def test_fork_after_a_merge_then_merge_in_the_child(tmp_path, deltas):
    want = sdnp.load_merged(BASE, deltas)  # the pool's threads now exist in this process
    sotu_delta.merge(BASE, deltas, tmp_path / "parent.safetensors", quiet=True)
    with warnings.catch_warnings():
        # Python 3.12+ warns that forking a process with threads may deadlock the child: the
        # case this test is about.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            got = sdnp.load_merged(BASE, deltas)
            sotu_delta.merge(BASE, deltas, tmp_path / "child.safetensors", quiet=True)
            code = 0 if all(got[n].tobytes() == a.tobytes() for n, a in want.items()) else 3
        finally:
            os._exit(code)
    deadline = time.monotonic() + 120
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the child of fork hung in its merge")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0
    assert (tmp_path / "child.safetensors").read_bytes() == (tmp_path / "parent.safetensors").read_bytes()


def partial_outputs(d):
    return [p for p in os.listdir(d) if p.startswith(".sotu-delta-partial-")]


# The child raises KeyboardInterrupt on SIGINT whatever it inherits: Python leaves SIGINT ignored
# when its parent ignored it (a shell's background job, `nohup … &`), and then no Ctrl-C could
# reach the call at all.
INTERRUPTED_MERGE = """
import signal, sys, time, sotu_delta, sotu_delta.numpy
signal.signal(signal.SIGINT, signal.default_int_handler)
base, out, kind = sys.argv[1], sys.argv[2], sys.argv[3]
deltas = sys.argv[4:]
returned = False
print("start", flush=True)
try:
    if kind == "file":
        sotu_delta.merge(base, deltas, out, threads=1, quiet=True)
    else:
        sotu_delta.numpy.load_merged(base, deltas, threads=1)
    returned = True
    print("finished", flush=True)
except KeyboardInterrupt:
    print("KeyboardInterrupt", "after" if returned else "in the call", time.monotonic(), flush=True)
"""


@pytest.mark.parametrize("output", ["m.safetensors", "merged"])
def test_ctrl_c_stops_a_merge_and_leaves_no_partial_output(tmp_path, long_merge, output):
    base, deltas = long_merge
    out = tmp_path / output
    child = python_with(INTERRUPTED_MERGE, base, out, "file", *deltas, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "start"
    deadline = time.monotonic() + 60
    while not partial_outputs(tmp_path):
        assert child.poll() is None, "the merge ended before it was interrupted"
        assert time.monotonic() < deadline, "no partial output appeared"
        time.sleep(0.01)
    sent = time.monotonic()
    child.send_signal(signal.SIGINT)
    stdout, _ = child.communicate(timeout=60)
    words = stdout.split()
    assert words[:4] == ["KeyboardInterrupt", "in", "the", "call"], stdout
    print(f"stopped {float(words[4]) - sent:.3f} s after SIGINT")
    assert float(words[4]) - sent < 5
    assert child.returncode == 0
    assert not out.exists()
    assert partial_outputs(tmp_path) == []


def test_ctrl_c_stops_an_in_memory_merge(tmp_path, long_merge):
    base, deltas = long_merge
    # An in-memory merge shows no progress outside: it is interrupted a quarter of the way
    # through the time it takes here when nothing stops it.
    start = time.perf_counter()
    sdnp.load_merged(base, deltas, threads=1)
    whole = time.perf_counter() - start
    child = python_with(INTERRUPTED_MERGE, base, "-", "memory", *deltas, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "start"
    time.sleep(whole / 4)
    print(f"the whole merge takes {whole:.2f} s; SIGINT after {whole / 4:.2f} s")
    assert child.poll() is None, "the merge ended before it was interrupted"
    child.send_signal(signal.SIGINT)
    stdout, _ = child.communicate(timeout=60)
    assert stdout.split()[:4] == ["KeyboardInterrupt", "in", "the", "call"], stdout


def test_the_merged_arrays_match_the_long_merge_file(tmp_path, long_merge):
    # The large tensor (16 MB, written in many pieces from several threads) in memory, against
    # the binary's file.
    base, deltas = long_merge
    deltas = deltas[:3]
    cli("merge", "--base", base, *deltas, "-o", tmp_path / "m.safetensors", "-q")
    tensors, _ = read_tensors(tmp_path / "m.safetensors")
    got = sdnp.load_merged(base, deltas, threads=2)
    assert got["w"].tobytes() == tensors["w"][2]
