//! `merge` and `apply`: by default `out = base + Σ_t w_t·s_t·(mask_t ⊙ δ_t)` in the exact
//! arithmetic of docs/FORMAT.md section 8; with `--method ties|iso|tsv`, the methods of
//! docs/METHODS.md.
//!
//! - [`mod@plan`]: which tensor comes from where, and what each delta contributes.
//! - [`Engine`]: what executes the plan, chosen once: [`cpu`] (rayon) or [`cuda`] (a GPU).
//!   Callers never branch on the device.
//! - [`methods`]: `ties`, `iso` and `tsv` on the CPU, a tensor per thread.
//!
//! Every output element depends only on its own inputs, so the output is the same bytes for
//! any thread count, tiling or engine.

pub mod cpu;
pub mod cuda;
pub mod input;
pub mod methods;
pub mod plan;
pub mod subfolders;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Result, bail};
use rayon::prelude::*;
use serde_json::json;

use crate::dtype::Float;
use crate::io::{Cancel, Checkpoint, MemoryOutput, MemoryTensor, OutTensor, Output, Sink, Target};

pub use input::{FineTune, Input};
pub use plan::{Combine, Grown, Job, Method, Origin, Source, TensorPlan, Term, plan};

/// What `merge` is asked to do.
#[derive(Clone, Debug)]
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
    /// The merge method (docs/METHODS.md).
    pub method: Method,
    /// `ties`, `iso`, `tsv`: scales the merged delta (1 by default).
    pub alpha: f64,
    /// `ties`: the fraction of each task's elements kept by magnitude (0.2 by default).
    pub trim: f64,
    /// The input (index into the inputs) whose own files a folder output takes over the base's
    /// (docs/FORMAT.md section 13): `merge --files-from K`, and always 0 for `apply`.
    pub files_from: Option<usize>,
    /// `ties`: take the disjoint mean (true, the default) or the agreeing tasks' sum (mergekit's
    /// `normalize: false`, from a configuration).
    pub normalize: bool,
    /// A merge from a mergekit configuration: its file name and `merge_method`, for the record.
    pub mergekit: Option<(String, String)>,
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions {
            weights: Vec::new(),
            rescale: false,
            dtype: None,
            force: false,
            fingerprint_output: false,
            device: Device::default(),
            method: Method::Sum,
            alpha: 1.0,
            trim: 0.2,
            files_from: None,
            normalize: true,
            mergekit: None,
        }
    }
}

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
    /// Tensors with results that are ±infinity or NaN in the output dtype where the base is
    /// finite (an overflow of the dtype or of the arithmetic, inf − inf, or a non-finite value
    /// stored in a delta), with counts.
    pub overflowed: Vec<(String, u64)>,
    /// `iso` and `tsv`: tensors with the steps that took the exact SVD because a Gram matrix
    /// failed its check (docs/METHODS.md, "How `iso` and `tsv` are computed").
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub exact_svd: Vec<(String, Vec<String>)>,
    /// The device that computed the changed tensors: `cpu`, or `cuda: <GPU name>`.
    pub device: String,
    /// With `--device auto` on the CPU: why not CUDA.
    #[serde(skip)]
    pub cpu_because: Option<String>,
    /// The grown tensors of the output (docs/FORMAT.md section 12), each with the delta (index)
    /// whose new rows it has.
    pub grown: Vec<(String, usize)>,
    /// The own files written into the output folder from delta `files_from`.
    pub own_files: Vec<String>,
    /// The own files of delta `files_from` that a single-file output left out.
    pub files_left_out: Vec<String>,
    /// On a GPU: the changed tensors computed on the CPU because a fine-tune contributes to
    /// them (the GPU reads delta files only).
    #[serde(skip)]
    pub fine_tune_tensors_on_cpu: usize,
    /// The subfolder weight files merged (docs/FORMAT.md section 15), by path; their tensors
    /// count in the totals above.
    pub subfolders: Vec<String>,
}

