//! What a merge adds to the base: deltas, each read from a delta file or taken on the fly from
//! a fine-tune ([`FineTune`]) exactly as `extract` would have stored it, so that
//! `merge --tuned T` gives the bytes of `extract --tuned T` followed by `merge`.
//!
//! Every part of the merge (the plan, both engines, the methods) reads an input through
//! [`Input`]: its tensor entries, its mask, the chunk walk of its kept values
//! ([`crate::format::Chunks`]) and its whole tensors. A fine-tune is thus one more kind of
//! term, not a second merge path.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use anyhow::{Result, bail};

use crate::dtype::Float;
use crate::format::{Chunks, Delta, Entry, Kind, Params};
use crate::io::{Checkpoint, Tensor};
use crate::mask::{CHUNK_ELEMS, Interval, Mask};
use crate::tuned::{Selector, Tuned, plan_kinds};

/// A delta to merge: a delta file, or a fine-tune's delta taken as it is read.
pub enum Input<'b> {
    /// A delta file, opened and validated.
    Delta(Delta),
    /// A fine-tune (a checkpoint or a LoRA adapter) masked as `extract` would mask it.
    Tuned(FineTune<'b>),
}

impl From<Delta> for Input<'_> {
    fn from(d: Delta) -> Self {
        Input::Delta(d)
    }
}

/// A fine-tune's delta, taken on the fly: the tensor kinds that `extract` would write
/// ([`plan_kinds`]) and its mask, with the kept values read from the fine-tune itself.
pub struct FineTune<'b> {
    tuned: Tuned<'b>,
    params: Params,
    entries: BTreeMap<String, Entry>,
    allow_nonfinite: bool,
    own_files: BTreeMap<String, Vec<u8>>,
    /// What each tensor's mask is keyed with before its name: empty at the top level,
    /// `sotu/sub/<path>/` in a subfolder weight file (docs/FORMAT.md section 15).
    key_prefix: String,
}

impl<'b> FineTune<'b> {
    /// The delta of `tuned` against `base` under `seed` and `interval` (`slot` when the
    /// interval is a slot, for the record), as `extract` with no `--include`/`--exclude` takes
    /// it, carrying `own_files` (the fine-tune folder's own files extract would store,
    /// docs/FORMAT.md section 13). Refuses what extract refuses of the pair, and, unless
    /// `allow_nonfinite`, a new float tensor or new rows holding a NaN or infinity (the other
    /// tensors are checked as they are read).
    pub fn new(
        base: &Checkpoint,
        tuned: Tuned<'b>,
        seed: u64,
        interval: Interval,
        slot: Option<String>,
        allow_nonfinite: bool,
        own_files: BTreeMap<String, Vec<u8>>,
    ) -> Result<FineTune<'b>> {
        let entries: BTreeMap<String, Entry> =
            plan_kinds(base, &tuned, &Selector::default(), false)?
                .into_iter()
                .map(|p| (p.name, p.entry))
                .collect();
        if !allow_nonfinite {
            let unread = entries
                .iter()
                .filter(|(_, e)| !e.in_base || e.grown_shape.is_some());
            for (name, e) in unread {
                let tensor = tuned.tensor(name).expect("planned from its tensors");
                let Some(float) = tensor.float() else {
                    continue;
                };
                // A new tensor whole, a grown one's new rows (both stored), piece by piece.
                let size = float.size();
                let start = if e.in_base { e.numel() as usize } else { 0 };
                let rows = tensor
                    .stored()
                    .expect("new and grown tensors are stored")
                    .tail(start * size);
                let mut found = None;
                rows.for_each_piece(|at, piece| {
                    if found.is_none() {
                        found = float.first_nonfinite(piece).map(|k| at / size + k);
                    }
                    Ok(())
                })?;
                if let Some(k) = found {
                    let k = start + k;
                    bail!(
                        "{}: tensor {name}: element {k} is NaN or infinite; nothing was written. Pass --allow-nonfinite to merge it anyway",
                        tuned.path().display()
                    );
                }
            }
        }
        Ok(FineTune {
            tuned,
            params: Params {
                seed,
                interval,
                chunk: CHUNK_ELEMS,
                slot,
            },
            entries,
            allow_nonfinite,
            own_files,
            key_prefix: String::new(),
        })
    }

    /// The subfolder weight files this fine-tune's extract would diff (docs/FORMAT.md section
    /// 15), by path: those of a fine-tune folder's subfolders that the base folder `base` has.
    pub fn subfolder_paths(&self, base: &Checkpoint) -> Result<Vec<String>> {
        Ok(crate::extract::subfolders::pairs(base, &self.tuned)?
            .into_iter()
            .map(|p| p.path)
            .collect())
    }

    /// The delta of its subfolder weight file `path` against `base_file` (the base folder's
    /// file), as extract stores it: the same seed and interval, each mask keyed by the tensor's
    /// stored key; `None` when the fine-tune has no such file.
    pub fn subfolder(
        &self,
        base_file: &Checkpoint,
        path: &str,
    ) -> Result<Option<FineTune<'static>>> {
        let Tuned::Checkpoint(c) = &self.tuned else {
            return Ok(None);
        };
        let file = c.path().join(path);
        if !c.is_folder() || !file.is_file() {
            return Ok(None);
        }
        let tuned = Tuned::Checkpoint(Checkpoint::open_with(&file, c.io_mode())?);
        let p = &self.params;
        let sub = FineTune::new(
            base_file,
            tuned,
            p.seed,
            p.interval,
            p.slot.clone(),
            self.allow_nonfinite,
            BTreeMap::new(),
        )?;
        Ok(Some(FineTune {
            key_prefix: crate::format::sub_prefix(path),
            ..sub
        }))
    }

    /// The fine-tune.
    pub fn tuned(&self) -> &Tuned<'b> {
        &self.tuned
    }
}

