//! The command line: argument parsing and the text each subcommand prints.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::dtype::Float;
use crate::extract::{ExtractOptions, Selector, extract};
use crate::format::Delta;
use crate::inspect::{human_bytes, inspect, verify};
use crate::io::{Checkpoint, HashCache};
use crate::io::{Target, parse_size};
use crate::mask::{DEFAULT_SEED, Interval};
use crate::merge::{Device, FineTune, Input, MergeOptions, Method, check_method, merge};
use crate::tuned::Tuned;

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
    about = "Sparse task deltas of model checkpoints (SoTU): extract, merge, apply, inspect, verify"
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
}

#[derive(Args)]
struct ExtractArgs {
    /// The pretrained base checkpoint (a .safetensors file or a model folder).
    #[arg(long)]
    base: PathBuf,
    /// The fine-tuned checkpoint (a .safetensors file or a model folder), or a PEFT LoRA
    /// adapter folder of the base.
    #[arg(long)]
    tuned: PathBuf,
    /// The delta to write: a .safetensors file, or else a folder (sharded by --shard-size).
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
    #[arg(long, required_unless_present = "config")]
    base: Option<PathBuf>,
    /// A mergekit configuration (YAML): base_model, models, merge_method and parameters, in
    /// place of --base, the inputs and the method's options (docs/MERGEKIT.md).
    #[arg(long, value_name = "YAML")]
    config: Option<PathBuf>,
    /// Deltas (files or folders), applied in the order given, among the fine-tunes.
    #[arg(num_args = 0..)]
    deltas: Vec<PathBuf>,
    /// A fine-tune of the base (a checkpoint file or folder, or a PEFT LoRA adapter folder),
    /// whose delta is taken as it is read, as extract would store it (repeatable).
    #[arg(long, value_name = "PATH")]
    tuned: Vec<PathBuf>,
    /// --tuned: fraction of each fine-tune's elements kept (default 1, or the whole slot with
    /// --slots). With --config, each model's density is the configuration's.
    #[arg(long, value_name = "D")]
    density: Option<f64>,
    /// --tuned: fine-tune t (from 0) is masked with seed S + t, or all with seed S under --slots.
    #[arg(long, value_name = "S")]
    seed: Option<u64>,
    /// --tuned: mask fine-tune t of T with slot t/T of one seed: disjoint masks.
    #[arg(long)]
    slots: bool,
    /// --tuned: merge fine-tunes that hold NaN or infinite values (extract's flag).
    #[arg(long)]
    allow_nonfinite: bool,
    /// The checkpoint to write: a .safetensors file, or else a model folder.
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
    /// The delta (a file or a folder), or a PEFT LoRA adapter folder of the base.
    delta: PathBuf,
    /// The checkpoint to write: a .safetensors file, or else a model folder.
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
    let parsed = Cli::command()
        .try_get_matches_from(args)
        .and_then(|m| Ok((Cli::from_arg_matches(&m)?, m)));
    let (cli, matches) = match parsed {
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
        quiet: cli.quiet,
        verbose: cli.verbose,
        no_sync: cli.no_sync,
        rehash: cli.rehash,
    };
    match cli.command {
        Command::Extract(a) => run_extract(a, &flags),
        Command::Merge(a) => {
            let m = matches
                .subcommand_matches("merge")
                .expect("the merge subcommand");
            if let Some(config) = &a.config {
                let (base, inputs, opts) = from_config(&a, m, config)?;
                return run_merge(&base, &inputs, &a.output, opts, a.common, &flags);
            }
            let inputs = merge_inputs(&a, &input_order(m))?;
            let opts = MergeOptions {
                weights: a.weights,
                rescale: a.rescale,
                method: a.method,
                alpha: a.alpha.unwrap_or(1.0),
                trim: a.trim.unwrap_or(0.2),
                files_from: a.files_from,
                ..MergeOptions::default()
            };
            let base = a.base.expect("required without --config");
            run_merge(&base, &inputs, &a.output, opts, a.common, &flags)
        }
        Command::Apply(a) => {
            // The one delta's unbiased estimate by default (docs/METHODS.md, README).
            // The fine-tune's own files replace the base's (docs/FORMAT.md section 13).
            let opts = MergeOptions {
                rescale: !a.no_rescale,
                files_from: Some(0),
                ..MergeOptions::default()
            };
            let path = a.delta.clone();
            let input = if crate::tuned::lora::is_adapter(&path) {
                InputArg::Tuned {
                    path,
                    seed: DEFAULT_SEED,
                    interval: Interval::from_density(1.0)?,
                    slot: None,
                    allow_nonfinite: false,
                }
            } else {
                InputArg::Delta(path)
            };
            run_merge(&a.base, &[input], &a.output, opts, a.common, &flags)
        }
        Command::Inspect(a) => run_inspect(a, &flags),
        Command::Verify(a) => run_verify(a, &flags),
    }
}

