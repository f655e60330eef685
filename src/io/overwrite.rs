//! Refusing an output that would overwrite or delete one of the inputs.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use super::checkpoint::{Checkpoint, INDEX_NAME, SINGLE_NAME};

/// Refuses an output that would overwrite one of `inputs` (see [`refuse_output_over_input`]):
/// each checkpoint's path as given and its files; that a reader of an input folder would read
/// (its index or its `model.safetensors`, existing or not); or whose replacement would delete
/// a file that an input folder links to.
pub fn refuse_output_over_checkpoints(output: &Path, inputs: &[&Checkpoint]) -> Result<()> {
    let mut paths: Vec<&Path> = inputs.iter().map(|c| c.path()).collect();
    paths.extend(inputs.iter().flat_map(|c| c.files()));
    refuse_output_over_input(output, &paths)?;
    let folders: Vec<&Path> = inputs
        .iter()
        .filter(|c| c.is_folder())
        .map(|c| c.path())
        .collect();
    refuse_output_read_by_folders(output, &folders)?;
    refuse_replacing_linked_files(output, &folders)
}

/// Refuses an output at the index or the `model.safetensors` of one of the input `folders`,
/// whether or not it has one now: a reader of the folder opens those names first, so writing
/// either changes what the folder holds, or breaks it (a folder output named like the index).
fn refuse_output_read_by_folders(output: &Path, folders: &[&Path]) -> Result<()> {
    let Some(out) = resolved(output) else {
        return Ok(());
    };
    for dir in folders {
        let Ok(dir_real) = std::fs::canonicalize(dir) else {
            continue;
        };
        if let Some(name) = [INDEX_NAME, SINGLE_NAME]
            .into_iter()
            .find(|n| out == dir_real.join(n))
        {
            bail!(
                "{}: is the {name} of the input folder {}, which a reader of that folder reads; refusing to change an input. Write the output elsewhere",
                output.display(),
                dir.display()
            );
        }
    }
    Ok(())
}

/// Refuses to replace an existing output folder that holds what an entry at the top of one of
/// the input `folders` links to (a base whose `config.json` links into the output folder, say):
/// deleting the old folder would leave the input's link dangling.
fn refuse_replacing_linked_files(output: &Path, folders: &[&Path]) -> Result<()> {
    let out_real = match std::fs::metadata(output) {
        Ok(m) if m.is_dir() => std::fs::canonicalize(output).ok(),
        _ => None,
    };
    let Some(out_real) = out_real else {
        return Ok(()); // no folder there to replace
    };
    for dir in folders {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let link = entry.path();
            if let Ok(target) = std::fs::canonicalize(&link)
                && target.starts_with(&out_real)
            {
                bail!(
                    "{}: replacing this folder would delete {}, which the input {} links to; refusing to break an input. Write the output elsewhere",
                    output.display(),
                    target.display(),
                    link.display()
                );
            }
        }
    }
    Ok(())
}

/// `path` with its folder resolved (links, `.`, `..`) and its last name as given: where a file
/// written at `path` would be, whether or not it exists. `None` without a last name.
fn resolved(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Some(std::fs::canonicalize(parent).ok()?.join(name))
}

/// Refuses an output path that names one of the inputs, directly, through a link, or as a hard
/// link of the same file; and an existing output folder that is or holds an input (replacing
/// it would delete the input).
pub fn refuse_output_over_input(output: &Path, inputs: &[&Path]) -> Result<()> {
    let Ok(out_meta) = std::fs::metadata(output) else {
        return Ok(()); // nothing there yet, so it cannot be an input
    };
    let out_real = std::fs::canonicalize(output).ok();
    for input in inputs {
        let same = std::fs::metadata(input)
            .is_ok_and(|m| m.dev() == out_meta.dev() && m.ino() == out_meta.ino());
        let inside = out_meta.is_dir()
            && out_real
                .as_ref()
                .is_some_and(|o| std::fs::canonicalize(input).is_ok_and(|i| i.starts_with(o)));
        if same || inside {
            bail!(
                "{}: the output path {} the input {}; refusing to overwrite an input",
                output.display(),
                if same { "is" } else { "holds" },
                input.display()
            );
        }
    }
    Ok(())
}
