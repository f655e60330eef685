//! The CPU engine: executes a merge plan with rayon, in the exact arithmetic of
//! docs/FORMAT.md section 8.
//!
//! A tensor is cut into work units of 2^20 elements spread over the threads, and each unit into
//! tiles of [`TILE`] elements that stay in the L2 cache. Per tile: the keep bits of every delta
//! (hashed once per seed); then, where no element is kept by two deltas and every coefficient
//! is 1 (an apply, or a merge of disjoint slots), the kept values are placed at their elements
//! and one pass takes each as the result where `Elem::replaces` shows the f64 arithmetic would
//! give it back unchanged, computing only the rest; elsewhere, in the base's dtype, each term's
//! keep words and kept values over the tile go to one kernel that computes the output 64
//! elements at a time, its f64 sums in registers ([`crate::simd::merge_tile`]); and under
//! `--dtype`, the kept values are expanded into an f64 accumulator and one pass adds the base
//! and rounds to the output dtype. All give the same bits; the AVX-512 kernels are in
//! [`crate::simd`]. Every output element depends only on its own inputs, so the output is the
//! same for any thread count or tiling.

use anyhow::Result;
use rayon::prelude::*;

use crate::dtype::Float;
use crate::dtype::elem::Elem;
use crate::io::Checkpoint;
use crate::io::Sink;
use crate::mask::Mask;
use crate::simd::{Kept, TermRun};

use super::Input;
use super::plan::{Job, Source, TILE, TensorPlan, Term};

/// Elements per unit of parallel work: 16 tiles, so each output write is 2–8 MiB.
const TASK: u64 = 16 * TILE;

/// Writes one output tensor; returns how many of its results are infinite or NaN where the
/// base is finite ([`Float::becomes_nonfinite`]), spread over the threads. A [`Source::Combine`]
/// tensor is not computed here but by [`super::methods::execute`], whole on one thread.
pub fn execute(base: &Checkpoint, deltas: &[Input], out: &dyn Sink, p: &TensorPlan) -> Result<u64> {
    let job = match &p.source {
        Source::Copy(o) => {
            out.copy_tensor(&p.name, p.origin(*o, base, deltas))?;
            return Ok(0);
        }
        Source::Combine { .. } => unreachable!("merge methods are computed by methods::execute"),
        Source::Compute { .. } => p.job(base, deltas).expect("a computed plan is a job"),
    };
    (0..job.numel.div_ceil(TASK))
        .into_par_iter()
        .map(|t| -> Result<u64> {
            SCRATCH.with_borrow_mut(|scratch| {
                let range = t * TASK..job.numel.min((t + 1) * TASK);
                let overflows = crate::with_elem!(job.from, E => compute::<E>(deltas, &job, range.clone(), scratch))?;
                out.write(job.name, range.start * job.to.size() as u64, &scratch.bytes)?;
                Ok(overflows)
            })
        })
        .sum()
}

/// Writes the new rows of a grown tensor (docs/FORMAT.md section 12) after the part its source
/// makes: the growing delta's stored rows as they are, or each value rounded once to the output
/// dtype under `--dtype`. Returns how many of them become infinite or NaN in that rounding
/// ([`Float::becomes_nonfinite`] of the value itself). Nothing for a tensor that did not grow.
pub fn write_grown(deltas: &[Input], out: &dyn Sink, p: &TensorPlan) -> Result<u64> {
    let Some(g) = &p.grown else {
        return Ok(0);
    };
    let rows = deltas[g.delta]
        .grown_rows(&p.name)
        .expect("planned from a grown entry");
    let at = p.source_len();
    let Some((from, to)) = g.cast else {
        rows.for_each_piece(|k, piece| out.write(&p.name, at + k as u64, piece))?;
        return Ok(0);
    };
    let (mut values, mut bytes) = (Vec::new(), Vec::new());
    let mut overflows = 0;
    // Pieces hold whole elements: PIECE is a multiple of every element size.
    rows.for_each_piece(|k, part| {
        from.load_all(part, &mut values);
        overflows += values
            .iter()
            .filter(|&&x| to.becomes_nonfinite(x, x))
            .count() as u64;
        to.store_all(&values, &mut bytes);
        out.write(&p.name, at + (k / from.size() * to.size()) as u64, &bytes)
    })?;
    Ok(overflows)
}

