//! Property tests over dtypes, shapes (0-d, empty, one element, around chunk and tile
//! boundaries), densities, slots and seeds. They check the promises of docs/FORMAT.md: kept
//! values are exact, the kept fraction follows the density, slots are disjoint and cover
//! everything, and a merge is the documented per-element arithmetic for any thread count.

use std::collections::BTreeMap;
use std::path::Path;

use proptest::prelude::*;
use safetensors::Dtype;
use sotu_delta::dtype::Float;
use sotu_delta::extract::{ExtractOptions, Selector, extract};
use sotu_delta::format::{Delta, Kind};
use sotu_delta::io::Checkpoint;
use sotu_delta::io::{Target, write_file};
use sotu_delta::mask::{Interval, Mask, SPAN};
use sotu_delta::merge::{Input, MergeOptions, merge};
use sotu_delta::tuned::Tuned;

/// A small deterministic generator (splitmix64), so that a proptest seed expands into as many
/// values as a tensor needs without proptest generating each one.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Roughly weight-like values: centred, a few hundredths wide, sometimes exactly ±0.
    fn weight(&mut self) -> f64 {
        let r = self.next();
        if r.is_multiple_of(97) {
            return 0.0;
        }
        if r.is_multiple_of(101) {
            return -0.0;
        }
        ((r >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 0.1
    }
}

fn encode(f: Float, values: &[f64]) -> Vec<u8> {
    let mut out = Vec::new();
    f.store_all(values, &mut out);
    out
}

fn decode(f: Float, bytes: &[u8]) -> Vec<u64> {
    (0..bytes.len() / f.size())
        .map(|i| f.bits(bytes, i))
        .collect()
}

/// A base tensor and `n` fine-tunes of it, each a small dense change, rounded to `f`.
fn make_tensors(f: Float, numel: usize, tunes: usize, seed: u64) -> (Vec<u8>, Vec<Vec<u8>>) {
    let mut rng = Rng(seed);
    let base: Vec<f64> = (0..numel).map(|_| rng.weight()).collect();
    let base_bytes = encode(f, &base);
    let base_rounded: Vec<f64> = {
        let mut v = Vec::new();
        f.load_all(&base_bytes, &mut v);
        v
    };
    let tuned = (0..tunes)
        .map(|_| {
            // A fine-tuned −0.0 over a nonzero base is the one value the merge arithmetic
            // cannot give back (docs/FORMAT.md section 8); `inexact_elements_are_counted`
            // covers it, so the exactness properties are fed +0.0 instead.
            let t: Vec<f64> = base_rounded
                .iter()
                .map(|b| {
                    let t = b + rng.weight() * 0.05;
                    let r = f.round_bits(t);
                    if r == f.round_bits(-0.0) { 0.0 } else { t }
                })
                .collect();
            encode(f, &t)
        })
        .collect();
    (base_bytes, tuned)
}

fn write(path: &Path, name: &str, f: Float, shape: &[usize], data: Vec<u8>) {
    write_file(
        path,
        &[(name.to_string(), f.dtype(), shape.to_vec(), data)],
        &BTreeMap::new(),
    )
    .unwrap();
}

fn do_extract(dir: &Path, tuned: &str, out: &str, seed: u64, interval: Interval) -> Delta {
    extract_with(dir, tuned, out, seed, interval, Selector::default())
}

fn extract_with(
    dir: &Path,
    tuned: &str,
    out: &str,
    seed: u64,
    interval: Interval,
    selector: Selector,
) -> Delta {
    let base = Checkpoint::open(&dir.join("base.safetensors")).unwrap();
    let tuned = Tuned::Checkpoint(Checkpoint::open(&dir.join(tuned)).unwrap());
    let opts = ExtractOptions {
        seed,
        interval,
        slot: None,
        selector,
        allow_nonfinite: false,
        fingerprint_output: false,
        own_files: false,
    };
    extract(&base, &tuned, &Target::new(&dir.join(out)), &opts).unwrap();
    Delta::open(&dir.join(out)).unwrap()
}

fn do_merge(dir: &Path, deltas: &[&str], opts: &MergeOptions, threads: usize) -> Vec<u64> {
    let base = Checkpoint::open(&dir.join("base.safetensors")).unwrap();
    let deltas: Vec<Input> = deltas
        .iter()
        .map(|d| Delta::open(&dir.join(d)).unwrap().into())
        .collect();
    let out = dir.join(format!("merged-{threads}.safetensors"));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| merge(&base, &deltas, &Target::new(&out), opts))
        .unwrap();
    let ck = Checkpoint::open(&out).unwrap();
    let w = ck.tensor("w").unwrap();
    decode(Float::of(w.info().dtype).unwrap(), &w.whole().unwrap())
}

