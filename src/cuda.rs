//! The CUDA backend of `merge` (docs/CUDA.md): custom kernels in `kernels/`, compiled at run time
//! with NVRTC and launched through cudarc, which loads libcuda and libnvrtc at run time, so this
//! module builds and runs everywhere: without a GPU, a driver or NVRTC, [`backend`] says why,
//! and `--device auto` merges on the CPU.
//!
//! The work is split in two so that most of it can be tested without a GPU:
//! - [`launches`] (pure host code) cuts a tensor into slices and, for each, the kernel's inputs:
//!   term descriptors, the chunk offsets and start ranks it needs, which bytes of the base and of
//!   each delta to upload. tests/cuda_host.rs runs kernels/merge.cu on these inputs on the CPU
//!   (through a small emulation header) and compares with the CPU merge, byte for byte.
//! - [`run_pipeline`] moves them through two slots of a [`SlotDevice`]: on the GPU
//!   ([`Backend::merge_tensors`]) pinned staging buffers and a stream per slot, so that reading
//!   the next slice from the memory-mapped inputs overlaps the previous slice's transfers and
//!   kernel; in the tests, the host emulation.

use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{Result, anyhow, bail};

use crate::dtype::Float;
use crate::format::Delta;
use crate::merge::Term;

/// Which backend computes a merge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    /// CUDA when a GPU, its driver and NVRTC are usable, the CPU otherwise.
    #[default]
    Auto,
    /// The CPU (rayon).
    Cpu,
    /// A CUDA GPU; fails when none is usable.
    Cuda,
}

/// The kernel sources, embedded in the binary: `(file name, CUDA C source)`.
pub const SOURCES: &[(&str, &str)] = &[("merge.cu", include_str!("../kernels/merge.cu"))];

/// u64 words per term descriptor (`SOTU_TERM_WORDS` in kernels/merge.cu).
pub const TERM_WORDS: usize = 12;
/// Most terms (deltas contributing to one tensor) one launch takes (`SOTU_MAX_TERMS`); a tensor
/// with more is merged on the CPU.
pub const MAX_TERMS: usize = 64;
/// Elements per thread block. Equal to the chunk size this tool writes, so that every block
/// starts on a chunk boundary and its start ranks are read from the offsets, not counted.
pub const TILE: u64 = 65536;
/// Threads per block on the GPU (a multiple of 32, at most 1024).
pub const BLOCK: u32 = 512;
/// Most elements per slice, whatever the free device memory: bounds the pinned staging buffers.
const MAX_SLICE: u64 = 1 << 25;

/// NVRTC options: IEEE f64 throughout, no contraction into FMA, subnormals kept.
pub const NVRTC_OPTIONS: &[&str] = &[
    "--fmad=false",
    "--ftz=false",
    "--prec-div=true",
    "--std=c++17",
];

/// The kernel dtype code of `f` (`SOTU_F16`… in kernels/merge.cu).
pub fn dtype_code(f: Float) -> u64 {
    match f {
        Float::F16 => 0,
        Float::BF16 => 1,
        Float::F32 => 2,
        Float::F64 => 3,
    }
}

fn dtype_name(f: Float) -> &'static str {
    match f {
        Float::F16 => "f16",
        Float::BF16 => "bf16",
        Float::F32 => "f32",
        Float::F64 => "f64",
    }
}

/// The entry point of the merge kernel from stored dtype `from` to output dtype `to`.
pub fn merge_entry(from: Float, to: Float) -> String {
    format!("sotu_merge_{}_{}", dtype_name(from), dtype_name(to))
}

/// Every kernel entry point of [`SOURCES`].
pub fn kernel_entries() -> Vec<String> {
    let all = [Float::F16, Float::BF16, Float::F32, Float::F64];
    let mut v: Vec<String> = all
        .iter()
        .flat_map(|&f| all.iter().map(move |&t| merge_entry(f, t)))
        .collect();
    v.extend(["sotu_mix32_kernel", "sotu_u_kernel", "sotu_round_kernel"].map(String::from));
    v
}

/// Runs `f`, turning a panic (cudarc panics when a library it loads lacks a symbol) into an
/// error.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    match r {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(format!("{what} failed: {msg}"))
        }
    }
}

/// Whether the NVRTC library (`libnvrtc.so.13`, found through `LD_LIBRARY_PATH` and the
/// loader's usual paths) can be loaded.
pub fn nvrtc_available() -> Result<(), String> {
    guarded("loading NVRTC", || {
        // SAFETY: only dlopens the library.
        if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            Ok(())
        } else {
            Err(
                "the NVRTC library (libnvrtc.so.13) was not found; install the CUDA 13 toolkit or \
                 the nvidia-cuda-nvrtc wheel and add its lib folder to LD_LIBRARY_PATH"
                    .into(),
            )
        }
    })
}

