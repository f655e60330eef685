"""The Python package's merge inputs beyond delta files, against the command line: fine-tunes
(`sotu_delta.FineTune`, `merge --tuned`, LoRA adapter folders included) mixed with delta files in
a stated order, and mergekit configurations (`config=`, `merge --config`). Each gives the bytes
the binary gives for the same merge, to a file, to a folder and into memory, and fails with the
binary's message."""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest

import sotu_delta
import sotu_delta.numpy as sdnp
from conftest import FIX, cli, cli_error, cli_json, read_tensors, without_timing
from test_package import BASE, same_files, same_folders

FineTune = sotu_delta.FineTune
TASKS = [FIX / f"task{k}-bf16.safetensors" for k in (1, 2, 3)]
ADAPTER = FIX / "lora-bf16"


@pytest.fixture(scope="module")
def delta2(tmp_path_factory):
    """task2's delta at density 0.5, seed 99, made by the binary."""
    d = tmp_path_factory.mktemp("delta2") / "task2.delta.safetensors"
    cli("extract", "--base", BASE, "--tuned", TASKS[1], "--density", "0.5", "--seed", "99", "-o", d, "-q")
    return d


def cli_words(inputs):
    """The command line's inputs for a list of paths and FineTunes, in the same order."""
    words = []
    for i in [inputs] if isinstance(inputs, FineTune) else inputs:
        words += ["--tuned", i.path] if isinstance(i, FineTune) else [i]
    return words


def same_in_memory(arrays, path):
    """The in-memory merge holds the file's tensors, byte for byte, with their shapes."""
    file_tensors, _ = read_tensors(path)
    assert sorted(arrays) == sorted(file_tensors)
    for name, (_, shape, raw) in file_tensors.items():
        assert arrays[name].shape == shape, name
        assert arrays[name].tobytes() == raw, name


def check_against_cli(tmp_path, inputs, args, kw):
    """merge(inputs, **kw) and load_merged(inputs, **kw) are `merge --base BASE <inputs> <args>`."""
    (tmp_path / "py").mkdir(parents=True), (tmp_path / "cli").mkdir()
    py_out, cli_out = tmp_path / "py" / "m.safetensors", tmp_path / "cli" / "m.safetensors"
    got = sotu_delta.merge(BASE, inputs, py_out, quiet=True, **kw)
    want = cli_json("merge", "--base", BASE, *cli_words(inputs), *args, "-o", cli_out)
    same_files(py_out, cli_out)
    assert without_timing(got, tmp_path / "py") == without_timing(want, tmp_path / "cli")
    same_in_memory(sdnp.load_merged(BASE, inputs, **kw), cli_out)
    return cli_out


@pytest.mark.parametrize(
    "case",
    ["fine-tunes", "mixed", "slots-ties", "adapter", "one-fine-tune"],
)
def test_fine_tunes_match_the_cli(tmp_path, delta2, case):
    inputs, args, kw = {
        "fine-tunes": ([FineTune(t) for t in TASKS], [], {}),
        "mixed": (
            [FineTune(TASKS[0]), delta2, FineTune(TASKS[2])],
            ["--density", "0.5", "--seed", "5", "--weights", "0.5,1,-2", "--rescale"],
            {"density": 0.5, "seed": 5, "weights": [0.5, 1, -2], "rescale": True},
        ),
        "slots-ties": (
            [FineTune(t) for t in TASKS],
            ["--slots", "--seed", "7", "--method", "ties", "--trim", "0.5"],
            {"slots": True, "seed": 7, "method": "ties", "trim": 0.5},
        ),
        "adapter": (
            [FineTune(ADAPTER), FineTune(TASKS[0])],
            ["--slots", "--method", "tsv", "--dtype", "f32"],
            {"slots": True, "method": "tsv", "dtype": "f32"},
        ),
        "one-fine-tune": (FineTune(str(TASKS[1])), ["--density", "0.25"], {"density": 0.25}),
    }[case]
    out = check_against_cli(tmp_path, inputs, args, kw)
    record = json.loads(read_tensors(out)[1]["sotu_delta"])
    kinds = [i.get("input") for i in record["deltas"]]
    assert "fine-tune" in kinds or "lora" in kinds, kinds


def test_fine_tunes_in_slots_are_extract_then_merge(tmp_path, deltas):
    """docs/FORMAT.md section 14: fine-tunes masked with slot k/3 of seed 7 give the tensors of
    their deltas extracted with `--slot k/3 --seed 7` and merged (the session's `deltas`)."""
    from_files = sdnp.load_merged(BASE, deltas)
    taken = sdnp.load_merged(BASE, [FineTune(t) for t in TASKS], slots=True, seed=7)
    assert sorted(taken) == sorted(from_files)
    assert all(taken[n].tobytes() == from_files[n].tobytes() for n in taken)


