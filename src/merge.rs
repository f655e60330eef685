//! `merge` and `apply`: `out = base + Σ_t w_t·s_t·(mask_t ⊙ δ_t)` in the exact arithmetic of
//! docs/FORMAT.md section 8, on the CPU with rayon.
//!
//! Planning (which tensor comes from where, what the deltas contribute) is separate from
//! execution, so that another backend can execute the same plan. Every output element depends
//! only on its own inputs, so the output is the same for any thread count or tiling.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Result, bail};
use rayon::prelude::*;
use safetensors::Dtype;
use serde_json::json;

use crate::checkpoint::{Checkpoint, OutTensor, Output, tensor_hash};
use crate::dtype::Float;
use crate::dtype::elem::Elem;
use crate::format::{Delta, Kind};
use crate::mask::SPAN;

/// Elements per unit of parallel work: 16 chunks, so each output write is 2–8 MiB.
const TASK: u64 = 16 * 65536;
/// Elements computed at a time within a task: the f64 accumulator (512 KiB) stays in L2.
const TILE: u64 = 65536;
/// Bytes per unit of parallel work when a tensor is copied unchanged.
const COPY_PIECE: usize = 64 << 20;

/// What `merge` is asked to do.
#[derive(Clone, Debug, Default)]
pub struct MergeOptions {
    /// One weight per delta (all 1 when empty).
    pub weights: Vec<f64>,
    /// Scale kept values by 1/density (DARE).
    pub rescale: bool,
    /// Output dtype of float tensors (the base's when `None`).
    pub dtype: Option<Float>,
    /// Merge even when a delta was not taken against this base.
    pub force: bool,
    /// Which backend computes the changed tensors (docs/CUDA.md).
    pub device: Device,
}

pub use crate::cuda::Device;

/// What `merge` did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MergeReport {
    /// Tensors written.
    pub tensors: usize,
    /// Tensors that at least one delta changed.
    pub changed: usize,
    /// Bytes of the output file.
    pub output_bytes: u64,
    /// Bytes of the inputs (base and deltas).
    pub input_bytes: u64,
    /// Wall time.
    pub seconds: f64,
    /// `delta file: tensor` pairs whose recorded base hash did not match (only under `--force`).
    pub mismatches: Vec<String>,
    /// The base fingerprint computed from the base as read.
    pub base_fingerprint: String,
    /// Tensors where finite results became ±infinity in the output dtype, with counts.
    pub overflowed: Vec<(String, u64)>,
    /// The device that computed the changed tensors: `cpu`, or `cuda: <GPU name>`.
    pub device: String,
}

/// Where an output tensor's starting values come from.
#[derive(Clone, Copy, Debug)]
pub enum Origin {
    /// The base tensor.
    Base,
    /// The whole tensor stored in delta `.0`.
    Delta(usize),
}

/// One delta's contribution to a tensor.
#[derive(Clone, Copy, Debug)]
pub struct Term {
    /// Index of the delta.
    pub delta: usize,
    /// `w_t · s_t`.
    pub coeff: f64,
    /// A masked term (kept values and offsets), or a whole float tensor (every element kept).
    pub masked: bool,
}

/// How an output tensor is made.
#[derive(Clone, Debug)]
pub enum Source {
    /// Raw bytes, unchanged.
    Copy(Origin),
    /// `round_to(origin + Σ terms)`, with `from` the stored dtype and `to` the output dtype.
    Compute {
        /// The starting values.
        origin: Origin,
        /// The stored dtype.
        from: Float,
        /// The output dtype.
        to: Float,
        /// The deltas' contributions, in command-line order.
        terms: Vec<Term>,
    },
}

/// One output tensor and how it is made.
#[derive(Clone, Debug)]
pub struct TensorPlan {
    /// Tensor name.
    pub name: String,
    /// Output dtype.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Elements.
    pub numel: u64,
    /// Where the bytes come from.
    pub source: Source,
}

impl TensorPlan {
    fn out_len(&self) -> u64 {
        match &self.source {
            Source::Compute { to, .. } => self.numel * to.size() as u64,
            Source::Copy(_) => (self.numel * self.dtype.bitsize() as u64).div_ceil(8),
        }
    }
}

