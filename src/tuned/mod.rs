//! Fine-tuned models as inputs: what `extract` diffs, and what `merge --tuned` and `apply` take
//! a delta of on the fly, without a delta file.
//!
//! A fine-tune is a checkpoint, or a PEFT LoRA adapter of the base ([`lora`]). Either way its
//! tensors are read through [`TunedTensor`], and [`plan_kinds`] decides how each one is carried
//! (docs/FORMAT.md section 3): the one decision that `extract` writes into a delta file and that
//! `merge` follows for a fine-tune, so that the two give the same bytes.

pub mod lora;

use std::ops::Range;
use std::path::Path;

use anyhow::{Context, Result, bail};
use globset::{Glob, GlobSet, GlobSetBuilder};
use safetensors::Dtype;

use crate::dtype::Float;
use crate::format::{Entry, Kind, RESERVED_PREFIX};
use crate::io::with_buffer;
use crate::io::{Checkpoint, IoMode, Tensor};

/// Which tensors are masked: those matching an include pattern (all, when none is given) and
/// no exclude pattern. The others are stored whole when they differ from the base.
#[derive(Clone, Debug, Default)]
pub struct Selector {
    include: Option<GlobSet>,
    exclude: Option<GlobSet>,
    /// What the patterns see before each name: the key prefix of a subfolder weight file
    /// (docs/FORMAT.md section 15), empty at the top level.
    prefix: String,
}

impl Selector {
    /// Builds a selector from glob patterns (`*` matches across dots).
    pub fn new(include: &[String], exclude: &[String]) -> Result<Self> {
        let build = |pats: &[String]| -> Result<Option<GlobSet>> {
            if pats.is_empty() {
                return Ok(None);
            }
            let mut b = GlobSetBuilder::new();
            for p in pats {
                b.add(Glob::new(p).with_context(|| format!("invalid pattern {p:?}"))?);
            }
            Ok(Some(b.build()?))
        };
        Ok(Selector {
            include: build(include)?,
            exclude: build(exclude)?,
            prefix: String::new(),
        })
    }

    /// This selector for the tensors of a subfolder weight file, whose patterns match their
    /// keys under `prefix` (docs/FORMAT.md section 15).
    pub fn under(&self, prefix: &str) -> Selector {
        Selector {
            prefix: prefix.to_string(),
            ..self.clone()
        }
    }

    /// Whether tensor `name` is selected for masking.
    pub fn selects(&self, name: &str) -> bool {
        let key = format!("{}{name}", self.prefix);
        self.include.as_ref().is_none_or(|g| g.is_match(&key))
            && !self.exclude.as_ref().is_some_and(|g| g.is_match(&key))
    }
}

/// A tensor of a fine-tune, as the header of a checkpoint describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunedInfo {
    /// Element type.
    pub dtype: Dtype,
    /// Shape, row-major.
    pub shape: Vec<usize>,
    /// Bytes of its data.
    pub len: u64,
}

impl TunedInfo {
    /// Number of elements (1 for a 0-d tensor).
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
}

/// A fine-tuned model: a checkpoint, or a LoRA adapter over the base `'b`.
pub enum Tuned<'b> {
    /// A full fine-tune: a `.safetensors` file or a model folder.
    Checkpoint(Checkpoint),
    /// A PEFT LoRA adapter folder, read as the fine-tune it stands for ([`lora`]).
    Lora(lora::Adapter<'b>),
}

impl<'b> Tuned<'b> {
    /// Opens `path` as a fine-tune of `base`: a LoRA adapter when it is a folder holding
    /// `adapter_config.json`, a checkpoint otherwise.
    pub fn open(path: &Path, base: &'b Checkpoint, io: IoMode) -> Result<Tuned<'b>> {
        if lora::is_adapter(path) {
            return Ok(Tuned::Lora(lora::Adapter::open(path, base, io)?));
        }
        Ok(Tuned::Checkpoint(Checkpoint::open_with(path, io)?))
    }

    /// The path given, for messages.
    pub fn path(&self) -> &Path {
        match self {
            Tuned::Checkpoint(c) => c.path(),
            Tuned::Lora(a) => a.path(),
        }
    }

    /// The checkpoint that holds its stored tensors (the adapter's weights for a LoRA).
    pub fn checkpoint(&self) -> &Checkpoint {
        match self {
            Tuned::Checkpoint(c) => c,
            Tuned::Lora(a) => a.checkpoint(),
        }
    }

    /// Every path that an output must not overwrite: the checkpoint's, and for an adapter its
    /// folder and configuration too.
    pub fn protected_paths(&self) -> Vec<&Path> {
        match self {
            Tuned::Checkpoint(_) => Vec::new(),
            Tuned::Lora(a) => a.protected_paths(),
        }
    }

    /// Its tensors, in name order.
    pub fn tensors(&self) -> Vec<(&str, TunedInfo)> {
        match self {
            Tuned::Checkpoint(c) => c
                .tensors()
                .iter()
                .map(|(n, i)| (n.as_str(), checkpoint_info(i)))
                .collect(),
            Tuned::Lora(a) => a.tensors(),
        }
    }

    /// Tensor `name`'s header entry.
    pub fn info(&self, name: &str) -> Option<TunedInfo> {
        match self {
            Tuned::Checkpoint(c) => c.info(name).map(checkpoint_info),
            Tuned::Lora(a) => a.info(name),
        }
    }

    /// Tensor `name`, to read.
    pub fn tensor(&self, name: &str) -> Option<TunedTensor<'_>> {
        match self {
            Tuned::Checkpoint(c) => {
                let tensor = c.tensor(name)?;
                Some(TunedTensor::Stored {
                    float: Float::of(tensor.info().dtype),
                    tensor,
                })
            }
            Tuned::Lora(a) => a.tensor(name),
        }
    }

