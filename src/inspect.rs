//! `inspect` and `verify`: what deltas hold, how their masks and values relate, and whether they
//! belong to a base.

use std::fmt::Write as _;

use anyhow::{Result, bail};
use rayon::prelude::*;
use serde::Serialize;

use crate::dtype::Float;
use crate::format::{Delta, Kind};
use crate::io::Checkpoint;
use crate::mask::SPAN;

/// One tensor of a delta.
#[derive(Serialize, Clone, Debug)]
pub struct TensorSummary {
    /// Name.
    pub name: String,
    /// How it is stored.
    pub kind: Kind,
    /// Dtype.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Elements.
    pub numel: u64,
    /// Kept elements (masked only).
    pub kept: Option<u64>,
    /// ‖δ‖₂ over all elements.
    pub delta_norm: f64,
    /// ‖mask ⊙ δ‖₂: over kept elements.
    pub kept_norm: f64,
    /// Kept elements the merge arithmetic cannot reproduce exactly.
    pub inexact: u64,
    /// A grown tensor's shape in the fine-tune (`shape` is the base's): docs/FORMAT.md
    /// section 12.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grown_shape: Option<Vec<usize>>,
}

/// One of the fine-tune's own files a delta carries (docs/FORMAT.md section 13).
#[derive(Serialize, Clone, Debug)]
pub struct OwnFileSummary {
    /// File name.
    pub name: String,
    /// Size in bytes.
    pub bytes: u64,
    /// BLAKE3 of its bytes, in hex.
    pub blake3: String,
}

/// One delta.
#[derive(Serialize, Clone, Debug)]
pub struct DeltaSummary {
    /// File path.
    pub file: String,
    /// Writer.
    pub tool: String,
    /// Seed.
    pub seed: u64,
    /// Interval start.
    pub lo: u64,
    /// Interval end.
    pub hi: u64,
    /// `(hi − lo) / 2^32`.
    pub density: f64,
    /// `K/N`, when a slot was used.
    pub slot: Option<String>,
    /// Base fingerprint.
    pub base_fingerprint: String,
    /// Tensors per kind.
    pub masked: usize,
    /// Tensors stored whole.
    pub whole: usize,
    /// Tensors equal to the base.
    pub same: usize,
    /// Bytes of the file.
    pub stored_bytes: u64,
    /// Bytes of the fine-tuned tensors it describes.
    pub dense_bytes: u64,
    /// ‖mask ⊙ δ‖₂ over the whole delta.
    pub kept_norm: f64,
    /// The fine-tune's own files it carries, in name order.
    pub files: Vec<OwnFileSummary>,
    /// Per-tensor detail.
    pub tensors: Vec<TensorSummary>,
}

/// Two deltas compared.
#[derive(Serialize, Clone, Debug)]
pub struct PairSummary {
    /// First delta's file.
    pub a: String,
    /// Second delta's file.
    pub b: String,
    /// Expected fraction of elements kept by both: the interval overlap under one seed, the
    /// product of densities under different seeds.
    pub expected_collision: f64,
    /// Measured fraction over the tensors both mask (their first 2^26 elements each).
    pub measured_collision: f64,
    /// Elements compared.
    pub compared: u64,
    /// Cosine of the two masked deltas; `None` when it needs the base and none was given.
    pub cosine: Option<f64>,
    /// With `--subspaces`: the alignment of the two deltas' top singular subspaces, averaged
    /// over the 2-D tensors both mask with a nonzero estimate: `‖U_aᵀ U_b‖_F² / k`, where `U`
    /// holds the top `k` left singular vectors of a delta's unbiased estimate and
    /// `k = max(1, ⌊min(m, n) / T⌋)` for `T` deltas, as `merge --method tsv` keeps. 1 is the
    /// same subspace, 0 orthogonal ones.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subspace_alignment: Option<f64>,
    /// What two random subspaces of those dimensions give on average (`k / m`, averaged the
    /// same way): the level of no alignment at all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subspace_random: Option<f64>,
}

/// The result of `inspect`.
#[derive(Serialize, Clone, Debug)]
pub struct InspectReport {
    /// Per delta.
    pub deltas: Vec<DeltaSummary>,
    /// Per pair of deltas.
    pub pairs: Vec<PairSummary>,
}

