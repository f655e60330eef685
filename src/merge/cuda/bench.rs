//! The kernel bench of `make bench-gpu`: the merge kernel on device-resident data against a
//! device-to-device copy of the same bytes.

use anyhow::{Result, anyhow, bail};

use super::MAX_TERMS;
use super::compile::Family;
use super::driver::{Backend, MergeArgs, launch_merge};
use super::launch::{Launch, Layout, MaskDesc, TermDesc, put_words};
use crate::dtype::Float;
use crate::merge::plan::TILE;

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
        use cudarc::driver::DevicePtr;
        let cuda = |e: cudarc::driver::DriverError| anyhow!("CUDA: {e}");
        if numel == 0 || !numel.is_multiple_of(TILE) || terms == 0 || terms > MAX_TERMS {
            bail!("bench: numel must be a positive multiple of {TILE}, terms in 1..={MAX_TERMS}");
        }
        self.ctx.bind_to_thread().map_err(cuda)?;
        let l = synthetic_launch(numel, dtype, terms)?;
        let lay = Layout::of(&l, dtype, dtype);
        // Small, finite values everywhere: 0x3c00 is 1.0 in f16, and near 1 read as bf16/f32/f64.
        let mut host = vec![0x3cu8; lay.input_end];
        put_words(&mut host, 0, &[u64::MAX, 0]);
        put_words(&mut host, lay.terms, &l.terms);
        put_words(&mut host, lay.offsets, &l.offsets);
        put_words(&mut host, lay.ranks, &l.ranks);
        let s = &self.streams[0];
        // SAFETY: written by the copy below (inputs) or by the kernel (output) before use.
        let dev = unsafe { s.alloc::<u8>(lay.end) }.map_err(cuda)?;
        let size = dtype.size();
        let copy_len = numel as usize * size;
        let copy_dst = unsafe { s.alloc::<u8>(copy_len) }.map_err(cuda)?;
        let (p, _g) = dev.device_ptr(s);
        // SAFETY: `dev` holds lay.end >= lay.input_end bytes; synchronized before `host` drops.
        unsafe { cudarc::driver::result::memcpy_htod_async(p, &host[..], s.cu_stream()) }
            .map_err(cuda)?;
        s.synchronize().map_err(cuda)?;
        let (q, _h) = copy_dst.device_ptr(s);
        let func = self.merge_function(Family::Merge, dtype, dtype)?;
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
            let args = MergeArgs::new(p, &lay, &l, numel, terms, 0.0);
            // SAFETY: `dev` holds `lay.end` bytes laid out by `lay`, its inputs uploaded and
            // synchronized above.
            unsafe { launch_merge(s, &func, block, l.blocks(), &args) }?;
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

/// One launch over a whole tensor of `numel` elements (a multiple of [`TILE`]) with `terms`
/// masked terms in disjoint slots of one seed, every value stored.
fn synthetic_launch(numel: u64, dtype: Float, terms: usize) -> Result<Launch> {
    use rayon::prelude::*;
    let size = dtype.size();
    let chunks = numel / TILE;
    let mut l = Launch::new(0, numel);
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
        let desc = TermDesc {
            coeff: 1.0,
            mask: Some(MaskDesc {
                key: mask.key.words(),
                lo: mask.interval.lo(),
                width: mask.interval.hi() - mask.interval.lo(),
                chunk: TILE,
            }),
            vcount: kept,
            opos: l.offsets.len() as u64,
            rpos: l.ranks.len() as u64,
            ..TermDesc::default()
        };
        l.ranks.extend_from_slice(&offsets[..chunks as usize]);
        l.offsets.extend_from_slice(&offsets);
        l.push_term(desc, 0..kept as usize * size, size);
    }
    Ok(l)
}
