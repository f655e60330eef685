//! `sotu-linalgbench`: the machine's f64 matrix-multiply rate as the merge methods use it (each
//! thread multiplying on its own, `Par::Seq`, all threads at once), the physical limit that
//! `make bench-methods` holds the SVD methods against. Prints JSON.

use std::time::Instant;

use faer::{Accum, Mat, Par};

fn main() {
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
