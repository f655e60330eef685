//! The merge plan: for every output tensor, where its bytes come from and what each delta
//! contributes. Both engines execute the same plan ([`super::cpu`], [`super::cuda`]), so a new
//! kind of term or merge method is a change here plus one function per engine.

use std::collections::BTreeMap;

use anyhow::{Result, bail};
use safetensors::Dtype;

use crate::dtype::Float;
use crate::format::Kind;
use crate::io::{Checkpoint, Tensor};

use super::{Input, MergeOptions};

/// Elements an engine computes as one unit: one chunk of the delta format
/// ([`crate::mask::CHUNK_ELEMS`]), so that every tile starts on a chunk boundary and its first
/// kept value is read from the offsets, not counted. On the CPU its f64 accumulator (512 KiB)
/// stays in the L2 cache; on the GPU it is one thread block's share.
pub const TILE: u64 = crate::mask::CHUNK_ELEMS;

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

/// A merge method (docs/METHODS.md).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// `base + Σ w_t·s_t·(mask_t ⊙ δ_t)` (docs/FORMAT.md section 8).
    #[default]
    Sum,
    /// TIES: trim each task's estimate by magnitude, elect a sign, take the disjoint mean.
    Ties,
    /// Iso-C: the summed estimate with its spectrum flattened.
    Iso,
    /// TSV-M: each task's top singular triplets, their bases orthogonalised.
    Tsv,
}

/// A method other than `sum` with its parameters, for a tensor it applies to.
#[derive(Clone, Copy, Debug)]
pub struct Combine {
    /// `ties`, `iso` or `tsv`.
    pub method: Method,
    /// Scales the merged delta.
    pub alpha: f64,
    /// `ties`: the fraction of each task's elements kept by magnitude.
    pub trim: f64,
    /// `ties`: divide the agreeing tasks' sum by their weights' sum (the disjoint mean); without
    /// it, the sum itself (mergekit's `normalize: false`).
    pub normalize: bool,
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
    /// A merge method applied to the base tensor and the unbiased estimates of masked terms
    /// (each term's `coeff` is its weight): docs/METHODS.md.
    Combine {
        /// The stored dtype.
        from: Float,
        /// The output dtype.
        to: Float,
        /// The method and its parameters.
        combine: Combine,
        /// The deltas' masked terms, in command-line order.
        terms: Vec<Term>,
    },
}

/// The rows a delta adds to a grown tensor (docs/FORMAT.md section 12), written after the part
/// the base has: the delta's stored rows as they are, or rounded once under `--dtype`.
#[derive(Clone, Debug)]
pub struct Grown {
    /// The output tensor's shape, with the new rows.
    pub shape: Vec<usize>,
    /// The delta whose `sotu/grown/<name>` holds the rows.
    pub delta: usize,
    /// Elements of the new rows.
    pub numel: u64,
    /// The stored and the output dtype, where they differ (`--dtype`).
    pub cast: Option<(Float, Float)>,
}

/// One output tensor and how it is made.
#[derive(Clone, Debug)]
pub struct TensorPlan {
    /// Tensor name.
    pub name: String,
    /// Output dtype.
    pub dtype: Dtype,
    /// Shape of the part `source` makes: the base's.
    pub shape: Vec<usize>,
    /// Elements of that part.
    pub numel: u64,
    /// Where the bytes come from.
    pub source: Source,
    /// The new rows of a grown tensor, after that part.
    pub grown: Option<Grown>,
}

impl TensorPlan {
    /// The tensor it starts from: the base's, or a delta's stored whole tensor.
    pub fn origin<'a>(&self, o: Origin, base: &'a Checkpoint, deltas: &'a [Input]) -> Tensor<'a> {
        match o {
            Origin::Base => base.tensor(&self.name).expect("planned from the base"),
            Origin::Delta(d) => deltas[d].stored(&self.name),
        }
    }

