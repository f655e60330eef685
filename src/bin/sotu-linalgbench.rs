//! `sotu-linalgbench`: the machine's f64 matrix-multiply rate as the merge methods use it (each
//! thread multiplying on its own, `Par::Seq`, all threads at once), the physical limit that
//! `make bench-methods` holds the SVD methods against. Prints JSON.
//!
//! `sotu-linalgbench shapes [--time [--tsv-only]] ROWSxCOLS …` prints, per matrix shape, the
//! floating-point operations that `tsv` (3 deltas) and `iso` count on it
//! (`merge::methods::tsv_flops`, `iso_flops`); with `--time`, also the seconds each takes on this
//! thread on three dense pseudo-random deltas, and those of one exact thin SVD of the shape (the
//! step the methods took before the Gram route), for extrapolating a model's time from its
//! shapes; `--tsv-only` times `tsv` alone, for a profiler. Each time is
//! the thread's CPU time (on a shared machine, wall time also counts other processes' turns),
//! beside a 2048³ product timed the same way just before: `*_matmuls` is the time in such
//! products, the measure that carries over to a quiet machine.

use std::time::Instant;

use faer::{Accum, Mat, Par};
use sotu_delta::linalg::{thin_svd, view};
use sotu_delta::merge::methods::{iso_flops, iso_matrix, tsv_flops, tsv_matrix};

/// Deltas per shape, as in `make bench-methods`.
const TASKS: usize = 3;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None => matmul_rate(),
        Some("shapes") => {
            let time = args.iter().any(|a| a == "--time");
            let tsv_only = args.iter().any(|a| a == "--tsv-only");
            for shape in args[1..]
                .iter()
                .filter(|a| *a != "--time" && *a != "--tsv-only")
            {
                let parsed = shape
                    .split_once('x')
                    .and_then(|(r, c)| Some((r.parse().ok()?, c.parse().ok()?)));
                match parsed {
                    Some(s) => per_shape(s, time, tsv_only),
                    None => usage(&format!("not a shape ROWSxCOLS: {shape}")),
                }
            }
        }
        Some(other) => usage(&format!("unknown argument {other}")),
    }
}

fn usage(why: &str) -> ! {
    eprintln!(
        "sotu-linalgbench: {why}\nusage: sotu-linalgbench [shapes [--time [--tsv-only]] ROWSxCOLS ...]"
    );
    std::process::exit(2)
}

fn matmul_rate() {
    let n = 2048usize;
    let threads = rayon::current_num_threads();
    let a = Mat::<f64>::from_fn(n, n, |i, j| ((i * 31 + j * 17) % 101) as f64 / 101.0 - 0.5);
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        rayon::scope(|s| {
            for _ in 0..threads {
                s.spawn(|_| {
                    let mut c = Mat::<f64>::zeros(n, n);
                    faer::linalg::matmul::matmul(
                        c.as_mut(),
                        Accum::Replace,
                        a.as_ref(),
                        a.as_ref(),
                        1.0,
                        Par::Seq,
                    );
                    std::hint::black_box(&c);
                });
            }
        });
        best = best.min(t.elapsed().as_secs_f64());
    }
    let flops = 2.0 * (n as f64).powi(3) * threads as f64;
    println!(
        "{{\"n\": {n}, \"threads\": {threads}, \"seconds\": {best}, \"gflops\": {}, \"gflops_per_thread\": {}}}",
        flops / best / 1e9,
        flops / best / 1e9 / threads as f64
    );
}

/// Dense deltas with entries uniform in [-0.01, 0.01), a fixed sequence per seed.
fn noise(len: usize, seed: u64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 0.02
        })
        .collect()
}

/// This thread's CPU time in seconds.
fn thread_cpu() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

/// CPU seconds of `f` on this thread.
fn cpu_time<R>(f: impl FnOnce() -> R) -> (f64, R) {
    let start = thread_cpu();
    let r = f();
    (thread_cpu() - start, r)
}

/// CPU seconds of one 2048³ f64 product on this thread, the best of three.
fn one_matmul() -> f64 {
    let n = 2048;
    let a = Mat::<f64>::from_fn(n, n, |i, j| ((i * 31 + j * 17) % 101) as f64 / 101.0 - 0.5);
    let mut c = Mat::<f64>::zeros(n, n);
    (0..3)
        .map(|_| {
            cpu_time(|| {
                faer::linalg::matmul::matmul(
                    c.as_mut(),
                    Accum::Replace,
                    a.as_ref(),
                    a.as_ref(),
                    1.0,
                    Par::Seq,
                )
            })
            .0
        })
        .fold(f64::INFINITY, f64::min)
}

fn per_shape(shape: (usize, usize), time: bool, tsv_only: bool) {
    let k = (shape.0.min(shape.1) / TASKS).max(1);
    let (tsv_gflop, iso_gflop) = (tsv_flops(shape, TASKS, k) / 1e9, iso_flops(shape) / 1e9);
    let mut line = format!(
        "{{\"shape\": [{}, {}], \"tsv_gflop\": {tsv_gflop}, \"iso_gflop\": {iso_gflop}",
        shape.0, shape.1
    );
    if time {
        let len = shape.0 * shape.1;
        let taus: Vec<Vec<f64>> = (0..TASKS as u64).map(|t| noise(len, t + 1)).collect();
        let mut exact = Vec::new();
        let matmul_s = one_matmul();
        let (tsv_s, r) = cpu_time(|| {
            tsv_matrix(
                shape,
                k,
                &[1, 2, 3],
                1.0,
                "bench",
                |t, buf| {
                    buf.clear();
                    buf.extend_from_slice(&taus[t]);
                    Ok(())
                },
                &mut exact,
            )
            .expect("tsv")
        });
        std::hint::black_box(r);
        line += &format!(
            ", \"matmul_s\": {matmul_s}, \"tsv_s\": {tsv_s}, \"tsv_matmuls\": {}, \"tsv_gflops\": {}",
            tsv_s / matmul_s,
            tsv_gflop / tsv_s,
        );
        if tsv_only {
            println!("{line}, \"exact_svd\": {exact:?}}}");
            return;
        }
        let mut sum = taus[0].clone();
        for tau in &taus[1..] {
            sum.iter_mut().zip(tau).for_each(|(a, b)| *a += b);
        }
        let (iso_s, r) =
            cpu_time(|| iso_matrix(&sum, shape, 1.0, "bench", &mut exact).expect("iso"));
        std::hint::black_box(r);
        let (svd_s, r) = cpu_time(|| thin_svd(view(&taus[0], shape), "bench").expect("svd"));
        std::hint::black_box(r);
        line += &format!(
            ", \"iso_s\": {iso_s}, \"iso_matmuls\": {}, \"iso_gflops\": {}, \"thin_svd_s\": {svd_s}, \"thin_svd_matmuls\": {}, \"exact_svd\": {:?}",
            iso_s / matmul_s,
            iso_gflop / iso_s,
            svd_s / matmul_s,
            exact
        );
    }
    println!("{line}}}");
}
