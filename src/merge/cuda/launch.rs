//! Launch planning, host only: a tensor cut into slices and, for each, the kernel's inputs
//! (term descriptors, the chunk offsets and start ranks it needs, which bytes of the base and of
//! each delta to upload), staged into one buffer per slot and moved through two slots of a
//! [`SlotDevice`]. tests/cuda_host.rs runs kernels/merge.cu on these inputs on the CPU and
//! compares with the CPU engine, byte for byte.

use std::ops::Range;

use anyhow::{Result, anyhow, bail};

use super::{MAX_TERMS, TERM_WORDS};
use crate::dtype::Float;
use crate::io::{PIECE, Tensor};
use crate::merge::Input;
use crate::merge::plan::{Job, TILE, Term};

/// One term's descriptor: the kernel's calling convention for a term (`SOTU_TERM_WORDS` u64
/// words, laid out in the comment above `sotu_walk_start` in kernels/merge.cu). Written here
/// only, for a launch and for the kernel bench alike; the merge and ties kernels read the same
/// words.
#[derive(Clone, Copy, Debug, Default)]
pub struct TermDesc {
    /// `w_t · s_t` for the merge kernel, `w_t` for the ties kernel (word 0).
    pub coeff: f64,
    /// The term's mask (key words, `lo`, width, chunk size), when it is masked; a whole float
    /// term has every element kept.
    pub mask: Option<MaskDesc>,
    /// Value index of the term's first uploaded value (word 6).
    pub vbase: u64,
    /// Where that value is in the values buffer, in elements of the input dtype (word 7).
    pub vpos: u64,
    /// Values uploaded (word 8).
    pub vcount: u64,
    /// Where the slice's first chunk offset is in the offsets buffer (word 9).
    pub opos: u64,
    /// The slice's first chunk (word 10).
    pub j0: u64,
    /// Where block 0's start rank is in the ranks buffer (word 11).
    pub rpos: u64,
    /// Ties: `s_t`, the rescale of the term's unbiased estimate (word 12; 0 for merge).
    pub scale: f64,
    /// Ties: `θ_t`, the term's trim threshold (word 13; 0 for merge).
    pub theta: f64,
}

/// The mask part of a [`TermDesc`].
#[derive(Clone, Copy, Debug)]
pub struct MaskDesc {
    /// The mask key's two words.
    pub key: (u32, u32),
    /// The keep interval's `lo`.
    pub lo: u64,
    /// `hi − lo`, at most 2^32.
    pub width: u64,
    /// Elements per chunk.
    pub chunk: u64,
}

impl TermDesc {
    /// The descriptor's words, as the kernel reads them.
    pub fn words(&self) -> [u64; TERM_WORDS] {
        let mut w = [0u64; TERM_WORDS];
        w[0] = self.coeff.to_bits();
        if let Some(m) = self.mask {
            w[1] = 1;
            w[2] = m.key.0 as u64 | (m.key.1 as u64) << 32;
            w[3] = m.lo;
            w[4] = m.width;
            w[5] = m.chunk;
        }
        w[6] = self.vbase;
        w[7] = self.vpos;
        w[8] = self.vcount;
        w[9] = self.opos;
        w[10] = self.j0;
        w[11] = self.rpos;
        w[12] = self.scale.to_bits();
        w[13] = self.theta.to_bits();
        w
    }
}

/// Writes `words` little-endian into `buf` from byte `at`.
pub fn put_words(buf: &mut [u8], at: usize, words: &[u64]) {
    for (k, w) in words.iter().enumerate() {
        buf[at + 8 * k..at + 8 * k + 8].copy_from_slice(&w.to_le_bytes());
    }
}

/// The inputs of one kernel launch: elements `[first, first + n)` of one tensor.
#[derive(Clone, Debug)]
pub struct Launch {
    /// First element (a multiple of [`TILE`]).
    pub first: u64,
    /// Elements.
    pub n: u64,
    /// Term descriptors, [`TERM_WORDS`] words each, in term order.
    pub terms: Vec<u64>,
    /// Per term: the byte range of the delta's stored data to upload, and where it goes in the
    /// values buffer (bytes, 8-aligned).
    pub values: Vec<(Range<usize>, usize)>,
    /// Bytes of the values buffer.
    pub values_len: usize,
    /// Chunk offsets the launch reads (per masked term, `opos` indexes them).
    pub offsets: Vec<u64>,
    /// Start ranks of each block, per term (`rpos` indexes them).
    pub ranks: Vec<u64>,
}