fn arb_float() -> impl Strategy<Value = Float> {
    prop_oneof![Just(Float::F32), Just(Float::F16), Just(Float::BF16)]
}

/// Shapes at the edges: 0-d, empty, one element, either side of a 65536-element chunk and of a
/// 262144-element merge tile, and multi-dimensional odd sizes.
fn arb_shape() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        Just(vec![]),
        Just(vec![0]),
        Just(vec![4, 0, 3]),
        Just(vec![1]),
        Just(vec![7, 13]),
        Just(vec![65535]),
        Just(vec![65536]),
        Just(vec![65537]),
        Just(vec![2, 65539]),
        Just(vec![262143]),
        Just(vec![262145]),
    ]
}

fn arb_density() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(0.0),
        Just(1e-4),
        Just(1.0 / 3.0),
        Just(1.0),
        0.0..=1.0f64
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    /// Kept values are the fine-tuned values bit for bit; the kept count follows the density;
    /// apply gives the fine-tune at kept elements and the base elsewhere. An excluded tensor is
    /// stored whole and applied as a dense delta: the fine-tune everywhere.
    #[test]
    fn kept_values_are_exact_and_apply_reproduces_them(
        f in arb_float(), shape in arb_shape(), density in arb_density(),
        seed in any::<u64>(), data_seed in any::<u64>(), exclude in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let numel: usize = shape.iter().product();
        let (base, tuned) = make_tensors(f, numel, 1, data_seed);
        write(&dir.path().join("base.safetensors"), "w", f, &shape, base.clone());
        write(&dir.path().join("t.safetensors"), "w", f, &shape, tuned[0].clone());
        let interval = Interval::from_density(density).unwrap();
        let selector = if exclude {
            Selector::new(&[], &["w".to_string()]).unwrap()
        } else {
            Selector::default()
        };
        let delta = extract_with(dir.path(), "t.safetensors", "d.safetensors", seed, interval, selector);
        let e = &delta.entries()["w"];
        if base == tuned[0] {
            prop_assert_eq!(e.kind, Kind::Same);
        } else if exclude {
            prop_assert_eq!(e.kind, Kind::Whole);
        } else {
            prop_assert_eq!(e.kind, Kind::Masked);
            let mask = Mask::new(seed, "w", interval);
            let t_bits = decode(f, &tuned[0]);
            let values = decode(f, &delta.stored("w").whole().unwrap());
            let kept: Vec<usize> = (0..numel).filter(|&i| mask.kept(i as u64)).collect();
            prop_assert_eq!(kept.len() as u64, e.kept.unwrap());
            for (j, &i) in kept.iter().enumerate() {
                prop_assert_eq!(values[j], t_bits[i], "kept element {}", i);
            }
            // Binomial bound: within 6 standard deviations (plus one for tiny tensors).
            let (n, d) = (numel as f64, interval.density());
            let sd = (n * d * (1.0 - d)).sqrt();
            prop_assert!((kept.len() as f64 - n * d).abs() <= 6.0 * sd + 1.0,
                "kept {} of {} at density {}", kept.len(), numel, d);
        }
        let out = do_merge(dir.path(), &["d.safetensors"], &MergeOptions::default(), 2);
        let mask = Mask::new(seed, "w", interval);
        let (b_bits, t_bits) = (decode(f, &base), decode(f, &tuned[0]));
        for i in 0..numel {
            let kept = e.kind == Kind::Whole || (e.kind == Kind::Masked && mask.kept(i as u64));
            let want = if kept { t_bits[i] } else { b_bits[i] };
            prop_assert_eq!(out[i], want, "element {}", i);
        }
    }

    /// Three deltas in disjoint slots under one seed: each element takes the value of the one
    /// delta that keeps it, exactly, and the merge is the same on 1 and 2 threads.
    #[test]
    fn disjoint_slots_merge_to_each_owner(
        f in arb_float(), shape in arb_shape(), seed in any::<u64>(), data_seed in any::<u64>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let numel: usize = shape.iter().product();
        let (base, tuned) = make_tensors(f, numel, 3, data_seed);
        write(&dir.path().join("base.safetensors"), "w", f, &shape, base.clone());
        let mut names = Vec::new();
        for (k, t) in tuned.iter().enumerate() {
            write(&dir.path().join(format!("t{k}.safetensors")), "w", f, &shape, t.clone());
            let iv = Interval::from_slot(k as u64, 3, None).unwrap();
            do_extract(dir.path(), &format!("t{k}.safetensors"), &format!("d{k}.safetensors"), seed, iv);
            names.push(format!("d{k}.safetensors"));
        }
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let one = do_merge(dir.path(), &names, &MergeOptions::default(), 1);
        let two = do_merge(dir.path(), &names, &MergeOptions::default(), 2);
        prop_assert_eq!(&one, &two);
        let key = Mask::new(seed, "w", Interval::from_density(1.0).unwrap()).key;
        let tuned_bits: Vec<Vec<u64>> = tuned.iter().map(|t| decode(f, t)).collect();
        for i in 0..numel {
            let u = key.u(i as u64) as u64;
            let owner = (0..3).find(|&k| {
                let iv = Interval::from_slot(k, 3, None).unwrap();
                iv.lo() <= u && u < iv.hi()
            }).unwrap() as usize;
            prop_assert_eq!(one[i], tuned_bits[owner][i], "element {}", i);
        }
    }

    /// With overlapping masks, weights and rescaling, every element is the formula of
    /// docs/FORMAT.md section 8: f64, deltas in order, acc from −0.0, one rounding.
    #[test]
    fn weighted_rescaled_merge_follows_the_formula(
        f in arb_float(), out_f in proptest::option::of(arb_float()), shape in arb_shape(),
        d0 in arb_density(), d1 in arb_density(),
        w0 in -2.0..2.0f64, w1 in -2.0..2.0f64, rescale in any::<bool>(),
        s0 in any::<u64>(), s1 in any::<u64>(), data_seed in any::<u64>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let numel: usize = shape.iter().product();
        let (base, tuned) = make_tensors(f, numel, 2, data_seed);
        write(&dir.path().join("base.safetensors"), "w", f, &shape, base.clone());
        let ivs = [Interval::from_density(d0).unwrap(), Interval::from_density(d1).unwrap()];
        let seeds = [s0, s1];
        for k in 0..2 {
            write(&dir.path().join(format!("t{k}.safetensors")), "w", f, &shape, tuned[k].clone());
            do_extract(dir.path(), &format!("t{k}.safetensors"), &format!("d{k}.safetensors"), seeds[k], ivs[k]);
        }
        let opts = MergeOptions { weights: vec![w0, w1], rescale, dtype: out_f, force: false, ..MergeOptions::default() };
        let out = do_merge(dir.path(), &["d0.safetensors", "d1.safetensors"], &opts, 2);
        let (mut b, mut t0, mut t1) = (Vec::new(), Vec::new(), Vec::new());
        f.load_all(&base, &mut b);
        f.load_all(&tuned[0], &mut t0);
        f.load_all(&tuned[1], &mut t1);
        let coeff = |k: usize, w: f64| {
            let width = ivs[k].hi() - ivs[k].lo();
            if rescale && width > 0 { w * (SPAN as f64 / width as f64) } else { w }
        };
        let (c0, c1) = (coeff(0, w0), coeff(1, w1));
        let (m0, m1) = (Mask::new(s0, "w", ivs[0]), Mask::new(s1, "w", ivs[1]));
        let to = out_f.unwrap_or(f);
        for i in 0..numel {
            let mut acc = -0.0f64;
            if m0.kept(i as u64) { acc += c0 * (t0[i] - b[i]); }
            if m1.kept(i as u64) { acc += c1 * (t1[i] - b[i]); }
            prop_assert_eq!(out[i], to.round_bits(b[i] + acc), "element {}", i);
        }
    }

    /// Slots 0/N … (N−1)/N under one seed keep every element exactly once.
    #[test]
    fn slots_are_disjoint_and_cover(n in 1u64..9, seed in any::<u64>(), start in any::<u64>()) {
        let masks: Vec<Mask> = (0..n)
            .map(|k| Mask::new(seed, "t", Interval::from_slot(k, n, None).unwrap()))
            .collect();
        let start = start % (u64::MAX - 5000);
        for i in start..start + 4096 {
            prop_assert_eq!(masks.iter().filter(|m| m.kept(i)).count(), 1, "index {}", i);
        }
    }

    /// Counting, visiting and testing kept indices agree, also across a 2^32 block boundary
    /// and far beyond (index arithmetic in u64).
    #[test]
    fn mask_views_agree_beyond_2_pow_32(
        seed in any::<u64>(), density in arb_density(), block in 0u64..(1 << 20), len in 0u64..5000,
    ) {
        let m = Mask::new(seed, "big", Interval::from_density(density).unwrap());
        let start = (block << 32).saturating_sub(len / 2);
        let r = start..start + len;
        let brute: Vec<u64> = r.clone().filter(|&i| m.kept(i)).collect();
        let mut seen = Vec::new();
        m.for_each_kept(r.clone(), |i| seen.push(i));
        prop_assert_eq!(&seen, &brute);
        prop_assert_eq!(m.count_kept(r), brute.len() as u64);
    }
}

