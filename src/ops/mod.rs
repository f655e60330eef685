//! The operations as a user states them, shared by the command line ([`crate::cli`]) and the
//! Python package (bindings/python): from paths and option values to a report and the warnings
//! to show. Here the values are checked (a mistake is a [`UsageError`]), the inputs opened, the
//! operation run and its warnings worded; nothing is printed. The command line prints what it
//! gets back; the Python package returns the reports as dicts and the warnings as Python
//! warnings, so both say the same things.
//!
//! Here: the shared checks and flags, `extract`, `finalize`, `inspect` and `verify`; a merge
//! is the module `merge`, its inputs the module `inputs`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::extract::{ExtractOptions, ExtractReport, Selector};
use crate::format::Delta;
use crate::inspect::{InspectReport, Verdict};
use crate::io::parts::{self, Part};
use crate::io::{Cancel, Checkpoint, HashCache, IoMode, Target, parse_size};
use crate::mask::{DEFAULT_SEED, Interval};
use crate::release::{self, Recipe};
use crate::tuned::Tuned;

mod inputs;
mod merge;
pub use inputs::{FineTuneMasks, InputSpec, fine_tune_inputs, listed_inputs};
pub use merge::{GIVEN_BY_CONFIG, MergeSpec, merge, merge_in_memory, refuse_beside_config};

/// The most worker threads `--threads` (or `RAYON_NUM_THREADS`) may ask for: more only adds
/// the cost of starting them (docs/RELIABILITY.md).
pub const MAX_THREADS: usize = 1024;

/// A mistake in the arguments: exit code 2 on the command line.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// A [`UsageError`] as an error.
pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    UsageError(msg.into()).into()
}

/// Checks a thread count asked for (`--threads`), or else `RAYON_NUM_THREADS`.
pub fn check_threads(threads: Option<usize>) -> Result<()> {
    match threads {
        Some(0) => Err(usage("--threads must be at least 1")),
        Some(n) if n > MAX_THREADS => Err(usage(format!(
            "--threads {n}: at most {MAX_THREADS} worker threads"
        ))),
        Some(_) => Ok(()),
        None => match std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|v| v.trim().parse::<u128>().ok())
            .filter(|&n| n > MAX_THREADS as u128)
        {
            Some(n) => Err(usage(format!(
                "RAYON_NUM_THREADS={n}: at most {MAX_THREADS} worker threads"
            ))),
            None => Ok(()),
        },
    }
}

/// Parses one of a flag's named values (`--method tsv`, `--device cpu`).
pub fn parse_choice<T: clap::ValueEnum>(flag: &str, value: &str) -> Result<T> {
    T::from_str(value, false).map_err(|_| {
        let names: Vec<String> = T::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value().map(|p| p.get_name().to_string()))
            .collect();
        usage(format!(
            "{flag} {value:?}: expected one of {}",
            names.join(", ")
        ))
    })
}

/// How an operation runs, beyond what it computes.
#[derive(Clone, Debug, Default)]
pub struct Flags {
    /// No progress bar, and no notes but the `--verbose` ones.
    pub quiet: bool,
    /// Say more: adds the `--verbose` lines to [`Outcome::notes`].
    pub verbose: bool,
    /// Do not fsync outputs before renaming them into place.
    pub no_sync: bool,
    /// Hash the base again instead of taking its tensor hashes from the hash cache
    /// (docs/RELIABILITY.md, "The hash cache").
    pub rehash: bool,
    /// Stops the operation at its next write when set (the Python package's KeyboardInterrupt).
    pub cancel: Cancel,
    /// How every input is read (`--io`).
    pub io: IoMode,
    /// The command line as given, recorded in a folder output's recipe and model card.
    pub command: Vec<String>,
}

/// What an operation returns: its report, the warnings to show, and the notes to show (the
/// `--verbose` ones only with [`Flags::verbose`]).
#[derive(Debug)]
pub struct Outcome<R> {
    /// The report (`--json` prints it).
    pub report: R,
    /// One paragraph each, without a `warning:` prefix.
    pub warnings: Vec<String>,
    /// Lines said on standard error without being warnings (`--verbose` ones, and a merge's
    /// note of own files not taken unless `--quiet`), without the `sotu-delta: ` prefix.
    pub notes: Vec<String>,
}

/// Opens a base checkpoint with the hash cache attached, unless it is turned off.
fn open_base(path: &Path, flags: &Flags) -> Result<Checkpoint> {
    let base = Checkpoint::open_with(path, flags.io)?;
    Ok(match HashCache::from_env(flags.rehash) {
        Some(cache) => base.with_hash_cache(cache),
        None => base,
    })
}

/// The output target of `path` with shard size `shard_size` (`--shard-size`).
fn target(path: &Path, shard_size: &str, flags: &Flags) -> Result<Target> {
    let mut t = Target::new(path);
    t.durable = !flags.no_sync;
    t.progress = !flags.quiet;
    t.cancel = flags.cancel.clone();
    t.shard_size = parse_size(shard_size).map_err(|e| usage(format!("--shard-size: {e:#}")))?;
    Ok(t)
}

