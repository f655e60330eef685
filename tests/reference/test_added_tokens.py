"""A fine-tune that adds tokens (docs/FORMAT.md section 12, grown tensors; section 13, the
fine-tune's own files), on fixtures/tiny/added-tokens/.

    SOTU_BIN=target/release/sotu-delta .venv/bin/python -m pytest -q tests/reference/test_added_tokens.py

Group a checks the numpy reference (sotu_ref.py, written from FORMAT.md) on the fixture: what
extract stores, that a delta round-trips through its writer and reader, and what readers refuse.
Group b (class TestBinary) runs the binary and requires its deltas to decode, in the reference,
to exactly the reference's delta, its merges and applies to equal the reference's bit for bit
(`ties` too; `iso` and `tsv` within the tolerance of METHODS.md), and its single-file deltas to
open with the `safetensors` package, own files and new rows included.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sotu_ref as ref  # noqa: E402
from sotu_bin import run as run_bin  # noqa: E402
from test_methods import assert_within_tolerance  # noqa: E402
from test_reference import assert_same_delta, assert_same_tensors  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FIX = REPO / "fixtures" / "tiny" / "added-tokens"
BASE, TUNED = FIX / "base", FIX / "tuned"
EMBED, LM_HEAD, NORM = "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"
CARRIED = ["added_tokens.json", "chat_template.jinja", "config.json", "tokenizer_config.json"]


def tensors_of(path):
    return ref.read_checkpoint(path)[1]


def write_model(folder, tensors, files=()):
    os.makedirs(folder, exist_ok=True)
    ref.write_safetensors(Path(folder) / "model.safetensors", tensors, {"format": "pt"})
    for name, data in files:
        (Path(folder) / name).write_bytes(data)


def perturbed(tensors, seed):
    """Another fine-tune of the same shapes: the low bits of about half the BF16 elements moved."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, t in sorted(tensors.items()):
        bits = t.array().copy()
        flip = rng.integers(0, 2, size=bits.size).astype(bool)
        bits[flip] ^= rng.integers(1, 4, size=int(flip.sum())).astype(bits.dtype)
        out[name] = ref.Tensor(t.dtype, t.shape, bits.tobytes())
    return out


# =============================================================================================
# Group a: the reference
# =============================================================================================

def test_reference_extract_stores_the_grown_rows_and_the_changed_files(tmp_path):
    lo, hi = ref.interval(0.25)
    want = ref.extract(BASE, TUNED, 7, lo, hi)
    tuned = tensors_of(TUNED)
    for name in (EMBED, LM_HEAD):
        e = want.entries[name]
        assert (e.kind, e.shape, e.grown_shape) == ("masked", (2051, 32), (2053, 32))
        assert e.grown.shape == (2, 32) and e.grown.data == tuned[name].data[2 * 2051 * 32:]
        assert e.offsets.size == 3  # the part the base has spans two chunks
    assert want.entries[NORM].grown_shape is None
    assert sorted(want.files) == CARRIED
    for name in CARRIED:
        assert want.files[name] == (TUNED / name).read_bytes()
    path = tmp_path / "d.safetensors"
    ref.write_delta(path, want)
    got = ref.decode_delta(path)
    assert_same_delta(got, want, "roundtrip")
    assert np.array_equal(got.stats, want.stats)
    assert ref.extract(BASE, TUNED, 7, lo, hi, files=False).files == {}


def test_reference_apply_at_density_1_rebuilds_the_grown_fine_tune(tmp_path):
    path = tmp_path / "d.safetensors"
    ref.write_delta(path, ref.extract(BASE, TUNED))
    got = ref.apply(BASE, path, rescale=False)
    want = ref.read_tensors(TUNED)
    assert_same_tensors(got, want, "apply of a density-1 delta")


def _edited(src, dst, meta_edit=None, tensors_edit=None):
    meta, tensors = ref.read_safetensors(src)
    if meta_edit:
        meta_edit(meta)
    if tensors_edit:
        tensors_edit(tensors)
    ref.write_safetensors(dst, tensors, meta)
    return dst


