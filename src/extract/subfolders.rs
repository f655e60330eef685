//! Which weight files in a model folder's subfolders a delta covers (docs/FORMAT.md section
//! 15): those of the fine-tune folder that the base folder has at the same path, each diffed as a
//! checkpoint of its own.

use anyhow::{Result, bail};

use crate::format::is_subfolder_path;
use crate::io::{Checkpoint, subfolder_weights};
use crate::tuned::Tuned;

/// A subfolder weight file of both folders, opened in each.
pub struct SubfolderPair {
    /// Its path relative to the folders, `/` between components.
    pub path: String,
    /// The base folder's file.
    pub base: Checkpoint,
    /// The fine-tune folder's file.
    pub tuned: Tuned<'static>,
}

/// The subfolder weight files of fine-tune `tuned` paired with `base`'s, in path order; none
/// unless both are model folders (a LoRA adapter has none). A file of the fine-tune that the
/// base lacks, or whose path the format cannot name, is refused: the delta could not rebuild
/// it.
pub fn pairs(base: &Checkpoint, tuned: &Tuned) -> Result<Vec<SubfolderPair>> {
    let Tuned::Checkpoint(tuned) = tuned else {
        return Ok(Vec::new());
    };
    if !base.is_folder() || !tuned.is_folder() {
        return Ok(Vec::new());
    }
    let in_base = subfolder_weights(base.path())?;
    let mut pairs = Vec::new();
    let safetensors = |p: &String| p.ends_with(".safetensors");
    for path in subfolder_weights(tuned.path())?
        .into_iter()
        .filter(safetensors)
    {
        let (b, t) = (base.path().join(&path), tuned.path().join(&path));
        if !in_base.contains(&path) {
            bail!(
                "{}: a weight file in a subfolder that the base folder {} lacks; a delta carries changes to the base's weights and cannot create this file (docs/FORMAT.md section 15). Extract against a base that has it",
                t.display(),
                base.path().display()
            );
        }
        if !is_subfolder_path(&path) {
            bail!(
                "{}: a subfolder weight file whose path a delta cannot record (components of A-Z a-z 0-9 . _ - not beginning with a dot, at most 9; docs/FORMAT.md section 15)",
                t.display()
            );
        }
        pairs.push(SubfolderPair {
            base: Checkpoint::open_with(&b, base.io_mode())?,
            tuned: Tuned::Checkpoint(Checkpoint::open_with(&t, tuned.io_mode())?),
            path,
        });
    }
    Ok(pairs)
}