/// Compiles all of [`SOURCES`], every entry point, with NVRTC to PTX for `arch` (e.g.
/// `compute_90`).
pub fn compile_ptx(arch: &'static str) -> Result<String, String> {
    compile_selected(arch, &[], "")
}

/// Compiles only the merge kernel from `from` to `to`, as the GPU path does on first use.
pub fn compile_merge_ptx(arch: &'static str, from: Float, to: Float) -> Result<String, String> {
    let tail = format!(
        "SOTU_MERGE_ENTRY({}, {}, {}, {})",
        dtype_name(from),
        dtype_name(to),
        dtype_code(from),
        dtype_code(to)
    );
    compile_selected(arch, &["SOTU_SELECTED_ENTRIES"], &tail)
}

/// Compiles only the helper kernels (known answers, rounding), as the GPU path does at setup.
pub fn compile_helpers_ptx(arch: &'static str) -> Result<String, String> {
    compile_selected(arch, &["SOTU_SELECTED_ENTRIES", "SOTU_HELPERS"], "")
}

/// Compiles [`SOURCES`] with extra `defines` (`-D…`) and `tail` appended to the source.
fn compile_selected(arch: &'static str, defines: &[&str], tail: &str) -> Result<String, String> {
    nvrtc_available()?;
    let mut src: String = SOURCES
        .iter()
        .map(|(_, s)| *s)
        .collect::<Vec<_>>()
        .join("\n");
    src.push('\n');
    src.push_str(tail);
    src.push('\n');
    let mut options: Vec<String> = NVRTC_OPTIONS.iter().map(|s| s.to_string()).collect();
    options.extend(defines.iter().map(|d| format!("-D{d}")));
    guarded("NVRTC", move || {
        let opts = cudarc::nvrtc::CompileOptions {
            arch: Some(arch),
            options,
            name: Some("merge.cu".into()),
            ..Default::default()
        };
        match cudarc::nvrtc::compile_ptx_with_opts(src, opts) {
            Ok(ptx) => Ok(ptx.to_src()),
            Err(cudarc::nvrtc::CompileError::CompileError { log, .. }) => Err(format!(
                "the kernels do not compile for {arch}:\n{}",
                log.to_string_lossy()
            )),
            Err(e) => Err(format!("NVRTC failed for {arch}: {e}")),
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Launch planning (host only).

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
}

/// The value index at element `s` of a masked tensor: `offsets[s / C]` on a chunk boundary,
/// else counted from the chunk start or from the previous rank asked for in the same chunk.
/// Counting only happens for chunk sizes that are not divisors of [`TILE`] (this tool always
/// writes 65536), and then covers each element at most once.
struct Ranker<'a> {
    mask: crate::mask::Mask,
    offsets: &'a [u64],
    chunk: u64,
    numel: u64,
    prev: Option<(u64, u64)>,
}

impl Ranker<'_> {
    fn at(&mut self, s: u64) -> u64 {
        let kept = *self.offsets.last().unwrap();
        if s >= self.numel {
            return kept;
        }
        let j = s / self.chunk;
        let start = j * self.chunk;
        let r = if s == start {
            self.offsets[j as usize]
        } else {
            match self.prev {
                Some((ps, pr)) if ps >= start && ps <= s => pr + self.mask.count_kept(ps..s),
                _ => self.offsets[j as usize] + self.mask.count_kept(start..s),
            }
        };
        self.prev = Some((s, r));
        r
    }
}

/// Cuts tensor `name` (`numel` elements, stored dtype `from`) into slices of at most `slice`
/// elements (a multiple of [`TILE`]) and prepares each slice's kernel inputs.
pub fn launches(
    deltas: &[Delta],
    name: &str,
    numel: u64,
    from: Float,
    terms: &[Term],
    slice: u64,
) -> Result<Vec<Launch>> {
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
    let mut rankers: Vec<Option<Ranker>> = terms
        .iter()
        .map(|t| {
            let d = &deltas[t.delta];
            t.masked.then(|| Ranker {
                mask: d.mask(name),
                offsets: d.offsets(name),
                chunk: d.params().chunk,
                numel,
                prev: None,
            })
        })
        .collect();
    let mut out = Vec::new();
    let mut first = 0;
    while first < numel {
        let end = numel.min(first + slice);
        let n = end - first;
        let blocks = n.div_ceil(TILE);
        let mut l = Launch {
            first,
            n,
            terms: Vec::with_capacity(terms.len() * TERM_WORDS),
            values: Vec::new(),
            values_len: 0,
            offsets: Vec::new(),
            ranks: Vec::new(),
        };
        for (term, ranker) in terms.iter().zip(rankers.iter_mut()) {
            let d = &deltas[term.delta];
            let rpos = l.ranks.len() as u64;
            let vpos = l.values_len / size;
            let mut w = [0u64; TERM_WORDS];
            w[0] = term.coeff.to_bits();
            w[7] = vpos as u64;
            w[11] = rpos;
            let bytes;
            match ranker {
                None => {
                    // A whole float term: the stored tensor is the value list in index order.
                    w[6] = first;
                    w[8] = n;
                    l.ranks.extend(std::iter::repeat_n(0, blocks as usize));
                    bytes = first as usize * size..end as usize * size;
                }
                Some(rk) => {
                    let (k0, k1) = rk.mask.key.words();
                    let iv = rk.mask.interval;
                    let c = rk.chunk;
                    w[1] = 1;
                    w[2] = k0 as u64 | (k1 as u64) << 32;
                    w[3] = iv.lo();
                    w[4] = iv.hi() - iv.lo();
                    w[5] = c;
                    for b in 0..blocks {
                        let r = rk.at(first + b * TILE);
                        l.ranks.push(r);
                    }
                    let kept = *rk.offsets.last().unwrap();
                    // The values this slice reads. Clamped, so that a corrupt file cannot send
                    // the upload out of the stored tensor; the kernel then reports the chunk.
                    let vlo = l.ranks[rpos as usize].min(kept);
                    let vhi = rk.at(end).clamp(vlo, kept);
                    w[6] = vlo;
                    w[8] = vhi - vlo;
                    let j0 = first / c;
                    let jl = (end - 1) / c;
                    w[9] = l.offsets.len() as u64;
                    w[10] = j0;
                    l.offsets
                        .extend_from_slice(&rk.offsets[j0 as usize..=jl as usize + 1]);
                    bytes = vlo as usize * size..vhi as usize * size;
                }
            }
            debug_assert!(bytes.end <= d.data(name).len());
            l.values.push((bytes.clone(), l.values_len));
            l.values_len = (l.values_len + bytes.len()).next_multiple_of(8);
            l.terms.extend_from_slice(&w);
        }
        out.push(l);
        first = end;
    }
    Ok(out)
}

/// The error the CPU path gives for chunk `j` of tensor `name` of `delta`, whose walk does not
/// end at its offsets (the kernel reports the chunk; the message is made here, the same way).
pub fn chunk_error(delta: &Delta, name: &str, j: u64) -> anyhow::Error {
    let offsets = delta.offsets(name);
    let c = delta.params().chunk;
    let numel = delta.entries()[name].numel();
    let kept = delta.mask(name).count_kept(j * c..numel.min((j + 1) * c));
    anyhow!(
        "{}: tensor {name}: chunk {j} keeps {kept} elements but its offsets say {}; the file is corrupt",
        delta.path().display(),
        offsets[j as usize + 1] - offsets[j as usize]
    )
}

/// Turns a kernel's status words into the merge's result: the error of the reported chunk, or
/// the overflow count.
pub fn check_status(deltas: &[Delta], name: &str, terms: &[Term], status: [u64; 2]) -> Result<u64> {
    if status[0] != u64::MAX {
        let t = (status[0] & 0xffff) as usize;
        let j = status[0] >> 16;
        let term = terms
            .get(t)
            .ok_or_else(|| anyhow!("tensor {name}: the GPU reported an unknown term {t}"))?;
        return Err(chunk_error(&deltas[term.delta], name, j));
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
    deltas: &[Delta],
    terms: &[Term],
    name: &str,
    base: &[u8],
    from: Float,
    buf: &mut [u8],
) {
    let lay = Layout::of(l, from, from);
    let put64 = |buf: &mut [u8], at: usize, words: &[u64]| {
        for (k, w) in words.iter().enumerate() {
            buf[at + 8 * k..at + 8 * k + 8].copy_from_slice(&w.to_le_bytes());
        }
    };
    put64(buf, 0, &[u64::MAX, 0]);
    put64(buf, lay.terms, &l.terms);
    put64(buf, lay.offsets, &l.offsets);
    put64(buf, lay.ranks, &l.ranks);
    for ((bytes, at), t) in l.values.iter().zip(terms) {
        let src = &deltas[t.delta].data(name)[bytes.clone()];
        buf[lay.values + at..lay.values + at + src.len()].copy_from_slice(src);
    }
    let size = from.size();
    let src = &base[l.first as usize * size..(l.first + l.n) as usize * size];
    let dst = &mut buf[lay.base..lay.base + src.len()];
    // The base slice is the bulk of the bytes; reading it from the mapping is what overlaps
    // the other slot's kernel, so spread it over the cores.
    use rayon::prelude::*;
    dst.par_chunks_mut(8 << 20)
        .zip(src.par_chunks(8 << 20))
        .for_each(|(d, s)| d.copy_from_slice(s));
}

/// The byte offsets of a launch's staged inputs, for [`stage`]'s buffer: `(terms, values,
/// offsets, ranks, base, input end)`.
pub fn stage_offsets(l: &Launch, from: Float) -> [usize; 6] {
    let lay = Layout::of(l, from, from);
    [
        lay.terms,
        lay.values,
        lay.offsets,
        lay.ranks,
        lay.base,
        lay.input_end,
    ]
}

/// Where [`run_pipeline`] puts output bytes: `(tensor, byte offset, bytes)`.
pub type WriteFn<'a> = dyn Fn(&str, u64, &[u8]) -> Result<()> + Sync + 'a;

/// One tensor to compute: what `merge`'s plan says.
#[derive(Clone, Copy, Debug)]
pub struct Job<'a> {
    /// Tensor name.
    pub name: &'a str,
    /// Elements.
    pub numel: u64,
    /// The starting values (the base tensor, or a new tensor's stored bytes).
    pub base: &'a [u8],
    /// Their dtype.
    pub from: Float,
    /// The output dtype.
    pub to: Float,
    /// The deltas' contributions.
    pub terms: &'a [Term],
}

/// Every slice of every job, in order, `(job index, launch)`; `slice(job)` gives the job's
/// slice size. Only offsets and ranks are held: small.
pub fn plan_slices(
    deltas: &[Delta],
    jobs: &[Job],
    slice: impl Fn(&Job) -> Result<u64>,
) -> Result<Vec<(usize, Launch)>> {
    let mut all = Vec::new();
    for (ji, j) in jobs.iter().enumerate() {
        let l = launches(deltas, j.name, j.numel, j.from, j.terms, slice(j)?)?;
        all.extend(l.into_iter().map(|l| (ji, l)));
    }
    Ok(all)
}

/// What runs a staged slice: the GPU ([`Backend`]), or the host emulation in the tests. Two
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
    deltas: &[Delta],
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
        );
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

