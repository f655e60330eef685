//! `extract`: the difference between a fine-tuned checkpoint and its base, sparsified by the
//! seeded mask and written as a delta file (docs/FORMAT.md).
//!
//! Each input is read once. The chunk offsets depend on the mask alone, so they are counted
//! before any data is read; the header is then final, and the one pass over the data fills in
//! the kept values, the provenance hashes and the statistics.
//!
//! - [`files`]: which of a fine-tune folder's own files (config, tokenizer) the delta carries.
//! - [`subfolders`]: which weight files in the folders' subfolders it covers.

pub mod files;
pub mod subfolders;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Result, bail};
use rayon::prelude::*;
use safetensors::Dtype;

use crate::dtype::Float;
use crate::dtype::elem::Elem;
use crate::format::{
    BASE_HASHES, Entry, FORMAT_NAME, FORMAT_VERSION, FileRecord, Kind, STATS, STATS_COLS, file_key,
    grown_key, offsets_key, sub_prefix,
};
use crate::io::{Checkpoint, Tensor, Written};
use crate::io::{OutTensor, Output, Sink, Target};
use crate::mask::{CHUNK_ELEMS, Interval, MASK_NAME, Mask};
use crate::simd::Kept;
use crate::tuned::{Tuned, TunedTensor, plan_kinds};

pub use crate::tuned::Selector;

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
    /// Store the fine-tune folder's own files that differ from the base's (docs/FORMAT.md
    /// section 13); `--no-files` clears it.
    pub own_files: bool,
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
    /// The tensors that gained rows in the fine-tune (docs/FORMAT.md section 12).
    pub grown: Vec<GrownTensor>,
    /// The fine-tune's own files the delta carries, by name (docs/FORMAT.md section 13).
    pub files: Vec<String>,
    /// The weight files in subfolders that the delta covers, by path (docs/FORMAT.md section
    /// 15); their tensors count in the totals above, named `PATH: NAME`.
    pub subfolders: Vec<String>,
}

/// A tensor that gained rows in the fine-tune.
#[derive(Clone, Debug, serde::Serialize)]
pub struct GrownTensor {
    /// Its name.
    pub name: String,
    /// Its shape in the base.
    pub base_shape: Vec<usize>,
    /// Its shape in the fine-tune.
    pub shape: Vec<usize>,
}

// The statistics kernel computes the columns of `sotu/stats`.
const _: () = assert!(crate::simd::SUMS == STATS_COLS);

/// One checkpoint the delta covers: the top level, or a weight file in a subfolder whose keys
/// take `prefix` (docs/FORMAT.md section 15).
struct Unit<'a> {
    /// The subfolder file's path; `None` at the top level.
    path: Option<&'a str>,
    base: &'a Checkpoint,
    tuned: &'a Tuned<'a>,
    prefix: String,
    plan: Vec<Planned>,
}

impl Unit<'_> {
    /// How tensor `name` of this checkpoint is named in messages.
    fn display(&self, name: &str) -> String {
        match self.path {
            Some(path) => format!("{path}: {name}"),
            None => name.to_string(),
        }
    }
}

/// One tensor's plan: its entry plus where its data comes from.
struct Planned {
    name: String,
    /// Its key in the delta, which its mask is keyed with: `name`, under the prefix of a
    /// subfolder file.
    key: String,
    entry: Entry,
    offsets: Vec<u64>,
    /// The base tensor's hash, when the plan already read it whole (a tensor equal to the
    /// base): taken then, while its pages are in memory, not again in the write pass.
    base_hash: Option<[u8; 32]>,
}