def test_the_order_of_mixed_inputs_is_kept(tmp_path, delta2):
    """Inputs are merged in the order given: weights follow it, and fine-tune t (delta files not
    counted) is masked with seed S + t, as the command line's order of --tuned among deltas."""
    orders = {
        "tuned-first": [FineTune(TASKS[0]), delta2, FineTune(TASKS[2])],
        "delta-first": [delta2, FineTune(TASKS[2]), FineTune(TASKS[0])],
    }
    outs = {}
    for name, inputs in orders.items():
        outs[name] = check_against_cli(
            tmp_path / name, inputs, ["--density", "0.5", "--seed", "5", "--weights", "1,2,3"],
            {"density": 0.5, "seed": 5, "weights": [1, 2, 3]},
        )
        record = json.loads(read_tensors(outs[name])[1]["sotu_delta"])
        want = [(Path(getattr(i, "path", i)).name, w) for i, w in zip(inputs, [1, 2, 3])]
        assert [(Path(d["file"]).name, d["weight"]) for d in record["deltas"]] == want
        seeds = [d["seed"] for d in record["deltas"] if d.get("input") == "fine-tune"]
        assert seeds == [5, 6], seeds
    assert Path(outs["tuned-first"]).read_bytes() != Path(outs["delta-first"]).read_bytes()


def test_fine_tunes_to_a_folder_match_the_cli(tmp_path, delta2):
    """A folder output's recipe and card record a command line that makes the same merge."""
    inputs = [delta2, FineTune(TASKS[0]), FineTune(ADAPTER)]
    sotu_delta.merge(BASE, inputs, tmp_path / "py", seed=3, slots=True, shard_size="100KB", quiet=True)
    cli("merge", "--base", BASE, *cli_words(inputs), "--seed", "3", "--slots", "-o", tmp_path / "cli",
        "--shard-size", "100KB", "-q")
    same_folders(tmp_path / "py", tmp_path / "cli")


def config_text(delta2, method="dare_ties"):
    """A mergekit configuration of two fine-tunes, the LoRA adapter and a delta file."""
    models = [
        {"model": str(BASE)},
        {"model": str(TASKS[0]), "parameters": {"weight": 0.5, "density": 0.5}},
        {"model": str(delta2), "parameters": {"weight": 0.25}},
        {"model": str(ADAPTER), "parameters": {"weight": 0.4, "density": 0.5}},
    ]
    config = {"merge_method": method, "base_model": str(BASE), "models": models,
              "parameters": {"normalize": True, "int8_mask": True}, "dtype": "bfloat16"}
    return json.dumps(config, indent=1)  # JSON is YAML


def test_a_mergekit_config_matches_the_cli(tmp_path, delta2):
    config = tmp_path / "merge.yml"
    config.write_text(config_text(delta2))
    (tmp_path / "py").mkdir(), (tmp_path / "cli").mkdir()
    py_out, cli_out = tmp_path / "py" / "m.safetensors", tmp_path / "cli" / "m.safetensors"
    with pytest.warns(sotu_delta.SotuDeltaWarning, match="int8_mask"):
        got = sotu_delta.merge(config=config, out=py_out, seed=7, quiet=True)
    p = cli("merge", "--config", config, "--seed", "7", "-o", cli_out, "--json")
    assert "int8_mask" in p.stderr
    same_files(py_out, cli_out)
    assert without_timing(got, tmp_path / "py") == without_timing(json.loads(p.stdout), tmp_path / "cli")
    record = json.loads(read_tensors(cli_out)[1]["sotu_delta"])
    assert record["mergekit"] == {"config": "merge.yml", "merge_method": "dare_ties"}
    with pytest.warns(sotu_delta.SotuDeltaWarning, match="int8_mask"):
        same_in_memory(sdnp.load_merged(config=config, seed=7), cli_out)

    # Under --slots, and to a folder whose recipe records a command that makes it again.
    config.write_text(config_text(delta2, "dare_linear"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sotu_delta.SotuDeltaWarning)
        sotu_delta.merge(config=config, out=tmp_path / "py" / "f", slots=True, files_from=0,
                         shard_size="100KB", quiet=True)
    cli("merge", "--config", config, "--slots", "--files-from", "0", "--shard-size", "100KB",
        "-o", tmp_path / "cli" / "f", "-q")
    same_folders(tmp_path / "py" / "f", tmp_path / "cli" / "f")


def write_f32(path, values):
    """A one-tensor f32 checkpoint holding `values`."""
    w = np.asarray(values, dtype="<f4")
    header = json.dumps({"w": {"dtype": "F32", "shape": [w.size], "data_offsets": [0, w.nbytes]}})
    header += " " * (-len(header) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(header)) + header.encode() + w.tobytes())


