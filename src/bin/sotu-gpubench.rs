//! `sotu-gpubench`: the merge kernel's effective bandwidth against a device-to-device copy on
//! this machine's GPU, as JSON (`make bench-gpu`, docs/CUDA.md). Without a usable GPU it says
//! why and exits 0.

use clap::Parser;
use sotu_delta::dtype::Float;

#[derive(Parser)]
#[command(about = "Time the CUDA merge kernel against a device-to-device copy")]
struct Args {
    /// Elements of the synthetic tensor (rounded down to a multiple of 65536).
    #[arg(long, default_value_t = 1 << 28)]
    numel: u64,
    /// Element dtype: bf16, f16, f32 or f64.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Masked deltas, in disjoint slots (density 1/terms each).
    #[arg(long, default_value_t = 3)]
    terms: usize,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 10)]
    reps: usize,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let gpu = match sotu_delta::merge::cuda::backend() {
        Ok(g) => g,
        Err(why) => {
            println!(
                "{}",
                serde_json::json!({ "skipped": format!("no CUDA device ({why})") })
            );
            return Ok(());
        }
    };
    let dtype = Float::parse(&a.dtype)?;
    let numel = a.numel / sotu_delta::merge::plan::TILE * sotu_delta::merge::plan::TILE;
    let r = gpu.bench_kernel(numel, dtype, a.terms, a.reps)?;
    let copy_gbps = r.copy_bytes as f64 / r.copy_seconds / 1e9;
    let kernel_gbps = r.kernel_bytes as f64 / r.kernel_seconds / 1e9;
    println!(
        "{}",
        serde_json::json!({
            "device": gpu.name(),
            "dtype": a.dtype,
            "result": r,
            "copy_gbps": copy_gbps,
            "kernel_gbps": kernel_gbps,
            "ratio": kernel_gbps / copy_gbps,
        })
    );
    Ok(())
}
