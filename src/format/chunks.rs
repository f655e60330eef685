//! The chunk walk of a masked tensor (docs/FORMAT.md section 6): which kept value belongs to
//! which element. This is the one place that reads a tensor's chunk offsets against its mask.
//! The CPU merge, `inspect` and the CUDA host code all go through it, so a file whose walk
//! disagrees with its offsets is refused in one way, with one message, whichever reads it.
//!
//! A fine-tune given to `merge` in place of a delta file ([`crate::tuned`]) is walked here too:
//! its kept values are read from the fine-tuned tensor itself as the walk reaches them, the
//! values its delta file would store, so that every reader of kept values takes either
//! unchanged.

use std::ops::Range;
use std::path::Path;

use anyhow::{Result, anyhow, bail};

use super::Delta;
use crate::dtype::Float;
use crate::mask::Mask;

/// Elements of a fine-tune's tensor read at a time by the chunk walk (a multiple of 64).
const DENSE_PIECE: u64 = 1 << 16;

/// A tensor whose kept values are read from its dense values as the walk reaches them: a
/// fine-tune's tensor (implemented by [`crate::tuned::TunedTensor`]).
pub trait Dense: Sync {
    /// The element type of its values.
    fn float(&self) -> Float;
    /// Calls `f` with the values of elements `range`, as little-endian bytes of
    /// [`Dense::float`], and returns what `f` returns.
    fn with_values(&self, range: Range<u64>, f: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()>;
}

/// The chunks of masked tensor `name` of a delta (a file's, or a fine-tune's taken as it is
/// read), and where the kept values a reader walks come from.
pub struct Chunks<'a> {
    file: &'a Path,
    name: &'a str,
    /// The tensor's mask.
    pub mask: Mask,
    /// Elements per chunk.
    pub chunk: u64,
    /// Elements of the tensor.
    pub numel: u64,
    values: Values<'a>,
}

/// Where the kept values come from.
enum Values<'a> {
    /// A delta file's: its chunk offsets (the index of each chunk's first kept value, then the
    /// kept count), and the kept values read ([`Delta::chunks_in`]) from value index `first`
    /// on, for the elements `loaded` (whole chunks); none from [`Delta::chunks`].
    Stored {
        offsets: &'a [u64],
        values: &'a [u8],
        first: u64,
        loaded: Range<u64>,
    },
    /// A fine-tune's: the fine-tuned tensor, read at the kept elements. Its values must be
    /// finite unless `allow_nonfinite` (as `extract` requires of a fine-tune).
    Tuned {
        tensor: Box<dyn Dense + 'a>,
        allow_nonfinite: bool,
    },
}

impl Delta {
    /// The chunk walk of masked tensor `name` with no values read: its mask, offsets and ranks,
    /// and [`Chunks::corrupt`]. To visit kept values, [`Delta::chunks_in`].
    pub fn chunks<'a>(&'a self, name: &'a str) -> Chunks<'a> {
        Chunks {
            file: self.path(),
            name,
            mask: self.mask(name),
            chunk: self.params().chunk,
            numel: self.entries()[name].numel(),
            values: Values::Stored {
                offsets: self.offsets(name),
                values: &[],
                first: 0,
                loaded: 0..0,
            },
        }
    }

    /// The chunk walk of masked tensor `name` over elements `range`, with the kept values of
    /// the chunks it touches read into `buf` (borrowed from the map under `--io mmap`): a
    /// reader going tile by tile holds one tile's values, not the tensor's.
    pub fn chunks_in<'a>(
        &'a self,
        name: &'a str,
        range: Range<u64>,
        buf: &'a mut Vec<u8>,
    ) -> Result<Chunks<'a>> {
        let c = self.chunks(name);
        let offsets = self.offsets(name);
        let size = self.entries()[name].dtype.bitsize() / 8;
        let last = offsets.len() as u64 - 1;
        let c0 = (range.start / c.chunk).min(last);
        let c1 = range.end.div_ceil(c.chunk).clamp(c0, last);
        let (j0, j1) = (offsets[c0 as usize], offsets[c1 as usize]);
        let values = self
            .stored(name)
            .read(j0 as usize * size..j1 as usize * size, buf)?;
        Ok(Chunks {
            values: Values::Stored {
                offsets,
                values,
                first: j0,
                loaded: c0 * c.chunk..c.numel.min(c1 * c.chunk),
            },
            ..c
        })
    }
}