impl<'b> Input<'b> {
    /// The path given.
    pub fn path(&self) -> &Path {
        match self {
            Input::Delta(d) => d.path(),
            Input::Tuned(f) => f.tuned.path(),
        }
    }

    /// How each tensor is carried (docs/FORMAT.md section 3), in name order.
    pub fn entries(&self) -> &BTreeMap<String, Entry> {
        match self {
            Input::Delta(d) => d.entries(),
            Input::Tuned(f) => &f.entries,
        }
    }

    /// The mask parameters.
    pub fn params(&self) -> &Params {
        match self {
            Input::Delta(d) => d.params(),
            Input::Tuned(f) => &f.params,
        }
    }

    /// The mask of tensor `name` (a delta file's view of a subfolder weight file keys it by
    /// its stored key, docs/FORMAT.md section 15).
    pub fn mask(&self, name: &str) -> Mask {
        match self {
            Input::Delta(d) => d.mask(name),
            Input::Tuned(f) => Mask::new(
                f.params.seed,
                &format!("{}{name}", f.key_prefix),
                f.params.interval,
            ),
        }
    }

    /// The chunk walk of masked tensor `name` with no values read ([`Delta::chunks`]); a
    /// fine-tune's reads its values as it walks.
    pub fn chunks<'a>(&'a self, name: &'a str) -> Chunks<'a> {
        match self {
            Input::Delta(d) => d.chunks(name),
            Input::Tuned(f) => Chunks::tuned(
                f.tuned.path(),
                name,
                self.mask(name),
                f.params.chunk,
                f.entries[name].numel(),
                Box::new(f.tuned.tensor(name).expect("planned from its tensors")),
                f.allow_nonfinite,
            ),
        }
    }

