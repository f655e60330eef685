//! Which of a fine-tune folder's own files a delta carries (docs/FORMAT.md section 13): the
//! config, tokenizer and chat-template files that the fine-tune changed or added.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::format::MAX_FILES_BYTES;
use crate::io::{Checkpoint, read_small_file};

/// The names of the files a delta carries when the fine-tune changes them.
pub const OWN_FILE_NAMES: [&str; 14] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.json",
    "chat_template.jinja",
];

/// The fine-tune's own files to store, by name: those of [`OWN_FILE_NAMES`] at the top of the
/// `tuned` folder whose bytes differ from the `base` folder's file of that name, or that the
/// base lacks (every one when `base` is a single file). None when `tuned` is a single file.
/// Refuses files larger than [`MAX_FILES_BYTES`] in all, naming each with its size.
pub fn own_files(base: &Checkpoint, tuned: &Checkpoint) -> Result<BTreeMap<String, Vec<u8>>> {
    if !tuned.is_folder() {
        return Ok(BTreeMap::new());
    }
    let mut changed: Vec<(&str, u64)> = Vec::new();
    for name in OWN_FILE_NAMES {
        let path = tuned.path().join(name);
        let len = match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => m.len(),
            Ok(_) => bail!(
                "{}: not a regular file; the fine-tune's {name} must be a file",
                path.display()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("{}: cannot open", path.display())),
        };
        let in_base = base.is_folder().then(|| base.path().join(name));
        if let Some(b) = in_base.filter(|b| b.is_file())
            && same_bytes(&path, &b)?
        {
            continue;
        }
        changed.push((name, len));
    }
    let total: u64 = changed.iter().map(|(_, len)| len).sum();
    if total > MAX_FILES_BYTES {
        changed.sort_by_key(|&(name, len)| (std::cmp::Reverse(len), name));
        let list: Vec<String> = changed
            .iter()
            .map(|(name, len)| format!("{} ({len} bytes)", tuned.path().join(name).display()))
            .collect();
        bail!(
            "{}: the fine-tune's own files to store come to {total} bytes, over the {MAX_FILES_BYTES} bytes (64 MiB) a delta may carry (docs/FORMAT.md section 13): {}; nothing was written. Pass --no-files to leave them out",
            tuned.path().display(),
            list.join(", ")
        );
    }
    let mut files = BTreeMap::new();
    let mut read = 0u64;
    for (name, _) in changed {
        let path = tuned.path().join(name);
        let bytes = read_small_file(&path, MAX_FILES_BYTES - read).with_context(|| {
            format!(
                "{}: the fine-tune's own files grew while being read",
                tuned.path().display()
            )
        })?;
        read += bytes.len() as u64;
        files.insert(name.to_string(), bytes);
    }
    Ok(files)
}

/// Whether the files `a` and `b` hold the same bytes (compared piece by piece: a large file is
/// not read whole).
fn same_bytes(a: &Path, b: &Path) -> Result<bool> {
    let open =
        |p: &Path| std::fs::File::open(p).with_context(|| format!("{}: cannot open", p.display()));
    let (fa, fb) = (open(a)?, open(b)?);
    let (la, lb) = (fa.metadata()?.len(), fb.metadata()?.len());
    if la != lb {
        return Ok(false);
    }
    let (mut ra, mut rb) = (std::io::BufReader::new(fa), std::io::BufReader::new(fb));
    let (mut xa, mut xb) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let n =
            read_full(&mut ra, &mut xa).with_context(|| format!("{}: cannot read", a.display()))?;
        let m =
            read_full(&mut rb, &mut xb).with_context(|| format!("{}: cannot read", b.display()))?;
        if n != m || xa[..n] != xb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

/// Reads until `buf` is full or the end: the number of bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}