thread_local! {
    /// Each worker's buffers, kept for the whole run: buffers this large come from mmap, and
    /// allocating them per task cost more in page faults than the arithmetic.
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// Per-thread buffers, reused from task to task.
#[derive(Default)]
struct Scratch {
    /// The base's bytes over a tile (under `--io read`; the map is read in place otherwise).
    tile: Vec<u8>,
    /// Each term's stored values over a tile (likewise).
    stored: Vec<Vec<u8>>,
    acc: Vec<f64>,
    touched: Vec<u64>,
    base: Vec<f64>,
    sub: Vec<u8>,
    bytes: Vec<u8>,
    /// Kept values placed at their elements, over a tile.
    vals: Vec<u8>,
    /// Keep words of each term over the tile.
    words: Vec<Vec<u64>>,
    /// Mask values shared by terms of one seed.
    us: Vec<u32>,
    /// Each term's keep words over a tile as its chunk walk gives them, and its kept values
    /// where they are gathered (a fine-tune's, an unmasked term's), for the fused path.
    runs: Vec<(Vec<u64>, Vec<u8>)>,
}

/// The keep words of every masked term over the tile `range` (which lies within one block of
/// 2^32 elements). Terms whose deltas share a seed share `u(i)`: it is hashed once and only
/// compared with each interval, the usual case of deltas extracted in disjoint slots.
fn tile_keep_words(
    deltas: &[Input],
    name: &str,
    terms: &[Term],
    range: std::ops::Range<u64>,
    us: &mut Vec<u32>,
    words: &mut [Vec<u64>],
) {
    let masks: Vec<Option<Mask>> = terms
        .iter()
        .map(|t| t.masked.then(|| deltas[t.delta].mask(name)))
        .collect();
    let mut done = vec![false; terms.len()];
    for (i, m) in masks.iter().enumerate() {
        let Some(m) = m else { continue };
        if done[i] {
            continue;
        }
        let sharing: Vec<usize> = (i..terms.len())
            .filter(|&j| masks[j].is_some_and(|n| n.key == m.key))
            .collect();
        if sharing.len() == 1 {
            m.words(range.clone(), &mut words[i]);
        } else {
            m.key.fill_u(range.clone(), us);
            for &j in &sharing {
                masks[j].unwrap().interval.keep_words_of(us, &mut words[j]);
            }
        }
        for j in sharing {
            done[j] = true;
        }
    }
}

/// Computes the output bytes of elements `range` of one tensor into `scratch.bytes`, one tile
/// at a time so that the tile and the f64 accumulator stay in the L2 cache.
fn compute<E: Elem>(
    deltas: &[Input],
    job: &Job,
    range: std::ops::Range<u64>,
    s: &mut Scratch,
) -> Result<u64> {
    let &Job {
        name,
        base: data,
        terms,
        to,
        ..
    } = job;
    let mut overflows = 0u64;
    // Every byte is written below. Resized, not cleared: a buffer of the same length as the
    // last task's (the usual case) is not filled with zeros again.
    s.bytes
        .resize((range.end - range.start) as usize * to.size(), 0);
    // Where each element gets at most one term, of coefficient 1, in the base's own dtype (an
    // apply; a merge of deltas in disjoint slots), an element's result is almost always its
    // kept value itself (`Elem::replaces`): the values are placed at their elements and only
    // the exceptions go through the f64 arithmetic. Same bits, a fraction of the work.
    let placing = to == E::FLOAT
        && E::FLOAT != Float::F64
        && terms.iter().all(|t| t.masked && t.coeff == 1.0);
    let simd = Kept::for_dtype(E::FLOAT);
    let mut lo = range.start;
    while lo < range.end {
        let hi = range.end.min(lo + TILE);
        let n = (hi - lo) as usize;
        let tile = data.read(lo as usize * E::SIZE..hi as usize * E::SIZE, &mut s.tile)?;
        let at = (lo - range.start) as usize * to.size();
        let out = &mut s.bytes[at..at + n * to.size()];
        s.words.resize_with(terms.len(), Vec::new);
        s.stored.resize_with(terms.len(), Vec::new);
        tile_keep_words(deltas, name, terms, lo..hi, &mut s.us, &mut s.words);
        if placing && union_if_disjoint(&s.words[..terms.len()], n, &mut s.touched) {
            // Only the placed elements of `vals` are read: the rest may hold an earlier tile's.
            s.vals.resize(tile.len(), 0);
            for ((term, words), buf) in terms.iter().zip(&s.words).zip(&mut s.stored) {
                let chunks = deltas[term.delta].chunks_in(name, lo..hi, buf)?;
                chunks.for_each_kept_word(E::SIZE, lo..hi, Some(words), |k0, word, values| {
                    crate::simd::place::<E>(simd.as_ref(), k0, word, values, &mut s.vals)
                })?;
            }
            overflows += settle::<E>(simd.as_ref(), tile, &s.vals, &s.touched, out);
            lo = hi;
            continue;
        }
        if to == E::FLOAT {
            // Each term's keep words and kept values over the tile, then the output a word at
            // a time, its f64 sums in registers.
            s.runs.resize_with(terms.len(), Default::default);
            let mut runs = Vec::with_capacity(terms.len());
            let each = terms
                .iter()
                .zip(&s.words)
                .zip(&mut s.stored)
                .zip(&mut s.runs);
            for (((term, words), buf), (run, gathered)) in each {
                let delta = &deltas[term.delta];
                let range = lo..hi;
                runs.push(term_run::<E>(
                    delta, name, term, range, words, buf, run, gathered,
                )?);
            }
            overflows += crate::simd::merge_tile::<E>(simd.as_ref(), tile, &runs, out);
            lo = hi;
            continue;
        }
        s.acc.clear();
        // −0.0 is the additive identity (docs/FORMAT.md section 8).
        s.acc.resize(n, -0.0);
        s.touched.clear();
        s.touched.resize(n.div_ceil(64), 0);
        s.base.clear();
        s.base
            .extend(tile.chunks_exact(E::SIZE).map(|b| E::value(E::bits(b))));
        for ((term, words), buf) in terms.iter().zip(&s.words).zip(&mut s.stored) {
            let mut tile = Tile {
                range: lo..hi,
                base: &s.base,
                acc: &mut s.acc,
                touched: &mut s.touched,
            };
            add_term::<E>(&deltas[term.delta], name, term, words, &mut tile, buf)?;
        }
        for (a, &b) in s.acc.iter_mut().zip(&s.base) {
            *a += b;
            overflows += to.becomes_nonfinite(b, *a) as u64;
        }
        to.store_all(&s.acc, &mut s.sub);
        out.copy_from_slice(&s.sub);
        lo = hi;
    }
    Ok(overflows)
}

/// Whether no element of the tile is kept by two of `words` (one keep-word list per term, over
/// `n` elements); if so, `union` is set to the elements kept by any.
fn union_if_disjoint(words: &[Vec<u64>], n: usize, union: &mut Vec<u64>) -> bool {
    union.clear();
    union.resize(n.div_ceil(64), 0);
    let mut overlap = 0u64;
    for w in words {
        for (u, &x) in union.iter_mut().zip(w) {
            overlap |= *u & x;
            *u |= x;
        }
    }
    overlap == 0
}

/// The output of a tile whose kept values were [`place`]d in `vals` (at the bits of `placed`):
/// the base's bits where nothing was placed, and where something was, the result
/// [`Elem::replaces`] gives, or for the few elements it cannot decide (non-finite, or exponents
/// too far apart) the arithmetic of docs/FORMAT.md section 8 with their one term. Returns how
/// many results are infinite or NaN where the base is finite (only undecided elements can be:
/// a decided one is the kept value itself, finite).
///
/// [`place`]: crate::simd::place
fn settle<E: Elem>(
    simd: Option<&Kept>,
    tile: &[u8],
    vals: &[u8],
    placed: &[u64],
    out: &mut [u8],
) -> u64 {
    let mut overflows = 0u64;
    let words = tile
        .chunks(64 * E::SIZE)
        .zip(vals.chunks(64 * E::SIZE))
        .zip(out.chunks_mut(64 * E::SIZE))
        .zip(placed);
    for (((b, v), o), &word) in words {
        let mut undecided = crate::simd::settle_word::<E>(simd, word, b, v, o);
        // Rare: the placed elements that `replaces` cannot decide.
        while undecided != 0 {
            let k = undecided.trailing_zeros() as usize;
            undecided &= undecided - 1;
            let at = k * E::SIZE..(k + 1) * E::SIZE;
            let (b, v) = (E::load(&b[at.clone()], 0), E::load(&v[at.clone()], 0));
            let x = b + (-0.0 + 1.0 * (v - b));
            overflows += E::FLOAT.becomes_nonfinite(b, x) as u64;
            E::put(&mut o[at], E::round(x));
        }
    }
    overflows
}

/// A term's keep words (into `words`) and kept values over the tile `range`, for
/// [`crate::simd::merge_tile`]: a masked term's from the chunk walk (its mask's words over the
/// tile are `tile_words`), an unmasked term's every element. A delta file's values are read
/// into `buf` and taken from there (or from its map); a fine-tune's are gathered into
/// `gathered`, as are an unmasked term's.
#[allow(clippy::too_many_arguments)]
fn term_run<'a, E: Elem>(
    delta: &'a Input,
    name: &'a str,
    term: &Term,
    range: std::ops::Range<u64>,
    tile_words: &[u64],
    buf: &'a mut Vec<u8>,
    words: &'a mut Vec<u64>,
    gathered: &'a mut Vec<u8>,
) -> Result<TermRun<'a>> {
    let values = if term.masked {
        let chunks = delta.chunks_in(name, range.clone(), buf)?;
        chunks.kept_run(E::SIZE, range, Some(tile_words), words, gathered)?
    } else {
        let n = (range.end - range.start) as usize;
        words.clear();
        words.resize(n.div_ceil(64), !0);
        if !n.is_multiple_of(64) {
            // Bits past the tile's end must stay clear: they index no element.
            *words.last_mut().unwrap() = (1u64 << (n % 64)) - 1;
        }
        delta.with_whole_values(name, E::FLOAT, range, buf, |v| {
            gathered.clear();
            gathered.extend_from_slice(v);
            Ok(())
        })?;
        gathered
    };
    Ok(TermRun {
        words,
        values,
        coeff: term.coeff,
    })
}