def test_reference_refuses_malformed_grown_records_and_own_files(tmp_path):
    lo, hi = ref.interval(0.1)
    good = tmp_path / "good.safetensors"
    ref.write_delta(good, ref.extract(BASE, TUNED, 1, lo, hi))
    ref.decode_delta(good)

    def entry(name, key, value):
        def edit(meta):
            table = json.loads(meta["tensors"])
            if value is None:
                table[name].pop(key)
            else:
                table[name][key] = value
            meta["tensors"] = json.dumps(table)
        return edit

    def files(edit):
        def f(meta):
            rec = json.loads(meta["files"])
            edit(rec)
            meta["files"] = json.dumps(rec)
        return f

    cfg = "tokenizer_config.json"
    bad = {
        "other-dim": dict(meta_edit=entry(EMBED, "grown_shape", [2053, 33])),
        "fewer-rows": dict(meta_edit=entry(EMBED, "grown_shape", [2050, 32])),
        "no-grown-shape": dict(meta_edit=entry(EMBED, "grown_shape", None)),
        "rows-missing": dict(tensors_edit=lambda t: t.pop(ref.GROWN_PREFIX + EMBED)),
        "file-unrecorded": dict(tensors_edit=lambda t: t.update(
            {ref.FILES_PREFIX + "x.json": ref.Tensor("U8", (2,), b"{}")})),
        "file-changed": dict(tensors_edit=lambda t: t.update(
            {ref.FILES_PREFIX + cfg: ref.Tensor("U8", t[ref.FILES_PREFIX + cfg].shape,
                                                b"!" + t[ref.FILES_PREFIX + cfg].data[1:])})),
        "file-bad-name": dict(meta_edit=files(lambda r: r.update({"../x": r.pop(cfg)}))),
        "files-over-limit": dict(meta_edit=files(lambda r: r[cfg].update({"len": 70 << 20}))),
    }
    for tag, kw in bad.items():
        with pytest.raises(ref.FormatError):
            ref.decode_delta(_edited(good, tmp_path / f"{tag}.safetensors", **kw))


def test_reference_merge_refuses_two_deltas_that_grow_a_tensor_differently(tmp_path):
    tuned = tensors_of(TUNED)
    more = dict(tuned)
    for name in (EMBED, LM_HEAD):
        t = tuned[name]
        more[name] = ref.Tensor(t.dtype, (2054, 32), t.data + t.data[-64:])
    write_model(tmp_path / "more", more)
    a, c = tmp_path / "a.safetensors", tmp_path / "c.safetensors"
    ref.write_delta(a, ref.extract(BASE, TUNED, 1, *ref.interval(slot="0/2")))
    ref.write_delta(c, ref.extract(BASE, tmp_path / "more", 1, *ref.interval(slot="1/2")))
    with pytest.raises(ref.FormatError):
        ref.merge(BASE, [a, c])


# =============================================================================================
# Group b: the binary against the reference
# =============================================================================================

