//! A merge (or an apply) as a user states it: [`MergeSpec`], checked into [`MergeOptions`],
//! run into a file or folder ([`merge`]) or into memory ([`merge_in_memory`]), with its warnings
//! and notes worded.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::{
    FineTuneMasks, Flags, InputSpec, Outcome, fine_tune_inputs, listed_inputs, open_base, target,
    usage,
};
use crate::dtype::Float;
use crate::io::parts::{self, Part};
use crate::io::{Checkpoint, Target, subfolder_weights};
use crate::mask::Interval;
use crate::merge::Input;
use crate::merge::{
    Device, MergeOptions, MergeReport, MergedInMemory, Method, check_method, merge_with_files,
};
use crate::release::{self, Operation, Recipe};

/// A merge as stated: the base, the deltas and how to combine them, whether it is written to a
/// file ([`merge`]) or kept in memory ([`merge_in_memory`]). An `apply` is a merge of one
/// delta with `rescale` (unless `--no-rescale`).
#[derive(Clone, Debug)]
pub struct MergeSpec {
    /// The base checkpoint.
    pub base: PathBuf,
    /// The deltas (delta files, and fine-tunes taken on the fly), in order.
    pub deltas: Vec<InputSpec>,
    /// One weight per delta (all 1 when empty).
    pub weights: Vec<f64>,
    /// Scale kept values by 1/density (`sum` only).
    pub rescale: bool,
    /// The merge method.
    pub method: Method,
    /// `ties`, `iso`, `tsv`: scale of the merged delta (1).
    pub alpha: Option<f64>,
    /// `ties`: fraction of each task's elements kept by magnitude (0.2).
    pub trim: Option<f64>,
    /// Output dtype of float tensors (`f32`, `f16`, `bf16`, `f64`; the base's when `None`).
    pub dtype: Option<String>,
    /// Merge even if a delta was taken against another base.
    pub force: bool,
    /// Which backend computes the merge.
    pub device: Device,
    /// The delta whose own files (config, tokenizer) a folder output takes over the base's
    /// (`--files-from`; 0 for `apply`).
    pub files_from: Option<usize>,
    /// What a folder output's recipe records: a merge or an apply.
    pub operation: Operation,
    /// The recipe replayed (`merge --recipe`) and its path: its options replace the ones
    /// above but `dtype`, `force` and `device`, and its inputs must still match it.
    pub replay: Option<(PathBuf, Recipe)>,
    /// `--part K/N`: write only this part of a folder output's shards ([`super::finalize`] puts the
    /// parts together).
    pub part: Option<Part>,
    /// `ties`: the disjoint mean (true) or the agreeing tasks' sum (a mergekit configuration's
    /// `normalize: false`).
    pub normalize: bool,
    /// A merge from a mergekit configuration: its file name and `merge_method`, for the record.
    pub mergekit: Option<(String, String)>,
    /// The mergekit configuration the merge was stated by ([`MergeSpec::from_config`]).
    pub config: Option<PathBuf>,
    /// How the fine-tunes among `deltas` were stated to be masked ([`MergeSpec::listed`],
    /// [`MergeSpec::from_config`]), for the command line a recipe records.
    pub masks: FineTuneMasks,
}

impl MergeSpec {
    /// The command line's defaults for this base and these deltas.
    pub fn new(base: &Path, deltas: &[PathBuf]) -> Self {
        MergeSpec {
            base: base.into(),
            deltas: deltas.iter().cloned().map(InputSpec::Delta).collect(),
            weights: Vec::new(),
            rescale: false,
            method: Method::Sum,
            alpha: None,
            trim: None,
            dtype: None,
            force: false,
            device: Device::Auto,
            files_from: None,
            operation: Operation::Merge,
            replay: None,
            part: None,
            normalize: true,
            mergekit: None,
            config: None,
            masks: FineTuneMasks::default(),
        }
    }

    /// The command line's defaults for this base and the inputs `listed` as `(path,
    /// is_fine_tune)` in the merge's order: delta files, and fine-tunes masked as `masks` says
    /// ([`listed_inputs`]).
    pub fn listed(base: &Path, listed: &[(PathBuf, bool)], masks: FineTuneMasks) -> Result<Self> {
        Ok(MergeSpec {
            deltas: listed_inputs(listed, &masks)?,
            masks,
            ..MergeSpec::new(base, &[])
        })
    }

