//! The command line: argument parsing and the text each subcommand prints.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::inspect::human_bytes;
use crate::io::IoMode;
use crate::mask::DEFAULT_SEED;
use crate::merge::{Device, Method};
use crate::ops::{
    ExtractSpec, FineTuneMasks, Flags, InputSpec, MergeSpec, Outcome, parse_part, usage,
};
use crate::release::Operation;

pub use crate::ops::{MAX_THREADS, UsageError};

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
    #[arg(long, required_unless_present_any = ["recipe", "config"])]
    base: Option<PathBuf>,
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
    /// A mergekit configuration (YAML): base_model, models, merge_method and parameters, in
    /// place of --base, the inputs and the method's options (docs/MERGEKIT.md).
    #[arg(long, value_name = "YAML", conflicts_with = "recipe")]
    config: Option<PathBuf>,
    /// Make the merge a recipe records (the sotu-delta.json of a merged folder) again: its
    /// inputs, refused if their fingerprints changed, and its parameters.
    #[arg(long, value_name = "FILE", conflicts_with_all = [
        "base", "deltas", "tuned", "density", "seed", "slots", "allow_nonfinite", "weights",
        "rescale", "method", "alpha", "trim", "dtype", "force", "shard_size", "files_from",
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
    /// The delta (a file or a folder), or a PEFT LoRA adapter folder of the base.
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
    crate::ops::check_threads(cli.threads)?;
    if let Some(n) = cli.threads {
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
        ..Flags::default()
    };
    match cli.command {
        Command::Extract(a) => run_extract(a, &flags),
        Command::Merge(a) => {
            let m = matches
                .subcommand_matches("merge")
                .expect("the merge subcommand");
            let stated = match (&a.recipe, &a.config) {
                (Some(path), _) => MergeSpec::replay(path)?,
                (None, Some(config)) => {
                    let (spec, warnings) =
                        MergeSpec::from_config(config, a.masks(), &given_beside_config(m))?;
                    for w in warnings {
                        eprintln!("sotu-delta: warning: {w}");
                    }
                    MergeSpec {
                        files_from: a.files_from,
                        ..spec
                    }
                }
                (None, None) => MergeSpec {
                    weights: a.weights.clone(),
                    rescale: a.rescale,
                    method: a.method,
                    alpha: a.alpha,
                    trim: a.trim,
                    files_from: a.files_from,
                    ..MergeSpec::listed(
                        a.base.as_deref().expect("required without --recipe"),
                        &listed_inputs(&a, m),
                        a.masks(),
                    )?
                },
            };
            let spec = MergeSpec {
                part: a.part.as_deref().map(parse_part).transpose()?,
                ..a.common.spec(stated)
            };
            run_merge(&spec, &a.output, &a.common, &flags)
        }
        Command::Apply(a) => {
            // The one delta's unbiased estimate by default (docs/METHODS.md, README).
            // The fine-tune's own files replace the base's (docs/FORMAT.md section 13).
            let spec = MergeSpec {
                rescale: !a.no_rescale,
                files_from: Some(0),
                operation: Operation::Apply,
                deltas: vec![InputSpec::applied(&a.delta)],
                ..MergeSpec::new(&a.base, &[])
            };
            let spec = a.common.spec(spec);
            run_merge(&spec, &a.output, &a.common, &flags)
        }
        Command::Inspect(a) => run_inspect(a, &flags),
        Command::Verify(a) => run_verify(a, &flags),
        Command::Finalize(a) => run_finalize(a, &flags),
    }
}

/// Runs the command line `args` (the program name first) and says how it ended, as the
/// `sotu-delta` binary and the Python package's `sotu-delta` command both exit: 0, 1 when the
/// operation failed (the message printed on standard error), 2 on bad usage.
pub fn main(args: impl IntoIterator<Item = OsString>) -> u8 {
    match run(args) {
        Ok(()) => 0,
        Err(e) => {
            if let Some(usage) = e.downcast_ref::<UsageError>() {
                eprintln!("sotu-delta: usage error: {usage}");
                return 2;
            }
            eprintln!("sotu-delta: error: {e:#}");
            1
        }
    }
}

/// Prints an outcome's notes and warnings on standard error.
fn warn<R>(outcome: &Outcome<R>) {
    for n in &outcome.notes {
        eprintln!("sotu-delta: {n}");
    }
    for w in &outcome.warnings {
        eprintln!("sotu-delta: warning: {w}");
    }
}

impl OutputArgs {
    /// The merge `stated` with these output flags.
    fn spec(&self, stated: MergeSpec) -> MergeSpec {
        MergeSpec {
            // `--config` gives a dtype of its own (and refuses --dtype).
            dtype: self.dtype.clone().or(stated.dtype.clone()),
            force: self.force,
            device: self.device,
            ..stated
        }
    }
}

fn run_finalize(a: FinalizeArgs, flags: &Flags) -> Result<()> {
    let outcome = crate::ops::finalize(&a.output, flags)?;
    warn(&outcome);
    let r = &outcome.report;
    if a.json {
        emit(&format!("{}\n", serde_json::to_string_pretty(r)?))?;
    } else if !flags.quiet {
        out!(
            "finalize: {} parts, {} shards -> {}\n  base fingerprint {}",
            r.parts,
            r.shards,
            a.output.display(),
            r.base_fingerprint
        );
    }
    Ok(())
}