/// Summarizes `deltas`, and compares each pair. Cosines of overlapping deltas need `base`;
/// so does `subspaces`, the alignment of their top singular subspaces (an SVD of every 2-D
/// tensor of every delta: seconds for a small model, many minutes for a large one).
pub fn inspect(
    deltas: &[Delta],
    base: Option<&Checkpoint>,
    subspaces: bool,
) -> Result<InspectReport> {
    let summaries = deltas.iter().map(summarize).collect();
    let mut pairs = Vec::new();
    for i in 0..deltas.len() {
        for j in i + 1..deltas.len() {
            pairs.push(compare(&deltas[i], &deltas[j], base)?);
        }
    }
    if subspaces {
        let Some(base) = base else {
            bail!("the subspace alignment needs the base (--base)");
        };
        let means = subspace_alignment(deltas, base)?;
        for (p, (align, random)) in pairs.iter_mut().zip(means) {
            p.subspace_alignment = align;
            p.subspace_random = random;
        }
    }
    Ok(InspectReport {
        deltas: summaries,
        pairs,
    })
}

fn summarize(d: &Delta) -> DeltaSummary {
    let p = d.params();
    let mut tensors = Vec::new();
    let mut dense = 0;
    let mut kept_sq = 0.0;
    // The top level's tensors, then each subfolder file's as `PATH: NAME` (docs/FORMAT.md
    // section 15).
    let views = std::iter::once((None, d)).chain(d.subfolders().iter().map(|(p, v)| (Some(p), v)));
    let all: Vec<(String, &Delta, &crate::format::Entry)> = views
        .flat_map(|(path, v)| {
            v.entries().iter().map(move |(name, e)| {
                let shown = path.map_or_else(|| name.clone(), |p| format!("{p}: {name}"));
                (shown, v, e)
            })
        })
        .collect();
    for (name, view, e) in &all {
        let s = view.stats(e.row);
        kept_sq += s[1];
        let numel = e.tuned_shape().iter().map(|&d| d as u64).product::<u64>();
        dense += (numel.saturating_mul(e.dtype.bitsize() as u64)).div_ceil(8);
        tensors.push(TensorSummary {
            name: name.clone(),
            kind: e.kind,
            dtype: format!("{:?}", e.dtype),
            shape: e.shape.clone(),
            numel: e.numel(),
            kept: e.kept,
            delta_norm: s[0].sqrt(),
            kept_norm: s[1].sqrt(),
            inexact: s[2] as u64,
            grown_shape: e.grown_shape.clone(),
        });
    }
    let count = |k: Kind| all.iter().filter(|(_, _, e)| e.kind == k).count();
    DeltaSummary {
        file: d.path().display().to_string(),
        tool: d.tool().to_string(),
        seed: p.seed,
        lo: p.interval.lo(),
        hi: p.interval.hi(),
        density: p.interval.density(),
        slot: p.slot.clone(),
        base_fingerprint: d.fingerprint(),
        masked: count(Kind::Masked),
        whole: count(Kind::Whole),
        same: count(Kind::Same),
        stored_bytes: d.file_len(),
        dense_bytes: dense,
        kept_norm: kept_sq.sqrt(),
        files: d
            .own_files()
            .iter()
            .map(|(name, bytes)| {
                let rec = crate::format::FileRecord::of(bytes);
                OwnFileSummary {
                    name: name.clone(),
                    bytes: rec.len,
                    blake3: rec.blake3,
                }
            })
            .collect(),
        tensors,
    }
}

/// `mask ⊙ δ` of tensor `name` over chunk `c` (dense, zeros where not kept), given the base's
/// values of that chunk. Checks the chunk walk against the offsets.
pub fn decode_chunk(d: &Delta, name: &str, c: u64, base: &[f64]) -> Result<Vec<f64>> {
    let e = &d.entries()[name];
    let float = Float::of(e.dtype).expect("only float tensors have deltas");
    let chunk = d.params().chunk;
    let lo = c * chunk;
    let range = lo..lo + base.len() as u64;
    let mut out = vec![0.0; base.len()];
    let mut buf = Vec::new();
    match e.kind {
        Kind::Masked => {
            d.chunks_in(name, range.clone(), &mut buf)?
                .for_each_kept(float, range, |k, v| out[k] = v - base[k])?;
        }
        Kind::Whole => {
            let size = float.size();
            let bytes = range.start as usize * size..range.end as usize * size;
            let values = d.stored(name).read(bytes, &mut buf)?;
            for (k, o) in out.iter_mut().enumerate() {
                *o = float.load(values, k) - base[k];
            }
        }
        Kind::Same => {}
    }
    Ok(out)
}

