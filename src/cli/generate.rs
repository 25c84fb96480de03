//! `wick generate`: mlx_lm.generate's flags and output.

use super::{parse_bool, KvFlags, ModelOpts, SamplerFlags};
use crate::engine::generate::{generate, GenerateOptions};
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
    #[command(flatten)]
    pub kv: KvFlags,
    /// A file containing saved KV caches to avoid recomputing them (from `wick cache-prompt`
    /// or mlx_lm.cache_prompt)
    #[arg(long)]
    pub prompt_cache_file: Option<std::path::PathBuf>,
    /// A model to be used for speculative decoding
    #[arg(long)]
    pub draft_model: Option<String>,
    /// Number of tokens to draft when using speculative decoding
    #[arg(long, default_value_t = crate::engine::speculative::DEFAULT_NUM_DRAFT_TOKENS)]
    pub num_draft_tokens: usize,
}

/// Reads the prompt as mlx_lm.generate does: `\n`/`\t` escapes, '-' for stdin.
pub fn read_prompt(prompt: &str) -> Result<String> {
    let mut prompt = prompt.replace("\\n", "\n").replace("\\t", "\t");
    if prompt == "-" {
        prompt.clear();
        std::io::stdin().read_to_string(&mut prompt).context("cannot read the prompt from stdin")?;
    }
    Ok(prompt)
}

/// Parses `--chat-template-config`.
pub fn template_config(s: Option<&str>) -> Result<serde_json::Map<String, serde_json::Value>> {
    Ok(match s {
        Some(s) => match serde_json::from_str::<serde_json::Value>(s) {
            Ok(serde_json::Value::Object(m)) => m,
            Ok(_) => anyhow::bail!("--chat-template-config must be a JSON object"),
            Err(e) => anyhow::bail!("--chat-template-config is not valid JSON: {e}"),
        },
        None => Default::default(),
    })
}

/// Builds the prompt ids as mlx_lm.generate does: the chat template unless ignored (then no
/// special tokens are added), else the tokenizer's own. With `after_cache` (a prompt cache
/// holds the start of the conversation), only the text from the user message on is kept.
pub fn prompt_ids(
    tok: &Tokenizer,
    prompt: &str,
    system_prompt: Option<&str>,
    ignore_chat_template: bool,
    chat_template_config: Option<&str>,
    after_cache: bool,
) -> Result<Vec<u32>> {
    let prompt = read_prompt(prompt)?;
    let extra = template_config(chat_template_config)?;
    let use_template = !ignore_chat_template && tok.has_chat_template();
    if use_template {
        let mut messages = vec![];
        if let Some(s) = system_prompt {
            messages.push(Message::new("system", s));
        }
        messages.push(Message::new("user", &prompt));
        let mut text = tok.apply_chat_template(&messages, true, &extra)?;
        if after_cache {
            // the cached prefix ends inside the user message: keep what follows it
            messages.last_mut().expect("one message").content = "<query>".into();
            let test = tok.apply_chat_template(&messages, true, &Default::default())?;
            let at = test.find("<query>").context("the chat template drops the user message")?;
            text = text.get(at..).context("the chat template renders the cached prefix differently")?.to_string();
        }
        tok.encode(&text, false)
    } else {
        tok.encode(&prompt, true)
    }
}

/// Whether `a` and `b` name the same model (the same string, or paths to the same folder).
fn same_model(a: &str, b: &str) -> bool {
    a == b || matches!((std::fs::canonicalize(a), std::fs::canonicalize(b)), (Ok(x), Ok(y)) if x == y)
}

