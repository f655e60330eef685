"""Merge methods (docs/METHODS.md): the numpy reference, and the binary against it.

    SOTU_BIN=target/release/sotu-delta .venv/bin/python -m pytest -q tests/reference/test_methods.py
    .venv/bin/python -m pytest -q tests/reference/test_methods.py -k "not binary"   # reference only

Module-level tests check the reference (sotu_ref.merge_method and its parts) against METHODS.md
itself: ties computed by hand, properties of iso and tsv, the unbiased estimate, apply's rescale.
They need no binary.

The classes TestBinary* and the functions test_binary_* (select them with -k binary) run the
binary (env SOTU_BIN, default target/release/sotu-delta): deltas are extracted by the binary from
the committed fixtures (and from checkpoints written here with sotu_ref.write_safetensors: an F64
model, non-finite and odd-shaped ones), then `merge --method M` is compared with the reference:
`ties` bit for bit, `iso` and `tsv` within the tolerance of METHODS.md ("Arithmetic and what may
differ"): an F32/F16/BF16 element within one ulp of the reference (and at least 99% of them
equal), an F64 element within 1e-9 of the tensor's largest |R|. Tensors a method does not apply to
are merged as `sum` and must be equal bit for bit. A missing binary is a failure, not a skip.

Two readings the reference had to make where METHODS.md is silent (see sotu_ref.merge_method and
tsv_delta): a delta that is `same` for a tensor is still one of the T tasks, with τ = 0 (it
matters for the mean path (Σ w τ)/T and for tsv's k); and a zero task brings no triplets to tsv's
stack.
"""

import json
import sys
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sotu_ref as ref  # noqa: E402
from sotu_bin import call  # noqa: E402
from sotu_bin import run as run_bin  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "fixtures" / "tiny"
TASKS = [1, 2, 3]


# =============================================================================================
# Comparison helpers
# =============================================================================================

def _bits(raw, dtype):
    return np.frombuffer(raw, dtype=ref._BITS[dtype])


def _ordered(bits, dtype):
    """Bit patterns of F32/F16/BF16 as integers ordered like the values (+0 and −0 both 0), so
    that neighbouring floats differ by 1."""
    nbits = ref.DTYPES[dtype][0] * 8
    u = bits.astype(np.int64)
    mag = u & ((1 << (nbits - 1)) - 1)
    return np.where(u >> (nbits - 1), -mag, mag)


def _as_f64(raw, dtype):
    return ref.to_f64(dtype, np.frombuffer(raw, dtype=ref.DTYPES[dtype][1]))


def assert_same_tensors(got, want, what, names=None):
    """Bit-exact on `names` (default all); dtype, shape and names always."""
    assert sorted(got) == sorted(want), f"{what}: tensor names differ: {sorted(set(got) ^ set(want))}"
    for name in sorted(want if names is None else names):
        gd, gs, gb = got[name]
        wd, ws, wb = want[name]
        assert (gd, tuple(gs)) == (wd, tuple(ws)), f"{what}: {name}: {gd}{list(gs)} != {wd}{list(ws)}"
        if bytes(gb) != bytes(wb):
            size = ref.DTYPES[wd][0]
            g = np.frombuffer(gb, dtype=f"<u{size}") if size > 1 else np.frombuffer(gb, np.uint8)
            w = np.frombuffer(wb, dtype=f"<u{size}") if size > 1 else np.frombuffer(wb, np.uint8)
            bad = np.flatnonzero(g != w)
            i = int(bad[0])
            pytest.fail(f"{what}: {name}: {bad.size} of {w.size} elements differ; first at flat index "
                        f"{i}: got {int(g[i]):#x}, want {int(w[i]):#x}")


def assert_within_tolerance(got, want, residual, what, min_exact=0.99):
    """METHODS.md tolerance for iso/tsv. residual: {name: R (flat f64)} for the tensors the
    method applies to (sotu_ref.method_residual); every other tensor must be equal bit for bit.

    F32/F16/BF16: every element within one ulp (ordered bit patterns differ by at most 1, both
    finite), and at least `min_exact` of all such elements equal. F64: |got − want| ≤ 1e-9 ·
    max |R| per tensor. Returns (exact, total) over the narrow-dtype elements."""
    assert sorted(got) == sorted(want), f"{what}: tensor names differ: {sorted(set(got) ^ set(want))}"
    exact_names = [n for n in want if n not in residual]
    assert_same_tensors(got, want, what, names=exact_names)
    exact = total = 0
    for name in sorted(residual):
        gd, gs, gb = got[name]
        wd, ws, wb = want[name]
        assert (gd, tuple(gs)) == (wd, tuple(ws)), f"{what}: {name}: {gd}{list(gs)} != {wd}{list(ws)}"
        if wd == "F64":
            g, w = _as_f64(gb, wd), _as_f64(wb, wd)
            assert np.all(np.isfinite(g)) and np.all(np.isfinite(w)), f"{what}: {name}: not finite"
            scale = float(np.max(np.abs(residual[name])))
            err = np.abs(g - w)
            i = int(np.argmax(err))
            assert err[i] <= 1e-9 * scale, (f"{what}: {name}: F64 element {i} is {g[i]!r}, the reference "
                                             f"{w[i]!r}: error {err[i]:.3g} > 1e-9 * max|R| = {1e-9 * scale:.3g}")
            continue
        g, w = _bits(gb, wd), _bits(wb, wd)
        gf, wf = _as_f64(gb, wd), _as_f64(wb, wd)
        finite = np.isfinite(gf) & np.isfinite(wf)
        same = g == w
        bad = np.flatnonzero(~same & ~finite)
        assert bad.size == 0, f"{what}: {name}: element {int(bad[0])} differs and is not finite"
        diff = np.abs(_ordered(g, wd) - _ordered(w, wd))
        far = np.flatnonzero(diff > 1)
        if far.size:
            i = int(far[0])
            pytest.fail(f"{what}: {name}: {far.size} of {w.size} elements differ by more than one ulp; "
                        f"first at {i}: got {int(g[i]):#x} ({gf[i]!r}), want {int(w[i]):#x} ({wf[i]!r})")
        exact += int(np.count_nonzero(same))
        total += w.size
    if total:
        assert exact >= min_exact * total, f"{what}: only {exact} of {total} elements equal the reference"
    return exact, total


# =============================================================================================
# Reference self-checks (no binary)
# =============================================================================================

HAND_TAUS = [np.array([3.0, -1.0, 2.0, 0.5, -4.0]),
             np.array([-2.0, 2.0, -2.0, 1.0, 1.0]),
             np.array([1.0, -3.0, 0.0, 0.0, 5.0])]