/// Diffs `tuned` (a checkpoint or a LoRA adapter of `base`) against `base`, and the weight files
/// of their subfolders when both are model folders, and writes the delta to `out`.
pub fn extract(
    base: &Checkpoint,
    tuned: &Tuned,
    out: &Target,
    opts: &ExtractOptions,
) -> Result<ExtractReport> {
    let start = Instant::now();
    crate::io::refuse_output_over_checkpoints(&out.path, &[base, tuned.checkpoint()])?;
    crate::io::refuse_output_over_input(&out.path, &tuned.protected_paths())?;
    let pairs = subfolders::pairs(base, tuned)?;
    let mut units = vec![Unit {
        path: None,
        base,
        tuned,
        prefix: String::new(),
        plan: plan(base, tuned, opts, "")?,
    }];
    for pair in &pairs {
        let prefix = sub_prefix(&pair.path);
        units.push(Unit {
            path: Some(&pair.path),
            base: &pair.base,
            tuned: &pair.tuned,
            plan: plan(&pair.base, &pair.tuned, opts, &prefix)?,
            prefix,
        });
    }
    let own_files = if opts.own_files {
        files::own_files(base, tuned.checkpoint())?
    } else {
        BTreeMap::new()
    };

    // A single file carries the own files as tensors, a folder as files (docs/FORMAT.md
    // section 13).
    let no_files = BTreeMap::new();
    let file_tensors = if out.is_folder() {
        &no_files
    } else {
        &own_files
    };
    let mut layout: Vec<OutTensor> = units.iter().flat_map(unit_layout).collect();
    layout.extend(files_layout(file_tensors));
    layout.sort_by(|a, b| a.name.cmp(&b.name));
    let md = delta_metadata(&units, &own_files, opts)?;

    let mut output = Output::create(out, &layout, &md)?;
    let file_names: Vec<String> = own_files.keys().cloned().collect();
    for (name, bytes) in own_files {
        if out.is_folder() {
            output.add_file(&name, bytes)?;
        } else {
            output.write(&file_key(&name), 0, &bytes)?;
        }
    }
    let mut written_units = Vec::with_capacity(units.len());
    for u in &units {
        written_units.push(write_unit(u, &output, opts)?);
    }
    let written = output.commit(opts.fingerprint_output)?;
    Ok(report(&units, &written_units, written, file_names, start))
}

/// What [`extract`] did, from its units, what each unit's write returned, and the output.
fn report(
    units: &[Unit],
    written_units: &[UnitRows],
    written: Written,
    files: Vec<String>,
    start: Instant,
) -> ExtractReport {
    let display = |p: &Path| p.display().to_string();

    let all = || {
        units
            .iter()
            .flat_map(|u| u.plan.iter().map(move |p| (u, p)))
    };
    let inexact = units
        .iter()
        .zip(written_units)
        .flat_map(|(u, (_, stats))| {
            u.plan
                .iter()
                .zip(stats)
                .filter(|(_, s)| s[2] > 0.0)
                .map(|(p, s)| (u.display(&p.name), s[2] as u64))
        })
        .collect();
    let count = |k: Kind| all().filter(|(_, p)| p.entry.kind == k).count();
    let masked: Vec<&Entry> = all()
        .map(|(_, p)| &p.entry)
        .filter(|e| e.kind == Kind::Masked)
        .collect();
    let top = &units[0];
    ExtractReport {
        masked: masked.len(),
        whole: count(Kind::Whole),
        same: count(Kind::Same),
        kept: masked.iter().map(|e| e.kept.unwrap()).sum(),
        masked_elems: masked.iter().map(|e| e.numel()).sum(),
        inputs: units
            .iter()
            .flat_map(|u| u.base.files())
            .chain(units.iter().flat_map(|u| u.tuned.files()))
            .map(display)
            .collect(),
        outputs: written.files.iter().map(|p| display(p)).collect(),
        output_bytes: written.bytes,
        output_fingerprint: written.fingerprint,
        dense_bytes: units
            .iter()
            .flat_map(|u| u.tuned.tensors())
            .map(|(_, t)| t.len)
            .sum(),
        input_bytes: units
            .iter()
            .map(|u| u.base.file_len() + u.tuned.file_len())
            .sum(),
        seconds: start.elapsed().as_secs_f64(),
        inexact,
        grown: all()
            .filter_map(|(u, p)| {
                Some(GrownTensor {
                    name: u.display(&p.name),
                    base_shape: p.entry.shape.clone(),
                    shape: p.entry.grown_shape.clone()?,
                })
            })
            .collect(),
        files,
        subfolders: units
            .iter()
            .filter_map(|u| u.path.map(str::to_string))
            .collect(),
        // The top level's alone (docs/FORMAT.md section 15).
        base_fingerprint: crate::io::fingerprint(
            &top.plan
                .iter()
                .zip(&written_units[0].0)
                .filter(|(p, _)| p.entry.in_base)
                .map(|(_, h)| *h)
                .collect::<Vec<_>>(),
        ),
    }
}