    /// The tensor as a [`Job`] for an engine, when it is computed rather than copied.
    pub fn job<'a>(&'a self, base: &'a Checkpoint, deltas: &'a [Input<'_>]) -> Option<Job<'a>> {
        let Source::Compute {
            origin,
            from,
            to,
            terms,
        } = &self.source
        else {
            return None;
        };
        Some(Job {
            name: &self.name,
            numel: self.numel,
            base: self.origin(*origin, base, deltas),
            from: *from,
            to: *to,
            terms,
            ties: None,
        })
    }

    /// A `ties` tensor ([`Source::Combine`] with [`Method::Ties`]) as a [`Job`] for an engine
    /// that runs its elementwise half, with the parameters the CPU computed
    /// ([`super::methods::ties_params`]).
    pub fn ties_job<'a>(
        &'a self,
        base: &'a Checkpoint,
        deltas: &'a [Input<'_>],
        ties: &'a TiesParams,
    ) -> Option<Job<'a>> {
        let Source::Combine {
            from,
            to,
            combine,
            terms,
        } = &self.source
        else {
            return None;
        };
        (combine.method == Method::Ties).then(|| Job {
            name: &self.name,
            numel: self.numel,
            base: self.origin(Origin::Base, base, deltas),
            from: *from,
            to: *to,
            terms,
            ties: Some(ties),
        })
    }

    /// Bytes of the part `source` makes: where the new rows of a grown tensor begin.
    pub fn source_len(&self) -> u64 {
        match &self.source {
            Source::Compute { to, .. } | Source::Combine { to, .. } => {
                self.numel * to.size() as u64
            }
            Source::Copy(_) => (self.numel * self.dtype.bitsize() as u64).div_ceil(8),
        }
    }

    /// Bytes of the tensor in the output.
    pub fn out_len(&self) -> u64 {
        let rows = self
            .grown
            .as_ref()
            .map_or(0, |g| g.numel * self.dtype.bitsize() as u64 / 8);
        self.source_len() + rows
    }

    /// The output tensor's shape: with the new rows of a grown tensor.
    pub fn out_shape(&self) -> &[usize] {
        self.grown.as_ref().map_or(&self.shape, |g| &g.shape)
    }
}

/// One tensor to compute, as an engine sees it: `round_to(base + Σ terms)` over `numel`
/// elements, or the elementwise half of `ties` when `ties` is given.
#[derive(Clone, Copy, Debug)]
pub struct Job<'a> {
    /// Tensor name.
    pub name: &'a str,
    /// Elements.
    pub numel: u64,
    /// The starting values (the base tensor, or a new tensor's stored bytes).
    pub base: Tensor<'a>,
    /// Their dtype.
    pub from: Float,
    /// The output dtype.
    pub to: Float,
    /// The deltas' contributions, in command-line order (for `ties`, each `coeff` is the
    /// weight `w_t`).
    pub terms: &'a [Term],
    /// `ties`: what the elementwise half needs besides the terms.
    pub ties: Option<&'a TiesParams>,
}

/// What the elementwise half of `ties` needs besides the terms (docs/METHODS.md): computed on
/// the CPU, which holds each task's whole estimate for its order statistic, by
/// [`super::methods::ties_params`].
#[derive(Clone, Debug, PartialEq)]
pub struct TiesParams {
    /// Scales the merged delta.
    pub alpha: f64,
    /// Per term: `s_t`, the rescale of its unbiased estimate.
    pub scale: Vec<f64>,
    /// Per term: `θ_t`, its trim threshold.
    pub theta: Vec<f64>,
}

