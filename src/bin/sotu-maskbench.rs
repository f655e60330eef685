//! `sotu-maskbench`: the mask function's throughput alone, on one core, as JSON (for
//! `make bench`).

use std::time::Instant;

use sotu_delta::mask::{Interval, Mask};

fn main() {
    let mask = Mask::new(
        2411,
        "model.layers.0.mlp.up_proj.weight",
        Interval::from_slot(1, 3, None).unwrap(),
    );
    let n: u64 = 1 << 28;
    let mut best = f64::INFINITY;
    let mut kept = 0;
    for _ in 0..3 {
        let t = Instant::now();
        kept = std::hint::black_box(mask.count_kept(0..n));
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "{{\"elements\": {n}, \"kept\": {kept}, \"seconds\": {best}, \"elements_per_second_per_core\": {}, \"isa\": \"{}\"}}",
        n as f64 / best,
        sotu_delta::mask::isa()
    );
}