/// The kept fraction over 2^20 consecutive elements and the collision rate of two independent
/// seeds stay within 5 standard deviations of d and d².
#[test]
fn mask_statistics_follow_the_density() {
    let n = 1u64 << 20;
    for (k, d) in [1e-3, 0.01, 0.1, 1.0 / 3.0, 0.5, 0.9]
        .into_iter()
        .enumerate()
    {
        let iv = Interval::from_density(d).unwrap();
        let a = Mask::new(k as u64, "model.layers.3.mlp.up_proj.weight", iv);
        let b = Mask::new(k as u64 + 1000, "model.layers.3.mlp.up_proj.weight", iv);
        let kept = a.count_kept(0..n) as f64;
        let sd = (n as f64 * d * (1.0 - d)).sqrt();
        assert!(
            (kept - n as f64 * d).abs() < 5.0 * sd,
            "density {d}: kept {kept}"
        );
        let both = (0..n).filter(|&i| a.kept(i) && b.kept(i)).count() as f64;
        let d2 = d * d;
        let sd2 = (n as f64 * d2 * (1.0 - d2)).sqrt();
        assert!(
            (both - n as f64 * d2).abs() < 5.0 * sd2,
            "density {d}: collisions {both}"
        );
    }
}

/// The two cases the merge arithmetic cannot reproduce (docs/FORMAT.md section 8): an f32
/// fine-tuned value 2^50 times smaller than its base, and a fine-tuned −0.0 over a nonzero
/// base. Extract counts them; the ordinary element stays exact.
#[test]
fn inexact_elements_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let f = Float::F32;
    write(
        &dir.path().join("base.safetensors"),
        "w",
        f,
        &[3],
        encode(f, &[1.0, 0.5, 0.5]),
    );
    write(
        &dir.path().join("t.safetensors"),
        "w",
        f,
        &[3],
        encode(f, &[1e-15, 0.25, -0.0]),
    );
    let delta = do_extract(
        dir.path(),
        "t.safetensors",
        "d.safetensors",
        1,
        Interval::from_density(1.0).unwrap(),
    );
    assert_eq!(delta.stats(delta.entries()["w"].row)[2], 2.0);
    let out = do_merge(dir.path(), &["d.safetensors"], &MergeOptions::default(), 1);
    assert_ne!(out[0], (1e-15f32).to_bits() as u64);
    assert_eq!(out[1], (0.25f32).to_bits() as u64);
    assert_eq!(out[2], (0.0f32).to_bits() as u64);
}

