"""The Python package against the command line: every function gives the bytes and the --json
report the binary gives, and fails with its message."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import sotu_delta
import sotu_delta.numpy as sdnp
from conftest import BAD, FIX, cli, cli_error, cli_json, read_tensors, without_timing

BASE = FIX / "base-bf16.safetensors"


def same_files(a, b):
    assert Path(a).read_bytes() == Path(b).read_bytes(), f"{a} and {b} differ"


CARD, RECIPE = "README.md", "sotu-delta.json"


def same_folders(py, c, py_inputs=None, c_inputs=None):
    """Folder outputs `py` (from the package) and `c` (from the command line) hold the same
    files, byte for byte but the model card and recipe. Those record the command that made
    them: they are the same once the command and the folders' paths (the outputs', and the
    inputs' folders `py_inputs` and `c_inputs` where they differ) are left out. The command the
    package records is one the command line takes: run, it makes the same tensors again."""
    names = sorted(p.name for p in c.iterdir())
    assert names == sorted(p.name for p in py.iterdir())
    assert CARD in names and RECIPE in names, names

    def text(path, folders):
        t = path.read_text()
        for d in folders:
            t = t.replace(str(d), "DIR")
        return t

    for n in names:
        if n not in (CARD, RECIPE):
            same_files(py / n, c / n)
    pairs = [(py, c)] + ([(py_inputs, c_inputs)] if py_inputs else [])
    got = json.loads(text(py / RECIPE, [p for p, _ in pairs]))
    want = json.loads(text(c / RECIPE, [q for _, q in pairs]))
    command = json.loads((py / RECIPE).read_text())["command"]
    assert got.pop("command")[0] == want.pop("command")[0] == "sotu-delta"
    assert got == want
    # The cards are the same but for the command in their code block.
    strip = lambda t: re.sub(r"```sh\n.*?\n```", "```sh```", t, flags=re.S)
    assert strip(text(py / CARD, [p for p, _ in pairs])) == strip(text(c / CARD, [q for _, q in pairs]))
    # The recorded command, replayed into another folder, makes the same tensors.
    again = py.parent / (py.name + "-again")
    words = command[1:]
    words[words.index("-o") + 1] = str(again)
    cli(*words, "-q")
    for n in names:
        if n.endswith(".safetensors"):
            same_files(again / n, c / n)


def test_extract_matches_the_cli(tmp_path):
    (tmp_path / "py").mkdir(), (tmp_path / "cli").mkdir()
    for args, kw in [
        ([], {}),
        (["--density", "0.25", "--seed", "99"], {"density": 0.25, "seed": 99}),
        (["--slot", "1/3", "--seed", "7"], {"slot": "1/3", "seed": 7}),
        (["--exclude", "*.bias"], {"exclude": ["*.bias"]}),
    ]:
        py_out, cli_out = tmp_path / "py" / "d.safetensors", tmp_path / "cli" / "d.safetensors"
        tuned = FIX / "task2-bf16.safetensors"
        got = sotu_delta.extract(BASE, tuned, py_out, quiet=True, **kw)
        want = cli_json("extract", "--base", BASE, "--tuned", tuned, "-o", cli_out, *args)
        same_files(py_out, cli_out)
        assert without_timing(got, tmp_path / "py") == without_timing(want, tmp_path / "cli")
        assert got["masked"] > 0 and got["output_fingerprint"]


def test_extract_from_a_numpy_state_dict_matches_the_file(tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="numpy holds bf16 only through ml_dtypes")
    tuned = FIX / "task1-bf16.safetensors"
    tensors, _ = read_tensors(tuned)
    state = {}
    for name, (dtype, shape, raw) in tensors.items():
        dt = ml_dtypes.bfloat16 if dtype == "BF16" else {"F32": "<f4", "I64": "<i8"}[dtype]
        state[name] = np.frombuffer(raw, dtype=dt).reshape(shape)
    got = sotu_delta.extract(BASE, state, tmp_path / "mem.safetensors", slot="0/3", quiet=True)
    cli("extract", "--base", BASE, "--tuned", tuned, "--slot", "0/3", "-o", tmp_path / "file.safetensors", "-q")
    same_files(tmp_path / "mem.safetensors", tmp_path / "file.safetensors")
    assert got["inputs"][-1] == "tuned state dict"
    # A tensor of the wrong shape is refused, naming the state dict and the tensor.
    name = next(iter(state))
    state[name] = state[name].reshape(-1)[:-1]
    with pytest.raises(sotu_delta.SotuDeltaError) as e:
        sotu_delta.extract(BASE, state, tmp_path / "bad.safetensors", quiet=True)
    assert "tuned state dict" in str(e.value) and name in str(e.value)
    assert not (tmp_path / "bad.safetensors").exists()


@pytest.mark.parametrize(
    "args,kw",
    [
        ([], {}),
        (["--weights", "0.5,1,-2", "--rescale"], {"weights": [0.5, 1, -2], "rescale": True}),
        (["--method", "ties", "--trim", "0.5", "--alpha", "0.8"], {"method": "ties", "trim": 0.5, "alpha": 0.8}),
        (["--method", "iso"], {"method": "iso"}),
        (["--method", "tsv", "--dtype", "f32"], {"method": "tsv", "dtype": "f32"}),
    ],
)
def test_merge_and_load_merged_match_the_cli(tmp_path, deltas, args, kw):
    (tmp_path / "py").mkdir(), (tmp_path / "cli").mkdir()
    py_out, cli_out = tmp_path / "py" / "m.safetensors", tmp_path / "cli" / "m.safetensors"
    got = sotu_delta.merge(BASE, deltas, py_out, quiet=True, **kw)
    want = cli_json("merge", "--base", BASE, *deltas, "-o", cli_out, *args)
    same_files(py_out, cli_out)
    assert without_timing(got, tmp_path / "py") == without_timing(want, tmp_path / "cli")

    # In memory: the same bytes, dtypes and shapes as the file, tensor by tensor.
    file_tensors, _ = read_tensors(cli_out)
    arrays = sdnp.load_merged(BASE, deltas, **kw)
    assert sorted(arrays) == sorted(file_tensors)
    for name, (dtype, shape, raw) in file_tensors.items():
        a = arrays[name]
        assert a.shape == shape, name
        assert a.tobytes() == raw, name
        assert a.flags.c_contiguous and a.flags.aligned, name


def test_load_merged_dtypes_with_and_without_ml_dtypes(deltas, monkeypatch):
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes is not installed")
    with_ml = sdnp.load_merged(BASE, deltas)
    bf16 = [n for n, a in with_ml.items() if a.dtype == np.dtype(ml_dtypes.bfloat16)]
    assert bf16, "the bf16 fixture has bf16 tensors"
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # import ml_dtypes now fails
    raw = sdnp.load_merged(BASE, deltas)
    for n in bf16:
        assert raw[n].dtype == np.uint16
        assert raw[n].tobytes() == with_ml[n].tobytes()
        assert np.array_equal(raw[n].view(ml_dtypes.bfloat16), with_ml[n])


def test_load_merged_arrays_own_their_memory(deltas):
    arrays = sdnp.load_merged(BASE, deltas)
    name, a = max(arrays.items(), key=lambda kv: kv[1].nbytes)
    before = a.tobytes()
    del arrays
    import gc

    gc.collect()
    # The array keeps its buffer alive after the dict and everything else are gone.
    assert a.tobytes() == before
    a[...] = 0  # and it is writable, like any array torch.from_numpy takes
    assert not a.any()


def test_apply_matches_the_cli(tmp_path, deltas):
    for args, kw in [([], {}), (["--no-rescale"], {"rescale": False}), (["--dtype", "f32"], {"dtype": "f32"})]:
        got = sotu_delta.apply(BASE, deltas[1], tmp_path / "py.safetensors", quiet=True, **kw)
        want = cli_json("apply", "--base", BASE, deltas[1], "-o", tmp_path / "cli.safetensors", *args)
        same_files(tmp_path / "py.safetensors", tmp_path / "cli.safetensors")
        assert got["tensors"] == want["tensors"] and got["changed"] == want["changed"]
        assert got["output_fingerprint"] == want["output_fingerprint"]
        # apply is a merge of one delta: in memory with rescale, the same bytes.
        file_tensors, _ = read_tensors(tmp_path / "cli.safetensors")
        mem = sdnp.load_merged(BASE, [deltas[1]], rescale=kw.get("rescale", True), dtype=kw.get("dtype"))
        assert {n: a.tobytes() for n, a in mem.items()} == {n: t[2] for n, t in file_tensors.items()}


def test_adapters_apply_and_extract_as_in_the_cli(tmp_path):
    """A PEFT LoRA adapter folder is a fine-tune for extract and a delta for apply (docs/LORA.md),
    in Python as on the command line."""
    adapter = FIX / "lora-bf16"
    got = sotu_delta.apply(BASE, adapter, tmp_path / "py.safetensors", quiet=True)
    want = cli_json("apply", "--base", BASE, adapter, "-o", tmp_path / "cli.safetensors")
    same_files(tmp_path / "py.safetensors", tmp_path / "cli.safetensors")
    assert got["changed"] == want["changed"] > 0
    sotu_delta.extract(BASE, adapter, tmp_path / "py.delta.safetensors", density=0.5, quiet=True)
    cli("extract", "--base", BASE, "--tuned", adapter, "--density", "0.5", "-o",
        tmp_path / "cli.delta.safetensors", "-q")
    same_files(tmp_path / "py.delta.safetensors", tmp_path / "cli.delta.safetensors")


def test_folder_output_matches_the_cli(tmp_path, deltas):
    got = sotu_delta.merge(BASE, deltas, tmp_path / "py", shard_size="100KB", quiet=True)
    cli("merge", "--base", BASE, *deltas, "-o", tmp_path / "cli", "--shard-size", "100KB", "-q")
    names = sorted(p.name for p in (tmp_path / "cli").iterdir())
    assert "model.safetensors.index.json" in names
    same_folders(tmp_path / "py", tmp_path / "cli")
    assert len(got["outputs"]) == len(names)


def test_inspect_and_verify_match_the_cli(deltas):
    assert sotu_delta.inspect(deltas) == cli_json("inspect", *deltas)
    assert sotu_delta.inspect(deltas, base=BASE) == cli_json("inspect", "--base", BASE, *deltas)
    assert sotu_delta.inspect(deltas[0]) == cli_json("inspect", deltas[0])
    got = sotu_delta.inspect(deltas[:2], base=BASE, subspaces=True)
    assert got == cli_json("inspect", "--base", BASE, "--subspaces", *deltas[:2])
    assert got["pairs"][0].get("subspace_alignment") is not None

    assert sotu_delta.verify(BASE, deltas) == cli_json("verify", "--base", BASE, *deltas)
    assert all(v["ok"] for v in sotu_delta.verify(BASE, deltas))
    # Another base: a verdict, as --json prints it before exiting 1; not an exception.
    other = FIX / "base-f16.safetensors"
    got = sotu_delta.verify(other, deltas[0])
    assert got == cli_json("verify", "--base", other, deltas[0], check=False)
    assert got[0]["ok"] is False


def test_errors_raise_with_the_cli_message(tmp_path, deltas):
    bad = sorted(BAD.glob("d-*.delta.safetensors"))
    assert bad, "fixtures/bad has bad deltas"
    for d in bad[:8]:
        want, code = cli_error("merge", "--base", BASE, d, "-o", tmp_path / "cli.safetensors")
        with pytest.raises(sotu_delta.SotuDeltaError) as e:
            sotu_delta.merge(BASE, [d], tmp_path / "py.safetensors", quiet=True)
        assert str(e.value) == want
        assert str(d) in str(e.value)
        assert code == 1 and not isinstance(e.value, sotu_delta.SotuDeltaUsageError)
        with pytest.raises(sotu_delta.SotuDeltaError) as e:
            sdnp.load_merged(BASE, [d])
        assert str(e.value) == want
    assert not list(tmp_path.iterdir()), "a failed merge left a file"

    # A tensor named: a checkpoint whose header names one tensor twice.
    dup = BAD / "ckpt-duplicate-name.safetensors"
    with pytest.raises(sotu_delta.SotuDeltaError) as e:
        sotu_delta.verify(dup, deltas[0])
    assert str(e.value) == cli_error("verify", "--base", dup, deltas[0])[0]
    assert str(dup) in str(e.value)

    missing = tmp_path / "nope.safetensors"
    with pytest.raises(sotu_delta.SotuDeltaError, match="nope.safetensors"):
        sotu_delta.inspect(missing)

    # Bad usage: SotuDeltaUsageError, also a ValueError, with the message of exit status 2.
    want, code = cli_error("merge", "--base", BASE, *deltas, "-o", tmp_path / "x.safetensors", "--weights", "1,2")
    assert code == 2
    with pytest.raises(sotu_delta.SotuDeltaUsageError) as e:
        sotu_delta.merge(BASE, deltas, tmp_path / "x.safetensors", weights=[1, 2])
    assert str(e.value) == want and isinstance(e.value, ValueError)
    with pytest.raises(sotu_delta.SotuDeltaUsageError, match="--method"):
        sdnp.load_merged(BASE, deltas, method="median")
    with pytest.raises(sotu_delta.SotuDeltaUsageError, match="--threads"):
        sdnp.load_merged(BASE, deltas, threads=0)
    with pytest.raises(sotu_delta.SotuDeltaUsageError, match="--slot"):
        sotu_delta.extract(BASE, BASE, tmp_path / "x.safetensors", slot="3")
    assert not list(tmp_path.iterdir())


def test_warnings_are_python_warnings(tmp_path, deltas):
    with pytest.warns(sotu_delta.SotuDeltaWarning, match="given twice"):
        sotu_delta.merge(BASE, [deltas[0], deltas[0]], tmp_path / "m.safetensors", quiet=True)
    p = cli("merge", "--base", BASE, deltas[0], deltas[0], "-o", tmp_path / "c.safetensors", "-q")
    assert "given twice" in p.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sotu_delta.merge(BASE, deltas, tmp_path / "m.safetensors", quiet=True)


def test_the_sotu_delta_command_is_the_cli(tmp_path, deltas):
    cmd = shutil.which("sotu-delta", path=str(Path(sys.executable).parent))
    assert cmd, f"pip install puts sotu-delta into {Path(sys.executable).parent}"
    import subprocess

    run = lambda *a: subprocess.run([cmd, *map(str, a)], capture_output=True, text=True)
    p = run("merge", "--base", BASE, *deltas, "-o", tmp_path / "a.safetensors", "-q")
    assert p.returncode == 0, p.stderr
    cli("merge", "--base", BASE, *deltas, "-o", tmp_path / "b.safetensors", "-q")
    same_files(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert run("--version").stdout == cli("--version").stdout
    bad = run("merge", "--base", BASE, tmp_path / "nope", "-o", tmp_path / "c.safetensors")
    assert bad.returncode == 1 and bad.stderr == cli("merge", "--base", BASE, tmp_path / "nope", "-o", tmp_path / "c.safetensors", check=False).stderr
    assert run("merge").returncode == 2
    p = run("inspect", "--json", *deltas)
    assert p.returncode == 0 and p.stdout == cli("inspect", "--json", *deltas).stdout


def test_paths_may_be_str_or_pathlike(tmp_path, deltas):
    a = sotu_delta.merge(str(BASE), [str(d) for d in deltas], str(tmp_path / "a.safetensors"), quiet=True)
    b = sotu_delta.merge(BASE, tuple(deltas), tmp_path / "b.safetensors", quiet=True)
    assert a["output_fingerprint"] == b["output_fingerprint"]
    assert os.path.exists(tmp_path / "a.safetensors")


def test_folders_with_own_files_match_the_cli(tmp_path):
    # A fine-tune that adds tokens: grown tensors and its own config and tokenizer files.
    base, tuned = FIX / "added-tokens" / "base", FIX / "added-tokens" / "tuned"
    for who in ("py", "cli"):
        (tmp_path / who).mkdir()
    py, c = tmp_path / "py", tmp_path / "cli"
    for k in range(2):
        sotu_delta.extract(base, tuned, py / f"h{k}.safetensors", slot=f"{k}/2", quiet=True)
        cli("extract", "--base", base, "--tuned", tuned, "-o", c / f"h{k}.safetensors", "--slot", f"{k}/2", "-q")
        same_files(py / f"h{k}.safetensors", c / f"h{k}.safetensors")
    halves = lambda d: [d / "h0.safetensors", d / "h1.safetensors"]
    sotu_delta.apply(base, py / "h0.safetensors", py / "rebuilt", quiet=True)
    cli("apply", "--base", base, c / "h0.safetensors", "-o", c / "rebuilt", "-q")
    with pytest.warns(sotu_delta.SotuDeltaWarning, match="--files-from 0"):
        sotu_delta.merge(base, halves(py), py / "kept", quiet=True)
    sotu_delta.merge(base, halves(py), py / "taken", files_from=0, quiet=True)
    cli("merge", "--base", base, *halves(c), "-o", c / "kept", "-q")
    cli("merge", "--base", base, *halves(c), "-o", c / "taken", "--files-from", "0", "-q")
    for out in ("rebuilt", "kept", "taken"):
        same_folders(py / out, c / out, py, c)
    assert (py / "taken" / "added_tokens.json").exists() and not (py / "kept" / "added_tokens.json").exists()
    # In memory: the grown tensors as the file has them.
    file_tensors, _ = read_tensors(c / "taken" / "model.safetensors")
    mem = sdnp.load_merged(base, halves(py))
    assert {n: (a.shape, a.tobytes()) for n, a in mem.items()} == {n: (t[1], t[2]) for n, t in file_tensors.items()}
    with pytest.raises(sotu_delta.SotuDeltaUsageError, match="--files-from 5"):
        sotu_delta.merge(base, halves(py), py / "x", files_from=5)
