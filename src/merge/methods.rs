//! The merge methods other than `sum` (docs/METHODS.md), on the CPU: `ties`, `iso` and `tsv`
//! act on each delta's unbiased estimate τ, in f64, and round once to the output dtype.
//!
//! A tensor is computed whole on one thread: its decompositions run with faer in sequential
//! mode, so the result does not depend on the thread count, and rayon runs tensors side by
//! side (`merge::execute`). Memory per worker, in copies of one tensor in f64
//! (docs/METHODS.md, "Memory"): `ties` T + 3 (the T trimmed estimates, the base, one scratch,
//! the result); `iso` and `tsv` about 4 (the base, one estimate or their sum, the result, the
//! stacked triplets) plus faer's SVD factors and workspace, whatever T.

use anyhow::Result;
use faer::Mat;

use super::Input;
use super::plan::{Combine, Method, Source, TensorPlan, Term, TiesParams};
use crate::dtype::Float;
use crate::io::{Checkpoint, Sink};
use crate::linalg::{
    inverse_sqrt_gram, mul, mul_transposed, polar, thin_svd, top_singular_exact, top_singular_gram,
    view,
};

/// Elements rounded and written at a time: bounds the output buffer.
const WRITE_PIECE: usize = 1 << 20;

/// What computing a tensor found, besides its bytes.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Results that are infinite or NaN where the base is finite.
    pub overflows: u64,
    /// The steps of `iso` or `tsv` that took the exact SVD because the Gram matrix failed its
    /// check (docs/METHODS.md, "How `iso` and `tsv` are computed"), e.g. `polar(Û)`.
    pub exact_svd: Vec<String>,
}

/// Computes and writes a tensor planned as [`Source::Combine`].
pub fn execute(
    base: &Checkpoint,
    deltas: &[Input],
    out: &dyn Sink,
    p: &TensorPlan,
) -> Result<Outcome> {
    let Source::Combine {
        from,
        to,
        combine,
        terms,
    } = &p.source
    else {
        unreachable!("only combined tensors come here")
    };
    let (from, to) = (*from, *to);
    let base_bytes = base
        .tensor(&p.name)
        .expect("planned from the base")
        .whole()?;
    let mut b = Vec::new();
    from.load_all(&base_bytes, &mut b);
    if b.is_empty() {
        return Ok(Outcome::default());
    }
    let est = Estimates {
        deltas,
        name: &p.name,
        from,
        base: &b,
        terms,
    };
    let matrix = match p.shape[..] {
        [rows, cols] => Some((rows, cols)),
        _ => None,
    };
    let mut exact_svd = Vec::new();
    let (r, written) = match (combine.method, matrix) {
        (Method::Ties, _) => {
            let (r, written) = ties(&est, combine)?;
            (Merged::Flat(r), Some(written))
        }
        (Method::Iso, Some(shape)) => (iso(&est, combine, shape, &mut exact_svd)?, None),
        (Method::Tsv, Some(shape)) => (tsv(&est, combine, shape, &mut exact_svd)?, None),
        (Method::Iso | Method::Tsv, None) => (mean(&est, combine)?, None),
        (Method::Sum, _) => unreachable!("sum is planned as Source::Compute"),
    };
    let result = Combined {
        from,
        to,
        base: &base_bytes,
        b: &b,
        r: &r,
        written: written.as_deref(),
    };
    Ok(Outcome {
        overflows: result.write(&p.name, out)?,
        exact_svd,
    })
}

/// The unbiased estimates of a tensor's deltas (docs/METHODS.md, "The unbiased estimate τ").
struct Estimates<'a> {
    deltas: &'a [Input<'a>],
    name: &'a str,
    from: Float,
    /// The base tensor, as f64.
    base: &'a [f64],
    terms: &'a [Term],
}

