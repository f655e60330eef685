//! Dense f64 linear algebra on tensors, with faer, always on the calling thread (`Par::Seq`), so
//! that a result does not depend on the thread count.
//!
//! A row-major `rows × cols` tensor is, as faer reads its bytes, the column-major
//! `cols × rows` transpose ([`view`]); callers run on that view the methods that commute with
//! transposition, and read the result's element `(j, i)` as the tensor's `(i, j)`.
//!
//! The merge methods need the top singular triplets of a matrix and the polar factor of a tall
//! one. Both come from the symmetric eigendecomposition of a Gram matrix where that is accurate
//! enough ([`top_singular_gram`], [`inverse_sqrt_gram`]): it costs a fraction of a thin SVD,
//! whose bidiagonalization is the slowest step here. Each checks the eigenvalues it relies on
//! against a fixed ratio and returns `None` where they fail it; the caller then takes the exact
//! SVD (docs/METHODS.md, "How `iso` and `tsv` are computed").

use anyhow::{Result, bail};
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::evd::{
    self, ComputeEigenvectors, SelfAdjointEvdParams, tridiag, tridiagonal_self_adjoint_evd,
};
use faer::linalg::matmul::triangular::BlockStructure;
use faer::linalg::svd::{ComputeSvdVectors, SvdParams, svd, svd_scratch};
use faer::{Accum, Conj, Mat, MatRef, Par, Spec};

/// The smallest `λ_k / λ_1` (that is `(σ_k / σ_1)²`) for which [`top_singular_gram`] takes the top
/// `k` triplets from the Gram matrix: its errors grow as `ε · λ_1 / λ_k`, here at most
/// `1e6 · ε ≈ 2e-10` of `σ_1`, against the 1e-9 of the tests' F64 tolerance and the 6e-8 of an
/// F32 rounding.
pub const TOP_GRAM_MIN_RATIO: f64 = 1e-6;

/// The smallest `λ_min / λ_max` of `XᵀX` for which [`inverse_sqrt_gram`] gives `(XᵀX)^(-1/2)`:
/// the polar factor's error grows as `ε · λ_max / λ_min` (2.2e-9 here) in its worst direction;
/// in a merged delta it measured 20% of that bound on a 24 × 60 tensor and 2% on 512 × 512
/// (docs/NOTES.md), relative to the largest element.
pub const POLAR_GRAM_MIN_RATIO: f64 = 1e-7;

/// Singular triplets `(U, s, V)`: vectors as columns, values in nonincreasing order.
pub type Triplets = (Mat<f64>, Vec<f64>, Mat<f64>);

/// A row-major `rows × cols` tensor as faer sees its bytes: the column-major `cols × rows`
/// transpose. Both methods commute with transposition, so they run on that view and its result
/// is the row-major result.
pub fn view(data: &[f64], (rows, cols): (usize, usize)) -> MatRef<'_, f64> {
    MatRef::from_column_major_slice(data, cols, rows)
}

/// `P Qᵀ` of the thin SVD `a = P Σ Qᵀ`: orthonormal columns where `a` is tall, orthonormal rows
/// where it is wide.
pub fn polar(a: MatRef<'_, f64>, name: &str) -> Result<Mat<f64>> {
    let (p, _, q) = thin_svd(a, name)?;
    Ok(mul_transposed(p.as_ref(), q.as_ref(), 1.0))
}

/// The thin SVD `a = U diag(s) Vᵀ`, singular values in nonincreasing order, on this thread.
pub fn thin_svd(a: MatRef<'_, f64>, name: &str) -> Result<Triplets> {
    let (m, n) = a.shape();
    let r = m.min(n);
    let mut u = Mat::<f64>::zeros(m, r);
    let mut v = Mat::<f64>::zeros(n, r);
    let mut s = faer::diag::Diag::<f64>::zeros(r);
    let params: Spec<SvdParams, f64> = Default::default();
    let thin = ComputeSvdVectors::Thin;
    let mut mem = MemBuffer::new(svd_scratch::<f64>(m, n, thin, thin, Par::Seq, params));
    let stack = MemStack::new(&mut mem);
    if svd(
        a,
        s.as_mut(),
        Some(u.as_mut()),
        Some(v.as_mut()),
        Par::Seq,
        stack,
        params,
    )
    .is_err()
    {
        bail!("tensor {name}: the SVD did not converge");
    }
    let s = (0..r).map(|i| s[i]).collect();
    Ok((u, s, v))
}