impl MergeReport {
    /// Counts in the merges of subfolder weight files (docs/FORMAT.md section 15), their
    /// tensors named `PATH: NAME`.
    fn add_subfolders(&mut self, reports: Vec<(String, MergeReport)>) {
        for (path, r) in reports {
            let named = |n: &str| format!("{path}: {n}");
            self.tensors += r.tensors;
            self.changed += r.changed;
            self.input_bytes += r.input_bytes;
            self.output_bytes += r.output_bytes;
            self.mismatches
                .extend(r.mismatches.iter().map(|m| named(m)));
            self.overflowed
                .extend(r.overflowed.iter().map(|(n, c)| (named(n), *c)));
            self.exact_svd
                .extend(r.exact_svd.into_iter().map(|(n, s)| (named(&n), s)));
            self.grown
                .extend(r.grown.iter().map(|(n, d)| (named(n), *d)));
            self.subfolders.push(path);
        }
    }
}

/// Which engine the user asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    /// CUDA when a GPU, its driver and NVRTC are usable, the CPU otherwise.
    #[default]
    Auto,
    /// The CPU (rayon).
    Cpu,
    /// A CUDA GPU; fails when none is usable.
    Cuda,
}

/// What computes the changed tensors of a plan. The CPU also copies every unchanged tensor and
/// hashes the base, whichever engine computes.
#[derive(Clone, Copy)]
pub enum Engine {
    /// rayon on the CPU ([`cpu`]).
    Cpu,
    /// A CUDA device ([`cuda`]); tensors with more than [`cuda::MAX_TERMS`] terms stay on the
    /// CPU.
    Cuda(&'static cuda::Backend),
}

impl Engine {
    /// The engine for `device`. With `auto` and no usable GPU, the CPU, and why not CUDA.
    pub fn select(device: Device) -> Result<(Engine, Option<String>)> {
        Ok(match device {
            Device::Cpu => (Engine::Cpu, None),
            Device::Auto => match cuda::backend() {
                Ok(g) => (Engine::Cuda(g), None),
                Err(why) => (Engine::Cpu, Some(why)),
            },
            Device::Cuda => {
                let g = cuda::backend().map_err(|why| {
                    anyhow::anyhow!("--device cuda: no usable CUDA device: {why}. Use --device cpu (or auto) to merge on the CPU")
                })?;
                (Engine::Cuda(g), None)
            }
        })
    }

    /// `cpu`, or `cuda: <GPU name>`.
    pub fn name(&self) -> String {
        match self {
            Engine::Cpu => "cpu".into(),
            Engine::Cuda(g) => format!("cuda: {}", g.name()),
        }
    }

    /// Whether this engine computes `p` itself (else the CPU does). CUDA takes `sum` tensors
    /// and the elementwise half of `ties` (its thresholds are computed on the CPU), each with at
    /// most [`cuda::MAX_TERMS`] terms, all from delta files; `iso` and `tsv` stay on the CPU,
    /// and so do tensors that a fine-tune contributes to (its kept values are read from the
    /// fine-tune as the CPU walks it).
    fn computes(&self, p: &TensorPlan, deltas: &[Input]) -> bool {
        if matches!(self, Engine::Cuda(_)) && reads_fine_tune(p, deltas) {
            return false;
        }
        match (self, &p.source) {
            (Engine::Cpu, _) | (Engine::Cuda(_), Source::Copy(_)) => false,
            (Engine::Cuda(_), Source::Compute { terms, .. }) => terms.len() <= cuda::MAX_TERMS,
            (Engine::Cuda(_), Source::Combine { combine, terms, .. }) => {
                // The kernel takes the disjoint mean; the sum without it stays on the CPU.
                combine.method == Method::Ties
                    && combine.normalize
                    && terms.len() <= cuda::MAX_TERMS
            }
        }
    }