/// Merges `deltas` onto `base` and writes the result to `out`.
pub fn merge(
    base: &Checkpoint,
    deltas: &[Delta],
    out: &Path,
    opts: &MergeOptions,
) -> Result<MergeReport> {
    let start = Instant::now();
    if !opts.weights.is_empty() && opts.weights.len() != deltas.len() {
        bail!(
            "{} weights for {} deltas: give one weight per delta",
            opts.weights.len(),
            deltas.len()
        );
    }
    let weight = |d: usize| opts.weights.get(d).copied().unwrap_or(1.0);
    let plans = plan(base, deltas, opts, &weight)?;
    // Chosen before the output is created: `--device cuda` without a GPU leaves no file.
    let gpu = match opts.device {
        Device::Cpu => None,
        Device::Auto => crate::cuda::backend().ok(),
        Device::Cuda => Some(crate::cuda::backend().map_err(|why| {
            anyhow::anyhow!("--device cuda: no usable CUDA device: {why}. Use --device cpu (or auto) to merge on the CPU")
        })?),
    };

    let layout: Vec<OutTensor> = plans
        .iter()
        .map(|p| OutTensor {
            name: p.name.clone(),
            dtype: p.dtype,
            shape: p.shape.clone(),
            len: p.out_len(),
        })
        .collect();
    let mut md: BTreeMap<String, String> = base
        .metadata()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let record: Vec<_> = deltas
        .iter()
        .enumerate()
        .map(|(d, delta)| {
            let p = delta.params();
            json!({
                "file": delta.path().file_name().map(|f| f.to_string_lossy()),
                "seed": p.seed, "lo": p.interval.lo(), "hi": p.interval.hi(),
                "density": p.interval.density(), "weight": weight(d), "rescale": opts.rescale,
                "base_fingerprint": delta.fingerprint(),
            })
        })
        .collect();
    let base_names: Vec<&String> = base.tensors().keys().collect();
    md.insert(
        "sotu_delta".into(),
        json!({
            "tool": crate::TOOL,
            "forced": opts.force,
            "deltas": record,
        })
        .to_string(),
    );

    let output = Output::create(out, &layout, &md)?;
    base.advise_sequential();
    deltas.iter().for_each(Delta::advise_sequential);
    let (base_hashes, written) = rayon::join(
        || -> Vec<[u8; 32]> {
            base_names
                .par_iter()
                .map(|n| tensor_hash(base.data(base.info(n).unwrap())))
                .collect()
        },
        || -> Result<Vec<u64>> {
            // The GPU computes the changed float tensors (one pipeline through all of them)
            // while the CPU copies the rest.
            let on_gpu = |p: &TensorPlan| {
                gpu.is_some()
                    && matches!(&p.source, Source::Compute { terms, .. } if terms.len() <= crate::cuda::MAX_TERMS)
            };
            let (by_gpu, by_cpu) = rayon::join(
                || -> Result<Vec<u64>> {
                    let Some(g) = gpu else { return Ok(Vec::new()) };
                    let jobs: Vec<crate::cuda::Job> = plans
                        .iter()
                        .filter(|p| on_gpu(p))
                        .map(|p| {
                            let Source::Compute {
                                origin,
                                from,
                                to,
                                terms,
                            } = &p.source
                            else {
                                unreachable!("filtered")
                            };
                            crate::cuda::Job {
                                name: &p.name,
                                numel: p.numel,
                                base: match origin {
                                    Origin::Base => base.data(base.info(&p.name).unwrap()),
                                    Origin::Delta(d) => deltas[*d].data(&p.name),
                                },
                                from: *from,
                                to: *to,
                                terms,
                            }
                        })
                        .collect();
                    g.merge_tensors(deltas, &jobs, &|name, at, bytes| {
                        output.write(name, at, bytes)
                    })
                },
                || -> Result<Vec<u64>> {
                    plans
                        .iter()
                        .map(|p| {
                            if on_gpu(p) {
                                Ok(0)
                            } else {
                                execute(base, deltas, &output, p)
                            }
                        })
                        .collect()
                },
            );
            let mut counts = by_cpu?;
            let mut from_gpu = by_gpu?.into_iter();
            for (c, p) in counts.iter_mut().zip(&plans) {
                if on_gpu(p) {
                    *c = from_gpu.next().unwrap_or(0);
                }
            }
            Ok(counts)
        },
    );
    let overflows = written?;

    let mismatches = check_provenance(base, deltas, &base_names, &base_hashes);
    if !mismatches.is_empty() && !opts.force {
        let shown: Vec<&str> = mismatches.iter().take(5).map(String::as_str).collect();
        bail!(
            "{}: this base is not the one the deltas were taken against ({} tensor(s) differ: {}{}); nothing was written. Pass --force to merge anyway",
            base.path().display(),
            mismatches.len(),
            shown.join(", "),
            if mismatches.len() > 5 { ", …" } else { "" }
        );
    }
    base.check_unchanged()?;
    deltas.iter().try_for_each(Delta::check_unchanged)?;
    let output_bytes = output.total_len();
    output.commit()?;

    let fingerprint = crate::checkpoint::fingerprint(&base_hashes);
    Ok(MergeReport {
        tensors: plans.len(),
        changed: plans
            .iter()
            .filter(|p| matches!(&p.source, Source::Compute { terms, .. } if !terms.is_empty()))
            .count(),
        output_bytes,
        input_bytes: base.file_len() + deltas.iter().map(Delta::file_len).sum::<u64>(),
        seconds: start.elapsed().as_secs_f64(),
        mismatches,
        base_fingerprint: fingerprint,
        overflowed: plans
            .iter()
            .zip(overflows)
            .filter(|(_, n)| *n > 0)
            .map(|(p, n)| (p.name.clone(), n))
            .collect(),
        device: gpu.map_or("cpu".into(), |g| format!("cuda: {}", g.name())),
    })
}

