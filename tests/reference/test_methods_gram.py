"""The fast route of `iso` and `tsv` and its fallbacks (docs/METHODS.md, "How `iso` and `tsv` are
computed"), on deltas built with a chosen spectrum, against the numpy reference with exact SVDs.

    SOTU_BIN=target/release/sotu-delta .venv/bin/python -m pytest -q tests/reference/test_methods_gram.py

The binary takes each task's top k triplets from the eigendecomposition of its Gram matrix where
λ_k ≥ 1e-6 λ_1, and each polar factor as X (XᵀX)^(-1/2) where λ_min(XᵀX) ≥ 1e-7 λ_max; elsewhere
the exact SVD, and `--verbose` names the step. Each test builds an F64 base and three fine-tunes
whose deltas (extracted at density 1, so τ is the designed matrix to F64 rounding) put one
tensor on one side of a check, asserts which steps fell back, and compares the output with the
reference within the tolerance of METHODS.md (tests/reference/test_methods.py), in F64 (1e-9 of
max |R|) and rounded to F32 and BF16.

Where the definition itself leaves R open (two equal deltas, a delta of rank below k, equal
singular values at the cut k: METHODS.md, "Where tsv is not well defined"), no implementation
can match the reference: those tests check the fallback, that the output is finite and the same
for 1 and 2 threads, and (to show that the case is open) that two exact SVDs disagree there.
"""

import re
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sotu_ref as ref  # noqa: E402
import test_methods as tm  # noqa: E402

T = 3
# Two matrices, tall and wide as the tensor is stored: r = 40 and 24, k = 13 and 8.
SHAPES = {"tall.weight": (48, 40), "wide.weight": (24, 60)}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("gram")


def taus_of(base, paths):
    """{tensor: [τ_1, τ_2, τ_3]} as the reference estimates them."""
    bt = ref.read_safetensors(base)[1]
    out = {}
    for d in tm.decoded(paths):
        for name in SHAPES:
            out.setdefault(name, []).append(ref.estimate(d, name, ref.to_f64(bt[name].dtype, bt[name].data)))
    return out


def _orthonormal(rng, m, r):
    q, _ = np.linalg.qr(rng.standard_normal((m, r)))
    return q


def designed(rng, shape, sigma):
    """A matrix of `shape` with singular values `sigma` (descending; zeros allowed) and random
    singular vectors."""
    m, n = shape
    r = len(sigma)
    return (_orthonormal(rng, m, r) * np.asarray(sigma, dtype=np.float64)) @ _orthonormal(rng, n, r).T


def noise(rng, shape):
    return designed(rng, shape, np.linspace(1.0, 0.5, min(shape)))


def build(work, name, deltas_of):
    """Base and three fine-tunes in F64, deltas extracted at density 1. deltas_of(rng, tensor,
    shape) -> [D_1, D_2, D_3]. Returns (base path, delta paths)."""
    d = work / name
    d.mkdir()
    rng = np.random.default_rng(sum(map(ord, name)))
    base, tunes = {}, [{} for _ in range(T)]
    for tensor, shape in SHAPES.items():
        b = rng.uniform(-1, 1, shape)
        base[tensor] = ref.Tensor("F64", shape, b.astype("<f8").tobytes())
        for t, D in enumerate(deltas_of(rng, tensor, shape)):
            tunes[t][tensor] = ref.Tensor("F64", shape, (b + D).astype("<f8").tobytes())
    ref.write_safetensors(d / "base.safetensors", base)
    paths = []
    for t in range(T):
        ref.write_safetensors(d / f"tune{t + 1}.safetensors", tunes[t])
        p = d / f"d{t + 1}.safetensors"
        tm.run_bin("extract", "--base", d / "base.safetensors", "--tuned", d / f"tune{t + 1}.safetensors",
                   "--density", "1", "-o", p)
        paths.append(p)
    return d / "base.safetensors", paths


def merged(method, base, paths, out, *extra):
    """Runs the merge with --verbose; returns ({tensor: [steps that took the exact SVD]}, tensors)."""
    proc = tm.run_bin("--verbose", "merge", "--method", method, "--base", base, *paths, "-o", out, *extra)
    exact = {}
    for line in proc.stderr.splitlines():
        m = re.match(rf"sotu-delta: --method {method}: tensor (\S+): exact SVD for (.*) \(a Gram", line)
        if m:
            exact[m.group(1)] = m.group(2).split(", ")
    return exact, ref.read_tensors(out)


def check_against_reference(method, base, paths, work, tag):
    """F64, and rounded to F32 and BF16: within the tolerance of METHODS.md. Returns the exact-SVD
    steps (the same for every output dtype)."""
    steps = None
    for dtype in (None, "f32", "bf16"):
        out = work / f"{tag}-{method}-{dtype}.safetensors"
        extra = ["--dtype", dtype] if dtype else []
        exact, got = merged(method, base, paths, out, *extra)
        assert steps is None or exact == steps
        steps = exact
        residual = {}
        want = ref.merge_method(base, tm.decoded(paths), method, out_dtype=dtype, residuals=residual)
        assert sorted(residual) == sorted(SHAPES), sorted(residual)
        tm.assert_within_tolerance(got, want, residual, f"{tag} {method} {dtype or 'f64'}")
    return steps


