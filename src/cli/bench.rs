//! `wick bench`: mlx_lm benchmark's flags and report lines.

use super::ModelOpts;
use crate::engine::batch::batch_generate;
use crate::engine::generate::{generate, GenerateOptions};
use anyhow::{bail, Result};
use clap::Args;
use rand::{Rng, SeedableRng};
use std::collections::BTreeSet;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelOpts,
    /// Length of prompt
    #[arg(long = "prompt-tokens", short = 'p', default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Length of completion
    #[arg(long = "generation-tokens", short = 'g', default_value_t = 1024)]
    pub generation_tokens: usize,
    /// Batch size
    #[arg(long = "batch-size", short = 'b', default_value_t = 1)]
    pub batch_size: usize,
    /// Number of timing trials
    #[arg(long = "num-trials", short = 'n', default_value_t = 5)]
    pub num_trials: usize,
    /// Step size for prefill processing
    #[arg(long, default_value_t = 2048)]
    pub prefill_step_size: usize,
}

/// One timed run's figures (tokens/s summed over the batch).
struct Trial {
    prompt_tps: f64,
    generation_tps: f64,
    peak_memory_gb: f64,
}

pub fn run(a: BenchArgs) -> Result<i32> {
    if a.batch_size == 0 {
        bail!("-b/--batch-size must be at least 1");
    }
    if a.num_trials == 0 {
        bail!("-n/--num-trials must be at least 1");
    }
    let (loaded, _tok) = a.model.load()?;
    let model = loaded.model.as_ref();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let vocab = model.vocab_size() as u32;
    let prompts: Vec<Vec<u32>> =
        (0..a.batch_size).map(|_| (0..a.prompt_tokens).map(|_| rng.random_range(0..vocab)).collect()).collect();
    let opts = GenerateOptions {
        max_tokens: a.generation_tokens,
        prefill_step_size: a.prefill_step_size,
        ..Default::default()
    };
    // No eos: always generate the full length, as mlx_lm's benchmark does.
    let no_eos = BTreeSet::new();
    // batch 1 through the single-sequence loop, larger batches through batch_generate, as mlx_lm
    let bench = || -> Result<Trial> {
        if a.batch_size == 1 {
            let s = generate(model, &prompts[0], &opts, &no_eos, |_| Ok(true))?;
            Ok(Trial { prompt_tps: s.prompt_tps, generation_tps: s.generation_tps, peak_memory_gb: s.peak_memory_gb })
        } else {
            let s = batch_generate(model, &prompts, &opts, &no_eos, |_| {})?;
            Ok(Trial { prompt_tps: s.prompt_tps, generation_tps: s.generation_tps, peak_memory_gb: s.peak_memory_gb })
        }
    };
    println!("Running warmup..");
    bench()?;
    // what one more token costs in the KV cache (mlx_lm's cache holds the same tensors)
    let mut cache = model.make_cache(None);
    crate::engine::generate::prefill(model, &prompts[0][..1.min(a.prompt_tokens)], &mut cache, 1)?;
    let per_token: usize = cache.iter().map(|c| c.bytes_per_position()).sum();
    println!("KV cache: {per_token} bytes per token ({} layers)", cache.len());
    println!(
        "Timing with prompt_tokens={}, generation_tokens={}, batch_size={}.",
        a.prompt_tokens, a.generation_tokens, a.batch_size
    );
    let mut sums = [0f64; 3];
    for i in 0..a.num_trials {
        let tic = Instant::now();
        let s = bench()?;
        let total = tic.elapsed().as_secs_f64();
        println!(
            "Trial {}:  prompt_tps={:.3}, generation_tps={:.3}, peak_memory={:.3}, total_time={:.3}",
            i + 1,
            s.prompt_tps,
            s.generation_tps,
            s.peak_memory_gb,
            total
        );
        sums[0] += s.prompt_tps;
        sums[1] += s.generation_tps;
        sums[2] += s.peak_memory_gb;
    }
    let n = a.num_trials as f64;
    println!(
        "Averages: prompt_tps={:.3}, generation_tps={:.3}, peak_memory={:.3}",
        sums[0] / n,
        sums[1] / n,
        sums[2] / n
    );
    Ok(0)
}