impl<'a> Chunks<'a> {
    /// The walk of tensor `name` of the fine-tune at `file` masked by `mask`, as its delta
    /// would store it (in chunks of `chunk` elements), its kept values read from `tensor`.
    /// The walk fails on a value that is NaN or infinite unless `allow_nonfinite`.
    pub fn tuned(
        file: &'a Path,
        name: &'a str,
        mask: Mask,
        chunk: u64,
        numel: u64,
        tensor: Box<dyn Dense + 'a>,
        allow_nonfinite: bool,
    ) -> Chunks<'a> {
        Chunks {
            file,
            name,
            mask,
            chunk,
            numel,
            values: Values::Tuned {
                tensor,
                allow_nonfinite,
            },
        }
    }

    /// A delta file's chunk offsets; `None` for a fine-tune, whose values are read as the walk
    /// goes (the GPU path takes only stored values).
    pub fn offsets(&self) -> Option<&'a [u64]> {
        match self.values {
            Values::Stored { offsets, .. } => Some(offsets),
            Values::Tuned { .. } => None,
        }
    }
}

impl<'a> Chunks<'a> {
    /// The error for chunk `ci`, whose walk found `kept` values where its offsets say
    /// otherwise.
    pub fn corrupt(&self, ci: u64, kept: u64) -> anyhow::Error {
        let said = match self.values {
            Values::Stored { offsets, .. } => offsets[ci as usize + 1] - offsets[ci as usize],
            Values::Tuned { .. } => kept,
        };
        anyhow!(
            "{}: tensor {}: chunk {ci} keeps {kept} elements but its offsets say {said}; the file is corrupt",
            self.file.display(),
            self.name,
        )
    }

    /// [`Chunks::corrupt`] for chunk `ci`, counting its kept elements (for a reader, such as
    /// the GPU, that reports only which chunk went wrong).
    pub fn corrupt_chunk(&self, ci: u64) -> anyhow::Error {
        let start = ci * self.chunk;
        let kept = self
            .mask
            .count_kept(start..self.numel.min(start + self.chunk));
        self.corrupt(ci, kept)
    }

    /// Calls `visit(k, v)` for each kept element of `range`, in order: `k` its index from
    /// `range.start`, `v` its kept value read as `from`, in f64. The element-by-element form of
    /// [`Chunks::for_each_kept_word`], for readers off the hot path.
    pub fn for_each_kept(
        &self,
        from: Float,
        range: Range<u64>,
        mut visit: impl FnMut(usize, f64),
    ) -> Result<()> {
        self.for_each_kept_word(from.size(), range, None, |k0, word, values| {
            let mut bits = word;
            let mut j = 0;
            while bits != 0 {
                visit(k0 + bits.trailing_zeros() as usize, from.load(values, j));
                j += 1;
                bits &= bits - 1;
            }
        })
    }

    /// The tensor's unbiased estimate (docs/METHODS.md) into `tau`: `s · (v − b)` at kept
    /// elements (`v` the kept value, `b` the base element of `base`, read as `from`), `+0.0`
    /// elsewhere. Fails, naming the file and the tensor, where it is not finite.
    pub fn estimate(&self, from: Float, base: &[f64], s: f64, tau: &mut Vec<f64>) -> Result<()> {
        tau.clear();
        tau.resize(base.len(), 0.0);
        let mut bad: Option<usize> = None;
        self.for_each_kept(from, 0..base.len() as u64, |k, v| {
            let t = s * (v - base[k]);
            if !t.is_finite() && bad.is_none() {
                bad = Some(k);
            }
            tau[k] = t;
        })?;
        if let Some(k) = bad {
            bail!(
                "{}: tensor {}: element {k}: the unbiased estimate (kept value − base) / density is {}; ties, iso and tsv need finite differences (merge with --method sum instead)",
                self.file.display(),
                self.name,
                tau[k]
            );
        }
        Ok(())
    }