fn compare(a: &Delta, b: &Delta, base: Option<&Checkpoint>) -> Result<PairSummary> {
    let (pa, pb) = (a.params(), b.params());
    let expected = if pa.seed == pb.seed {
        pa.interval.overlap(&pb.interval) as f64 / SPAN as f64
    } else {
        pa.interval.density() * pb.interval.density()
    };
    let mut both = 0u64;
    let mut compared = 0u64;
    let mut shares_whole_float = false;
    for (name, ea) in a.entries() {
        let Some(eb) = b.entries().get(name) else {
            continue;
        };
        if ea.dtype != eb.dtype || ea.shape != eb.shape {
            bail!(
                "tensor {name}: {} has {:?} {:?} but {} has {:?} {:?}; they are not deltas of one model",
                a.path().display(),
                ea.dtype,
                ea.shape,
                b.path().display(),
                eb.dtype,
                eb.shape
            );
        }
        if ea.kind == Kind::Masked && eb.kind == Kind::Masked {
            let (ma, mb) = (a.mask(name), b.mask(name));
            // A sample of the first 2^26 elements is plenty for a rate, and bounds the work a
            // tiny file that declares an enormous tensor can cause.
            let n = ea.numel().min(1 << 26);
            both += (0..n.div_ceil(1 << 20))
                .into_par_iter()
                .map(|c| {
                    let r = c << 20..n.min((c + 1) << 20);
                    let mut k = 0u64;
                    ma.for_each_kept(r, |i| k += mb.kept(i) as u64);
                    k
                })
                .sum::<u64>();
            compared += n;
        } else if ea.kind != Kind::Same && eb.kind != Kind::Same && Float::of(ea.dtype).is_some() {
            shares_whole_float = true;
        }
    }
    let norm = |d: &Delta| {
        d.entries()
            .values()
            .map(|e| d.stats(e.row)[1])
            .sum::<f64>()
            .sqrt()
    };
    let cosine = if both == 0 && !shares_whole_float {
        Some(0.0) // no shared support: the masked deltas are exactly orthogonal
    } else if let Some(base) = base {
        let dot = dot(a, b, base)?;
        let den = norm(a) * norm(b);
        Some(if den > 0.0 { dot / den } else { 0.0 })
    } else {
        None
    };
    Ok(PairSummary {
        a: a.path().display().to_string(),
        b: b.path().display().to_string(),
        expected_collision: expected,
        measured_collision: if compared > 0 {
            both as f64 / compared as f64
        } else {
            0.0
        },
        compared,
        cosine,
        subspace_alignment: None,
        subspace_random: None,
    })
}

/// For each pair of deltas `(i, j)`, `i < j` in order: the mean over the 2-D float tensors both
/// mask of `‖U_iᵀ U_j‖_F² / k`, and of `k / m` (see [`PairSummary::subspace_alignment`]).
/// `None` for a pair that shares no such tensor. Tensors run in parallel, each on one thread.
fn subspace_alignment(
    deltas: &[Delta],
    base: &Checkpoint,
) -> Result<Vec<(Option<f64>, Option<f64>)>> {
    let t = deltas.len();
    let pairs: Vec<(usize, usize)> = (0..t)
        .flat_map(|i| (i + 1..t).map(move |j| (i, j)))
        .collect();
    let names: Vec<&String> = base
        .tensors()
        .iter()
        .filter(|(name, info)| {
            info.shape.len() == 2
                && info.numel() > 0
                && Float::of(info.dtype).is_some()
                && deltas
                    .iter()
                    .filter(|d| {
                        d.entries()
                            .get(*name)
                            .is_some_and(|e| e.kind == Kind::Masked)
                    })
                    .count()
                    >= 2
        })
        .map(|(name, _)| name)
        .collect();
    let per_tensor: Vec<Vec<Option<(f64, f64)>>> = names
        .par_iter()
        .map(|name| tensor_alignment(deltas, base, name, &pairs))
        .collect::<Result<_>>()?;
    Ok((0..pairs.len())
        .map(|p| {
            let got: Vec<(f64, f64)> = per_tensor.iter().filter_map(|v| v[p]).collect();
            if got.is_empty() {
                return (None, None);
            }
            let n = got.len() as f64;
            (
                Some(got.iter().map(|g| g.0).sum::<f64>() / n),
                Some(got.iter().map(|g| g.1).sum::<f64>() / n),
            )
        })
        .collect())
}

