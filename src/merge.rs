//! `merge` and `apply`: `out = base + Σ_t w_t·s_t·(mask_t ⊙ δ_t)` in the exact arithmetic of
//! docs/FORMAT.md section 8, on the CPU with rayon, or with the changed tensors on a GPU
//! ([`crate::cuda`]).
//!
//! Planning (which tensor comes from where, what the deltas contribute) is separate from
//! execution, so that either backend executes the same plan. Every output element depends only
//! on its own inputs, so the output is the same for any thread count, tiling or device.
//!
//! On the CPU a tensor is cut into work units of 2^20 elements spread over the threads, and each
//! unit into tiles of 2^16 that stay in the L2 cache. Per tile: the keep bits of every delta
//! (hashed once per seed); then, where no element is kept by two deltas and every coefficient
//! is 1 (an apply, or a merge of disjoint slots), the kept values are placed at their elements
//! and one pass takes each as the result where `Elem::replaces` shows the f64 arithmetic would
//! give it back unchanged, computing only the rest; elsewhere the kept values are expanded into
//! an f64 accumulator and one pass adds the base and rounds. Both give the same bits; the
//! AVX-512 kernels are in [`crate::simd`].

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Result, bail};
use rayon::prelude::*;
use safetensors::Dtype;
use serde_json::json;

use crate::checkpoint::{Checkpoint, tensor_hash};
use crate::dtype::Float;
use crate::dtype::elem::Elem;
use crate::format::{Delta, Kind};
use crate::mask::{Mask, SPAN};
use crate::output::{OutTensor, Output, Target};
use crate::simd::Kept;

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
    /// Read the output back once to report its fingerprint (`--json`).
    pub fingerprint_output: bool,
    /// Which backend computes the changed tensors (docs/CUDA.md).
    pub device: Device,
}

pub use crate::cuda::Device;

/// What `merge` did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MergeReport {
    /// The safetensors files read: the base's, then each delta's.
    pub inputs: Vec<String>,
    /// The files written (weights, index, copied companion files).
    pub outputs: Vec<String>,
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
    /// The fingerprint of the output (docs/FORMAT.md section 7), when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_fingerprint: Option<String>,
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
    /// The bytes the tensor starts from: the base's tensor, or a delta's stored whole tensor.
    pub fn origin_data<'a>(
        &self,
        o: Origin,
        base: &'a Checkpoint,
        deltas: &'a [Delta],
    ) -> &'a [u8] {
        match o {
            Origin::Base => base.data(base.info(&self.name).unwrap()),
            Origin::Delta(d) => deltas[d].data(&self.name),
        }
    }

    /// The tensor as a job for the CUDA backend, when it is computed rather than copied.
    pub fn cuda_job<'a>(
        &'a self,
        base: &'a Checkpoint,
        deltas: &'a [Delta],
    ) -> Option<crate::cuda::Job<'a>> {
        let Source::Compute {
            origin,
            from,
            to,
            terms,
        } = &self.source
        else {
            return None;
        };
        Some(crate::cuda::Job {
            name: &self.name,
            numel: self.numel,
            base: self.origin_data(*origin, base, deltas),
            from: *from,
            to: *to,
            terms,
        })
    }

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
    out: &Target,
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
    let mut inputs = vec![base];
    inputs.extend(deltas.iter().map(Delta::checkpoint));
    crate::checkpoint::refuse_output_over_checkpoints(&out.path, &inputs)?;
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
    // The GPU, when there is one, computes the changed float tensors in one pipeline through
    // all of them. Beside it the CPU goes tensor by tensor in file order, hashing each base
    // tensor while it computes (or copies) it: the two passes share the tensor's pages, so a
    // model larger than the page cache is read from disk once on the CPU path.
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
                .filter_map(|p| p.cuda_job(base, deltas))
                .collect();
            g.merge_tensors(deltas, &jobs, &|name, at, bytes| {
                output.write(name, at, bytes)
            })
        },
        || -> Result<(Vec<[u8; 32]>, Vec<u64>)> {
            let mut hashes = Vec::with_capacity(base_names.len());
            let mut counts = Vec::with_capacity(plans.len());
            for p in &plans {
                let (hash, written) = rayon::join(
                    || base.info(&p.name).map(|i| tensor_hash(base.data(i))),
                    || {
                        if on_gpu(p) {
                            Ok(0)
                        } else {
                            execute(base, deltas, &output, p)
                        }
                    },
                );
                hashes.extend(hash);
                counts.push(written?);
            }
            Ok((hashes, counts))
        },
    );
    let (base_hashes, mut overflows) = by_cpu?;
    let mut from_gpu = by_gpu?.into_iter();
    for (c, p) in overflows.iter_mut().zip(&plans) {
        if on_gpu(p) {
            *c = from_gpu.next().unwrap_or(0);
        }
    }

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
    let written = output.commit(opts.fingerprint_output)?;
    let display = |p: &Path| p.display().to_string();

    let fingerprint = crate::checkpoint::fingerprint(&base_hashes);
    Ok(MergeReport {
        inputs: base
            .files()
            .into_iter()
            .chain(deltas.iter().flat_map(Delta::files))
            .map(display)
            .collect(),
        outputs: written.files.iter().map(|p| display(p)).collect(),
        tensors: plans.len(),
        changed: plans
            .iter()
            .filter(|p| matches!(&p.source, Source::Compute { terms, .. } if !terms.is_empty()))
            .count(),
        output_bytes: written.bytes,
        input_bytes: base.file_len() + deltas.iter().map(Delta::file_len).sum::<u64>(),
        seconds: start.elapsed().as_secs_f64(),
        mismatches,
        base_fingerprint: fingerprint,
        output_fingerprint: written.fingerprint,
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
    let origin_data = |o: Origin| p.origin_data(o, base, deltas);
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
            (0..p.numel.div_ceil(TASK))
                .into_par_iter()
                .map(|t| -> Result<u64> {
                    SCRATCH.with_borrow_mut(|scratch| {
                        let range = t * TASK..p.numel.min((t + 1) * TASK);
                        let job = Job { deltas, name: &p.name, data, terms, to: *to };
                        let overflows = crate::with_elem!(*from, E => compute::<E>(&job, range.clone(), scratch))?;
                        out.write(&p.name, range.start * to.size() as u64, &scratch.bytes)?;
                        Ok(overflows)
                    })
                })
                .sum()
        }
    }
}