    /// Computes `jobs` (the plans it [`computes`](Engine::computes)), handing output bytes to
    /// `write`; returns each job's overflow count. On the GPU, the slices of all the tensors
    /// go through one pipeline.
    fn compute(&self, deltas: &[Input], jobs: &[Job], write: &cuda::WriteFn) -> Result<Vec<u64>> {
        match self {
            Engine::Cpu => Ok(vec![0; jobs.len()]),
            Engine::Cuda(g) => g.merge_tensors(deltas, jobs, write),
        }
    }
}

/// Files a folder output gets beside its weights, made once the base has been read: given the
/// base fingerprint, `(name, bytes)` pairs ([`merge_with_files`]; ignored for a file output).
/// An error fails the merge before anything is written.
pub type FolderFiles<'a> = dyn Fn(&str) -> Result<Vec<(String, Vec<u8>)>> + 'a;

/// Whether a term of `p` reads a fine-tune rather than a delta file.
fn reads_fine_tune(p: &TensorPlan, deltas: &[Input]) -> bool {
    let terms = match &p.source {
        Source::Compute { terms, .. } | Source::Combine { terms, .. } => terms,
        Source::Copy(_) => return false,
    };
    terms.iter().any(|t| deltas[t.delta].delta().is_none())
}

/// Merges `deltas` (delta files, and fine-tunes taken on the fly) onto `base` and writes the
/// result to `out`.
pub fn merge(
    base: &Checkpoint,
    deltas: &[Input],
    out: &Target,
    opts: &MergeOptions,
) -> Result<MergeReport> {
    merge_with_files(base, deltas, out, opts, &|_| Ok(Vec::new()))
}

/// [`merge`], and into a folder output the files `files` makes (a model card and a recipe,
/// [`crate::release`]) in place of the base's of the same names.
pub fn merge_with_files(
    base: &Checkpoint,
    deltas: &[Input],
    out: &Target,
    opts: &MergeOptions,
    files: &FolderFiles,
) -> Result<MergeReport> {
    let start = Instant::now();
    check_inputs(deltas, opts)?;
    let mut inputs = vec![base];
    inputs.extend(deltas.iter().map(Input::checkpoint));
    crate::io::refuse_output_over_checkpoints(&out.path, &inputs)?;
    let protected: Vec<&Path> = deltas.iter().flat_map(Input::protected_paths).collect();
    crate::io::refuse_output_over_input(&out.path, &protected)?;
    let mut planned = Planned::new(base, deltas, opts)?;
    // The subfolder weight files the deltas cover (docs/FORMAT.md section 15), merged after
    // the top level.
    let subfolder_merges = subfolders::prepare(base, deltas, out)?;
    // The own files taken (docs/FORMAT.md section 13): into a folder, or left out of a file.
    let taken = opts.files_from.map(|k| deltas[k].own_files());
    let names: Vec<String> = taken.into_iter().flat_map(|f| f.keys().cloned()).collect();
    let (own_files, files_left_out) = if out.is_folder() {
        (names, Vec::new())
    } else {
        (Vec::new(), names)
    };
    let mut output = Output::create(out, &planned.layout, &planned.metadata)?;
    for (name, bytes) in taken.into_iter().flatten().filter(|_| out.is_folder()) {
        output.add_file(name, bytes.clone())?;
    }
    // A part of a merge (`--part K/N`) computes the tensors of its own shards only.
    planned.plans.retain(|p| output.holds(&p.name));
    // The files are made (and a replayed recipe checks the base) before the provenance check:
    // a recipe's changed base is named as such.
    let mut extra = Vec::new();
    let run = planned.run(base, deltas, opts, &output, &mut |fingerprint| {
        extra = files(fingerprint)?;
        Ok(())
    })?;
    let subfolder_reports = subfolder_merges.run(&mut output, out, opts)?;
    let written = if out.part.is_some() {
        // The files are made whole by `finalize`, from every part's.
        let hashes = run
            .base_hashes
            .iter()
            .map(|(n, h)| (n.clone(), blake3::Hash::from(*h).to_hex().to_string()))
            .collect();
        let extra = extra
            .into_iter()
            .map(|(n, b)| (n, String::from_utf8_lossy(&b).into_owned()))
            .collect();
        output.commit_part(hashes, extra)?
    } else {
        if out.is_folder() {
            for (name, bytes) in extra {
                output.add_file(&name, bytes)?;
            }
        }
        output.commit(opts.fingerprint_output)?
    };
    let display = |p: &Path| p.display().to_string();
    let mut report = MergeReport {
        outputs: written.files.iter().map(|p| display(p)).collect(),
        output_bytes: written.bytes,
        output_fingerprint: written.fingerprint,
        own_files,
        files_left_out,
        ..planned.report(base, deltas, run, start)
    };
    report.add_subfolders(subfolder_reports);
    Ok(report)
}

/// A merge's output held in memory ([`merge_in_memory`]).
pub struct MergedInMemory {
    /// The tensors, in name order: each one's bytes are those the file output would hold.
    pub tensors: Vec<MemoryTensor>,
    /// The `__metadata__` the file output would have.
    pub metadata: BTreeMap<String, String>,
    /// What the merge did; it lists no output files, `output_bytes` counts the tensors' data,
    /// and the own files of `files_from` are all left out.
    pub report: MergeReport,
}

/// Merges `deltas` onto `base` into memory: the same plan, engines and arithmetic as
/// [`merge`], with the tensors kept in buffers instead of written to a file. `cancel` stops it
/// (every write checks it).
pub fn merge_in_memory(
    base: &Checkpoint,
    deltas: &[Input],
    opts: &MergeOptions,
    cancel: Cancel,
) -> Result<MergedInMemory> {
    let start = Instant::now();
    check_inputs(deltas, opts)?;
    let planned = Planned::new(base, deltas, opts)?;
    let output = MemoryOutput::create(&planned.layout, cancel)?;
    let run = planned.run(base, deltas, opts, &output, &mut |_| Ok(()))?;
    let report = MergeReport {
        output_bytes: planned.layout.iter().map(|t| t.len).sum(),
        files_left_out: opts
            .files_from
            .map(|k| deltas[k].own_files().keys().cloned().collect())
            .unwrap_or_default(),
        ..planned.report(base, deltas, run, start)
    };
    Ok(MergedInMemory {
        tensors: output.into_tensors(),
        metadata: planned.metadata,
        report,
    })
}

/// Refuses options that do not fit these deltas.
fn check_inputs(deltas: &[Input], opts: &MergeOptions) -> Result<()> {
    if !opts.weights.is_empty() && opts.weights.len() != deltas.len() {
        bail!(
            "{} weights for {} deltas: give one weight per delta",
            opts.weights.len(),
            deltas.len()
        );
    }
    check_method(opts, deltas.len())?;
    if let Some(k) = opts.files_from.filter(|&k| k >= deltas.len()) {
        bail!(
            "--files-from {k}: there are {} deltas, numbered from 0",
            deltas.len()
        );
    }
    Ok(())
}

/// A merge planned, before any output exists: the tensors, the engine, and the output's layout
/// and metadata.
struct Planned {
    plans: Vec<TensorPlan>,
    engine: Engine,
    cpu_because: Option<String>,
    layout: Vec<OutTensor>,
    metadata: BTreeMap<String, String>,
}

/// What executing a plan found.
struct Ran {
    base_fingerprint: String,
    /// Each base tensor's name and hash, in name order.
    base_hashes: Vec<(String, [u8; 32])>,
    mismatches: Vec<String>,
    overflows: Vec<u64>,
    exact_svd: ExactSvd,
}

/// Per tensor, the steps of `iso` or `tsv` that took the exact SVD ([`MergeReport::exact_svd`]).
type ExactSvd = Vec<(String, Vec<String>)>;

impl Planned {
    fn new(base: &Checkpoint, deltas: &[Input], opts: &MergeOptions) -> Result<Self> {
        let weight = |d: usize| opts.weights.get(d).copied().unwrap_or(1.0);
        let plans = plan(base, deltas, opts, &weight)?;
        // Chosen before the output is created: `--device cuda` without a GPU leaves no file.
        let (engine, cpu_because) = Engine::select(opts.device)?;
        let layout = plans
            .iter()
            .map(|p| OutTensor {
                name: p.name.clone(),
                dtype: p.dtype,
                shape: p.out_shape().to_vec(),
                len: p.out_len(),
            })
            .collect();
        let metadata = output_metadata(base, deltas, opts, &weight);
        Ok(Planned {
            plans,
            engine,
            cpu_because,
            layout,
            metadata,
        })
    }

