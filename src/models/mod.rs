//! Architectures, one file each (like mlx_lm's `models/`), discovered by config.json's `model_type`.

pub mod apertus;
pub mod attention;
pub mod checkpoint;
pub mod cohere2;
pub mod decoder;
pub mod deepseek_v2;
pub mod deepseek_v3;
pub mod ernie4_5_moe;
pub mod exaone4;
pub mod gemma2;
pub mod gemma3;
pub mod gemma3_text;
pub mod gemma4_text;
pub mod glm4;
pub mod glm4_moe;
pub mod glm4_moe_lite;
pub mod gpt_oss;
pub mod granite;
pub mod granitemoe;
pub mod granitemoehybrid;
pub mod helium;
pub mod hunyuan_v1_dense;
pub mod internlm3;
pub mod kimi_k25;
pub mod lfm2;
pub mod llama;
pub mod llama4;
pub mod llama4_text;
pub mod ministral3;
pub mod mistral3;
pub mod mistral4;
pub mod mixtral;
pub mod mla;
pub mod mlp;
pub mod nemotron_h;
pub mod olmo2;
pub mod olmo3;
pub mod olmoe;
pub mod phi;
pub mod phi3;
pub mod phimoe;
pub mod qwen2;
pub mod qwen2_moe;
pub mod qwen3;
pub mod qwen3_5;
pub mod qwen3_moe;
pub mod qwen3_next;
pub mod seed_oss;
pub mod smollm3;
pub mod ssm;
pub mod starcoder2;
pub mod switch;

use crate::cache::KvCache;
use crate::io::{ConfigFile, Weights};
use crate::nn::lora::FineTuneType;
use crate::nn::Loader;
use crate::quant::QuantSpec;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// What generation needs from a model.
pub trait LanguageModel: Send {
    /// Logits (B, L, vocab) in f32 for `tokens` (B, L), appending to `cache`.
    /// With `last_only`, only the last position's logits are computed (B, 1, vocab).
    fn forward(&self, tokens: &Tensor, cache: &mut [KvCache], last_only: bool) -> Result<Tensor>;
    /// One empty cache per layer: rotating for sliding-window layers, and for every other layer
    /// when `max_kv_size` is given (`--max-kv-size`).
    fn make_cache(&self, max_kv_size: Option<usize>) -> Vec<KvCache>;
    /// The longest context the model was trained for, when the config says.
    fn max_context(&self) -> Option<usize>;
    fn vocab_size(&self) -> usize;
    /// The activation dtype (f32 on the CPU, the weights' dtype elsewhere).
    fn dtype(&self) -> DType;
    fn device(&self) -> &Device;
    /// A greedy decode step of `rows` sequences that does not wait for the device: feeds
    /// `tokens` (rows, 1), or with `None` the tokens the previous greedy step picked on the
    /// device, and returns the argmax of the step's logits (as [`crate::engine::sample::argmax`]
    /// picks) to wait for. So the host can queue the next step before reading this one's
    /// tokens. `None`: no such path for this model or step (nothing ran); use `forward`.
    fn greedy_step(
        &self,
        _tokens: Option<&Tensor>,
        _rows: usize,
        _cache: &mut [KvCache],
    ) -> Result<Option<Box<dyn PendingTokens>>> {
        Ok(None)
    }
    /// The decode step a CUDA graph may capture and replay (`crate::engine::cuda_graph` does),
    /// or `None` when the model's step does work on the host that a replay would skip.
    fn graph_step(&self) -> Option<&dyn GraphStep> {
        None
    }
}

/// A model's decode step as a CUDA graph captures it: every input that changes from step to
/// step is a tensor on the device (the tokens, the RoPE tables of each row's position, the
/// cache position the caches hold), so that one captured step can be replayed at every position.
pub trait GraphStep: Send + Sync {
    /// The RoPEs the layers use, in the order `step` takes their tables.
    fn ropes(&self) -> &[crate::nn::Rope];
    /// The last position's logits for `tokens` (rows, 1), the layers' RoPE tables given (one
    /// per [`Self::ropes`]). With `raw` the logits may stay in the model's dtype where that is
    /// exact for an argmax; otherwise f32.
    fn step(
        &self,
        tokens: &Tensor,
        cache: &mut [KvCache],
        tables: &[crate::nn::RopeTables],
        raw: bool,
    ) -> Result<Tensor>;
}

