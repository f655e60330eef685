//! The CUDA backend: the kernels compile with NVRTC (CI, no GPU needed), the command line
//! without a GPU (clear failure for `--device cuda`, fallback for `auto`), and, on a machine with
//! a CUDA device, merges on the GPU equal to the CPU's byte for byte. Tests that need what this
//! machine lacks say `skipped: …` and pass, except that `SOTU_REQUIRE_NVRTC=1` (set by
//! `make test`) makes a missing NVRTC a failure.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use sotu_delta::dtype::Float;
use sotu_delta::extract::{ExtractOptions, Selector, extract};
use sotu_delta::format::Delta;
use sotu_delta::io::Checkpoint;
use sotu_delta::io::{Target, write_file};
use sotu_delta::mask::{Interval, MaskKey, mix32};
use sotu_delta::merge::cuda;
use sotu_delta::merge::{Device, MergeOptions, Method, merge};
use sotu_delta::tuned::Tuned;

#[path = "cuda_host/data.rs"]
mod data;
use data::{KATS, iv, make, make_finite};

/// The repository root: `SOTU_ROOT`, else where this test was built (a GPU machine runs the
/// test binary built elsewhere, docs/CUDA.md).
fn root() -> PathBuf {
    std::env::var_os("SOTU_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// The binary under test: `SOTU_BIN`, else the one cargo built with this test.
fn bin() -> PathBuf {
    let p = std::env::var_os("SOTU_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_sotu-delta")));
    // Absolute: the commands run in temporary folders.
    std::fs::canonicalize(&p).unwrap_or(p)
}

// ---------------------------------------------------------------------------------------------
// NVRTC (no GPU needed).