    /// Whether tensor `name` is byte for byte the base's (`base` its base tensor, of the same
    /// dtype and shape, or the first rows of a grown one). Reads both only up to their first
    /// difference, unless they are equal.
    fn same_as_base(&self, name: &str, base: Tensor) -> Result<bool> {
        match self {
            Tuned::Checkpoint(c) => c.tensor(name).expect("listed").starts_with(&base),
            Tuned::Lora(a) => a.same_as_base(name),
        }
    }

    /// Whether tensor `name` is stored whole even where it could be masked: a LoRA adapter's
    /// `modules_to_save` (docs/LORA.md).
    fn stored_whole(&self, name: &str) -> bool {
        match self {
            Tuned::Checkpoint(_) => false,
            Tuned::Lora(a) => a.stored_whole(name),
        }
    }

    /// The fingerprint of what it holds, for a recipe: its checkpoint's (docs/FORMAT.md
    /// section 7); an adapter's also covers its configuration, which scales the product.
    pub fn fingerprint(&self) -> Result<String> {
        match self {
            Tuned::Checkpoint(c) => c.fingerprint(),
            Tuned::Lora(a) => a.fingerprint(),
        }
    }

    /// The safetensors files read.
    pub fn files(&self) -> Vec<&Path> {
        self.checkpoint().files()
    }

    /// The size of its safetensors files in bytes.
    pub fn file_len(&self) -> u64 {
        self.checkpoint().file_len()
    }

    /// Fails if a file changed since it was opened (see [`Checkpoint::check_unchanged`]).
    pub fn check_unchanged(&self) -> Result<()> {
        self.checkpoint().check_unchanged()
    }

    /// Hints sequential reading of its files.
    pub fn advise_sequential(&self) {
        self.checkpoint().advise_sequential()
    }
}

fn checkpoint_info(i: &crate::io::TensorInfo) -> TunedInfo {
    TunedInfo {
        dtype: i.dtype,
        shape: i.shape.clone(),
        len: i.range.len() as u64,
    }
}

/// One tensor of a fine-tune: stored bytes, or values computed as they are read (a LoRA
/// product over the base, or a stored tensor cast to the base's dtype).
pub enum TunedTensor<'a> {
    /// Bytes as stored, `float` their element type (`None` for other dtypes).
    Stored {
        /// The tensor as stored.
        tensor: Tensor<'a>,
        /// Their float type.
        float: Option<Float>,
    },
    /// Computed from a LoRA adapter ([`lora::Computed`]).
    Computed(lora::Computed<'a>),
}

impl<'a> TunedTensor<'a> {
    /// The float type of its values (`None` for integer, bool and 8-bit float dtypes).
    pub fn float(&self) -> Option<Float> {
        match self {
            TunedTensor::Stored { float, .. } => *float,
            TunedTensor::Computed(c) => Some(c.float()),
        }
    }

    /// Calls `f` with the fine-tuned values of elements `range` (a float tensor's), as
    /// little-endian bytes of its dtype. Stored bytes are read as [`Tensor::read`] reads them
    /// (in place under `--io mmap`); computed ones are formed in a buffer of the calling
    /// thread, so `f` must not read another computed tensor.
    pub fn with_values<R>(
        &self,
        range: Range<u64>,
        f: impl FnOnce(&[u8]) -> Result<R>,
    ) -> Result<R> {
        match self {
            TunedTensor::Stored { tensor, float } => {
                let size = float.expect("a float tensor").size();
                let bytes = range.start as usize * size..range.end as usize * size;
                with_buffer(|buf| f(tensor.read(bytes, buf)?))
            }
            TunedTensor::Computed(c) => c.with_values(range, f),
        }
    }