/// What [`compute`] works on: one tensor's starting bytes and the deltas' terms.
struct Job<'a> {
    deltas: &'a [Delta],
    name: &'a str,
    /// The starting bytes (the base's tensor, or a delta's whole tensor).
    data: &'a [u8],
    terms: &'a [Term],
    /// The output dtype.
    to: Float,
}

thread_local! {
    /// Each worker's buffers, kept for the whole run: buffers this large come from mmap, and
    /// allocating them per task cost more in page faults than the arithmetic.
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// Per-thread buffers, reused from task to task.
#[derive(Default)]
struct Scratch {
    acc: Vec<f64>,
    touched: Vec<u64>,
    base: Vec<f64>,
    sub: Vec<u8>,
    bytes: Vec<u8>,
    /// Kept values placed at their elements, over a tile.
    vals: Vec<u8>,
    /// Keep words of each term over the tile.
    words: Vec<Vec<u64>>,
    /// Mask values shared by terms of one seed.
    us: Vec<u32>,
}

/// The keep words of every masked term over the tile `range` (which lies within one block of
/// 2^32 elements). Terms whose deltas share a seed share `u(i)`: it is hashed once and only
/// compared with each interval, the usual case of deltas extracted in disjoint slots.
fn tile_keep_words(
    deltas: &[Delta],
    name: &str,
    terms: &[Term],
    range: std::ops::Range<u64>,
    us: &mut Vec<u32>,
    words: &mut [Vec<u64>],
) {
    let masks: Vec<Option<Mask>> = terms
        .iter()
        .map(|t| t.masked.then(|| deltas[t.delta].mask(name)))
        .collect();
    let mut done = vec![false; terms.len()];
    for (i, m) in masks.iter().enumerate() {
        let Some(m) = m else { continue };
        if done[i] {
            continue;
        }
        let sharing: Vec<usize> = (i..terms.len())
            .filter(|&j| masks[j].is_some_and(|n| n.key == m.key))
            .collect();
        if sharing.len() == 1 {
            m.words(range.clone(), &mut words[i]);
        } else {
            m.key.fill_u(range.clone(), us);
            for &j in &sharing {
                masks[j].unwrap().interval.keep_words_of(us, &mut words[j]);
            }
        }
        for j in sharing {
            done[j] = true;
        }
    }
}

/// Computes the output bytes of elements `range` of one tensor into `scratch.bytes`, one tile
/// at a time so that the tile and the f64 accumulator stay in the L2 cache.
fn compute<E: Elem>(job: &Job, range: std::ops::Range<u64>, s: &mut Scratch) -> Result<u64> {
    let &Job {
        deltas,
        name,
        data,
        terms,
        to,
    } = job;
    let mut overflows = 0u64;
    // Every byte is written below. Resized, not cleared: a buffer of the same length as the
    // last task's (the usual case) is not filled with zeros again.
    s.bytes
        .resize((range.end - range.start) as usize * to.size(), 0);
    // Where each element gets at most one term, of coefficient 1, in the base's own dtype (an
    // apply; a merge of deltas in disjoint slots), an element's result is almost always its
    // kept value itself (`Elem::replaces`): the values are placed at their elements and only
    // the exceptions go through the f64 arithmetic. Same bits, a fraction of the work.
    let placing = to == E::FLOAT
        && E::FLOAT != Float::F64
        && terms.iter().all(|t| t.masked && t.coeff == 1.0);
    let simd = Kept::for_dtype(E::FLOAT);
    let mut lo = range.start;
    while lo < range.end {
        let hi = range.end.min(lo + TILE);
        let n = (hi - lo) as usize;
        let tile = &data[lo as usize * E::SIZE..hi as usize * E::SIZE];
        let at = (lo - range.start) as usize * to.size();
        let out = &mut s.bytes[at..at + n * to.size()];
        s.words.resize_with(terms.len(), Vec::new);
        tile_keep_words(deltas, name, terms, lo..hi, &mut s.us, &mut s.words);
        if placing && union_if_disjoint(&s.words[..terms.len()], n, &mut s.touched) {
            // Only the placed elements of `vals` are read: the rest may hold an earlier tile's.
            s.vals.resize(tile.len(), 0);
            for (term, words) in terms.iter().zip(&s.words) {
                let delta = &deltas[term.delta];
                for_each_kept_word::<E>(delta, name, words, lo..hi, |k0, word, values| {
                    crate::simd::place::<E>(simd.as_ref(), k0, word, values, &mut s.vals)
                })?;
            }
            overflows += settle::<E>(simd.as_ref(), tile, &s.vals, &s.touched, out);
            lo = hi;
            continue;
        }
        s.acc.clear();
        // −0.0 is the additive identity (docs/FORMAT.md section 8).
        s.acc.resize(n, -0.0);
        s.touched.clear();
        s.touched.resize(n.div_ceil(64), 0);
        s.base.clear();
        s.base
            .extend(tile.chunks_exact(E::SIZE).map(|b| E::value(E::bits(b))));
        for (term, words) in terms.iter().zip(&s.words) {
            let mut tile = Tile {
                range: lo..hi,
                base: &s.base,
                acc: &mut s.acc,
                touched: &mut s.touched,
            };
            add_term::<E>(&deltas[term.delta], name, term, words, &mut tile)?;
        }
        if to == E::FLOAT {
            overflows += finish_same::<E>(tile, &s.acc, &s.touched, out);
        } else {
            for (a, &b) in s.acc.iter_mut().zip(&s.base) {
                *a += b;
                overflows += to.overflows(*a) as u64;
            }
            to.store_all(&s.acc, &mut s.sub);
            out.copy_from_slice(&s.sub);
        }
        lo = hi;
    }
    Ok(overflows)
}

crate::simd::multiversioned! {
    /// One tile's output in the base's own dtype: each touched element is `round(b + acc)`, each
    /// untouched one keeps the base's bits unchanged (docs/FORMAT.md section 8). Returns how many
    /// finite results overflowed to infinity. A select per element rather than a branch, so that
    /// it vectorizes; compiled for AVX-512, AVX2 and the baseline, chosen at run time.
    fn finish_same<E: Elem>(tile: &[u8], acc: &[f64], touched: &[u64], out: &mut [u8]) -> u64 {
        let mut overflows = 0u64;
        let words = tile
            .chunks(64 * E::SIZE)
            .zip(out.chunks_mut(64 * E::SIZE))
            .zip(acc.chunks(64))
            .zip(touched);
        for (((b, o), a), &word) in words {
            for (k, ((b, o), &a)) in b
                .chunks_exact(E::SIZE)
                .zip(o.chunks_exact_mut(E::SIZE))
                .zip(a)
                .enumerate()
            {
                let bits = E::bits(b);
                let x = E::value(bits) + a;
                let hit = (word >> k) & 1 != 0;
                overflows += (hit & E::FLOAT.overflows(x)) as u64;
                E::put(o, if hit { E::round(x) } else { bits });
            }
        }
        overflows
    }
}

/// Whether no element of the tile is kept by two of `words` (one keep-word list per term, over
/// `n` elements); if so, `union` is set to the elements kept by any.
fn union_if_disjoint(words: &[Vec<u64>], n: usize, union: &mut Vec<u64>) -> bool {
    union.clear();
    union.resize(n.div_ceil(64), 0);
    let mut overlap = 0u64;
    for w in words {
        for (u, &x) in union.iter_mut().zip(w) {
            overlap |= *u & x;
            *u |= x;
        }
    }
    overlap == 0
}

/// The output of a tile whose kept values were [`place`]d in `vals` (at the bits of `placed`):
/// the base's bits where nothing was placed, and where something was, the result
/// [`Elem::replaces`] gives, or for the few elements it cannot decide (non-finite, or exponents
/// too far apart) the arithmetic of docs/FORMAT.md section 8 with their one term. Returns how
/// many finite results overflowed.
///
/// [`place`]: crate::simd::place
fn settle<E: Elem>(
    simd: Option<&Kept>,
    tile: &[u8],
    vals: &[u8],
    placed: &[u64],
    out: &mut [u8],
) -> u64 {
    let mut overflows = 0u64;
    let words = tile
        .chunks(64 * E::SIZE)
        .zip(vals.chunks(64 * E::SIZE))
        .zip(out.chunks_mut(64 * E::SIZE))
        .zip(placed);
    for (((b, v), o), &word) in words {
        let mut undecided = crate::simd::settle_word::<E>(simd, word, b, v, o);
        // Rare: the placed elements that `replaces` cannot decide.
        while undecided != 0 {
            let k = undecided.trailing_zeros() as usize;
            undecided &= undecided - 1;
            let at = k * E::SIZE..(k + 1) * E::SIZE;
            let (b, v) = (E::load(&b[at.clone()], 0), E::load(&v[at.clone()], 0));
            let x = b + (-0.0 + 1.0 * (v - b));
            overflows += E::FLOAT.overflows(x) as u64;
            E::put(&mut o[at], E::round(x));
        }
    }
    overflows
}

/// One tile of a tensor being computed.
struct Tile<'a> {
    /// The tile's elements.
    range: std::ops::Range<u64>,
    /// The base elements, as f64.
    base: &'a [f64],
    /// `Σ c·(v − b)` so far.
    acc: &'a mut [f64],
    /// Which elements a term has touched, one bit each.
    touched: &'a mut [u64],
}