/// A unit's base hashes and statistics rows, in row order.
type UnitRows = (Vec<[u8; 32]>, Vec<[f64; STATS_COLS]>);

/// Writes the data of unit `u` into `output`: offsets, kept values and whole tensors, then its
/// base hashes and statistics ([`UnitRows`]).
fn write_unit(u: &Unit, output: &Output, opts: &ExtractOptions) -> Result<UnitRows> {
    let (base, tuned, plan) = (u.base, u.tuned, &u.plan);
    base.advise_sequential();
    tuned.advise_sequential();
    for p in plan.iter().filter(|p| p.entry.kind == Kind::Masked) {
        let bytes: Vec<u8> = p.offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
        output.write(&format!("{}{}", u.prefix, offsets_key(&p.name)), 0, &bytes)?;
    }
    // Tensor by tensor, in file order, the base hashed while the tensor is diffed: the two
    // passes share its pages, so inputs larger than the page cache are still read once.
    let mut hashes = Vec::with_capacity(plan.len());
    let mut stats = Vec::with_capacity(plan.len());
    for p in plan {
        let (hash, row) = rayon::join(
            || -> Result<[u8; 32]> {
                match p.base_hash {
                    Some(h) => Ok(h),
                    None => Ok(base.hash_of(&p.name)?.unwrap_or([0u8; 32])),
                }
            },
            || write_tensor(base, tuned, output, p, &u.prefix, opts),
        );
        hashes.push(hash?);
        stats.push(row?);
    }
    let (stats, nonfinite): (Vec<[f64; STATS_COLS]>, Vec<u64>) = stats.into_iter().unzip();
    if !opts.allow_nonfinite
        && let Some((p, n)) = plan.iter().zip(&nonfinite).find(|(_, n)| **n > 0)
    {
        // Name the file that holds the non-finite values: the base if it has any there.
        let in_base = match base.tensor(&p.name) {
            Some(t) => {
                let f = Float::of(t.info().dtype).unwrap();
                let mut v = Vec::new();
                f.load_all(&t.whole()?, &mut v);
                v.iter().any(|x| !x.is_finite())
            }
            None => false,
        };
        bail!(
            "{}: tensor {}: {n} element(s) of the difference are NaN or infinite; nothing was written. Pass --allow-nonfinite to store them anyway",
            if in_base { base.path() } else { tuned.path() }.display(),
            p.name
        );
    }
    base.check_unchanged()?;
    tuned.check_unchanged()?;
    output.write(
        &format!("{}{BASE_HASHES}", u.prefix),
        0,
        hashes.as_flattened(),
    )?;
    // docs/FORMAT.md section 7: a NaN sum is written as the canonical NaN.
    let stat_bytes: Vec<u8> = stats
        .as_flattened()
        .iter()
        .map(|&x| if x.is_nan() { f64::NAN } else { x })
        .flat_map(|x| x.to_le_bytes())
        .collect();
    output.write(&format!("{}{STATS}", u.prefix), 0, &stat_bytes)?;
    Ok((hashes, stats))
}

