//! `wick perplexity`: mlx_lm.perplexity's flags and report, on a local text or jsonl file.

use super::ModelOpts;
use crate::engine::perplexity::{eval_ppl, load_records, make_rows};
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelOpts,
    /// Batch size for evaluation
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Sequence length for evaluation
    #[arg(long, default_value_t = 512)]
    pub sequence_length: usize,
    /// Number of samples to use (-1 for all available)
    #[arg(long, default_value_t = 256, allow_hyphen_values = true)]
    pub num_samples: i64,
    /// A .txt file (one text), a .jsonl file of mlx_lm dataset records (text, prompt/completion
    /// or messages), or a folder with train.jsonl
    #[arg(long)]
    pub data_path: PathBuf,
    /// Random seed for data sampling
    #[arg(long, default_value_t = 123)]
    pub seed: u64,
}

pub fn run(a: PerplexityArgs) -> Result<i32> {
    let num_samples = match a.num_samples {
        -1 => None,
        n if n > 0 => Some(n as usize),
        n => anyhow::bail!("--num-samples {n}: expected a positive number, or -1 for all"),
    };
    println!("Loading model from {}...", a.model.model.as_deref().unwrap_or("the default model"));
    let (loaded, tok) = a.model.load()?;
    let model = loaded.model.as_ref();
    println!("\nLoading dataset...");
    println!("  Sequence length: {}", a.sequence_length);
    let records = load_records(&a.data_path, &tok)?;
    let rows = make_rows(&records, a.sequence_length, num_samples, a.seed)?;
    println!("  Loaded {} samples", rows.len());
    println!("\nEvaluating perplexity with batch size {}...", a.batch_size);
    let bar = indicatif::ProgressBar::new(rows.len().div_ceil(a.batch_size.max(1)) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("  {bar:30} {pos}/{len} batches {elapsed}").expect("template"),
    );
    let tic = Instant::now();
    let p = eval_ppl(model, &rows, a.batch_size, |done, _| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    let secs = tic.elapsed().as_secs_f64();
    println!("\n{}", "=".repeat(60));
    println!("EVALUATION RESULTS");
    println!("{}", "=".repeat(60));
    println!("Model: {}", a.model.model.as_deref().unwrap_or("default"));
    println!("Perplexity: {:.3} ± {:.3}", p.ppl, p.standard_error);
    println!("Evaluation time: {secs:.2} seconds");
    println!("Peak memory: {:.2} GB", crate::backend::memory::peak_memory_gb());
    println!("Tokens per second: {:.0}", p.tokens as f64 / secs.max(1e-9));
    println!("\nDataset statistics:");
    println!("  Total samples: {}", rows.len());
    println!("  Total tokens: {}", rows.len() * a.sequence_length);
    Ok(0)
}