    /// A cursor that gives the value index at any element, for readers that start mid-chunk;
    /// `None` for a fine-tune, which stores no values to index.
    pub fn ranker(&self) -> Option<Ranker<'_>> {
        Some(Ranker {
            chunks: self,
            offsets: self.offsets()?,
            prev: None,
        })
    }

    /// Walks the kept elements over `range` (within the range the values were read for):
    /// calls `visit(k0, word, values)` for each non-empty
    /// word, where bit `k` of `word` is element `range.start + k0 + k` and `values` holds
    /// exactly the kept values of its set bits, in order (`size` bytes each). `tile_words`, when
    /// given, are the mask's keep words over `range` (bit `k` of word `w` is element
    /// `range.start + 64·w + k`), already computed by the caller; otherwise the mask is
    /// evaluated here.
    ///
    /// Every chunk's walk is checked against its offsets, and a file that disagrees is refused
    /// before any value past its limit is read.
    ///
    /// A fine-tune's values are read from its tensor over `range`; a value there that is NaN or
    /// infinite fails the walk unless allowed, naming the fine-tune and the tensor.
    #[inline]
    pub fn for_each_kept_word(
        &self,
        size: usize,
        range: Range<u64>,
        tile_words: Option<&[u64]>,
        visit: impl FnMut(usize, u64, &[u8]),
    ) -> Result<()> {
        match &self.values {
            Values::Stored { .. } => self.walk_stored(size, range, tile_words, visit).map(|_| ()),
            Values::Tuned {
                tensor,
                allow_nonfinite,
            } => self.walk_dense(&**tensor, *allow_nonfinite, size, range, tile_words, visit),
        }
    }

    /// The kept values of `range` in one run, and their keep words into `words` (one per 64
    /// elements of `range`: bit `k` of word `w` is element `range.start + 64·w + k`): the bits
    /// and values [`Chunks::for_each_kept_word`] walks, so that a kernel can take every term's
    /// values of one word at once. The run holds the values in element order, `size` bytes
    /// each (word `w`'s follow those of the words before it): a delta file's borrowed from the
    /// values read, a fine-tune's gathered into `gathered`.
    pub fn kept_run<'b>(
        &self,
        size: usize,
        range: Range<u64>,
        tile_words: Option<&[u64]>,
        words: &mut Vec<u64>,
        gathered: &'b mut Vec<u8>,
    ) -> Result<&'b [u8]>
    where
        'a: 'b,
    {
        words.clear();
        words.resize((range.end - range.start).div_ceil(64) as usize, 0);
        let mut put = |k0: usize, word: u64| {
            // Words of a chunk size that is not a multiple of 64 straddle two of ours.
            let (w, shift) = (k0 / 64, k0 % 64);
            words[w] |= word << shift;
            if shift != 0 && w + 1 < words.len() {
                words[w + 1] |= word >> (64 - shift);
            }
        };
        match self.values {
            Values::Stored { values, first, .. } => {
                let (j0, j1) =
                    self.walk_stored(size, range, tile_words, |k0, word, _| put(k0, word))?;
                let at = |j: u64| (j - first) as usize * size;
                Ok(&values[at(j0)..at(j1)])
            }
            Values::Tuned { .. } => {
                gathered.clear();
                self.for_each_kept_word(size, range, tile_words, |k0, word, values| {
                    put(k0, word);
                    gathered.extend_from_slice(values);
                })?;
                Ok(gathered)
            }
        }
    }

    /// [`Chunks::for_each_kept_word`] over a delta file's stored values; returns the value
    /// indices of the first kept element of `range` and of the one past its last.
    #[inline]
    fn walk_stored(
        &self,
        size: usize,
        range: Range<u64>,
        tile_words: Option<&[u64]>,
        mut visit: impl FnMut(usize, u64, &[u8]),
    ) -> Result<(u64, u64)> {
        let Values::Stored {
            offsets,
            values,
            first,
            loaded,
        } = &self.values
        else {
            unreachable!("called on stored values only");
        };
        let (offsets, values, first) = (*offsets, *values, *first);
        debug_assert!(
            range.is_empty() || (loaded.start <= range.start && range.end <= loaded.end),
            "tensor {}: elements {range:?} walked with the values of {loaded:?} read",
            self.name,
        );
        let chunk = self.chunk;
        let lo = range.start;
        let mut ci = lo / chunk;
        let mut j = offsets[ci as usize] + self.mask.count_kept(ci * chunk..lo);
        let start = j;
        let mut pos = lo;
        while pos < range.end {
            let chunk_end = self.numel.min((ci + 1) * chunk);
            let end = chunk_end.min(range.end);
            let limit = offsets[ci as usize + 1];
            let mut overrun = false;
            let mut step = |start: u64, word: u64| {
                let kept = word.count_ones() as u64;
                if overrun || j + kept > limit {
                    overrun = true;
                    j += kept;
                    return;
                }
                if word != 0 {
                    let at = (j - first) as usize * size;
                    visit(
                        (start - lo) as usize,
                        word,
                        &values[at..at + kept as usize * size],
                    );
                }
                j += kept;
            };
            let (from, to) = (pos - lo, end - lo);
            match tile_words {
                Some(words) if from.is_multiple_of(64) => {
                    // The caller's words, the last one cut at the chunk's end.
                    let (w0, w1) = ((from / 64) as usize, to.div_ceil(64) as usize);
                    for (w, &word) in words.iter().enumerate().take(w1).skip(w0) {
                        let cut = if w + 1 == w1 && !to.is_multiple_of(64) {
                            word & ((1u64 << (to % 64)) - 1)
                        } else {
                            word
                        };
                        step(lo + 64 * w as u64, cut);
                    }
                }
                // No words given, or a chunk size that is not a multiple of 64 (never written
                // by this tool).
                _ => self.mask.for_each_word(pos..end, step),
            }
            if overrun || (end == chunk_end && j != limit) {
                return Err(self.corrupt(ci, j - offsets[ci as usize]));
            }
            pos = end;
            ci += 1;
        }
        Ok((start, j))
    }
}