def check_open_case(method, base, paths, work, tag):
    """A case the definition leaves open: finite, the same bytes for 1 and 2 threads. Returns the
    exact-SVD steps."""
    outs = []
    for threads in (1, 2):
        out = work / f"{tag}-{method}-t{threads}.safetensors"
        exact, got = merged(method, base, paths, out, "--threads", str(threads))
        for name in SHAPES:
            assert np.all(np.isfinite(tm._as_f64(got[name][2], "F64"))), name
        outs.append((exact, out.read_bytes()))
    assert outs[0] == outs[1], f"{tag}: --threads 1 and 2 differ"
    return outs[0][0]


def two_svds_disagree(base, paths):
    """The reference's tsv with numpy's SVD against the same with the SVD of the transpose: where
    R is not well defined, two exact SVDs give different results."""
    def svd_t(a):
        u, s, vt = np.linalg.svd(np.asarray(a).T, full_matrices=False)
        return vt.T, s, u.T
    taus = taus_of(base, paths)
    worst = 0.0
    for name, shape in SHAPES.items():
        a = ref.tsv_delta(taus[name], [1.0] * T, shape)
        b = ref.tsv_delta(taus[name], [1.0] * T, shape, svd=svd_t)
        worst = max(worst, float(np.max(np.abs(a - b)) / np.max(np.abs(a))))
    return worst


def k_of(shape):
    return min(shape) // T


# ---------------------------------------------------------------------------------------------
# Cases the Gram route accepts
# ---------------------------------------------------------------------------------------------

def test_tsv_gram_route_on_full_rank_deltas(work):
    """Independent full-rank deltas: no step falls back, and the result is the reference's."""
    base, paths = build(work, "full", lambda rng, _, shape: [noise(rng, shape) for _ in range(T)])
    assert check_against_reference("tsv", base, paths, work, "full") == {}


def test_tsv_gram_route_on_a_delta_of_rank_above_k(work):
    """A delta of rank r − 4 ≥ k: its Gram matrix has zero eigenvalues below the top k, which the
    route does not use."""
    def deltas(rng, _, shape):
        r = min(shape)
        return [noise(rng, shape), designed(rng, shape, [*np.linspace(1, 0.3, r - 4), 0, 0, 0, 0]),
                noise(rng, shape)]
    base, paths = build(work, "rank-above-k", deltas)
    assert check_against_reference("tsv", base, paths, work, "rank-above-k") == {}


def test_tsv_gram_route_on_a_repeated_singular_value_inside_the_top_k(work):
    """σ_{k−1} = σ_k > σ_{k+1}: a repeated eigenvalue of the Gram matrix, whose vectors the
    eigendecomposition may rotate; R does not depend on that rotation."""
    def deltas(rng, _, shape):
        r, k = min(shape), k_of(shape)
        s = np.linspace(1, 0.2, r)
        s[k - 2] = s[k - 1]
        return [designed(rng, shape, s), noise(rng, shape), noise(rng, shape)]
    base, paths = build(work, "repeated-inside", deltas)
    assert check_against_reference("tsv", base, paths, work, "repeated-inside") == {}


def test_tsv_gram_route_near_its_polar_threshold(work):
    """Two deltas that share most of their top subspaces: λ_min(ÛᵀÛ) / λ_max between 1e-7 and
    1e-6, just above the threshold, where the route's error is largest."""
    def deltas(rng, tensor, shape):
        d1 = noise(rng, shape)
        return [d1, d1 + 0.01 * noise(rng, shape), noise(rng, shape)]
    base, paths = build(work, "near-threshold", deltas)
    ratios = _polar_ratios(base, paths)
    for name in SHAPES:
        assert 1e-7 < min(ratios[name]) < 1e-6, f"{name}: λ_min/λ_max {ratios[name]}: not near 1e-7"
    assert check_against_reference("tsv", base, paths, work, "near-threshold") == {}


def _polar_ratios(base, paths):
    """{tensor: [λ_min/λ_max of ÛᵀÛ, of V̂ᵀV̂]} from the reference's exact SVDs."""
    taus = taus_of(base, paths)
    out = {}
    for name, shape in SHAPES.items():
        k = k_of(shape)
        us, vs = [], []
        for tau in taus[name]:
            u, _, vt = np.linalg.svd(tau.reshape(shape), full_matrices=False)
            us.append(u[:, :k])
            vs.append(vt[:k].T)
        out[name] = []
        for x in (np.hstack(us), np.hstack(vs)):
            s = np.linalg.svd(x, compute_uv=False)
            out[name].append(float((s[-1] / s[0]) ** 2))
    return out