/// `acc[k] += coeff · (v − b[k])` at each element of the tile that the term keeps (its keep
/// words over the tile are `tile_words`), marking it in `touched`.
fn add_term<E: Elem>(
    delta: &Delta,
    name: &str,
    term: &Term,
    tile_words: &[u64],
    tile: &mut Tile,
) -> Result<()> {
    let Tile {
        range,
        base: b,
        acc,
        touched,
    } = tile;
    let c = term.coeff;
    if !term.masked {
        let v = &delta.data(name)[range.start as usize * E::SIZE..range.end as usize * E::SIZE];
        for (k, a) in acc.iter_mut().enumerate() {
            *a += c * (E::load(v, k) - b[k]);
        }
        touched.fill(!0);
        if !acc.len().is_multiple_of(64) {
            // Bits past the tile's end must stay clear: they index no element.
            *touched.last_mut().unwrap() = (1u64 << (acc.len() % 64)) - 1;
        }
        return Ok(());
    }
    let simd = Kept::for_dtype(E::FLOAT);
    for_each_kept_word::<E>(
        delta,
        name,
        tile_words,
        range.clone(),
        |k0, word, values| {
            crate::simd::add_word::<E>(simd.as_ref(), k0, word, values, b, acc, touched, c)
        },
    )
}