/// Tokens a model picks on its device ([`LanguageModel::greedy_step`]).
pub trait PendingTokens: Send {
    /// Waits for the step that picks them; one token per batch row.
    fn wait(self: Box<Self>) -> Result<Vec<u32>>;
}

/// serde default for boolean config fields that default to true.
pub(crate) fn yes() -> bool {
    true
}

/// serde default `N` for float config fields: `#[serde(default = "super::num::<N>")]`.
pub(crate) fn num<const N: u64>() -> f64 {
    N as f64
}

/// serde default `N` for integer config fields.
pub(crate) fn count<const N: usize>() -> usize {
    N
}

/// Drops what mlx_lm's `sanitize` drops for every llama-like model: precomputed rotary
/// frequencies and, with tied embeddings, a stray `lm_head.weight`.
pub fn drop_unused(weights: &mut Weights, tied: bool) {
    weights.sanitize(|k| {
        if k.contains("self_attn.rotary_emb.inv_freq") || (tied && k == "lm_head.weight") {
            None
        } else {
            Some(k.to_string())
        }
    });
}

/// Caches for layers with the given sliding windows: a window gives a rotating cache of that
/// size; other layers rotate at `max_kv_size` (keeping the first 4 positions, as mlx_lm's
/// `make_prompt_cache`) or grow.
pub fn layer_caches(windows: &[Option<usize>], max_kv_size: Option<usize>) -> Vec<KvCache> {
    windows
        .iter()
        .map(|w| match (w, max_kv_size) {
            (Some(w), _) => KvCache::rotating(*w, 0),
            (None, Some(m)) => KvCache::rotating(m, crate::cache::MAX_KV_KEEP),
            (None, None) => KvCache::new(),
        })
        .collect()
}

/// Runs `$body` with `$arch` naming the architecture file of `model_type` (mlx_lm's remapping
/// included: mistral is llama), or `$other` for a model type wick does not run. The one list of
/// architectures; [`SUPPORTED_MODEL_TYPES`] names the same.
macro_rules! by_model_type {
    ($model_type:expr, $arch:ident => $body:expr, _ => $other:expr) => {
        match $model_type {
            "llama" | "mistral" => {
                use self::llama as $arch;
                $body
            }
            "qwen2" => {
                use self::qwen2 as $arch;
                $body
            }
            "qwen3" => {
                use self::qwen3 as $arch;
                $body
            }
            "phi" => {
                use self::phi as $arch;
                $body
            }
            "phi3" => {
                use self::phi3 as $arch;
                $body
            }
            "gemma2" => {
                use self::gemma2 as $arch;
                $body
            }
            "gemma3_text" => {
                use self::gemma3_text as $arch;
                $body
            }
            "mixtral" => {
                use self::mixtral as $arch;
                $body
            }
            "qwen3_moe" => {
                use self::qwen3_moe as $arch;
                $body
            }
            "qwen3_5" | "qwen3_5_moe" => {
                use self::qwen3_5 as $arch;
                $body
            }
            "qwen3_next" => {
                use self::qwen3_next as $arch;
                $body
            }
            "qwen2_moe" => {
                use self::qwen2_moe as $arch;
                $body
            }
            "olmoe" => {
                use self::olmoe as $arch;
                $body
            }
            "gpt_oss" => {
                use self::gpt_oss as $arch;
                $body
            }
            "glm4_moe" => {
                use self::glm4_moe as $arch;
                $body
            }
            "nemotron_h" => {
                use self::nemotron_h as $arch;
                $body
            }
            "granitemoehybrid" => {
                use self::granitemoehybrid as $arch;
                $body
            }
            "granitemoe" => {
                use self::granitemoe as $arch;
                $body
            }
            "ernie4_5_moe" => {
                use self::ernie4_5_moe as $arch;
                $body
            }
            "phimoe" => {
                use self::phimoe as $arch;
                $body
            }
            "llama4" => {
                use self::llama4 as $arch;
                $body
            }
            "gemma4_text" => {
                use self::gemma4_text as $arch;
                $body
            }
            "llama4_text" => {
                use self::llama4_text as $arch;
                $body
            }
            "smollm3" => {
                use self::smollm3 as $arch;
                $body
            }
            "granite" => {
                use self::granite as $arch;
                $body
            }
            "seed_oss" => {
                use self::seed_oss as $arch;
                $body
            }
            "helium" => {
                use self::helium as $arch;
                $body
            }
            "lfm2" => {
                use self::lfm2 as $arch;
                $body
            }
            "internlm3" => {
                use self::internlm3 as $arch;
                $body
            }
            "olmo2" => {
                use self::olmo2 as $arch;
                $body
            }
            "olmo3" => {
                use self::olmo3 as $arch;
                $body
            }
            "exaone4" => {
                use self::exaone4 as $arch;
                $body
            }
            "glm4" => {
                use self::glm4 as $arch;
                $body
            }
            "cohere2" => {
                use self::cohere2 as $arch;
                $body
            }
            "starcoder2" => {
                use self::starcoder2 as $arch;
                $body
            }
            "apertus" => {
                use self::apertus as $arch;
                $body
            }
            "hunyuan_v1_dense" => {
                use self::hunyuan_v1_dense as $arch;
                $body
            }
            "gemma3" => {
                use self::gemma3 as $arch;
                $body
            }
            "ministral3" => {
                use self::ministral3 as $arch;
                $body
            }
            "mistral3" | "llava" => {
                use self::mistral3 as $arch;
                $body
            }
            "deepseek_v2" => {
                use self::deepseek_v2 as $arch;
                $body
            }
            "deepseek_v3" | "kimi_k2" | "joyai_llm_flash" => {
                use self::deepseek_v3 as $arch;
                $body
            }
            "kimi_k25" => {
                use self::kimi_k25 as $arch;
                $body
            }
            "glm4_moe_lite" => {
                use self::glm4_moe_lite as $arch;
                $body
            }
            "mistral4" => {
                use self::mistral4 as $arch;
                $body
            }
            _ => $other,
        }
    };
}