/// An extract as stated: the command line's `extract` flags, the Python `extract` arguments.
#[derive(Clone, Debug)]
pub struct ExtractSpec {
    /// The base checkpoint.
    pub base: PathBuf,
    /// The fine-tuned checkpoint; with a fine-tune given in memory, what stands for it in
    /// messages.
    pub tuned: PathBuf,
    /// The delta to write.
    pub output: PathBuf,
    /// Largest shard of a folder output (`5GB`).
    pub shard_size: String,
    /// Fraction of elements kept (0.1, or the whole slot with `slot`).
    pub density: Option<f64>,
    /// Mask seed.
    pub seed: u64,
    /// `K/N`: keep slot K of N.
    pub slot: Option<String>,
    /// Globs of the tensors masked (all float tensors when empty).
    pub include: Vec<String>,
    /// Globs of tensors not masked.
    pub exclude: Vec<String>,
    /// Store NaN and infinite differences.
    pub allow_nonfinite: bool,
    /// Read the delta back once for its fingerprint (what `--json` reports).
    pub fingerprint_output: bool,
    /// Store the fine-tune folder's own files that differ from the base's (not `--no-files`).
    pub own_files: bool,
}

impl ExtractSpec {
    /// The defaults of the command line for these three paths.
    pub fn new(base: &Path, tuned: &Path, output: &Path) -> Self {
        ExtractSpec {
            base: base.into(),
            tuned: tuned.into(),
            output: output.into(),
            shard_size: "5GB".into(),
            density: None,
            seed: DEFAULT_SEED,
            slot: None,
            include: Vec::new(),
            exclude: Vec::new(),
            allow_nonfinite: false,
            fingerprint_output: false,
            own_files: true,
        }
    }

    /// The keep interval, and the slot as `K/N` when one was given.
    pub fn interval(&self) -> Result<(Interval, Option<String>)> {
        match &self.slot {
            Some(s) => {
                let (k, n) = parse_slot(s)?;
                let interval = Interval::from_slot(k, n, self.density)
                    .map_err(|e| usage(format!("--slot {s}: {e}")))?;
                Ok((interval, Some(format!("{k}/{n}"))))
            }
            None => Ok((
                Interval::from_density(self.density.unwrap_or(0.1))
                    .map_err(|e| usage(format!("--density: {e}")))?,
                None,
            )),
        }
    }
}