/// Walks the kept elements of a masked term over the tile `range`, whose keep words are
/// `tile_words`: calls `visit(k0, word, values)` for each non-empty word, where bit `k` of
/// `word` is tile element `k0 + k` and `values` holds exactly the kept values of its set bits,
/// in order. Every chunk's walk is checked against its offsets (docs/FORMAT.md section 6), and
/// a file that disagrees is refused before any value past its limit is read.
fn for_each_kept_word<E: Elem>(
    delta: &Delta,
    name: &str,
    tile_words: &[u64],
    range: std::ops::Range<u64>,
    mut visit: impl FnMut(usize, u64, &[u8]),
) -> Result<()> {
    let values = delta.data(name);
    let lo = range.start;
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
        let mut step = |start: u64, word: u64| {
            let kept = word.count_ones() as u64;
            if overrun || j + kept > limit {
                overrun = true;
                j += kept;
                return;
            }
            if word != 0 {
                let at = j as usize * E::SIZE;
                visit(
                    (start - lo) as usize,
                    word,
                    &values[at..at + kept as usize * E::SIZE],
                );
            }
            j += kept;
        };
        let (from, to) = (pos - lo, end - lo);
        if from.is_multiple_of(64) {
            // The tile's words, the last one cut at the chunk's end.
            let (w0, w1) = ((from / 64) as usize, to.div_ceil(64) as usize);
            for (w, &word) in tile_words.iter().enumerate().take(w1).skip(w0) {
                let cut = if w + 1 == w1 && !to.is_multiple_of(64) {
                    word & ((1u64 << (to % 64)) - 1)
                } else {
                    word
                };
                step(lo + 64 * w as u64, cut);
            }
        } else {
            // A chunk size that is not a multiple of 64 (never written by this tool).
            mask.for_each_word(pos..end, step);
        }
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