@pytest.mark.parametrize("weights,alpha,want_am,want_q", [
    # trim 0.6 of 5 elements: k = 3. Thresholds 2, 2, 1, so τ̃1 = [3,0,2,0,-4],
    # τ̃2 = [-2,2,-2,0,0], τ̃3 = [1,-3,0,0,5]; S = [2,-1,0,0,1] elects [+,-,+ (zero sum),+,+].
    ([1, 1, 1], 1.0, [2.0, -3.0, 2.0, 0.0, 5.0], [True, True, True, False, True]),
    # S = [-0.5, 2.5, -2, 0, -1.5] elects [-,+,-,+,-]; m = (Σ w τ̃)/(Σ w) over the qualifying.
    ([1, 2, 0.5], 1.0, [-2.0, 2.0, -2.0, 0.0, -4.0], [True, True, True, False, True]),
    ([1, 2, 0.5], 0.5, [-1.0, 1.0, -1.0, 0.0, -2.0], [True, True, True, False, True]),
], ids=["plain", "weights", "weights-alpha"])
def test_ties_by_hand(weights, alpha, want_am, want_q):
    am, q = ref.ties_delta(HAND_TAUS, weights, alpha, trim=0.6)
    assert q.tolist() == want_q
    assert am[q].tolist() == [a for a, k in zip(want_am, want_q) if k]


def test_ties_trim_rounds_half_even_and_keeps_every_tie_at_the_threshold():
    # n = 5, K = 0.5: K·n = 2.5 -> k = 2 (half to even). Magnitudes [5, 4, 3, 2, 1]: keep 5 and 4.
    t = np.array([5.0, -4.0, 3.0, 2.0, 1.0])
    zeros = np.zeros(5)
    am, q = ref.ties_delta([t, zeros], [1, 1], 1.0, trim=0.5)
    assert q.tolist() == [True, True, False, False, False]
    # n = 7, K = 0.5: 3.5 -> k = 4. Magnitudes [7..1]: keep 7, 6, 5, 4.
    t7 = np.arange(7.0, 0.0, -1.0)
    _, q = ref.ties_delta([t7, np.zeros(7)], [1, 1], 1.0, trim=0.5)
    assert q.tolist() == [True] * 4 + [False] * 3
    # Repeats: k = 1 but all four magnitudes equal the threshold, so all are kept.
    am, q = ref.ties_delta([np.array([1.0, -1.0, 1.0, -1.0]), np.zeros(4)], [1, 1], 1.0, trim=0.25)
    assert q.all() and am.tolist() == [1.0, -1.0, 1.0, -1.0]
    # k = max(1, ...): K·n = 0.2 rounds to 0, still one element per task is kept.
    am, q = ref.ties_delta([np.array([2.0]), np.array([-3.0])], [1, 1], 1.0, trim=0.2)
    assert q.tolist() == [True] and am.tolist() == [-3.0]
    with pytest.raises(ref.UsageError):
        ref.ties_delta([t, t], [1, 1], 1.0, trim=0.0)


def test_ties_zero_sum_elects_plus_and_zero_divisor_gives_zero():
    # S = 0 exactly: the positive task qualifies (mergekit's choice), the negative one does not.
    am, q = ref.ties_delta([np.array([2.0]), np.array([-1.0])], [1, 2], 1.0, trim=1.0)
    assert q.tolist() == [True] and am.tolist() == [2.0]
    # Qualifying weights summing to zero: m = +0.0, and the element is still written (b + α·0).
    am, q = ref.ties_delta([np.array([1.0]), np.array([1.0])], [1, -1], 1.0, 1.0)
    assert q.tolist() == [True] and am.tolist() == [0.0] and not np.signbit(am[0])


def _random_matrix(rng, m, n):
    return rng.standard_normal((m, n))


@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (6, 6)])
@pytest.mark.parametrize("alpha", [1.0, 0.4])
def test_iso_singular_values_all_equal_alpha_mean_sigma(shape, alpha):
    rng = np.random.default_rng(sum(shape))
    taus = [_random_matrix(rng, *shape).reshape(-1) for _ in range(3)]
    w = [1.0, 0.5, 2.0]
    R = ref.iso_delta(taus, w, shape, alpha).reshape(shape)
    M = sum(wt * t for wt, t in zip(w, taus)).reshape(shape)
    sigma = np.linalg.svd(M, compute_uv=False)
    got = np.linalg.svd(R, compute_uv=False)
    assert got.size == min(shape)
    np.testing.assert_allclose(got, alpha * sigma.mean(), rtol=1e-12)
    # And R has the singular vectors of M: R = α·mean(σ)·polar(M), so Rᵀ M is symmetric PSD.
    S = R.T @ M
    np.testing.assert_allclose(S, S.T, atol=1e-10 * np.abs(S).max())
    assert np.linalg.eigvalsh((S + S.T) / 2).min() > -1e-10 * np.abs(S).max()


@pytest.mark.parametrize("shape,T", [((12, 10), 3), ((10, 12), 2), ((9, 9), 3)])
def test_tsv_of_orthogonal_low_rank_tasks_is_their_sum(shape, T):
    rng = np.random.default_rng(T)
    m, n = shape
    k = min(shape) // T
    QU = np.linalg.qr(rng.standard_normal((m, m)))[0]
    QV = np.linalg.qr(rng.standard_normal((n, n)))[0]
    w = [1.0, -0.5, 2.0][:T]
    taus = []
    for t in range(T):
        s = rng.uniform(0.5, 3.0, k)
        tau = (QU[:, t * k:(t + 1) * k] * s) @ QV[:, t * k:(t + 1) * k].T
        taus.append(tau.reshape(-1))
    R = ref.tsv_delta(taus, w, shape, 1.0).reshape(shape)
    want = sum(wt * t for wt, t in zip(w, taus)).reshape(shape)
    np.testing.assert_allclose(R, want, atol=1e-12 * np.abs(want).max())
    # With α it is α times that; and tasks that are not orthogonal do not give their sum.
    np.testing.assert_allclose(ref.tsv_delta(taus, w, shape, 0.3).reshape(shape), 0.3 * want,
                               atol=1e-12 * np.abs(want).max())
    mixed = [t + 0.3 * rng.standard_normal(t.size) for t in taus]
    R2 = ref.tsv_delta(mixed, w, shape, 1.0).reshape(shape)
    assert np.abs(R2 - sum(wt * t for wt, t in zip(w, mixed)).reshape(shape)).max() > 1e-3


def _flipping_svd(seed):
    """A thin SVD that flips the signs of random singular triplets (u_i, v_i) together."""
    rng = np.random.default_rng(seed)

    def svd(x):
        u, s, vt = np.linalg.svd(np.asarray(x, dtype=np.float64), full_matrices=False)
        d = rng.choice([-1.0, 1.0], size=s.size)
        return u * d, s, vt * d[:, None]
    return svd


@pytest.mark.parametrize("method", ["iso", "tsv"])
@pytest.mark.parametrize("shape", [(20, 8), (8, 20), (9, 9)])
def test_iso_tsv_do_not_depend_on_singular_vector_signs(method, shape):
    rng = np.random.default_rng(5)
    taus = [rng.standard_normal(shape).reshape(-1) for _ in range(3)]
    f = ref.iso_delta if method == "iso" else ref.tsv_delta
    want = f(taus, [1, 0.5, 2], shape, 0.8)
    for seed in range(4):
        got = f(taus, [1, 0.5, 2], shape, 0.8, svd=_flipping_svd(seed))
        np.testing.assert_allclose(got, want, atol=1e-13 * np.abs(want).max())
    # The flips are real: a wrapper that flips u alone (not v) changes the result.
    def bad_svd(x):
        u, s, vt = np.linalg.svd(x, full_matrices=False)
        d = np.ones(s.size)
        d[0] = -1
        return u * d, s, vt
    assert np.abs(f(taus, [1, 0.5, 2], shape, 0.8, svd=bad_svd) - want).max() > 1e-3


