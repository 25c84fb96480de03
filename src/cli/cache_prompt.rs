//! `wick cache-prompt`: mlx_lm.cache_prompt's flags and output — process a prompt once and save
//! its KV cache, for `wick generate --prompt-cache-file` (or mlx_lm.generate) to continue.

use super::generate::read_prompt;
use super::{KvFlags, ModelOpts};
use crate::engine::generate::{prefill_quantized, GenerateOptions};
use crate::tokenizer::Message;
use anyhow::{Context, Result};
use clap::Args;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct CachePromptArgs {
    #[command(flatten)]
    pub model: ModelOpts,
    /// End of sequence token for tokenizer (recorded in the cache's tokenizer_config)
    #[arg(long)]
    pub eos_token: Option<String>,
    /// Set the maximum key-value cache size
    #[arg(long)]
    pub max_kv_size: Option<usize>,
    /// The file to save the prompt cache in
    #[arg(long)]
    pub prompt_cache_file: PathBuf,
    /// Message to be processed by the model ('-' reads from stdin)
    #[arg(long)]
    pub prompt: String,
    #[command(flatten)]
    pub kv: KvFlags,
    /// Number of prompt tokens to process at a time
    #[arg(long, default_value_t = 2048)]
    pub prefill_step_size: usize,
}

pub fn run(a: CachePromptArgs) -> Result<i32> {
    let (loaded, tok) = a.model.load()?;
    let model = loaded.model.as_ref();
    if let Some(e) = &a.eos_token {
        tok.token_to_id(e).with_context(|| format!("--eos-token {e}: not a token of this tokenizer"))?;
    }
    let prompt = read_prompt(&a.prompt)?;
    // the user message stays open, so that generate's query continues it (as mlx_lm)
    let ids = if tok.has_chat_template() {
        let text = tok.apply_chat_template_continue(&[Message::new("user", &prompt)], &Default::default())?;
        tok.encode(&text, false)?
    } else {
        tok.encode(&prompt, true)?
    };
    crate::engine::generate::check_context(model, ids.len())?;
    crate::engine::generate::check_vocab(model, &ids)?;
    let opts = GenerateOptions { max_kv_size: a.max_kv_size, kv_quant: a.kv.quant()?, ..Default::default() };
    let mut cache = opts.new_cache(model)?;
    let tic = Instant::now();
    prefill_quantized(model, &ids, &mut cache, a.prefill_step_size, opts.kv_quant.as_ref())?;
    let secs = tic.elapsed().as_secs_f64();
    println!("Processed {:6} tokens ({:6.2} tok/s)", ids.len(), ids.len() as f64 / secs.max(1e-9));
    println!("Peak memory: {:.3} GB", crate::backend::memory::peak_memory_gb());
    println!("Saving...");
    std::io::stdout().flush()?;
    let model_name = match &a.model.model {
        Some(m) => m.clone(),
        None => crate::hub::default_model_dir()?.display().to_string(),
    };
    let mut tokenizer_config = serde_json::json!({ "trust_remote_code": false });
    if let Some(e) = &a.eos_token {
        tokenizer_config["eos_token"] = e.clone().into();
    }
    let metadata = BTreeMap::from([
        ("model".to_string(), model_name),
        ("tokenizer_config".to_string(), tokenizer_config.to_string()),
    ]);
    crate::engine::prompt_cache::save(&a.prompt_cache_file, &cache, &metadata)?;
    Ok(0)
}
