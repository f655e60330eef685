//! The merge methods other than `sum` (docs/METHODS.md), on the CPU: `ties`, `iso` and `tsv`
//! act on each delta's unbiased estimate τ, in f64, and round once to the output dtype.
//!
//! A tensor is computed whole on one thread: its decompositions run with faer in sequential
//! mode, so the result does not depend on the thread count, and rayon runs tensors side by
//! side ([`super::execute`]). Memory per worker, in copies of one tensor in f64
//! (docs/METHODS.md, "Memory"): `ties` T + 3 (the T trimmed estimates, the base, one scratch,
//! the result); `iso` and `tsv` about 4 (the base, one estimate or their sum, the result, the
//! stacked triplets) plus faer's SVD factors and workspace, whatever T.

use anyhow::Result;
use faer::Mat;

use super::Input;
use super::plan::{Combine, Method, Source, TensorPlan, Term, TiesParams};
use crate::dtype::Float;
use crate::io::{Checkpoint, Output};
use crate::linalg::{mul_transposed, polar, thin_svd, view};

/// Elements rounded and written at a time: bounds the output buffer.
const WRITE_PIECE: usize = 1 << 20;

/// Computes and writes a tensor planned as [`Source::Combine`]; returns how many of its results
/// are infinite or NaN where the base is finite.
pub fn execute(base: &Checkpoint, deltas: &[Input], out: &Output, p: &TensorPlan) -> Result<u64> {
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
    let base_bytes = base.data(base.info(&p.name).expect("planned from the base"));
    let mut b = Vec::new();
    from.load_all(base_bytes, &mut b);
    if b.is_empty() {
        return Ok(0);
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
    let (r, written) = match (combine.method, matrix) {
        (Method::Ties, _) => {
            let (r, written) = ties(&est, combine)?;
            (Merged::Flat(r), Some(written))
        }
        (Method::Iso, Some(shape)) => (iso(&est, combine, shape)?, None),
        (Method::Tsv, Some(shape)) => (tsv(&est, combine, shape)?, None),
        (Method::Iso | Method::Tsv, None) => (mean(&est, combine)?, None),
        (Method::Sum, _) => unreachable!("sum is planned as Source::Compute"),
    };
    let result = Combined {
        from,
        to,
        base: base_bytes,
        b: &b,
        r: &r,
        written: written.as_deref(),
    };
    result.write(&p.name, out)
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
        self.deltas[term.delta].chunks(self.name).estimate(
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
        base.data(base.info(&p.name).expect("planned from the base")),
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
fn iso(est: &Estimates, c: &Combine, shape: (usize, usize)) -> Result<Merged> {
    let m = est.weighted_sum()?;
    let (u, s, v) = thin_svd(view(&m, shape), est.name)?;
    drop(m);
    let mean_sigma = s.iter().sum::<f64>() / s.len() as f64;
    drop(s);
    Ok(Merged::Matrix(mul_transposed(
        u.as_ref(),
        v.as_ref(),
        c.alpha * mean_sigma,
    )))
}

/// `tsv`: `α · polar(Û) · diag(ŝ) · polar(V̂)ᵀ` of each task's top `k` triplets.
fn tsv(est: &Estimates, c: &Combine, shape: (usize, usize)) -> Result<Merged> {
    let (rows, cols) = (shape.1, shape.0);
    // T counts every delta, as in `mean`; only those that change the tensor bring triplets.
    let k = (rows.min(cols) / est.deltas.len()).max(1);
    let tk = k * est.terms.len();
    let mut u_hat = Mat::<f64>::zeros(rows, tk);
    let mut v_hat = Mat::<f64>::zeros(cols, tk);
    let mut s_hat = Vec::with_capacity(tk);
    let mut tau = Vec::new();
    for (t, term) in est.terms.iter().enumerate() {
        est.weighted(term, &mut tau)?;
        let (u, s, v) = thin_svd(view(&tau, shape), est.name)?;
        u_hat
            .as_mut()
            .submatrix_mut(0, t * k, rows, k)
            .copy_from(u.as_ref().submatrix(0, 0, rows, k));
        v_hat
            .as_mut()
            .submatrix_mut(0, t * k, cols, k)
            .copy_from(v.as_ref().submatrix(0, 0, cols, k));
        s_hat.extend_from_slice(&s[..k]);
    }
    drop(tau);
    let mut pu = polar(u_hat.as_ref(), est.name)?;
    let pv = polar(v_hat.as_ref(), est.name)?;
    drop((u_hat, v_hat));
    for (j, &s) in s_hat.iter().enumerate() {
        pu.col_mut(j).iter_mut().for_each(|x| *x *= s);
    }
    Ok(Merged::Matrix(mul_transposed(
        pu.as_ref(),
        pv.as_ref(),
        c.alpha,
    )))
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
    fn write(&self, name: &str, out: &Output) -> Result<u64> {
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