@pytest.mark.parametrize("shape", [(), (5,), (2, 3, 4)])
def test_iso_tsv_mean_path_for_tensors_that_are_not_2d(shape):
    rng = np.random.default_rng(3)
    n = ref.numel(shape)
    taus = [rng.standard_normal(n) for _ in range(3)]
    w = [1.0, 0.5, -2.0]
    want = (0.7 * ((((0.0 + w[0] * taus[0]) + w[1] * taus[1]) + w[2] * taus[2]))) / 3.0
    for f in (ref.iso_delta, ref.tsv_delta):
        assert f(taus, w, shape, 0.7).tobytes() == want.tobytes()


def test_a_same_delta_is_a_zero_task_counted_in_T():
    # task2 leaves model.norm.weight unchanged (`same`): it is still one of the T = 3 tasks, with
    # τ = 0, so the mean path of iso/tsv divides by 3 (FORMAT.md §8: T is the number of deltas).
    base = _fixture("base", "f32")
    ds = [_ref_extract("f32", k, 100 + k, density=1 / 3) for k in TASKS]
    name = "model.norm.weight"
    assert [d.entries[name].kind for d in ds] == ["masked", "same", "masked"]
    _, b = ref.read_safetensors(base)
    bv = ref.to_f64("F32", b[name].data)
    w = [0.5, 1.5, 0.75]
    t1, t3 = ref.estimate(ds[0], name, bv), ref.estimate(ds[2], name, bv)
    R = (0.6 * ((0.0 + w[0] * t1) + w[2] * t3)) / 3.0
    for m in ("iso", "tsv"):
        assert ref.merge_method(base, ds, m, weights=w, alpha=0.6)[name][2] == ref.round_to_bytes(bv + R, "F32")


def test_tsv_zero_task_brings_no_triplets_but_counts_in_T():
    # METHODS.md leaves open what a zero task (τ = 0: a `same` delta) brings to tsv's stack: its
    # singular vectors are arbitrary. The reference leaves its triplets out; k still uses T.
    rng = np.random.default_rng(11)
    shape = (8, 6)
    t1, t3 = (rng.standard_normal(48) for _ in range(2))
    zero = np.zeros(48)
    k = 2  # r = 6, T = 3
    us, ss, vs = [], [], []
    for t in (t1, t3):
        u, s, vt = np.linalg.svd(t.reshape(shape), full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vt[:k].T)
    want = ((ref.polar(np.hstack(us)) * np.concatenate(ss)) @ ref.polar(np.hstack(vs)).T).reshape(-1)
    for taus in ([t1, zero, t3], [zero, t1, t3], [t1, t3, zero]):
        np.testing.assert_allclose(ref.tsv_delta(taus, [1, 1, 1], shape), want, atol=1e-13)
    # And T = 2 (k = 3) is another result.
    assert np.abs(ref.tsv_delta([t1, t3], [1, 1], shape) - want).max() > 1e-3


def test_estimate_is_unbiased_over_the_slots_of_a_seed():
    # Over the 4 slots of one seed every element is kept exactly once with s = 4, so the mean
    # of the 4 estimates is exactly v − b; without the 1/density factor it would be (v − b)/4.
    rng = np.random.default_rng(9)
    b = rng.standard_normal(300).astype(np.float32)
    v = (b + rng.standard_normal(300).astype(np.float32) * 0.01).astype(np.float32)
    base = {"w": ref.Tensor("F32", (300,), b.tobytes())}
    tuned = {"w": ref.Tensor("F32", (300,), v.tobytes())}
    bv = ref.to_f64("F32", b)
    taus = [ref.estimate(ref.extract(base, tuned, 3, *ref.interval(slot=f"{k}/4")), "w", bv) for k in range(4)]
    diff = v.astype(np.float64) - bv
    assert np.array_equal(sum(taus) / 4, diff)
    assert all(np.count_nonzero(t) > 30 for t in taus)
    plain = [ref.estimate(ref.extract(base, tuned, 3, *ref.interval(slot=f"{k}/4")), "w", bv, unbiased=False)
             for k in range(4)]
    assert np.array_equal(sum(plain), diff)
    # Density 1: the exact difference.
    full = ref.extract(base, tuned, 3, *ref.interval(1.0))
    assert np.array_equal(ref.estimate(full, "w", bv), diff)


def test_estimate_refuses_non_finite():
    b = np.ones(8, dtype=np.float32)
    v = b.copy()
    v[5] = np.inf
    base = {"some.tensor": ref.Tensor("F32", (8,), b.tobytes())}
    tuned = {"some.tensor": ref.Tensor("F32", (8,), v.tobytes())}
    d = ref.extract(base, tuned, 1, *ref.interval(1.0))
    with pytest.raises(ref.NonFiniteError, match="some.tensor"):
        ref.merge_method(base, [d, d], "iso", delta_names=["bad.delta", "bad.delta"])


def _fixture(model, variant):
    path = FIXTURES / f"{model}-{variant}.safetensors"
    if not path.exists():
        pytest.fail(f"{path} is missing: run `.venv/bin/python fixtures/make_fixtures.py`")
    return path


@lru_cache(maxsize=None)
def _ref_extract(variant, task, seed, density=None, slot=None):
    return ref.extract(_fixture("base", variant), _fixture(f"task{task}", variant), seed,
                       *ref.interval(density, slot))


def test_merge_method_sum_is_merge_and_usage_errors():
    base = _fixture("base", "f16")
    ds = [_ref_extract("f16", k, 7, slot=f"{k - 1}/3") for k in TASKS]
    assert ref.merge_method(base, ds, "sum", weights=[1, 2, 3], rescale=True) == \
        ref.merge(base, ds, weights=[1, 2, 3], rescale=True)
    for kw in [dict(method="sum", alpha=0.5), dict(method="sum", trim=0.5), dict(method="ties", rescale=True),
               dict(method="iso", rescale=True), dict(method="iso", trim=0.5), dict(method="ties", trim=0.0),
               dict(method="ties", trim=1.5), dict(method="median")]:
        with pytest.raises(ref.UsageError):
            ref.merge_method(base, ds, **kw)
    for m in ("ties", "iso", "tsv"):
        with pytest.raises(ref.UsageError):
            ref.merge_method(base, ds[:1], m)


@pytest.mark.parametrize("variant", ["f32", "f16", "bf16"])
def test_ties_of_one_tune_twice_at_density_1_is_the_tune(variant):
    # Two copies of a density-1 delta, trim 1: m = (τ + τ)/2 = τ exactly, so the output is
    # round(b + (v − b)) = v, the fine-tune (the fixtures have no element where that fails).
    base, tuned = _fixture("base", variant), _fixture("task1", variant)
    d = _ref_extract(variant, 1, 5, density=1.0)
    assert d.stats[:, 2].sum() == 0
    got = ref.merge_method(base, [d, d], "ties", trim=1.0)
    assert_same_tensors(got, ref.read_tensors(tuned), "ties(d, d)")
    # With the default trim it is not: the trimmed elements stay at the base.
    assert ref.merge_method(base, [d, d], "ties") != got