// ---------------------------------------------------------------------------------------------
// The GPU.

/// A usable CUDA device with the kernels loaded.
pub struct Backend {
    name: String,
    arch: &'static str,
    ctx: Arc<cudarc::driver::CudaContext>,
    /// The small helper kernels, compiled and loaded at setup: proof that NVRTC's PTX loads.
    helpers: Arc<cudarc::driver::CudaModule>,
    /// Merge kernels by `(from, to)`, each compiled the first time a tensor needs it.
    merges: Mutex<std::collections::HashMap<(u64, u64), cudarc::driver::CudaFunction>>,
    streams: [Arc<cudarc::driver::CudaStream>; 2],
    slots: Mutex<Vec<Slot>>,
}

/// One stream's staging: pinned host buffers and one device buffer, grown on demand.
struct Slot {
    pin_in: cudarc::driver::PinnedHostSlice<u8>,
    pin_out: cudarc::driver::PinnedHostSlice<u8>,
    dev: cudarc::driver::CudaSlice<u8>,
}

static BACKEND: OnceLock<Result<Backend, String>> = OnceLock::new();

/// The CUDA backend of this process, set up once: driver, device 0, kernels compiled with the
/// NVRTC found at run time for the device's architecture, and loaded. An error says what is
/// missing.
pub fn backend() -> Result<&'static Backend, String> {
    BACKEND
        .get_or_init(|| guarded("CUDA setup", Backend::new))
        .as_ref()
        .map_err(Clone::clone)
}