def test_a_non_finite_fine_tune_needs_allow_nonfinite(tmp_path):
    base, tuned = tmp_path / "base.safetensors", tmp_path / "nan.safetensors"
    values = np.linspace(-1, 1, 64, dtype=np.float32)
    write_f32(base, values)
    bad = values + np.float32(0.01)
    bad[5] = np.nan
    write_f32(tuned, bad)
    out = tmp_path / "py.safetensors"
    want, code = cli_error("merge", "--base", base, "--tuned", tuned, "-o", tmp_path / "cli.safetensors")
    assert code == 1
    for call in (lambda: sotu_delta.merge(base, [FineTune(tuned)], out, quiet=True),
                 lambda: sdnp.load_merged(base, FineTune(tuned))):
        with pytest.raises(sotu_delta.SotuDeltaError) as e:
            call()
        assert str(e.value) == want
        assert str(tuned) in str(e.value) and not isinstance(e.value, sotu_delta.SotuDeltaUsageError)
    assert not out.exists()
    # Allowed, the NaN is merged, as on the command line, which warns of it.
    with pytest.warns(sotu_delta.SotuDeltaWarning, match="infinite or NaN"):
        sotu_delta.merge(base, [FineTune(tuned)], out, allow_nonfinite=True, quiet=True)
    cli("merge", "--base", base, "--tuned", tuned, "--allow-nonfinite", "-o", tmp_path / "cli.safetensors", "-q")
    same_files(out, tmp_path / "cli.safetensors")
    assert np.isnan(np.frombuffer(read_tensors(out)[0]["w"][2], "<f4")[5])


def test_bad_configs_raise_with_the_cli_message_naming_the_file(tmp_path, delta2):
    config = tmp_path / "merge.yml"
    for text in ("merge_method: ties\ncolour: blue\n", "merge_method: [\n",
                 f"merge_method: della\nbase_model: {BASE}\nmodels:\n  - model: {TASKS[0]}\n"):
        config.write_text(text)
        want, code = cli_error("merge", "--config", config, "-o", tmp_path / "o.safetensors")
        for call in (lambda: sotu_delta.merge(config=config, out=tmp_path / "o.safetensors"),
                     lambda: sdnp.load_merged(config=config)):
            with pytest.raises(sotu_delta.SotuDeltaError) as e:
                call()
            assert str(e.value) == want and str(config) in str(e.value)
            assert isinstance(e.value, sotu_delta.SotuDeltaUsageError) == (code == 2)
    missing = tmp_path / "nope.yml"
    with pytest.raises(sotu_delta.SotuDeltaError, match="nope.yml"):
        sotu_delta.merge(config=missing, out=tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_options_a_config_gives_are_refused_beside_it(tmp_path, delta2):
    config = tmp_path / "merge.yml"
    config.write_text(config_text(delta2))
    out = tmp_path / "o.safetensors"
    refused = [
        ({"base": BASE}, ["--base", BASE]),
        ({"deltas": [delta2]}, [delta2]),
        ({"deltas": [FineTune(TASKS[0])]}, ["--tuned", TASKS[0]]),
        ({"weights": [1]}, ["--weights", "1"]),
        ({"method": "ties"}, ["--method", "ties"]),
        ({"rescale": True}, ["--rescale"]),
        ({"alpha": 0.5}, ["--alpha", "0.5"]),
        ({"trim": 0.5}, ["--trim", "0.5"]),
        ({"density": 0.5}, ["--density", "0.5"]),
        ({"dtype": "f32"}, ["--dtype", "f32"]),
    ]
    for kw, args in refused:
        want, code = cli_error("merge", "--config", config, *args, "-o", out)
        assert code == 2, (kw, want)
        with pytest.raises(sotu_delta.SotuDeltaUsageError) as e:
            sotu_delta.merge(config=config, out=out, **kw)
        assert str(e.value) == want and str(config) in str(e.value), kw
        with pytest.raises(sotu_delta.SotuDeltaUsageError) as e:
            sdnp.load_merged(config=config, **{"base": None, **kw})
        assert str(e.value) == want, kw
    assert not out.exists()


def test_inputs_stated_wrongly_are_usage_errors(tmp_path, delta2):
    out = tmp_path / "o.safetensors"
    # Mask options without a fine-tune: the command line's message.
    want, code = cli_error("merge", "--base", BASE, delta2, "--seed", "3", "-o", out)
    assert code == 2
    with pytest.raises(sotu_delta.SotuDeltaUsageError) as e:
        sotu_delta.merge(BASE, [delta2], out, seed=3)
    assert str(e.value) == want
    with pytest.raises(sotu_delta.SotuDeltaUsageError, match="at least one delta"):
        sotu_delta.merge(BASE, [], out)
    with pytest.raises(sotu_delta.SotuDeltaUsageError, match="config="):
        sdnp.load_merged(deltas=[delta2])
    with pytest.raises(TypeError, match="out="):
        sotu_delta.merge(BASE, [delta2])
    with pytest.raises(sotu_delta.SotuDeltaUsageError, match="--slots"):
        sotu_delta.merge(BASE, [FineTune(t) for t in TASKS], out, slots=True, density=1.5)
    # A state dict is not a merge input (extract takes one).
    with pytest.raises(sotu_delta.SotuDeltaUsageError, match="state dict"):
        sdnp.load_merged(BASE, {"w": np.zeros(2, np.float32)})
    assert not out.exists()