/// One tensor's `(‖U_iᵀ U_j‖_F² / k, k / m)` for each pair, `None` where one of the two does not
/// mask it or keeps no change of it.
fn tensor_alignment(
    deltas: &[Delta],
    base: &Checkpoint,
    name: &str,
    pairs: &[(usize, usize)],
) -> Result<Vec<Option<(f64, f64)>>> {
    let info = base.info(name).expect("listed from the base");
    let from = Float::of(info.dtype).expect("a float tensor");
    let (rows, cols) = (info.shape[0], info.shape[1]);
    let k = (rows.min(cols) / deltas.len()).max(1);
    let mut b = Vec::new();
    from.load_all(
        &base.tensor(name).expect("listed from the base").whole()?,
        &mut b,
    );
    let (mut tau, mut values) = (Vec::new(), Vec::new());
    let mut tops: Vec<Option<faer::Mat<f64>>> = Vec::with_capacity(deltas.len());
    for d in deltas {
        if d.entries().get(name).is_none_or(|e| e.kind != Kind::Masked) {
            tops.push(None);
            continue;
        }
        d.chunks_in(name, 0..info.numel(), &mut values)?.estimate(
            from,
            &b,
            d.params().rescale(),
            &mut tau,
        )?;
        // A zero estimate (no kept element differs from the base) has no subspace of its own:
        // its singular vectors would be arbitrary.
        if tau.iter().all(|&x| x == 0.0) {
            tops.push(None);
            continue;
        }
        // The tensor's left singular vectors are the right ones of faer's transposed view.
        let view = crate::linalg::view(&tau, (rows, cols));
        let (_, _, v) = crate::linalg::top_singular_exact(view, k, name)?;
        tops.push(Some(v));
    }
    Ok(pairs
        .iter()
        .map(|&(i, j)| {
            let (a, b) = (tops[i].as_ref()?, tops[j].as_ref()?);
            let m =
                crate::linalg::mul_transposed(a.as_ref().transpose(), b.as_ref().transpose(), 1.0);
            let sq: f64 = (0..k)
                .flat_map(|r| (0..k).map(move |c| (r, c)))
                .map(|(r, c)| m[(r, c)] * m[(r, c)])
                .sum();
            Some((sq / k as f64, k as f64 / rows as f64))
        })
        .collect())
}

/// `⟨mask_a ⊙ δ_a, mask_b ⊙ δ_b⟩` over all float tensors, decoding chunk by chunk.
fn dot(a: &Delta, b: &Delta, base: &Checkpoint) -> Result<f64> {
    let mut total = 0.0;
    for (name, ea) in a.entries() {
        let Some(eb) = b.entries().get(name) else {
            continue;
        };
        if ea.kind == Kind::Same || eb.kind == Kind::Same || Float::of(ea.dtype).is_none() {
            continue;
        }
        let float = Float::of(ea.dtype).unwrap();
        let Some(info) = base.info(name) else {
            if !ea.in_base {
                continue; // new in both fine-tunes: no base values to differ from
            }
            bail!(
                "{}: has no tensor {name}, which {} was taken against",
                base.path().display(),
                a.path().display()
            );
        };
        if info.dtype != ea.dtype || info.shape != ea.shape {
            bail!(
                "{}: tensor {name} is {:?} {:?}, but the deltas have {:?} {:?}",
                base.path().display(),
                info.dtype,
                info.shape,
                ea.dtype,
                ea.shape
            );
        }
        let data = base.tensor(name).expect("looked up above");
        let hash = base
            .hash_of(name)?
            .expect("the base has the tensor: its entry was read above");
        for (d, e) in [(a, ea), (b, eb)] {
            if e.in_base && d.base_hash(e.row) != hash {
                bail!(
                    "{}: tensor {name} differs from the base {} was taken against",
                    base.path().display(),
                    d.path().display()
                );
            }
        }
        if a.params().chunk != b.params().chunk {
            bail!(
                "{} and {}: chunk sizes differ; cosine needs equal chunk sizes",
                a.path().display(),
                b.path().display()
            );
        }
        let chunk = a.params().chunk;
        let n = ea.numel();
        let parts: Vec<f64> = (0..n.div_ceil(chunk))
            .into_par_iter()
            .map(|c| -> Result<f64> {
                let r = (c * chunk) as usize..n.min((c + 1) * chunk) as usize;
                let (mut bytes, mut bv) = (Vec::new(), Vec::new());
                let size = float.size();
                float.load_all(
                    data.read(r.start * size..r.end * size, &mut bytes)?,
                    &mut bv,
                );
                let (da, db) = (
                    decode_chunk(a, name, c, &bv)?,
                    decode_chunk(b, name, c, &bv)?,
                );
                Ok(da.iter().zip(&db).map(|(x, y)| x * y).sum())
            })
            .collect::<Result<_>>()?;
        total += parts.iter().sum::<f64>();
    }
    Ok(total)
}