    /// Computes every tensor into `sink`, calls `hashed` with the base's fingerprint, then
    /// checks the provenance and that no input changed meanwhile: the sink's contents may be
    /// used only if this succeeds.
    fn run(
        &self,
        base: &Checkpoint,
        deltas: &[Input],
        opts: &MergeOptions,
        sink: &dyn Sink,
        hashed: &mut dyn FnMut(&str) -> Result<()>,
    ) -> Result<Ran> {
        base.advise_sequential();
        deltas
            .iter()
            .map(Input::checkpoint)
            .for_each(Checkpoint::advise_sequential);
        let (base_hashes, overflows, exact_svd) =
            execute(self.engine, base, deltas, &self.plans, sink)?;
        let base_fingerprint = crate::io::fingerprint(&base_hashes);
        hashed(&base_fingerprint)?;
        // The base's tensors among the plans (all of them but in a part of a merge), in the
        // order of their hashes.
        let base_names: Vec<&String> = self
            .plans
            .iter()
            .map(|p| &p.name)
            .filter(|n| base.info(n).is_some())
            .collect();
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
        deltas
            .iter()
            .map(Input::checkpoint)
            .try_for_each(Checkpoint::check_unchanged)?;
        Ok(Ran {
            base_fingerprint,
            base_hashes: base_names.into_iter().cloned().zip(base_hashes).collect(),
            mismatches,
            overflows,
            exact_svd,
        })
    }

