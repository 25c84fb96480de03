//! `wick generate`: mlx_lm.generate's flags and output.

use super::{parse_bool, ModelOpts, SamplerFlags};
use crate::generate::{generate, GenerateOptions};
use crate::tokenizer::{Message, Tokenizer};
use anyhow::{Context, Result};
use clap::Args;
use std::io::{Read, Write};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelOpts,
    /// Message to be processed by the model ('-' reads from stdin)
    #[arg(long, short = 'p', default_value = "hello")]
    pub prompt: String,
    /// Maximum number of tokens to generate
    #[arg(long, short = 'm', default_value_t = 256)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampler: SamplerFlags,
    /// PRNG seed
    #[arg(long)]
    pub seed: Option<u64>,
    /// System prompt to be used for the chat template
    #[arg(long)]
    pub system_prompt: Option<String>,
    /// Use the raw prompt without the tokenizer's chat template
    #[arg(long)]
    pub ignore_chat_template: bool,
    /// Additional config for the chat template, as a JSON object (e.g. '{"enable_thinking": false}')
    #[arg(long)]
    pub chat_template_config: Option<String>,
    /// Add tokens to the list of eos tokens that stop generation
    #[arg(long, num_args = 1..)]
    pub extra_eos_token: Vec<String>,
    /// Print the text as it streams and the statistics (True), or only the response (False)
    #[arg(long, default_value = "true", value_parser = parse_bool, num_args = 0..=1, default_missing_value = "true")]
    pub verbose: bool,
    /// Number of prompt tokens to process at a time
    #[arg(long, default_value_t = 2048)]
    pub prefill_step_size: usize,
    /// Keep at most this many positions in the KV cache (the first 4 and the most recent ones)
    #[arg(long)]
    pub max_kv_size: Option<usize>,
}

/// Builds the prompt ids as mlx_lm.generate does: `\n`/`\t` escapes, '-' for stdin, the chat
/// template unless ignored (then no special tokens are added), else the tokenizer's own.
pub fn prompt_ids(
    tok: &Tokenizer,
    prompt: &str,
    system_prompt: Option<&str>,
    ignore_chat_template: bool,
    chat_template_config: Option<&str>,
) -> Result<Vec<u32>> {
    let mut prompt = prompt.replace("\\n", "\n").replace("\\t", "\t");
    if prompt == "-" {
        prompt.clear();
        std::io::stdin().read_to_string(&mut prompt).context("cannot read the prompt from stdin")?;
    }
    let extra = match chat_template_config {
        Some(s) => match serde_json::from_str::<serde_json::Value>(s) {
            Ok(serde_json::Value::Object(m)) => m,
            Ok(_) => anyhow::bail!("--chat-template-config must be a JSON object"),
            Err(e) => anyhow::bail!("--chat-template-config is not valid JSON: {e}"),
        },
        None => Default::default(),
    };
    let use_template = !ignore_chat_template && tok.has_chat_template();
    if use_template {
        let mut messages = vec![];
        if let Some(s) = system_prompt {
            messages.push(Message::new("system", s));
        }
        messages.push(Message::new("user", &prompt));
        let text = tok.apply_chat_template(&messages, true, &extra)?;
        tok.encode(&text, false)
    } else {
        tok.encode(&prompt, true)
    }
}

pub fn run(a: GenerateArgs) -> Result<i32> {
    let (loaded, tok) = a.model.load()?;
    let ids = prompt_ids(
        &tok,
        &a.prompt,
        a.system_prompt.as_deref(),
        a.ignore_chat_template,
        a.chat_template_config.as_deref(),
    )?;
    let mut eos = tok.eos_token_ids.clone();
    for t in &a.extra_eos_token {
        let id = tok.token_to_id(t).with_context(|| format!("--extra-eos-token {t}: not a token of this tokenizer"))?;
        eos.insert(id);
    }
    let opts = GenerateOptions {
        max_tokens: a.max_tokens,
        prefill_step_size: a.prefill_step_size,
        sampler: a.sampler.config(a.seed, &tok)?,
        max_kv_size: a.max_kv_size,
        ..Default::default()
    };
    let mut detok = tok.streaming_detokenizer();
    let stdout = std::io::stdout();
    if a.verbose {
        println!("==========");
    }
    let stats = generate(loaded.model.as_ref(), &ids, &opts, &eos, |t| {
        let piece = detok.add_token(t);
        if a.verbose && !piece.is_empty() {
            let mut out = stdout.lock();
            out.write_all(piece.as_bytes())?;
            out.flush()?;
        }
        Ok(true)
    })?;
    let rest = detok.finalize();
    if a.verbose {
        print!("{rest}");
        println!();
        println!("==========");
        if detok.text().is_empty() {
            println!("No text generated for this prompt");
            return Ok(0);
        }
        println!("Prompt: {} tokens, {:.3} tokens-per-sec", stats.prompt_tokens, stats.prompt_tps);
        println!("Generation: {} tokens, {:.3} tokens-per-sec", stats.generation_tokens, stats.generation_tps);
        println!("Peak memory: {:.3} GB", stats.peak_memory_gb);
    } else {
        println!("{}", detok.text());
    }
    Ok(0)
}