/// The top `k` singular triplets `(U_k, s_k, V_k)` of `a` (`1 ≤ k ≤ min(m, n)`), singular values
/// in nonincreasing order, from its Gram matrix; `None` where that is not accurate enough.
///
/// On the smaller side `n`, `aᵀa = V diag(λ) Vᵀ`: `s = √λ`, `V_k` its top eigenvectors and
/// `U_k = a V_k diag(1/s)`. That is a Gram product, one symmetric eigendecomposition whose
/// eigenvectors are rebuilt for the top `k` only, and one product: about a third of a thin SVD's
/// time on 2048 × 2048. Where `λ_k < TOP_GRAM_MIN_RATIO · λ_1` (a delta of rank below `k`, a
/// steep spectrum, a zero matrix) the Gram matrix has lost the small triplets to rounding: the
/// caller takes the exact thin SVD ([`top_singular_exact`]).
pub fn top_singular_gram(a: MatRef<'_, f64>, k: usize, name: &str) -> Result<Option<Triplets>> {
    let (m, n) = a.shape();
    assert!(k >= 1 && k <= m.min(n), "top {k} of a {m}×{n} matrix");
    if m < n {
        return Ok(top_singular_gram(a.transpose(), k, name)?.map(|(v, s, u)| (u, s, v)));
    }
    let (lambda, w) = symmetric_eigen(gram(a), k, name)?;
    let (top, kth) = (lambda[n - 1], lambda[n - k]);
    if !(kth > TOP_GRAM_MIN_RATIO * top && top.is_finite()) {
        return Ok(None);
    }
    // Eigenvalues come in nondecreasing order: the i-th singular triplet is the last but i.
    let s: Vec<f64> = (0..k).map(|i| lambda[n - 1 - i].sqrt()).collect();
    let v = Mat::from_fn(n, k, |r, i| w[(r, k - 1 - i)]);
    let mut u = Mat::<f64>::zeros(m, k);
    faer::linalg::matmul::matmul(u.as_mut(), Accum::Replace, a, v.as_ref(), 1.0, Par::Seq);
    for (i, &s) in s.iter().enumerate() {
        let inv = 1.0 / s;
        u.col_mut(i).iter_mut().for_each(|x| *x *= inv);
    }
    Ok(Some((u, s, v)))
}

/// The top `k` singular triplets of `a` from its exact thin SVD.
pub fn top_singular_exact(a: MatRef<'_, f64>, k: usize, name: &str) -> Result<Triplets> {
    let (u, s, v) = thin_svd(a, name)?;
    Ok((
        u.subcols(0, k).to_owned(),
        s[..k].to_vec(),
        v.subcols(0, k).to_owned(),
    ))
}

/// `(XᵀX)^(-1/2)` and the eigenvalues of `XᵀX` (nondecreasing), from one symmetric
/// eigendecomposition `XᵀX = W diag(λ) Wᵀ`: `X · (XᵀX)^(-1/2)` is the polar factor of `X`, and
/// `√λ` its singular values. `None` where `λ_min < POLAR_GRAM_MIN_RATIO · λ_max` (`X` rank
/// deficient or nearly so: two equal deltas, say), and where `X` is wider than tall (`XᵀX` is
/// then singular: `tsv`'s stacks of a matrix with fewer rows or columns than tasks): the caller
/// then takes the exact SVD.
pub fn inverse_sqrt_gram(x: MatRef<'_, f64>, name: &str) -> Result<Option<(Mat<f64>, Vec<f64>)>> {
    let p = x.ncols();
    assert!(p >= 1, "a matrix of no columns");
    if p > x.nrows() {
        return Ok(None);
    }
    let (lambda, w) = symmetric_eigen(gram(x), p, name)?;
    let (min, max) = (lambda[0], lambda[p - 1]);
    if !(min > POLAR_GRAM_MIN_RATIO * max && max.is_finite()) {
        return Ok(None);
    }
    // W diag(λ^(-1/4)) times its transpose: symmetric by construction, so only the lower half is
    // multiplied and then mirrored.
    let scale: Vec<f64> = lambda.iter().map(|l| l.powf(-0.25)).collect();
    let half = Mat::from_fn(p, p, |r, j| w[(r, j)] * scale[j]);
    drop(w);
    let mut root = Mat::<f64>::zeros(p, p);
    faer::linalg::matmul::triangular::matmul(
        root.as_mut(),
        BlockStructure::TriangularLower,
        Accum::Replace,
        half.as_ref(),
        BlockStructure::Rectangular,
        half.transpose(),
        BlockStructure::Rectangular,
        1.0,
        Par::Seq,
    );
    mirror_lower(&mut root);
    Ok(Some((root, lambda)))
}

/// Copies the strict lower half of the square `a` onto its upper half, in tiles that stay in
/// the cache (an element-by-element transpose of a large matrix misses it on every write).
fn mirror_lower(a: &mut Mat<f64>) {
    const TILE: usize = 64;
    let n = a.nrows();
    for jb in (0..n).step_by(TILE) {
        for ib in (jb..n).step_by(TILE) {
            for j in jb..n.min(jb + TILE) {
                for i in ib.max(j + 1)..n.min(ib + TILE) {
                    a[(j, i)] = a[(i, j)];
                }
            }
        }
    }
}

