//! `extract`: the difference between a fine-tuned checkpoint and its base, sparsified by the
//! seeded mask and written as a delta file (docs/FORMAT.md).
//!
//! Each input is read once. The chunk offsets depend on the mask alone, so they are counted
//! before any data is read; the header is then final, and the one pass over the data fills in
//! the kept values, the provenance hashes and the statistics.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use globset::{Glob, GlobSet, GlobSetBuilder};
use rayon::prelude::*;
use safetensors::Dtype;

use crate::dtype::Float;
use crate::dtype::elem::Elem;
use crate::format::{
    BASE_HASHES, Entry, FORMAT_NAME, FORMAT_VERSION, Kind, RESERVED_PREFIX, STATS, STATS_COLS,
    offsets_key,
};
use crate::io::{Checkpoint, tensor_hash};
use crate::io::{OutTensor, Output, Target};
use crate::mask::{CHUNK_ELEMS, Interval, MASK_NAME, Mask};
use crate::simd::Kept;

/// Which tensors are masked: those matching an include pattern (all, when none is given) and
/// no exclude pattern. The others are stored whole when they differ from the base.
#[derive(Clone, Debug, Default)]
pub struct Selector {
    include: Option<GlobSet>,
    exclude: Option<GlobSet>,
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
        })
    }

    /// Whether tensor `name` is selected for masking.
    pub fn selects(&self, name: &str) -> bool {
        self.include.as_ref().is_none_or(|g| g.is_match(name))
            && !self.exclude.as_ref().is_some_and(|g| g.is_match(name))
    }
}

/// What `extract` is asked to do.
#[derive(Clone, Debug)]
pub struct ExtractOptions {
    /// Mask seed.
    pub seed: u64,
    /// Keep interval.
    pub interval: Interval,
    /// `K/N` when the interval came from `--slot`.
    pub slot: Option<String>,
    /// Which tensors are masked.
    pub selector: Selector,
    /// Store NaN and infinite differences instead of refusing them.
    pub allow_nonfinite: bool,
    /// Read the delta back once to report its fingerprint (`--json`).
    pub fingerprint_output: bool,
}

/// What `extract` did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ExtractReport {
    /// Tensors per kind: masked, whole, same.
    pub masked: usize,
    /// Tensors stored whole.
    pub whole: usize,
    /// Tensors equal to the base.
    pub same: usize,
    /// Kept elements over all masked tensors.
    pub kept: u64,
    /// Elements of all masked tensors.
    pub masked_elems: u64,
    /// The safetensors files read: the base's, then the fine-tune's.
    pub inputs: Vec<String>,
    /// The files written.
    pub outputs: Vec<String>,
    /// Bytes of the delta's files.
    pub output_bytes: u64,
    /// Bytes of the fine-tuned checkpoint's tensors.
    pub dense_bytes: u64,
    /// Bytes read from the two inputs.
    pub input_bytes: u64,
    /// Wall time.
    pub seconds: f64,
    /// Tensors with kept elements that the merge arithmetic cannot reproduce, with counts.
    pub inexact: Vec<(String, u64)>,
    /// The base fingerprint recorded.
    pub base_fingerprint: String,
    /// The fingerprint of the delta's own tensors (docs/FORMAT.md section 7), when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_fingerprint: Option<String>,
}

/// One tensor's plan: its entry plus where its data comes from.
struct Planned {
    name: String,
    entry: Entry,
    offsets: Vec<u64>,
    /// The base tensor's hash, when the plan already read it whole (a tensor equal to the
    /// base): taken then, while its pages are in memory, not again in the write pass.
    base_hash: Option<[u8; 32]>,
}

