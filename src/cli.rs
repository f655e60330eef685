//! The command line: argument parsing and the text each subcommand prints.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use crate::dtype::Float;
use crate::extract::{ExtractOptions, Selector, extract};
use crate::format::Delta;
use crate::inspect::{human_bytes, inspect, verify};
use crate::io::parts::Part;
use crate::io::{Checkpoint, HashCache, IoMode, Target, companions, parse_size};
use crate::mask::{DEFAULT_SEED, Interval};
use crate::merge::{Device, MergeOptions, Method, check_method, merge_with_files};
use crate::release::{self, Operation, Recipe};

/// `println!` that stops quietly at a closed pipe instead of panicking.
macro_rules! out {
    ($($t:tt)*) => { emit(&format!("{}\n", format_args!($($t)*)))? };
}

/// Writes to standard output; a closed pipe (`sotu-delta inspect … | head`) ends the output
/// quietly rather than failing the command.
fn emit(s: &str) -> Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(s.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r.context("cannot write to standard output")?),
    }
}

/// The most worker threads `--threads` (or `RAYON_NUM_THREADS`) may ask for: more only adds
/// the cost of starting them (docs/RELIABILITY.md).
pub const MAX_THREADS: usize = 1024;

/// A mistake in the arguments: exit code 2.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

fn usage(msg: impl Into<String>) -> anyhow::Error {
    UsageError(msg.into()).into()
}

#[derive(Parser)]
#[command(
    name = "sotu-delta",
    version,
    about = "Sparse task deltas of model checkpoints (SoTU): extract, merge, apply, inspect, verify, finalize"
)]
struct Cli {
    /// Worker threads, 1 to 1024 (default: one per core).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Print nothing but errors and warnings.
    #[arg(long, short, global = true)]
    quiet: bool,
    /// Say more on standard error (e.g. why `--device auto` merges on the CPU).
    #[arg(long, short, global = true)]
    verbose: bool,
    /// Do not fsync outputs before renaming them into place (faster; a power loss may then
    /// leave an incomplete file at the output path, a crash of the process still does not).
    #[arg(long, global = true)]
    no_sync: bool,
    /// Hash the base again instead of taking its tensor hashes from the hash cache
    /// ($SOTU_DELTA_CACHE, else ~/.cache/sotu-delta; `SOTU_DELTA_CACHE=off` turns it off). See
    /// docs/RELIABILITY.md, "The hash cache".
    #[arg(long, global = true)]
    rehash: bool,
    /// How inputs are read: memory-mapped (mmap), or by positional reads into reused buffers
    /// (read: much faster on network filesystems such as NFS and Lustre). The same bytes
    /// either way.
    #[arg(long, global = true, value_enum, default_value_t = IoMode::Mmap)]
    io: IoMode,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Diff a fine-tuned checkpoint against its base and store a sparse, seeded delta.
    Extract(ExtractArgs),
    /// Add many deltas onto the base and write one merged checkpoint.
    Merge(MergeArgs),
    /// Add one delta onto the base: the fine-tune, exact at every kept element.
    Apply(ApplyArgs),
    /// Show what deltas hold, and how their masks collide and their values align.
    Inspect(InspectArgs),
    /// Check that deltas were taken against this base.
    Verify(VerifyArgs),
    /// Put together the parts of a merge written with `merge --part K/N -o OUT`: check them,
    /// write the index, model card and recipe, and move the folder into place.
    Finalize(FinalizeArgs),
}

