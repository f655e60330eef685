//! Refusing an output that would overwrite or delete one of the inputs.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::{Result, bail};

use super::checkpoint::Checkpoint;

/// Refuses an output that would overwrite one of `inputs` (see [`refuse_output_over_input`]):
/// each checkpoint's path as given and its files.
pub fn refuse_output_over_checkpoints(output: &Path, inputs: &[&Checkpoint]) -> Result<()> {
    let mut paths: Vec<&Path> = inputs.iter().map(|c| c.path()).collect();
    paths.extend(inputs.iter().flat_map(|c| c.files()));
    refuse_output_over_input(output, &paths)
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