/// Diffs `tuned` against `base` and writes the delta to `out`.
pub fn extract(
    base: &Checkpoint,
    tuned: &Checkpoint,
    out: &Target,
    opts: &ExtractOptions,
) -> Result<ExtractReport> {
    let start = Instant::now();
    crate::io::refuse_output_over_checkpoints(&out.path, &[base, tuned])?;
    let plan = plan(base, tuned, opts)?;

    let layout = layout(&plan, tuned);
    let md = delta_metadata(&plan, opts)?;

    let output = Output::create(out, &layout, &md)?;
    base.advise_sequential();
    tuned.advise_sequential();

    for p in plan.iter().filter(|p| p.entry.kind == Kind::Masked) {
        let bytes: Vec<u8> = p.offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
        output.write(&offsets_key(&p.name), 0, &bytes)?;
    }
    // Tensor by tensor, in file order, the base hashed while the tensor is diffed: the two
    // passes share its pages, so inputs larger than the page cache are still read once.
    let mut hashes = Vec::with_capacity(plan.len());
    let mut stats = Vec::with_capacity(plan.len());
    for p in &plan {
        let (hash, row) = rayon::join(
            || match (p.base_hash, base.info(&p.name)) {
                (Some(h), _) => h,
                (None, Some(i)) => tensor_hash(base.data(i)),
                (None, None) => [0u8; 32],
            },
            || write_tensor(base, tuned, &output, p, opts.seed, opts.interval),
        );
        hashes.push(hash);
        stats.push(row?);
    }
    let (stats, nonfinite): (Vec<[f64; STATS_COLS]>, Vec<u64>) = stats.into_iter().unzip();
    if !opts.allow_nonfinite
        && let Some((p, n)) = plan.iter().zip(&nonfinite).find(|(_, n)| **n > 0)
    {
        // Name the file that holds the non-finite values: the base if it has any there.
        let in_base = base.info(&p.name).is_some_and(|info| {
            let f = Float::of(info.dtype).unwrap();
            let mut v = Vec::new();
            f.load_all(base.data(info), &mut v);
            v.iter().any(|x| !x.is_finite())
        });
        bail!(
            "{}: tensor {}: {n} element(s) of the difference are NaN or infinite; nothing was written. Pass --allow-nonfinite to store them anyway",
            if in_base { base.path() } else { tuned.path() }.display(),
            p.name
        );
    }
    base.check_unchanged()?;
    tuned.check_unchanged()?;
    output.write(BASE_HASHES, 0, hashes.as_flattened())?;
    // docs/FORMAT.md section 7: a NaN sum is written as the canonical NaN.
    let stat_bytes: Vec<u8> = stats
        .as_flattened()
        .iter()
        .map(|&x| if x.is_nan() { f64::NAN } else { x })
        .flat_map(|x| x.to_le_bytes())
        .collect();
    output.write(STATS, 0, &stat_bytes)?;
    let written = output.commit(opts.fingerprint_output)?;
    let display = |p: &Path| p.display().to_string();

    let inexact = plan
        .iter()
        .zip(&stats)
        .filter(|(_, s)| s[2] > 0.0)
        .map(|(p, s)| (p.name.clone(), s[2] as u64))
        .collect();
    let count = |k: Kind| plan.iter().filter(|p| p.entry.kind == k).count();
    let masked: Vec<&Entry> = plan
        .iter()
        .map(|p| &p.entry)
        .filter(|e| e.kind == Kind::Masked)
        .collect();
    Ok(ExtractReport {
        masked: masked.len(),
        whole: count(Kind::Whole),
        same: count(Kind::Same),
        kept: masked.iter().map(|e| e.kept.unwrap()).sum(),
        masked_elems: masked.iter().map(|e| e.numel()).sum(),
        inputs: base
            .files()
            .into_iter()
            .chain(tuned.files())
            .map(display)
            .collect(),
        outputs: written.files.iter().map(|p| display(p)).collect(),
        output_bytes: written.bytes,
        output_fingerprint: written.fingerprint,
        dense_bytes: tuned.tensors().values().map(|t| t.range.len() as u64).sum(),
        input_bytes: base.file_len() + tuned.file_len(),
        seconds: start.elapsed().as_secs_f64(),
        inexact,
        base_fingerprint: crate::io::fingerprint(
            &plan
                .iter()
                .zip(&hashes)
                .filter(|(p, _)| p.entry.in_base)
                .map(|(_, h)| *h)
                .collect::<Vec<_>>(),
        ),
    })
}

