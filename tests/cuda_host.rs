//! The CUDA kernels, run on the CPU: kernels/merge.cu is compiled with the host C++ compiler
//! through tests/cuda_host/shim.h (threads as fibers, barriers, warp shuffles), fed the launch
//! inputs that the GPU path prepares (`sotu_delta::merge::cuda::launches` and `stage`), and compared
//! byte for byte with the CPU merge. This is the evidence that the kernel matches the CPU path
//! on a machine without a GPU; tests/cuda.rs runs the same comparisons on a GPU when there is
//! one. tests/cuda_host/emu.rs is the emulated device (one launch, the pipeline's two slots);
//! tests/cuda_host/ties.rs holds the ties kernel's tests against `merge --method ties`.
//!
//! Needs `c++` or `g++` (set `CXX` to choose); without one, each test says it was skipped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use safetensors::Dtype;
use sotu_delta::dtype::Float;
use sotu_delta::extract::{ExtractOptions, Selector, extract};
use sotu_delta::format::Delta;
use sotu_delta::io::Checkpoint;
use sotu_delta::io::{Target, write_file};
use sotu_delta::mask::{Interval, MaskKey, mix32};
use sotu_delta::merge::Input;
use sotu_delta::merge::cuda::{self, Launch};
use sotu_delta::merge::plan::TILE;
use sotu_delta::merge::{Device, Job, MergeOptions, MergeReport, Origin, Source, merge, plan};
use sotu_delta::tuned::Tuned;

#[path = "cuda_host/data.rs"]
mod data;
#[path = "cuda_host/emu.rs"]
mod emu;
use data::{KATS, iv, make};
use emu::{Emu, emulate, pipeline_matches_the_cpu};

/// Threads per emulated block: two warps, so that the cross-warp half of the block scan runs.
const EMU_BLOCK: u64 = 64;

/// Builds the harness once; `Err` says why it cannot be (no compiler).
fn harness() -> Result<&'static Path, String> {
    static H: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    H.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sotu-cuda-harness");
        let candidates: Vec<String> = match std::env::var("CXX") {
            Ok(c) => vec![c],
            Err(_) => vec!["c++".into(), "g++".into(), "clang++".into()],
        };
        let mut last = String::from("no C++ compiler");
        for cxx in candidates {
            let r = Command::new(&cxx)
                .args([
                    "-std=c++17",
                    "-O2",
                    "-ffp-contract=off",
                    "-fno-fast-math",
                    "-Wall",
                ])
                .arg("-I")
                .arg(root.join("tests/cuda_host"))
                .arg(root.join("tests/cuda_host/harness.cpp"))
                .arg("-o")
                .arg(&out)
                .output();
            match r {
                Ok(o) if o.status.success() => return Ok(out),
                Ok(o) => {
                    // A compiler that rejects the kernel is a failure, not a skip.
                    panic!(
                        "{cxx} cannot compile kernels/merge.cu with the host shim:\n{}",
                        String::from_utf8_lossy(&o.stderr)
                    );
                }
                Err(e) => last = format!("{cxx}: {e}"),
            }
        }
        Err(last)
    })
    .as_ref()
    .map(PathBuf::as_path)
    .map_err(Clone::clone)
}

macro_rules! harness_or_skip {
    () => {
        match harness() {
            Ok(h) => h,
            Err(why) => {
                println!("skipped: no host C++ compiler to emulate the CUDA kernels ({why})");
                return;
            }
        }
    };
}

#[path = "cuda_host/ties.rs"]
mod ties;