/// The tensors of unit `u` in the delta file: kept values and offsets of each masked tensor,
/// whole tensors, the new rows of grown tensors, and the format's own tensors, under the unit's
/// prefix.
fn unit_layout(u: &Unit) -> Vec<OutTensor> {
    let key = |k: &str| format!("{}{k}", u.prefix);
    let mut layout = Vec::new();
    for p in &u.plan {
        let e = &p.entry;
        if let Some(rows) = e.new_rows_shape() {
            let n: u64 = rows.iter().map(|&d| d as u64).product();
            layout.push(OutTensor {
                name: key(&grown_key(&p.name)),
                dtype: e.dtype,
                len: n * e.dtype.bitsize() as u64 / 8,
                shape: rows,
            });
        }
        match e.kind {
            Kind::Masked => {
                let size = Float::of(e.dtype).unwrap().size() as u64;
                let kept = e.kept.unwrap();
                layout.push(OutTensor {
                    name: p.key.clone(),
                    dtype: e.dtype,
                    shape: vec![kept as usize],
                    len: kept * size,
                });
                layout.push(OutTensor {
                    name: key(&offsets_key(&p.name)),
                    dtype: Dtype::U64,
                    shape: vec![p.offsets.len()],
                    len: 8 * p.offsets.len() as u64,
                });
            }
            Kind::Whole => layout.push(OutTensor {
                name: p.key.clone(),
                dtype: e.dtype,
                shape: e.shape.clone(),
                len: p.base_part_len(),
            }),
            Kind::Same => {}
        }
    }
    let rows = u.plan.len();
    layout.push(OutTensor {
        name: key(BASE_HASHES),
        dtype: Dtype::U8,
        shape: vec![rows, 32],
        len: 32 * rows as u64,
    });
    layout.push(OutTensor {
        name: key(STATS),
        dtype: Dtype::F64,
        shape: vec![rows, STATS_COLS],
        len: (8 * STATS_COLS * rows) as u64,
    });
    layout
}

/// The own files of a single-file delta, as tensors.
fn files_layout(file_tensors: &BTreeMap<String, Vec<u8>>) -> Vec<OutTensor> {
    file_tensors
        .iter()
        .map(|(name, bytes)| OutTensor {
            name: file_key(name),
            dtype: Dtype::U8,
            shape: vec![bytes.len()],
            len: bytes.len() as u64,
        })
        .collect()
}

/// The delta's `__metadata__` (docs/FORMAT.md sections 2, 3, 13 and 15); `units[0]` is the
/// top level.
fn delta_metadata(
    units: &[Unit],
    own_files: &BTreeMap<String, Vec<u8>>,
    opts: &ExtractOptions,
) -> Result<BTreeMap<String, String>> {
    let entries_of = |u: &Unit| -> BTreeMap<String, Entry> {
        u.plan
            .iter()
            .map(|p| (p.name.clone(), p.entry.clone()))
            .collect()
    };
    let entries = entries_of(&units[0]);
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
    if !own_files.is_empty() {
        let records: BTreeMap<&str, FileRecord> = own_files
            .iter()
            .map(|(name, bytes)| (name.as_str(), FileRecord::of(bytes)))
            .collect();
        md.insert("files".into(), serde_json::to_string(&records)?);
    }
    if units.len() > 1 {
        let subfolders: BTreeMap<&str, serde_json::Value> = units[1..]
            .iter()
            .map(|u| {
                let path = u.path.expect("a subfolder file");
                (path, serde_json::json!({"tensors": entries_of(u)}))
            })
            .collect();
        md.insert("subfolders".into(), serde_json::to_string(&subfolders)?);
    }
    Ok(md)
}