# ---------------------------------------------------------------------------------------------
# Fallbacks on cases that are well defined
# ---------------------------------------------------------------------------------------------

def test_tsv_falls_back_for_a_steep_spectrum(work):
    """σ_k / σ_1 = 1e-4 (full rank, distinct values): λ_k / λ_1 = 1e-8 < 1e-6, so the second
    delta's top triplets come from the exact SVD."""
    def deltas(rng, _, shape):
        r, k = min(shape), k_of(shape)
        s = np.geomspace(1, 1e-4, k)
        s = np.concatenate([s, np.geomspace(0.9e-4, 1e-6, r - k)])
        return [noise(rng, shape), designed(rng, shape, s), noise(rng, shape)]
    base, paths = build(work, "steep", deltas)
    steps = check_against_reference("tsv", base, paths, work, "steep")
    assert steps == {name: ["top triplets of delta 2"] for name in SHAPES}


def test_tsv_falls_back_for_nearly_equal_deltas(work):
    """The second delta is the first plus 1e-5 of noise: ÛᵀÛ and V̂ᵀV̂ have λ_min/λ_max near
    1e-10, below 1e-7: both polar factors come from the exact SVD. R is well defined (its
    condition is about 1e5), and the result is the reference's."""
    def deltas(rng, _, shape):
        d1 = noise(rng, shape)
        return [d1, d1 + 1e-5 * noise(rng, shape), noise(rng, shape)]
    base, paths = build(work, "nearly-equal", deltas)
    steps = check_against_reference("tsv", base, paths, work, "nearly-equal")
    assert steps == {name: ["polar(Û)", "polar(V̂)"] for name in SHAPES}


def test_iso_falls_back_for_an_ill_conditioned_sum(work):
    """Σ τ with σ_min / σ_max = 1e-5: λ_min / λ_max = 1e-10 < 1e-7, so iso's polar factor comes
    from the exact SVD. The polar factor of a full-rank matrix is well defined."""
    def deltas(rng, _, shape):
        m = designed(rng, shape, np.geomspace(1, 1e-5, min(shape)))
        d1, d2 = noise(rng, shape), noise(rng, shape)
        return [d1, d2, m - d1 - d2]
    base, paths = build(work, "iso-ill", deltas)
    steps = check_against_reference("iso", base, paths, work, "iso-ill")
    assert steps == {name: ["polar(M)"] for name in SHAPES}


def test_iso_gram_route_on_a_well_conditioned_sum(work):
    base, paths = build(work, "iso-full", lambda rng, _, shape: [noise(rng, shape) for _ in range(T)])
    assert check_against_reference("iso", base, paths, work, "iso-full") == {}


# ---------------------------------------------------------------------------------------------
# Cases the definition leaves open (METHODS.md, "Where tsv is not well defined")
# ---------------------------------------------------------------------------------------------

def test_tsv_two_equal_deltas(work):
    """Equal deltas make Û and V̂ rank deficient: both polar factors fall back, and their
    singular vectors of σ = 0, which R depends on, are any the SVD picks."""
    def deltas(rng, _, shape):
        d1 = noise(rng, shape)
        return [d1, d1.copy(), noise(rng, shape)]
    base, paths = build(work, "equal", deltas)
    steps = check_open_case("tsv", base, paths, work, "equal")
    assert steps == {name: ["polar(Û)", "polar(V̂)"] for name in SHAPES}
    assert two_svds_disagree(base, paths) > 0.1


def test_tsv_a_delta_of_rank_below_k(work):
    """A delta of rank 3 < k: its top k triplets come from the exact SVD, and those of σ = 0 are
    any the SVD picks."""
    def deltas(rng, _, shape):
        return [noise(rng, shape), designed(rng, shape, [1.0, 0.7, 0.4]), noise(rng, shape)]
    base, paths = build(work, "rank-below-k", deltas)
    steps = check_open_case("tsv", base, paths, work, "rank-below-k")
    assert all("top triplets of delta 2" in steps[name] for name in SHAPES), steps
    assert two_svds_disagree(base, paths) > 0.1


def test_tsv_a_repeated_singular_value_at_the_cut(work):
    """σ_k = σ_{k+1}: the top k triplets are any k of a two-dimensional space. The Gram route
    takes them (the check is on λ_k / λ_1, not the gap), as the exact SVD would take any."""
    def deltas(rng, _, shape):
        r, k = min(shape), k_of(shape)
        s = np.linspace(1, 0.2, r)
        s[k] = s[k - 1]
        return [designed(rng, shape, s), noise(rng, shape), noise(rng, shape)]
    base, paths = build(work, "repeated-cut", deltas)
    assert check_open_case("tsv", base, paths, work, "repeated-cut") == {}
    assert two_svds_disagree(base, paths) > 0.1