impl Estimates<'_> {
    /// `s_t` of `term`: 2^32 / (hi − lo).
    fn scale(&self, term: &Term) -> f64 {
        self.deltas[term.delta].params().rescale()
    }

    /// τ of `term` into `tau` ([`crate::format::Chunks::estimate`]).
    fn of(&self, term: &Term, tau: &mut Vec<f64>) -> Result<()> {
        let delta = &self.deltas[term.delta];
        let mut values = Vec::new();
        let all = 0..delta.entries()[self.name].numel();
        delta.chunks_in(self.name, all, &mut values)?.estimate(
            self.from,
            self.base,
            self.scale(term),
            tau,
        )
    }

    /// `w_t · τ_t` of `term` into `tau`.
    fn weighted(&self, term: &Term, tau: &mut Vec<f64>) -> Result<()> {
        self.of(term, tau)?;
        if term.coeff != 1.0 {
            tau.iter_mut().for_each(|x| *x *= term.coeff);
        }
        Ok(())
    }

    /// `Σ_t w_t · τ_t`, elementwise from `+0.0` in task order.
    fn weighted_sum(&self) -> Result<Vec<f64>> {
        let mut sum = vec![0.0; self.base.len()];
        let mut tau = Vec::new();
        for term in self.terms {
            self.of(term, &mut tau)?;
            for (a, &x) in sum.iter_mut().zip(&tau) {
                *a += term.coeff * x;
            }
        }
        Ok(sum)
    }
}

/// The trim threshold `θ` of `ties` for one task's estimate `tau` (not empty): the `k`-th
/// largest of `|τ|`, counting repeats, with `k = max(1, round_half_even(trim · n))`. Every
/// element at or above it is kept. `scratch` is reused from call to call. The CPU's `ties` and
/// the parameters of an engine's elementwise `ties` ([`ties_params`]) both take it from here.
pub fn ties_threshold(tau: &[f64], trim: f64, scratch: &mut Vec<u64>) -> f64 {
    let n = tau.len();
    let k = ((trim * n as f64).round_ties_even() as usize).clamp(1, n);
    // A radix select: |τ| is finite and non-negative, so it orders as its bits. Count the top
    // 16 bits (sign, exponent, 4 mantissa bits), find the bin that holds the k-th largest,
    // and select within it alone: two passes over τ and a sort of a small part, instead of a
    // comparison select over all of it (3.6× faster on 65M elements, docs/NOTES.md).
    let bits = |x: &f64| x.abs().to_bits();
    let mut hist = vec![0usize; 1 << 16];
    for x in tau {
        hist[(bits(x) >> 48) as usize] += 1;
    }
    let (mut above, mut bin) = (0, hist.len() - 1);
    while above + hist[bin] < k {
        above += hist[bin];
        bin -= 1;
    }
    scratch.clear();
    scratch.extend(tau.iter().map(bits).filter(|b| (b >> 48) as usize == bin));
    let (_, &mut theta, _) = scratch.select_nth_unstable_by(k - above - 1, |a, b| b.cmp(a));
    f64::from_bits(theta)
}

/// What an engine that runs the elementwise half of `ties` itself needs of tensor `p` (a
/// [`Source::Combine`] with [`Method::Ties`]): per term `s_t` and `θ_t`, computed from each
/// task's whole estimate exactly as [`execute`] computes them, and `α`. Fails as [`execute`]
/// would on an estimate that is not finite or a corrupt chunk. Holds two copies of the tensor in
/// f64 besides the base.
pub fn ties_params(base: &Checkpoint, deltas: &[Input], p: &TensorPlan) -> Result<TiesParams> {
    let Source::Combine {
        from,
        combine,
        terms,
        ..
    } = &p.source
    else {
        anyhow::bail!("tensor {}: not planned as a merge method", p.name)
    };
    if combine.method != Method::Ties {
        anyhow::bail!(
            "tensor {}: planned for {:?}, not ties",
            p.name,
            combine.method
        );
    }
    let mut b = Vec::new();
    from.load_all(
        &base
            .tensor(&p.name)
            .expect("planned from the base")
            .whole()?,
        &mut b,
    );
    let est = Estimates {
        deltas,
        name: &p.name,
        from: *from,
        base: &b,
        terms,
    };
    let mut theta = Vec::with_capacity(terms.len());
    if !b.is_empty() {
        let (mut tau, mut scratch) = (Vec::new(), Vec::new());
        for term in terms {
            est.of(term, &mut tau)?;
            theta.push(ties_threshold(&tau, combine.trim, &mut scratch));
        }
    } else {
        theta.resize(terms.len(), 0.0);
    }
    Ok(TiesParams {
        alpha: combine.alpha,
        scale: terms.iter().map(|t| est.scale(t)).collect(),
        theta,
    })
}

