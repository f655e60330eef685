//! Putting a finished output folder at its destination: refusing a destination that is not an
//! output to replace, swapping the new folder in atomically, and flushing folders to disk.
//! [`super::output::Output::commit`] and [`super::parts::finalize`] both place through here.

use std::fs::File;
use std::path::Path;

use anyhow::{Context, Result, bail};

use super::checkpoint::{INDEX_NAME, SINGLE_NAME};
use super::process;

/// Refuses to replace an existing folder at `dest` unless it is empty or a model folder (it
/// holds `model.safetensors` or an index): `-o ~/models` by mistake must not delete a folder of
/// other things. Refuses a symbolic link there too, before anything is computed: replacing it
/// would put a real folder where the link was and leave the folder it points to as it was,
/// which is neither of the two things the link's owner may have meant.
pub(super) fn refuse_to_replace(dest: &Path) -> Result<()> {
    if let Ok(m) = std::fs::symlink_metadata(dest)
        && m.file_type().is_symlink()
    {
        let to = std::fs::read_link(dest).unwrap_or_default();
        bail!(
            "{}: is a symbolic link (to {}); refusing to replace it with a model folder. Give the folder it points to as the output, or remove the link",
            dest.display(),
            to.display()
        );
    }
    let Ok(mut entries) = std::fs::read_dir(dest) else {
        return Ok(()); // nothing there, or not a folder (found out when placing it)
    };
    if entries.next().is_none()
        || dest.join(SINGLE_NAME).is_file()
        || dest.join(INDEX_NAME).is_file()
    {
        return Ok(());
    }
    bail!(
        "{}: exists and is not a model folder (no {SINGLE_NAME} or {INDEX_NAME}); refusing to replace it. Remove it or choose another output path",
        dest.display()
    )
}

pub(super) fn sync_folder(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("{}: cannot flush the folder", dir.display()))
}

/// Moves the finished folder `staged` to `dest`. An existing folder at `dest` is swapped out
/// atomically (Linux `renameat2(RENAME_EXCHANGE)`), then removed, so readers of `dest` see
/// the old folder or the new one, never a mixture.
pub(super) fn place_folder(staged: &Path, dest: &Path) -> Result<()> {
    let fail =
        |e: std::io::Error| anyhow::anyhow!("{}: cannot rename into place: {e}", dest.display());
    match std::fs::symlink_metadata(dest) {
        Err(_) => std::fs::rename(staged, dest).map_err(fail),
        Ok(m) if m.is_dir() => {
            let (a, b) = (process::c_path(staged), process::c_path(dest));
            // SOTU_DELTA_NO_RENAME_EXCHANGE=1 takes the fallback below, for its test.
            let exchange = std::env::var_os("SOTU_DELTA_NO_RENAME_EXCHANGE").is_none();
            let r = if !exchange {
                -1
            } else {
                // SAFETY: two valid NUL-terminated paths.
                unsafe {
                    libc::renameat2(
                        libc::AT_FDCWD,
                        a.as_ptr(),
                        libc::AT_FDCWD,
                        b.as_ptr(),
                        libc::RENAME_EXCHANGE,
                    )
                }
            };
            if r != 0 {
                let e = if exchange {
                    std::io::Error::last_os_error()
                } else {
                    std::io::Error::from_raw_os_error(libc::EINVAL)
                };
                if !matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) {
                    return Err(fail(e));
                }
                // A filesystem without the exchange (NFS, some FUSE): move the old folder
                // aside (into the staging name, which is then free), then the new one in. For
                // a moment nothing is at `dest`; never a mixture.
                let aside = staged.with_extension("old");
                std::fs::rename(dest, &aside).map_err(fail)?;
                if let Err(e) = std::fs::rename(staged, dest) {
                    let _ = std::fs::rename(&aside, dest);
                    return Err(fail(e));
                }
                std::fs::rename(&aside, staged).map_err(fail)?;
            }
            // `staged` now holds the old folder.
            std::fs::remove_dir_all(staged).with_context(|| {
                format!(
                    "{}: written, but the folder it replaced could not be removed from {}",
                    dest.display(),
                    staged.display()
                )
            })
        }
        Ok(_) => bail!(
            "{}: exists and is not a folder; refusing to replace it with a model folder",
            dest.display()
        ),
    }
}