pub fn run(mut a: GenerateArgs) -> Result<i32> {
    // a prompt cache names its model, as mlx_lm's: it is the default, and another one is refused
    let cache_meta = match &a.prompt_cache_file {
        Some(f) => Some(crate::engine::prompt_cache::metadata(f)?),
        None => None,
    };
    if let (Some(meta), Some(f)) = (&cache_meta, &a.prompt_cache_file) {
        if let Some(cached) = meta.get("model") {
            match &a.model.model {
                Some(m) if !same_model(m, cached) => anyhow::bail!(
                    "--prompt-cache-file {}: the cache was made with the model {cached}, not {m}; \
                     a cache only works with the model that made it",
                    f.display()
                ),
                Some(_) => {}
                None => a.model.model = Some(cached.clone()),
            }
        }
    }
    let (loaded, tok) = a.model.load()?;
    let model = loaded.model.as_ref();
    let ids = prompt_ids(
        &tok,
        &a.prompt,
        a.system_prompt.as_deref(),
        a.ignore_chat_template,
        a.chat_template_config.as_deref(),
        a.prompt_cache_file.is_some(),
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
        kv_quant: a.kv.quant()?,
        ..Default::default()
    };
    let mut detok = tok.streaming_detokenizer();
    let stdout = std::io::stdout();
    if a.verbose {
        println!("==========");
    }
    let verbose = a.verbose;
    let mut on_token = |t: u32| -> Result<bool> {
        let piece = detok.add_token(t);
        if verbose && !piece.is_empty() {
            let mut out = stdout.lock();
            out.write_all(piece.as_bytes())?;
            out.flush()?;
        }
        Ok(true)
    };
    let mut acceptance = None;
    let stats = if let Some(draft) = &a.draft_model {
        if a.prompt_cache_file.is_some() {
            anyhow::bail!("--draft-model cannot be combined with --prompt-cache-file yet");
        }
        let draft_opts = ModelOpts { model: Some(draft.clone()), revision: None, ..a.model.clone() };
        let (draft_model, draft_tok) = draft_opts.load().with_context(|| format!("--draft-model {draft}"))?;
        if draft_tok.vocab_size() != tok.vocab_size() {
            anyhow::bail!("--draft-model {draft}: its tokenizer does not match the model's tokenizer");
        }
        let s = crate::engine::speculative::speculative_generate(
            model,
            draft_model.model.as_ref(),
            &ids,
            &opts,
            a.num_draft_tokens,
            &eos,
            |t, _| on_token(t),
        )?;
        acceptance = Some((s.accepted, s.drafted, s.acceptance_rate()));
        s.generation
    } else if let Some(f) = &a.prompt_cache_file {
        let file = crate::engine::prompt_cache::load(f, model.dtype(), model.device())?;
        let mut cache = file.cache;
        crate::engine::prompt_cache::check_fits(f, &cache, &model.make_cache(None))?;
        if let (Some(q), Some(crate::cache::CacheKind::Quantized { bits, group_size })) =
            (&opts.kv_quant, cache.first().map(|c| c.kind()))
        {
            if q.params.bits != bits {
                anyhow::bail!(
                    "--kv-bits {} does not match the kv cache loaded from --prompt-cache-file ({bits} bits)",
                    q.params.bits
                );
            }
            if q.params.group_size != group_size {
                anyhow::bail!(
                    "--kv-group-size {} does not match the kv cache loaded from --prompt-cache-file (group size {group_size})",
                    q.params.group_size
                );
            }
        }
        crate::engine::generate::check_context(model, cache[0].offset() + ids.len())?;
        let mut sampler = crate::engine::sample::Sampler::new(opts.sampler.clone())?;
        crate::engine::generate::generate_with_cache(
            model,
            &ids,
            &mut cache,
            &mut sampler,
            &opts,
            &eos,
            false,
            on_token,
        )?
    } else {
        generate(model, &ids, &opts, &eos, on_token)?
    };
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
        if let Some((acc, drafted, rate)) = acceptance {
            println!("Speculative decoding: {acc} of {drafted} draft tokens accepted ({:.1}%)", rate * 100.0);
        }
        println!("Peak memory: {:.3} GB", stats.peak_memory_gb);
    } else {
        println!("{}", detok.text());
    }
    Ok(0)
}