impl Launch {
    /// Blocks in the grid.
    pub fn blocks(&self) -> u64 {
        self.n.div_ceil(TILE)
    }

    /// An empty launch of elements `[first, first + n)`.
    pub fn new(first: u64, n: u64) -> Launch {
        Launch {
            first,
            n,
            terms: Vec::new(),
            values: Vec::new(),
            values_len: 0,
            offsets: Vec::new(),
            ranks: Vec::new(),
        }
    }

    /// Adds a term: its descriptor, and `bytes` of its stored data to upload, at `size` bytes
    /// per value. Sets the descriptor's `vpos`.
    pub fn push_term(&mut self, mut desc: TermDesc, bytes: Range<usize>, size: usize) {
        desc.vpos = (self.values_len / size) as u64;
        self.values.push((bytes.clone(), self.values_len));
        self.values_len = (self.values_len + bytes.len()).next_multiple_of(8);
        self.terms.extend_from_slice(&desc.words());
    }
}

/// Cuts the tensor of `job` into slices of at most `slice` elements (a multiple of [`TILE`])
/// and prepares each slice's kernel inputs.
pub fn launches(deltas: &[Input], job: &Job, slice: u64) -> Result<Vec<Launch>> {
    let &Job {
        name,
        numel,
        from,
        terms,
        ties,
        ..
    } = job;
    if ties.is_some_and(|t| t.scale.len() != terms.len() || t.theta.len() != terms.len()) {
        bail!("tensor {name}: ties parameters for another number of terms");
    }
    if slice == 0 || !slice.is_multiple_of(TILE) {
        bail!("slice of {slice} elements: must be a positive multiple of {TILE}");
    }
    if terms.len() > MAX_TERMS {
        bail!(
            "{} deltas change tensor {name}; the GPU takes at most {MAX_TERMS}",
            terms.len()
        );
    }
    let size = from.size();
    let chunks: Vec<_> = terms
        .iter()
        .map(|t| t.masked.then(|| deltas[t.delta].chunks(name)))
        .collect();
    if chunks.iter().flatten().any(|c| c.offsets().is_none()) {
        bail!("tensor {name}: a fine-tune's term is computed on the CPU, not the GPU");
    }
    let mut rankers: Vec<_> = chunks
        .iter()
        .map(|c| c.as_ref().and_then(|c| c.ranker()))
        .collect();
    let mut out = Vec::new();
    let mut first = 0;
    while first < numel {
        let end = numel.min(first + slice);
        let mut l = Launch::new(first, end - first);
        let blocks = l.blocks();
        for (t, ((term, c), ranker)) in terms.iter().zip(&chunks).zip(&mut rankers).enumerate() {
            let mut desc = TermDesc {
                coeff: term.coeff,
                rpos: l.ranks.len() as u64,
                scale: ties.map_or(0.0, |p| p.scale[t]),
                theta: ties.map_or(0.0, |p| p.theta[t]),
                ..TermDesc::default()
            };
            let (Some(c), Some(rk)) = (c, ranker) else {
                // A whole float term: the stored tensor is the value list in index order.
                desc.vbase = first;
                desc.vcount = l.n;
                l.ranks.extend(std::iter::repeat_n(0, blocks as usize));
                l.push_term(desc, first as usize * size..end as usize * size, size);
                continue;
            };
            desc.mask = Some(MaskDesc {
                key: c.mask.key.words(),
                lo: c.mask.interval.lo(),
                width: c.mask.interval.hi() - c.mask.interval.lo(),
                chunk: c.chunk,
            });
            for b in 0..blocks {
                let r = rk.at(first + b * TILE);
                l.ranks.push(r);
            }
            let offsets = c.offsets().expect("checked above");
            let kept = *offsets.last().unwrap();
            // The values this slice reads. Clamped, so that a corrupt file cannot send the
            // upload out of the stored tensor; the kernel then reports the chunk.
            let vlo = l.ranks[desc.rpos as usize].min(kept);
            let vhi = rk.at(end).clamp(vlo, kept);
            let (j0, jl) = (first / c.chunk, (end - 1) / c.chunk);
            desc.vbase = vlo;
            desc.vcount = vhi - vlo;
            desc.opos = l.offsets.len() as u64;
            desc.j0 = j0;
            l.offsets
                .extend_from_slice(&offsets[j0 as usize..=jl as usize + 1]);
            debug_assert!(vhi as usize * size <= deltas[term.delta].stored(name).len());
            l.push_term(desc, vlo as usize * size..vhi as usize * size, size);
        }
        out.push(l);
        first = end;
    }
    Ok(out)
}