/// One tile of a tensor being computed.
struct Tile<'a> {
    /// The tile's elements.
    range: std::ops::Range<u64>,
    /// The base elements, as f64.
    base: &'a [f64],
    /// `Σ c·(v − b)` so far.
    acc: &'a mut [f64],
    /// Which elements a term has touched, one bit each.
    touched: &'a mut [u64],
}

/// `acc[k] += coeff · (v − b[k])` at each element of the tile that the term keeps (its keep
/// words over the tile are `tile_words`), marking it in `touched`. The term's stored bytes over
/// the tile are read into `buf`.
fn add_term<E: Elem>(
    delta: &Input,
    name: &str,
    term: &Term,
    tile_words: &[u64],
    tile: &mut Tile,
    buf: &mut Vec<u8>,
) -> Result<()> {
    let Tile {
        range,
        base: b,
        acc,
        touched,
    } = tile;
    let c = term.coeff;
    if !term.masked {
        delta.with_whole_values(name, E::FLOAT, range.clone(), buf, |v| {
            for (k, a) in acc.iter_mut().enumerate() {
                *a += c * (E::load(v, k) - b[k]);
            }
            Ok(())
        })?;
        touched.fill(!0);
        if !acc.len().is_multiple_of(64) {
            // Bits past the tile's end must stay clear: they index no element.
            *touched.last_mut().unwrap() = (1u64 << (acc.len() % 64)) - 1;
        }
        return Ok(());
    }
    let simd = Kept::for_dtype(E::FLOAT);
    let chunks = delta.chunks_in(name, range.clone(), buf)?;
    chunks.for_each_kept_word(
        E::SIZE,
        range.clone(),
        Some(tile_words),
        |k0, word, values| {
            crate::simd::add_word::<E>(simd.as_ref(), k0, word, values, b, acc, touched, c)
        },
    )
}