/// The global flags that shape how a subcommand reports and writes.
struct Flags {
    quiet: bool,
    verbose: bool,
    no_sync: bool,
    rehash: bool,
}

/// Opens a base checkpoint with the hash cache attached, unless it is turned off.
fn open_base(path: &Path, flags: &Flags) -> Result<Checkpoint> {
    let base = Checkpoint::open(path)?;
    Ok(match HashCache::from_env(flags.rehash) {
        Some(cache) => base.with_hash_cache(cache),
        None => base,
    })
}

/// One input of `merge` as the command line gives it.
enum InputArg {
    /// A delta file or folder.
    Delta(PathBuf),
    /// A fine-tune (`--tuned`) and the mask its delta is taken with.
    Tuned {
        path: PathBuf,
        seed: u64,
        interval: Interval,
        slot: Option<String>,
        allow_nonfinite: bool,
    },
}

impl InputArg {
    fn path(&self) -> &Path {
        match self {
            InputArg::Delta(p) | InputArg::Tuned { path: p, .. } => p,
        }
    }

    /// Opens the input over `base`.
    fn open<'b>(&self, base: &'b Checkpoint) -> Result<Input<'b>> {
        Ok(match self {
            InputArg::Delta(p) => Input::Delta(Delta::open(p)?),
            InputArg::Tuned {
                path,
                seed,
                interval,
                slot,
                allow_nonfinite,
            } => {
                let tuned = Tuned::open(path, base)?;
                // The own files extract would store (a fine-tune folder's), for --files-from.
                let own_files = crate::extract::files::own_files(base, tuned.checkpoint())?;
                Input::Tuned(FineTune::new(
                    base,
                    tuned,
                    *seed,
                    *interval,
                    slot.clone(),
                    *allow_nonfinite,
                    own_files,
                )?)
            }
        })
    }
}

/// Whether each input of `merge` is a delta (`false`) or a fine-tune (`true`), in command-line
/// order: positional deltas and `--tuned` may be mixed, and weights follow this order.
fn input_order(m: &clap::ArgMatches) -> Vec<bool> {
    let at = |id: &str| -> Vec<usize> { m.indices_of(id).map(|i| i.collect()).unwrap_or_default() };
    let mut all: Vec<(usize, bool)> = at("deltas")
        .into_iter()
        .map(|i| (i, false))
        .chain(at("tuned").into_iter().map(|i| (i, true)))
        .collect();
    all.sort();
    all.into_iter().map(|(_, t)| t).collect()
}