@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder with: the growing delta a.safetensors (slot 0/2) and its folder form adir/, the
    delta b.safetensors (slot 1/2) of tuned2/, a fine-tune of the base that does not grow, and
    the decoded deltas."""
    d = tmp_path_factory.mktemp("added-tokens")
    write_model(d / "tuned2", perturbed(tensors_of(BASE), 5))
    run_bin("extract", "--base", BASE, "--tuned", TUNED, "-o", d / "a.safetensors", "--slot", "0/2", "--seed", "7")
    run_bin("extract", "--base", BASE, "--tuned", TUNED, "-o", d / "adir", "--slot", "0/2", "--seed", "7",
            "--shard-size", "20KB")
    run_bin("extract", "--base", BASE, "--tuned", d / "tuned2", "-o", d / "b.safetensors", "--slot", "1/2",
            "--seed", "7")
    return d


@pytest.mark.usefixtures("work")
class TestBinary:
    def test_extract_matches_the_reference_in_both_forms(self, work):
        want = ref.extract(BASE, TUNED, 7, *ref.interval(slot="0/2"))
        assert sorted(want.files) == CARRIED
        for form in ("a.safetensors", "adir"):
            got = ref.decode_delta(work / form)
            assert got.metadata["format_version"] == "1.2"
            assert_same_delta(got, want, f"binary delta {form}")
            assert np.array_equal(got.stats, want.stats), f"{form}: sotu/stats"
        assert (work / "adir" / ref.INDEX).exists(), "test design: a sharded folder delta"
        for name in CARRIED:
            assert (work / "adir" / name).read_bytes() == (TUNED / name).read_bytes(), name
        assert not any(k.startswith(ref.FILES_PREFIX) for k in tensors_of(work / "adir"))
        plain = ref.decode_delta(work / "b.safetensors")
        assert plain.files == {} and "files" not in plain.metadata
        assert all(e.grown_shape is None for e in plain.entries.values())

    def test_python_safetensors_opens_the_delta_with_its_files_and_new_rows(self, work):
        path = work / "a.safetensors"
        decoded = ref.decode_delta(path)
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata()
            assert meta["format_version"] == "1.2"
            records = json.loads(meta["files"])
            assert sorted(records) == CARRIED
            for name in CARRIED:
                data = f.get_tensor(ref.FILES_PREFIX + name)
                assert data.dtype == np.uint8 and data.tobytes() == (TUNED / name).read_bytes()
                assert records[name]["len"] == data.size
            assert {ref.GROWN_PREFIX + EMBED, ref.GROWN_PREFIX + LM_HEAD} <= set(f.keys())
        # BF16 has no numpy dtype: the new rows' raw bytes through safetensors.deserialize.
        raw = {name: info for name, info in safetensors.deserialize(path.read_bytes())}
        for name in (EMBED, LM_HEAD):
            rows = raw[ref.GROWN_PREFIX + name]
            assert (rows["dtype"], rows["shape"]) == ("BF16", [2, 32])
            assert bytes(rows["data"]) == decoded.entries[name].grown.data

    @pytest.mark.parametrize("options", [
        {},
        {"weights": [0.5, 1.5], "rescale": True},
        {"out_dtype": "f32"},
        {"weights": [0.5, 1.5], "rescale": True, "out_dtype": "f16"},
    ], ids=["plain", "weights-rescale", "dtype-f32", "weights-rescale-dtype-f16"])
    def test_merge_of_a_growing_and_a_plain_delta_matches_the_reference(self, work, options):
        tag = "-".join(f"{k}{v}" for k, v in options.items()).replace(" ", "").replace(",", "_") or "plain"
        deltas = [work / "a.safetensors", work / "b.safetensors"]
        for form, out in (("file", work / f"m-{tag}.safetensors"), ("folder", work / f"m-{tag}")):
            args = ["merge", "--base", BASE, *deltas, "-o", out, "--shard-size", "100KB"]
            if "weights" in options:
                args += ["--weights", ",".join(str(w) for w in options["weights"])]
            if options.get("rescale"):
                args.append("--rescale")
            if "out_dtype" in options:
                args += ["--dtype", options["out_dtype"]]
            run_bin(*args)
            want = ref.merge(BASE, deltas, weights=options.get("weights"),
                             rescale=options.get("rescale", False), out_dtype=options.get("out_dtype"))
            assert want[EMBED][1] == (2053, 32)
            assert_same_tensors(ref.read_tensors(out), want, f"merge {options} into a {form}")

    def test_apply_matches_the_reference_and_writes_the_files(self, work):
        for delta in ("a.safetensors", "adir"):
            out = work / f"apply-{delta.split('.')[0]}"
            run_bin("apply", "--base", BASE, work / delta, "-o", out)
            assert_same_tensors(ref.read_tensors(out), ref.apply(BASE, work / "a.safetensors"), f"apply {delta}")
            for name in CARRIED:
                assert (out / name).read_bytes() == (TUNED / name).read_bytes(), f"apply {delta}: {name}"
            for name in ("generation_config.json", "tokenizer.json"):
                assert (out / name).read_bytes() == (BASE / name).read_bytes(), f"apply {delta}: {name}"
            # The base's card is replaced by the output's own (issue #13, tests/release.rs).
            assert (out / "README.md").read_text().startswith("---\nbase_model: "), f"apply {delta}: card"

    @pytest.mark.parametrize("method", ["ties", "iso", "tsv"])
    def test_methods_match_the_reference_on_a_grown_tensor(self, work, method):
        deltas = [work / "a.safetensors", work / "b.safetensors"]
        out = work / f"{method}.safetensors"
        run_bin("merge", "--base", BASE, *deltas, "-o", out, "--method", method)
        residuals = {}
        want = ref.merge_method(BASE, deltas, method, residuals=residuals)
        got = ref.read_tensors(out)
        assert got[EMBED][1] == (2053, 32)
        if method == "ties":
            assert_same_tensors(got, want, method)
            return
        # The new rows exact; the rows the base has within the tolerance of METHODS.md.
        cut = 2 * 2051 * 32
        for name in (EMBED, LM_HEAD):
            assert residuals[name].size == 2051 * 32, f"{method}: {name}: R covers the base's rows"
            assert got[name][2][cut:] == want[name][2][cut:], f"{method}: {name}: the new rows"
        assert_within_tolerance(got, want, residuals, method)