/// The lower half of `aᵀa` (the upper half left zero: the eigendecomposition reads the lower).
fn gram(a: MatRef<'_, f64>) -> Mat<f64> {
    let n = a.ncols();
    let mut g = Mat::<f64>::zeros(n, n);
    faer::linalg::matmul::triangular::matmul(
        g.as_mut(),
        BlockStructure::TriangularLower,
        Accum::Replace,
        a.transpose(),
        BlockStructure::Rectangular,
        a,
        BlockStructure::Rectangular,
        1.0,
        Par::Seq,
    );
    g
}

/// All eigenvalues of the symmetric `g` (lower half read), nondecreasing, and the eigenvectors
/// of the largest `top` of them (`n × top`, in the same order).
///
/// faer's `self_adjoint_evd` in its three steps (tridiagonalization, the tridiagonal
/// eigenproblem, the Householder back-transformation), so that the last one, which costs as
/// much as a matrix product per eigenvector, runs on the `top` vectors that are kept.
fn symmetric_eigen(mut g: Mat<f64>, top: usize, name: &str) -> Result<(Vec<f64>, Mat<f64>)> {
    let n = g.nrows();
    if n == 1 {
        return Ok((vec![g[(0, 0)]], Mat::from_fn(1, 1, |_, _| 1.0)));
    }
    let params: Spec<SelfAdjointEvdParams, f64> = Default::default();
    // Bounds the three steps' workspace (it also counts a copy of `g` that is not touched here:
    // untouched pages of a large allocation are never resident).
    let mut mem = MemBuffer::new(evd::self_adjoint_evd_scratch::<f64>(
        n,
        ComputeEigenvectors::Yes,
        Par::Seq,
        params,
    ));
    let stack = MemStack::new(&mut mem);
    let block = faer::linalg::qr::no_pivoting::factor::recommended_block_size::<f64>(n, n);
    let mut householder = Mat::<f64>::zeros(block, n - 1);
    tridiag::tridiag_in_place(
        g.as_mut(),
        householder.as_mut(),
        Par::Seq,
        stack,
        params.tridiag.into(),
    );
    let mut diag = faer::diag::Diag::<f64>::zeros(n);
    let mut subdiag = faer::diag::Diag::<f64>::zeros(n);
    for i in 0..n {
        diag[i] = g[(i, i)];
        if i + 1 < n {
            subdiag[i] = g[(i + 1, i)];
        }
    }
    let mut lambda = faer::diag::Diag::<f64>::zeros(n);
    let mut z = Mat::<f64>::zeros(n, n);
    if tridiagonal_self_adjoint_evd(
        diag.as_ref(),
        subdiag.as_ref(),
        lambda.as_mut(),
        Some(z.as_mut()),
        Par::Seq,
        stack,
        params,
    )
    .is_err()
    {
        bail!("tensor {name}: the eigendecomposition did not converge");
    }
    let mut w = if top == n {
        z
    } else {
        z.subcols(n - top, top).to_owned()
    };
    faer::linalg::householder::apply_block_householder_sequence_on_the_left_in_place_with_conj(
        g.as_ref().submatrix(1, 0, n - 1, n - 1),
        householder.as_ref(),
        Conj::No,
        w.as_mut().subrows_mut(1, n - 1),
        Par::Seq,
        stack,
    );
    Ok(((0..n).map(|i| lambda[i]).collect(), w))
}

/// `alpha · a · bᵀ`.
pub fn mul_transposed(a: MatRef<'_, f64>, b: MatRef<'_, f64>, alpha: f64) -> Mat<f64> {
    let mut out = Mat::<f64>::zeros(a.nrows(), b.nrows());
    faer::linalg::matmul::matmul(
        out.as_mut(),
        Accum::Replace,
        a,
        b.transpose(),
        alpha,
        Par::Seq,
    );
    out
}