def test_methods_apply_only_to_all_masked_tensors():
    # A float tensor stored whole by one delta (as an --exclude would) is merged as sum: weights,
    # no rescale, no method; the method still applies to the others.
    variant = "f32"
    base = _fixture("base", variant)
    ds = [_ref_extract(variant, k, 100 + k, density=1 / 3) for k in TASKS]
    name = "model.layers.0.self_attn.q_proj.weight"
    _, tuned1 = ref.read_safetensors(_fixture("task1", variant))
    e = ds[0].entries[name]
    whole = ref.Delta(ds[0].seed, ds[0].lo, ds[0].hi, ds[0].chunk, dict(ds[0].entries), ds[0].base_hashes, ds[0].stats)
    whole.entries[name] = ref.Entry("whole", e.dtype, e.shape, e.row, True, whole=tuned1[name])
    dd = [whole, ds[1], ds[2]]
    applies = ref.method_tensors(base, dd)
    assert name not in applies and "model.layers.0.self_attn.k_proj.weight" in applies
    assert "model.norm.weight" in applies and applies["model.norm.weight"] == [0, 2]  # task2: same
    assert "model.position_ids" not in applies  # I64
    assert "model.logit_scale" in applies  # 0-d: the elementwise (ties) or mean (iso, tsv) path
    w = [0.5, 1.5, 0.75]
    for m in ("ties", "iso", "tsv"):
        got = ref.merge_method(base, dd, m, weights=w)
        summed = ref.merge(base, dd, weights=w)
        for n in summed:
            if n in applies:
                # (The 0-d logit_scale is kept by one delta only here, and for iso/tsv its mean
                # path 3·w·(v − b)/3 then equals the sum's w·(v − b).)
                assert got[n] != summed[n] or n == "model.logit_scale", (m, n)
            else:
                assert got[n] == summed[n], (m, n)


@pytest.mark.parametrize("variant", ["f32", "bf16"])
def test_reference_apply_rescales_by_default(variant):
    base, tuned = _fixture("base", variant), _fixture("task2", variant)
    d = _ref_extract(variant, 2, 7, slot="1/3")
    assert ref.apply(base, d) == ref.merge(base, [d], rescale=True)
    plain = ref.apply(base, d, rescale=False)
    assert plain == ref.merge(base, [d])
    assert plain != ref.apply(base, d)
    b, t = ref.read_tensors(base), ref.read_tensors(tuned)
    for name, (dt, _, raw) in plain.items():
        if name in b and dt in ref.FLOAT_DTYPES:
            g, bb, tt = _bits(raw, dt), _bits(b[name][2], dt), _bits(t[name][2], dt)
            assert np.all((g == bb) | (g == tt)), name
    full = _ref_extract(variant, 2, 7, density=1.0)
    assert ref.apply(base, full) == ref.apply(base, full, rescale=False)
    assert_same_tensors(ref.apply(base, full), ref.read_tensors(tuned), "apply(density 1)")


def test_tolerance_check_can_fail():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(1000)
    want = {"a": ("F32", (1000,), ref.round_to_bytes(x, "F32")), "n": ("BF16", (4,), ref.round_to_bytes(np.ones(4), "BF16"))}
    residual = {"a": x}
    bits = _bits(want["a"][2], "F32").copy()
    assert assert_within_tolerance(want, want, residual, "same") == (1000, 1000)
    one = bits.copy()
    one[3] += 1
    assert_within_tolerance({**want, "a": ("F32", (1000,), one.tobytes())}, want, residual, "1 ulp")
    for bad, label in [(bits + np.where(np.arange(1000) == 7, 2, 0).astype(bits.dtype), "2 ulp"),
                       (bits + 1, "all 1 ulp off")]:
        with pytest.raises(BaseException):  # pytest.fail's exception or AssertionError
            assert_within_tolerance({**want, "a": ("F32", (1000,), bad.tobytes())}, want, residual, label)
    with pytest.raises(BaseException):  # a non-method tensor must be exact
        assert_within_tolerance({**want, "n": ("BF16", (4,), ref.round_to_bytes(np.full(4, 1.0078125), "BF16"))},
                                want, residual, "exact part")
    w64 = {"a": ("F64", (1000,), x.tobytes())}
    assert_within_tolerance({"a": ("F64", (1000,), (x * (1 + 1e-12)).tobytes())}, w64, residual, "f64 ok")
    with pytest.raises(BaseException):
        assert_within_tolerance({"a": ("F64", (1000,), (x + 1e-6).tobytes())}, w64, residual, "f64 bad")


# =============================================================================================
# The binary against the reference
# =============================================================================================

@lru_cache(maxsize=None)
def _decode(path):
    return ref.decode_delta(path)


def decoded(paths):
    return [_decode(str(p)) for p in paths]


@pytest.fixture(scope="session")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("methods")


def _write_f64_model(src_variant, dst_dir):
    """{base,task1,task2,task3}-f64.safetensors from the F32 fixtures: every F32 tensor widened
    and multiplied elementwise by (1 + ε_i), ε_i ∈ [−2^-30, 2^-30] a function of the tensor name
    and index only, so that the values use F64 precision and tensors equal in the F32 fixtures
    stay equal (task2's model.norm.weight stays `same`)."""
    for model in ("base", "task1", "task2", "task3"):
        meta, tensors = ref.read_safetensors(_fixture(model, src_variant))
        out = {}
        for name, t in tensors.items():
            if t.dtype == "F32":
                v = ref.to_f64("F32", t.data)
                eps = np.random.default_rng(zlib.crc32(name.encode())).uniform(-1, 1, v.size) * 2.0**-30
                out[name] = ref.Tensor("F64", t.shape, (v * (1.0 + eps)).astype("<f8").tobytes())
            else:
                out[name] = t
        ref.write_safetensors(dst_dir / f"{model}-f64.safetensors", out, meta)


@pytest.fixture(scope="session")
def model(work):
    """variant -> {"base": path, 1: path, 2: path, 3: path}; variant f64 is generated."""
    cache = {}

    def get(variant):
        if variant not in cache:
            if variant == "f64":
                d = work / "f64"
                d.mkdir()
                _write_f64_model("f32", d)
                cache[variant] = {"base": d / "base-f64.safetensors",
                                  **{k: d / f"task{k}-f64.safetensors" for k in TASKS}}
            else:
                cache[variant] = {"base": _fixture("base", variant),
                                  **{k: _fixture(f"task{k}", variant) for k in TASKS}}
        return cache[variant]
    return get


# How the three deltas of a test are extracted from task1..3 (extract options per task k).
DELTA_KINDS = {
    # Density 1/3 with independent seeds (the masks overlap).
    "density": lambda k: ["--density", "0.3333333333333333", "--seed", str(100 + k)],
    # Disjoint slots of one seed.
    "slots": lambda k: ["--slot", f"{k - 1}/3", "--seed", "7"],
    # Density 1: the exact differences.
    "full": lambda k: ["--density", "1"],
    # Norms excluded, hence stored whole by every delta that changes them: merged as sum.
    "excl": lambda k: ["--density", "0.3333333333333333", "--seed", str(200 + k), "--exclude", "*norm*"],
    # Unequal densities, independent seeds: the 1/density factors differ per task.
    "mixed": lambda k: ["--density", {1: "0.2", 2: "0.5", 3: "0.35"}[k], "--seed", str(300 + k)],
}