/// Compares each delta's recorded base hashes with the base as read. Returns `file: tensor`
/// for each disagreement, including tensors one side has and the other lacks.
fn check_provenance(
    base: &Checkpoint,
    deltas: &[Delta],
    base_names: &[&String],
    hashes: &[[u8; 32]],
) -> Vec<String> {
    let by_name: BTreeMap<&str, &[u8; 32]> =
        base_names.iter().map(|n| n.as_str()).zip(hashes).collect();
    let mut bad = Vec::new();
    for d in deltas {
        let file = d.path().display();
        for (name, e) in d.entries() {
            if e.in_base && by_name.get(name.as_str()) != Some(&&d.base_hash(e.row)) {
                bad.push(format!("{file}: {name}"));
            }
        }
        for name in base.tensors().keys() {
            if !d.entries().get(name).is_some_and(|e| e.in_base) {
                bad.push(format!("{file}: {name} (not in the delta's base)"));
            }
        }
    }
    bad
}

/// Decides, for every output tensor, where it comes from and what each delta contributes.
pub fn plan(
    base: &Checkpoint,
    deltas: &[Delta],
    opts: &MergeOptions,
    weight: &dyn Fn(usize) -> f64,
) -> Result<Vec<TensorPlan>> {
    for d in deltas {
        let file = d.path().display();
        for (name, e) in d.entries() {
            match (e.in_base, base.info(name)) {
                (true, None) => bail!(
                    "{file}: tensor {name} was taken against a base that has it, but {} has no such tensor",
                    base.path().display()
                ),
                (false, Some(_)) => bail!(
                    "{file}: tensor {name} is new in the delta, but {} already has it",
                    base.path().display()
                ),
                (true, Some(b)) if b.dtype != e.dtype || b.shape != e.shape => bail!(
                    "{file}: tensor {name} is {:?} {:?} in the delta but {:?} {:?} in {}",
                    e.dtype,
                    e.shape,
                    b.dtype,
                    b.shape,
                    base.path().display()
                ),
                _ => {}
            }
        }
    }
    let out_float = |dtype: Dtype| Float::of(dtype).map(|f| opts.dtype.unwrap_or(f));
    let mut plans = Vec::new();
    for (name, info) in base.tensors() {
        let mut terms = Vec::new();
        let mut replace: Option<usize> = None;
        for (d, delta) in deltas.iter().enumerate() {
            let Some(e) = delta.entries().get(name) else {
                continue;
            };
            let p = delta.params();
            let rescale = if opts.rescale && p.interval.hi() > p.interval.lo() {
                SPAN as f64 / (p.interval.hi() - p.interval.lo()) as f64
            } else {
                1.0
            };
            match e.kind {
                Kind::Same => {}
                Kind::Masked => terms.push(Term {
                    delta: d,
                    coeff: weight(d) * rescale,
                    masked: true,
                }),
                Kind::Whole if Float::of(e.dtype).is_some() => terms.push(Term {
                    delta: d,
                    coeff: weight(d),
                    masked: false,
                }),
                Kind::Whole => {
                    if let Some(first) = replace {
                        same_whole(deltas, first, d, name)?;
                    } else {
                        replace = Some(d);
                    }
                }
            }
        }
        let numel = info.numel();
        let (dtype, source) = match (replace, Float::of(info.dtype)) {
            (Some(d), _) => (info.dtype, Source::Copy(Origin::Delta(d))),
            (None, Some(from)) => {
                let to = out_float(info.dtype).unwrap();
                if terms.is_empty() && from == to {
                    (info.dtype, Source::Copy(Origin::Base))
                } else {
                    let origin = Origin::Base;
                    (
                        to.dtype(),
                        Source::Compute {
                            origin,
                            from,
                            to,
                            terms,
                        },
                    )
                }
            }
            (None, None) => (info.dtype, Source::Copy(Origin::Base)),
        };
        plans.push(TensorPlan {
            name: name.clone(),
            dtype,
            shape: info.shape.clone(),
            numel,
            source,
        });
    }
    // Tensors new in the deltas: taken as they are (cast under --dtype), identical where
    // several deltas carry them.
    let mut new: BTreeMap<&str, usize> = BTreeMap::new();
    for (d, delta) in deltas.iter().enumerate() {
        for (name, e) in delta.entries().iter().filter(|(_, e)| !e.in_base) {
            match new.get(name.as_str()) {
                Some(&first) => same_whole(deltas, first, d, name)?,
                None => {
                    new.insert(name, d);
                    let source = match Float::of(e.dtype) {
                        Some(from) if out_float(e.dtype) != Some(from) => Source::Compute {
                            origin: Origin::Delta(d),
                            from,
                            to: out_float(e.dtype).unwrap(),
                            terms: Vec::new(),
                        },
                        _ => Source::Copy(Origin::Delta(d)),
                    };
                    plans.push(TensorPlan {
                        name: name.clone(),
                        dtype: out_float(e.dtype).map_or(e.dtype, Float::dtype),
                        shape: e.shape.clone(),
                        numel: e.numel(),
                        source,
                    });
                }
            }
        }
    }
    plans.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(plans)
}