#[derive(Args)]
struct FinalizeArgs {
    /// The output folder the parts were written for (`-o OUT` of `merge --part`).
    output: PathBuf,
    /// Print a JSON summary instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ExtractArgs {
    /// The pretrained base checkpoint (a .safetensors file or a model folder).
    #[arg(long)]
    base: PathBuf,
    /// The fine-tuned checkpoint (a .safetensors file or a model folder).
    #[arg(long)]
    tuned: PathBuf,
    /// The delta to write: a file when it ends in .safetensors or .st, else a folder (sharded by
    /// --shard-size).
    #[arg(short, long)]
    output: PathBuf,
    /// Largest shard of a folder output, e.g. 500MB or 2GiB.
    #[arg(long, value_name = "SIZE", default_value = "5GB")]
    shard_size: String,
    /// Fraction of elements kept (default 0.1, or the whole slot with --slot).
    #[arg(long)]
    density: Option<f64>,
    /// Mask seed; deltas given disjoint slots must share it.
    #[arg(long, default_value_t = DEFAULT_SEED)]
    seed: u64,
    /// Keep slot K of N (0-based): disjoint from the other slots under one seed.
    #[arg(long, value_name = "K/N")]
    slot: Option<String>,
    /// Mask only tensors matching this glob (repeatable; default all float tensors).
    #[arg(long, value_name = "GLOB")]
    include: Vec<String>,
    /// Do not mask tensors matching this glob; they are stored whole if they changed.
    #[arg(long, value_name = "GLOB")]
    exclude: Vec<String>,
    /// Store NaN and infinite differences instead of refusing the fine-tune.
    #[arg(long)]
    allow_nonfinite: bool,
    /// Do not store the fine-tune folder's own files (config, tokenizer, chat template) that
    /// differ from the base's.
    #[arg(long)]
    no_files: bool,
    /// Print a JSON summary instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct MergeArgs {
    /// The base checkpoint the deltas were taken against (a .safetensors file or a model folder).
    #[arg(long, required_unless_present = "recipe")]
    base: Option<PathBuf>,
    /// Deltas (files or folders), applied in this order.
    #[arg(required_unless_present = "recipe", num_args = 1..)]
    deltas: Vec<PathBuf>,
    /// Make the merge a recipe records (the sotu-delta.json of a merged folder) again: its
    /// inputs, refused if their fingerprints changed, and its parameters.
    #[arg(long, value_name = "FILE", conflicts_with_all = [
        "base", "deltas", "weights", "rescale", "method", "alpha", "trim", "dtype", "force",
        "shard_size", "files_from",
    ])]
    recipe: Option<PathBuf>,
    /// Write only part K of N (0-based) of a folder output's shards, into OUT.parts/, for a
    /// job array on a cluster; `sotu-delta finalize OUT` puts the parts together (docs/CLUSTER.md).
    #[arg(long, value_name = "K/N", conflicts_with = "recipe")]
    part: Option<String>,
    /// The checkpoint to write: a file when it ends in .safetensors or .st, else a model folder.
    #[arg(short, long)]
    output: PathBuf,
    /// One weight per delta, comma-separated (default all 1).
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    weights: Vec<f64>,
    /// Scale kept values by 1/density (DARE); with --method sum only.
    #[arg(long)]
    rescale: bool,
    /// How to merge (docs/METHODS.md): sum (the SoTU sum), or ties, iso, tsv, which act on
    /// each delta's unbiased estimate (kept differences / density).
    #[arg(long, value_enum, default_value_t = Method::Sum)]
    method: Method,
    /// ties, iso, tsv: scale the merged delta by A.
    #[arg(long, value_name = "A")]
    alpha: Option<f64>,
    /// ties: the fraction of each task's elements kept by magnitude, in (0, 1].
    #[arg(long, value_name = "K")]
    trim: Option<f64>,
    /// Take the config and tokenizer files of delta K (0 for the first) over the base's
    /// (default: the base's).
    #[arg(long, value_name = "K")]
    files_from: Option<usize>,
    #[command(flatten)]
    common: OutputArgs,
}