@pytest.fixture(scope="session")
def deltas(work, model):
    """(kind, variant) -> [paths of the deltas of task1..3], extracted by the binary."""
    cache = {}

    def get(kind, variant):
        if (kind, variant) not in cache:
            m = model(variant)
            paths = []
            for k in TASKS:
                out = work / f"{kind}-task{k}-{variant}.delta.safetensors"
                run_bin("extract", "--base", m["base"], "--tuned", m[k], "-o", out, *DELTA_KINDS[kind](k))
                paths.append(out)
            cache[(kind, variant)] = paths
        return cache[(kind, variant)]
    return get


# Output dtype cases: (id, fixture variant, --dtype or None).
CASES = [("bf16", "bf16", None), ("f16", "f16", None), ("f32", "f32", None),
         ("f32-to-f64", "f32", "f64"), ("f64", "f64", None)]
CASE_IDS = [c[0] for c in CASES]


def merge_args(method, base, paths, out, opts, dtype):
    args = ["merge", "--base", base, *paths, "-o", out, "--method", method]
    if "weights" in opts:
        args += ["--weights", ",".join(str(w) for w in opts["weights"])]
    if "alpha" in opts:
        args += ["--alpha", str(opts["alpha"])]
    if "trim" in opts:
        args += ["--trim", str(opts["trim"])]
    if dtype:
        args += ["--dtype", dtype]
    return args


def binary_and_reference(method, case, kind, opts, model, deltas, work):
    """Run `merge --method` on the deltas of `kind`; returns (got, want, residual, base, paths)."""
    cid, variant, dtype = case
    base = model(variant)["base"]
    paths = deltas(kind, variant)
    out = work / f"{method}-{cid}-{kind}-{'-'.join(f'{k}{v}' for k, v in opts.items())}.safetensors"
    out = Path(str(out).replace(",", "_").replace(" ", ""))
    run_bin(*merge_args(method, base, paths, out, opts, dtype))
    got = ref.read_tensors(out)
    residual = {}
    want = ref.merge_method(base, decoded(paths), method, weights=opts.get("weights"), alpha=opts.get("alpha"),
                            trim=opts.get("trim"), out_dtype=dtype, residuals=residual)
    return got, want, residual, base, paths


def _ids(rows):
    return ["-".join([c[0], k] + [f"{n}{v}" for n, v in o.items()]).replace(" ", "") for c, k, o in rows]


def _cases(*ids):
    return [c for c in CASES if c[0] in ids]


# ties: the four delta kinds on every output dtype; the options on three of them.
TIES_GRID = [(c, k, {}) for c in CASES for k in ("density", "slots", "full", "excl")]
TIES_GRID += [(c, k, o) for c in _cases("bf16", "f32", "f64") for k, o in [
    ("density", {"trim": 0.5}), ("density", {"weights": [0.5, 1.5, 0.75]}), ("density", {"alpha": 0.7}),
    ("full", {"trim": 0.35, "weights": [2, 0.25, 1], "alpha": 1.3}), ("slots", {"trim": 1})]]
TIES_IDS = _ids(TIES_GRID)


def _check_applies(residual, kind):
    """Not vacuous: the method applies to the 14 projections and embeddings (plus the norms
    unless they were excluded at extract, hence stored whole and merged as sum)."""
    norms = [n for n in residual if "norm" in n]
    assert len(residual) - len(norms) >= 15, f"the method applies to too few tensors: {sorted(residual)}"
    assert (not norms) if kind == "excl" else len(norms) == 5, f"norms the method applies to: {norms}"


class TestBinaryTies:
    @pytest.mark.parametrize("case,kind,opts", TIES_GRID, ids=TIES_IDS)
    def test_ties_bit_exact(self, case, kind, opts, model, deltas, work):
        got, want, residual, base, paths = binary_and_reference("ties", case, kind, opts, model, deltas, work)
        assert_same_tensors(got, want, f"ties {case[0]} {kind} {opts}")
        _check_applies(residual, kind)
        assert sum(np.any(r != 0) for r in residual.values()) >= 14, "ties changed too few tensors"

    @pytest.mark.parametrize("variant", ["bf16", "f32"])
    def test_ties_negative_weight(self, variant, model, deltas, work, monkeypatch):
        """METHODS.md: a task qualifies where τ̃_t ≠ 0 has the elected sign: the sign of τ̃_t
        itself. With a negative weight that differs from the sign of w_t·τ̃_t (mergekit's
        weighted deltas), and the test tells the two apart."""
        opts = {"weights": [1, -0.5, 0.75]}
        got, want, _, base, paths = binary_and_reference("ties", (variant, variant, None), "density", opts,
                                                         model, deltas, work)
        monkeypatch.setattr(ref, "ties_delta", _ties_weighted_sign)
        other = ref.merge_method(base, decoded(paths), "ties", weights=opts["weights"])
        monkeypatch.undo()
        assert other != want, "the two readings agree here: the test would not tell them apart"
        assert_same_tensors(got, want, f"ties {variant} {opts}")


def _ties_weighted_sign(taus, weights, alpha=ref.DEFAULT_ALPHA, trim=ref.DEFAULT_TRIM, normalize=True):
    """The other reading of ties step 3 (not METHODS.md's): a task qualifies where w_t·τ̃_t has
    the elected sign. Only used to show that test_ties_negative_weight can tell them apart."""
    n = taus[0].size
    k = max(1, ref.round_half_even(float(trim) * float(n)))
    trimmed = [np.where(np.abs(t) >= np.sort(np.abs(t))[::-1][k - 1], t, 0.0) for t in taus]
    S = np.zeros(n)
    for tt, w in zip(trimmed, weights):
        S = S + w * tt
    N, D, any_q = np.zeros(n), np.zeros(n), np.zeros(n, dtype=bool)
    for tt, w in zip(trimmed, weights):
        wt = w * tt
        q = (wt != 0) & np.where(S >= 0, wt > 0, wt < 0)
        N, D, any_q = np.where(q, N + wt, N), np.where(q, D + w, D), any_q | q
    m = np.where(D == 0, 0.0, N / np.where(D == 0, 1.0, D)) if normalize else N
    return alpha * m, any_q


# iso and tsv: every output dtype on the density deltas; the other kinds on two; the options on
# three (F64 outputs included).
ISO_TSV_GRID = [(c, "density", {}) for c in CASES]
ISO_TSV_GRID += [(c, k, {}) for c in _cases("bf16", "f32") for k in ("slots", "full", "excl")]
ISO_TSV_GRID += [(c, "density", {"weights": [0.5, 1.5, 0.75], "alpha": 0.6}) for c in _cases("f16", "f32-to-f64", "f64")]
ISO_TSV_IDS = _ids(ISO_TSV_GRID)


@pytest.mark.parametrize("method", ["iso", "tsv"])
class TestBinaryIsoTsv:
    @pytest.mark.parametrize("case,kind,opts", ISO_TSV_GRID, ids=ISO_TSV_IDS)
    def test_within_tolerance(self, method, case, kind, opts, model, deltas, work):
        got, want, residual, _, _ = binary_and_reference(method, case, kind, opts, model, deltas, work)
        _check_applies(residual, kind)
        assert_within_tolerance(got, want, residual, f"{method} {case[0]} {kind} {opts}")