/// `K/N` in decimal digits and nothing else: no sign, no spaces (docs/RELIABILITY.md).
fn parse_slot(s: &str) -> Result<(u64, u64)> {
    let num = |t: &str| {
        (!t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
            .then(|| t.parse().ok())
            .flatten()
    };
    let parsed = s
        .split_once('/')
        .and_then(|(k, n)| Some((num(k)?, num(n)?)));
    parsed.ok_or_else(|| {
        usage(format!(
            "--slot {s:?}: expected K/N in decimal digits, e.g. 0/3"
        ))
    })
}

/// Extracts the delta `spec` asks for. `tuned`, when given, is the fine-tune already in memory
/// ([`Checkpoint::from_image`]), used instead of opening `spec.tuned`.
pub fn extract(
    spec: &ExtractSpec,
    tuned: Option<Checkpoint>,
    flags: &Flags,
) -> Result<Outcome<ExtractReport>> {
    let (interval, slot) = spec.interval()?;
    let selector =
        Selector::new(&spec.include, &spec.exclude).map_err(|e| usage(format!("{e:#}")))?;
    let target = target(&spec.output, &spec.shard_size, flags)?;
    let base = open_base(&spec.base, flags)?;
    let tuned = match tuned {
        Some(t) => Tuned::Checkpoint(t),
        None => Tuned::open(&spec.tuned, &base, flags.io)?,
    };
    let opts = ExtractOptions {
        seed: spec.seed,
        interval,
        slot,
        selector,
        allow_nonfinite: spec.allow_nonfinite,
        fingerprint_output: spec.fingerprint_output,
        own_files: spec.own_files,
    };
    let report = crate::extract::extract(&base, &tuned, &target, &opts)?;
    base.save_hashes();
    let warnings = report
        .inexact
        .iter()
        .map(|(name, n)| format!(
            "{}: tensor {name}: {n} kept element(s) cannot be reproduced exactly by the merge arithmetic (base far larger than the fine-tuned value, or -0.0); see docs/FORMAT.md section 8",
            spec.tuned.display()
        ))
        .collect();
    Ok(Outcome {
        report,
        warnings,
        notes: Vec::new(),
    })
}

/// `--part K/N`: K below N, N at least 1.
pub fn parse_part(s: &str) -> Result<Part> {
    let (k, n) = parse_slot(s).map_err(|_| {
        usage(format!(
            "--part {s:?}: expected K/N in decimal digits, e.g. 0/3"
        ))
    })?;
    if n == 0 || k >= n {
        return Err(usage(format!(
            "--part {s}: K must be below N (parts 0/{n} to {}/{n})",
            n.saturating_sub(1)
        )));
    }
    Ok(Part {
        k: k as usize,
        n: n as usize,
    })
}

/// What [`finalize`] did (`finalize --json`).
#[derive(Debug, serde::Serialize)]
pub struct FinalizeReport {
    /// The whole base's fingerprint, as the recipe records it.
    pub base_fingerprint: String,
    /// The model folder put together.
    pub output: String,
    /// Its files placed by `finalize`.
    pub outputs: Vec<String>,
    /// How many parts were gathered.
    pub parts: usize,
    /// Seconds taken.
    pub seconds: f64,
    /// How many shards the parts wrote.
    pub shards: usize,
}

/// Puts together the parts of a merge into `output` (`merge --part K/N`, each part written
/// on its own machine): checks that the parts merged the same inputs with the same
/// parameters, writes the index, recipe and model card, and moves the folder into place.
pub fn finalize(output: &Path, flags: &Flags) -> Result<Outcome<FinalizeReport>> {
    let start = std::time::Instant::now();
    let manifests = parts::gather(output)?;
    let dir = parts::parts_dir(output);
    let base_fingerprint = parts::base_fingerprint(&manifests)?;
    // Each part wrote the recipe as it saw it; the inputs and parameters must agree.
    let recipe_of = |m: &parts::Manifest| -> Result<Recipe> {
        let at = dir.join(m.part().manifest_name());
        let text = m
            .files
            .get(release::RECIPE_NAME)
            .with_context(|| format!("{}: records no recipe", at.display()))?;
        serde_json::from_str(text)
            .with_context(|| format!("{}: its recipe is not valid", at.display()))
    };
    let mut recipe = recipe_of(&manifests[0])?;
    for m in &manifests[1..] {
        if !recipe_of(m)?.same_merge(&recipe) {
            bail!(
                "{}: part {}/{} merged other inputs or parameters than part 0",
                dir.join(m.part().manifest_name()).display(),
                m.part,
                m.parts
            );
        }
    }
    recipe.whole_command();
    recipe.base.fingerprint = base_fingerprint;
    let base = recipe.base.locate();
    // A fine-tune's fingerprint covers an adapter's configuration, which needs the base.
    let base_ckpt = Checkpoint::open_with(&base, flags.io)?;
    for d in &mut recipe.deltas {
        let at = d.input.locate();
        d.input.fingerprint = match d.kind {
            None => Delta::open_with(&at, flags.io)?
                .checkpoint()
                .fingerprint()?,
            Some(_) => {
                d.base_fingerprint = recipe.base.fingerprint.clone();
                Tuned::open(&at, &base_ckpt, flags.io)?.fingerprint()?
            }
        };
    }
    let (files, warnings) = release::folder_files(&recipe, &base);
    let placed = parts::finalize(output, &manifests, &files, !flags.no_sync)?;
    let report = FinalizeReport {
        base_fingerprint: recipe.base.fingerprint,
        output: output.display().to_string(),
        outputs: placed.iter().map(|p| p.display().to_string()).collect(),
        parts: manifests.len(),
        seconds: start.elapsed().as_secs_f64(),
        shards: manifests.iter().map(|m| m.shards.len()).sum(),
    };
    Ok(Outcome {
        report,
        warnings,
        notes: Vec::new(),
    })
}

/// Summarizes `deltas` and compares each pair; cosines need `base`, and so does `subspaces`.
pub fn inspect(
    deltas: &[PathBuf],
    base: Option<&Path>,
    subspaces: bool,
    flags: &Flags,
) -> Result<InspectReport> {
    if subspaces && base.is_none() {
        return Err(usage("--subspaces needs --base"));
    }
    let deltas = deltas
        .iter()
        .map(|p| Delta::open_with(p, flags.io))
        .collect::<Result<Vec<_>>>()?;
    let base = base.map(|b| open_base(b, flags)).transpose()?;
    let report = crate::inspect::inspect(&deltas, base.as_ref(), subspaces)?;
    base.iter().for_each(Checkpoint::save_hashes);
    Ok(report)
}

/// Checks each delta against `base`; a delta that does not match is a verdict, not an error.
pub fn verify(base: &Path, deltas: &[PathBuf], flags: &Flags) -> Result<Vec<Verdict>> {
    let base = open_base(base, flags)?;
    let deltas = deltas
        .iter()
        .map(|p| Delta::open_with(p, flags.io))
        .collect::<Result<Vec<_>>>()?;
    let verdicts = crate::inspect::verify(&base, &deltas)?;
    base.save_hashes();
    Ok(verdicts)
}
