//! The weight files in a base folder's subfolders that the deltas cover (docs/FORMAT.md section
//! 15): each opened before the top-level merge runs, then merged as a checkpoint of its own, by
//! the same [`super::merge`], into the folder output before it is committed.

use std::collections::BTreeSet;
use std::sync::Arc;

use anyhow::{Context, Result, bail};

use super::{Input, MergeOptions, MergeReport};
use crate::format::Delta;
use crate::io::{Checkpoint, Output, Target};

/// The subfolder weight files that at least one of `inputs` covers, by path: those a delta
/// file records, and those a fine-tune folder's extract against `base` would diff.
pub fn covered(base: &Checkpoint, inputs: &[Input]) -> Result<BTreeSet<String>> {
    let mut paths: BTreeSet<String> = inputs
        .iter()
        .filter_map(Input::delta)
        .flat_map(|d| d.subfolders().keys().cloned())
        .collect();
    for input in inputs {
        if let Input::Tuned(f) = input {
            paths.extend(f.subfolder_paths(base)?);
        }
    }
    Ok(paths)
}

/// The subfolder weight files a folder merge covers, each opened with the inputs that merge it,
/// before the top-level merge runs: a file the base folder lacks, or cannot open, fails the
/// merge before anything is computed, not after the top level's tensors are written.
pub struct SubfolderMerges<'b> {
    files: Vec<(String, Checkpoint, Vec<Input<'b>>)>,
}

/// Opens the subfolder weight files of base folder `base` that `inputs` cover, for a merge into
/// `out`; none when `base` or `out` is a single file (the caller warns that they are left out).
pub fn prepare<'b>(
    base: &Checkpoint,
    inputs: &[Input<'b>],
    out: &Target,
) -> Result<SubfolderMerges<'b>> {
    let mut files = Vec::new();
    if !base.is_folder() || !out.is_folder() {
        return Ok(SubfolderMerges { files });
    }
    let paths = covered(base, inputs)?;
    if paths.is_empty() {
        return Ok(SubfolderMerges { files });
    }
    if out.part.is_some() {
        bail!(
            "--part: the deltas cover weight files in subfolders ({}), which a merge in parts does not write (docs/FORMAT.md section 15); merge without --part",
            paths.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    for path in paths {
        let file = base.path().join(&path);
        if !file.is_file() {
            let by = inputs
                .iter()
                .filter_map(Input::delta)
                .find(|d| d.subfolders().contains_key(&path));
            bail!(
                "{}: covers the subfolder weight file {path}, but the base folder {} has no such file (docs/FORMAT.md section 15)",
                by.expect("covered by a delta").path().display(),
                base.path().display()
            );
        }
        let sub_base = Checkpoint::open_with(&file, base.io_mode())?;
        // Each input in its place, so that weights and the methods' task count are the
        // top level's; one that does not cover the file contributes nothing to it.
        let sub_inputs = inputs
            .iter()
            .map(|i| match i {
                Input::Delta(d) => Ok(Input::Delta(d.subfolder(&path))),
                Input::Tuned(f) => match f.subfolder(&sub_base, &path)? {
                    Some(sub) => Ok(Input::Tuned(sub)),
                    None => {
                        let ckpt = Arc::new(Checkpoint::open_with(&file, base.io_mode())?);
                        Ok(Input::Delta(Delta::uncovered(
                            ckpt,
                            i.params().clone(),
                            &path,
                        )))
                    }
                },
            })
            .collect::<Result<Vec<_>>>()?;
        files.push((path, sub_base, sub_inputs));
    }
    Ok(SubfolderMerges { files })
}

impl SubfolderMerges<'_> {
    /// Merges each file into `output` (the folder output `out` being written), with the options
    /// of the top-level merge; returns each file's path and report.
    pub fn run(
        self,
        output: &mut Output,
        out: &Target,
        opts: &MergeOptions,
    ) -> Result<Vec<(String, MergeReport)>> {
        let opts = MergeOptions {
            files_from: None,
            fingerprint_output: false,
            ..opts.clone()
        };
        let mut reports = Vec::new();
        for (path, sub_base, sub_inputs) in self.files {
            let target = Target {
                path: output.stage_file(&path)?,
                copy_from: None,
                progress: false,
                part: None,
                ..out.clone()
            };
            let report = super::merge(&sub_base, &sub_inputs, &target, &opts)
                .with_context(|| format!("subfolder weight file {path}"))?;
            reports.push((path, report));
        }
        Ok(reports)
    }
}