    /// The report of a run, without its output files.
    fn report(&self, base: &Checkpoint, deltas: &[Input], run: Ran, start: Instant) -> MergeReport {
        let display = |p: &Path| p.display().to_string();
        MergeReport {
            inputs: base
                .files()
                .into_iter()
                .chain(deltas.iter().flat_map(|d| d.checkpoint().files()))
                .map(display)
                .collect(),
            outputs: Vec::new(),
            tensors: self.plans.len(),
            changed: self
                .plans
                .iter()
                .filter(|p| {
                    matches!(&p.source,
                        Source::Compute { terms, .. } | Source::Combine { terms, .. } if !terms.is_empty())
                })
                .count(),
            output_bytes: 0,
            input_bytes: base.file_len() + deltas.iter().map(|d| d.checkpoint().file_len()).sum::<u64>(),
            seconds: start.elapsed().as_secs_f64(),
            mismatches: run.mismatches,
            base_fingerprint: run.base_fingerprint,
            output_fingerprint: None,
            overflowed: self
                .plans
                .iter()
                .zip(run.overflows)
                .filter(|(_, n)| *n > 0)
                .map(|(p, n)| (p.name.clone(), n))
                .collect(),
            exact_svd: run.exact_svd,
            device: self.engine.name(),
            cpu_because: self.cpu_because.clone(),
            grown: self
                .plans
                .iter()
                .filter_map(|p| Some((p.name.clone(), p.grown.as_ref()?.delta)))
                .collect(),
            own_files: Vec::new(),
            files_left_out: Vec::new(),
            fine_tune_tensors_on_cpu: match self.engine {
                Engine::Cpu => 0,
                Engine::Cuda(_) => self
                    .plans
                    .iter()
                    .filter(|p| reads_fine_tune(p, deltas))
                    .count(),
            },
            subfolders: Vec::new(),
        }
    }
}

impl Method {
    /// The method's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Method::Sum => "sum",
            Method::Ties => "ties",
            Method::Iso => "iso",
            Method::Tsv => "tsv",
        }
    }
}

