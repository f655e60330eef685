//! `sotu-synth`: writes a synthetic base checkpoint with a real model's tensor layout (Llama),
//! and fine-tunes of it (the base plus a small dense change), for benchmarks and size
//! measurements. Values are a pure function of (seed, file, tensor, index), so a rerun writes
//! the same bytes; tensors are generated and written tile by tile, never whole in memory.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use rayon::prelude::*;
use sotu_delta::dtype::Float;
use sotu_delta::io::{OutTensor, Output, Sink, Target};

#[derive(Parser)]
#[command(about = "Write a synthetic Llama-shaped base checkpoint and fine-tunes of it")]
struct Args {
    /// Layout: `tinyllama` (1.1B: hidden 2048, 22 layers, MLP 5632, vocab 32000, 4 KV heads),
    /// `small` (the same with 4 layers), or `qwen14b` (14.8B, 29.5 GB in bf16: hidden 5120, 48
    /// layers, MLP 13824, vocab 152064, 40 heads, 8 KV heads).
    #[arg(long, default_value = "small")]
    preset: String,
    /// Override the number of layers.
    #[arg(long)]
    layers: Option<usize>,
    /// Element dtype: bf16, f16 or f32.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Number of fine-tunes to write besides the base.
    #[arg(long, default_value_t = 3)]
    tunes: usize,
    /// Standard deviation of the fine-tuning change, relative to the weights' 0.02.
    #[arg(long, default_value_t = 0.05)]
    change: f64,
    /// Output folder: base.safetensors, tune1.safetensors, … (or, with --shard-size, model
    /// folders base/, tune1/, …).
    #[arg(short, long)]
    output: PathBuf,
    /// Write each checkpoint as a Hugging Face model folder of shards of this size (e.g. 5GB).
    #[arg(long)]
    shard_size: Option<String>,
    /// Write only the base, or only fine-tune K (1-based): lets a large benchmark keep one
    /// fine-tune on disk at a time.
    #[arg(long)]
    only: Option<usize>,
}

struct Layout {
    hidden: usize,
    layers: usize,
    mlp: usize,
    vocab: usize,
    heads: usize,
    kv_heads: usize,
}

fn tensors(l: &Layout) -> Vec<(String, Vec<usize>)> {
    let kv = l.hidden / l.heads * l.kv_heads;
    let (h, m) = (l.hidden, l.mlp);
    let mut t = vec![
        ("model.embed_tokens.weight".to_string(), vec![l.vocab, h]),
        ("model.norm.weight".to_string(), vec![h]),
        ("lm_head.weight".to_string(), vec![l.vocab, h]),
    ];
    for i in 0..l.layers {
        let p = format!("model.layers.{i}");
        for (name, shape) in [
            ("self_attn.q_proj.weight", vec![h, h]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.o_proj.weight", vec![h, h]),
            ("mlp.gate_proj.weight", vec![m, h]),
            ("mlp.up_proj.weight", vec![m, h]),
            ("mlp.down_proj.weight", vec![h, m]),
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
        ] {
            t.push((format!("{p}.{name}"), shape));
        }
    }
    t.sort();
    t
}

/// splitmix64: a counter-based generator, so any element can be produced independently.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Uniform in [-√3, √3): unit variance.
fn unit(key: u64, i: u64) -> f64 {
    ((mix64(key ^ i.wrapping_mul(0xd6e8_feb8_6659_fd93)) >> 11) as f64 / (1u64 << 53) as f64 - 0.5)
        * 2.0
        * 3f64.sqrt()
}

fn main() -> Result<()> {
    let a = Args::parse();
    let mut layout = match a.preset.as_str() {
        "tinyllama" | "small" => Layout {
            hidden: 2048,
            layers: if a.preset == "small" { 4 } else { 22 },
            mlp: 5632,
            vocab: 32000,
            heads: 32,
            kv_heads: 4,
        },
        "qwen14b" => Layout {
            hidden: 5120,
            layers: 48,
            mlp: 13824,
            vocab: 152064,
            heads: 40,
            kv_heads: 8,
        },
        p => anyhow::bail!("unknown preset {p:?}: tinyllama, small or qwen14b"),
    };
    if let Some(n) = a.layers {
        layout.layers = n;
    }
    let float = Float::parse(&a.dtype)?;
    std::fs::create_dir_all(&a.output)?;
    let specs = tensors(&layout);
    let out_tensors: Vec<OutTensor> = specs
        .iter()
        .map(|(name, shape)| OutTensor {
            name: name.clone(),
            dtype: float.dtype(),
            shape: shape.clone(),
            len: (shape.iter().product::<usize>() * float.size()) as u64,
        })
        .collect();
    let mut md = BTreeMap::new();
    md.insert("format".to_string(), "pt".to_string());
    let shard_size = a
        .shard_size
        .as_deref()
        .map(sotu_delta::io::parse_size)
        .transpose()?;
    for file in (0..=a.tunes).filter(|f| a.only.is_none_or(|o| o == *f)) {
        let stem = if file == 0 {
            "base".to_string()
        } else {
            format!("tune{file}")
        };
        let target = match shard_size {
            Some(s) => {
                let mut t = Target::new(&a.output.join(&stem));
                t.shard_size = s;
                t
            }
            None => Target::new(&a.output.join(format!("{stem}.safetensors"))),
        };
        let path = target.path.clone();
        let out = Output::create(&target, &out_tensors, &md)?;
        for (t, (tname, shape)) in specs.iter().enumerate() {
            let numel: u64 = shape.iter().product::<usize>() as u64;
            let norm = shape.len() == 1;
            let base_key = mix64(t as u64);
            let tune_key = mix64((t as u64) << 32 | file as u64);
            let tile = 1u64 << 20;
            (0..numel.div_ceil(tile))
                .into_par_iter()
                .try_for_each(|k| {
                    let (lo, hi) = (k * tile, numel.min((k + 1) * tile));
                    let vals: Vec<f64> = (lo..hi)
                        .map(|i| {
                            let b = if norm {
                                1.0 + 0.1 * unit(base_key, i)
                            } else {
                                0.02 * unit(base_key, i)
                            };
                            // Round the base first, so a fine-tune is a change of the stored base.
                            let b = float.load(&float.round_bits(b).to_le_bytes(), 0);
                            if file == 0 {
                                b
                            } else {
                                b + 0.02 * a.change * unit(tune_key, i)
                            }
                        })
                        .collect();
                    let mut bytes = Vec::new();
                    float.store_all(&vals, &mut bytes);
                    out.write(tname, lo * float.size() as u64, &bytes)
                })?;
        }
        let total = out.commit(false)?.bytes;
        println!("{}: {:.2} GB", path.display(), total as f64 / 1e9);
    }
    Ok(())
}