@pytest.mark.parametrize("method", ["sum", "ties", "iso", "tsv"])
@pytest.mark.parametrize("variant,dtype", [("bf16", None), ("f32", "f64")], ids=["bf16", "f32-to-f64"])
def test_binary_threads_1_and_2_byte_identical(method, variant, dtype, model, deltas, work):
    """TestBinary: the same bytes for --threads 1 and --threads 2."""
    base, paths = model(variant)["base"], deltas("density", variant)
    outs = []
    for threads in (1, 2):
        out = work / f"threads{threads}-{method}-{variant}-{dtype}.safetensors"
        args = ["merge", "--base", base, *paths, "-o", out, "--threads", str(threads), "--weights", "0.5,1.5,0.75"]
        if method != "sum":
            args += ["--method", method]
        if dtype:
            args += ["--dtype", dtype]
        run_bin(*args)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1], f"{method}: --threads 1 and --threads 2 wrote different bytes"
    got = ref.read_tensors(work / f"threads1-{method}-{variant}-{dtype}.safetensors")
    residual = {}
    want = ref.merge_method(base, decoded(paths), method, weights=[0.5, 1.5, 0.75], out_dtype=dtype,
                            residuals=residual)
    if method in ("sum", "ties"):
        assert_same_tensors(got, want, f"{method} threads")
    else:
        assert_within_tolerance(got, want, residual, f"{method} threads")


@pytest.mark.parametrize("method", ["ties", "iso", "tsv"])
@pytest.mark.parametrize("variant", ["f32", "bf16"])
def test_binary_sparse_deltas_enter_as_unbiased_estimate(method, variant, model, deltas, work):
    """TestBinary: unequal densities (0.2, 0.5, 0.35): the binary agrees with the reference, and
    not with the reference without the 1/density factor."""
    got, want, residual, base, paths = binary_and_reference(method, (variant, variant, None), "mixed", {},
                                                            model, deltas, work)
    ds = decoded(paths)
    biased = ref.merge_method(base, ds, method, unbiased=False)
    applies = ref.method_tensors(ref.read_safetensors(base)[1], ds)
    if method == "ties":
        assert_same_tensors(got, want, f"ties {variant} mixed densities")
        with pytest.raises(BaseException):
            assert_same_tensors(got, biased, "against the reference without 1/density")
    else:
        assert_within_tolerance(got, want, residual, f"{method} {variant} mixed densities")
        with pytest.raises(BaseException):
            assert_within_tolerance(got, biased, residual, "against the reference without 1/density")
    assert sum(want[n] != biased[n] for n in applies) >= len(applies) // 2


@pytest.mark.parametrize("variant,kind", [("bf16", "slots"), ("f16", "density"), ("f32", "density"), ("f64", "slots")])
class TestBinaryApply:
    def test_apply_default_is_merge_rescale(self, variant, kind, model, deltas, work):
        base = model(variant)["base"]
        for k, delta in zip(TASKS, deltas(kind, variant)):
            a = work / f"apply-{variant}-{kind}-{k}.safetensors"
            m = work / f"apply-merge-rescale-{variant}-{kind}-{k}.safetensors"
            run_bin("apply", "--base", base, delta, "-o", a)
            run_bin("merge", "--base", base, delta, "-o", m, "--rescale")
            got = ref.read_tensors(a)
            assert_same_tensors(got, ref.read_tensors(m), f"apply vs merge --rescale task{k}")
            assert_same_tensors(got, ref.apply(base, _decode(str(delta))), f"apply vs reference task{k}")

    def test_apply_no_rescale_keeps_base_or_tune(self, variant, kind, model, deltas, work):
        mdl = model(variant)
        base = mdl["base"]
        b = ref.read_tensors(base)
        for k, delta in zip(TASKS, deltas(kind, variant)):
            out = work / f"apply-norescale-{variant}-{kind}-{k}.safetensors"
            run_bin("apply", "--base", base, delta, "-o", out, "--no-rescale")
            got = ref.read_tensors(out)
            assert_same_tensors(got, ref.apply(base, _decode(str(delta)), rescale=False), f"apply --no-rescale task{k}")
            t = ref.read_tensors(mdl[k])
            tuned_elements = 0
            for name, (dt, _, raw) in got.items():
                if name not in b or dt not in ref.FLOAT_DTYPES:
                    assert raw == t[name][2], name  # replaced or new: the fine-tune's tensor
                    continue
                g, bb, tt = _bits(raw, dt), _bits(b[name][2], dt), _bits(t[name][2], dt)
                ok = (g == bb) | (g == tt)
                if dt == "F64":
                    # FORMAT.md §8 promises round(b + (v − b)) = v for F16, BF16 and F32 only;
                    # in F64 the difference itself may round.
                    bf, tf = _as_f64(b[name][2], dt), _as_f64(t[name][2], dt)
                    ok |= (bf + (tf - bf)) != tf
                assert np.all(ok), f"task{k} {name}: an element is neither base nor tune"
                tuned_elements += int(np.count_nonzero((g == tt) & (g != bb)))
            assert tuned_elements > 1000
            assert got != ref.apply(base, _decode(str(delta)))  # the default rescales: it differs


@pytest.mark.parametrize("variant", ["bf16", "f16", "f32"])
@pytest.mark.parametrize("flag", [[], ["--no-rescale"]], ids=["default", "no-rescale"])
def test_binary_apply_density_1_is_the_tune(variant, flag, model, deltas, work):
    """TestBinary: at density 1, apply (rescale factor 1) and apply --no-rescale give the tune."""
    mdl = model(variant)
    for k, delta in zip(TASKS, deltas("full", variant)):
        out = work / f"apply-full-{variant}-{k}-{len(flag)}.safetensors"
        run_bin("apply", "--base", mdl["base"], delta, "-o", out, *flag)
        assert_same_tensors(ref.read_tensors(out), ref.read_tensors(mdl[k]), f"apply {flag} density 1 task{k}")


USAGE_ERRORS = {
    "ties-rescale": (["--method", "ties", "--rescale"], 3),
    "iso-rescale": (["--method", "iso", "--rescale"], 3),
    "tsv-rescale": (["--method", "tsv", "--rescale"], 3),
    "sum-alpha": (["--method", "sum", "--alpha", "0.5"], 3),
    "default-alpha": (["--alpha", "0.5"], 3),
    "sum-trim": (["--method", "sum", "--trim", "0.5"], 3),
    "default-trim": (["--trim", "0.5"], 3),
    "ties-one-delta": (["--method", "ties"], 1),
    "iso-one-delta": (["--method", "iso"], 1),
    "tsv-one-delta": (["--method", "tsv"], 1),
    "trim-zero": (["--method", "ties", "--trim", "0"], 3),
    "trim-above-1": (["--method", "ties", "--trim", "1.5"], 3),
    "unknown-method": (["--method", "median"], 3),
}


@pytest.mark.parametrize("name", list(USAGE_ERRORS))
def test_binary_usage_errors_exit_2(name, deltas, work):
    """TestBinary: option misuse is refused with exit 2 and writes nothing."""
    extra, ndeltas = USAGE_ERRORS[name]
    paths = deltas("slots", "f16")[:ndeltas]
    out = work / f"usage-{name}.safetensors"
    proc = call("merge", "--base", _fixture("base", "f16"), *paths, "-o", out, *extra)
    assert proc.returncode == 2, f"{name}: exit {proc.returncode}, want 2\n{proc.stderr}"
    assert not out.exists()