fn driver_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> String + '_ {
    move |e| format!("{what}: {e}")
}

impl Backend {
    fn new() -> Result<Backend, String> {
        // SAFETY: only dlopens the library.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err("no CUDA driver (libcuda.so) was found".into());
        }
        nvrtc_available()?;
        let n = cudarc::driver::CudaContext::device_count()
            .map_err(driver_err("the CUDA driver cannot count devices"))?;
        if n < 1 {
            return Err("the CUDA driver reports no device".into());
        }
        let ctx =
            cudarc::driver::CudaContext::new(0).map_err(driver_err("cannot open CUDA device 0"))?;
        // The slots are synchronized explicitly (one stream each); cudarc's per-buffer events
        // would only add work.
        // SAFETY: every buffer below is used by one stream, which is synchronized before the
        // host touches the buffer again.
        unsafe { ctx.disable_event_tracking() };
        let name = ctx.name().map_err(driver_err("device name"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(driver_err("compute capability"))?;
        let arch: &'static str = Box::leak(format!("compute_{major}{minor}").into_boxed_str());
        let ptx = compile_helpers_ptx(arch)?;
        let helpers = ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
            .map_err(driver_err(
                "cannot load the kernels (is the driver older than NVRTC?)",
            ))?;
        let streams = [
            ctx.new_stream().map_err(driver_err("stream"))?,
            ctx.new_stream().map_err(driver_err("stream"))?,
        ];
        Ok(Backend {
            name,
            arch,
            ctx,
            helpers,
            merges: Mutex::new(Default::default()),
            streams,
            slots: Mutex::new(Vec::new()),
        })
    }

    /// The device's name, e.g. `NVIDIA H100 80GB HBM3`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The merge kernel from `from` to `to`, compiled and loaded on first use (one pair compiles
    /// in a fraction of the time of all sixteen).
    fn merge_function(&self, from: Float, to: Float) -> Result<cudarc::driver::CudaFunction> {
        let key = (dtype_code(from), dtype_code(to));
        let mut m = self.merges.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = m.get(&key) {
            return Ok(f.clone());
        }
        let ptx = compile_merge_ptx(self.arch, from, to).map_err(|e| anyhow!("CUDA: {e}"))?;
        let module = self
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
            .map_err(|e| anyhow!("CUDA: cannot load the merge kernel: {e}"))?;
        let f = module
            .load_function(&merge_entry(from, to))
            .map_err(|e| anyhow!("CUDA: {e}"))?;
        m.insert(key, f.clone());
        Ok(f)
    }

    /// Threads per block for `f`: [`BLOCK`], or fewer (a multiple of 32) if the compiled kernel
    /// cannot run that many.
    fn block_for(&self, f: &cudarc::driver::CudaFunction) -> u32 {
        let max = f.max_threads_per_block().unwrap_or(BLOCK as i32).max(32) as u32;
        BLOCK.min(max / 32 * 32)
    }

    /// Elements per slice for a tensor read as `from`, written as `to`, with `nterms` terms: as
    /// many as fit, for two slots and at worst every value kept, in a quarter of the free
    /// device memory.
    fn slice_elems(&self, from: Float, to: Float, nterms: usize) -> Result<u64> {
        let (free, _) = self
            .ctx
            .mem_get_info()
            .map_err(|e| anyhow!("CUDA: free memory: {e}"))?;
        let per = (from.size() * (1 + nterms) + to.size() + 8) as u64;
        let fit = (free as u64 / 4 / 2 / per) / TILE * TILE;
        if fit == 0 {
            bail!(
                "CUDA: not enough free device memory ({free} bytes) for one block of {TILE} elements"
            );
        }
        Ok(fit.min(MAX_SLICE))
    }

    /// Computes the tensors of `jobs` (for each, what the CPU path's `compute` gives over all
    /// of it) and hands each slice's output bytes to `write(tensor, byte offset, bytes)`.
    /// Returns each job's overflow count.
    ///
    /// The slices of all the tensors go through one pipeline of two slots, one stream each:
    /// while one slot's upload, kernel and download run, the host writes out the other slot's
    /// previous result and stages its next slice from the memory-mapped inputs, so transfers
    /// and kernels overlap across tensor boundaries too.
    pub fn merge_tensors(
        &self,
        deltas: &[Delta],
        jobs: &[Job],
        write: &WriteFn<'_>,
    ) -> Result<Vec<u64>> {
        let r = self.merge_tensors_inner(deltas, jobs, write);
        if r.is_err() {
            // Leave no copy or kernel running into the staging buffers that the next call
            // would reuse.
            for s in &self.streams {
                let _ = s.synchronize();
            }
        }
        r
    }

    fn merge_tensors_inner(
        &self,
        deltas: &[Delta],
        jobs: &[Job],
        write: &WriteFn<'_>,
    ) -> Result<Vec<u64>> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| anyhow!("CUDA: bind: {e}"))?;
        let all = plan_slices(deltas, jobs, |j| {
            self.slice_elems(j.from, j.to, j.terms.len())
        })?;
        if all.is_empty() {
            return Ok(vec![0; jobs.len()]);
        }
        let funcs = jobs
            .iter()
            .map(|j| {
                let f = self.merge_function(j.from, j.to)?;
                let block = self.block_for(&f);
                Ok((f, block))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut dev = GpuSlots {
            backend: self,
            slots: self.slots.lock().unwrap_or_else(|e| e.into_inner()),
            funcs,
            jobs,
        };
        run_pipeline(&mut dev, deltas, jobs, &all, write)
    }
}

/// The GPU as a [`SlotDevice`]: slot `s` is stream `s` with its pinned and device buffers.
struct GpuSlots<'a> {
    backend: &'a Backend,
    slots: std::sync::MutexGuard<'a, Vec<Slot>>,
    funcs: Vec<(cudarc::driver::CudaFunction, u32)>,
    jobs: &'a [Job<'a>],
}