/// Refuses options that do not go together (docs/METHODS.md, "Options").
pub fn check_method(opts: &MergeOptions, deltas: usize) -> Result<()> {
    let sum = opts.method == Method::Sum;
    if opts.rescale && !sum {
        bail!(
            "--rescale goes with --method sum only: the other methods rescale every delta to its unbiased estimate themselves"
        );
    }
    if sum && opts.alpha != 1.0 {
        bail!("--alpha goes with --method ties, iso or tsv, not sum");
    }
    if opts.trim != 0.2 && opts.method != Method::Ties {
        bail!("--trim goes with --method ties only");
    }
    if !sum && deltas < 2 {
        bail!(
            "--method {} merges two or more deltas; for one, use apply",
            opts.method.name()
        );
    }
    if !(opts.alpha.is_finite()) {
        bail!("--alpha {} is not a finite number", opts.alpha);
    }
    if !(opts.trim > 0.0 && opts.trim <= 1.0) {
        bail!("--trim {} is not in (0, 1]", opts.trim);
    }
    Ok(())
}

/// The output's `__metadata__`: the base's, plus a record of the deltas and how they were
/// merged.
fn output_metadata(
    base: &Checkpoint,
    deltas: &[Input],
    opts: &MergeOptions,
    weight: &dyn Fn(usize) -> f64,
) -> BTreeMap<String, String> {
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
            let mut record = json!({
                "file": delta.path().file_name().map(|f| f.to_string_lossy()),
                "seed": p.seed, "lo": p.interval.lo(), "hi": p.interval.hi(),
                "density": p.interval.density(), "weight": weight(d), "rescale": opts.rescale,
            });
            // A delta file records the base it was taken against; a fine-tune's delta is taken
            // against this base, whose hashes the merge computes as it reads it.
            match delta.delta() {
                Some(file) => record["base_fingerprint"] = json!(file.fingerprint()),
                None => record["input"] = json!(delta.kind()),
            }
            record
        })
        .collect();
    let mut record = json!({
        "tool": crate::TOOL,
        "forced": opts.force,
        "deltas": record,
        "method": opts.method,
    });
    if let Some(k) = opts
        .files_from
        .filter(|&k| !deltas[k].own_files().is_empty())
    {
        record["files_from"] = json!(k);
    }
    if opts.method != Method::Sum {
        record["alpha"] = json!(opts.alpha);
        if opts.method == Method::Ties {
            record["trim"] = json!(opts.trim);
            if !opts.normalize {
                record["normalize"] = json!(false);
            }
        }
    }
    if let Some((config, method)) = &opts.mergekit {
        record["mergekit"] = json!({"config": config, "merge_method": method});
    }
    md.insert("sotu_delta".into(), record.to_string());
    md
}

