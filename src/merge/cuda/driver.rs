//! The GPU: the CUDA driver through cudarc (loaded at run time), device 0, the kernels
//! compiled for its architecture, and two streams with pinned staging, as a [`SlotDevice`]
//! that [`run_pipeline`] drives.

use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{Result, anyhow, bail};

use super::compile::{
    Family, compile_entry_ptx, compile_helpers_ptx, dtype_code, guarded, nvrtc_available,
};
use super::launch::{Launch, Layout, SlotDevice, WriteFn, plan_slices, run_pipeline};
use super::{BLOCK, MAX_SLICE};
use crate::dtype::Float;
use crate::merge::Input;
use crate::merge::plan::{Job, TILE};

/// A usable CUDA device with the kernels loaded.
pub struct Backend {
    name: String,
    arch: &'static str,
    pub(super) ctx: Arc<cudarc::driver::CudaContext>,
    /// The small helper kernels, compiled and loaded at setup: proof that NVRTC's PTX loads.
    helpers: Arc<cudarc::driver::CudaModule>,
    /// Merge and ties kernels by `(family, from, to)`, each compiled the first time a tensor
    /// needs it.
    merges: Mutex<std::collections::HashMap<(Family, u64, u64), cudarc::driver::CudaFunction>>,
    pub(super) streams: [Arc<cudarc::driver::CudaStream>; 2],
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

    /// The kernel of `family` from `from` to `to`, compiled and loaded on first use (one entry
    /// point compiles in a fraction of the time of all thirty-two).
    pub(super) fn merge_function(
        &self,
        family: Family,
        from: Float,
        to: Float,
    ) -> Result<cudarc::driver::CudaFunction> {
        let key = (family, dtype_code(from), dtype_code(to));
        let mut m = self.merges.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = m.get(&key) {
            return Ok(f.clone());
        }
        let ptx =
            compile_entry_ptx(self.arch, family, from, to).map_err(|e| anyhow!("CUDA: {e}"))?;
        let module = self
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
            .map_err(|e| anyhow!("CUDA: cannot load the merge kernel: {e}"))?;
        let f = module
            .load_function(&family.entry(from, to))
            .map_err(|e| anyhow!("CUDA: {e}"))?;
        m.insert(key, f.clone());
        Ok(f)
    }

    /// Threads per block for `f`: [`BLOCK`], or fewer (a multiple of 32) if the compiled kernel
    /// cannot run that many.
    pub(super) fn block_for(&self, f: &cudarc::driver::CudaFunction) -> u32 {
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
        deltas: &[Input],
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
        deltas: &[Input],
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
                let family = if j.ties.is_some() {
                    Family::Ties
                } else {
                    Family::Merge
                };
                let f = self.merge_function(family, j.from, j.to)?;
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
        use cudarc::driver::DevicePtr;
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
        let alpha = j.ties.map_or(0.0, |t| t.alpha);
        let args = MergeArgs::new(dev, lay, l, j.numel, j.terms.len(), alpha);
        // SAFETY: `dev` holds `lay.end` bytes laid out by `lay` (`reserve`), and the upload
        // above fills its inputs before the kernel runs on the same stream.
        unsafe { launch_merge(stream, func, *block, l.blocks(), &args) }?;
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

/// The argument list of every merge-family kernel (the signature `SOTU_ENTRY_PARAMS` of
/// `sotu_merge_*` and `sotu_ties_*` in kernels/merge.cu): device addresses within one staging
/// buffer laid out by a [`Layout`], the slice, and `ties`' α (ignored by the merge kernel).
pub(super) struct MergeArgs {
    base: u64,
    out: u64,
    first: u64,
    n: u64,
    numel: u64,
    terms: u64,
    nterms: i32,
    values: u64,
    offsets: u64,
    ranks: u64,
    status: u64,
    alpha: f64,
}

impl MergeArgs {
    /// The arguments for launch `l` of a tensor of `numel` elements with `nterms` terms, staged
    /// at device address `dev` as `lay` lays it out; `alpha` for the ties kernel.
    pub(super) fn new(
        dev: u64,
        lay: &Layout,
        l: &Launch,
        numel: u64,
        nterms: usize,
        alpha: f64,
    ) -> MergeArgs {
        let p = |off: usize| dev + off as u64;
        MergeArgs {
            base: p(lay.base),
            out: p(lay.out),
            first: l.first,
            n: l.n,
            numel,
            terms: p(lay.terms),
            nterms: nterms as i32,
            values: p(lay.values),
            offsets: p(lay.offsets),
            ranks: p(lay.ranks),
            status: p(0),
            alpha,
        }
    }
}

/// Launches merge-family kernel `func` (merge or ties) on `stream`: `blocks` blocks of `block`
/// threads, one [`TILE`] of elements each.
///
/// # Safety
/// `args` must point into one live device buffer whose inputs are staged, as [`MergeArgs::new`]
/// lays them out, before the kernel runs on `stream`.
pub(super) unsafe fn launch_merge(
    stream: &cudarc::driver::CudaStream,
    func: &cudarc::driver::CudaFunction,
    block: u32,
    blocks: u64,
    args: &MergeArgs,
) -> Result<()> {
    use cudarc::driver::{LaunchConfig, PushKernelArg};
    let tile = TILE;
    let mut b = stream.launch_builder(func);
    b.arg(&args.base)
        .arg(&args.out)
        .arg(&args.first)
        .arg(&args.n)
        .arg(&args.numel)
        .arg(&tile)
        .arg(&args.terms)
        .arg(&args.nterms)
        .arg(&args.values)
        .arg(&args.offsets)
        .arg(&args.ranks)
        .arg(&args.status)
        .arg(&args.alpha);
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match the kernel's signature in kernels/merge.cu; the caller
    // vouches for the buffers they point into.
    unsafe { b.launch(cfg) }.map_err(cuda_err("launch"))?;
    Ok(())
}