fn cuda_err(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> anyhow::Error {
    move |e| anyhow!("CUDA: {what}: {e}")
}

impl SlotDevice for GpuSlots<'_> {
    fn reserve(&mut self, need: usize) -> Result<()> {
        if self.slots.len() == 2 && self.slots[0].dev.len() >= need {
            return Ok(());
        }
        self.slots.clear();
        let ctx = &self.backend.ctx;
        for s in &self.backend.streams {
            // SAFETY: written by `stage` (inputs) or by the kernel (outputs) before anything
            // reads them.
            unsafe {
                self.slots.push(Slot {
                    // Write-combined: the host only writes it, the device reads it.
                    pin_in: ctx
                        .alloc_pinned_with_flags::<u8>(
                            need,
                            cudarc::driver::sys::CU_MEMHOSTALLOC_WRITECOMBINED,
                        )
                        .map_err(cuda_err("pinned memory"))?,
                    // Cached: the host reads it back.
                    pin_out: ctx
                        .alloc_pinned_with_flags::<u8>(need, 0)
                        .map_err(cuda_err("pinned memory"))?,
                    dev: s.alloc::<u8>(need).map_err(cuda_err("device memory"))?,
                });
            }
        }
        Ok(())
    }

    fn input(&mut self, slot: usize) -> Result<&mut [u8]> {
        self.slots[slot]
            .pin_in
            .as_mut_slice()
            .map_err(cuda_err("pinned memory"))
    }

    fn start(&mut self, slot: usize, job: usize, l: &Launch, lay: &Layout) -> Result<()> {
        use cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
        let stream = &self.backend.streams[slot];
        let j = &self.jobs[job];
        let (func, block) = &self.funcs[job];
        let sl = &mut self.slots[slot];
        let (dev, _sync) = sl.dev.device_ptr(stream);
        let input = sl.pin_in.as_slice().map_err(cuda_err("pinned memory"))?;
        // SAFETY: `dev` holds at least `lay.end` bytes (`reserve`); the pinned buffers stay
        // alive and untouched until the stream is synchronized in `finish`.
        unsafe {
            cudarc::driver::result::memcpy_htod_async(
                dev,
                &input[..lay.input_end],
                stream.cu_stream(),
            )
        }
        .map_err(cuda_err("copy to the device"))?;
        let p = |off: usize| dev + off as u64;
        let (first, n, numel, tile, nterms) = (l.first, l.n, j.numel, TILE, j.terms.len() as i32);
        let (a_base, a_out, a_terms, a_values, a_offsets, a_ranks, a_status) = (
            p(lay.base),
            p(lay.out),
            p(lay.terms),
            p(lay.values),
            p(lay.offsets),
            p(lay.ranks),
            p(0),
        );
        let mut b = stream.launch_builder(func);
        b.arg(&a_base)
            .arg(&a_out)
            .arg(&first)
            .arg(&n)
            .arg(&numel)
            .arg(&tile)
            .arg(&a_terms)
            .arg(&nterms)
            .arg(&a_values)
            .arg(&a_offsets)
            .arg(&a_ranks)
            .arg(&a_status);
        let cfg = LaunchConfig {
            grid_dim: (l.blocks() as u32, 1, 1),
            block_dim: (*block, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match the kernel's signature in kernels/merge.cu, and the
        // buffers they point into are laid out by `Layout` within `dev`.
        unsafe { b.launch(cfg) }.map_err(cuda_err("launch"))?;
        let out = sl
            .pin_out
            .as_mut_slice()
            .map_err(cuda_err("pinned memory"))?;
        // SAFETY: as for the upload.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(&mut out[..16], dev, stream.cu_stream())
                .map_err(cuda_err("copy from the device"))?;
            cudarc::driver::result::memcpy_dtoh_async(
                &mut out[lay.out..lay.end],
                dev + lay.out as u64,
                stream.cu_stream(),
            )
            .map_err(cuda_err("copy from the device"))?;
        }
        Ok(())
    }

    fn finish(&mut self, slot: usize) -> Result<&[u8]> {
        self.backend.streams[slot]
            .synchronize()
            .map_err(cuda_err("kernel or copy"))?;
        self.slots[slot]
            .pin_out
            .as_slice()
            .map_err(cuda_err("pinned memory"))
    }
}

impl Backend {
    /// `u(k0, k1, i)` of the mask function for each index, computed by the kernel (for the
    /// known-answer tests).
    pub fn mask_u(&self, k0: u32, k1: u32, idx: &[u64]) -> Result<Vec<u32>> {
        use cudarc::driver::{LaunchConfig, PushKernelArg};
        let cuda = |e: cudarc::driver::DriverError| anyhow!("CUDA: {e}");
        let s = &self.streams[0];
        let f = self.helpers.load_function("sotu_u_kernel").map_err(cuda)?;
        let d_idx = s.clone_htod(idx).map_err(cuda)?;
        let mut d_out = s.alloc_zeros::<u32>(idx.len().max(1)).map_err(cuda)?;
        let n = idx.len() as u64;
        let mut b = s.launch_builder(&f);
        b.arg(&k0).arg(&k1).arg(&d_idx).arg(&mut d_out).arg(&n);
        // SAFETY: matches sotu_u_kernel's signature; both buffers hold n elements.
        unsafe { b.launch(LaunchConfig::for_num_elems(idx.len().max(1) as u32)) }.map_err(cuda)?;
        let mut out = s.clone_dtoh(&d_out).map_err(cuda)?;
        out.truncate(idx.len());
        Ok(out)
    }

    /// `mix32` of each input, computed by the kernel.
    pub fn mix32(&self, xs: &[u32]) -> Result<Vec<u32>> {
        use cudarc::driver::{LaunchConfig, PushKernelArg};
        let cuda = |e: cudarc::driver::DriverError| anyhow!("CUDA: {e}");
        let s = &self.streams[0];
        let f = self
            .helpers
            .load_function("sotu_mix32_kernel")
            .map_err(cuda)?;
        let d_in = s.clone_htod(xs).map_err(cuda)?;
        let mut d_out = s.alloc_zeros::<u32>(xs.len().max(1)).map_err(cuda)?;
        let n = xs.len() as u64;
        let mut b = s.launch_builder(&f);
        b.arg(&d_in).arg(&mut d_out).arg(&n);
        // SAFETY: matches sotu_mix32_kernel's signature; both buffers hold n elements.
        unsafe { b.launch(LaunchConfig::for_num_elems(xs.len().max(1) as u32)) }.map_err(cuda)?;
        let mut out = s.clone_dtoh(&d_out).map_err(cuda)?;
        out.truncate(xs.len());
        Ok(out)
    }
}

/// What [`Backend::bench_kernel`] measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct KernelBench {
    /// Elements of the tensor.
    pub numel: u64,
    /// Masked terms.
    pub terms: usize,
    /// Bytes a device-to-device copy of the base moves (read + write).
    pub copy_bytes: u64,
    /// Median seconds of that copy.
    pub copy_seconds: f64,
    /// Bytes the merge kernel must move at least: base, kept values, offsets and ranks in;
    /// output out.
    pub kernel_bytes: u64,
    /// Median seconds of the kernel.
    pub kernel_seconds: f64,
}