def _f32(x):
    return np.asarray(x, dtype=np.float32).tobytes()


def _write_f32(path, shapes, tensors, dtype="F32"):
    """A checkpoint of tensors {name: array}, each of its shape in `shapes`, rounded to `dtype`
    (F32 by default); returns their values as stored, in f64."""
    raw = {n: ref.round_to_bytes(np.asarray(v, dtype=np.float64).reshape(-1), dtype) for n, v in tensors.items()}
    ref.write_safetensors(path, {n: ref.Tensor(dtype, shapes[n], b) for n, b in raw.items()})
    return {n: ref.to_f64(dtype, np.frombuffer(b, dtype=ref.DTYPES[dtype][1])) for n, b in raw.items()}


@pytest.mark.parametrize("method,bad", [("ties", "inf"), ("ties", "nan"), ("iso", "nan"), ("tsv", "-inf")])
def test_binary_non_finite_estimate_fails_naming_the_tensor(method, bad, tmp_path):
    """TestBinary: a kept non-finite fine-tuned value (extracted with --allow-nonfinite) makes τ
    non-finite: exit 1, naming the tensor and the delta file; nothing is written."""
    rng = np.random.default_rng(4)
    name = "model.layers.3.mlp.bad_proj.weight"
    b = rng.standard_normal((8, 6)).astype(np.float32)
    ok = rng.standard_normal((4, 4)).astype(np.float32)
    base = {name: ref.Tensor("F32", (8, 6), _f32(b)), "ok.weight": ref.Tensor("F32", (4, 4), _f32(ok))}
    t1 = (b + 0.01 * rng.standard_normal((8, 6))).astype(np.float32)
    t1.reshape(-1)[13] = float(bad)
    t2 = (b + 0.01 * rng.standard_normal((8, 6))).astype(np.float32)
    for fname, t in (("bad-tune.safetensors", t1), ("good-tune.safetensors", t2)):
        ref.write_safetensors(tmp_path / fname, {name: ref.Tensor("F32", (8, 6), _f32(t)),
                                                 "ok.weight": ref.Tensor("F32", (4, 4), _f32(ok + 0.5))})
    ref.write_safetensors(tmp_path / "base.safetensors", base)
    run_bin("extract", "--base", tmp_path / "base.safetensors", "--tuned", tmp_path / "bad-tune.safetensors",
            "-o", tmp_path / "nonfinite.delta.safetensors", "--density", "1", "--allow-nonfinite")
    run_bin("extract", "--base", tmp_path / "base.safetensors", "--tuned", tmp_path / "good-tune.safetensors",
            "-o", tmp_path / "good.delta.safetensors", "--density", "1")
    with pytest.raises(ref.NonFiniteError):
        ref.merge_method(tmp_path / "base.safetensors",
                         [tmp_path / "good.delta.safetensors", tmp_path / "nonfinite.delta.safetensors"], method)
    out = tmp_path / "out.safetensors"
    proc = call("merge", "--base", tmp_path / "base.safetensors", tmp_path / "good.delta.safetensors",
                tmp_path / "nonfinite.delta.safetensors", "-o", out, "--method", method)
    assert proc.returncode == 1, f"exit {proc.returncode}, want 1\n{proc.stderr}"
    assert name in proc.stderr, f"the message does not name the tensor:\n{proc.stderr}"
    assert "nonfinite.delta.safetensors" in proc.stderr, f"the message does not name the delta:\n{proc.stderr}"
    assert not out.exists()


@pytest.fixture(scope="module")
def odd_shapes(tmp_path_factory):
    """A base and three tunes with a 0-d, an empty (0×4), a 2-D, a 1-D and a 3-D F32 tensor, and
    matrices with fewer rows or columns than tasks (tsv's k is then 1 and its stacks Û or V̂ are
    wider than tall), and their deltas at density 1 and at density 0.5 (the binary's)."""
    d = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(8)
    shapes = {"a.scalar": (), "b.empty": (0, 4), "c.matrix": (6, 4), "d.vector": (5,), "e.cube": (2, 3, 4),
              "f.row": (1, 7), "g.pair": (2, 9), "h.column": (9, 2), "i.one": (1, 1)}
    base = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    _write_f32(d / "base.safetensors", shapes, base)
    paths = {}
    for k in (1, 2, 3):
        tune = {n: (v + 0.1 * rng.standard_normal(shapes[n])).astype(np.float32) for n, v in base.items()}
        _write_f32(d / f"t{k}.safetensors", shapes, tune)
        for dens in ("1", "0.5"):
            out = d / f"d{k}-{dens}.delta.safetensors"
            run_bin("extract", "--base", d / "base.safetensors", "--tuned", d / f"t{k}.safetensors", "-o", out,
                    "--density", dens, "--seed", str(40 + k))
            paths.setdefault(dens, []).append(out)
    return d, paths


@pytest.mark.parametrize("method", ["sum", "ties", "iso", "tsv"])
@pytest.mark.parametrize("density", ["1", "0.5"])
def test_binary_zero_d_and_empty_tensors(method, density, odd_shapes):
    """TestBinary: 0-d and empty tensors merge without error; 0-d follows the elementwise (ties) or
    mean (iso, tsv) path, the empty tensor is written empty."""
    d, paths = odd_shapes
    out = d / f"odd-{method}-{density}.safetensors"
    args = ["merge", "--base", d / "base.safetensors", *paths[density], "-o", out]
    if method != "sum":
        args += ["--method", method]
    run_bin(*args)
    got = ref.read_tensors(out)
    assert got["b.empty"] == ("F32", (0, 4), b"") and got["a.scalar"][:2] == ("F32", ())
    ds = decoded(paths[density])
    want = ref.merge_method(d / "base.safetensors", ds, method)
    if method in ("sum", "ties"):
        assert_same_tensors(got, want, f"{method} odd shapes")
    else:
        residual = ref.method_residual(d / "base.safetensors", ds, method)
        assert {"c.matrix", "d.vector", "e.cube", "f.row", "g.pair", "h.column"} <= set(residual)
        assert_within_tolerance(got, want, residual, f"{method} odd shapes", min_exact=0.9)


@pytest.mark.parametrize("method", ["ties", "iso", "tsv"])
def test_binary_a_zero_weight_task_brings_nothing(method, odd_shapes):
    """TestBinary: a delta weighted 0 is one of the T tasks but adds nothing: for `tsv` it brings
    no singular triplets (those of a zero matrix are arbitrary; before, the binary stacked them
    and missed the reference by up to the size of R)."""
    d, paths = odd_shapes
    out = d / f"zero-weight-{method}.safetensors"
    run_bin("merge", "--base", d / "base.safetensors", *paths["1"], "-o", out, "--method", method,
            "--weights", "1,0,0.5")
    got = ref.read_tensors(out)
    ds = decoded(paths["1"])
    want = ref.merge_method(d / "base.safetensors", ds, method, weights=[1, 0, 0.5])
    if method == "ties":
        assert_same_tensors(got, want, "ties, a zero weight")
    else:
        residual = ref.method_residual(d / "base.safetensors", ds, method, weights=[1, 0, 0.5])
        assert_within_tolerance(got, want, residual, f"{method}, a zero weight", min_exact=0.9)