/// Writes every planned tensor: `engine` computes what it takes, in one pipeline through all of
/// them, while the CPU goes tensor by tensor in file order, computing or copying the rest and
/// hashing each base tensor as it goes: the two passes share the tensor's pages, so a model
/// larger than the page cache is read from disk once. Returns the base's tensor hashes (in
/// name order), each plan's overflow count, and the merge methods' exact-SVD steps per tensor.
fn execute(
    engine: Engine,
    base: &Checkpoint,
    deltas: &[Input],
    plans: &[TensorPlan],
    output: &dyn Sink,
) -> Result<(Vec<[u8; 32]>, Vec<u64>, ExactSvd)> {
    let combined = |p: &TensorPlan| matches!(p.source, Source::Combine { .. });
    let (by_engine, by_cpu) = rayon::join(
        || -> Result<Vec<u64>> {
            let mine: Vec<&TensorPlan> = plans
                .iter()
                .filter(|p| engine.computes(p, deltas))
                .collect();
            // The thresholds of `ties` need each task's whole estimate: the CPU computes them,
            // tensors in parallel, before the engine starts.
            let ties = mine
                .par_iter()
                .map(|p| {
                    combined(p)
                        .then(|| methods::ties_params(base, deltas, p))
                        .transpose()
                })
                // Collected whole, then the first error in file order: the same message for
                // any thread count (rayon's own Result collect returns whichever fails first).
                .collect::<Vec<_>>()
                .into_iter()
                .collect::<Result<Vec<_>>>()?;
            let jobs: Vec<Job> = mine
                .iter()
                .zip(&ties)
                .filter_map(|(p, t)| match t {
                    Some(t) => p.ties_job(base, deltas, t),
                    None => p.job(base, deltas),
                })
                .collect();
            if jobs.is_empty() {
                return Ok(Vec::new());
            }
            engine.compute(deltas, &jobs, &|name, at, bytes| {
                output.write(name, at, bytes)
            })
        },
        || -> Result<(Vec<[u8; 32]>, Vec<u64>)> {
            let mut hashes = Vec::with_capacity(base.tensors().len());
            let mut counts = Vec::with_capacity(plans.len());
            for p in plans {
                let (hash, written) = rayon::join(
                    || base.hash_of(&p.name),
                    || -> Result<u64> {
                        // The new rows of a grown tensor are the CPU's whoever computes the rest.
                        let rows = cpu::write_grown(deltas, output, p)?;
                        if engine.computes(p, deltas) || combined(p) {
                            Ok(rows)
                        } else {
                            Ok(rows + cpu::execute(base, deltas, output, p)?)
                        }
                    },
                );
                hashes.extend(hash?);
                counts.push(written?);
            }
            Ok((hashes, counts))
        },
    );
    let (base_hashes, mut overflows) = by_cpu?;
    let mut from_engine = by_engine?.into_iter();
    for (c, p) in overflows.iter_mut().zip(plans) {
        if engine.computes(p, deltas) {
            *c += from_engine.next().unwrap_or(0);
        }
    }
    // The merge methods: a tensor on each thread, each computed whole (docs/METHODS.md). The
    // costliest first: rayon hands each thread a run of the list and the runs it steals end
    // with the cheapest, so that no large matrix starts last and leaves the other threads idle.
    let mut mine: Vec<usize> = (0..plans.len())
        .filter(|&i| combined(&plans[i]) && !engine.computes(&plans[i], deltas))
        .collect();
    mine.sort_by(|&a, &b| {
        let cost = |i: usize| methods::cost(&plans[i], deltas.len());
        cost(b).total_cmp(&cost(a)).then(a.cmp(&b))
    });
    let mut from_methods: Vec<(usize, Result<methods::Outcome>)> = mine
        .into_par_iter()
        .map(|i| (i, methods::execute(base, deltas, output, &plans[i])))
        .collect();
    // The first error in file order: the same message for any thread count.
    from_methods.sort_by_key(|(i, _)| *i);
    let mut exact_svd = Vec::new();
    for (i, r) in from_methods {
        let outcome = r?;
        overflows[i] += outcome.overflows;
        if !outcome.exact_svd.is_empty() {
            exact_svd.push((plans[i].name.clone(), outcome.exact_svd));
        }
    }
    Ok((base_hashes, overflows, exact_svd))
}

/// Compares each delta's recorded base hashes with the base as read. Returns `file: tensor`
/// for each disagreement, including tensors one side has and the other lacks.
fn check_provenance(
    base: &Checkpoint,
    deltas: &[Input],
    base_names: &[&String],
    hashes: &[[u8; 32]],
) -> Vec<String> {
    let by_name: BTreeMap<&str, &[u8; 32]> =
        base_names.iter().map(|n| n.as_str()).zip(hashes).collect();
    let mut bad = Vec::new();
    // A part of a merge hashed the base tensors of its own shards: the others are its peers'.
    let whole = base_names.len() == base.tensors().len();
    // A view of a subfolder file that a delta does not cover has no base to check.
    for d in deltas
        .iter()
        .filter_map(Input::delta)
        .filter(|d| !d.is_uncovered())
    {
        let file = d.path().display();
        for (name, e) in d.entries() {
            let hashed = by_name.get(name.as_str());
            if e.in_base && (whole || hashed.is_some()) && hashed != Some(&&d.base_hash(e.row)) {
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