    /// The merge a mergekit configuration states (docs/MERGEKIT.md): its base, models (a model
    /// that is a delta file is taken as one; the others are fine-tunes, masked as
    /// [`fine_tune_inputs`] says with the seed and slots of `masks`, each at its density), method
    /// and parameters; with the configuration's warnings. The configuration gives what
    /// `also_stated` names and `masks`' density, so each is a usage error beside it
    /// ([`refuse_beside_config`]).
    pub fn from_config(
        config: &Path,
        masks: FineTuneMasks,
        also_stated: &[&str],
    ) -> Result<(Self, Vec<String>)> {
        let density = masks.density.is_some().then_some("density");
        refuse_beside_config(config, also_stated.iter().copied().chain(density))?;
        let c = crate::mergekit::read(config)?;
        // A model without a density: the method's default, or under --slots its whole slot.
        let fallback = if masks.slots { 1.0 } else { c.density };
        let given: Vec<(PathBuf, Option<f64>)> = c
            .inputs
            .iter()
            .map(|i| {
                let density = (!i.delta_file).then(|| i.density.unwrap_or(fallback));
                (i.path.clone(), density)
            })
            .collect();
        let spec = MergeSpec {
            deltas: fine_tune_inputs(&given, masks.seed(), masks.slots, masks.allow_nonfinite)?,
            weights: c.inputs.iter().map(|i| i.weight).collect(),
            rescale: c.rescale,
            method: c.method,
            alpha: Some(c.alpha),
            trim: Some(c.trim),
            normalize: c.normalize,
            dtype: c.dtype.map(|f| f.name().to_string()),
            mergekit: Some((
                config
                    .file_name()
                    .map_or(String::new(), |f| f.to_string_lossy().into_owned()),
                c.merge_method.clone(),
            )),
            config: Some(config.to_path_buf()),
            masks,
            ..MergeSpec::new(&c.base, &[])
        };
        Ok((spec, c.warnings))
    }