/// `merge --config`: the base, the inputs and the options a mergekit configuration gives
/// ([`crate::mergekit`]). The options it takes the place of are usage errors beside it; the
/// fine-tunes are masked as `--tuned` ones are (`--seed`, `--slots`), each at its model's
/// density.
fn from_config(
    a: &MergeArgs,
    m: &clap::ArgMatches,
    config: &Path,
) -> Result<(PathBuf, Vec<InputArg>, MergeOptions)> {
    let given = |id: &str| m.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
    let taken = [
        "base", "deltas", "tuned", "weights", "rescale", "method", "alpha", "trim", "density",
    ];
    if let Some(id) = taken.iter().find(|id| given(id)) {
        let flag = if *id == "deltas" {
            "delta files".to_string()
        } else {
            format!("--{id}")
        };
        return Err(usage(format!(
            "{flag}: with --config, the configuration gives the base, the models and the method's parameters"
        )));
    }
    if a.common.dtype.is_some() {
        return Err(usage(
            "--dtype: with --config, the configuration's dtype and out_dtype give the output dtype",
        ));
    }
    let c = crate::mergekit::read(config)?;
    for w in &c.warnings {
        eprintln!("sotu-delta: warning: {w}");
    }
    // A model without a density: the method's default, or under --slots its whole slot.
    let fallback = if a.slots { 1.0 } else { c.density };
    let specs: Vec<(PathBuf, Option<f64>)> = c
        .inputs
        .iter()
        .map(|i| {
            (
                i.path.clone(),
                (!i.delta_file).then(|| i.density.unwrap_or(fallback)),
            )
        })
        .collect();
    let inputs = mask_fine_tunes(
        &specs,
        a.seed.unwrap_or(DEFAULT_SEED),
        a.slots,
        a.allow_nonfinite,
    )?;
    let opts = MergeOptions {
        weights: c.inputs.iter().map(|i| i.weight).collect(),
        rescale: c.rescale,
        method: c.method,
        alpha: c.alpha,
        trim: c.trim,
        normalize: c.normalize,
        dtype: c.dtype,
        mergekit: Some((
            config
                .file_name()
                .map_or(String::new(), |f| f.to_string_lossy().into_owned()),
            c.merge_method.clone(),
        )),
        ..MergeOptions::default()
    };
    Ok((c.base, inputs, opts))
}

/// The inputs given as (path, density): a delta file when the density is `None`, else a
/// fine-tune, which fine-tune t (counting the fine-tunes from 0) masked with seed S + t at its
/// density, or with slot t/T of seed S under `slots` (a density of 1 then meaning the whole
/// slot).
fn mask_fine_tunes(
    specs: &[(PathBuf, Option<f64>)],
    seed: u64,
    slots: bool,
    allow_nonfinite: bool,
) -> Result<Vec<InputArg>> {
    let count = specs.iter().filter(|s| s.1.is_some()).count() as u64;
    let mut t = 0u64;
    let mut inputs = Vec::with_capacity(specs.len());
    for (path, density) in specs {
        let Some(density) = *density else {
            inputs.push(InputArg::Delta(path.clone()));
            continue;
        };
        let (seed, interval, slot) = if slots {
            let narrow = (density != 1.0).then_some(density);
            let interval = Interval::from_slot(t, count, narrow)
                .map_err(|e| usage(format!("--slots: fine-tune {t} of {count}: {e}")))?;
            (seed, interval, Some(format!("{t}/{count}")))
        } else {
            let seed = seed.checked_add(t).ok_or_else(|| {
                usage(format!(
                    "--seed {seed}: fine-tune {t} would be masked with seed {seed} + {t}, past the largest seed"
                ))
            })?;
            let interval =
                Interval::from_density(density).map_err(|e| usage(format!("--density: {e}")))?;
            (seed, interval, None)
        };
        inputs.push(InputArg::Tuned {
            path: path.clone(),
            seed,
            interval,
            slot,
            allow_nonfinite,
        });
        t += 1;
    }
    Ok(inputs)
}

