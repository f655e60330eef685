"""Weight files in subfolders (docs/FORMAT.md section 15), on fixtures/tiny/sentence-transformers/:
a base folder with a Dense layer's checkpoint in 2_Dense/model.safetensors, and two fine-tunes
that change it too.

    SOTU_BIN=target/release/sotu-delta .venv/bin/python -m pytest -q tests/reference/test_subfolders.py

The binary's deltas must decode in the reference (sotu_ref.py, written from FORMAT.md), whose
chunk walk checks the kept set of every subfolder tensor against the mask keyed by its stored key,
and must store exactly the fine-tune's values there; the binary's merges and applies must give,
for the Dense layer's tensors, exactly what the reference's merge of that file gives (`sum`
with weights, `apply`, `ties`; `iso` and `tsv` within METHODS.md's tolerance), the top-level
tensors as before, and a delta that does not cover the file must contribute nothing to it.
"""

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sotu_ref as ref  # noqa: E402
from sotu_bin import run as run_bin  # noqa: E402
from test_methods import assert_within_tolerance  # noqa: E402
from test_reference import assert_same_tensors  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FIX = REPO / "fixtures" / "tiny" / "sentence-transformers"
BASE, TUNED, TUNED2 = FIX / "base", FIX / "tuned", FIX / "tuned2"
DENSE = "2_Dense/model.safetensors"


def tensors_of(path):
    return {n: (t.dtype, t.shape, t.data) for n, t in ref.read_checkpoint(path)[1].items()}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Deltas of the two fine-tunes (different seeds and densities), and of a fine-tune folder
    without the Dense weights (a delta that does not cover the file)."""
    d = tmp_path_factory.mktemp("subfolders")
    uncovered = d / "tuned3"
    shutil.copytree(TUNED2, uncovered)
    (uncovered / DENSE).unlink()
    run_bin("extract", "--base", BASE, "--tuned", TUNED, "--density", "0.5", "-o", d / "d1.st")
    run_bin("extract", "--base", BASE, "--tuned", TUNED2, "--density", "0.3", "--seed", "7",
            "-o", d / "d2.st")
    run_bin("extract", "--base", BASE, "--tuned", uncovered, "--density", "0.4", "--seed", "9",
            "-o", d / "d3.st")
    return d


def test_delta_records_the_dense_file_under_its_prefix(work):
    d = ref.decode_delta(work / "d1.st")  # the reference checks every chunk walk
    assert d.metadata["format_version"] == "1.2"
    assert sorted(d.subfolders) == [DENSE]
    sub = d.subfolders[DENSE]
    tuned = ref.read_checkpoint(TUNED / DENSE)[1]
    assert sorted(sub.entries) == sorted(tuned)
    for name, e in sub.entries.items():
        assert e.kind == "masked", name
        key = f"sotu/sub/{DENSE}/{name}"
        mask = ref.kept_mask(d.seed, key, ref.numel(e.shape), d.lo, d.hi)
        assert np.array_equal(e.indices, np.flatnonzero(mask)), name
        want = tuned[name].array()[mask]
        assert e.values.tobytes() == want.tobytes(), name
        # A mask keyed by the bare name would be another one: the key is the stored key.
        other = ref.kept_mask(d.seed, name, ref.numel(e.shape), d.lo, d.hi)
        assert not np.array_equal(mask, other), name
    assert "sotu/sub/" + DENSE + "/sotu/base_hashes" in ref.read_checkpoint(work / "d1.st")[1]
    # The base fingerprint is the top level's alone.
    assert sorted(d.entries) == sorted(ref.read_checkpoint(BASE / "model.safetensors")[1])
    assert ref.decode_delta(work / "d3.st").subfolders == {}


def test_merge_with_weights_matches_reference(work):
    out = work / "m-sum"
    run_bin("merge", "--base", BASE, work / "d1.st", work / "d2.st", work / "d3.st",
            "--weights", "0.7,1.3,-0.5", "-o", out)
    deltas = [work / f"d{k}.st" for k in (1, 2, 3)]
    want = ref.merge_subfolder(BASE, deltas, DENSE, weights=[0.7, 1.3, -0.5])
    assert_same_tensors(tensors_of(out / DENSE), want, "merged Dense layer")
    top = ref.merge(BASE / "model.safetensors", deltas, weights=[0.7, 1.3, -0.5])
    assert_same_tensors(tensors_of(out / "model.safetensors"), top, "merged top level")


def test_apply_matches_reference_and_density_one_rebuilds(work):
    run_bin("apply", "--base", BASE, work / "d1.st", "-o", work / "a")
    want = ref.merge_subfolder(BASE, [work / "d1.st"], DENSE, rescale=True)
    assert_same_tensors(tensors_of(work / "a" / DENSE), want, "applied Dense layer")
    run_bin("extract", "--base", BASE, "--tuned", TUNED, "--density", "1", "-o", work / "full.st")
    run_bin("apply", "--no-rescale", "--base", BASE, work / "full.st", "-o", work / "a1")
    assert_same_tensors(tensors_of(work / "a1" / DENSE), tensors_of(TUNED / DENSE), "rebuilt Dense")


@pytest.mark.parametrize("method", ["ties", "iso", "tsv"])
def test_methods_match_reference(work, method):
    out = work / f"m-{method}"
    deltas = [work / f"d{k}.st" for k in (1, 2, 3)]
    run_bin("merge", "--method", method, "--base", BASE, *deltas, "-o", out)
    residuals = {}
    want = ref.merge_subfolder(BASE, deltas, DENSE, method=method, residuals=residuals)
    got = tensors_of(out / DENSE)
    if method == "ties":
        assert_same_tensors(got, want, f"{method} Dense layer")
    else:
        assert_within_tolerance(got, want, residuals, f"{method} Dense layer")