/// Mixed tensors in one file: integer tensors that changed are stored whole and replaced, new
/// tensors are stored whole and added, unchanged tensors are `same` and copied from the base.
#[test]
fn non_float_new_and_unchanged_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let f = Float::BF16;
    let ids = |v: i64| {
        (0..4i64)
            .flat_map(|i| (i + v).to_le_bytes())
            .collect::<Vec<u8>>()
    };
    let w = encode(f, &[0.5, -0.25, 0.125]);
    let base = vec![
        ("ids".to_string(), Dtype::I64, vec![4], ids(0)),
        ("w".to_string(), Dtype::BF16, vec![3], w.clone()),
        ("frozen".to_string(), Dtype::BF16, vec![3], w.clone()),
    ];
    let mut tuned = base.clone();
    tuned[0].3 = ids(1);
    tuned[1].3 = encode(f, &[0.75, -0.25, 0.0]);
    tuned.push((
        "head".to_string(),
        Dtype::BF16,
        vec![2],
        encode(f, &[1.0, 2.0]),
    ));
    write_file(
        &dir.path().join("base.safetensors"),
        &base,
        &BTreeMap::new(),
    )
    .unwrap();
    write_file(&dir.path().join("t.safetensors"), &tuned, &BTreeMap::new()).unwrap();
    let delta = do_extract(
        dir.path(),
        "t.safetensors",
        "d.safetensors",
        3,
        Interval::from_density(1.0).unwrap(),
    );
    let kinds: Vec<(&str, Kind, bool)> = delta
        .entries()
        .iter()
        .map(|(n, e)| (n.as_str(), e.kind, e.in_base))
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("frozen", Kind::Same, true),
            ("head", Kind::Whole, false),
            ("ids", Kind::Whole, true),
            ("w", Kind::Masked, true),
        ]
    );
    let base_ck = Checkpoint::open(&dir.path().join("base.safetensors")).unwrap();
    merge(
        &base_ck,
        &[delta.into()],
        &Target::new(&dir.path().join("out.safetensors")),
        &MergeOptions::default(),
    )
    .unwrap();
    let out = Checkpoint::open(&dir.path().join("out.safetensors")).unwrap();
    for (name, _, _, data) in &tuned {
        assert_eq!(
            &out.tensor(name).unwrap().whole().unwrap()[..],
            &data[..],
            "tensor {name}"
        );
    }
}