    /// The merge that recipe `path` records (`merge --recipe`), with the command line's
    /// defaults otherwise.
    pub fn replay(path: &Path) -> Result<Self> {
        let recipe = Recipe::read(path)?;
        let deltas = recipe
            .deltas
            .iter()
            .map(|d| -> Result<InputSpec> {
                let at = d.input.locate();
                Ok(match d.kind {
                    None => InputSpec::Delta(at),
                    Some(_) => InputSpec::Tuned {
                        path: at,
                        seed: d.seed,
                        interval: Interval::new(d.lo, d.hi)
                            .with_context(|| format!("{}: {}", path.display(), d.input.path))?,
                        slot: d.slot.clone(),
                        allow_nonfinite: d.allow_nonfinite,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(MergeSpec {
            operation: recipe.operation,
            replay: Some((path.to_path_buf(), recipe.clone())),
            deltas,
            ..MergeSpec::new(&recipe.base.locate(), &[])
        })
    }

    /// The merge options, checked (a mistake is a [`super::UsageError`]).
    pub fn options(&self, fingerprint_output: bool) -> Result<MergeOptions> {
        let stated = match &self.replay {
            Some((path, recipe)) => recipe.options(path)?,
            None => MergeOptions {
                weights: self.weights.clone(),
                rescale: self.rescale,
                method: self.method,
                alpha: self.alpha.unwrap_or(1.0),
                trim: self.trim.unwrap_or(0.2),
                files_from: self.files_from,
                normalize: self.normalize,
                mergekit: self.mergekit.clone(),
                ..MergeOptions::default()
            },
        };
        let weights = &stated.weights;
        if !weights.is_empty() && weights.len() != self.deltas.len() {
            return Err(usage(format!(
                "--weights has {} values for {} deltas; give one per delta",
                weights.len(),
                self.deltas.len()
            )));
        }
        if let Some(w) = weights.iter().find(|w| !w.is_finite()) {
            return Err(usage(format!("--weights: {w} is not a finite number")));
        }
        let dtype = self
            .dtype
            .as_deref()
            .map(Float::parse)
            .transpose()
            .map_err(|e| usage(format!("--dtype: {e}")))?;
        let opts = MergeOptions {
            dtype: dtype.or(stated.dtype),
            force: self.force || stated.force,
            device: self.device,
            fingerprint_output,
            ..stated
        };
        check_method(&opts, self.deltas.len()).map_err(|e| usage(format!("{e:#}")))?;
        if let Some(k) = opts.files_from.filter(|&k| k >= self.deltas.len()) {
            return Err(usage(format!(
                "--files-from {k}: there are {} deltas, numbered from 0",
                self.deltas.len()
            )));
        }
        Ok(opts)
    }

    /// Opens the deltas over `base`; warns of a delta given twice.
    fn open<'b>(
        &self,
        base: &'b Checkpoint,
        flags: &Flags,
    ) -> Result<(Vec<Input<'b>>, Vec<String>)> {
        let deltas = self
            .deltas
            .iter()
            .map(|d| d.open(base, flags.io))
            .collect::<Result<Vec<_>>>()?;
        let warnings = repeated_deltas(&deltas);
        Ok((deltas, warnings))
    }

    /// The command line that makes this merge into `output`, for a recipe and a model card
    /// when the merge was not asked for by one (the Python package).
    fn command_line(&self, output: &Path, shard_size: &str) -> Vec<String> {
        let mut w: Vec<String> = vec!["sotu-delta".into()];
        let mut arg = |words: &[&str]| w.extend(words.iter().map(|s| s.to_string()));
        let path = |p: &Path| p.display().to_string();
        let apply = self.operation == Operation::Apply;
        if let Some(config) = &self.config {
            // The configuration gives the base, the inputs, the method and the dtype.
            arg(&["merge", "--config", &path(config)]);
        } else {
            arg(&[
                if apply { "apply" } else { "merge" },
                "--base",
                &path(&self.base),
            ]);
            for d in &self.deltas {
                match (d, apply) {
                    (InputSpec::Delta(p), _) | (InputSpec::Tuned { path: p, .. }, true) => {
                        arg(&[&path(p)])
                    }
                    (InputSpec::Tuned { path: p, .. }, false) => arg(&["--tuned", &path(p)]),
                }
            }
        }
        let masks = self.masks.flags();
        arg(&masks.iter().map(String::as_str).collect::<Vec<_>>());
        arg(&["-o", &path(output)]);
        if apply {
            if !self.rescale {
                arg(&["--no-rescale"]);
            }
        } else if self.config.is_none() {
            if self.method != Method::Sum {
                arg(&["--method", self.method.name()]);
            }
            if !self.weights.is_empty() {
                let ws: Vec<String> = self.weights.iter().map(f64::to_string).collect();
                arg(&["--weights", &ws.join(",")]);
            }
            if self.rescale {
                arg(&["--rescale"]);
            }
            if let Some(a) = self.alpha {
                arg(&["--alpha", &a.to_string()]);
            }
            if let Some(t) = self.trim {
                arg(&["--trim", &t.to_string()]);
            }
        }
        if let Some(k) = self.files_from.filter(|_| !apply) {
            arg(&["--files-from", &k.to_string()]);
        }
        if let Some(d) = self.dtype.as_ref().filter(|_| self.config.is_none()) {
            arg(&["--dtype", d]);
        }
        if self.force {
            arg(&["--force"]);
        }
        if shard_size != "5GB" {
            arg(&["--shard-size", shard_size]);
        }
        w
    }

    /// The warnings and notes of a merge of `deltas` and its `report`, written to `output`
    /// (`None`: kept in memory, where there are no files to take or leave out).
    fn messages(
        &self,
        opts: &MergeOptions,
        deltas: &[Input],
        report: &MergeReport,
        output: Option<&Path>,
        flags: &Flags,
    ) -> (Vec<String>, Vec<String>) {
        let (mut warnings, mut notes) = (Vec::new(), Vec::new());
        if flags.verbose
            && matches!(opts.method, Method::Iso | Method::Tsv)
            && report.device != "cpu"
        {
            notes.push(format!(
                "--method {}: computed on the CPU (the GPU kernels are for sum and ties)",
                opts.method.name()
            ));
        }
        if flags.verbose && report.fine_tune_tensors_on_cpu > 0 {
            notes.push(format!(
                "{} tensor(s) that fine-tunes (--tuned) change were computed on the CPU: the GPU reads kept values from delta files only",
                report.fine_tune_tensors_on_cpu
            ));
        }
        if flags.verbose {
            for input in deltas.iter().filter(|d| d.delta().is_none()) {
                let p = input.params();
                notes.push(format!(
                    "{}: delta taken on the fly with seed {}, interval [{}, {}) (density {:.6}{})",
                    input.path().display(),
                    p.seed,
                    p.interval.lo(),
                    p.interval.hi(),
                    p.interval.density(),
                    p.slot
                        .as_ref()
                        .map(|s| format!(", slot {s}"))
                        .unwrap_or_default()
                ));
            }
        }
        if flags.verbose && self.device == Device::Auto {
            notes.push(match &report.cpu_because {
                None => format!(
                    "--device auto: merging on CUDA ({})",
                    report.device.trim_start_matches("cuda: ")
                ),
                Some(why) => format!("--device auto: merging on the CPU: {why}"),
            });
        }
        if !report.mismatches.is_empty() {
            warnings.push(format!(
                "--force: merged onto a base that differs from the deltas' base in {} tensor(s), e.g. {}",
                report.mismatches.len(),
                report.mismatches[0]
            ));
        }
        if let Some(output) = output {
            own_files_messages(
                deltas,
                report,
                opts.files_from,
                output,
                flags,
                &mut warnings,
                &mut notes,
            );
        }
        if flags.verbose {
            for (name, steps) in &report.exact_svd {
                notes.push(format!(
                    "--method {}: tensor {name}: exact SVD for {} (a Gram matrix too ill-conditioned for the fast route, docs/METHODS.md)",
                    self.method.name(),
                    steps.join(", ")
                ));
            }
        }
        let output = output.unwrap_or(Path::new("merged tensors"));
        for (name, n) in &report.overflowed {
            warnings.push(format!(
                "{}: tensor {name}: {n} element(s) are infinite or NaN where the base is finite (an overflow of the output dtype or of the arithmetic, or a non-finite value in a delta)",
                output.display()
            ));
        }
        (warnings, notes)
    }
}

/// What a mergekit configuration gives (docs/MERGEKIT.md), by the command line's argument
/// names: the base, the inputs (`deltas`, the delta files; `tuned`), the method and its
/// parameters, the fine-tunes' density, the output dtype. Each is refused beside the
/// configuration ([`refuse_beside_config`]).
pub const GIVEN_BY_CONFIG: [&str; 10] = [
    "base", "deltas", "tuned", "weights", "rescale", "method", "alpha", "trim", "density", "dtype",
];

/// Refuses, as a usage error, a merge from the mergekit configuration `config` where the caller
/// was also given the options `stated` (names of [`GIVEN_BY_CONFIG`]), which the configuration
/// gives: the first one is named. `merge --config` and the Python package's `merge(config=...)`
/// both refuse through here.
pub fn refuse_beside_config<'a>(
    config: &Path,
    stated: impl IntoIterator<Item = &'a str>,
) -> Result<()> {
    let stated: Vec<&str> = stated.into_iter().collect();
    debug_assert!(stated.iter().all(|id| GIVEN_BY_CONFIG.contains(id)));
    let Some(first) = GIVEN_BY_CONFIG.iter().find(|id| stated.contains(id)) else {
        return Ok(());
    };
    let config = config.display();
    Err(usage(match *first {
        "dtype" => format!(
            "--dtype: with --config {config}, the configuration's dtype and out_dtype give the output dtype"
        ),
        id => {
            let flag = match id {
                "deltas" => "delta files".to_string(),
                _ => format!("--{id}"),
            };
            format!(
                "{flag}: with --config {config}, the configuration gives the base, the models and the method's parameters"
            )
        }
    }))
}

/// Merges as `spec` says and writes the result to `output` (a `.safetensors` file, or else a
/// model folder of shards of at most `shard_size`). A folder base's other files (config,
/// tokenizer) are copied into a folder output.
pub fn merge(
    spec: &MergeSpec,
    output: &Path,
    shard_size: &str,
    fingerprint_output: bool,
    flags: &Flags,
) -> Result<Outcome<MergeReport>> {
    let opts = spec.options(fingerprint_output)?;
    let mut target = target(output, shard_size, flags)?;
    if let Some((_, recipe)) = &spec.replay {
        target.shard_size = recipe.parameters.shard_size;
    }
    if let Some(p) = spec.part {
        if !target.is_folder() {
            return Err(usage(format!(
                "--part: {} is a single file; parts are of a model folder's shards",
                output.display()
            )));
        }
        target.part = Some(p);
    }
    let base = open_base(&spec.base, flags)?;
    let (deltas, mut warnings) = spec.open(&base, flags)?;
    if base.is_folder() {
        target.copy_from = Some(spec.base.clone());
    }
    warnings.extend(subfolder_warnings(&base, &deltas, &target)?);
    // A folder gets a recipe, which records each delta's fingerprint; a replay checks them
    // before anything is merged. A part leaves them to `finalize`, which hashes each delta
    // once.
    let delta_fingerprints = if (target.is_folder() && spec.part.is_none()) || spec.replay.is_some()
    {
        use rayon::prelude::*;
        let fps = deltas
            .par_iter()
            .map(|d| d.fingerprint())
            .collect::<Vec<_>>()
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        if let Some((path, recipe)) = &spec.replay {
            for (d, fp) in recipe.deltas.iter().zip(&fps) {
                d.input.check(fp, path)?;
            }
        }
        fps
    } else {
        Vec::new()
    };
    let folder = target.is_folder();
    let card_warnings = std::sync::Mutex::new(Vec::new());
    let files = |base_fingerprint: &str| -> Result<Vec<(String, Vec<u8>)>> {
        if let Some((path, recipe)) = &spec.replay {
            recipe.base.check(base_fingerprint, path)?;
        }
        if !folder {
            return Ok(Vec::new());
        }
        // A part read a part of the base: `finalize` records the whole base's fingerprint.
        let base_fingerprint = if spec.part.is_some() {
            ""
        } else {
            base_fingerprint
        };
        let command = match flags.command.is_empty() {
            true => spec.command_line(output, shard_size),
            false => flags.command.clone(),
        };
        let recipe = Recipe::new(
            spec.operation,
            command,
            &base,
            base_fingerprint,
            &deltas,
            &delta_fingerprints,
            &opts,
            target.shard_size,
        );
        let (files, more) = release::folder_files(&recipe, &spec.base);
        card_warnings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(more);
        Ok(files)
    };
    let report = merge_with_files(&base, &deltas, &target, &opts, &files)?;
    warnings.extend(
        card_warnings
            .into_inner()
            .unwrap_or_else(|e| e.into_inner()),
    );
    base.save_hashes();
    // A part's output is the folder its parts are gathered in.
    let output = match spec.part {
        Some(_) => parts::parts_dir(output),
        None => output.to_path_buf(),
    };
    let (more, notes) = spec.messages(&opts, &deltas, &report, Some(&output), flags);
    warnings.extend(more);
    Ok(Outcome {
        report,
        warnings,
        notes,
    })
}

/// What a merge does with weight files in subfolders (docs/FORMAT.md section 15) that it does
/// not merge: copies those the deltas do not cover into a folder output from a folder base, and
/// leaves out those they cover where the output or the base is a single file.
fn subfolder_warnings(base: &Checkpoint, deltas: &[Input], target: &Target) -> Result<Vec<String>> {
    let covered = crate::merge::subfolders::covered(base, deltas)?;
    if target.part.is_some() && !covered.is_empty() && base.is_folder() {
        return Err(usage(format!(
            "--part: the deltas cover weight files in subfolders ({}), which a merge in parts does not write (docs/FORMAT.md section 15); merge without --part",
            covered.into_iter().collect::<Vec<_>>().join(", ")
        )));
    }
    let mut warnings = Vec::new();
    if base.is_folder() && target.is_folder() {
        for sub in subfolder_weights(base.path())? {
            if !covered.contains(sub.as_str()) {
                warnings.push(format!(
                    "{}: a weight file in a subfolder, which the deltas do not cover: copied unchanged",
                    base.path().join(sub).display()
                ));
            }
        }
    } else if !covered.is_empty() {
        let holder = match target.is_folder() {
            true => base.path(),
            false => target.path.as_path(),
        };
        warnings.push(format!(
            "{}: a single file holds no subfolders: the deltas' weight files in subfolders ({}) are left out",
            holder.display(),
            covered.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    Ok(warnings)
}

/// Merges as `spec` says into memory: the tensors [`merge`] would write, bit for bit.
pub fn merge_in_memory(spec: &MergeSpec, flags: &Flags) -> Result<Outcome<MergedInMemory>> {
    let opts = spec.options(false)?;
    if spec.part.is_some() {
        return Err(usage("--part: a merge into memory has no shards to divide"));
    }
    let base = open_base(&spec.base, flags)?;
    let (deltas, mut warnings) = spec.open(&base, flags)?;
    let covered = crate::merge::subfolders::covered(&base, &deltas)?;
    if !covered.is_empty() {
        warnings.push(format!(
            "merged tensors: the deltas' weight files in subfolders ({}) are not part of a merge into memory: left out",
            covered.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    let merged = crate::merge::merge_in_memory(&base, &deltas, &opts, flags.cancel.clone())?;
    base.save_hashes();
    let (more, notes) = spec.messages(&opts, &deltas, &merged.report, None, flags);
    warnings.extend(more);
    Ok(Outcome {
        report: merged,
        warnings,
        notes,
    })
}

/// Says what became of the deltas' own files (docs/FORMAT.md section 13): left out of a
/// single-file output, or not taken (a note, or a warning where the output has a delta's
/// grown vocabulary but not its tokenizer and config).
fn own_files_messages(
    deltas: &[Input],
    r: &MergeReport,
    files_from: Option<usize>,
    output: &Path,
    flags: &Flags,
    warnings: &mut Vec<String>,
    notes: &mut Vec<String>,
) {
    if let Some(k) = files_from
        && !r.files_left_out.is_empty()
    {
        warnings.push(format!(
            "{}: a single-file output holds no files: the own files of {} ({}) were left out; write to a folder to have them",
            output.display(),
            deltas[k].path().display(),
            r.files_left_out.join(", ")
        ));
    }
    if !crate::io::is_folder_path(output) {
        return;
    }
    if files_from.is_none() && !flags.quiet {
        for (k, d) in deltas.iter().enumerate() {
            if !d.own_files().is_empty() {
                let names: Vec<&str> = d.own_files().keys().map(String::as_str).collect();
                notes.push(format!(
                    "note: {} carries its fine-tune's own files ({}); the output keeps the base's. Pass --files-from {k} to take them",
                    d.path().display(),
                    names.join(", ")
                ));
            }
        }
    }
    let mut by_delta: std::collections::BTreeMap<usize, Vec<&str>> = Default::default();
    for (name, k) in &r.grown {
        by_delta.entry(*k).or_default().push(name);
    }
    for (k, names) in by_delta {
        let (delta, names) = (deltas[k].path().display(), names.join(", "));
        if files_from != Some(k) {
            warnings.push(format!(
                "{}: {names} hold the rows that {delta} adds for new tokens, but the output's config and tokenizer files are not that fine-tune's and do not know them. Pass --files-from {k}",
                output.display(),
            ));
        } else if deltas[k].own_files().is_empty() {
            warnings.push(format!(
                "{}: {names} hold the rows that {delta} adds for new tokens, but that delta carries no config or tokenizer files (extracted from a single file, or with --no-files): the output's are the base's, which do not know them",
                output.display(),
            ));
        }
    }
}

/// Warns of a delta given twice (the same file, under any path): its changes are added twice,
/// which is seldom meant (`--weights` scales a delta).
fn repeated_deltas(deltas: &[Input]) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let id = |d: &Input| {
        let m = std::fs::metadata(d.path()).ok()?;
        Some((m.dev(), m.ino()))
    };
    let ids: Vec<_> = deltas.iter().map(id).collect();
    let mut warnings = Vec::new();
    for (j, d) in deltas.iter().enumerate() {
        if let Some(i) = (0..j).find(|&i| ids[i].is_some() && ids[i] == ids[j]) {
            warnings.push(format!(
                "{}: the same delta as {}, given twice: its changes are added twice (--weights scales a delta)",
                d.path().display(),
                deltas[i].path().display()
            ));
        }
    }
    warnings
}