fn run(h: &Path, args: &[&str], input: &[u8]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let (i, o) = (dir.path().join("in"), dir.path().join("out"));
    std::fs::write(&i, input).unwrap();
    let mut cmd = Command::new(h);
    cmd.args(args).arg(&i).arg(&o);
    let r = cmd.output().unwrap();
    assert!(
        r.status.success(),
        "harness {args:?} failed: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    std::fs::read(&o).unwrap()
}

fn words(bytes: &[u8], size: usize) -> Vec<u64> {
    bytes
        .chunks_exact(size)
        .map(|c| {
            let mut b = [0u8; 8];
            b[..size].copy_from_slice(c);
            u64::from_le_bytes(b)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Known answers (docs/FORMAT.md section 4).

#[test]
fn kernel_mix32_matches_the_known_answers() {
    let h = harness_or_skip!();
    let cases: [(u32, u32); 5] = [
        (0x0000_0000, 0x0000_0000),
        (0x0000_0001, 0x86d2_fa73),
        (0x0000_0002, 0x0da7_f4e7),
        (0xffff_ffff, 0x99b5_e683),
        (0x1234_5678, 0x16e7_76bd),
    ];
    let mut input: Vec<u32> = cases.iter().map(|c| c.0).collect();
    // And a stretch of other inputs against the Rust function.
    input.extend((0..5000u32).map(|i| i.wrapping_mul(0x9e37_79b9) ^ 0x5bd1_e995));
    let bytes: Vec<u8> = input.iter().flat_map(|x| x.to_le_bytes()).collect();
    let out = words(&run(h, &["mix32"], &bytes), 4);
    for (k, &x) in input.iter().enumerate() {
        assert_eq!(out[k] as u32, mix32(x), "mix32({x:#010x})");
    }
    for (k, &(_, want)) in cases.iter().enumerate() {
        assert_eq!(out[k] as u32, want);
    }
}

#[test]
fn kernel_mask_matches_the_known_answers() {
    let h = harness_or_skip!();
    for (seed, name, k0, k1, vectors) in KATS {
        assert_eq!(
            MaskKey::new(seed, name).words(),
            (k0, k1),
            "key of {name:?}"
        );
        let mut idx: Vec<u64> = vectors.iter().map(|v| v.0).collect();
        // Around the 2^32 block boundary, against the Rust function.
        idx.extend((0..300u64).map(|i| (1u64 << 32) - 150 + i));
        let bytes: Vec<u8> = idx.iter().flat_map(|x| x.to_le_bytes()).collect();
        let out = words(
            &run(h, &["u", &format!("{k0:#x}"), &format!("{k1:#x}")], &bytes),
            4,
        );
        let key = MaskKey::new(seed, name);
        for (k, &i) in idx.iter().enumerate() {
            assert_eq!(out[k] as u32, key.u(i), "u({i}) of {name:?}");
        }
        for (k, &(i, u)) in vectors.iter().enumerate() {
            assert_eq!(out[k] as u32, u, "known answer u({i}) of {name:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Rounding (docs/FORMAT.md section 8) against src/dtype.rs.

#[test]
fn kernel_rounding_matches_the_cpu() {
    let h = harness_or_skip!();
    let mut xs: Vec<f64> = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::NAN,
        -f64::NAN,
        f64::MIN_POSITIVE,
        5e-324,
        1e-300,
        65504.0,
        65519.99,
        65520.0,
        -65520.0,
        1.0 + 2f64.powi(-8),
        1.0 + 2f64.powi(-8) + 2f64.powi(-40),
        -(1.0 + 2f64.powi(-8) + 2f64.powi(-40)),
        1.0 + 2f64.powi(-11),
        1.0 + 2f64.powi(-11) + 2f64.powi(-40),
        1.0 + 2f64.powi(-24),
        1.0 + 2f64.powi(-24) + 2f64.powi(-60),
        f32::MAX as f64,
        3.4028235677973366e38,
        3.5e38,
        1e300,
        2f64.powi(-25),
        2f64.powi(-25) * 1.0001,
        2f64.powi(-24),
        2f64.powi(-134),
        2f64.powi(-134) * 1.0001,
        2f64.powi(-133),
        2f64.powi(-149),
        2f64.powi(-150),
        2f64.powi(-150) * 1.0000001,
        2f64.powi(-126) * (1.0 - 2f64.powi(-30)),
        2f64.powi(-14) * (1.0 - 2f64.powi(-13)),
        (2.0 - 2f64.powi(-8)) * 2f64.powi(127),
        (2.0 - 2f64.powi(-8)) * 2f64.powi(127) * (1.0 - 2f64.powi(-50)),
    ];
    // Every bf16/f16 value and the midpoints between neighbours, nudged both ways.
    for bits in 0..=u16::MAX {
        for f in [Float::F16, Float::BF16] {
            let b = bits.to_le_bytes();
            let x = f.load(&b, 0);
            let y = f.load(&bits.wrapping_add(1).to_le_bytes(), 0);
            if x.is_finite() && y.is_finite() {
                let m = (x + y) / 2.0;
                xs.extend([x, m, m.next_up(), m.next_down()]);
            }
        }
    }
    // Random bit patterns over the whole f64 range, and near 1.
    let mut s = 0x1234_5678_9abc_def0u64;
    for _ in 0..100_000 {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        xs.push(f64::from_bits(s));
        xs.push(1.0 + (s >> 12) as f64 / 2f64.powi(52) * 1e-3);
        xs.push(
            f64::from_bits((s >> 2) | 0x3000_0000_0000_0000) * if s & 1 == 1 { -1.0 } else { 1.0 },
        );
    }
    let bytes: Vec<u8> = xs.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect();
    let out = words(&run(h, &["round"], &bytes), 8);
    let n = xs.len();
    let dts = [Float::F16, Float::BF16, Float::F32, Float::F64];
    for (i, &x) in xs.iter().enumerate() {
        for (d, f) in dts.iter().enumerate() {
            assert_eq!(
                out[4 * i + d],
                f.round_bits(x),
                "{f:?} rounding of {x:e} ({:#018x})",
                x.to_bits()
            );
        }
        for (d, f) in dts[..3].iter().enumerate() {
            assert_eq!(
                (out[4 * n + i] >> d) & 1 == 1,
                f.overflows(x),
                "{f:?} overflow of {x:e}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Whole merges.

struct Case {
    f: Float,
    numel: usize,
    /// (interval, seed, stored whole) per delta.
    deltas: Vec<(Interval, u64, bool)>,
    weights: Vec<f64>,
    rescale: bool,
    dtype: Option<Float>,
    /// Elements per slice (a multiple of TILE).
    slice: u64,
}

/// Runs one case: CPU merge, then the kernel on every computed tensor, and compares.
fn check(h: &Path, c: &Case, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (base, tuned) = make(c.f, c.numel, c.deltas.len(), seed);
    let shape = vec![c.numel];
    let put = |p: &Path, data: Vec<u8>| {
        write_file(
            p,
            &[("w".to_string(), c.f.dtype(), shape.clone(), data)],
            &BTreeMap::new(),
        )
        .unwrap()
    };
    put(&d.join("base.safetensors"), base);
    let base_ck = Checkpoint::open(&d.join("base.safetensors")).unwrap();
    let mut deltas = Vec::new();
    for (k, (interval, dseed, whole)) in c.deltas.iter().enumerate() {
        let t = d.join(format!("t{k}.safetensors"));
        put(&t, tuned[k].clone());
        let tuned_ck = Tuned::Checkpoint(Checkpoint::open(&t).unwrap());
        let selector = if *whole {
            Selector::new(&[], &["w".to_string()]).unwrap()
        } else {
            Selector::default()
        };
        let opts = ExtractOptions {
            seed: *dseed,
            interval: *interval,
            slot: None,
            selector,
            allow_nonfinite: true,
            fingerprint_output: false,
            own_files: false,
        };
        let out = d.join(format!("d{k}.safetensors"));
        extract(&base_ck, &tuned_ck, &Target::new(&out), &opts).unwrap();
        deltas.push(Delta::open(&out).unwrap().into());
    }
    let opts = MergeOptions {
        weights: c.weights.clone(),
        rescale: c.rescale,
        dtype: c.dtype,
        force: false,
        device: Device::Cpu,
        fingerprint_output: false,
        ..MergeOptions::default()
    };
    compare(h, d, &base_ck, &deltas, &opts, c.slice);
}

/// Merges on the CPU, then runs the kernel on every computed tensor (slices of `slice`
/// elements), and compares bytes and overflow counts.
fn compare(
    h: &Path,
    d: &Path,
    base_ck: &Checkpoint,
    deltas: &[Input],
    opts: &MergeOptions,
    slice: u64,
) {
    let report = merge(
        base_ck,
        deltas,
        &Target::new(&d.join("cpu.safetensors")),
        opts,
    )
    .unwrap();
    assert_eq!(report.device, "cpu");
    let cpu = Checkpoint::open(&d.join("cpu.safetensors")).unwrap();
    let weight = |k: usize| opts.weights.get(k).copied().unwrap_or(1.0);
    for p in plan(base_ck, deltas, opts, &weight).unwrap() {
        let Some(job) = p.job(base_ck, deltas) else {
            continue;
        };
        let to = job.to;
        let want = cpu.tensor(&p.name).unwrap().whole().unwrap();
        let mut got = vec![0u8; p.numel as usize * to.size()];
        let mut overflows = 0;
        for l in cuda::launches(deltas, &job, slice).unwrap() {
            let (status, bytes) = emulate(h, &l, deltas, &job);
            overflows += cuda::check_status(deltas, &p.name, job.terms, status).unwrap();
            let at = l.first as usize * to.size();
            got[at..at + bytes.len()].copy_from_slice(&bytes);
        }
        if got[..] != want[..] {
            let k = (0..p.numel as usize)
                .find(|&k| {
                    got[k * to.size()..(k + 1) * to.size()]
                        != want[k * to.size()..(k + 1) * to.size()]
                })
                .unwrap();
            panic!(
                "{:?}->{:?} numel {} deltas {:?}: element {k} differs: kernel {:02x?}, cpu {:02x?}",
                job.from,
                to,
                p.numel,
                deltas
                    .iter()
                    .map(|x| x.path().display().to_string())
                    .collect::<Vec<_>>(),
                &got[k * to.size()..(k + 1) * to.size()],
                &want[k * to.size()..(k + 1) * to.size()]
            );
        }
        let cpu_overflows = report
            .overflowed
            .iter()
            .find(|(n, _)| *n == p.name)
            .map_or(0, |x| x.1);
        assert_eq!(overflows, cpu_overflows, "overflow count of {}", p.name);
    }
}

fn slot(k: u64, n: u64) -> Interval {
    Interval::from_slot(k, n, None).unwrap()
}

fn cases(f: Float, numel: usize) -> Vec<Case> {
    let other = match f {
        Float::F32 => Float::BF16,
        Float::BF16 => Float::F16,
        Float::F16 => Float::F32,
        Float::F64 => Float::F32,
    };
    let c = |deltas: Vec<(Interval, u64, bool)>, weights: Vec<f64>, rescale, dtype| Case {
        f,
        numel,
        deltas,
        weights,
        rescale,
        dtype,
        slice: 2 * TILE,
    };
    vec![
        // One delta at 1/3.
        c(vec![(iv(1.0 / 3.0), 7, false)], vec![], false, None),
        // Three disjoint slots, weighted.
        c(
            vec![
                (slot(0, 3), 2411, false),
                (slot(1, 3), 2411, false),
                (slot(2, 3), 2411, false),
            ],
            vec![0.5, -1.25, 3.0],
            false,
            None,
        ),
        // Densities 0, 1e-4 and 1 under different seeds, rescaled.
        c(
            vec![
                (iv(0.0), 1, false),
                (iv(1e-4), 2, false),
                (iv(1.0), 3, false),
            ],
            vec![1.0, 3.0, -0.75],
            true,
            None,
        ),
        // A whole float term after a masked one, and a dtype conversion.
        c(
            vec![(iv(0.5), 11, false), (iv(0.25), 12, true)],
            vec![2.0, 0.5],
            true,
            Some(other),
        ),
    ]
}

fn run_sizes(f: Float) {
    let h = harness_or_skip!();
    let start = std::time::Instant::now();
    for (k, numel) in [1usize, 63, 65535, 65536, 65537, 3 * 65536 + 5]
        .into_iter()
        .enumerate()
    {
        for (j, case) in cases(f, numel).iter().enumerate() {
            check(h, case, (k * 10 + j) as u64 + 1000 * f.size() as u64);
        }
    }
    println!(
        "{f:?}: emulated kernel == CPU in {:.1} s",
        start.elapsed().as_secs_f64()
    );
}

#[test]
fn kernel_merges_bf16_like_the_cpu() {
    run_sizes(Float::BF16);
}

#[test]
fn kernel_merges_f16_like_the_cpu() {
    run_sizes(Float::F16);
}

#[test]
fn kernel_merges_f32_like_the_cpu() {
    run_sizes(Float::F32);
}

/// An f64 base, a dtype-only conversion (no delta changes the tensor), and one slice per tile.
#[test]
fn kernel_handles_f64_conversions_and_small_slices() {
    let h = harness_or_skip!();
    for (f, to) in [
        (Float::F64, Some(Float::BF16)),
        (Float::BF16, Some(Float::F32)),
    ] {
        let case = Case {
            f,
            numel: 2 * 65536 + 3,
            deltas: vec![(iv(0.1), 5, false)],
            weights: vec![],
            rescale: false,
            dtype: to,
            slice: TILE,
        };
        check(h, &case, 99);
    }
}

/// A delta whose offsets lie about a chunk: the kernel reports that chunk, and the host turns
/// it into the CPU path's message.
#[test]
fn kernel_reports_a_corrupt_chunk_like_the_cpu() {
    let h = harness_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let f = Float::BF16;
    let numel = 3 * 65536 + 7;
    let (base, tuned) = make(f, numel, 1, 5);
    let put = |p: &Path, name: &str, dtype: Dtype, shape: Vec<usize>, data: Vec<u8>| {
        write_file(
            p,
            &[(name.to_string(), dtype, shape, data)],
            &BTreeMap::new(),
        )
        .unwrap()
    };
    put(
        &d.join("base.safetensors"),
        "w",
        f.dtype(),
        vec![numel],
        base,
    );
    put(
        &d.join("t.safetensors"),
        "w",
        f.dtype(),
        vec![numel],
        tuned[0].clone(),
    );
    let base_ck = Checkpoint::open(&d.join("base.safetensors")).unwrap();
    let opts = ExtractOptions {
        seed: 3,
        interval: iv(0.3),
        slot: None,
        selector: Selector::default(),
        allow_nonfinite: true,
        fingerprint_output: false,
        own_files: false,
    };
    extract(
        &base_ck,
        &Tuned::Checkpoint(Checkpoint::open(&d.join("t.safetensors")).unwrap()),
        &Target::new(&d.join("good.safetensors")),
        &opts,
    )
    .unwrap();
    // Move one value from chunk 1 to chunk 2 in the offsets (still increasing, same total).
    let bytes = std::fs::read(d.join("good.safetensors")).unwrap();
    let good = Delta::open(&d.join("good.safetensors")).unwrap();
    let offs = good.offsets("w").to_vec();
    let mut bad_offs = offs.clone();
    bad_offs[2] -= 1;
    let key: Vec<u8> = offs[..].iter().flat_map(|x| x.to_le_bytes()).collect();
    let new: Vec<u8> = bad_offs.iter().flat_map(|x| x.to_le_bytes()).collect();
    let at = bytes
        .windows(key.len())
        .position(|w| w == key)
        .expect("offsets in the file");
    let mut bad = bytes.clone();
    bad[at..at + new.len()].copy_from_slice(&new);
    std::fs::write(d.join("bad.safetensors"), bad).unwrap();
    let deltas: Vec<Input> = vec![Delta::open(&d.join("bad.safetensors")).unwrap().into()];
    let mopts = MergeOptions {
        device: Device::Cpu,
        ..MergeOptions::default()
    };
    let cpu_err = merge(
        &base_ck,
        &deltas,
        &Target::new(&d.join("cpu.safetensors")),
        &mopts,
    )
    .map(|_| ())
    .unwrap_err()
    .to_string();
    let terms = [sotu_delta::merge::Term {
        delta: 0,
        coeff: 1.0,
        masked: true,
    }];
    let job = Job {
        name: "w",
        numel: numel as u64,
        base: base_ck.tensor("w").unwrap(),
        from: f,
        to: f,
        terms: &terms,
        ties: None,
    };
    let mut gpu_err = None;
    for l in cuda::launches(&deltas, &job, TILE).unwrap() {
        let (status, _) = emulate(h, &l, &deltas, &job);
        if let Err(e) = cuda::check_status(&deltas, "w", &terms, status) {
            gpu_err = Some(e.to_string());
            break;
        }
    }
    assert_eq!(gpu_err.as_deref(), Some(cpu_err.as_str()));
}

/// Deltas with other chunk sizes than the 65536 this tool writes (a reader must take any): chunks
/// that divide a block, that straddle blocks, and that span several blocks, so block start ranks
/// come from the offsets, from counting within a chunk, and from counting on from the previous
/// block.
#[test]
fn kernel_decodes_other_chunk_sizes_like_the_cpu() {
    let h = harness_or_skip!();
    let f = Float::BF16;
    let numel = 3 * 65536 + 5;
    for (k, chunk) in [1000u64, 4096, 65537, 200_000].into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (base, tuned) = make(f, numel, 2, 40 + k as u64);
        let put = |p: &Path, data: Vec<u8>| {
            write_file(
                p,
                &[("w".to_string(), f.dtype(), vec![numel], data)],
                &BTreeMap::new(),
            )
            .unwrap()
        };
        put(&d.join("base.safetensors"), base);
        let base_ck = Checkpoint::open(&d.join("base.safetensors")).unwrap();
        let mut deltas = Vec::new();
        for (t, density) in [(0usize, 0.3), (1, 0.05)] {
            let tp = d.join(format!("t{t}.safetensors"));
            put(&tp, tuned[t].clone());
            let seed = 9 + t as u64;
            let opts = ExtractOptions {
                seed,
                interval: iv(density),
                slot: None,
                selector: Selector::default(),
                allow_nonfinite: true,
                fingerprint_output: false,
                own_files: false,
            };
            let good = d.join(format!("good{t}.safetensors"));
            extract(
                &base_ck,
                &Tuned::Checkpoint(Checkpoint::open(&tp).unwrap()),
                &Target::new(&good),
                &opts,
            )
            .unwrap();
            // Re-chunk: the same kept values, offsets recomputed for `chunk`.
            let ck = Checkpoint::open(&good).unwrap();
            let mask = sotu_delta::mask::Mask::new(seed, "w", iv(density));
            let mut offs = vec![0u64];
            let mut j = 0;
            while j * chunk < numel as u64 {
                let n = mask.count_kept(j * chunk..(numel as u64).min((j + 1) * chunk));
                offs.push(offs.last().unwrap() + n);
                j += 1;
            }
            let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = ck
                .tensors()
                .iter()
                .map(|(n, i)| {
                    let data = ck.tensor(n).unwrap().whole().unwrap().into_owned();
                    (n.clone(), i.dtype, i.shape.clone(), data)
                })
                .collect();
            for tn in tensors.iter_mut().filter(|tn| tn.0 == "sotu/offsets/w") {
                tn.2 = vec![offs.len()];
                tn.3 = offs.iter().flat_map(|v| v.to_le_bytes()).collect();
            }
            let mut md: BTreeMap<String, String> = ck
                .metadata()
                .iter()
                .map(|(a, b)| (a.clone(), b.clone()))
                .collect();
            md.insert("chunk".into(), chunk.to_string());
            let out = d.join(format!("d{t}.safetensors"));
            write_file(&out, &tensors, &md).unwrap();
            let delta = Delta::open(&out).unwrap();
            assert_eq!(delta.params().chunk, chunk);
            deltas.push(delta.into());
        }
        let opts = MergeOptions {
            weights: vec![1.5, -0.5],
            rescale: true,
            device: Device::Cpu,
            ..MergeOptions::default()
        };
        compare(h, d, &base_ck, &deltas, &opts, 2 * TILE);
    }
}

/// The GPU path's pipeline (`cuda::run_pipeline`: two slots, staging, status, writes at the
/// right offsets, across tensors) with the emulated kernel as its device, on a checkpoint of
/// several tensors and dtypes, against the CPU merge.
#[test]
fn pipeline_over_several_tensors_matches_the_cpu() {
    let h = harness_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let specs: [(&str, Float, usize); 5] = [
        ("a.bf16", Float::BF16, 3 * 65536 + 5),
        ("b.bf16", Float::BF16, 63),
        ("c.f32", Float::F32, 65537),
        ("d.f16", Float::F16, 2 * 65536),
        ("e.empty", Float::BF16, 0),
    ];
    let mut base_t = Vec::new();
    let mut tuned_t = [Vec::new(), Vec::new()];
    for (k, (name, f, numel)) in specs.iter().enumerate() {
        let (b, t) = make(*f, *numel, 2, 70 + k as u64);
        base_t.push((name.to_string(), f.dtype(), vec![*numel], b));
        for (i, t) in t.into_iter().enumerate() {
            tuned_t[i].push((name.to_string(), f.dtype(), vec![*numel], t));
        }
    }
    write_file(&d.join("base.safetensors"), &base_t, &BTreeMap::new()).unwrap();
    let base_ck = Checkpoint::open(&d.join("base.safetensors")).unwrap();
    let mut deltas = Vec::new();
    for (i, t) in tuned_t.iter().enumerate() {
        let tp = d.join(format!("t{i}.safetensors"));
        write_file(&tp, t, &BTreeMap::new()).unwrap();
        let opts = ExtractOptions {
            seed: 2411,
            interval: slot(i as u64, 2),
            slot: None,
            // The second delta stores c.f32 whole: a dense float term.
            selector: if i == 1 {
                Selector::new(&[], &["c.f32".to_string()]).unwrap()
            } else {
                Selector::default()
            },
            allow_nonfinite: true,
            fingerprint_output: false,
            own_files: false,
        };
        let out = d.join(format!("d{i}.safetensors"));
        extract(
            &base_ck,
            &Tuned::Checkpoint(Checkpoint::open(&tp).unwrap()),
            &Target::new(&out),
            &opts,
        )
        .unwrap();
        deltas.push(Delta::open(&out).unwrap().into());
    }
    for dtype in [None, Some(Float::F16)] {
        let opts = MergeOptions {
            weights: vec![2.0, -0.5],
            rescale: true,
            dtype,
            device: Device::Cpu,
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
        let jobs: Vec<Job> = plans
            .iter()
            .filter_map(|p| p.job(&base_ck, &deltas))
            .collect();
        assert!(jobs.len() >= 4);
        // One block per slice: many slices, so both slots are reused within and across tensors.
        let what = format!("{dtype:?}");
        pipeline_matches_the_cpu(h, &deltas, &jobs, TILE, &cpu, &report, &what);
    }
}

/// The corrupt deltas of fixtures/bad whose chunk offsets lie: the pipeline with the emulated
/// kernel fails with the CPU merge's message.
#[test]
fn pipeline_reports_corrupt_fixtures_like_the_cpu() {
    let h = harness_or_skip!();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let base_ck = Checkpoint::open(&root.join("fixtures/tiny/base-bf16.safetensors")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "d-offsets-shifted-down",
        "d-offsets-shifted-up",
        "d-kept-count-more",
        "d-kept-count-fewer",
    ] {
        let path = root.join(format!("fixtures/bad/{name}.delta.safetensors"));
        let deltas: Vec<Input> = vec![Delta::open(&path).unwrap().into()];
        let opts = MergeOptions {
            device: Device::Cpu,
            force: true,
            ..MergeOptions::default()
        };
        let cpu_err = merge(
            &base_ck,
            &deltas,
            &Target::new(&dir.path().join("out.safetensors")),
            &opts,
        )
        .map(|_| ())
        .unwrap_err()
        .to_string();
        assert!(cpu_err.contains("the file is corrupt"), "{cpu_err}");
        let plans = plan(&base_ck, &deltas, &opts, &|_| 1.0).unwrap();
        let jobs: Vec<Job> = plans
            .iter()
            .filter(|p| {
                matches!(
                    p.source,
                    Source::Compute {
                        origin: Origin::Base,
                        ..
                    }
                )
            })
            .filter_map(|p| p.job(&base_ck, &deltas))
            .collect();
        let all = cuda::plan_slices(&deltas, &jobs, |_| Ok(2 * TILE)).unwrap();
        let mut emu = Emu::new(h, &jobs);
        let gpu_err = cuda::run_pipeline(&mut emu, &deltas, &jobs, &all, &|_, _, _| Ok(()))
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert_eq!(gpu_err, cpu_err, "{name}");
    }
}