/// `model_type`s wick runs (the keys of `by_model_type!`).
pub const SUPPORTED_MODEL_TYPES: &[&str] = &[
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "phi",
    "phi3",
    "gemma2",
    "gemma3_text",
    "mixtral",
    "qwen3_moe",
    "qwen3_next",
    "qwen3_5",
    "qwen3_5_moe",
    "qwen2_moe",
    "olmoe",
    "gpt_oss",
    "glm4_moe",
    "granitemoe",
    "granitemoehybrid",
    "nemotron_h",
    "ernie4_5_moe",
    "phimoe",
    "llama4",
    "gemma4_text",
    "llama4_text",
    "smollm3",
    "granite",
    "seed_oss",
    "helium",
    "lfm2",
    "internlm3",
    "olmo2",
    "olmo3",
    "exaone4",
    "glm4",
    "cohere2",
    "starcoder2",
    "apertus",
    "hunyuan_v1_dense",
    "gemma3",
    "ministral3",
    "mistral3",
    "llava",
    "deepseek_v2",
    "deepseek_v3",
    "kimi_k2",
    "joyai_llm_flash",
    "kimi_k25",
    "glm4_moe_lite",
    "mistral4",
];

/// Applies the `sanitize` of `config`'s architecture to `weights` (what `mlx_lm.convert` does
/// before quantizing: per-expert weights stacked, unused tensors dropped); other model types are
/// left as they are.
pub fn sanitize_weights(config: &ConfigFile, weights: &mut Weights) -> Result<()> {
    by_model_type!(config.model_type()?, arch => {
        let args: arch::ModelArgs = config.parse()?;
        arch::sanitize(&args, weights)
    }, _ => Ok(()))
}

/// How an architecture quantizes one of its layers where that differs from the uniform
/// setting (mlx_lm's `Model.quant_predicate`, and modules without `to_quantized`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerQuant {
    /// the uniform bits and group size
    Uniform,
    /// never quantized (glm4_moe's router is no `nn.Linear`)
    Float,
    /// these bits and group size (routers at 8 bits, group 64)
    Params(crate::quant::QuantParams),
}