impl Backend {
    /// Times the merge kernel on one device-resident `dtype` tensor of `numel` elements (a
    /// multiple of [`TILE`]) with `terms` masked terms in disjoint slots, against a
    /// device-to-device copy of the base (`make bench-gpu`). Inputs are synthetic: the timing
    /// does not depend on the values.
    pub fn bench_kernel(
        &self,
        numel: u64,
        dtype: Float,
        terms: usize,
        reps: usize,
    ) -> Result<KernelBench> {
        use cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
        use rayon::prelude::*;
        let cuda = |e: cudarc::driver::DriverError| anyhow!("CUDA: {e}");
        if numel == 0 || !numel.is_multiple_of(TILE) || terms == 0 || terms > MAX_TERMS {
            bail!("bench: numel must be a positive multiple of {TILE}, terms in 1..={MAX_TERMS}");
        }
        self.ctx.bind_to_thread().map_err(cuda)?;
        let size = dtype.size();
        let chunks = numel / TILE;
        let mut l = Launch {
            first: 0,
            n: numel,
            terms: Vec::new(),
            values: Vec::new(),
            values_len: 0,
            offsets: Vec::new(),
            ranks: Vec::new(),
        };
        for t in 0..terms {
            let mask = crate::mask::Mask::new(
                2411,
                "bench",
                crate::mask::Interval::from_slot(t as u64, terms as u64, None)?,
            );
            let counts: Vec<u64> = (0..chunks)
                .into_par_iter()
                .map(|j| mask.count_kept(j * TILE..(j + 1) * TILE))
                .collect();
            let mut offsets = vec![0u64];
            for c in counts {
                offsets.push(offsets.last().unwrap() + c);
            }
            let kept = *offsets.last().unwrap();
            let (k0, k1) = mask.key.words();
            let w = [
                1.0f64.to_bits(),
                1,
                k0 as u64 | (k1 as u64) << 32,
                mask.interval.lo(),
                mask.interval.hi() - mask.interval.lo(),
                TILE,
                0,
                (l.values_len / size) as u64,
                kept,
                l.offsets.len() as u64,
                0,
                l.ranks.len() as u64,
            ];
            l.terms.extend_from_slice(&w);
            l.ranks.extend_from_slice(&offsets[..chunks as usize]);
            l.offsets.extend_from_slice(&offsets);
            l.values.push((0..kept as usize * size, l.values_len));
            l.values_len = (l.values_len + kept as usize * size).next_multiple_of(8);
        }
        let lay = Layout::of(&l, dtype, dtype);
        // Small, finite values everywhere: 0x3c00 is 1.0 in f16, and near 1 read as bf16/f32/f64.
        let mut host = vec![0x3cu8; lay.input_end];
        let words = |buf: &mut [u8], at: usize, w: &[u64]| {
            for (k, x) in w.iter().enumerate() {
                buf[at + 8 * k..at + 8 * k + 8].copy_from_slice(&x.to_le_bytes());
            }
        };
        words(&mut host, 0, &[u64::MAX, 0]);
        words(&mut host, lay.terms, &l.terms);
        words(&mut host, lay.offsets, &l.offsets);
        words(&mut host, lay.ranks, &l.ranks);
        let s = &self.streams[0];
        // SAFETY: written by the copy below (inputs) or by the kernel (output) before use.
        let dev = unsafe { s.alloc::<u8>(lay.end) }.map_err(cuda)?;
        let copy_len = numel as usize * size;
        let copy_dst = unsafe { s.alloc::<u8>(copy_len) }.map_err(cuda)?;
        let (p, _g) = dev.device_ptr(s);
        // SAFETY: `dev` holds lay.end >= lay.input_end bytes; synchronized before `host` drops.
        unsafe { cudarc::driver::result::memcpy_htod_async(p, &host[..], s.cu_stream()) }
            .map_err(cuda)?;
        s.synchronize().map_err(cuda)?;
        let (q, _h) = copy_dst.device_ptr(s);
        let func = self.merge_function(dtype, dtype)?;
        let block = self.block_for(&func);
        let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let mut copy = Vec::new();
        let mut kern = Vec::new();
        for rep in 0..reps.max(1) + 1 {
            let a = s.record_event(timing).map_err(cuda)?;
            // SAFETY: both buffers hold copy_len bytes at these addresses.
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(
                    q,
                    p + lay.base as u64,
                    copy_len,
                    s.cu_stream(),
                )
            }
            .map_err(cuda)?;
            let b = s.record_event(timing).map_err(cuda)?;
            let (first, n, tile, nt) = (0u64, numel, TILE, terms as i32);
            let ptr = |o: usize| p + o as u64;
            let args = [
                ptr(lay.base),
                ptr(lay.out),
                ptr(lay.terms),
                ptr(lay.values),
                ptr(lay.offsets),
                ptr(lay.ranks),
                ptr(0),
            ];
            let mut lb = s.launch_builder(&func);
            lb.arg(&args[0])
                .arg(&args[1])
                .arg(&first)
                .arg(&n)
                .arg(&numel)
                .arg(&tile)
                .arg(&args[2])
                .arg(&nt)
                .arg(&args[3])
                .arg(&args[4])
                .arg(&args[5])
                .arg(&args[6]);
            let cfg = LaunchConfig {
                grid_dim: (l.blocks() as u32, 1, 1),
                block_dim: (block, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: as in merge_tensors.
            unsafe { lb.launch(cfg) }.map_err(cuda)?;
            let c = s.record_event(timing).map_err(cuda)?;
            c.synchronize().map_err(cuda)?;
            if rep > 0 {
                // The first round warms up (module load, clocks).
                copy.push(a.elapsed_ms(&b).map_err(cuda)? as f64 / 1e3);
                kern.push(b.elapsed_ms(&c).map_err(cuda)? as f64 / 1e3);
            }
        }
        let mut status = [0u64; 2];
        // SAFETY: the first 16 bytes of `dev` are the status words.
        unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut status[..], p, s.cu_stream()) }
            .map_err(cuda)?;
        s.synchronize().map_err(cuda)?;
        if status[0] != u64::MAX {
            bail!(
                "bench: the kernel reported a bad chunk walk ({:#x})",
                status[0]
            );
        }
        Ok(KernelBench {
            numel,
            terms,
            copy_bytes: 2 * copy_len as u64,
            copy_seconds: median(copy),
            kernel_bytes: (copy_len
                + l.values_len
                + 8 * (l.offsets.len() + l.ranks.len() + l.terms.len())
                + numel as usize * size) as u64,
            kernel_seconds: median(kern),
        })
    }
}