/// The tensors of the delta file, in name order: kept values and offsets of each masked
/// tensor, whole tensors, and the format's own tensors.
fn layout(plan: &[Planned], tuned: &Checkpoint) -> Vec<OutTensor> {
    let mut layout = Vec::new();
    for p in plan {
        let e = &p.entry;
        match e.kind {
            Kind::Masked => {
                let size = Float::of(e.dtype).unwrap().size() as u64;
                let kept = e.kept.unwrap();
                layout.push(OutTensor {
                    name: p.name.clone(),
                    dtype: e.dtype,
                    shape: vec![kept as usize],
                    len: kept * size,
                });
                layout.push(OutTensor {
                    name: offsets_key(&p.name),
                    dtype: Dtype::U64,
                    shape: vec![p.offsets.len()],
                    len: 8 * p.offsets.len() as u64,
                });
            }
            Kind::Whole => {
                let info = tuned.info(&p.name).unwrap();
                layout.push(OutTensor {
                    name: p.name.clone(),
                    dtype: e.dtype,
                    shape: e.shape.clone(),
                    len: info.range.len() as u64,
                });
            }
            Kind::Same => {}
        }
    }
    let rows = plan.len();
    layout.push(OutTensor {
        name: BASE_HASHES.into(),
        dtype: Dtype::U8,
        shape: vec![rows, 32],
        len: 32 * rows as u64,
    });
    layout.push(OutTensor {
        name: STATS.into(),
        dtype: Dtype::F64,
        shape: vec![rows, STATS_COLS],
        len: (8 * STATS_COLS * rows) as u64,
    });
    layout.sort_by(|a, b| a.name.cmp(&b.name));
    layout
}

/// The delta's `__metadata__` (docs/FORMAT.md sections 2 and 3).
fn delta_metadata(plan: &[Planned], opts: &ExtractOptions) -> Result<BTreeMap<String, String>> {
    let entries: BTreeMap<&str, &Entry> =
        plan.iter().map(|p| (p.name.as_str(), &p.entry)).collect();
    let mut md = BTreeMap::new();
    md.insert("format".into(), FORMAT_NAME.into());
    md.insert("format_version".into(), FORMAT_VERSION.into());
    md.insert("mask".into(), MASK_NAME.into());
    md.insert("seed".into(), opts.seed.to_string());
    md.insert("lo".into(), opts.interval.lo().to_string());
    md.insert("hi".into(), opts.interval.hi().to_string());
    md.insert("density".into(), format!("{}", opts.interval.density()));
    if let Some(s) = &opts.slot {
        md.insert("slot".into(), s.clone());
    }
    md.insert("chunk".into(), CHUNK_ELEMS.to_string());
    md.insert("tool".into(), crate::TOOL.into());
    md.insert("tensors".into(), serde_json::to_string(&entries)?);
    Ok(md)
}