/// Decides each tensor's kind ([`plan_kinds`]) and counts the kept elements of the masked ones;
/// `prefix` is that of the keys of a subfolder file (docs/FORMAT.md section 15), which its
/// tensors are selected and masked by.
fn plan(
    base: &Checkpoint,
    tuned: &Tuned,
    opts: &ExtractOptions,
    prefix: &str,
) -> Result<Vec<Planned>> {
    Ok(plan_kinds(base, tuned, &opts.selector.under(prefix), true)?
        .into_iter()
        .map(|k| {
            let mut entry = k.entry;
            let key = format!("{prefix}{}", k.name);
            let offsets = if entry.kind == Kind::Masked {
                chunk_offsets(&Mask::new(opts.seed, &key, opts.interval), entry.numel())
            } else {
                Vec::new()
            };
            entry.kept = (entry.kind == Kind::Masked).then(|| *offsets.last().unwrap());
            Planned {
                name: k.name,
                key,
                entry,
                offsets,
                base_hash: k.base_hash,
            }
        })
        .collect())
}

impl Planned {
    /// Bytes of the part of the tensor the base has (all of it, unless it grew).
    fn base_part_len(&self) -> u64 {
        self.entry.numel() * self.entry.dtype.bitsize() as u64 / 8
    }
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

/// Writes one tensor's data (its keys under `prefix`) and returns its statistics row and its
/// number of non-finite differences.
fn write_tensor(
    base: &Checkpoint,
    tuned: &Tuned,
    out: &Output,
    p: &Planned,
    prefix: &str,
    opts: &ExtractOptions,
) -> Result<([f64; STATS_COLS], u64)> {
    let e = &p.entry;
    if e.kind == Kind::Same && e.grown_shape.is_none() {
        return Ok(([0.0; STATS_COLS], 0));
    }
    let tensor: TunedTensor = tuned.tensor(&p.name).expect("planned from its tensors");
    let base_len = p.base_part_len() as usize;
    let mut new_nonfinite = 0;
    if e.grown_shape.is_some() {
        // A grown tensor is a checkpoint's (an adapter's tensors have the base's shapes).
        let t = tensor.stored().expect("a grown tensor is stored");
        let new_rows = base_len..t.len();
        out.copy_from(
            &format!("{prefix}{}", grown_key(&p.name)),
            t,
            new_rows.clone(),
        )?;
        if let Some(f) = Float::of(e.dtype) {
            new_nonfinite = nonfinite_in(t, new_rows, f)?;
        }
    }
    if e.kind == Kind::Same {
        return Ok(([0.0; STATS_COLS], new_nonfinite));
    }
    let whole = e.kind == Kind::Whole;
    // A stored whole tensor is copied as it is; a computed one (from a LoRA adapter) is
    // written chunk by chunk below, as its values are formed.
    if whole && let Some(t) = tensor.stored() {
        out.copy_from(&p.key, t, 0..base_len)?;
    }
    let Some(float) = Float::of(e.dtype) else {
        // Stored, so copied above.
        return Ok(([0.0; STATS_COLS], new_nonfinite));
    };
    let write_values = whole && tensor.stored().is_none();
    let numel = e.numel();
    let size = float.size();
    let chunks = numel.div_ceil(CHUNK_ELEMS);
    let b_data = base.tensor(&p.name);
    if b_data.is_none()
        && let Some(t) = tensor.stored()
    {
        // New in the fine-tune: its values are what the delta carries.
        return Ok(([0.0; STATS_COLS], nonfinite_in(t, 0..base_len, float)?));
    }
    // A whole float tensor is a delta with every element kept (docs/FORMAT.md section 8).
    let mask = (e.kind == Kind::Masked).then(|| Mask::new(opts.seed, &p.key, opts.interval));
    let partials: Vec<([f64; STATS_COLS], u64)> = (0..chunks)
        .into_par_iter()
        .map(|c| -> Result<([f64; STATS_COLS], u64)> {
            let range = c * CHUNK_ELEMS..numel.min((c + 1) * CHUNK_ELEMS);
            tensor.with_values(range.clone(), |t| {
                if write_values {
                    out.write(&p.key, range.start * size as u64, t)?;
                }
                CHUNK.with_borrow_mut(|buf| {
                    let Some(b_data) = b_data else {
                        // New, and computed: its values are what the delta carries.
                        float.load_all(t, &mut buf.values);
                        let n = buf.values.iter().filter(|x| !x.is_finite()).count() as u64;
                        return Ok(([0.0; STATS_COLS], n));
                    };
                    let bytes = range.start as usize * size..range.end as usize * size;
                    let b = b_data.read(bytes, &mut buf.base)?;
                    let s = crate::with_elem!(float, E => chunk_stats::<E>(b, t, range.clone(), mask.as_ref(), &mut buf.out));
                    if mask.is_some() {
                        out.write(&p.key, p.offsets[c as usize] * size as u64, &buf.out.kept)?;
                    }
                    Ok(s)
                })
            })
        })
        .collect::<Result<_>>()?;
    // Chunk partials are summed in chunk order, so the file does not depend on the thread count.
    let mut total = [0.0; STATS_COLS];
    let mut nonfinite = new_nonfinite;
    for (s, nf) in partials {
        for (a, x) in total.iter_mut().zip(s) {
            *a += x;
        }
        nonfinite += nf;
    }
    Ok((total, nonfinite))
}

/// How many of the `float` values in bytes `range` of tensor `t` are NaN or infinite: values
/// that no base value is subtracted from (a new tensor, the new rows of a grown one).
fn nonfinite_in(t: Tensor, range: std::ops::Range<usize>, float: Float) -> Result<u64> {
    let piece = CHUNK_ELEMS as usize * float.size();
    (0..range.len().div_ceil(piece))
        .into_par_iter()
        .map(|c| -> Result<u64> {
            CHUNK.with_borrow_mut(|buf| {
                let at = range.start + c * piece;
                let bytes = t.read(at..range.end.min(at + piece), &mut buf.tuned)?;
                float.load_all(bytes, &mut buf.values);
                Ok(buf.values.iter().filter(|x| !x.is_finite()).count() as u64)
            })
        })
        .sum()
}

thread_local! {
    /// Each worker's buffers, kept for the whole run (allocating them per chunk cost page faults).
    static CHUNK: std::cell::RefCell<ChunkInputs> = std::cell::RefCell::default();
}

/// A worker's buffers for one chunk: its inputs (read into under `--io read`; the maps are
/// read in place otherwise), and what [`chunk_stats`] makes of them.
#[derive(Default)]
struct ChunkInputs {
    base: Vec<u8>,
    tuned: Vec<u8>,
    /// A new tensor's values, as f64.
    values: Vec<f64>,
    out: ChunkBuffers,
}

/// What [`chunk_stats`] makes of one chunk.
#[derive(Default)]
struct ChunkBuffers {
    /// Keep bits of the chunk's elements.
    words: Vec<u64>,
    /// The kept fine-tuned values, as raw bytes.
    kept: Vec<u8>,
}

/// One chunk's statistics row (docs/FORMAT.md section 7) and its number of non-finite
/// differences, with its kept values' raw bytes in `buf.kept` when there is a mask (without
/// one, every element counts as kept and nothing is gathered). `b` and `t` are the base's and
/// the fine-tune's elements of `range`.
fn chunk_stats<E: Elem>(
    b: &[u8],
    t: &[u8],
    range: std::ops::Range<u64>,
    mask: Option<&Mask>,
    buf: &mut ChunkBuffers,
) -> ([f64; STATS_COLS], u64) {
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
    let stats = crate::simd::chunk_sums::<E>(simd.as_ref(), b, t, &buf.words);
    buf.kept.clear();
    if mask.is_some() {
        let count: u32 = buf.words.iter().map(|w| w.count_ones()).sum();
        // Room for one word's worth past the end: the SIMD gather stores whole vectors.
        buf.kept.resize((count as usize + 64) * E::SIZE, 0);
        let j = crate::simd::gather::<E>(simd.as_ref(), &buf.words, t, &mut buf.kept);
        buf.kept.truncate(j);
    }
    stats
}
