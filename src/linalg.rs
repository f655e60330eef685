//! Dense f64 linear algebra on tensors, with faer, always on the calling thread (`Par::Seq`), so
//! that a result does not depend on the thread count.
//!
//! A row-major `rows × cols` tensor is, as faer reads its bytes, the column-major
//! `cols × rows` transpose ([`view`]); callers run on that view the methods that commute with
//! transposition, and read the result's element `(j, i)` as the tensor's `(i, j)`.

use anyhow::{Result, bail};
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::svd::{ComputeSvdVectors, SvdParams, svd, svd_scratch};
use faer::{Accum, Mat, MatRef, Par, Spec};

/// A row-major `rows × cols` tensor as faer sees its bytes: the column-major `cols × rows`
/// transpose. Both methods commute with transposition, so they run on that view and its result
/// is the row-major result.
pub fn view(data: &[f64], (rows, cols): (usize, usize)) -> MatRef<'_, f64> {
    MatRef::from_column_major_slice(data, cols, rows)
}

/// `P Qᵀ` of the thin SVD `a = P Σ Qᵀ` (`a` no wider than tall).
pub fn polar(a: MatRef<'_, f64>, name: &str) -> Result<Mat<f64>> {
    let (p, _, q) = thin_svd(a, name)?;
    Ok(mul_transposed(p.as_ref(), q.as_ref(), 1.0))
}

/// The thin SVD `a = U diag(s) Vᵀ`, singular values in nonincreasing order, on this thread.
pub fn thin_svd(a: MatRef<'_, f64>, name: &str) -> Result<(Mat<f64>, Vec<f64>, Mat<f64>)> {
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
