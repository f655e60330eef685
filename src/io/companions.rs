//! What a folder output carries over from the base's model folder besides the weights: its
//! top-level files that are not weights (config, tokenizer, card) and its subfolders
//! (sentence-transformers' `1_Pooling/`), found by [`companions`] and copied by
//! `copy_companions`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::process;

/// Whether a file name is a checkpoint's weights (in any format) or a weight index: files a
/// merged folder must not inherit from the top of its base.
pub(super) fn is_weight_file(name: &str) -> bool {
    const WEIGHTS: [&str; 9] = [
        ".safetensors",
        ".bin",
        ".pt",
        ".pth",
        ".ckpt",
        ".h5",
        ".msgpack",
        ".gguf",
        ".index.json",
    ];
    WEIGHTS.iter().any(|ext| name.ends_with(ext))
}

/// What a folder output copies from the base's model folder, relative to it, sorted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Companions {
    /// The subfolders, parents first (empty ones too: a sentence-transformers `2_Normalize/`
    /// may hold nothing, yet `modules.json` names it).
    pub dirs: Vec<PathBuf>,
    /// The files: at the top, those that are not weights (config.json, tokenizer files,
    /// README.md, …); in subfolders, all of them (`1_Pooling/config.json`, and a Dense layer's
    /// `2_Dense/model.safetensors`, a checkpoint of its own).
    pub files: Vec<PathBuf>,
    /// The subfolders that hold weights: checkpoints of their own, copied unchanged (the deltas
    /// are of the top-level checkpoint).
    pub checkpoints: Vec<PathBuf>,
}

/// The weight files (any format, by their names) in model folder `dir`'s subfolders (found
/// as [`companions`] finds them), each as its path relative to `dir` with `/` between
/// components, sorted: the `.safetensors` ones are those a delta may cover (docs/FORMAT.md
/// section 15).
pub fn subfolder_weights(dir: &Path) -> Result<Vec<String>> {
    let mut paths: Vec<String> = companions(dir)?
        .files
        .iter()
        .filter(|f| {
            f.components().count() > 1
                && f.file_name()
                    .is_some_and(|n| is_weight_file(&n.to_string_lossy()))
        })
        .map(|f| {
            let parts: Vec<String> = f
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            parts.join("/")
        })
        .collect();
    paths.sort();
    Ok(paths)
}

/// How deep [`companions`] looks into subfolders.
const MAX_COMPANION_DEPTH: usize = 8;

/// What a folder output copies from model folder `dir` ([`Companions`]). Links are followed (a
/// Hugging Face cache snapshot is a folder of links); hidden entries (`.git`, `.cache`) and
/// partial outputs are left out.
pub fn companions(dir: &Path) -> Result<Companions> {
    let mut c = Companions::default();
    walk_companions(dir, Path::new(""), 0, &mut c)?;
    c.dirs.sort();
    c.files.sort();
    c.checkpoints.sort();
    Ok(c)
}

fn walk_companions(root: &Path, rel: &Path, depth: usize, c: &mut Companions) -> Result<()> {
    let here = root.join(rel);
    let entries =
        std::fs::read_dir(&here).with_context(|| format!("{}: cannot list", here.display()))?;
    let mut weights = false;
    for e in entries {
        let e = e.with_context(|| format!("{}: cannot list", here.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let Ok(meta) = std::fs::metadata(e.path()) else {
            continue; // a dangling link
        };
        let path = rel.join(&name);
        if meta.is_file() {
            let weight = is_weight_file(&name);
            weights |= weight;
            if depth > 0 || !weight {
                c.files.push(path);
            }
        } else if meta.is_dir() && depth < MAX_COMPANION_DEPTH {
            c.dirs.push(path.clone());
            walk_companions(root, &path, depth + 1, c)?;
        }
    }
    if depth > 0 && weights {
        c.checkpoints.push(rel.to_path_buf());
    }
    Ok(())
}

/// Copies the companions `c` of model folder `src` into folder `dir`, the temporary form of
/// output `dest` (for messages), leaving out the files named in `skip` (written there by the
/// tool instead).
pub(super) fn copy_companions(
    src: &Path,
    c: &Companions,
    dir: &Path,
    dest: &Path,
    skip: &[&Path],
) -> Result<()> {
    for sub in &c.dirs {
        let to = dir.join(sub);
        match std::fs::create_dir(&to) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(e)
                    .with_context(|| format!("{}: cannot create", dest.join(sub).display()));
            }
            _ => process::track_dir(&to),
        }
    }
    for name in c.files.iter().filter(|f| !skip.contains(&f.as_path())) {
        let to = dir.join(name);
        process::track_file(&to);
        std::fs::copy(src.join(name), &to).with_context(|| {
            format!(
                "{}: cannot copy {} into the output",
                dest.display(),
                src.join(name).display()
            )
        })?;
    }
    Ok(())
}