/// `ties`: the merged delta `α · m` at each element, and whether any task qualified there.
fn ties(est: &Estimates, c: &Combine) -> Result<(Vec<f64>, Vec<bool>)> {
    let n = est.base.len();
    let mut scratch = Vec::new();
    let mut trimmed = Vec::with_capacity(est.terms.len());
    for term in est.terms {
        let mut tau = Vec::new();
        est.of(term, &mut tau)?;
        let theta = ties_threshold(&tau, c.trim, &mut scratch);
        for x in tau.iter_mut().filter(|x| x.abs() < theta) {
            *x = 0.0;
        }
        trimmed.push(tau);
    }
    drop(scratch);
    let weights: Vec<f64> = est.terms.iter().map(|t| t.coeff).collect();
    let mut r = vec![0.0; n];
    let mut written = vec![false; n];
    for i in 0..n {
        let mut s = 0.0;
        for (tau, &w) in trimmed.iter().zip(&weights) {
            s += w * tau[i];
        }
        let positive = s >= 0.0;
        let (mut num, mut den, mut any) = (0.0, 0.0, false);
        for (tau, &w) in trimmed.iter().zip(&weights) {
            let x = tau[i];
            if x != 0.0 && (x > 0.0) == positive {
                num += w * x;
                den += w;
                any = true;
            }
        }
        let m = match (c.normalize, den != 0.0) {
            (false, _) => num,
            (true, true) => num / den,
            (true, false) => 0.0,
        };
        r[i] = c.alpha * m;
        written[i] = any;
    }
    Ok((r, written))
}

/// `α · (Σ_t w_t · τ_t) / T`: `iso` and `tsv` on a tensor that is not a matrix.
fn mean(est: &Estimates, c: &Combine) -> Result<Merged> {
    // T counts every delta: one that leaves the tensor as the base contributes τ = 0.
    let t = est.deltas.len() as f64;
    let mut r = est.weighted_sum()?;
    for x in &mut r {
        *x = c.alpha * (*x / t);
    }
    Ok(Merged::Flat(r))
}

/// `iso`: `α · mean(σ) · U Vᵀ` of `M = Σ_t w_t · τ_t`.
fn iso(
    est: &Estimates,
    c: &Combine,
    shape: (usize, usize),
    exact_svd: &mut Vec<String>,
) -> Result<Merged> {
    let m = est.weighted_sum()?;
    Ok(Merged::Matrix(iso_matrix(
        &m, shape, c.alpha, est.name, exact_svd,
    )?))
}