/// Refuses two deltas that store different whole values for one tensor.
fn same_whole(deltas: &[Delta], a: usize, b: usize, name: &str) -> Result<()> {
    let (ea, eb) = (&deltas[a].entries()[name], &deltas[b].entries()[name]);
    if ea.kind != eb.kind
        || ea.dtype != eb.dtype
        || ea.shape != eb.shape
        || deltas[a].data(name) != deltas[b].data(name)
    {
        bail!(
            "tensor {name}: {} and {} both replace it, with different values; merge cannot choose",
            deltas[a].path().display(),
            deltas[b].path().display()
        );
    }
    Ok(())
}

/// Writes one output tensor; returns how many finite results overflowed its dtype.
fn execute(base: &Checkpoint, deltas: &[Delta], out: &Output, p: &TensorPlan) -> Result<u64> {
    let origin_data = |o: Origin| -> &[u8] {
        match o {
            Origin::Base => base.data(base.info(&p.name).unwrap()),
            Origin::Delta(d) => deltas[d].data(&p.name),
        }
    };
    match &p.source {
        Source::Copy(o) => {
            let data = origin_data(*o);
            data.par_chunks(COPY_PIECE)
                .enumerate()
                .try_for_each(|(k, piece)| out.write(&p.name, (k * COPY_PIECE) as u64, piece))?;
            Ok(0)
        }
        Source::Compute {
            origin,
            from,
            to,
            terms,
        } => {
            let data = origin_data(*origin);
            let tasks = p.numel.div_ceil(TASK);
            (0..tasks)
                .into_par_iter()
                .map_init(Scratch::default, |scratch, t| -> Result<u64> {
                    let range = t * TASK..p.numel.min((t + 1) * TASK);
                    let overflows = crate::with_elem!(*from, E => compute::<E>(deltas, &p.name, data, terms, *to, range.clone(), scratch))?;
                    out.write(&p.name, range.start * to.size() as u64, &scratch.bytes)?;
                    Ok(overflows)
                })
                .sum()
        }
    }
}

/// Per-thread buffers, reused from task to task.
#[derive(Default)]
struct Scratch {
    acc: Vec<f64>,
    touched: Vec<u64>,
    base: Vec<f64>,
    sub: Vec<u8>,
    bytes: Vec<u8>,
}

