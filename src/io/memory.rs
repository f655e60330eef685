//! Tensors in memory instead of files: a merge's output kept as named buffers
//! ([`MemoryOutput`], the in-memory [`Sink`] beside the file [`Output`](super::Output)), and a
//! safetensors image built from in-memory tensors to be read as a checkpoint
//! ([`MemoryImage`]). The Python package returns the first as numpy arrays and builds the second
//! from a state dict.

use std::collections::HashMap;
use std::sync::Mutex;

use anyhow::{Context, Result, bail};

use super::layout::{OutTensor, header};
use super::output::Sink;
use super::target::Cancel;

/// Bytes in memory, 8-byte aligned, so that tensor data of any dtype can be viewed in place
/// (numpy and torch want their elements aligned).
pub struct AlignedBytes {
    words: Vec<u64>,
    len: usize,
}

impl AlignedBytes {
    /// `len` zero bytes. Allocated zeroed, so the pages come from the system untouched and
    /// only the ones written cost anything.
    pub fn zeroed(len: usize) -> Self {
        AlignedBytes {
            words: vec![0; len.div_ceil(8)],
            len,
        }
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: `words` holds at least `len` initialized bytes, and u8 has no alignment or
        // validity requirement.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast(), self.len) }
    }

    /// The bytes, to write.
    pub fn as_mut_bytes(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_bytes`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast(), self.len) }
    }

    /// The number of bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One tensor of an in-memory output.
pub struct MemoryTensor {
    /// Tensor key.
    pub name: String,
    /// Element type.
    pub dtype: safetensors::Dtype,
    /// Shape, row-major.
    pub shape: Vec<usize>,
    /// The little-endian data, exactly the bytes a file output would hold for it.
    pub data: AlignedBytes,
}

/// A merge's output kept in memory: every tensor of the layout gets a zeroed buffer of its
/// length, and writes land in it as they would in the file. Writes to one tensor take its lock
/// in turn (the file output serializes writes to one file the same way).
pub struct MemoryOutput {
    tensors: Vec<(OutTensor, Mutex<AlignedBytes>)>,
    index: HashMap<String, usize>,
    cancel: Cancel,
}

impl MemoryOutput {
    /// Buffers for `tensors`, in the given order; writes fail once `cancel` is set.
    pub fn create(tensors: &[OutTensor], cancel: Cancel) -> Result<Self> {
        let mut index = HashMap::with_capacity(tensors.len());
        let mut out = Vec::with_capacity(tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            if index.insert(t.name.clone(), i).is_some() {
                bail!("tensor {} appears twice in the output", t.name);
            }
            let len = usize::try_from(t.len)
                .with_context(|| format!("tensor {}: too large for memory", t.name))?;
            out.push((t.clone(), Mutex::new(AlignedBytes::zeroed(len))));
        }
        Ok(MemoryOutput {
            tensors: out,
            index,
            cancel,
        })
    }

    /// The tensors, in layout order.
    pub fn into_tensors(self) -> Vec<MemoryTensor> {
        self.tensors
            .into_iter()
            .map(|(t, data)| MemoryTensor {
                name: t.name,
                dtype: t.dtype,
                shape: t.shape,
                data: data.into_inner().unwrap_or_else(|e| e.into_inner()),
            })
            .collect()
    }
}

impl Sink for MemoryOutput {
    fn write(&self, name: &str, at: u64, bytes: &[u8]) -> Result<()> {
        self.cancel.check()?;
        let Some(&i) = self.index.get(name) else {
            bail!("tensor {name} is not in the output");
        };
        let mut data = self.tensors[i].1.lock().unwrap_or_else(|e| e.into_inner());
        let dest = usize::try_from(at).ok().and_then(|at| {
            data.as_mut_bytes()
                .get_mut(at..at.checked_add(bytes.len())?)
        });
        match dest {
            Some(dest) => dest.copy_from_slice(bytes),
            None => bail!(
                "tensor {name}: a write of {} bytes at {at} is past its {} bytes",
                bytes.len(),
                data.len()
            ),
        }
        Ok(())
    }
}

/// A safetensors file's bytes built in memory from named tensors: the header of their layout
/// (the one a file output writes), then each tensor's data, filled in by [`MemoryImage::fill`].
/// [`Checkpoint::from_image`](super::Checkpoint::from_image) reads it like a file.
pub struct MemoryImage {
    pub(super) bytes: AlignedBytes,
    /// Tensor name → its data's byte range in `bytes`.
    ranges: HashMap<String, std::ops::Range<usize>>,
}

impl MemoryImage {
    /// An image of `tensors` (any order; names must be distinct), their data zeroed.
    pub fn new(tensors: &[OutTensor]) -> Result<Self> {
        let (head, offsets, _) = header(tensors, &Default::default())?;
        let end = offsets
            .last()
            .zip(tensors.last())
            .map_or(head.len() as u64, |(o, t)| o + t.len);
        let len = usize::try_from(end).context("the tensors are too large for memory")?;
        let mut bytes = AlignedBytes::zeroed(len);
        bytes.as_mut_bytes()[..head.len()].copy_from_slice(&head);
        let ranges = tensors
            .iter()
            .zip(offsets)
            .map(|(t, o)| (t.name.clone(), o as usize..(o + t.len) as usize))
            .collect();
        Ok(MemoryImage { bytes, ranges })
    }

    /// Copies `data` in as tensor `name`'s bytes; it must be exactly as long as the layout said.
    pub fn fill(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let Some(range) = self.ranges.get(name) else {
            bail!("tensor {name} is not in the image");
        };
        if range.len() != data.len() {
            bail!(
                "tensor {name}: {} bytes of data for a dtype and shape of {} bytes",
                data.len(),
                range.len()
            );
        }
        self.bytes.as_mut_bytes()[range.clone()].copy_from_slice(data);
        Ok(())
    }
}