/// `iso` of the row-major matrix `m` of `shape` (`Σ_t w_t · τ_t`): `α · mean(σ) · U Vᵀ`, on its
/// [`view`]. `U Vᵀ` is the polar factor of `M`: on the tall orientation `X` (`M` or `Mᵀ`), it is
/// `X (XᵀX)^(-1/2)` and `σ = √λ(XᵀX)` where [`inverse_sqrt_gram`] accepts `XᵀX`; else the thin
/// SVD's `U Vᵀ` and `σ`, and `polar(M)` is noted in `exact_svd`.
pub fn iso_matrix(
    m: &[f64],
    shape: (usize, usize),
    alpha: f64,
    name: &str,
    exact_svd: &mut Vec<String>,
) -> Result<Mat<f64>> {
    let a = view(m, shape);
    let wide = a.nrows() < a.ncols();
    let x = if wide { a.transpose() } else { a };
    Ok(match inverse_sqrt_gram(x, name)? {
        Some((root, lambda)) => {
            let mean_sigma = lambda.iter().map(|l| l.sqrt()).sum::<f64>() / lambda.len() as f64;
            if wide {
                // polar(a) = polar(x)ᵀ = root · a, the root being symmetric.
                mul(root.as_ref(), a, alpha * mean_sigma)
            } else {
                mul(a, root.as_ref(), alpha * mean_sigma)
            }
        }
        None => {
            exact_svd.push("polar(M)".into());
            let (u, s, v) = thin_svd(a, name)?;
            let mean_sigma = s.iter().sum::<f64>() / s.len() as f64;
            mul_transposed(u.as_ref(), v.as_ref(), alpha * mean_sigma)
        }
    })
}

/// `tsv`: `α · polar(Û) · diag(ŝ) · polar(V̂)ᵀ` of each task's top `k` triplets.
fn tsv(
    est: &Estimates,
    c: &Combine,
    shape: (usize, usize),
    exact_svd: &mut Vec<String>,
) -> Result<Merged> {
    // T counts every delta, as in `mean`; only those that change the tensor bring triplets.
    let k = (shape.0.min(shape.1) / est.deltas.len()).max(1);
    let deltas: Vec<usize> = est.terms.iter().map(|t| t.delta + 1).collect();
    let r = tsv_matrix(
        shape,
        k,
        &deltas,
        c.alpha,
        est.name,
        |t, tau| est.weighted(&est.terms[t], tau),
        exact_svd,
    )?;
    Ok(Merged::Matrix(r))
}