    /// The chunk walk of masked tensor `name` over elements `range`, the kept values of a
    /// delta file read into `buf` ([`Delta::chunks_in`]); a fine-tune's reads its values as it
    /// walks.
    pub fn chunks_in<'a>(
        &'a self,
        name: &'a str,
        range: Range<u64>,
        buf: &'a mut Vec<u8>,
    ) -> Result<Chunks<'a>> {
        match self {
            Input::Delta(d) => d.chunks_in(name, range, buf),
            Input::Tuned(_) => Ok(self.chunks(name)),
        }
    }

    /// Tensor `name` as stored: a tensor that replaces the base's or is new (`whole`, not a
    /// float tensor of the base), stored as it is in a delta file and in a fine-tune alike; of
    /// a delta file, also a masked tensor's kept values.
    pub fn stored(&self, name: &str) -> Tensor<'_> {
        match self {
            Input::Delta(d) => d.stored(name),
            Input::Tuned(f) => f
                .tuned
                .tensor(name)
                .and_then(|t| t.stored())
                .expect("a whole tensor of a fine-tune is stored"),
        }
    }

    /// Calls `f` with the values of elements `range` of `whole` float tensor `name` of the base
    /// (every element kept, docs/FORMAT.md section 8), as bytes of `from` (a delta file's read
    /// into `buf`). A fine-tune's must be finite unless allowed.
    pub fn with_whole_values<R>(
        &self,
        name: &str,
        from: Float,
        range: Range<u64>,
        buf: &mut Vec<u8>,
        f: impl FnOnce(&[u8]) -> Result<R>,
    ) -> Result<R> {
        let size = from.size();
        match self {
            Input::Delta(d) => {
                let bytes = range.start as usize * size..range.end as usize * size;
                f(d.stored(name).read(bytes, buf)?)
            }
            Input::Tuned(t) => {
                let tensor = t.tuned.tensor(name).expect("planned from its tensors");
                let start = range.start;
                tensor.with_values(range, |bytes| {
                    if !t.allow_nonfinite && let Some(k) = from.first_nonfinite(bytes) {
                        bail!(
                            "{}: tensor {name}: element {} is NaN or infinite; nothing was written. Pass --allow-nonfinite to merge it anyway",
                            t.tuned.path().display(),
                            start + k as u64
                        );
                    }
                    f(bytes)
                })
            }
        }
    }

    /// The new rows of grown tensor `name` (docs/FORMAT.md section 12), as they are stored; `None`
    /// when it did not grow.
    pub fn grown_rows(&self, name: &str) -> Option<Tensor<'_>> {
        match self {
            Input::Delta(d) => d.grown_rows(name),
            Input::Tuned(f) => {
                let e = f.entries.get(name)?;
                e.grown_shape.as_ref()?;
                let all = f.tuned.tensor(name)?.stored()?;
                Some(all.tail((e.numel() * e.dtype.bitsize() as u64 / 8) as usize))
            }
        }
    }

    /// The fine-tune's own files the delta carries, by name (docs/FORMAT.md section 13).
    pub fn own_files(&self) -> &BTreeMap<String, Vec<u8>> {
        match self {
            Input::Delta(d) => d.own_files(),
            Input::Tuned(f) => &f.own_files,
        }
    }

    /// The fingerprint of what the input holds, for a recipe ([`Tuned::fingerprint`] for a
    /// fine-tune).
    pub fn fingerprint(&self) -> Result<String> {
        match self {
            Input::Delta(d) => d.checkpoint().fingerprint(),
            Input::Tuned(f) => f.tuned.fingerprint(),
        }
    }

    /// Whether a fine-tune's NaN and infinite values are merged (`false` for a delta file,
    /// whose values extract checked).
    pub fn allows_nonfinite(&self) -> bool {
        match self {
            Input::Delta(_) => false,
            Input::Tuned(f) => f.allow_nonfinite,
        }
    }

    /// The delta file, when the input is one (its recorded base hashes are checked).
    pub fn delta(&self) -> Option<&Delta> {
        match self {
            Input::Delta(d) => Some(d),
            Input::Tuned(_) => None,
        }
    }

    /// What the input is, for the merge's record: `delta`, `fine-tune` or `lora`.
    pub fn kind(&self) -> &'static str {
        match self {
            Input::Delta(_) => "delta",
            Input::Tuned(f) => match f.tuned {
                Tuned::Checkpoint(_) => "fine-tune",
                Tuned::Lora(_) => "lora",
            },
        }
    }

    /// The checkpoint its tensors are read from.
    pub fn checkpoint(&self) -> &Checkpoint {
        match self {
            Input::Delta(d) => d.checkpoint(),
            Input::Tuned(f) => f.tuned.checkpoint(),
        }
    }

    /// Paths besides its checkpoint's that an output must not overwrite (an adapter's folder).
    pub fn protected_paths(&self) -> Vec<&Path> {
        match self {
            Input::Delta(_) => Vec::new(),
            Input::Tuned(f) => f.tuned.protected_paths(),
        }
    }

    /// Whether tensor `name` is carried `masked` (a kept-value walk applies).
    pub fn is_masked(&self, name: &str) -> bool {
        self.entries()
            .get(name)
            .is_some_and(|e| e.kind == Kind::Masked)
    }
}