/// The inputs of `merge`, in command-line order: fine-tune t (counting the fine-tunes from 0)
/// masked with seed S + t at `--density`, or with slot t/T of seed S under `--slots`.
fn merge_inputs(a: &MergeArgs, order: &[bool]) -> Result<Vec<InputArg>> {
    let tuned_flags = a.density.is_some() || a.seed.is_some() || a.slots || a.allow_nonfinite;
    if a.tuned.is_empty() && tuned_flags {
        return Err(usage(
            "--density, --seed, --slots and --allow-nonfinite say how --tuned fine-tunes are masked; give --tuned",
        ));
    }
    if a.deltas.is_empty() && a.tuned.is_empty() {
        return Err(usage(
            "give at least one delta, or a fine-tune with --tuned",
        ));
    }
    let (mut deltas, mut tuned) = (a.deltas.iter(), a.tuned.iter());
    let specs: Vec<(PathBuf, Option<f64>)> = order
        .iter()
        .map(|&is_tuned| {
            if is_tuned {
                let density = a.density.unwrap_or(1.0);
                (tuned.next().expect("counted").clone(), Some(density))
            } else {
                (deltas.next().expect("counted").clone(), None)
            }
        })
        .collect();
    mask_fine_tunes(
        &specs,
        a.seed.unwrap_or(DEFAULT_SEED),
        a.slots,
        a.allow_nonfinite,
    )
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
    let base = open_base(&a.base, flags)?;
    let tuned = Tuned::open(&a.tuned, &base)?;
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

fn run_merge(
    base_path: &Path,
    delta_paths: &[InputArg],
    output: &Path,
    opts: MergeOptions,
    common: OutputArgs,
    flags: &Flags,
) -> Result<()> {
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
    let base = open_base(base_path, flags)?;
    let deltas = delta_paths
        .iter()
        .map(|p| p.open(&base))
        .collect::<Result<Vec<_>>>()?;
    warn_of_repeated_deltas(&deltas);
    if base.is_folder() {
        target.copy_from = Some(base_path.to_path_buf());
    }
    let opts = MergeOptions {
        dtype,
        force: common.force,
        device: common.device,
        fingerprint_output: common.json,
        ..opts
    };
    let r = merge(&base, &deltas, &target, &opts)?;
    base.save_hashes();
    if flags.verbose && matches!(opts.method, Method::Iso | Method::Tsv) && r.device != "cpu" {
        eprintln!(
            "sotu-delta: --method {}: computed on the CPU (the GPU kernels are for sum and ties)",
            opts.method.name()
        );
    }
    if flags.verbose && r.fine_tune_tensors_on_cpu > 0 {
        eprintln!(
            "sotu-delta: {} tensor(s) that fine-tunes (--tuned) change were computed on the CPU: the GPU reads kept values from delta files only",
            r.fine_tune_tensors_on_cpu
        );
    }
    if flags.verbose {
        for (input, arg) in deltas.iter().zip(delta_paths) {
            if let InputArg::Tuned { .. } = arg {
                let p = input.params();
                eprintln!(
                    "sotu-delta: {}: delta taken on the fly with seed {}, interval [{}, {}) (density {:.6}{})",
                    arg.path().display(),
                    p.seed,
                    p.interval.lo(),
                    p.interval.hi(),
                    p.interval.density(),
                    p.slot
                        .as_ref()
                        .map(|s| format!(", slot {s}"))
                        .unwrap_or_default()
                );
            }
        }
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
            "{}: {} onto {} -> {}\n  {} tensors ({} changed), wrote {}, read {}\n  {:.3} s: {:.1} MB/s of output, {:.1} MB/s of input\n  device: {}",
            if delta_paths.len() == 1 {
                "apply"
            } else {
                "merge"
            },
            count_inputs(delta_paths),
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
    deltas: &[Input],
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

/// `3 delta(s)`, `2 fine-tune(s)`, or `1 delta(s) and 2 fine-tune(s)`.
fn count_inputs(inputs: &[InputArg]) -> String {
    let tuned = inputs
        .iter()
        .filter(|i| matches!(i, InputArg::Tuned { .. }))
        .count();
    match (inputs.len() - tuned, tuned) {
        (files, 0) => format!("{files} delta(s)"),
        (0, tuned) => format!("{tuned} fine-tune(s)"),
        (files, tuned) => format!("{files} delta(s) and {tuned} fine-tune(s)"),
    }
}

/// Warns of a delta given twice (the same file, under any path): its changes are added twice,
/// which is seldom meant (`--weights` scales a delta).
fn warn_of_repeated_deltas(deltas: &[Input]) {
    use std::os::unix::fs::MetadataExt;
    let id = |d: &Input| {
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
    let deltas = a
        .deltas
        .iter()
        .map(|p| Delta::open(p))
        .collect::<Result<Vec<_>>>()?;
    let base = a.base.as_deref().map(|b| open_base(b, flags)).transpose()?;
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
    let base = open_base(&a.base, flags)?;
    let deltas = a
        .deltas
        .iter()
        .map(|p| Delta::open(p))
        .collect::<Result<Vec<_>>>()?;
    let verdicts = verify(&base, &deltas);
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