#[test]
fn kernels_compile_with_nvrtc_for_sm90_and_sm80() {
    if let Err(why) = cuda::nvrtc_available() {
        if std::env::var("SOTU_REQUIRE_NVRTC").is_ok_and(|v| v == "1") {
            panic!("SOTU_REQUIRE_NVRTC=1 but NVRTC cannot be loaded: {why}");
        }
        println!("skipped: NVRTC is not available ({why})");
        return;
    }
    for arch in ["compute_90", "compute_80"] {
        let ptx = cuda::compile_ptx(arch).unwrap_or_else(|e| panic!("{e}"));
        let target = format!(".target sm_{}", &arch["compute_".len()..]);
        assert!(ptx.contains(&target), "{arch}: PTX lacks {target}");
        for entry in cuda::kernel_entries() {
            assert!(
                ptx.contains(&format!(".entry {entry}(")),
                "{arch}: PTX lacks the entry point {entry}"
            );
        }
        // FORMAT.md section 8: no fused multiply-add in the merge arithmetic; and the per-item
        // arrays stay in registers (no local memory).
        for bad in ["fma.rn.f64", "fma.rn.f32", "ld.local", "st.local"] {
            assert!(!ptx.contains(bad), "{arch}: PTX contains {bad}");
        }
        println!("{arch}: {} bytes of PTX", ptx.len());
        // What the GPU path compiles at run time: the helpers at setup, one entry at a time.
        let helpers = cuda::compile_helpers_ptx(arch).unwrap_or_else(|e| panic!("{e}"));
        assert!(helpers.contains(".entry sotu_u_kernel("));
        assert!(!helpers.contains(".entry sotu_merge_") && !helpers.contains(".entry sotu_ties_"));
        let all = [Float::F16, Float::BF16, Float::F32, Float::F64];
        let compiled = [
            (cuda::Family::Merge, Float::BF16, Float::BF16),
            (cuda::Family::Merge, Float::F32, Float::F16),
            (cuda::Family::Ties, Float::BF16, Float::BF16),
            (cuda::Family::Ties, Float::F16, Float::F32),
        ];
        for (family, from, to) in compiled {
            let one = match family {
                cuda::Family::Merge => cuda::compile_merge_ptx(arch, from, to),
                cuda::Family::Ties => cuda::compile_ties_ptx(arch, from, to),
            }
            .unwrap_or_else(|e| panic!("{e}"));
            for k in cuda::Family::ALL {
                for f in all {
                    for t in all {
                        let entry = format!(".entry {}(", k.entry(f, t));
                        assert_eq!(
                            one.contains(&entry),
                            (k, f, t) == (family, from, to),
                            "{arch}: {entry}"
                        );
                    }
                }
            }
            assert_eq!(
                cuda::ties_entry(from, to),
                cuda::Family::Ties.entry(from, to)
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The command line, whatever the machine.

fn fixture(name: &str) -> String {
    root()
        .join("fixtures/tiny")
        .join(name)
        .display()
        .to_string()
}

fn sotu(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(bin())
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

fn extract_fixture_deltas(dir: &Path, dtype: &str) -> Vec<String> {
    (0..3)
        .map(|k| {
            let out = format!("d{k}-{dtype}.safetensors");
            let o = sotu(
                dir,
                &[
                    "extract",
                    "--base",
                    &fixture(&format!("base-{dtype}.safetensors")),
                    "--tuned",
                    &fixture(&format!("task{}-{dtype}.safetensors", k + 1)),
                    "--slot",
                    &format!("{k}/3"),
                    "-o",
                    &out,
                ],
            );
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            out
        })
        .collect()
}

#[test]
fn device_flag_without_or_with_a_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let deltas = extract_fixture_deltas(d, "bf16");
    let base = fixture("base-bf16.safetensors");
    let mut args = vec!["merge", "--base", base.as_str()];
    args.extend(deltas.iter().map(String::as_str));
    let with = |extra: &[&'static str]| {
        let mut a = args.clone();
        a.extend_from_slice(extra);
        sotu(d, &a)
    };
    let leftovers = || -> Vec<String> {
        std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("partial") || n.starts_with("cuda"))
            .collect()
    };
    let gpu = cuda::backend();
    let o = with(&["--device", "cuda", "-o", "cuda.safetensors"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    match &gpu {
        Err(why) => {
            assert_eq!(o.status.code(), Some(1), "{err}");
            assert!(
                err.contains("--device cuda: no usable CUDA device"),
                "{err}"
            );
            assert!(err.contains(why.as_str()), "{err}");
            assert!(leftovers().is_empty(), "{:?}", leftovers());
        }
        Ok(_) => assert!(o.status.success(), "{err}"),
    }
    let o = with(&["--device", "auto", "--verbose", "-o", "auto.safetensors"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    let text = String::from_utf8_lossy(&o.stdout);
    match &gpu {
        Err(why) => {
            assert!(
                err.contains("--device auto: merging on the CPU") && err.contains(why.as_str()),
                "{err}"
            );
            assert!(text.contains("device: cpu"), "{text}");
        }
        Ok(g) => assert!(
            text.contains(&format!("device: cuda: {}", g.name())),
            "{text}"
        ),
    }
    let o = with(&["--device", "cpu", "--json", "-o", "cpu.safetensors"]);
    assert!(o.status.success());
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(json["device"], "cpu");
    let o = with(&["--json", "-o", "auto2.safetensors"]);
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let want = match &gpu {
        Err(_) => "cpu".to_string(),
        Ok(g) => format!("cuda: {}", g.name()),
    };
    assert_eq!(json["device"], want.as_str());
    // Whatever did the work, the bytes are the same.
    let cpu = std::fs::read(d.join("cpu.safetensors")).unwrap();
    assert_eq!(std::fs::read(d.join("auto.safetensors")).unwrap(), cpu);
    assert_eq!(std::fs::read(d.join("auto2.safetensors")).unwrap(), cpu);
    // Without --verbose, auto says nothing about devices.
    let o = with(&["-o", "quiet.safetensors"]);
    assert!(!String::from_utf8_lossy(&o.stderr).contains("--device auto"));
    // A bad value is a usage error.
    let o = with(&["--device", "tpu", "-o", "x.safetensors"]);
    assert_eq!(o.status.code(), Some(2));
}

// ---------------------------------------------------------------------------------------------
// On a GPU.

macro_rules! gpu_or_skip {
    () => {
        match cuda::backend() {
            Ok(g) => g,
            Err(why) => {
                println!("skipped: no CUDA device ({why})");
                return;
            }
        }
    };
}

#[test]
fn gpu_mask_matches_the_known_answers() {
    let gpu = gpu_or_skip!();
    let xs = [0u32, 1, 2, 0xffff_ffff, 0x1234_5678];
    let want = [0u32, 0x86d2_fa73, 0x0da7_f4e7, 0x99b5_e683, 0x16e7_76bd];
    assert_eq!(gpu.mix32(&xs).unwrap(), want);
    let many: Vec<u32> = (0..100_000u32)
        .map(|i| i.wrapping_mul(0x9e37_79b9))
        .collect();
    let got = gpu.mix32(&many).unwrap();
    assert!(many.iter().zip(&got).all(|(&x, &y)| mix32(x) == y));
    for (seed, name, k0, k1, vectors) in KATS {
        assert_eq!(MaskKey::new(seed, name).words(), (k0, k1));
        let idx: Vec<u64> = vectors.iter().map(|v| v.0).collect();
        let got = gpu.mask_u(k0, k1, &idx).unwrap();
        for (k, &(i, u)) in vectors.iter().enumerate() {
            assert_eq!(got[k], u, "u({i}) of {name:?} on the GPU");
        }
    }
}

#[test]
fn gpu_merges_the_fixtures_like_the_cpu() {
    let _gpu = gpu_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for dtype in ["bf16", "f16", "f32"] {
        let deltas = extract_fixture_deltas(d, dtype);
        let base = fixture(&format!("base-{dtype}.safetensors"));
        for extra in [
            &[][..],
            &["--rescale", "--weights", "0.5,-2,1.25"][..],
            &["--dtype", "f16"][..],
        ] {
            let mut outs = Vec::new();
            for device in ["cpu", "cuda"] {
                let out = format!("m-{dtype}-{device}.safetensors");
                let mut a = vec![
                    "merge",
                    "--base",
                    base.as_str(),
                    "--device",
                    device,
                    "-o",
                    &out,
                ];
                a.extend(deltas.iter().map(String::as_str));
                a.extend_from_slice(extra);
                let o = sotu(d, &a);
                assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
                outs.push(std::fs::read(d.join(&out)).unwrap());
            }
            assert!(
                outs[0] == outs[1],
                "{dtype} {extra:?}: GPU and CPU outputs differ"
            );
        }
    }
}

/// Per delta (interval, seed, stored whole); weights; rescale.
type DeltaLayout = (Vec<(Interval, u64, bool)>, Vec<f64>, bool);

#[test]
fn gpu_merges_generated_tensors_like_the_cpu() {
    let _gpu = gpu_or_skip!();
    let sizes = [1usize, 63, 65535, 65536, 65537, 3 * 65536 + 5, 5_000_011];
    let layouts: Vec<DeltaLayout> = vec![
        (vec![(iv(1.0 / 3.0), 7, false)], vec![], false),
        (
            (0..3)
                .map(|k| (Interval::from_slot(k, 3, None).unwrap(), 2411, false))
                .collect(),
            vec![0.5, -1.25, 3.0],
            false,
        ),
        (
            vec![
                (iv(0.0), 1, false),
                (iv(1e-4), 2, false),
                (iv(1.0), 3, false),
            ],
            vec![1.0, 3.0, -0.75],
            true,
        ),
        (
            vec![(iv(0.5), 11, false), (iv(0.25), 12, true)],
            vec![2.0, 0.5],
            true,
        ),
    ];
    for f in [Float::BF16, Float::F16, Float::F32] {
        for (k, &numel) in sizes.iter().enumerate() {
            for (j, (ivs, weights, rescale)) in layouts.iter().enumerate() {
                for dtype in [None, Some(Float::BF16), Some(Float::F32)] {
                    let dir = tempfile::tempdir().unwrap();
                    let d = dir.path();
                    let (base, tuned) = make(f, numel, ivs.len(), (k * 10 + j) as u64);
                    let put = |p: &Path, data: Vec<u8>| {
                        write_file(
                            p,
                            &[("w".into(), f.dtype(), vec![numel], data)],
                            &BTreeMap::new(),
                        )
                        .unwrap()
                    };
                    put(&d.join("base.safetensors"), base);
                    let base_ck = Checkpoint::open(&d.join("base.safetensors")).unwrap();
                    let mut deltas = Vec::new();
                    for (t, (interval, seed, whole)) in ivs.iter().enumerate() {
                        let tp = d.join(format!("t{t}.safetensors"));
                        put(&tp, tuned[t].clone());
                        let opts = ExtractOptions {
                            seed: *seed,
                            interval: *interval,
                            slot: None,
                            selector: if *whole {
                                Selector::new(&[], &["w".to_string()]).unwrap()
                            } else {
                                Selector::default()
                            },
                            allow_nonfinite: true,
                            fingerprint_output: false,
                            own_files: false,
                        };
                        let out = d.join(format!("d{t}.safetensors"));
                        extract(
                            &base_ck,
                            &Tuned::Checkpoint(Checkpoint::open(&tp).unwrap()),
                            &Target::new(&out),
                            &opts,
                        )
                        .unwrap();
                        deltas.push(Delta::open(&out).unwrap().into());
                    }
                    let mut outs = Vec::new();
                    for device in [Device::Cpu, Device::Cuda] {
                        let opts = MergeOptions {
                            weights: weights.clone(),
                            rescale: *rescale,
                            dtype,
                            force: false,
                            device,
                            fingerprint_output: false,
                            ..MergeOptions::default()
                        };
                        let out = d.join(format!("{device:?}.safetensors"));
                        let r = merge(&base_ck, &deltas, &Target::new(&out), &opts).unwrap();
                        outs.push((std::fs::read(&out).unwrap(), r.overflowed));
                    }
                    assert!(
                        outs[0] == outs[1],
                        "{f:?} numel {numel} layout {j} dtype {dtype:?}: GPU and CPU differ"
                    );
                }
            }
        }
    }
}

/// A delta whose chunk offsets lie fails the merge on the GPU with the CPU's message.
#[test]
fn gpu_reports_corrupt_fixture_chunks_like_the_cpu() {
    let _gpu = gpu_or_skip!();
    let bad = root().join("fixtures/bad");
    let base = root().join("fixtures/tiny/base-bf16.safetensors");
    for name in [
        "d-offsets-shifted-down",
        "d-offsets-shifted-up",
        "d-kept-count-more",
        "d-kept-count-fewer",
    ] {
        let delta = bad.join(format!("{name}.delta.safetensors"));
        let dir = tempfile::tempdir().unwrap();
        let run = |device: &str| {
            sotu(
                dir.path(),
                &[
                    "merge",
                    "--base",
                    &base.display().to_string(),
                    &delta.display().to_string(),
                    "--device",
                    device,
                    "--force",
                    "-o",
                    "out.safetensors",
                ],
            )
        };
        let (c, g) = (run("cpu"), run("cuda"));
        assert_eq!(c.status.code(), Some(1), "{name}");
        assert!(
            String::from_utf8_lossy(&c.stderr).contains("the file is corrupt"),
            "{name}"
        );
        assert_eq!(c.status.code(), g.status.code(), "{name}");
        assert_eq!(
            String::from_utf8_lossy(&c.stderr),
            String::from_utf8_lossy(&g.stderr),
            "{name}"
        );
    }
}

/// `--method ties` on the GPU (the ties kernel; the thresholds computed on the CPU) against the
/// CPU, byte for byte: the fixtures in three dtypes, sparse deltas under independent seeds and
/// dense ones, with weights, α, trim and `--dtype`.
#[test]
fn gpu_merges_ties_fixtures_like_the_cpu() {
    let _gpu = gpu_or_skip!();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for dtype in ["bf16", "f16", "f32"] {
        let base = fixture(&format!("base-{dtype}.safetensors"));
        for (layout, mask) in [("sparse", "0.33"), ("dense", "1")] {
            let deltas: Vec<String> = (0..3)
                .map(|k| {
                    let out = format!("{layout}{k}-{dtype}.safetensors");
                    let o = sotu(
                        d,
                        &[
                            "extract",
                            "--base",
                            &base,
                            "--tuned",
                            &fixture(&format!("task{}-{dtype}.safetensors", k + 1)),
                            "--density",
                            mask,
                            "--seed",
                            &(10 + k).to_string(),
                            "-o",
                            &out,
                        ],
                    );
                    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
                    out
                })
                .collect();
            for extra in [
                &[][..],
                &["--weights", "1,-0.5,2", "--alpha", "1.5", "--trim", "0.3"][..],
                &["--trim", "1", "--dtype", "f16"][..],
            ] {
                let mut outs = Vec::new();
                for device in ["cpu", "cuda"] {
                    let out = format!("ties-{dtype}-{device}.safetensors");
                    let mut a = vec!["merge", "--base", &base, "--method", "ties"];
                    a.extend(["--device", device, "--json", "-o", &out]);
                    a.extend(deltas.iter().map(String::as_str));
                    a.extend_from_slice(extra);
                    let o = sotu(d, &a);
                    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
                    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
                    let on = json["device"].as_str().unwrap_or_default().to_string();
                    assert!(on.starts_with(device), "{on}");
                    outs.push((
                        std::fs::read(d.join(&out)).unwrap(),
                        json["overflowed"].clone(),
                    ));
                }
                assert!(
                    outs[0] == outs[1],
                    "{dtype} {layout} {extra:?}: GPU and CPU ties outputs differ"
                );
            }
        }
    }
}

/// `ties` on generated tensors, several slices' worth of blocks, against the CPU: sparse deltas
/// under independent seeds (overlapping), dense deltas (elections on sums of zero), overflows.
#[test]
fn gpu_merges_ties_generated_tensors_like_the_cpu() {
    let _gpu = gpu_or_skip!();
    let third = iv(1.0 / 3.0);
    type Layout = (Vec<(Interval, u64)>, Vec<f64>, f64, f64);
    let layouts: Vec<Layout> = vec![
        (vec![(third, 7), (third, 8), (third, 9)], vec![], 1.0, 0.2),
        (
            vec![(third, 17), (third, 18), (third, 19)],
            vec![1.0, -0.75, 1.5],
            1.7,
            0.35,
        ),
        (vec![(iv(1.0), 1), (iv(1.0), 2)], vec![], 2.0, 1.0),
    ];
    for f in [Float::BF16, Float::F16, Float::F32] {
        for (k, &numel) in [1usize, 65537, 3 * 65536 + 5, 5_000_011].iter().enumerate() {
            for (j, (ivs, weights, alpha, trim)) in layouts.iter().enumerate() {
                let dir = tempfile::tempdir().unwrap();
                let d = dir.path();
                let (base, tuned) = make_finite(f, numel, ivs.len(), (k * 10 + j) as u64);
                let put = |p: &Path, data: Vec<u8>| {
                    write_file(
                        p,
                        &[("w".into(), f.dtype(), vec![numel], data)],
                        &BTreeMap::new(),
                    )
                    .unwrap()
                };
                put(&d.join("base.safetensors"), base);
                let base_ck = Checkpoint::open(&d.join("base.safetensors")).unwrap();
                let mut deltas = Vec::new();
                for (t, (interval, seed)) in ivs.iter().enumerate() {
                    let tp = d.join(format!("t{t}.safetensors"));
                    put(&tp, tuned[t].clone());
                    let opts = ExtractOptions {
                        seed: *seed,
                        interval: *interval,
                        slot: None,
                        selector: Selector::default(),
                        allow_nonfinite: false,
                        fingerprint_output: false,
                        own_files: false,
                    };
                    let out = d.join(format!("d{t}.safetensors"));
                    let tuned_ck = Tuned::Checkpoint(Checkpoint::open(&tp).unwrap());
                    extract(&base_ck, &tuned_ck, &Target::new(&out), &opts).unwrap();
                    deltas.push(Delta::open(&out).unwrap().into());
                }
                for dtype in [None, Some(Float::F32)] {
                    let mut outs = Vec::new();
                    for device in [Device::Cpu, Device::Cuda] {
                        let opts = MergeOptions {
                            weights: weights.clone(),
                            dtype,
                            device,
                            method: Method::Ties,
                            alpha: *alpha,
                            trim: *trim,
                            ..MergeOptions::default()
                        };
                        let out = d.join(format!("{device:?}.safetensors"));
                        let r = merge(&base_ck, &deltas, &Target::new(&out), &opts).unwrap();
                        assert_eq!(r.device.starts_with("cuda"), device == Device::Cuda);
                        outs.push((std::fs::read(&out).unwrap(), r.overflowed));
                    }
                    assert!(
                        outs[0] == outs[1],
                        "{f:?} numel {numel} layout {j} dtype {dtype:?}: GPU and CPU ties differ"
                    );
                }
            }
        }
    }
}