/// [`LayerQuant`] of the layer at `path` in a `model_type` model.
pub fn layer_quant(model_type: &str, path: &str) -> LayerQuant {
    let eight_bit = LayerQuant::Params(crate::quant::QuantParams::affine(8, 64));
    match model_type {
        "qwen3_moe" if path.ends_with("mlp.gate") => eight_bit,
        "qwen3_next" | "qwen3_5" | "qwen3_5_moe"
            if path.ends_with("mlp.gate") || path.ends_with("shared_expert_gate") =>
        {
            eight_bit
        }
        "gpt_oss" if path.ends_with("router") => eight_bit,
        "glm4_moe" | "deepseek_v2" | "deepseek_v3" | "kimi_k2" | "joyai_llm_flash" | "kimi_k25" | "glm4_moe_lite"
            if path.ends_with("mlp.gate") =>
        {
            LayerQuant::Float
        }
        "nemotron_h" if path.ends_with("mixer.gate") => LayerQuant::Float,
        "gemma4_text" if path.ends_with("router.proj") => eight_bit,
        "granitemoe" | "granite" if granite::eight_bit(path) => eight_bit,
        "granitemoehybrid" if path.ends_with("router.layer") => eight_bit,
        _ => LayerQuant::Uniform,
    }
}

/// Whether the tensor `name` of a `model_type` model keeps its stored dtype when `convert` casts
/// the weights (mlx_lm's `Model.cast_predicate`: DeepSeek-style routers' score correction bias
/// stays f32).
pub fn keeps_dtype(model_type: &str, name: &str) -> bool {
    matches!(model_type, "glm4_moe" | "deepseek_v3" | "kimi_k2" | "joyai_llm_flash" | "kimi_k25" | "glm4_moe_lite")
        && name.contains("e_score_correction_bias")
}

/// A loaded model with its config.
pub struct LoadedModel {
    pub model: Box<dyn LanguageModel>,
    pub config: ConfigFile,
    pub model_type: String,
}

/// Loads the model of `dir` in `dtype` (or the dtype its weights are stored in) on `device`, with
/// `adapters` (read from a folder, or trainable ones for `wick lora`). This is the model alone:
/// `crate::engine::load_model` and its siblings also give it the engine's CUDA graphs.
pub fn load_model_adapted(
    dir: &Path,
    dtype: Option<DType>,
    device: &Device,
    adapters: Option<&crate::nn::lora::Adapters>,
) -> Result<LoadedModel> {
    crate::backend::device::init_threads();
    if !dir.is_dir() {
        bail!("model folder {} does not exist", dir.display());
    }
    let config = ConfigFile::read(dir)?;
    let model_type = config.model_type()?.to_string();
    if !SUPPORTED_MODEL_TYPES.contains(&model_type.as_str()) {
        bail!(
            "{}: model_type `{model_type}` is not supported; supported model types: {}",
            config.path.display(),
            SUPPORTED_MODEL_TYPES.join(", ")
        );
    }
    let quant = QuantSpec::from_config(&config.value, &config.path.display().to_string())?;
    let mut weights = Weights::open(dir)?;
    let dtype = match dtype {
        Some(d) => d,
        None => weights.dominant_float_dtype(),
    };
    let act_dtype = if device.is_cpu() { DType::F32 } else { dtype };
    // Parses the architecture's arguments, applies its `sanitize`, checks the quantization
    // block's layer names against what is left, and builds the model.
    macro_rules! build {
        ($arch:ident) => {{
            let args: $arch::ModelArgs = config.parse()?;
            $arch::sanitize(&args, &mut weights)?;
            if let Some(a) = adapters.filter(|a| a.config.fine_tune_type == FineTuneType::Full && !a.is_training()) {
                // full fine-tuning: the trained tensors replace the model's own
                weights.add_file(&a.dir.join(crate::nn::lora::ADAPTER_WEIGHTS))?;
            }
            if let Some(q) = &quant {
                // a layer its sanitize consumed into others (a quantized kv_b_proj) may be named
                let known = |p: &str| {
                    let w = format!("{p}.weight");
                    weights.contains(&w) || weights.was_consumed(&w)
                };
                q.check_layers_exist(&known, &config.path.display().to_string())?;
            }
            let ld =
                Loader { weights: &weights, dtype, act_dtype, device: device.clone(), quant: quant.as_ref(), adapters };
            let m = Box::new($arch::load(&args, &ld)?) as Box<dyn LanguageModel>;
            if let Some(a) = adapters {
                a.finish()?;
            }
            m
        }};
    }
    let model = by_model_type!(model_type.as_str(), arch => build!(arch), _ => unreachable!("checked against SUPPORTED_MODEL_TYPES"));
    Ok(LoadedModel { model, config, model_type })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_supported_model_type_has_an_architecture_file() {
        for t in SUPPORTED_MODEL_TYPES {
            let known = by_model_type!(*t, arch => {
                let _ = arch::sanitize;
                true
            }, _ => false);
            assert!(known, "{t}");
        }
    }
}