impl InspectReport {
    /// The human-readable report.
    pub fn render(&self, verbose_tensors: bool) -> String {
        let mut s = String::new();
        for d in &self.deltas {
            let _ = writeln!(s, "{}", d.file);
            let slot = d
                .slot
                .as_deref()
                .map(|x| format!(", slot {x}"))
                .unwrap_or_default();
            let _ = writeln!(
                s,
                "  seed {}  density {:.6}  interval [{}, {}){slot}",
                d.seed, d.density, d.lo, d.hi
            );
            let _ = writeln!(s, "  base fingerprint {}", d.base_fingerprint);
            let _ = writeln!(
                s,
                "  tensors: {} masked, {} whole, {} same as base",
                d.masked, d.whole, d.same
            );
            let _ = writeln!(
                s,
                "  stored {} of dense {} ({:.2}%)   ‖mask⊙δ‖ = {:.6e}   written by {}",
                human_bytes(d.stored_bytes),
                human_bytes(d.dense_bytes),
                100.0 * d.stored_bytes as f64 / d.dense_bytes.max(1) as f64,
                d.kept_norm,
                d.tool
            );
            for t in d.tensors.iter().filter(|t| t.grown_shape.is_some()) {
                let _ = writeln!(
                    s,
                    "  grown: {} {:?} -> {:?}",
                    t.name,
                    t.shape,
                    t.grown_shape.as_ref().unwrap()
                );
            }
            if !d.files.is_empty() {
                let list: Vec<String> = d
                    .files
                    .iter()
                    .map(|f| format!("{} ({})", f.name, human_bytes(f.bytes)))
                    .collect();
                let _ = writeln!(s, "  own files: {}", list.join(", "));
            }
            if verbose_tensors {
                let _ = writeln!(
                    s,
                    "  {:<48} {:<6} {:<5} {:>12} {:>12} {:>12} {:>12}",
                    "tensor", "kind", "dtype", "elements", "kept", "‖δ‖", "‖mask⊙δ‖"
                );
                for t in &d.tensors {
                    let _ = writeln!(
                        s,
                        "  {:<48} {:<6} {:<5} {:>12} {:>12} {:>12.4e} {:>12.4e}{}",
                        t.name,
                        format!("{:?}", t.kind).to_lowercase(),
                        t.dtype,
                        t.numel,
                        t.kept.map_or("-".into(), |k| k.to_string()),
                        t.delta_norm,
                        t.kept_norm,
                        if t.inexact > 0 {
                            format!("  ({} inexact)", t.inexact)
                        } else {
                            String::new()
                        }
                    );
                }
            }
        }
        if !self.pairs.is_empty() {
            let _ = writeln!(s, "pairs:");
            for p in &self.pairs {
                let _ = writeln!(
                    s,
                    "  {} × {}: collision expected {:.6} measured {:.6} over {} elements, cosine {}",
                    short(&p.a),
                    short(&p.b),
                    p.expected_collision,
                    p.measured_collision,
                    p.compared,
                    p.cosine
                        .map_or("n/a (overlapping masks: pass --base)".into(), |c| format!(
                            "{c:.6}"
                        ))
                );
                if let (Some(a), Some(r)) = (p.subspace_alignment, p.subspace_random) {
                    let _ = writeln!(
                        s,
                        "    top singular subspaces: alignment {a:.4} (random subspaces: {r:.4})"
                    );
                }
            }
        }
        s
    }
}

fn short(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Bytes as a short human string (KiB, MiB, GiB).
pub fn human_bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = n as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < units.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{x:.2} {}", units[u])
    }
}