/// Decides, for every output tensor, where it comes from and what each delta contributes.
pub fn plan(
    base: &Checkpoint,
    deltas: &[Input],
    opts: &MergeOptions,
    weight: &dyn Fn(usize) -> f64,
) -> Result<Vec<TensorPlan>> {
    check_against_base(base, deltas)?;
    let out_float = |dtype: Dtype| Float::of(dtype).map(|f| opts.dtype.unwrap_or(f));
    let mut plans = Vec::new();
    for (name, info) in base.tensors() {
        let mut terms = Vec::new();
        let mut replace: Option<usize> = None;
        let mut grower: Option<usize> = None;
        for (d, delta) in deltas.iter().enumerate() {
            let Some(e) = delta.entries().get(name) else {
                continue;
            };
            if e.grown_shape.is_some() {
                match grower {
                    Some(first) => same_growth(deltas, first, d, name)?,
                    None => grower = Some(d),
                }
            }
            let rescale = if opts.rescale {
                delta.params().rescale()
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
                } else if opts.method != Method::Sum
                    && !terms.is_empty()
                    && terms.iter().all(|t| t.masked)
                {
                    let combine = Combine {
                        method: opts.method,
                        alpha: opts.alpha,
                        trim: opts.trim,
                        normalize: opts.normalize,
                    };
                    (
                        to.dtype(),
                        Source::Combine {
                            from,
                            to,
                            combine,
                            terms,
                        },
                    )
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
        let grown = grower.map(|d| {
            let e = &deltas[d].entries()[name];
            let shape = e.grown_shape.clone().expect("a grower has a grown shape");
            let all: u64 = shape.iter().map(|&s| s as u64).product();
            let stored = Float::of(e.dtype).filter(|f| f.dtype() != dtype);
            Grown {
                shape,
                delta: d,
                numel: all - numel,
                cast: stored.map(|f| (f, Float::of(dtype).expect("cast to a float dtype"))),
            }
        });
        plans.push(TensorPlan {
            name: name.clone(),
            dtype,
            shape: info.shape.clone(),
            numel,
            source,
            grown,
        });
    }
    plan_new_tensors(deltas, &out_float, &mut plans)?;
    plans.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(plans)
}

/// Plans the tensors new in the deltas: taken as they are (cast under --dtype), identical where
/// several deltas carry them.
fn plan_new_tensors(
    deltas: &[Input],
    out_float: &dyn Fn(Dtype) -> Option<Float>,
    plans: &mut Vec<TensorPlan>,
) -> Result<()> {
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
                        grown: None,
                    });
                }
            }
        }
    }
    Ok(())
}

/// Refuses a delta whose tensors do not fit `base`: one taken against a base that has a tensor
/// this base lacks, a tensor new in the delta that the base already has, or another dtype or
/// shape.
fn check_against_base(base: &Checkpoint, deltas: &[Input]) -> Result<()> {
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
    Ok(())
}

/// Refuses two deltas that grow one tensor differently (docs/FORMAT.md section 12): to another
/// shape, or with other new rows.
fn same_growth(deltas: &[Input], a: usize, b: usize, name: &str) -> Result<()> {
    let (ea, eb) = (&deltas[a].entries()[name], &deltas[b].entries()[name]);
    let (da, db) = (deltas[a].path().display(), deltas[b].path().display());
    let (ga, gb) = (ea.tuned_shape(), eb.tuned_shape());
    if ga != gb {
        bail!(
            "tensor {name}: {da} grows it to {ga:?} and {db} to {gb:?}; merge cannot choose the output's vocabulary (docs/FORMAT.md section 12)"
        );
    }
    let same_rows = match (deltas[a].grown_rows(name), deltas[b].grown_rows(name)) {
        (Some(ra), Some(rb)) => ra.same_bytes(&rb)?,
        (ra, rb) => ra.is_none() && rb.is_none(),
    };
    if !same_rows {
        bail!(
            "tensor {name}: {da} and {db} both grow it to {ga:?}, with different new rows; merge cannot choose between them (docs/FORMAT.md section 12)"
        );
    }
    Ok(())
}

/// Refuses two deltas that store different whole values for one tensor.
fn same_whole(deltas: &[Input], a: usize, b: usize, name: &str) -> Result<()> {
    let (ea, eb) = (&deltas[a].entries()[name], &deltas[b].entries()[name]);
    if ea.kind != eb.kind
        || ea.dtype != eb.dtype
        || ea.shape != eb.shape
        || !deltas[a].stored(name).same_bytes(&deltas[b].stored(name))?
    {
        bail!(
            "tensor {name}: {} and {} both replace it, with different values; merge cannot choose",
            deltas[a].path().display(),
            deltas[b].path().display()
        );
    }
    Ok(())
}