/// Computes the output bytes of elements `range` of one tensor into `scratch.bytes`, one tile
/// at a time so that the f64 accumulator stays in the L2 cache.
fn compute<E: Elem>(
    deltas: &[Delta],
    name: &str,
    data: &[u8],
    terms: &[Term],
    to: Float,
    range: std::ops::Range<u64>,
    s: &mut Scratch,
) -> Result<u64> {
    let mut overflows = 0u64;
    s.bytes.clear();
    let mut lo = range.start;
    while lo < range.end {
        let hi = range.end.min(lo + TILE);
        let n = (hi - lo) as usize;
        let tile = &data[lo as usize * E::SIZE..hi as usize * E::SIZE];
        s.acc.clear();
        // −0.0 is the additive identity (docs/FORMAT.md section 8).
        s.acc.resize(n, -0.0);
        s.touched.clear();
        s.touched.resize(n.div_ceil(64), 0);
        for term in terms {
            add_term::<E>(
                &deltas[term.delta],
                name,
                term,
                lo..hi,
                tile,
                &mut s.acc,
                &mut s.touched,
            )?;
        }
        if to == E::FLOAT {
            // Untouched elements keep the base's bits; only touched ones are rounded.
            let at = s.bytes.len();
            s.bytes.extend_from_slice(tile);
            let out = &mut s.bytes[at..];
            for_each_bit(&s.touched, |k| {
                let x = E::load(tile, k) + s.acc[k];
                overflows += to.overflows(x) as u64;
                E::store(out, k, x)
            });
        } else {
            s.base.clear();
            s.base.extend((0..n).map(|k| E::load(tile, k)));
            for (a, &b) in s.acc.iter_mut().zip(&s.base) {
                *a += b;
                overflows += to.overflows(*a) as u64;
            }
            to.store_all(&s.acc, &mut s.sub);
            s.bytes.extend_from_slice(&s.sub);
        }
        lo = hi;
    }
    Ok(overflows)
}

/// Calls `f(k)` for each set bit `k` of `words`, in ascending order.
#[inline]
fn for_each_bit(words: &[u64], mut f: impl FnMut(usize)) {
    for (w, &word) in words.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            f(w * 64 + bits.trailing_zeros() as usize);
            bits &= bits - 1;
        }
    }
}

/// `acc[k] += coeff · (v − b_k)` at each element of `range` that the term keeps (`tile` holds the
/// base elements of `range`), marking it in `touched`.
fn add_term<E: Elem>(
    delta: &Delta,
    name: &str,
    term: &Term,
    range: std::ops::Range<u64>,
    tile: &[u8],
    acc: &mut [f64],
    touched: &mut [u64],
) -> Result<()> {
    let values = delta.data(name);
    let lo = range.start;
    let c = term.coeff;
    if !term.masked {
        let v = &values[lo as usize * E::SIZE..range.end as usize * E::SIZE];
        for (k, a) in acc.iter_mut().enumerate() {
            *a += c * (E::load(v, k) - E::load(tile, k));
        }
        touched.fill(!0);
        if !acc.len().is_multiple_of(64) {
            // Bits past the tile's end must stay clear: they index no element.
            *touched.last_mut().unwrap() = (1u64 << (acc.len() % 64)) - 1;
        }
        return Ok(());
    }
    let mask = delta.mask(name);
    let offsets = delta.offsets(name);
    let chunk = delta.params().chunk;
    let numel = delta.entries()[name].numel();
    let mut ci = lo / chunk;
    let mut j = offsets[ci as usize] + mask.count_kept(ci * chunk..lo);
    let mut pos = lo;
    while pos < range.end {
        let chunk_end = numel.min((ci + 1) * chunk);
        let end = chunk_end.min(range.end);
        let limit = offsets[ci as usize + 1];
        let mut overrun = false;
        mask.for_each_kept(pos..end, |i| {
            if j < limit {
                let k = (i - lo) as usize;
                acc[k] += c * (E::load(values, j as usize) - E::load(tile, k));
                touched[k / 64] |= 1 << (k % 64);
            } else {
                overrun = true;
            }
            j += 1;
        });
        if overrun || (end == chunk_end && j != limit) {
            bail!(
                "{}: tensor {name}: chunk {ci} keeps {} elements but its offsets say {}; the file is corrupt",
                delta.path().display(),
                j - offsets[ci as usize],
                limit - offsets[ci as usize]
            );
        }
        pos = end;
        ci += 1;
    }
    Ok(())
}
