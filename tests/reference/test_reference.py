"""Tests of the independent reference (sotu_ref.py) and of the sotu-delta binary against it.

    .venv/bin/python -m pytest tests/reference                      # everything
    .venv/bin/python -m pytest tests/reference -k "not TestBinary"  # reference only (group a)

Group a (module-level tests) checks the reference against FORMAT.md itself: the known-answer
vectors, the rounding, the interval arithmetic, and properties of extract/decode/merge on the
fixtures. Group b (class TestBinary) runs the real binary (env SOTU_BIN, default
target/release/sotu-delta in the repository) and requires its output to agree with the
reference bit for bit. A missing binary is a failure, not a skip.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sotu_ref as ref  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "fixtures" / "tiny"
VARIANTS = ["f32", "f16", "bf16"]
TASKS = [1, 2, 3]


def fixture(model, variant):
    path = FIXTURES / f"{model}-{variant}.safetensors"
    if not path.exists():
        pytest.fail(f"{path} is missing: run `.venv/bin/python fixtures/make_fixtures.py`")
    return path


def assert_same_tensors(got, want, what):
    """got, want: {name: (dtype, shape, bytes)}. Bit-exact, with a useful message on failure."""
    assert sorted(got) == sorted(want), f"{what}: tensor names differ"
    for name in sorted(want):
        gd, gs, gb = got[name]
        wd, ws, wb = want[name]
        assert (gd, tuple(gs)) == (wd, tuple(ws)), f"{what}: {name}: dtype/shape {gd}{list(gs)} != {wd}{list(ws)}"
        if gb != wb:
            size = ref.DTYPES[wd][0]
            g = np.frombuffer(gb, dtype=f"<u{size}") if size > 1 else np.frombuffer(gb, np.uint8)
            w = np.frombuffer(wb, dtype=f"<u{size}") if size > 1 else np.frombuffer(wb, np.uint8)
            bad = np.flatnonzero(g != w)
            i = int(bad[0])
            pytest.fail(f"{what}: {name}: {bad.size} of {w.size} elements differ; "
                        f"first at flat index {i}: got {int(g[i]):#x}, want {int(w[i]):#x}")


def assert_same_delta(got, want, what):
    """Same logical content: interval, kinds, rows, kept indices, values, offsets, hashes."""
    assert (got.seed, got.lo, got.hi, got.chunk) == (want.seed, want.lo, want.hi, want.chunk), what
    assert sorted(got.entries) == sorted(want.entries), f"{what}: tensor names differ"
    for name, w in want.entries.items():
        g = got.entries[name]
        label = f"{what}: {name}"
        assert (g.kind, g.dtype, tuple(g.shape), g.row, g.in_base) == \
            (w.kind, w.dtype, tuple(w.shape), w.row, w.in_base), label
        if w.kind == "masked":
            assert g.kept == w.kept, label
            assert np.array_equal(g.indices, w.indices), f"{label}: kept indices differ"
            assert np.array_equal(g.offsets, w.offsets), f"{label}: offsets differ"
            assert np.ascontiguousarray(g.values).tobytes() == np.ascontiguousarray(w.values).tobytes(), \
                f"{label}: kept values differ"
        if w.kind == "whole":
            assert (g.whole.dtype, g.whole.shape, g.whole.data) == (w.whole.dtype, w.whole.shape, w.whole.data), label
        assert g.grown_shape == w.grown_shape, f"{label}: grown_shape"
        if w.grown_shape is not None:
            assert (g.grown.dtype, g.grown.shape, g.grown.data) == (w.grown.dtype, w.grown.shape, w.grown.data), \
                f"{label}: the new rows differ"
    assert np.array_equal(got.base_hashes, want.base_hashes), f"{what}: sotu/base_hashes differ"
    assert got.files == want.files, f"{what}: own files differ: {sorted(got.files)} vs {sorted(want.files)}"


# =============================================================================================
# Group a: the reference against FORMAT.md
# =============================================================================================

MIX32_VECTORS = {0x00000000: 0x00000000, 0x00000001: 0x86D2FA73, 0x00000002: 0x0DA7F4E7,
                 0xFFFFFFFF: 0x99B5E683, 0x12345678: 0x16E776BD}

U_INDICES = [0, 1, 2, 65535, 65536, 4294967295, 4294967296, 4294967297, 21474836487]
KEY_VECTORS = [
    (2411, "model.embed_tokens.weight", 0xFF9C2FDF, 0x3B51A234,
     [0xFB1D4194, 0xCE12928D, 0x9D4ECEB5, 0x9BB5E267, 0x0B71B362, 0x0727AED0, 0x0415D2E1, 0x4C8A6FA3, 0xC099E717]),
    (0, "", 0x45615E48, 0x61F7B866,
     [0x5F264C52, 0xC9BFE882, 0x69D536AC, 0x5AE8965B, 0x2F8D3232, 0x50733C42, 0x4CC22425, 0x46840B45, 0x89116E5B]),
    (2411, "model.layers.0.self_attn.q_proj.weight", 0x6A38959A, 0xCA8D426C,
     [0x45A05254, 0x89EA3579, 0x095C9C05, 0x0C635B86, 0x28E0B218, 0x11EBD86C, 0xC1D16D33, 0x0C827DE3, 0x1CEAF012]),
    (18446744073709551615, "lm_head.weight", 0x09D384D7, 0x84531F2D,
     [0x73519EE9, 0x3A4D08EF, 0x866CBA3D, 0x11DBDBF5, 0xE886780C, 0xC4358B45, 0xE22CF654, 0xDD8857AC, 0xC934649D]),
]


def test_mix32_known_answers():
    for x, want in MIX32_VECTORS.items():
        assert ref.mix32(x) == want, hex(x)
    xs = np.array(list(MIX32_VECTORS), dtype=np.uint32)
    assert ref.mix32(xs).tolist() == list(MIX32_VECTORS.values())


@pytest.mark.parametrize("seed,name,k0,k1,us", KEY_VECTORS, ids=lambda v: None)
def test_key_and_u_known_answers(seed, name, k0, k1, us):
    assert ref.key(seed, name) == (k0, k1)
    got = ref.u(seed, name, np.array(U_INDICES, dtype=np.uint64))
    assert [hex(v) for v in got.tolist()] == [hex(v) for v in us]
    # The scalar path and the vectorized path agree, one index at a time.
    assert [ref.u(seed, name, i) for i in U_INDICES] == us


def test_u_vectorized_over_large_indices():
    # A window crossing the 2^32 block boundary equals the per-element definition.
    start = (1 << 32) - 100
    idx = np.arange(start, start + 200, dtype=np.uint64)
    got = ref.u(5, "x", idx)
    k0, k1 = ref.key(5, "x")
    for i, v in zip(idx.tolist(), got.tolist()):
        c = ref.mix32(k1 ^ (i >> 32)) ^ k0
        assert v == ref.mix32((i & 0xFFFFFFFF) ^ c)


# ---- rounding ---------------------------------------------------------------------------------

def _random_f64(rng, n, emin, emax):
    """Random doubles with exponents spread over [emin, emax], random signs and mantissas."""
    e = rng.integers(emin, emax + 1, size=n)
    m = rng.random(n) + 1.0
    return np.ldexp(m, e) * rng.choice([-1.0, 1.0], size=n)


def _midpoints(values_f64):
    """Exact midpoints between consecutive sorted finite values (ties for a narrower format)."""
    v = np.unique(values_f64[np.isfinite(values_f64)])
    return (v[:-1] + v[1:]) / 2  # exact in f64: both are narrow-format values


def _edge_cases(dtype):
    p, emin, emax = ref.FLOAT_FORMATS[dtype]
    max_f = math.ldexp(2.0 - 2.0 ** -p, emax)
    half_ulp_max = math.ldexp(1.0, emax - p - 1)
    tiny = math.ldexp(1.0, emin - p)  # smallest subnormal
    xs = [0.0, -0.0, 1.0, -1.0, max_f, -max_f, max_f + half_ulp_max, max_f + half_ulp_max * 0.999,
          -(max_f + half_ulp_max), np.nextafter(max_f + half_ulp_max, 0), math.ldexp(1.0, emax + 1),
          tiny, tiny / 2, np.nextafter(tiny / 2, 1), tiny * 1.5, tiny * 2.5, -tiny / 2,
          math.ldexp(1.0, emin), math.ldexp(1.0, emin) - tiny / 2, 5e-324, -5e-324, 1e308, -1e308,
          np.inf, -np.inf, 1.0 + math.ldexp(1.0, -p - 1), 1.0 + 3 * math.ldexp(1.0, -p - 1)]
    return np.array(xs, dtype=np.float64)


def _bits(x, dtype):
    return np.ascontiguousarray(x).view(ref._BITS[dtype])


@pytest.mark.parametrize("dtype,npdt", [("F32", np.float32), ("F16", np.float16)])
def test_rounding_agrees_with_numpy_astype(dtype, npdt):
    rng = np.random.default_rng(1)
    p, emin, emax = ref.FLOAT_FORMATS[dtype]
    xs = [_random_f64(rng, 200_000, emin - p - 3, emax + 2), _edge_cases(dtype)]
    # Ties: midpoints between neighbours of the target format (normal and subnormal).
    with np.errstate(over="ignore"):
        narrow = _random_f64(rng, 20_000, emin - p, emax).astype(npdt).astype(np.float64)
    xs.append(_midpoints(narrow))
    sub = np.arange(0, 1 << p, dtype=np.float64) * math.ldexp(1.0, emin - p)
    xs.append(_midpoints(sub))
    xs.append(-_midpoints(sub))
    x = np.concatenate(xs)
    with np.errstate(over="ignore"):
        want = x.astype(npdt)
    got = ref.round_from_f64(x, dtype)
    assert np.array_equal(_bits(got, dtype), _bits(want, dtype))
    nan = ref.round_from_f64(np.array([np.nan, -np.nan]), dtype)
    assert _bits(nan, dtype).tolist() == [ref.CANONICAL_NAN[dtype]] * 2


def _all_16bit_values(dtype):
    """(bits, float64 values) of every 16-bit pattern of F16 or BF16."""
    bits = np.arange(0, 0x10000, dtype=np.uint32).astype(np.uint16)
    return bits, ref.to_f64(dtype, bits.view(ref.DTYPES[dtype][1]))


def _nearest_by_table(x, dtype):
    """Brute-force oracle for a 16-bit format: nearest of all 65536 values, ties to even bits."""
    bits, vals = _all_16bit_values(dtype)
    pos = np.flatnonzero((bits < 0x8000) & np.isfinite(vals))  # +0 .. +max, ascending with bits
    table = vals[pos]
    p, _, emax = ref.FLOAT_FORMATS[dtype]
    inf_bits = int(bits[(bits < 0x8000) & np.isinf(vals)][0])
    # 2^(emax+1) stands in for infinity: values at or past max + ulp/2 round there (ties to the
    # even pattern, which is infinity's).
    table = np.append(table, math.ldexp(1.0, emax + 1))
    tbits = np.append(pos, inf_bits).astype(np.uint32)
    a = np.minimum(np.abs(x), math.ldexp(1.0, emax + 1))
    j = np.clip(np.searchsorted(table, a, side="right") - 1, 0, table.size - 2)
    lo_d, hi_d = a - table[j], table[j + 1] - a
    up = (hi_d < lo_d) | ((hi_d == lo_d) & (tbits[j + 1] % 2 == 0))
    out = np.where(up, tbits[j + 1], tbits[j])
    return (out | np.where(np.signbit(x), 0x8000, 0)).astype(np.uint16)


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_rounding_16bit_against_brute_force(dtype):
    rng = np.random.default_rng(2)
    p, emin, emax = ref.FLOAT_FORMATS[dtype]
    _, every = _all_16bit_values(dtype)
    x = np.concatenate([_random_f64(rng, 200_000, emin - p - 3, emax + 2), _edge_cases(dtype),
                        _midpoints(every), -_midpoints(every), every[np.isfinite(every)]])
    assert np.array_equal(_bits(ref.round_from_f64(x, dtype), dtype), _nearest_by_table(x, dtype))


def test_bf16_rounding_is_single_not_double():
    # 1 + 2^-8 + 2^-40: via f32 it becomes the tie 1 + 2^-8, which rounds to even (1.0);
    # rounded once, directly, it is above the tie and must go up to 1 + 2^-7.
    x = np.array([1.0 + 2.0**-8 + 2.0**-40, -(1.0 + 2.0**-8 + 2.0**-40), 1.0 + 2.0**-8])
    assert ref.round_from_f64(x, "BF16").tolist() == [0x3F81, 0xBF81, 0x3F80]
    # The same trap for F16 through F32: 1 + 2^-11 + 2^-40 must go up to 1 + 2^-10.
    assert _bits(ref.round_from_f64(np.array([1.0 + 2.0**-11 + 2.0**-40]), "F16"), "F16").tolist() == [0x3C01]


def test_f64_output_only_canonicalizes_nan():
    x = np.array([1.5, -0.0, np.inf, 5e-324, np.nan], dtype=np.float64)
    weird_nan = np.array([0xFFF0000000000001], dtype=np.uint64).view(np.float64)
    got = _bits(ref.round_from_f64(np.concatenate([x, weird_nan]), "F64"), "F64")
    assert got[:4].tolist() == _bits(x[:4], "F64").tolist()
    assert got[4:].tolist() == [0x7FF8000000000000] * 2


# ---- interval -----------------------------------------------------------------------------------

def test_density_rounds_half_away_from_zero():
    assert ref.interval(0.1) == (0, 429496730)  # 429496729.6
    assert ref.interval(1.0) == (0, 1 << 32)
    assert ref.interval(0.0) == (0, 0)
    assert ref.density_count(2.5 / 2**32) == 3  # Python's round() would give 2
    assert ref.density_count(3.5 / 2**32) == 4
    assert ref.density_count(0.5 / 2**32) == 1
    assert ref.density_count(np.nextafter(0.5, 0) / 2**32) == 0
    with pytest.raises(ValueError):
        ref.density_count(1.5)


@pytest.mark.parametrize("n", range(1, 21))
def test_slots_tile_the_range(n):
    spans = [ref.interval(slot=f"{k}/{n}") for k in range(n)]
    assert spans[0][0] == 0 and spans[-1][1] == 1 << 32
    for (lo, hi), (lo2, _) in zip(spans, spans[1:]):
        assert hi == lo2
    widths = {hi - lo for lo, hi in spans}
    assert max(widths) - min(widths) <= 1 and sum(hi - lo for lo, hi in spans) == 1 << 32
    for k in range(n):
        assert spans[k] == (k * 2**32 // n, (k + 1) * 2**32 // n)


def test_slot_with_density():
    lo, end = ref.slot_span(1, 3)
    assert ref.interval(0.1, "1/3") == (lo, lo + 429496730)
    with pytest.raises(ValueError):
        ref.interval(0.5, "1/3")  # does not fit
    with pytest.raises(ValueError):
        ref.interval(slot="3/3")


def test_slot_masks_partition_a_tensor():
    name, n = "model.embed_tokens.weight", 65632
    masks = [ref.kept_mask(7, name, n, *ref.interval(slot=f"{k}/3")) for k in range(3)]
    count = sum(m.astype(int) for m in masks)
    assert np.all(count == 1)


@pytest.mark.parametrize("density", [1e-3, 0.01, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("start", [0, (1 << 32) - (1 << 19), 5 << 32])
def test_mask_kept_fraction_is_binomial(density, start):
    n = 1 << 20
    lo, hi = ref.interval(density)
    d = (hi - lo) / 2**32
    for seed, name in [(2411, "model.embed_tokens.weight"), (0, ""), (99, "lm_head.weight")]:
        kept = int(np.count_nonzero(ref.kept_mask(seed, name, n, lo, hi, start=start)))
        sigma = math.sqrt(n * d * (1 - d))
        assert abs(kept - n * d) <= 5 * sigma + 1, (seed, name, kept, n * d, sigma)


def test_mask_top_byte_is_uniform():
    """docs/FORMAT.md section 4: the top byte of u over consecutive indices shows no excess
    non-uniformity. The mean of 12 chi-squares (df 255, 2^22 indices each) must not exceed 255 by
    4 standard errors. Values below 255 are expected (about 225): consecutive indices XOR a key
    form an aligned block, and a bijection spreads a block more evenly than independent draws."""
    rng = np.random.default_rng(2024)
    n = 1 << 22
    chis = []
    for seed in rng.integers(0, 2**63, size=12):
        top = (ref.u(int(seed), "model.layers.0.mlp.up_proj.weight", np.arange(n, dtype=np.uint64)) >> 24).astype(np.int64)
        counts = np.bincount(top, minlength=256)
        expected = n / 256
        chis.append(float(((counts - expected) ** 2 / expected).sum()))
    mean = np.mean(chis)
    assert mean < 255 + 4 * np.sqrt(2 * 255) / np.sqrt(12), chis


def test_fixture_tensor_kept_fractions():
    _, tensors = ref.read_safetensors(fixture("task1", "bf16"))
    for density in (0.05, 0.3):
        lo, hi = ref.interval(density)
        for name, t in tensors.items():
            n = t.numel
            kept = int(np.count_nonzero(ref.kept_mask(2411, name, n, lo, hi)))
            assert abs(kept - n * density) <= 5 * math.sqrt(n * density * (1 - density)) + 1, name


# ---- fixtures -------------------------------------------------------------------------------------

def test_fixtures_are_reproducible_and_small(tmp_path):
    subprocess.run([sys.executable, str(REPO / "fixtures" / "make_fixtures.py"), str(tmp_path)],
                   check=True, capture_output=True)
    made = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(made) == 12
    for name in made:
        assert (tmp_path / name).read_bytes() == fixture(*name.split(".")[0].split("-")).read_bytes(), name
    # The added-tokens folders (docs/FORMAT.md sections 12 and 13), file for file.
    folders = sorted(p.relative_to(tmp_path) for p in (tmp_path / "added-tokens").rglob("*") if p.is_file())
    committed = sorted(p.relative_to(FIXTURES) for p in (FIXTURES / "added-tokens").rglob("*") if p.is_file())
    assert folders == committed and len(folders) == 14
    for rel in folders:
        assert (tmp_path / rel).read_bytes() == (FIXTURES / rel).read_bytes(), rel
    # The model fixtures (fixtures/bad/ holds the separate bad-input corpus).
    total = sum(p.stat().st_size for p in (REPO / "fixtures" / "tiny").rglob("*") if p.is_file())
    assert total < 4 * 1024 * 1024


@pytest.mark.parametrize("variant", VARIANTS)
def test_fixture_layout(variant):
    meta, base = ref.read_safetensors(fixture("base", variant))
    assert meta == {"format": "pt"}
    dt = {"f32": "F32", "f16": "F16", "bf16": "BF16"}[variant]
    assert base["model.embed_tokens.weight"].shape == (2051, 32)
    assert base["model.embed_tokens.weight"].numel == 65632
    assert base["model.logit_scale"].shape == () and base["model.logit_scale"].dtype == dt
    assert base["model.position_ids"].dtype == "I64"
    assert base["model.position_ids"].array().tolist() == list(range(16))
    assert "lm_head.weight" not in base and len(base) == 22
    _, t1 = ref.read_safetensors(fixture("task1", variant))
    assert t1["model.position_ids"].array().tolist() == list(range(1, 17))
    _, t2 = ref.read_safetensors(fixture("task2", variant))
    assert t2["model.norm.weight"].data == base["model.norm.weight"].data
    _, t3 = ref.read_safetensors(fixture("task3", variant))
    assert set(t3) - set(base) == {"score.weight"} and t3["score.weight"].shape == (3, 32)


# ---- extract / decode / merge of the reference ------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("task", TASKS)
def test_reference_extract_decode_roundtrip(tmp_path, variant, task):
    lo, hi = ref.interval(slot=f"{task - 1}/3")
    want = ref.extract(fixture("base", variant), fixture(f"task{task}", variant), 7, lo, hi)
    path = tmp_path / "d.safetensors"
    ref.write_delta(path, want, slot=f"{task - 1}/3")
    got = ref.decode_delta(path)
    assert_same_delta(got, want, "roundtrip")
    assert np.array_equal(got.stats, want.stats)
    e = want.entries
    assert e["model.embed_tokens.weight"].kind == "masked"
    assert e["model.embed_tokens.weight"].offsets.size == 3  # two chunks
    assert e["model.position_ids"].kind == ("whole" if task == 1 else "same")
    if task == 2:
        assert e["model.norm.weight"].kind == "same"
    if task == 3:
        assert e["score.weight"].kind == "whole" and not e["score.weight"].in_base
        assert not np.any(want.base_hashes[e["score.weight"].row])
    # Kept values are the fine-tuned values at the kept indices.
    _, tuned = ref.read_safetensors(fixture(f"task{task}", variant))
    emb = e["model.embed_tokens.weight"]
    assert np.array_equal(emb.values, tuned["model.embed_tokens.weight"].array()[emb.indices.astype(np.intp)])


def _rewrite_delta(src, dst, edit_meta=None, edit_tensors=None):
    meta, tensors = ref.read_safetensors(src)
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    ref.write_safetensors(dst, tensors, meta)


def test_decode_refuses_bad_deltas(tmp_path):
    lo, hi = ref.interval(0.2)
    good = tmp_path / "good.safetensors"
    ref.write_delta(good, ref.extract(fixture("base", "f16"), fixture("task1", "f16"), 3, lo, hi))
    ref.decode_delta(good)

    def variant(tag, **kw):
        p = tmp_path / f"{tag}.safetensors"
        _rewrite_delta(good, p, **kw)
        return p

    ok = variant("minor", edit_meta=lambda m: m.update(format_version="1.7", extra_key="x"))
    ref.decode_delta(ok)  # a larger minor stays readable
    name = "model.layers.0.mlp.up_proj.weight"

    def shift_offsets(t):
        o = t["sotu/offsets/" + name]
        arr = o.array().copy()
        arr[0] = 1
        t["sotu/offsets/" + name] = ref.Tensor("U64", o.shape, arr.tobytes())

    def drop_value(t):
        v = t[name]
        t[name] = ref.Tensor(v.dtype, (v.shape[0] - 1,), v.data[:-2])

    def bad_kept(m):
        table = json.loads(m["tensors"])
        table[name]["kept"] += 1
        m["tensors"] = json.dumps(table)

    bad = {
        "major": dict(edit_meta=lambda m: m.update(format_version="2.0")),
        "mask": dict(edit_meta=lambda m: m.update(mask="sotu-mix32-v2")),
        "format": dict(edit_meta=lambda m: m.update(format="pt")),
        "lohi": dict(edit_meta=lambda m: m.update(lo="10", hi="5")),
        "hi": dict(edit_meta=lambda m: m.update(hi=str((1 << 32) + 1))),
        "chunk": dict(edit_meta=lambda m: m.update(chunk="0")),
        "seed": dict(edit_meta=lambda m: m.update(seed="4")),  # another mask: walks disagree
        "offsets": dict(edit_tensors=shift_offsets),
        "values": dict(edit_tensors=drop_value),
        "kept": dict(edit_meta=bad_kept),
        "tensors": dict(edit_meta=lambda m: m.update(tensors="[1]")),
    }
    for tag, kw in bad.items():
        with pytest.raises(ref.FormatError):
            ref.decode_delta(variant(tag, **kw))
            pytest.fail(f"accepted a delta with a bad {tag}")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("task", TASKS)
def test_reference_apply_at_density_1_reproduces_tuned(variant, task):
    base, tuned = fixture("base", variant), fixture(f"task{task}", variant)
    delta = ref.extract(base, tuned, 2411, *ref.interval(1.0))
    assert delta.stats[:, 2].sum() == 0
    assert_same_tensors(ref.apply(base, delta), ref.read_tensors(tuned), "apply(density 1)")


@pytest.mark.parametrize("variant", VARIANTS)
def test_reference_merge_of_disjoint_slots_is_the_tune(variant):
    # Slots 0/3..2/3 of one fine-tune keep every element exactly once, so their plain merge is
    # the fine-tune itself.
    base, tuned = fixture("base", variant), fixture("task1", variant)
    deltas = [ref.extract(base, tuned, 11, *ref.interval(slot=f"{k}/3")) for k in range(3)]
    assert_same_tensors(ref.merge(base, deltas), ref.read_tensors(tuned), "merge of slots")


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_reference_merge_keeps_negative_zero_where_nothing_is_kept(dtype):
    # §8: acc starts at -0.0, so an untouched element is round(b) = b, even for b = -0.0.
    n = 4096
    b = np.full(n, -0.0)
    b[::3] = 0.0
    t = np.full(n, 0.25)  # every element changes, to a value that b + (v - b) reproduces
    base = {"w": ref.Tensor(dtype, (n,), ref.round_to_bytes(b, dtype))}
    tuned = {"w": ref.Tensor(dtype, (n,), ref.round_to_bytes(t, dtype))}
    delta = ref.extract(base, tuned, 1, *ref.interval(slot="0/2"))
    out = ref.merge(base, [delta])
    want = np.where(ref.kept_mask(1, "w", n, *ref.interval(slot="0/2")), t, b)
    assert out["w"][2] == ref.round_to_bytes(want, dtype)
    assert np.count_nonzero(np.signbit(want)) > n // 4
    # The converse is a documented limit: a kept v = -0.0 comes out +0.0 (b + (v - b) = +0.0),
    # and the third column of sotu/stats counts it.
    one = {"w": ref.Tensor(dtype, (n,), ref.round_to_bytes(np.ones(n), dtype))}
    negz = {"w": ref.Tensor(dtype, (n,), ref.round_to_bytes(np.full(n, -0.0), dtype))}
    d = ref.extract(one, negz, 1, *ref.interval(slot="0/2"))
    assert d.stats[0, 2] == d.entries["w"].kept > 0
    got = ref.to_f64(dtype, np.frombuffer(ref.merge(one, [d])["w"][2], ref.DTYPES[dtype][1]))
    assert not np.any(np.signbit(got[d.entries["w"].indices.astype(np.intp)]))
    # A non-canonical NaN in the base (here negative) comes out canonical where a delta keeps
    # the element, and as its own bits where none does (the dtype is unchanged).
    neg_nan = {"F32": 0xFFC00001, "F16": 0xFE01, "BF16": 0xFFC1}[dtype]
    bits = np.frombuffer(base["w"].data, ref._BITS[dtype]).copy()
    bits[:8] = neg_nan
    nan_base = {"w": ref.Tensor(dtype, (n,), bits.tobytes())}
    out = ref.merge(nan_base, [ref.extract(nan_base, tuned, 1, *ref.interval(slot="0/2"))])
    kept = ref.kept_mask(1, "w", n, *ref.interval(slot="0/2"))[:8]
    assert 0 < np.count_nonzero(kept) < 8  # both cases occur
    out_bits = np.frombuffer(out["w"][2], ref._BITS[dtype])[:8]
    assert np.all(out_bits[kept] == ref.CANONICAL_NAN[dtype])  # kept: v - NaN is NaN as well
    assert np.all(out_bits[~kept] == neg_nan)


def test_reference_merge_arithmetic_by_hand():
    # One element, checked against the formula written out with Python floats.
    base, t1, t3 = fixture("base", "bf16"), fixture("task1", "bf16"), fixture("task3", "bf16")
    d1 = ref.extract(base, t1, 7, *ref.interval(slot="0/3"))
    d3 = ref.extract(base, t3, 7, *ref.interval(slot="2/3"))
    out = ref.merge(base, [d1, d3], weights=[0.5, -1.0], rescale=True, out_dtype="f16")
    name = "model.layers.1.mlp.down_proj.weight"
    _, b = ref.read_safetensors(base)
    bv = ref.to_f64("BF16", b[name].data)
    acc = np.zeros_like(bv)
    for d, w in ((d1, 0.5), (d3, -1.0)):
        e = d.entries[name]
        c = w * (2.0**32 / (d.hi - d.lo))
        for i, v in zip(e.indices.tolist(), ref.to_f64("BF16", e.values).tolist()):
            acc[i] = acc[i] + c * (v - bv[i])
    assert out[name][2] == (bv + acc).astype(np.float16).tobytes()
    assert out[name][0] == "F16" and out["model.position_ids"][0] == "I64"
    assert out["score.weight"][0] == "F16"


# =============================================================================================
# Group b: the binary against the reference
# =============================================================================================

def _binary_path():
    env = os.environ.get("SOTU_BIN")
    path = Path(env) if env else Path("target/release/sotu-delta")
    return path if path.is_absolute() else REPO / path


@pytest.fixture(scope="session")
def sotu_bin():
    return _binary_path()


def require_bin(binary):
    # Checked inside the tests (not in a fixture) so that a missing binary reports FAILED, with
    # this message, rather than a setup error or a skip.
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(f"sotu-delta binary not found at {binary}: build it with `cargo build --release` "
                    "(or point SOTU_BIN at it)")


def run_bin(binary, *args):
    require_bin(binary)
    proc = subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.fail(f"`sotu-delta {' '.join(map(str, args))}` exited {proc.returncode}:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("sotu")


@pytest.fixture(scope="session")
def slot_deltas(sotu_bin, workdir):
    """variant -> [delta paths of task1..3 extracted with --slot 0/3, 1/3, 2/3 and seed 7]."""
    cache = {}

    def get(variant):
        if variant not in cache:
            paths = []
            for k in TASKS:
                out = workdir / f"slot-task{k}-{variant}.sotu.safetensors"
                run_bin(sotu_bin, "extract", "--base", fixture("base", variant), "--tuned",
                        fixture(f"task{k}", variant), "-o", out, "--slot", f"{k - 1}/3", "--seed", "7")
                paths.append(out)
            cache[variant] = paths
        return cache[variant]
    return get


@pytest.mark.parametrize("variant", VARIANTS)
class TestBinary:
    def test_slot_extract_matches_reference(self, variant, slot_deltas):
        base = fixture("base", variant)
        for k, path in zip(TASKS, slot_deltas(variant)):
            got = ref.decode_delta(path)
            lo, hi = ref.interval(slot=f"{k - 1}/3")
            assert (got.seed, got.lo, got.hi, got.chunk) == (7, lo, hi, 65536)
            assert got.metadata.get("format_version") == "1.2"
            assert got.metadata.get("slot") == f"{k - 1}/3"
            want = ref.extract(base, fixture(f"task{k}", variant), 7, lo, hi, got.chunk)
            assert_same_delta(got, want, f"binary delta task{k}")

    def test_stats_match_reference(self, variant, slot_deltas):
        # §7: informational, but fully determined (sum order included), so checked exactly.
        base = fixture("base", variant)
        for k, path in zip(TASKS, slot_deltas(variant)):
            got = ref.decode_delta(path)
            want = ref.extract(base, fixture(f"task{k}", variant), got.seed, got.lo, got.hi, got.chunk)
            for name in want.rows():
                r = want.entries[name].row
                assert got.stats[r].tolist() == want.stats[r].tolist(), f"task{k} {name}: sotu/stats row {r}"

    @pytest.mark.parametrize("options", [
        {},
        {"weights": [0.5, 1.5, -1], "rescale": True},
        {"out_dtype": "bf16"},
        {"out_dtype": "f32"},
        # Genuinely f64 results rounded to a narrower dtype: where double rounding would show.
        {"weights": [0.5, 1.5, -1], "rescale": True, "out_dtype": "bf16"},
        {"weights": [0.5, 1.5, -1], "rescale": True, "out_dtype": "f16"},
    ], ids=["plain", "weights-rescale", "dtype-bf16", "dtype-f32", "weights-rescale-dtype-bf16", "weights-rescale-dtype-f16"])
    def test_merge_matches_reference(self, variant, options, sotu_bin, slot_deltas, workdir):
        base, deltas = fixture("base", variant), slot_deltas(variant)
        tag = "-".join(f"{k}{v}" for k, v in options.items()).replace(" ", "").replace(",", "_")
        out = workdir / f"merge-{variant}-{tag or 'plain'}.safetensors"
        args = ["merge", "--base", base, *deltas, "-o", out]
        if "weights" in options:
            args += ["--weights", ",".join(str(w) for w in options["weights"])]
        if options.get("rescale"):
            args.append("--rescale")
        if "out_dtype" in options:
            args += ["--dtype", options["out_dtype"]]
        run_bin(sotu_bin, *args)
        want = ref.merge(base, deltas, weights=options.get("weights"), rescale=options.get("rescale", False),
                         out_dtype=options.get("out_dtype"))
        assert_same_tensors(ref.read_tensors(out), want, f"merge {options}")
        meta, _ = ref.read_safetensors(out)
        assert meta.get("format") == "pt", "the base's metadata must be kept"
        info = json.loads(meta["sotu_delta"])
        assert len(info["deltas"]) == 3

    def test_apply_matches_reference(self, variant, sotu_bin, slot_deltas, workdir):
        base = fixture("base", variant)
        for k, delta in zip(TASKS, slot_deltas(variant)):
            out = workdir / f"apply-{variant}-task{k}.safetensors"
            run_bin(sotu_bin, "apply", "--base", base, delta, "-o", out)
            assert_same_tensors(ref.read_tensors(out), ref.apply(base, delta), f"apply task{k}")

    def test_io_read_matches_reference(self, variant, sotu_bin, workdir):
        # `--io read` (positional reads instead of memory maps): extract, merge and apply against
        # the reference, as the default mode is above.
        base = fixture("base", variant)
        deltas = []
        for k in TASKS:
            path = workdir / f"io-read-task{k}-{variant}.sotu.safetensors"
            run_bin(sotu_bin, "--io", "read", "extract", "--base", base, "--tuned", fixture(f"task{k}", variant),
                    "-o", path, "--slot", f"{k - 1}/3", "--seed", "11")
            got = ref.decode_delta(path)
            lo, hi = ref.interval(slot=f"{k - 1}/3")
            want = ref.extract(base, fixture(f"task{k}", variant), 11, lo, hi, got.chunk)
            assert_same_delta(got, want, f"--io read delta task{k}")
            deltas.append(path)
        out = workdir / f"io-read-merge-{variant}.safetensors"
        run_bin(sotu_bin, "--io", "read", "merge", "--base", base, *deltas, "-o", out,
                "--weights", "0.5,1.5,-1", "--rescale")
        want = ref.merge(base, deltas, weights=[0.5, 1.5, -1], rescale=True)
        assert_same_tensors(ref.read_tensors(out), want, "--io read merge")
        out = workdir / f"io-read-apply-{variant}.safetensors"
        run_bin(sotu_bin, "--io", "read", "apply", "--base", base, deltas[0], "-o", out)
        assert_same_tensors(ref.read_tensors(out), ref.apply(base, deltas[0]), "--io read apply")

    def test_density_1_apply_reproduces_tuned(self, variant, sotu_bin, workdir):
        base = fixture("base", variant)
        for k in TASKS:
            tuned = fixture(f"task{k}", variant)
            delta = workdir / f"full-task{k}-{variant}.sotu.safetensors"
            out = workdir / f"full-apply-task{k}-{variant}.safetensors"
            run_bin(sotu_bin, "extract", "--base", base, "--tuned", tuned, "-o", delta, "--density", "1")
            run_bin(sotu_bin, "apply", "--base", base, delta, "-o", out)
            assert_same_tensors(ref.read_tensors(out), ref.read_tensors(tuned), f"apply(density 1) task{k}")

    def test_density_extract_and_merge(self, variant, sotu_bin, workdir):
        base = fixture("base", variant)
        deltas = []
        for k in TASKS:
            path = workdir / f"d01-task{k}-{variant}.sotu.safetensors"
            run_bin(sotu_bin, "extract", "--base", base, "--tuned", fixture(f"task{k}", variant), "-o", path,
                    "--density", "0.1", "--seed", "123")
            got = ref.decode_delta(path)
            assert (got.seed, got.lo, got.hi) == (123, 0, 429496730)
            assert "slot" not in got.metadata
            want = ref.extract(base, fixture(f"task{k}", variant), 123, 0, 429496730, got.chunk)
            assert_same_delta(got, want, f"density-0.1 delta task{k}")
            deltas.append(path)
        out = workdir / f"d01-merge-{variant}.safetensors"
        run_bin(sotu_bin, "merge", "--base", base, *deltas, "-o", out)
        assert_same_tensors(ref.read_tensors(out), ref.merge(base, deltas), "merge of density-0.1 deltas")

    def test_wrong_base_refused_unless_forced(self, variant, sotu_bin, slot_deltas, workdir):
        wrong = fixture("task2", variant)  # same names, dtypes and shapes, other bytes
        deltas = slot_deltas(variant)
        out = workdir / f"forced-{variant}.safetensors"
        require_bin(sotu_bin)
        proc = subprocess.run([str(sotu_bin), "merge", "--base", str(wrong), *map(str, deltas), "-o", str(out)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0, "merge onto a base with other hashes must be refused"
        with pytest.raises(ref.FormatError):
            ref.merge(wrong, deltas)
        run_bin(sotu_bin, "merge", "--base", wrong, *deltas, "-o", out, "--force")
        assert_same_tensors(ref.read_tensors(out), ref.merge(wrong, deltas, force=True), "forced merge")

    def test_python_safetensors_opens_delta(self, variant, slot_deltas):
        from safetensors import safe_open

        for path in slot_deltas(variant):
            decoded = ref.decode_delta(path)
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata()
                assert meta["format"] == "sotu-delta" and meta["mask"] == "sotu-mix32-v1"
                keys = set(f.keys())
                assert {"sotu/stats", "sotu/base_hashes"} <= keys
                rows = len(decoded.entries)
                stats = f.get_tensor("sotu/stats")
                assert stats.dtype == np.float64 and stats.shape == (rows, 3)
                assert np.array_equal(stats, decoded.stats)
                hashes = f.get_tensor("sotu/base_hashes")
                assert hashes.dtype == np.uint8 and np.array_equal(hashes, decoded.base_hashes)
                for name, e in decoded.entries.items():
                    if e.kind == "masked":
                        offs = f.get_tensor("sotu/offsets/" + name)
                        assert offs.dtype == np.uint64 and np.array_equal(offs, e.offsets)
                        if e.dtype in ("F32", "F64"):
                            assert f.get_tensor(name).tobytes() == e.values.tobytes()
                    elif e.kind == "whole" and e.dtype not in ("F16", "BF16"):
                        assert f.get_tensor(name).tobytes() == e.whole.data