/// Decides each tensor's kind and counts the kept elements of the masked ones.
fn plan(base: &Checkpoint, tuned: &Checkpoint, opts: &ExtractOptions) -> Result<Vec<Planned>> {
    for ck in [base, tuned] {
        if let Some(name) = ck.tensors().keys().find(|n| n.starts_with(RESERVED_PREFIX)) {
            bail!(
                "{}: tensor {name}: names beginning with {RESERVED_PREFIX} are reserved by the delta format",
                ck.path().display()
            );
        }
    }
    if let Some(name) = base.tensors().keys().find(|n| tuned.info(n).is_none()) {
        bail!(
            "{}: tensor {name} is in the base {} but not in the fine-tune",
            tuned.path().display(),
            base.path().display()
        );
    }
    let mut plan = Vec::with_capacity(tuned.tensors().len());
    for (row, (name, t)) in tuned.tensors().iter().enumerate() {
        let b = base.info(name);
        if let Some(b) = b
            && (b.dtype != t.dtype || b.shape != t.shape)
        {
            bail!(
                "{}: tensor {name} is {:?} {:?}, but the base {} has {:?} {:?}",
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
            Some(b) if base.data(b) == tuned.data(t) => Kind::Same,
            Some(_) if Float::of(t.dtype).is_some() && opts.selector.selects(name) => Kind::Masked,
            Some(_) => Kind::Whole,
        };
        let offsets = if kind == Kind::Masked {
            chunk_offsets(&Mask::new(opts.seed, name, opts.interval), t.numel())
        } else {
            Vec::new()
        };
        // The comparison above read an equal tensor whole (a changed one only to its first
        // difference): hash it now, for a model larger than the page cache.
        let base_hash = (kind == Kind::Same).then(|| tensor_hash(base.data(b.unwrap())));
        plan.push(Planned {
            name: name.clone(),
            entry: Entry {
                kind,
                dtype: t.dtype,
                shape: t.shape.clone(),
                row,
                kept: (kind == Kind::Masked).then(|| *offsets.last().unwrap()),
                in_base: b.is_some(),
            },
            offsets,
            base_hash,
        });
    }
    Ok(plan)
}

/// The chunk offsets of a tensor of `numel` elements: kept counts before each chunk, then the
/// total.
pub fn chunk_offsets(mask: &Mask, numel: u64) -> Vec<u64> {
    let chunks = numel.div_ceil(CHUNK_ELEMS);
    let counts: Vec<u64> = (0..chunks)
        .into_par_iter()
        .map(|c| mask.count_kept(c * CHUNK_ELEMS..numel.min((c + 1) * CHUNK_ELEMS)))
        .collect();
    let mut offsets = Vec::with_capacity(counts.len() + 1);
    let mut acc = 0;
    offsets.push(0);
    for c in counts {
        acc += c;
        offsets.push(acc);
    }
    offsets
}

/// Writes one tensor's data and returns its statistics row.
fn write_tensor(
    base: &Checkpoint,
    tuned: &Checkpoint,
    out: &Output,
    p: &Planned,
    seed: u64,
    interval: Interval,
) -> Result<([f64; STATS_COLS], u64)> {
    let e = &p.entry;
    let t_data = tuned.data(tuned.info(&p.name).unwrap());
    if e.kind == Kind::Whole {
        out.write(&p.name, 0, t_data)?;
    }
    let (Some(float), Kind::Masked | Kind::Whole) = (Float::of(e.dtype), e.kind) else {
        return Ok(([0.0; STATS_COLS], 0));
    };
    let Some(b_info) = base.info(&p.name) else {
        // New in the fine-tune: its values are what the delta carries.
        let nonfinite = t_data
            .par_chunks(CHUNK_ELEMS as usize * float.size())
            .map_init(Vec::new, |v, piece| {
                float.load_all(piece, v);
                v.iter().filter(|x| !x.is_finite()).count() as u64
            })
            .sum();
        return Ok(([0.0; STATS_COLS], nonfinite));
    };
    let b_data = base.data(b_info);
    let numel = e.numel();
    // A whole float tensor is a delta with every element kept (docs/FORMAT.md section 8).
    let mask = (e.kind == Kind::Masked).then(|| Mask::new(seed, &p.name, interval));
    let chunks = numel.div_ceil(CHUNK_ELEMS);
    let partials: Vec<([f64; STATS_COLS], u64)> = (0..chunks)
        .into_par_iter()
        .map(|c| -> Result<([f64; STATS_COLS], u64)> {
            CHUNK.with_borrow_mut(|buf| {
                let range = c * CHUNK_ELEMS..numel.min((c + 1) * CHUNK_ELEMS);
                let s = crate::with_elem!(float, E => chunk_stats::<E>(b_data, t_data, range.clone(), mask.as_ref(), buf));
                if mask.is_some() {
                    out.write(&p.name, p.offsets[c as usize] * float.size() as u64, &buf.kept)?;
                }
                Ok(s)
            })
        })
        .collect::<Result<_>>()?;
    // Chunk partials are summed in chunk order, so the file does not depend on the thread count.
    let mut total = [0.0; STATS_COLS];
    let mut nonfinite = 0;
    for (s, nf) in partials {
        for (a, x) in total.iter_mut().zip(s) {
            *a += x;
        }
        nonfinite += nf;
    }
    Ok((total, nonfinite))
}

thread_local! {
    /// Each worker's buffers, kept for the whole run (allocating them per chunk cost page faults).
    static CHUNK: std::cell::RefCell<ChunkBuffers> = std::cell::RefCell::default();
}

/// A worker's buffers for one chunk.
#[derive(Default)]
struct ChunkBuffers {
    /// Keep bits of the chunk's elements.
    words: Vec<u64>,
    /// The kept fine-tuned values, as raw bytes.
    kept: Vec<u8>,
}

/// One chunk's statistics row (docs/FORMAT.md section 7) and its number of non-finite
/// differences, with its kept values' raw bytes in `buf.kept` when there is a mask (without
/// one, every element counts as kept and nothing is gathered).
fn chunk_stats<E: Elem>(
    base: &[u8],
    tuned: &[u8],
    range: std::ops::Range<u64>,
    mask: Option<&Mask>,
    buf: &mut ChunkBuffers,
) -> ([f64; STATS_COLS], u64) {
    let bytes = range.start as usize * E::SIZE..range.end as usize * E::SIZE;
    let (b, t) = (&base[bytes.clone()], &tuned[bytes]);
    let n = (range.end - range.start) as usize;
    match mask {
        Some(m) => m.words(range, &mut buf.words),
        None => {
            buf.words.clear();
            buf.words.resize(n.div_ceil(64), !0);
            if !n.is_multiple_of(64) {
                *buf.words.last_mut().unwrap() = (1u64 << (n % 64)) - 1;
            }
        }
    }
    let simd = Kept::for_dtype(E::FLOAT);
    let stats = chunk_sums::<E>(simd.as_ref(), b, t, &buf.words);
    buf.kept.clear();
    if mask.is_some() {
        let count: u32 = buf.words.iter().map(|w| w.count_ones()).sum();
        // Room for one word's worth past the end: the SIMD gather stores whole vectors.
        buf.kept.resize((count as usize + 64) * E::SIZE, 0);
        let mut j = 0;
        for (w, &word) in buf.words.iter().enumerate() {
            if let Some(x) = &simd
                && (w + 1) * 64 <= n
            {
                let src = &t[w * 64 * E::SIZE..(w + 1) * 64 * E::SIZE];
                x.gather_word(word, src, &mut buf.kept[j..j + 64 * E::SIZE]);
                j += word.count_ones() as usize * E::SIZE;
                continue;
            }
            let mut bits = word;
            while bits != 0 {
                let k = w * 64 + bits.trailing_zeros() as usize;
                buf.kept[j..j + E::SIZE].copy_from_slice(&t[k * E::SIZE..(k + 1) * E::SIZE]);
                j += E::SIZE;
                bits &= bits - 1;
            }
        }
        buf.kept.truncate(j);
    }
    stats
}

/// The sums of docs/FORMAT.md section 7 over one chunk, with `words` its keep bits: each sum in
/// 8 lanes by index mod 8, in index order from +0.0. A kept element adds `δ²` to the kept lane
/// and an element not kept adds +0.0, which leaves a lane that started at +0.0 unchanged, NaN
/// and infinity included; so the loop has no branches and vectorizes (AVX-512, AVX2, baseline,
/// chosen at run time). Also counts non-finite differences.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx512dq",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn chunk_sums<E: Elem>(
    simd: Option<&Kept>,
    b: &[u8],
    t: &[u8],
    words: &[u64],
) -> ([f64; STATS_COLS], u64) {
    let all_words = words;
    let mut all = [0.0f64; 8];
    let mut kept = [0.0f64; 8];
    let mut inexact = [0u64; 8];
    let mut nonfinite = [0u64; 8];
    let mut undecided = false;
    // Whole words by AVX-512 where the CPU has it, then the rest by the portable loop, which
    // carries on the same lanes in the same order.
    let mut done = 0;
    let mut simd_counts = crate::simd::Sums::default();
    if let Some(x) = simd {
        let n = b.len() / E::SIZE / 64;
        done = n * 64 * E::SIZE;
        simd_counts = x.sums(&b[..done], &t[..done], &words[..n], &mut all, &mut kept);
        undecided = simd_counts.undecided;
    }
    let (b_all, t_all) = (b, t);
    let (b, t) = (&b[done..], &t[done..]);
    let words = &words[done / E::SIZE / 64..];
    // Whole groups of 8 first, with a fixed trip count, so that the lanes stay in registers.
    let whole = b.len() / (8 * E::SIZE) * (8 * E::SIZE);
    let groups = b[..whole]
        .chunks_exact(8 * E::SIZE)
        .zip(t[..whole].chunks_exact(8 * E::SIZE));
    let mut lane = |p: usize, be: &[u8], te: &[u8], hit: bool| {
        let (b_bits, t_bits) = (E::bits(be), E::bits(te));
        let d = E::value(t_bits) - E::value(b_bits);
        all[p] += d * d;
        kept[p] += if hit { d * d } else { 0.0 };
        nonfinite[p] += !d.is_finite() as u64;
        // docs/FORMAT.md section 8: the merge must give v back. `replaces` decides nearly
        // every element without the rounding; the rest are checked below.
        let r = E::replaces(b_bits, t_bits);
        undecided |= hit & r.is_none();
        inexact[p] += (hit & r.is_some_and(|r| r != t_bits)) as u64;
    };
    for (g, (bg, tg)) in groups.enumerate() {
        let word = (words[g / 8] >> (8 * (g % 8))) as u8;
        for p in 0..8 {
            let at = p * E::SIZE..(p + 1) * E::SIZE;
            lane(p, &bg[at.clone()], &tg[at], (word >> p) & 1 != 0);
        }
    }
    let k0 = whole / E::SIZE;
    let rest = b[whole..]
        .chunks_exact(E::SIZE)
        .zip(t[whole..].chunks_exact(E::SIZE));
    for (p, (be, te)) in rest.enumerate() {
        let k = k0 + p;
        lane(p, be, te, (words[k / 64] >> (k % 64)) & 1 != 0);
    }
    let mut inexact: u64 = inexact.iter().sum::<u64>() + simd_counts.inexact;
    if undecided {
        let words = all_words;
        for (k, (be, te)) in b_all
            .chunks_exact(E::SIZE)
            .zip(t_all.chunks_exact(E::SIZE))
            .enumerate()
        {
            let (b_bits, t_bits) = (E::bits(be), E::bits(te));
            if (words[k / 64] >> (k % 64)) & 1 == 0 || E::replaces(b_bits, t_bits).is_some() {
                continue;
            }
            let (bv, tv) = (E::value(b_bits), E::value(t_bits));
            // round(b + (v − b)) must give v back (a NaN, some NaN).
            let r = bv + (tv - bv);
            let back = if tv.is_nan() {
                r.is_nan()
            } else {
                E::round(r) == t_bits
            };
            inexact += !back as u64;
        }
    }
    let total = |lanes: [f64; 8]| lanes.iter().fold(0.0, |a, &x| a + x);
    (
        [total(all), total(kept), inexact as f64],
        nonfinite.iter().sum::<u64>() + simd_counts.nonfinite,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::elem::{BF16, F16, F32};

    /// The AVX-512 statistics equal the portable loop's (bits, or both NaN) on chunks of every
    /// bit pattern and of ordinary differences, with lengths that leave a tail of part of a word.
    #[test]
    fn simd_statistics_match_the_portable_loop() {
        fn check<E: Elem>(next: &mut impl FnMut() -> u64) {
            let Some(x) = Kept::for_dtype(E::FLOAT) else {
                eprintln!("skipped for {:?}: no AVX-512 VBMI2 here", E::FLOAT);
                return;
            };
            let mask = (1u64 << (8 * E::SIZE)) - 1;
            for round in 0..300 {
                let n: usize = [64, 640, 1000, 4096 + 13][round % 4];
                let b: Vec<u8> = (0..n)
                    .flat_map(|_| (next() & mask).to_le_bytes()[..E::SIZE].to_vec())
                    .collect();
                // Ordinary fine-tunes (the low bits changed) in even rounds, any bits in odd ones.
                let t: Vec<u8> = b
                    .chunks_exact(E::SIZE)
                    .flat_map(|e| {
                        let r = next();
                        if round % 2 == 0 {
                            let mut e = e.to_vec();
                            e[0] ^= (r & 0xf) as u8;
                            e
                        } else {
                            (r & mask).to_le_bytes()[..E::SIZE].to_vec()
                        }
                    })
                    .collect();
                let words: Vec<u64> = (0..n.div_ceil(64)).map(|_| next() & next()).collect();
                let (want, want_nf) = chunk_sums::<E>(None, &b, &t, &words);
                let (got, got_nf) = chunk_sums::<E>(Some(&x), &b, &t, &words);
                assert_eq!(got_nf, want_nf, "{:?} round {round}", E::FLOAT);
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                        "{:?} round {round}: {got:?} vs {want:?}",
                        E::FLOAT
                    );
                }
            }
        }
        let mut next = crate::xorshift(0x2545_f491_4f6c_dd1du64);
        check::<BF16>(&mut next);
        check::<F16>(&mut next);
        check::<F32>(&mut next);
    }
}