/// The library refuses, like the command line, an output that would replace an input: here a
/// merge whose output folder is the base's own model folder (a model folder may otherwise be
/// replaced whole). Nothing is written and the base is unchanged.
#[test]
fn merge_into_the_base_folder_is_refused_by_the_library() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (base, tunes) = make_tensors(Float::BF16, 4096, 1, 7);
    let tensors = |data: &Vec<u8>| vec![("w".to_string(), Dtype::BF16, vec![4096], data.clone())];
    let md = BTreeMap::new();
    let base_dir = d.join("base");
    sotu_delta::io::write_tensors(&Target::new(&base_dir), &tensors(&base), &md).unwrap();
    write_file(&d.join("t.safetensors"), &tensors(&tunes[0]), &md).unwrap();
    let base_ck = Checkpoint::open(&base_dir).unwrap();
    let opts = ExtractOptions {
        seed: 1,
        interval: Interval::from_density(0.5).unwrap(),
        slot: None,
        selector: Selector::default(),
        allow_nonfinite: false,
        fingerprint_output: false,
        own_files: false,
    };
    let tuned = Tuned::Checkpoint(Checkpoint::open(&d.join("t.safetensors")).unwrap());
    extract(
        &base_ck,
        &tuned,
        &Target::new(&d.join("d.safetensors")),
        &opts,
    )
    .unwrap();
    let delta = Delta::open(&d.join("d.safetensors")).unwrap();
    let before = std::fs::read(base_dir.join("model.safetensors")).unwrap();
    let err = merge(
        &base_ck,
        &[delta.into()],
        &Target::new(&base_dir),
        &MergeOptions::default(),
    )
    .expect_err("merging into the base folder must fail");
    assert!(
        err.to_string().contains("refusing to overwrite an input"),
        "{err:#}"
    );
    assert_eq!(
        std::fs::read(base_dir.join("model.safetensors")).unwrap(),
        before
    );
    let left: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 3, "{left:?}");
}