def test_binary_a_delta_that_keeps_no_change_of_a_matrix_brings_nothing(tmp_path):
    """TestBinary: two deltas in the two slots of one seed keep disjoint elements, so of a 1×1
    matrix exactly one keeps the change and the other's estimate is zero (a `masked` tensor with
    nothing kept). `tsv` takes no triplets from the zero one (METHODS.md), and `inspect
    --subspaces` finds no pair of subspaces to compare in it."""
    shapes = {"one": (1, 1), "wide": (2, 5)}
    rng = np.random.default_rng(11)
    base = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    _write_f32(tmp_path / "base.safetensors", shapes, base)
    deltas = []
    for k in (0, 1):
        _write_f32(tmp_path / f"t{k}.safetensors", shapes,
                   {n: v + np.float32(0.1) * rng.standard_normal(shapes[n]).astype(np.float32) for n, v in base.items()})
        deltas.append(tmp_path / f"d{k}.delta.safetensors")
        run_bin("extract", "--base", tmp_path / "base.safetensors", "--tuned", tmp_path / f"t{k}.safetensors",
                "--seed", "5", "--slot", f"{k}/2", "-o", deltas[-1])
    ds = decoded(deltas)
    kept = [d.entries["one"].indices.size for d in ds]
    assert [d.entries["one"].kind for d in ds] == ["masked", "masked"] and sorted(kept) == [0, 1], (
        f"the construction: the 1×1 matrix is masked by both and kept by one: {kept}")
    out = tmp_path / "tsv.safetensors"
    run_bin("merge", "--base", tmp_path / "base.safetensors", *deltas, "-o", out, "--method", "tsv")
    want = ref.merge_method(tmp_path / "base.safetensors", ds, "tsv")
    residual = ref.method_residual(tmp_path / "base.safetensors", ds, "tsv")
    assert_within_tolerance(ref.read_tensors(out), want, residual, "tsv, a zero task", min_exact=0.9)
    report = json.loads(run_bin("inspect", "--json", "--subspaces", "--base", tmp_path / "base.safetensors",
                                *deltas).stdout)
    # Only `wide` has two subspaces to compare: ‖U_aᵀ U_b‖_F² / k with k = max(1, ⌊2/2⌋) = 1.
    bv = base["wide"].astype(np.float64).reshape(-1)
    tops = [np.linalg.svd(ref.estimate(d, "wide", bv).reshape(shapes["wide"]))[0][:, :1] for d in ds]
    want_alignment = float(np.sum((tops[0].T @ tops[1]) ** 2))
    got_alignment = report["pairs"][0]["subspace_alignment"]
    assert abs(got_alignment - want_alignment) < 1e-9, (got_alignment, want_alignment)


def _ill_defined(method, shape, taus, weights):
    """Whether METHODS.md leaves `method`'s R open on this 2-D tensor ("Where `tsv` is not well
    defined", and a rank-deficient `M` for `iso`), judged from the exact SVDs with a margin of
    1e-9 of the largest singular value."""
    T, r = len(taus), min(shape)
    k = max(1, r // T)
    if method == "iso":
        s = np.linalg.svd(sum(w * t for w, t in zip(weights, taus)).reshape(shape), compute_uv=False)
        return s[-1] <= 1e-9 * s[0]
    us, vs = [], []
    for w, t in zip(weights, taus):
        x = (np.float64(w) * t).reshape(shape)
        if not np.any(x):
            continue
        u, s, vt = np.linalg.svd(x, full_matrices=False)
        if s[k - 1] <= 1e-9 * s[0] or (k < s.size and s[k - 1] - s[k] <= 1e-9 * s[0]):
            return True
        us.append(u[:, :k])
        vs.append(vt[:k].T)
    for stack in (np.hstack(us), np.hstack(vs)) if us else ():
        sv = np.linalg.svd(stack, compute_uv=False)
        if sv[-1] <= 1e-9 * sv[0]:
            return True
    return False


def test_binary_random_small_merges_match_the_reference(tmp_path):
    """TestBinary, seeded random cases: 2 to 4 deltas of small F32, BF16 or F16 matrices (1 to 6
    rows and columns, fewer than the tasks included) and a vector, at densities 1, 0.5, 0.3 or in
    slots, some tensors unchanged by some fine-tunes, weights from {1, 0.5, 0, −1, 2}. `ties`
    equals the reference bit for bit; `iso` and `tsv` are within one ulp wherever METHODS.md
    defines R."""
    rng = np.random.default_rng(2026)
    checked = 0
    for case in range(15):
        d = tmp_path / f"c{case}"
        d.mkdir()
        T = int(rng.integers(2, 5))
        dtype = ("F32", "BF16", "F16")[case % 3]
        shapes = {f"m{i}": (int(rng.integers(1, 7)), int(rng.integers(1, 7))) for i in range(3)}
        shapes["v"] = (int(rng.integers(1, 5)),)
        base = {n: rng.standard_normal(s) for n, s in shapes.items()}
        bv = _write_f32(d / "base.safetensors", shapes, base, dtype)
        density, slots = str(rng.choice(["1", "0.5", "0.3"])), bool(rng.random() < 0.3)
        paths = []
        for k in range(T):
            changed = {n: rng.random() < 0.85 for n in shapes}
            _write_f32(d / f"t{k}.safetensors", shapes,
                       {n: v + 0.1 * changed[n] * rng.standard_normal(shapes[n]) for n, v in base.items()}, dtype)
            paths.append(d / f"d{k}.delta.safetensors")
            mask = ["--seed", "9", "--slot", f"{k}/{T}"] if slots else ["--density", density, "--seed", str(k + 1)]
            run_bin("extract", "--base", d / "base.safetensors", "--tuned", d / f"t{k}.safetensors", "-o", paths[-1], *mask)
        ds = decoded(paths)
        weights = [float(w) for w in rng.choice([1, 0.5, 0, -1, 2], T)]
        for method in ("ties", "iso", "tsv"):
            out = d / f"{method}.safetensors"
            run_bin("merge", "--method", method, "--base", d / "base.safetensors", *paths, "-o", out,
                    "--weights", ",".join(map(str, weights)))
            got = ref.read_tensors(out)
            want = ref.merge_method(d / "base.safetensors", ds, method, weights=weights)
            what = f"case {case} ({T} {dtype} deltas, weights {weights}, density {density}, slots {slots}): {method}"
            if method == "ties":
                assert_same_tensors(got, want, what)
                continue
            for name, shape in shapes.items():
                taus = [ref.estimate(x, name, bv[name]) if x.entries[name].kind == "masked"
                        else np.zeros(bv[name].size) for x in ds]
                if len(shape) == 2 and _ill_defined(method, shape, taus, weights):
                    continue
                g, w = _bits(got[name][2], dtype), _bits(want[name][2], dtype)
                diff = np.abs(_ordered(g, dtype) - _ordered(w, dtype))
                assert diff.max() <= 1, f"{what}: {name} {shape}: {int(diff.max())} ulps from the reference"
                checked += 1
    assert checked >= 50, f"only {checked} tensors were well defined enough to check"