/// Turns a kernel's status words into the merge's result: the error of the reported chunk, or
/// the overflow count.
pub fn check_status(deltas: &[Input], name: &str, terms: &[Term], status: [u64; 2]) -> Result<u64> {
    if status[0] != u64::MAX {
        let t = (status[0] & 0xffff) as usize;
        let j = status[0] >> 16;
        let term = terms
            .get(t)
            .ok_or_else(|| anyhow!("tensor {name}: the GPU reported an unknown term {t}"))?;
        return Err(deltas[term.delta].chunks(name).corrupt_chunk(j));
    }
    Ok(status[1])
}

/// Byte layout of one slot's staging, the same on the host and the device: the two status words
/// at 0, term descriptors, offsets, ranks, values, base (all uploaded in one copy), then the
/// output. Each part starts on a 256-byte boundary.
#[derive(Clone, Copy, Debug, Default)]
pub struct Layout {
    /// Term descriptors.
    pub terms: usize,
    /// Chunk offsets.
    pub offsets: usize,
    /// Block start ranks.
    pub ranks: usize,
    /// Kept values.
    pub values: usize,
    /// The base slice.
    pub base: usize,
    /// End of the inputs.
    pub input_end: usize,
    /// The output slice.
    pub out: usize,
    /// End of the staging.
    pub end: usize,
}

impl Layout {
    /// The layout of launch `l`, read as `from`, written as `to`.
    pub fn of(l: &Launch, from: Float, to: Float) -> Layout {
        let a = |x: usize| x.next_multiple_of(256);
        let terms = 256;
        let offsets = a(terms + l.terms.len() * 8);
        let ranks = a(offsets + l.offsets.len() * 8);
        let values = a(ranks + l.ranks.len() * 8);
        let base = a(values + l.values_len);
        let input_end = base + l.n as usize * from.size();
        let out = a(input_end);
        let end = a(out + l.n as usize * to.size());
        Layout {
            terms,
            offsets,
            ranks,
            values,
            base,
            input_end,
            out,
            end,
        }
    }
}

/// Writes a launch's inputs into `buf` (laid out by `lay`): the host half of a slice, shared by
/// the GPU path and the emulation test.
pub fn stage(
    l: &Launch,
    deltas: &[Input],
    terms: &[Term],
    name: &str,
    base: Tensor,
    from: Float,
    buf: &mut [u8],
) -> Result<()> {
    let lay = Layout::of(l, from, from);
    put_words(buf, 0, &[u64::MAX, 0]);
    put_words(buf, lay.terms, &l.terms);
    put_words(buf, lay.offsets, &l.offsets);
    put_words(buf, lay.ranks, &l.ranks);
    for ((bytes, at), t) in l.values.iter().zip(terms) {
        let dst = &mut buf[lay.values + at..lay.values + at + bytes.len()];
        deltas[t.delta].stored(name).read_into(bytes.start, dst)?;
    }
    let size = from.size();
    let first = l.first as usize * size;
    let dst = &mut buf[lay.base..lay.base + l.n as usize * size];
    // The base slice is the bulk of the bytes; reading it (from the mapping, or the file) is
    // what overlaps the other slot's kernel, so spread it over the cores.
    use rayon::prelude::*;
    dst.par_chunks_mut(PIECE)
        .enumerate()
        .try_for_each(|(k, d)| base.read_into(first + k * PIECE, d))
}