#[derive(Args)]
struct ApplyArgs {
    /// The base checkpoint the delta was taken against (a .safetensors file or a model folder).
    #[arg(long)]
    base: PathBuf,
    /// The delta (a file or a folder).
    delta: PathBuf,
    /// The checkpoint to write: a file when it ends in .safetensors or .st, else a model folder.
    #[arg(short, long)]
    output: PathBuf,
    /// Keep the kept values exact and the base elsewhere, instead of rescaling the kept
    /// differences by 1/density (the default, which rebuilds the fine-tune far better).
    #[arg(long)]
    no_rescale: bool,
    #[command(flatten)]
    common: OutputArgs,
}

#[derive(Args)]
struct OutputArgs {
    /// Output dtype of float tensors: f32, f16, bf16 or f64 (default: the base's).
    #[arg(long)]
    dtype: Option<String>,
    /// Merge even if a delta was taken against another base (says so, and records it).
    #[arg(long)]
    force: bool,
    /// Largest shard of a folder output, e.g. 500MB or 2GiB.
    #[arg(long, value_name = "SIZE", default_value = "5GB")]
    shard_size: String,
    /// Print a JSON summary instead of text.
    #[arg(long)]
    json: bool,
    /// Which backend computes the merge: CUDA when usable (auto), the CPU, or CUDA (failing
    /// without a usable GPU).
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
}

#[derive(Args)]
struct InspectArgs {
    /// Delta files.
    #[arg(required = true, num_args = 1..)]
    deltas: Vec<PathBuf>,
    /// The base, to compute cosines of deltas whose masks overlap.
    #[arg(long)]
    base: Option<PathBuf>,
    /// Also compare each pair's top singular subspaces, per 2-D tensor (needs --base; an SVD
    /// of every matrix of every delta, so minutes on a large model).
    #[arg(long, requires = "base")]
    subspaces: bool,
    /// Leave out the per-tensor table.
    #[arg(long)]
    summary: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct VerifyArgs {
    /// The base checkpoint.
    #[arg(long)]
    base: PathBuf,
    /// Delta files.
    #[arg(required = true, num_args = 1..)]
    deltas: Vec<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Parses `args` and runs the subcommand.
pub fn run(args: impl IntoIterator<Item = OsString>) -> Result<()> {
    let args: Vec<OsString> = args.into_iter().collect();
    // As a recipe and a model card record it: the program by its name, then the arguments.
    let command: Vec<String> = std::iter::once("sotu-delta".to_string())
        .chain(
            args.iter()
                .skip(1)
                .map(|a| a.to_string_lossy().into_owned()),
        )
        .collect();
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) if e.use_stderr() => {
            return Err(usage(
                e.to_string().trim_end().trim_start_matches("error: "),
            ));
        }
        Err(e) => {
            // --help and --version
            return emit(&e.to_string());
        }
    };
    if cli.threads.is_none()
        && let Some(n) = std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|v| v.trim().parse::<u128>().ok())
            .filter(|&n| n > MAX_THREADS as u128)
    {
        return Err(usage(format!(
            "RAYON_NUM_THREADS={n}: at most {MAX_THREADS} worker threads"
        )));
    }
    if let Some(n) = cli.threads {
        if n == 0 {
            return Err(usage("--threads must be at least 1"));
        }
        if n > MAX_THREADS {
            return Err(usage(format!(
                "--threads {n}: at most {MAX_THREADS} worker threads"
            )));
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()?;
    }
    crate::io::process::install_handlers();
    crate::io::process::return_freed_memory();
    let flags = Flags {
        command,
        quiet: cli.quiet,
        verbose: cli.verbose,
        no_sync: cli.no_sync,
        rehash: cli.rehash,
        io: cli.io,
    };
    match cli.command {
        Command::Extract(a) => run_extract(a, &flags),
        Command::Merge(a) => {
            let job = match a.recipe {
                Some(path) => MergeJob::replay(path, a.output, a.common)?,
                None => MergeJob {
                    operation: Operation::Merge,
                    base: a.base.expect("required without --recipe"),
                    deltas: a.deltas,
                    output: a.output,
                    opts: MergeOptions {
                        weights: a.weights,
                        rescale: a.rescale,
                        method: a.method,
                        alpha: a.alpha.unwrap_or(1.0),
                        trim: a.trim.unwrap_or(0.2),
                        files_from: a.files_from,
                        ..MergeOptions::default()
                    },
                    common: a.common,
                    replay: None,
                    part: None,
                },
            };
            let part = a.part.as_deref().map(parse_part).transpose()?;
            run_merge(MergeJob { part, ..job }, &flags)
        }
        Command::Apply(a) => {
            // The one delta's unbiased estimate by default (docs/METHODS.md, README).
            // The fine-tune's own files replace the base's (docs/FORMAT.md section 13).
            let job = MergeJob {
                operation: Operation::Apply,
                base: a.base,
                deltas: vec![a.delta],
                output: a.output,
                opts: MergeOptions {
                    rescale: !a.no_rescale,
                    files_from: Some(0),
                    ..MergeOptions::default()
                },
                common: a.common,
                replay: None,
                part: None,
            };
            run_merge(job, &flags)
        }
        Command::Inspect(a) => run_inspect(a, &flags),
        Command::Verify(a) => run_verify(a, &flags),
        Command::Finalize(a) => run_finalize(a, &flags),
    }
}