/// `tsv` of row-major matrices of `shape`, on their [`view`]s: `task(t, buf)` writes the `t`-th
/// task's `w_t · τ_t` into `buf`, for `t` in `0..deltas.len()`; `deltas[t]` numbers it (1-based,
/// on the command line) in the notes of `exact_svd`. Each brings its top `k` triplets, but for a
/// task that is zero everywhere, which brings none (all of them zero: `R = 0`).
///
/// With `polar(X) = X · (XᵀX)^(-1/2)` on each side where [`inverse_sqrt_gram`] accepts `XᵀX`,
/// the result is `Û · (A diag(ŝ) B) · V̂ᵀ` with `A`, `B` the two inverse roots: products of
/// `Tk × Tk` matrices first, then one with `V̂ᵀ` and one with `Û`. A side it refuses takes the
/// exact polar factor `P` of its thin SVD in place of `X` and the identity in place of its root.
pub fn tsv_matrix(
    shape: (usize, usize),
    k: usize,
    deltas: &[usize],
    alpha: f64,
    name: &str,
    mut task: impl FnMut(usize, &mut Vec<f64>) -> Result<()>,
    exact_svd: &mut Vec<String>,
) -> Result<Mat<f64>> {
    let (rows, cols) = (shape.1, shape.0);
    let tk = k * deltas.len();
    let mut u_hat = Mat::<f64>::zeros(rows, tk);
    let mut v_hat = Mat::<f64>::zeros(cols, tk);
    let mut s_hat = Vec::with_capacity(tk);
    let mut tau = Vec::new();
    for (t, delta) in deltas.iter().enumerate() {
        task(t, &mut tau)?;
        // A zero task (a weight of 0, or no kept element that differs from the base) has
        // arbitrary singular vectors: it brings no triplets (docs/METHODS.md).
        if tau.iter().all(|&x| x == 0.0) {
            continue;
        }
        let a = view(&tau, shape);
        let (u, s, v) = match top_singular_gram(a, k, name)? {
            Some(triplets) => triplets,
            None => {
                exact_svd.push(format!("top triplets of delta {delta}"));
                top_singular_exact(a, k, name)?
            }
        };
        // The tasks that bring triplets, in order, from the first column.
        let at = s_hat.len();
        u_hat.as_mut().submatrix_mut(0, at, rows, k).copy_from(&u);
        v_hat.as_mut().submatrix_mut(0, at, cols, k).copy_from(&v);
        s_hat.extend_from_slice(&s);
    }
    drop(tau);
    let tk = s_hat.len();
    if tk == 0 {
        return Ok(Mat::zeros(rows, cols));
    }
    if tk < u_hat.ncols() {
        u_hat = u_hat.subcols(0, tk).to_owned();
        v_hat = v_hat.subcols(0, tk).to_owned();
    }
    let (u_base, a) = polar_parts(u_hat, "polar(Û)", name, exact_svd)?;
    let (v_base, b) = polar_parts(v_hat, "polar(V̂)", name, exact_svd)?;
    // The core A diag(ŝ) B, with an absent root the identity; None: the core is diag(ŝ) itself.
    let core = match (a, b) {
        (Some(mut a), b) => {
            for (j, &s) in s_hat.iter().enumerate() {
                a.col_mut(j).iter_mut().for_each(|x| *x *= s);
            }
            match b {
                Some(b) => Some(mul(a.as_ref(), b.as_ref(), 1.0)),
                None => Some(a),
            }
        }
        (None, Some(mut b)) => {
            for j in 0..tk {
                b.col_mut(j)
                    .iter_mut()
                    .zip(&s_hat)
                    .for_each(|(x, &s)| *x *= s);
            }
            Some(b)
        }
        (None, None) => None,
    };
    // core · V̂ᵀ (Tk × cols), then Û times it.
    let right = match core {
        Some(core) => mul_transposed(core.as_ref(), v_base.as_ref(), 1.0),
        None => Mat::from_fn(tk, cols, |i, j| s_hat[i] * v_base[(j, i)]),
    };
    drop(v_base);
    Ok(mul(u_base.as_ref(), right.as_ref(), alpha))
}

/// The relative cost of computing `p` (a [`Source::Combine`] plan) with `deltas` deltas, to
/// start the costliest first: the flop counts of `iso` and `tsv` on a matrix, else its elements.
pub fn cost(p: &TensorPlan, deltas: usize) -> f64 {
    let Source::Combine { combine, terms, .. } = &p.source else {
        return 0.0;
    };
    match (combine.method, &p.shape[..]) {
        (Method::Tsv, &[rows, cols]) => {
            tsv_flops((rows, cols), terms.len(), (rows.min(cols) / deltas).max(1))
        }
        (Method::Iso, &[rows, cols]) => iso_flops((rows, cols)),
        _ => p.shape.iter().product::<usize>() as f64,
    }
}

/// Floating-point operations of [`tsv_matrix`] on a matrix of `shape` with `tasks` tasks and `k`
/// triplets each, on the Gram route throughout (docs/METHODS.md, "Speed"): on the tall
/// orientation `m × n` (`m ≥ n`) with `p = tasks · k`, per task the Gram matrix `m n²` (its lower
/// half), the eigendecomposition `4/3 n³` (tridiagonalization) `+ 4/3 n³` (tridiagonal
/// eigenvectors, without deflation) `+ 2 n² k` (back-transformation of `k` vectors) and
/// `U = τ V` `2 m n k`; per polar factor of a `q × p` matrix the Gram matrix `q p²`, the
/// eigendecomposition with all vectors `14/3 p³` and the root `p³`; then the core `2 p³`,
/// `core · V̂ᵀ` `2 p² n` and `Û · (core · V̂ᵀ)` `2 m p n`.
pub fn tsv_flops(shape: (usize, usize), tasks: usize, k: usize) -> f64 {
    let (m, n) = (shape.0.max(shape.1) as f64, shape.0.min(shape.1) as f64);
    let (k, t) = (k as f64, tasks as f64);
    let p = t * k;
    let per_task = m * n * n + 8.0 / 3.0 * n.powi(3) + 2.0 * n * n * k + 2.0 * m * n * k;
    let polar = |q: f64| q * p * p + 17.0 / 3.0 * p.powi(3);
    t * per_task + polar(m) + polar(n) + 2.0 * p.powi(3) + 2.0 * p * p * n + 2.0 * m * p * n
}

