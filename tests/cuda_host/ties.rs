//! The ties kernel (`sotu_ties_*` in kernels/merge.cu) run on the CPU, against the CPU engine's
//! `merge --method ties`, byte for byte and overflow for overflow: the thresholds from
//! `methods::ties_params` (the CPU's own threshold function), the kernel's inputs from the GPU
//! path's `launches` and `stage`, the slices through its `run_pipeline`, in slices smaller than
//! the tensors.

use super::*;
use data::make_finite;
use sotu_delta::merge::{Method, methods};

struct TiesCase {
    f: Float,
    /// (interval, seed) per delta.
    deltas: Vec<(Interval, u64)>,
    weights: Vec<f64>,
    alpha: f64,
    trim: f64,
    dtype: Option<Float>,
    /// Elements per slice (a multiple of TILE).
    slice: u64,
}

/// Tensors of each checkpoint: around block boundaries, one tiny, one of one element.
const TENSORS: [(&str, usize); 4] = [("a", 3 * 65536 + 5), ("b", 65537), ("c", 63), ("d", 1)];

/// Merges a checkpoint of [`TENSORS`] with `--method ties` on the CPU, then runs every tensor
/// through the pipeline with the emulated ties kernel, and compares.
fn check_ties(h: &Path, c: &TiesCase, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut base_t = Vec::new();
    let mut tuned_t = vec![Vec::new(); c.deltas.len()];
    for (k, (name, numel)) in TENSORS.iter().enumerate() {
        let (b, t) = make_finite(c.f, *numel, c.deltas.len(), seed + k as u64);
        base_t.push((name.to_string(), c.f.dtype(), vec![*numel], b));
        for (i, t) in t.into_iter().enumerate() {
            tuned_t[i].push((name.to_string(), c.f.dtype(), vec![*numel], t));
        }
    }
    write_file(&d.join("base.safetensors"), &base_t, &BTreeMap::new()).unwrap();
    let base_ck = Checkpoint::open(&d.join("base.safetensors")).unwrap();
    let mut deltas = Vec::new();
    for (i, (t, (interval, dseed))) in tuned_t.iter().zip(&c.deltas).enumerate() {
        let tp = d.join(format!("t{i}.safetensors"));
        write_file(&tp, t, &BTreeMap::new()).unwrap();
        let opts = ExtractOptions {
            seed: *dseed,
            interval: *interval,
            slot: None,
            selector: Selector::default(),
            allow_nonfinite: false,
            fingerprint_output: false,
            own_files: false,
        };
        let out = d.join(format!("d{i}.safetensors"));
        let tuned_ck = Tuned::Checkpoint(Checkpoint::open(&tp).unwrap());
        extract(&base_ck, &tuned_ck, &Target::new(&out), &opts).unwrap();
        deltas.push(Delta::open(&out).unwrap().into());
    }
    let opts = MergeOptions {
        weights: c.weights.clone(),
        dtype: c.dtype,
        device: Device::Cpu,
        method: Method::Ties,
        alpha: c.alpha,
        trim: c.trim,
        ..MergeOptions::default()
    };
    let report = merge(
        &base_ck,
        &deltas,
        &Target::new(&d.join("cpu.safetensors")),
        &opts,
    )
    .unwrap();
    let cpu = Checkpoint::open(&d.join("cpu.safetensors")).unwrap();
    let weight = |k: usize| opts.weights.get(k).copied().unwrap_or(1.0);
    let plans = plan(&base_ck, &deltas, &opts, &weight).unwrap();
    let params: Vec<_> = plans
        .iter()
        .map(|p| methods::ties_params(&base_ck, &deltas, p).unwrap())
        .collect();
    let jobs: Vec<Job> = plans
        .iter()
        .zip(&params)
        .filter_map(|(p, t)| p.ties_job(&base_ck, &deltas, t))
        .collect();
    assert_eq!(jobs.len(), TENSORS.len(), "every tensor is a ties job");
    let what = format!(
        "{:?} deltas {:?} weights {:?} alpha {} trim {} dtype {:?}",
        c.f, c.deltas, c.weights, c.alpha, c.trim, c.dtype
    );
    pipeline_matches_the_cpu(h, &deltas, &jobs, c.slice, &cpu, &report, &what);
}

fn ties_cases(f: Float) -> Vec<TiesCase> {
    let other = match f {
        Float::F32 => Float::BF16,
        Float::BF16 => Float::F16,
        Float::F16 | Float::F64 => Float::F32,
    };
    let third = iv(1.0 / 3.0);
    let c = |deltas: Vec<(Interval, u64)>, weights: Vec<f64>, alpha, trim, dtype| TiesCase {
        f,
        deltas,
        weights,
        alpha,
        trim,
        dtype,
        slice: 2 * TILE,
    };
    vec![
        // Three sparse deltas under independent seeds (overlapping masks), the defaults.
        c(
            vec![(third, 7), (third, 8), (third, 9)],
            vec![],
            1.0,
            0.2,
            None,
        ),
        // Weighted, one weight negative, scaled, another trim.
        c(
            vec![(third, 17), (third, 18), (third, 19)],
            vec![1.0, -0.75, 1.5],
            1.7,
            0.35,
            None,
        ),
        // Two dense deltas, nothing trimmed: elections on sums of exactly zero.
        c(vec![(iv(1.0), 1), (iv(1.0), 2)], vec![], 1.0, 1.0, None),
        // Opposite weights: where both tasks qualify, D = 0 and m = 0.
        c(
            vec![(iv(1.0), 5), (third, 6)],
            vec![1.0, -1.0],
            1.0,
            0.5,
            None,
        ),
        // Dense and sparse, α = 2 (overflows), and a dtype conversion.
        c(
            vec![(iv(1.0), 3), (third, 4), (iv(0.5), 5)],
            vec![0.5, 1.0, 1.0],
            2.0,
            0.5,
            Some(other),
        ),
    ]
}

fn run_ties(f: Float) {
    let h = harness_or_skip!();
    let start = std::time::Instant::now();
    for (k, case) in ties_cases(f).iter().enumerate() {
        check_ties(h, case, 500 + 10 * k as u64 + 1000 * f.size() as u64);
    }
    println!(
        "{f:?}: emulated ties kernel == CPU in {:.1} s",
        start.elapsed().as_secs_f64()
    );
}

#[test]
fn ties_kernel_merges_f32_like_the_cpu() {
    run_ties(Float::F32);
}

#[test]
fn ties_kernel_merges_f16_like_the_cpu() {
    run_ties(Float::F16);
}

#[test]
fn ties_kernel_merges_bf16_like_the_cpu() {
    run_ties(Float::BF16);
}

/// An f64 base written as bf16, a bf16 base written as f32, and one block per slice.
#[test]
fn ties_kernel_handles_f64_and_dtype_conversions() {
    let h = harness_or_skip!();
    for (k, (f, to)) in [(Float::F64, Float::BF16), (Float::BF16, Float::F32)]
        .into_iter()
        .enumerate()
    {
        let case = TiesCase {
            f,
            deltas: vec![(iv(1.0 / 3.0), 21), (iv(0.25), 22)],
            weights: vec![2.0, 1.0],
            alpha: 0.8,
            trim: 0.3,
            dtype: Some(to),
            slice: TILE,
        };
        check_ties(h, &case, 900 + k as u64);
    }
}
