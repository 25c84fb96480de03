//! The command line: one thin file per subcommand over the library.

pub mod bench;
pub mod cache_prompt;
pub mod chat;
pub mod convert;
pub mod fuse;
pub mod generate;
pub mod lora;
pub mod manage;
pub mod perplexity;
pub mod server;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "wick",
    version,
    about = "Run, chat with, convert, quantize and fine-tune local LLMs (mlx_lm's command line, in Rust)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate text from a prompt (mlx_lm.generate)
    Generate(generate::GenerateArgs),
    /// Chat with a model in the terminal (mlx_lm.chat)
    Chat(chat::ChatArgs),
    /// Process a prompt once and save its KV cache for `generate --prompt-cache-file` (mlx_lm.cache_prompt)
    CachePrompt(cache_prompt::CachePromptArgs),
    /// Convert a Hugging Face folder or a GGUF file to an mlx-style folder, optionally quantized (mlx_lm.convert)
    Convert(convert::ConvertArgs),
    /// Quantize an existing model folder (short form of `convert -q`)
    Quantize(convert::QuantizeArgs),
    /// Fine-tune with LoRA, DoRA or fully (mlx_lm.lora)
    Lora(lora::LoraArgs),
    /// Fuse LoRA adapters into the base model (mlx_lm.fuse)
    Fuse(fuse::FuseArgs),
    /// Scan or delete models in the Hugging Face cache (mlx_lm.manage)
    Manage(manage::ManageArgs),
    /// Serve an OpenAI-compatible HTTP API (mlx_lm.server)
    Server(server::ServerArgs),
    /// Measure prompt and generation speed (mlx_lm benchmark)
    Bench(bench::BenchArgs),
    /// Measure perplexity on a text or jsonl file (mlx_lm.perplexity)
    Perplexity(perplexity::PerplexityArgs),
}

/// Options every model-loading command shares.
#[derive(Args, Debug, Clone)]
pub struct ModelOpts {
    /// Model folder (mlx-style or Hugging Face layout), a .gguf file, or a Hugging Face repo id
    /// (from the cache, downloaded when missing); the default model when omitted
    #[arg(long)]
    pub model: Option<String>,
    /// Branch, tag or commit of a repo id given to --model
    #[arg(long)]
    pub revision: Option<String>,
    /// Compute dtype: float16, bfloat16 or float32 (default: the dtype the weights are stored in)
    #[arg(long)]
    pub dtype: Option<String>,
    /// cpu, cuda, cuda:N, metal or auto
    #[arg(long)]
    pub device: Option<String>,
    /// Folder of trained adapters (adapter_config.json + adapters.safetensors, from `wick lora`
    /// or mlx_lm.lora) applied to the model
    #[arg(long)]
    pub adapter_path: Option<std::path::PathBuf>,
}

impl ModelOpts {
    /// Resolves the folder, device and dtype, and loads the model and tokenizer.
    pub fn load(&self) -> anyhow::Result<(crate::models::LoadedModel, crate::tokenizer::Tokenizer)> {
        let device = crate::backend::device::select_device(self.device.as_deref())?;
        let dtype = self
            .dtype
            .as_deref()
            .map(crate::backend::device::parse_dtype)
            .transpose()
            .map_err(|e| anyhow::anyhow!("--dtype: {e}"))?;
        let src = crate::hub::ModelSource::resolve(self.model.as_deref(), self.revision.as_deref(), dtype)?;
        let model = crate::engine::load_model_with(&src.dir, dtype, &device, self.adapter_path.as_deref())?;
        let tok = crate::tokenizer::Tokenizer::load(&src.dir)?;
        Ok((model, tok))
    }
}

/// Sampler flags `generate` and `chat` share (mlx_lm's names and defaults).
#[derive(Args, Debug, Clone)]
pub struct SamplerFlags {
    /// Sampling temperature (0 = greedy)
    #[arg(long, default_value_t = 0.0)]
    pub temp: f32,
    /// Sampling top-p
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Sampling top-k (0 = off)
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Sampling min-p (0 = off)
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Minimum tokens to keep for min-p sampling
    #[arg(long, default_value_t = 1)]
    pub min_tokens_to_keep: usize,
    /// Probability of applying XTC sampling at each token
    #[arg(long, default_value_t = 0.0)]
    pub xtc_probability: f32,
    /// Probability a token needs for XTC to consider removing it
    #[arg(long, default_value_t = 0.1)]
    pub xtc_threshold: f32,
}

impl SamplerFlags {
    /// The sampler settings; XTC never removes "\n" or an eos token, as in mlx_lm.
    pub fn config(
        &self,
        seed: Option<u64>,
        tok: &crate::tokenizer::Tokenizer,
    ) -> anyhow::Result<crate::engine::sample::SamplerConfig> {
        let mut special = tok.encode("\n", false)?;
        special.extend(tok.eos_token_ids.iter().copied());
        Ok(crate::engine::sample::SamplerConfig {
            temp: self.temp,
            top_p: self.top_p,
            min_p: self.min_p,
            min_tokens_to_keep: self.min_tokens_to_keep,
            top_k: self.top_k,
            xtc_probability: self.xtc_probability,
            xtc_threshold: self.xtc_threshold,
            xtc_special_tokens: special,
            seed,
        })
    }
}

/// KV-cache quantization flags (mlx_lm's names and defaults).
#[derive(Args, Debug, Clone)]
pub struct KvFlags {
    /// Number of bits for KV cache quantization. Defaults to no quantization
    #[arg(long)]
    pub kv_bits: Option<usize>,
    /// Group size for KV cache quantization
    #[arg(long, default_value_t = 64)]
    pub kv_group_size: usize,
    /// When --kv-bits is set, start quantizing the KV cache from this step onwards
    #[arg(long, default_value_t = crate::engine::generate::DEFAULT_QUANTIZED_KV_START)]
    pub quantized_kv_start: usize,
}

impl KvFlags {
    pub fn quant(&self) -> anyhow::Result<Option<crate::engine::generate::KvQuant>> {
        crate::engine::generate::KvQuant::from_flags(self.kv_bits, self.kv_group_size, self.quantized_kv_start)
    }
}

/// Parses `True`/`False`/`T`/`F`/`1`/`0` as mlx_lm's `str2bool`.
pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "t" | "1" | "yes" | "y" => Ok(true),
        "false" | "f" | "0" | "no" | "n" => Ok(false),
        _ => Err(format!("expected True or False, got `{s}`")),
    }
}

/// Runs a parsed command line; returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Chat(a) => chat::run(a),
        Command::CachePrompt(a) => cache_prompt::run(a),
        Command::Quantize(a) => convert::run_quantize(a),
        Command::Lora(a) => lora::run(a),
        Command::Fuse(a) => fuse::run(a),
        Command::Manage(a) => manage::run(a),
        Command::Server(a) => server::run(a),
        Command::Perplexity(a) => perplexity::run(a),
    }
}