/// Floating-point operations of [`iso_matrix`] on a matrix of `shape` on the Gram route: on the
/// tall orientation `m × n`, the Gram matrix `m n²`, the eigendecomposition with all vectors
/// `14/3 n³`, the root `n³` and the product `2 m n²`.
pub fn iso_flops(shape: (usize, usize)) -> f64 {
    let (m, n) = (shape.0.max(shape.1) as f64, shape.0.min(shape.1) as f64);
    3.0 * m * n * n + 17.0 / 3.0 * n.powi(3)
}

/// `polar(X)` as `X · root`: `(X, Some((XᵀX)^(-1/2)))` where [`inverse_sqrt_gram`] accepts
/// `XᵀX`, else `(P, None)` with `P` the exact polar factor, and `step` noted in `exact_svd`.
fn polar_parts(
    x: Mat<f64>,
    step: &str,
    name: &str,
    exact_svd: &mut Vec<String>,
) -> Result<(Mat<f64>, Option<Mat<f64>>)> {
    Ok(match inverse_sqrt_gram(x.as_ref(), name)? {
        Some((root, _)) => (x, Some(root)),
        None => {
            exact_svd.push(step.into());
            (polar(x.as_ref(), name)?, None)
        }
    })
}

/// A merged delta `R`: flat and row-major, or a matrix computed on a transposed
/// [`view`](crate::linalg::view), read without a row-major copy.
enum Merged {
    Flat(Vec<f64>),
    Matrix(Mat<f64>),
}

impl Merged {
    /// Element `i` of the row-major tensor.
    #[inline]
    fn at(&self, i: usize) -> f64 {
        match self {
            Merged::Flat(r) => r[i],
            // Column-major `cols × rows`: row-major element `i` is at `(i % cols, i / cols)`.
            Merged::Matrix(m) => m[(i % m.nrows(), i / m.nrows())],
        }
    }
}

/// A combined tensor's result, ready to round: `b + r` where `written` (everywhere when
/// `None`), the base element elsewhere.
struct Combined<'a> {
    from: Float,
    to: Float,
    /// The base tensor's bytes.
    base: &'a [u8],
    b: &'a [f64],
    r: &'a Merged,
    written: Option<&'a [bool]>,
}

impl Combined<'_> {
    /// Rounds and writes the tensor in pieces; returns how many results are infinite or NaN
    /// where the base is finite.
    fn write(&self, name: &str, out: &dyn Sink) -> Result<u64> {
        let (from, to) = (self.from, self.to);
        let size = to.size();
        let mut bytes = Vec::with_capacity(WRITE_PIECE.min(self.b.len()) * size);
        let mut overflows = 0u64;
        for start in (0..self.b.len()).step_by(WRITE_PIECE) {
            let end = self.b.len().min(start + WRITE_PIECE);
            bytes.clear();
            for i in start..end {
                let bits = if self.written.is_none_or(|w| w[i]) {
                    let x = self.b[i] + self.r.at(i);
                    overflows += to.becomes_nonfinite(self.b[i], x) as u64;
                    to.round_bits(x)
                } else if from == to {
                    from.bits(self.base, i)
                } else {
                    to.round_bits(self.b[i])
                };
                bytes.extend_from_slice(&bits.to_le_bytes()[..size]);
            }
            out.write(name, (start * size) as u64, &bytes)?;
        }
        Ok(overflows)
    }
}