impl Chunks<'_> {
    /// [`Chunks::for_each_kept_word`] over a fine-tune's tensor: each word's kept values are
    /// the tensor's own elements at its set bits, taken in place when the word keeps all 64
    /// and gathered otherwise. The values are asked for [`DENSE_PIECE`] elements at a time, so
    /// that a tensor computed as it is read (a LoRA product) is held a piece at a time, however
    /// long `range` is.
    fn walk_dense(
        &self,
        tensor: &dyn Dense,
        allow_nonfinite: bool,
        size: usize,
        range: Range<u64>,
        tile_words: Option<&[u64]>,
        mut visit: impl FnMut(usize, u64, &[u8]),
    ) -> Result<()> {
        let float = tensor.float();
        debug_assert_eq!(float.size(), size);
        let mut piece = range.start;
        while piece < range.end {
            let end = range.end.min(piece + DENSE_PIECE);
            // Offsets from `range.start`; a piece starts on a word of `tile_words`.
            let (p0, n) = ((piece - range.start) as usize, (end - range.start) as usize);
            tensor.with_values(piece..end, &mut |bytes| {
                if !allow_nonfinite && let Some(k) = float.first_nonfinite(bytes) {
                    bail!(
                        "{}: tensor {}: element {} is NaN or infinite; nothing was written. Pass --allow-nonfinite to merge it anyway",
                        self.file.display(),
                        self.name,
                        piece + k as u64
                    );
                }
                let mut gathered = [0u8; 64 * 8];
                // `k0` counts from `range.start`; `bytes` from the piece.
                let mut word_at = |k0: usize, word: u64| {
                    if word == 0 {
                        return;
                    }
                    let block = &bytes[(k0 - p0) * size..((k0 + 64).min(n) - p0) * size];
                    if word == !0 {
                        visit(k0, word, block);
                        return;
                    }
                    let mut bits = word;
                    let mut j = 0;
                    while bits != 0 {
                        let k = bits.trailing_zeros() as usize;
                        gathered[j..j + size].copy_from_slice(&block[k * size..(k + 1) * size]);
                        j += size;
                        bits &= bits - 1;
                    }
                    visit(k0, word, &gathered[..j]);
                };
                match tile_words {
                    Some(words) => {
                        let this_piece = words.iter().enumerate().take(n.div_ceil(64));
                        for (w, &word) in this_piece.skip(p0 / 64) {
                            let cut = if (w + 1) * 64 > n {
                                word & ((1u64 << (n % 64)) - 1)
                            } else {
                                word
                            };
                            word_at(64 * w, cut);
                        }
                    }
                    None => self.mask.for_each_word(piece..end, |start, word| {
                        word_at((start - range.start) as usize, word)
                    }),
                }
                Ok(())
            })?;
            piece = end;
        }
        Ok(())
    }
}

/// The value index at element `s` of a masked tensor: `offsets[s / C]` on a chunk boundary,
/// else counted from the chunk start or from the previous rank asked for in the same chunk.
/// Counting only happens for chunk sizes that are not divisors of the reader's tile (this tool
/// always writes 65536), and then covers each element at most once.
pub struct Ranker<'c> {
    chunks: &'c Chunks<'c>,
    offsets: &'c [u64],
    prev: Option<(u64, u64)>,
}

impl Ranker<'_> {
    /// The index of the first kept value at or after element `s`.
    pub fn at(&mut self, s: u64) -> u64 {
        let (c, offsets) = (self.chunks, self.offsets);
        let kept = *offsets.last().unwrap();
        if s >= c.numel {
            return kept;
        }
        let j = s / c.chunk;
        let start = j * c.chunk;
        let r = if s == start {
            offsets[j as usize]
        } else {
            match self.prev {
                Some((ps, pr)) if ps >= start && ps <= s => pr + c.mask.count_kept(ps..s),
                _ => offsets[j as usize] + c.mask.count_kept(start..s),
            }
        };
        self.prev = Some((s, r));
        r
    }
}