/// Where [`run_pipeline`] puts output bytes: `(tensor, byte offset, bytes)`.
pub type WriteFn<'a> = dyn Fn(&str, u64, &[u8]) -> Result<()> + Sync + 'a;
/// Every slice of every job, in order, `(job index, launch)`; `slice(job)` gives the job's
/// slice size. Only offsets and ranks are held: small.
pub fn plan_slices(
    deltas: &[Input],
    jobs: &[Job],
    slice: impl Fn(&Job) -> Result<u64>,
) -> Result<Vec<(usize, Launch)>> {
    let mut all = Vec::new();
    for (ji, j) in jobs.iter().enumerate() {
        let l = launches(deltas, j, slice(j)?)?;
        all.extend(l.into_iter().map(|l| (ji, l)));
    }
    Ok(all)
}

/// What runs a staged slice: the GPU ([`super::Backend`]), or the host emulation in the tests. Two
/// slots, 0 and 1; a slot holds one slice at a time.
pub trait SlotDevice {
    /// Makes both slots hold at least `need` bytes of staging. Called with nothing in flight.
    fn reserve(&mut self, need: usize) -> Result<()>;
    /// The input staging of `slot` (nothing in flight there), for [`stage`].
    fn input(&mut self, slot: usize) -> Result<&mut [u8]>;
    /// Starts the staged slice `l` of job `job` in `slot`: upload, kernel, download.
    fn start(&mut self, slot: usize, job: usize, l: &Launch, lay: &Layout) -> Result<()>;
    /// Waits for `slot`'s slice and returns its output staging: status words at 0, the
    /// output at `lay.out`.
    fn finish(&mut self, slot: usize) -> Result<&[u8]>;
}

/// Runs the slices `all` of `jobs` through `dev`'s two slots: before a slot takes slice k, its
/// previous slice is finished (status checked, output written); then slice k is staged from the
/// mapped inputs and started. So the host's reading and writing for one slot overlaps the
/// device's work in the other, across tensor boundaries too. Returns each job's overflow count.
pub fn run_pipeline(
    dev: &mut dyn SlotDevice,
    deltas: &[Input],
    jobs: &[Job],
    all: &[(usize, Launch)],
    write: &WriteFn<'_>,
) -> Result<Vec<u64>> {
    let lay_of = |(ji, l): &(usize, Launch)| Layout::of(l, jobs[*ji].from, jobs[*ji].to);
    let need = all.iter().map(lay_of).fold(256, |m, y| m.max(y.end));
    dev.reserve(need)?;
    let mut overflows = vec![0u64; jobs.len()];
    let finish = |dev: &mut dyn SlotDevice, slot: usize, k: usize, overflows: &mut [u64]| {
        let (ji, l) = &all[k];
        let j = &jobs[*ji];
        let lay = lay_of(&all[k]);
        let out = dev.finish(slot)?;
        let status = [
            u64::from_le_bytes(out[0..8].try_into().unwrap()),
            u64::from_le_bytes(out[8..16].try_into().unwrap()),
        ];
        overflows[*ji] += check_status(deltas, j.name, j.terms, status)?;
        let size = j.to.size();
        write(
            j.name,
            l.first * size as u64,
            &out[lay.out..lay.out + l.n as usize * size],
        )
    };
    let mut pending: [Option<usize>; 2] = [None, None];
    for (k, (ji, l)) in all.iter().enumerate() {
        let slot = k % 2;
        if let Some(p) = pending[slot].take() {
            finish(dev, slot, p, &mut overflows)?;
        }
        let j = &jobs[*ji];
        let lay = lay_of(&all[k]);
        let buf = dev.input(slot)?;
        stage(
            l,
            deltas,
            j.terms,
            j.name,
            j.base,
            j.from,
            &mut buf[..lay.input_end],
        )?;
        dev.start(slot, *ji, l, &lay)?;
        pending[slot] = Some(k);
    }
    for (slot, p) in pending.iter().enumerate() {
        if let Some(p) = p {
            finish(dev, slot, *p, &mut overflows)?;
        }
    }
    Ok(overflows)
}