/// `alpha · a · b`.
pub fn mul(a: MatRef<'_, f64>, b: MatRef<'_, f64>, alpha: f64) -> Mat<f64> {
    mul_transposed(a, b.transpose(), alpha)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic matrix with entries in [-0.5, 0.5).
    fn noise(m: usize, n: usize, seed: u64) -> Mat<f64> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        Mat::from_fn(m, n, |_, _| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        })
    }

    fn max_abs(a: MatRef<'_, f64>) -> f64 {
        let mut m = 0.0f64;
        for j in 0..a.ncols() {
            for i in 0..a.nrows() {
                m = m.max(a[(i, j)].abs());
            }
        }
        m
    }

    /// `U_k diag(s) V_kᵀ`: the rank-k truncation, which does not depend on the vectors' signs.
    fn truncation(u: &Mat<f64>, s: &[f64], v: &Mat<f64>) -> Mat<f64> {
        let us = Mat::from_fn(u.nrows(), u.ncols(), |i, j| u[(i, j)] * s[j]);
        mul_transposed(us.as_ref(), v.as_ref(), 1.0)
    }

    #[test]
    fn top_singular_matches_the_thin_svd_tall_and_wide() {
        for (m, n, k) in [
            (40, 24, 8),
            (24, 40, 8),
            (30, 30, 10),
            (17, 5, 5),
            (5, 17, 1),
        ] {
            let a = noise(m, n, (m * 100 + n) as u64);
            let (u, s, v) = top_singular_gram(a.as_ref(), k, "t").unwrap().unwrap();
            let (eu, es, ev) = thin_svd(a.as_ref(), "t").unwrap();
            assert_eq!((u.shape(), v.shape(), s.len()), ((m, k), (n, k), k));
            for i in 0..k {
                assert!((s[i] - es[i]).abs() <= 1e-13 * es[0], "{m}×{n} σ{i}");
            }
            let got = truncation(&u, &s, &v);
            let want = truncation(
                &eu.subcols(0, k).to_owned(),
                &es[..k],
                &ev.subcols(0, k).to_owned(),
            );
            let err = max_abs((&got - &want).as_ref());
            assert!(err <= 1e-12 * max_abs(want.as_ref()), "{m}×{n}: {err}");
            // U_k has orthonormal columns.
            let gu = mul_transposed(u.transpose(), u.transpose(), 1.0);
            let eye = Mat::<f64>::identity(k, k);
            assert!(max_abs((&gu - &eye).as_ref()) <= 1e-12, "{m}×{n}: UᵀU");
        }
    }

    #[test]
    fn top_singular_gram_refuses_a_rank_deficient_or_zero_matrix() {
        // Rank 3 < k = 6: the Gram route would divide by a rounding-level σ_6.
        let a = mul(noise(30, 3, 1).as_ref(), noise(3, 20, 2).as_ref(), 1.0);
        assert!(top_singular_gram(a.as_ref(), 6, "t").unwrap().is_none());
        // Rank 3 = k: accepted, and equal to the SVD's truncation.
        let (u, s, v) = top_singular_gram(a.as_ref(), 3, "t").unwrap().unwrap();
        let (eu, es, ev) = top_singular_exact(a.as_ref(), 3, "t").unwrap();
        let err = max_abs((&truncation(&u, &s, &v) - &truncation(&eu, &es, &ev)).as_ref());
        assert!(err <= 1e-12 * max_abs(a.as_ref()), "{err}");
        // A zero matrix (λ_1 = 0).
        let z = Mat::<f64>::zeros(8, 4);
        assert!(top_singular_gram(z.as_ref(), 2, "t").unwrap().is_none());
    }

    #[test]
    fn inverse_sqrt_gram_gives_the_polar_factor() {
        for (m, p) in [(50, 20), (30, 30), (9, 1)] {
            let x = noise(m, p, (m + 7 * p) as u64);
            let (root, lambda) = inverse_sqrt_gram(x.as_ref(), "t").unwrap().unwrap();
            let got = mul(x.as_ref(), root.as_ref(), 1.0);
            let want = polar(x.as_ref(), "t").unwrap();
            let err = max_abs((&got - &want).as_ref());
            assert!(err <= 1e-11, "{m}×{p}: {err}");
            let (_, s, _) = thin_svd(x.as_ref(), "t").unwrap();
            for (i, &l) in lambda.iter().rev().enumerate() {
                assert!((l.sqrt() - s[i]).abs() <= 1e-12 * s[0], "{m}×{p}: σ{i}");
            }
        }
    }

    #[test]
    fn mirror_lower_makes_the_matrix_symmetric() {
        for n in [1, 63, 64, 65, 200] {
            let mut a = noise(n, n, n as u64);
            let lower = a.clone();
            mirror_lower(&mut a);
            for j in 0..n {
                for i in 0..n {
                    let want = if i >= j { lower[(i, j)] } else { lower[(j, i)] };
                    assert_eq!(a[(i, j)], want, "{n}: ({i}, {j})");
                }
            }
        }
    }

    #[test]
    fn inverse_sqrt_gram_refuses_a_rank_deficient_matrix() {
        // Two equal columns: XᵀX is singular.
        let mut x = noise(12, 4, 3);
        for i in 0..12 {
            x[(i, 3)] = x[(i, 0)];
        }
        assert!(inverse_sqrt_gram(x.as_ref(), "t").unwrap().is_none());
    }
}