    /// The tensor as stored, when it is stored rather than computed.
    pub fn stored(&self) -> Option<Tensor<'a>> {
        match self {
            TunedTensor::Stored { tensor, .. } => Some(*tensor),
            TunedTensor::Computed(_) => None,
        }
    }
}

impl crate::format::Dense for TunedTensor<'_> {
    fn float(&self) -> Float {
        TunedTensor::float(self).expect("a masked tensor is a float tensor")
    }

    fn with_values(&self, range: Range<u64>, f: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        TunedTensor::with_values(self, range, f)
    }
}

/// One tensor of a fine-tune as a delta carries it: its entry (`kept` left unset), and the
/// base tensor's hash where deciding the kind read it whole (a tensor equal to the base).
pub struct Planned {
    /// Tensor name.
    pub name: String,
    /// How the tensor is carried.
    pub entry: Entry,
    /// The base tensor's hash, when `hash_same` was asked for and the tensor equals the base.
    pub base_hash: Option<[u8; 32]>,
}

/// Whether tuned tensor `t` is base tensor `b` grown (docs/FORMAT.md section 12): the same dtype
/// (of whole bytes per element), the same dimensions but the first, and more rows.
fn grows(b: &crate::io::TensorInfo, t: &TunedInfo) -> bool {
    b.dtype == t.dtype
        && t.dtype.bitsize().is_multiple_of(8)
        && !b.shape.is_empty()
        && b.shape.len() == t.shape.len()
        && b.shape[1..] == t.shape[1..]
        && t.shape[0] > b.shape[0]
}

/// Decides how each tensor of `tuned` is carried in a delta against `base` (docs/FORMAT.md
/// section 3), in name order: `whole` when new or not maskable (or not selected, or a LoRA
/// adapter's `modules_to_save`), `same` when byte for byte the base's, `masked` otherwise; a
/// tensor with rows added along dimension 0 is grown (section 12), its kind that of the part the
/// base has. Refuses reserved names, a base tensor the fine-tune lacks, and any other change of
/// dtype or shape. With `hash_same`, hashes each tensor found equal to the base while its pages
/// are in memory (extract records the hashes; a model larger than the page cache is then still
/// read once).
pub fn plan_kinds(
    base: &Checkpoint,
    tuned: &Tuned,
    selector: &Selector,
    hash_same: bool,
) -> Result<Vec<Planned>> {
    let tensors = tuned.tensors();
    let reserved = base
        .tensors()
        .keys()
        .map(|n| (base.path(), n.as_str()))
        .chain(tensors.iter().map(|(n, _)| (tuned.path(), *n)))
        .find(|(_, n)| n.starts_with(RESERVED_PREFIX));
    if let Some((path, name)) = reserved {
        bail!(
            "{}: tensor {name}: names beginning with {RESERVED_PREFIX} are reserved by the delta format",
            path.display()
        );
    }
    if let Some(name) = base.tensors().keys().find(|n| tuned.info(n).is_none()) {
        bail!(
            "{}: tensor {name} is in the base {} but not in the fine-tune",
            tuned.path().display(),
            base.path().display()
        );
    }
    let mut plan = Vec::with_capacity(tensors.len());
    for (row, (name, t)) in tensors.into_iter().enumerate() {
        let b = base.info(name);
        // Rows added along dimension 0 (docs/FORMAT.md section 12); any other change refused.
        let grown = b.is_some_and(|b| grows(b, &t));
        if let Some(b) = b
            && (b.dtype != t.dtype || (b.shape != t.shape && !grown))
        {
            bail!(
                "{}: tensor {name} is {:?} {:?}, but the base {} has {:?} {:?}; only rows added along dimension 0 (a vocabulary grown for added tokens) may differ",
                tuned.path().display(),
                t.dtype,
                t.shape,
                base.path().display(),
                b.dtype,
                b.shape
            );
        }
        let kind = match b {
            None => Kind::Whole,
            Some(_) if tuned.same_as_base(name, base.tensor(name).expect("listed"))? => Kind::Same,
            Some(_) if tuned.stored_whole(name) => Kind::Whole,
            Some(_) if Float::of(t.dtype).is_some() && selector.selects(name) => Kind::Masked,
            Some(_) => Kind::Whole,
        };
        let base_hash = match hash_same && kind == Kind::Same {
            true => base.hash_of(name)?,
            false => None,
        };
        plan.push(Planned {
            name: name.to_string(),
            entry: Entry {
                kind,
                dtype: t.dtype,
                // The part the base has: all of it, unless it grew.
                shape: b.map_or_else(|| t.shape.clone(), |b| b.shape.clone()),
                row,
                kept: None,
                in_base: b.is_some(),
                grown_shape: grown.then(|| t.shape.clone()),
            },
            base_hash,
        });
    }
    Ok(plan)
}