/// The global flags that shape how a subcommand reports and writes.
struct Flags {
    /// The command line, for the recipe and the model card.
    command: Vec<String>,
    quiet: bool,
    verbose: bool,
    no_sync: bool,
    rehash: bool,
    /// How every input is read (`--io`).
    io: IoMode,
}

impl Flags {
    /// Opens checkpoint `path` as `--io` says.
    fn checkpoint(&self, path: &Path) -> Result<Checkpoint> {
        Checkpoint::open_with(path, self.io)
    }

    /// Opens base checkpoint `path` as `--io` says, with the hash cache attached unless it
    /// is turned off.
    fn base(&self, path: &Path) -> Result<Checkpoint> {
        let base = self.checkpoint(path)?;
        Ok(match HashCache::from_env(self.rehash) {
            Some(cache) => base.with_hash_cache(cache),
            None => base,
        })
    }

    /// Opens the deltas `paths` as `--io` says.
    fn deltas(&self, paths: &[PathBuf]) -> Result<Vec<Delta>> {
        paths.iter().map(|p| Delta::open_with(p, self.io)).collect()
    }
}

/// The output target of `-o path` with `--shard-size size`.
fn target(path: &Path, shard_size: &str, flags: &Flags) -> Result<Target> {
    let mut t = Target::new(path);
    t.durable = !flags.no_sync;
    t.progress = !flags.quiet;
    t.shard_size = parse_size(shard_size).map_err(|e| usage(format!("--shard-size: {e:#}")))?;
    Ok(t)
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

/// `--part K/N`: K below N, N at least 1.
fn parse_part(s: &str) -> Result<Part> {
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

/// Where the parts of `output` are gathered.
fn release_parts_dir(output: &Path) -> PathBuf {
    crate::io::parts::parts_dir(output)
}

fn run_finalize(a: FinalizeArgs, flags: &Flags) -> Result<()> {
    use crate::io::parts;
    let start = std::time::Instant::now();
    let out = a.output.as_path();
    let manifests = parts::gather(out)?;
    let dir = parts::parts_dir(out);
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
    for d in &mut recipe.deltas {
        let delta = Delta::open_with(&d.input.locate(), flags.io)?;
        d.input.fingerprint = delta.checkpoint().fingerprint()?;
    }
    let base = recipe.base.locate();
    let (files, warnings) = release::folder_files(&recipe, &base);
    for w in warnings {
        eprintln!("sotu-delta: warning: {w}");
    }
    let placed = parts::finalize(out, &manifests, &files, !flags.no_sync)?;
    let shards: usize = manifests.iter().map(|m| m.shards.len()).sum();
    if a.json {
        let files: Vec<String> = placed.iter().map(|p| p.display().to_string()).collect();
        let summary = serde_json::json!({
            "output": out.display().to_string(),
            "parts": manifests.len(),
            "shards": shards,
            "outputs": files,
            "base_fingerprint": recipe.base.fingerprint,
            "seconds": start.elapsed().as_secs_f64(),
        });
        emit(&format!("{}\n", serde_json::to_string_pretty(&summary)?))?;
    } else if !flags.quiet {
        out!(
            "finalize: {} parts, {} shards -> {}\n  base fingerprint {}",
            manifests.len(),
            shards,
            out.display(),
            recipe.base.fingerprint
        );
    }
    Ok(())
}

fn run_extract(a: ExtractArgs, flags: &Flags) -> Result<()> {
    let mut slot = None;
    let interval = match &a.slot {
        Some(s) => {
            let (k, n) = parse_slot(s)?;
            slot = Some(format!("{k}/{n}"));
            Interval::from_slot(k, n, a.density).map_err(|e| usage(format!("--slot {s}: {e}")))?
        }
        None => Interval::from_density(a.density.unwrap_or(0.1))
            .map_err(|e| usage(format!("--density: {e}")))?,
    };
    let selector = Selector::new(&a.include, &a.exclude).map_err(|e| usage(format!("{e:#}")))?;
    let target = target(&a.output, &a.shard_size, flags)?;
    let base = flags.base(&a.base)?;
    let tuned = flags.checkpoint(&a.tuned)?;
    let opts = ExtractOptions {
        seed: a.seed,
        interval,
        slot: slot.clone(),
        selector,
        allow_nonfinite: a.allow_nonfinite,
        fingerprint_output: a.json,
        own_files: !a.no_files,
    };
    let r = extract(&base, &tuned, &target, &opts)?;
    base.save_hashes();
    for (name, n) in &r.inexact {
        eprintln!(
            "sotu-delta: warning: {}: tensor {name}: {n} kept element(s) cannot be reproduced exactly by the merge arithmetic (base far larger than the fine-tuned value, or -0.0); see docs/FORMAT.md section 8",
            a.tuned.display()
        );
    }
    if a.json {
        emit(&format!("{}\n", serde_json::to_string_pretty(&r)?))?;
    } else if !flags.quiet {
        out!(
            "extract: {} vs {} -> {}\n  seed {}  density {:.6}  interval [{}, {}){}\n  tensors: {} masked, {} whole, {} same as base\n  kept {} of {} masked elements ({:.4})\n  wrote {} of dense {} ({:.2}%) in {:.3} s ({:.1} MB/s read)",
            a.base.display(),
            a.tuned.display(),
            a.output.display(),
            a.seed,
            interval.density(),
            interval.lo(),
            interval.hi(),
            slot.map(|s| format!(", slot {s}")).unwrap_or_default(),
            r.masked,
            r.whole,
            r.same,
            r.kept,
            r.masked_elems,
            r.kept as f64 / r.masked_elems.max(1) as f64,
            human_bytes(r.output_bytes),
            human_bytes(r.dense_bytes),
            100.0 * r.output_bytes as f64 / r.dense_bytes.max(1) as f64,
            r.seconds,
            r.input_bytes as f64 / 1e6 / r.seconds.max(1e-9),
        );
        for g in &r.grown {
            out!("  grown: {} {:?} -> {:?}", g.name, g.base_shape, g.shape);
        }
        if !r.files.is_empty() {
            out!("  own files: {}", r.files.join(", "));
        }
    }
    Ok(())
}

/// One merge or apply to run.
struct MergeJob {
    operation: Operation,
    base: PathBuf,
    deltas: Vec<PathBuf>,
    output: PathBuf,
    opts: MergeOptions,
    common: OutputArgs,
    /// The recipe replayed, and its path: its inputs must still match it.
    replay: Option<(PathBuf, Recipe)>,
    /// `--part K/N`.
    part: Option<Part>,
}

impl MergeJob {
    /// The merge that recipe `path` records, into `output`.
    fn replay(path: PathBuf, output: PathBuf, common: OutputArgs) -> Result<MergeJob> {
        let recipe = Recipe::read(&path)?;
        Ok(MergeJob {
            operation: recipe.operation,
            base: recipe.base.locate(),
            deltas: recipe.deltas.iter().map(|d| d.input.locate()).collect(),
            output,
            opts: recipe.options(&path)?,
            common,
            replay: Some((path, recipe)),
            part: None,
        })
    }
}

fn run_merge(job: MergeJob, flags: &Flags) -> Result<()> {
    let MergeJob {
        operation,
        base: base_path,
        deltas: delta_paths,
        output,
        opts,
        common,
        replay,
        part,
    } = job;
    let (base_path, output) = (base_path.as_path(), output.as_path());
    let weights = &opts.weights;
    if !weights.is_empty() && weights.len() != delta_paths.len() {
        return Err(usage(format!(
            "--weights has {} values for {} deltas; give one per delta",
            weights.len(),
            delta_paths.len()
        )));
    }
    if let Some(w) = weights.iter().find(|w| !w.is_finite()) {
        return Err(usage(format!("--weights: {w} is not a finite number")));
    }
    check_method(&opts, delta_paths.len()).map_err(|e| usage(format!("{e:#}")))?;
    if let Some(k) = opts.files_from.filter(|&k| k >= delta_paths.len()) {
        return Err(usage(format!(
            "--files-from {k}: there are {} deltas, numbered from 0",
            delta_paths.len()
        )));
    }
    let dtype = common
        .dtype
        .as_deref()
        .map(Float::parse)
        .transpose()
        .map_err(|e| usage(format!("--dtype: {e}")))?;
    let mut target = target(output, &common.shard_size, flags)?;
    if let Some((_, recipe)) = &replay {
        target.shard_size = recipe.parameters.shard_size;
    }
    if let Some(p) = part {
        if !target.is_folder() {
            return Err(usage(format!(
                "--part: {} is a single file; parts are of a model folder's shards",
                output.display()
            )));
        }
        target.part = Some(p);
    }
    let base = flags.base(base_path)?;
    let deltas = flags.deltas(&delta_paths)?;
    warn_of_repeated_deltas(&deltas);
    if base.is_folder() {
        target.copy_from = Some(base_path.to_path_buf());
        if target.is_folder() {
            for sub in companions(base_path)?.checkpoints {
                eprintln!(
                    "sotu-delta: warning: {}: a checkpoint of its own, which the deltas do not cover: copied unchanged",
                    base_path.join(sub).display()
                );
            }
        }
    }
    let opts = MergeOptions {
        dtype: dtype.or(opts.dtype),
        force: common.force || opts.force,
        device: common.device,
        fingerprint_output: common.json,
        ..opts
    };
    // A folder gets a recipe, which records each delta's fingerprint; a replay checks them
    // before anything is merged.
    // A part leaves them to `finalize`, which hashes each delta once.
    let delta_fingerprints = if (target.is_folder() && part.is_none()) || replay.is_some() {
        use rayon::prelude::*;
        let fps = deltas
            .par_iter()
            .map(|d| d.checkpoint().fingerprint())
            .collect::<Vec<_>>()
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        if let Some((path, recipe)) = &replay {
            for (d, fp) in recipe.deltas.iter().zip(&fps) {
                d.input.check(fp, path)?;
            }
        }
        fps
    } else {
        Vec::new()
    };
    let folder = target.is_folder();
    let files = |base_fingerprint: &str| -> Result<Vec<(String, Vec<u8>)>> {
        if let Some((path, recipe)) = &replay {
            recipe.base.check(base_fingerprint, path)?;
        }
        if !folder {
            return Ok(Vec::new());
        }
        // A part read a part of the base: `finalize` records the whole base's fingerprint.
        let base_fingerprint = if part.is_some() { "" } else { base_fingerprint };
        let recipe = Recipe::new(
            operation,
            flags.command.clone(),
            &base,
            base_fingerprint,
            &deltas,
            &delta_fingerprints,
            &opts,
            target.shard_size,
        );
        let (files, warnings) = release::folder_files(&recipe, base_path);
        for w in warnings {
            eprintln!("sotu-delta: warning: {w}");
        }
        Ok(files)
    };
    let r = merge_with_files(&base, &deltas, &target, &opts, &files)?;
    let output = match part {
        Some(_) => release_parts_dir(output),
        None => output.to_path_buf(),
    };
    let output = output.as_path();
    base.save_hashes();
    if flags.verbose && matches!(opts.method, Method::Iso | Method::Tsv) && r.device != "cpu" {
        eprintln!(
            "sotu-delta: --method {}: computed on the CPU (the GPU kernels are for sum and ties)",
            opts.method.name()
        );
    }
    if flags.verbose && common.device == Device::Auto {
        match &r.cpu_because {
            None => eprintln!(
                "sotu-delta: --device auto: merging on CUDA ({})",
                r.device.trim_start_matches("cuda: ")
            ),
            Some(why) => eprintln!("sotu-delta: --device auto: merging on the CPU: {why}"),
        }
    }
    if !r.mismatches.is_empty() {
        eprintln!(
            "sotu-delta: warning: --force: merged onto a base that differs from the deltas' base in {} tensor(s), e.g. {}",
            r.mismatches.len(),
            r.mismatches[0]
        );
    }
    report_own_files(&deltas, output, &opts, &r, flags);
    for (name, n) in &r.overflowed {
        eprintln!(
            "sotu-delta: warning: {}: tensor {name}: {n} element(s) are infinite or NaN where the base is finite (an overflow of the output dtype or of the arithmetic, or a non-finite value in a delta)",
            output.display()
        );
    }
    if common.json {
        emit(&format!("{}\n", serde_json::to_string_pretty(&r)?))?;
    } else if !flags.quiet {
        out!(
            "{}: {} delta(s) onto {} -> {}\n  {} tensors ({} changed), wrote {}, read {}\n  {:.3} s: {:.1} MB/s of output, {:.1} MB/s of input\n  device: {}",
            match part {
                Some(p) => format!("merge part {}/{}", p.k, p.n),
                None if delta_paths.len() == 1 => "apply".into(),
                None => "merge".into(),
            },
            delta_paths.len(),
            base_path.display(),
            output.display(),
            r.tensors,
            r.changed,
            human_bytes(r.output_bytes),
            human_bytes(r.input_bytes),
            r.seconds,
            r.output_bytes as f64 / 1e6 / r.seconds.max(1e-9),
            r.input_bytes as f64 / 1e6 / r.seconds.max(1e-9),
            r.device,
        );
    }
    Ok(())
}

/// Says what became of the deltas' own files (docs/FORMAT.md section 13): left out of a
/// single-file output, or not taken (a note, or a warning where the output has a delta's
/// grown vocabulary but not its tokenizer and config).
fn report_own_files(
    deltas: &[Delta],
    output: &Path,
    opts: &MergeOptions,
    r: &crate::merge::MergeReport,
    flags: &Flags,
) {
    if let Some(k) = opts.files_from
        && !r.files_left_out.is_empty()
    {
        eprintln!(
            "sotu-delta: warning: {}: a single-file output holds no files: the own files of {} ({}) were left out; write to a folder to have them",
            output.display(),
            deltas[k].path().display(),
            r.files_left_out.join(", ")
        );
    }
    if !crate::io::is_folder_path(output) {
        return;
    }
    if opts.files_from.is_none() && !flags.quiet {
        for (k, d) in deltas.iter().enumerate() {
            if !d.own_files().is_empty() {
                let names: Vec<&str> = d.own_files().keys().map(String::as_str).collect();
                eprintln!(
                    "sotu-delta: note: {} carries its fine-tune's own files ({}); the output keeps the base's. Pass --files-from {k} to take them",
                    d.path().display(),
                    names.join(", ")
                );
            }
        }
    }
    let mut by_delta: std::collections::BTreeMap<usize, Vec<&str>> = Default::default();
    for (name, k) in &r.grown {
        by_delta.entry(*k).or_default().push(name);
    }
    for (k, names) in by_delta {
        let (delta, names) = (deltas[k].path().display(), names.join(", "));
        if opts.files_from != Some(k) {
            eprintln!(
                "sotu-delta: warning: {}: {names} hold the rows that {delta} adds for new tokens, but the output's config and tokenizer files are not that fine-tune's and do not know them. Pass --files-from {k}",
                output.display(),
            );
        } else if deltas[k].own_files().is_empty() {
            eprintln!(
                "sotu-delta: warning: {}: {names} hold the rows that {delta} adds for new tokens, but that delta carries no config or tokenizer files (extracted from a single file, or with --no-files): the output's are the base's, which do not know them",
                output.display(),
            );
        }
    }
}

/// Warns of a delta given twice (the same file, under any path): its changes are added twice,
/// which is seldom meant (`--weights` scales a delta).
fn warn_of_repeated_deltas(deltas: &[Delta]) {
    use std::os::unix::fs::MetadataExt;
    let id = |d: &Delta| {
        let m = std::fs::metadata(d.path()).ok()?;
        Some((m.dev(), m.ino()))
    };
    let ids: Vec<_> = deltas.iter().map(id).collect();
    for (j, d) in deltas.iter().enumerate() {
        if let Some(i) = (0..j).find(|&i| ids[i].is_some() && ids[i] == ids[j]) {
            eprintln!(
                "sotu-delta: warning: {}: the same delta as {}, given twice: its changes are added twice (--weights scales a delta)",
                d.path().display(),
                deltas[i].path().display()
            );
        }
    }
}

fn run_inspect(a: InspectArgs, flags: &Flags) -> Result<()> {
    let deltas = flags.deltas(&a.deltas)?;
    let base = a.base.as_deref().map(|p| flags.base(p)).transpose()?;
    let r = inspect(&deltas, base.as_ref(), a.subspaces)?;
    base.iter().for_each(Checkpoint::save_hashes);
    if a.json {
        emit(&format!("{}\n", serde_json::to_string_pretty(&r)?))?;
    } else {
        emit(&r.render(!a.summary))?;
    }
    Ok(())
}

fn run_verify(a: VerifyArgs, flags: &Flags) -> Result<()> {
    let base = flags.base(&a.base)?;
    let deltas = flags.deltas(&a.deltas)?;
    let verdicts = verify(&base, &deltas)?;
    base.save_hashes();
    if a.json {
        emit(&format!("{}\n", serde_json::to_string_pretty(&verdicts)?))?;
    } else {
        for v in &verdicts {
            out!(
                "{}: {} against {} ({} tensor(s) match)",
                v.file,
                if v.ok { "OK" } else { "MISMATCH" },
                a.base.display(),
                v.matched.len()
            );
            for n in &v.mismatched {
                out!("  differs:         {n}");
            }
            for n in &v.missing_in_base {
                out!("  missing in base: {n}");
            }
            for n in &v.unknown_to_delta {
                out!("  not in delta:    {n}");
            }
        }
    }
    let bad: Vec<&str> = verdicts
        .iter()
        .filter(|v| !v.ok)
        .map(|v| v.file.as_str())
        .collect();
    if !bad.is_empty() {
        anyhow::bail!(
            "{}: does not match the base {}",
            bad.join(", "),
            a.base.display()
        );
    }
    Ok(())
}