/// The verdict of `verify` for one delta.
#[derive(Serialize, Clone, Debug)]
pub struct Verdict {
    /// Delta file.
    pub file: String,
    /// Whether every recorded base tensor matches.
    pub ok: bool,
    /// Tensors whose hashes match.
    pub matched: Vec<String>,
    /// Tensors whose hashes differ.
    pub mismatched: Vec<String>,
    /// Tensors the delta records but the base lacks.
    pub missing_in_base: Vec<String>,
    /// Tensors the base has but the delta does not record.
    pub unknown_to_delta: Vec<String>,
}

/// Checks each delta against `base`, tensor by tensor, and against the weight files of a base
/// folder's subfolders that it covers (docs/FORMAT.md section 15), their tensors named
/// `PATH: NAME`. Fails only where the base cannot be read.
pub fn verify(base: &Checkpoint, deltas: &[Delta]) -> Result<Vec<Verdict>> {
    let hashes = all_hashes(base)?;
    let mut subfolder_bases = std::collections::BTreeMap::new();
    let mut verdicts = Vec::with_capacity(deltas.len());
    for d in deltas {
        let mut v = verdict(base, &hashes, d, "");
        // A single-file base has no subfolders: a merge onto it leaves them out.
        for (path, view) in d.subfolders().iter().filter(|_| base.is_folder()) {
            let file = base.path().join(path);
            if !file.is_file() {
                let recorded = view.entries().iter().filter(|(_, e)| e.in_base);
                v.missing_in_base
                    .extend(recorded.map(|(n, _)| format!("{path}: {n}")));
                continue;
            }
            if !subfolder_bases.contains_key(path) {
                let sub = Checkpoint::open_with(&file, base.io_mode())?;
                let h = all_hashes(&sub)?;
                subfolder_bases.insert(path.clone(), (sub, h));
            }
            let (sub, h) = &subfolder_bases[path];
            let s = verdict(sub, h, view, &format!("{path}: "));
            v.matched.extend(s.matched);
            v.mismatched.extend(s.mismatched);
            v.missing_in_base.extend(s.missing_in_base);
            v.unknown_to_delta.extend(s.unknown_to_delta);
        }
        v.ok = v.mismatched.is_empty()
            && v.missing_in_base.is_empty()
            && v.unknown_to_delta.is_empty();
        verdicts.push(v);
    }
    Ok(verdicts)
}

/// The hash of every tensor of `base`, by name.
fn all_hashes(base: &Checkpoint) -> Result<std::collections::BTreeMap<String, [u8; 32]>> {
    let names: Vec<&String> = base.tensors().keys().collect();
    names
        .par_iter()
        .map(|n| {
            let h = base.hash_of(n)?.expect("a tensor of the base");
            Ok((n.to_string(), h))
        })
        .collect::<Vec<Result<_>>>()
        .into_iter()
        .collect()
}

/// The verdict of delta `d` (or a subfolder file's view of it) on `base`, whose tensors hash to
/// `hashes`; tensors named with `prefix`.
fn verdict(
    base: &Checkpoint,
    hashes: &std::collections::BTreeMap<String, [u8; 32]>,
    d: &Delta,
    prefix: &str,
) -> Verdict {
    let named = |n: &str| format!("{prefix}{n}");
    let mut v = Verdict {
        file: d.path().display().to_string(),
        ok: true,
        matched: vec![],
        mismatched: vec![],
        missing_in_base: vec![],
        unknown_to_delta: vec![],
    };
    for (name, e) in d.entries().iter().filter(|(_, e)| e.in_base) {
        let info = base.info(name);
        match hashes.get(name.as_str()) {
            None => v.missing_in_base.push(named(name)),
            Some(_) if info.is_some_and(|i| i.dtype != e.dtype || i.shape != e.shape) => {
                v.mismatched.push(named(name))
            }
            Some(h) if *h == d.base_hash(e.row) => v.matched.push(named(name)),
            Some(_) => v.mismatched.push(named(name)),
        }
    }
    v.unknown_to_delta = hashes
        .keys()
        .filter(|n| !d.entries().get(n.as_str()).is_some_and(|e| e.in_base))
        .map(|n| named(n))
        .collect();
    v.ok = v.mismatched.is_empty() && v.missing_in_base.is_empty() && v.unknown_to_delta.is_empty();
    v
}