fn run_extract(a: ExtractArgs, flags: &Flags) -> Result<()> {
    let spec = ExtractSpec {
        shard_size: a.shard_size,
        density: a.density,
        seed: a.seed,
        slot: a.slot,
        include: a.include,
        exclude: a.exclude,
        allow_nonfinite: a.allow_nonfinite,
        fingerprint_output: a.json,
        own_files: !a.no_files,
        ..ExtractSpec::new(&a.base, &a.tuned, &a.output)
    };
    let (interval, slot) = spec.interval()?;
    let outcome = crate::ops::extract(&spec, None, flags)?;
    warn(&outcome);
    let r = &outcome.report;
    if a.json {
        emit(&format!("{}\n", serde_json::to_string_pretty(r)?))?;
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
        if !r.subfolders.is_empty() {
            out!("  subfolder weight files: {}", r.subfolders.join(", "));
        }
    }
    Ok(())
}

fn run_merge(spec: &MergeSpec, output: &Path, common: &OutputArgs, flags: &Flags) -> Result<()> {
    let outcome = crate::ops::merge(spec, output, &common.shard_size, common.json, flags)?;
    warn(&outcome);
    let r = &outcome.report;
    let (base_path, delta_paths, part) = (&spec.base, &spec.deltas, spec.part);
    // A part's output is the folder its parts are gathered in.
    let output = match part {
        Some(_) => crate::io::parts::parts_dir(output),
        None => output.to_path_buf(),
    };
    if common.json {
        emit(&format!("{}\n", serde_json::to_string_pretty(r)?))?;
    } else if !flags.quiet {
        out!(
            "{}: {} onto {} -> {}\n  {} tensors ({} changed), wrote {}, read {}\n  {:.3} s: {:.1} MB/s of output, {:.1} MB/s of input\n  device: {}",
            match part {
                Some(p) => format!("merge part {}/{}", p.k, p.n),
                None if delta_paths.len() == 1 => "apply".into(),
                None => "merge".into(),
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
        if !r.subfolders.is_empty() {
            out!(
                "  subfolder weight files merged: {}",
                r.subfolders.join(", ")
            );
        }
    }
    Ok(())
}

/// "2 delta(s)", "1 fine-tune(s)", or both, for the summary line.
fn count_inputs(inputs: &[InputSpec]) -> String {
    let tuned = inputs
        .iter()
        .filter(|i| matches!(i, InputSpec::Tuned { .. }))
        .count();
    match (inputs.len() - tuned, tuned) {
        (files, 0) => format!("{files} delta(s)"),
        (0, tuned) => format!("{tuned} fine-tune(s)"),
        (files, tuned) => format!("{files} delta(s) and {tuned} fine-tune(s)"),
    }
}

/// The inputs of `merge` as `(path, is_fine_tune)`, in command-line order: positional deltas
/// and `--tuned` may be mixed, and weights follow this order.
fn listed_inputs(a: &MergeArgs, m: &clap::ArgMatches) -> Vec<(PathBuf, bool)> {
    let at = |id: &str| -> Vec<usize> { m.indices_of(id).map(|i| i.collect()).unwrap_or_default() };
    let mut all: Vec<(usize, PathBuf, bool)> = (at("deltas").into_iter().zip(&a.deltas))
        .map(|(i, p)| (i, p.clone(), false))
        .chain(
            at("tuned")
                .into_iter()
                .zip(&a.tuned)
                .map(|(i, p)| (i, p.clone(), true)),
        )
        .collect();
    all.sort_by_key(|(i, _, _)| *i);
    all.into_iter().map(|(_, p, t)| (p, t)).collect()
}

impl MergeArgs {
    /// How the `--tuned` fine-tunes are masked, as stated.
    fn masks(&self) -> FineTuneMasks {
        FineTuneMasks {
            density: self.density,
            seed: self.seed,
            slots: self.slots,
            allow_nonfinite: self.allow_nonfinite,
        }
    }
}

/// The options given on the command line that a mergekit configuration gives
/// ([`crate::ops::GIVEN_BY_CONFIG`]), refused beside `--config`.
fn given_beside_config(m: &clap::ArgMatches) -> Vec<&'static str> {
    let given = |id: &str| m.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
    let ids = crate::ops::GIVEN_BY_CONFIG.into_iter();
    ids.filter(|id| given(id)).collect()
}

fn run_inspect(a: InspectArgs, flags: &Flags) -> Result<()> {
    let r = crate::ops::inspect(&a.deltas, a.base.as_deref(), a.subspaces, flags)?;
    if a.json {
        emit(&format!("{}\n", serde_json::to_string_pretty(&r)?))?;
    } else {
        emit(&r.render(!a.summary))?;
    }
    Ok(())
}

fn run_verify(a: VerifyArgs, flags: &Flags) -> Result<()> {
    let verdicts = crate::ops::verify(&a.base, &a.deltas, flags)?;
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
