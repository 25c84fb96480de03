//! Qwen3.5 (`qwen3_5`, and `qwen3_5_moe` with experts in every layer), text only: Qwen3-Next's
//! layers under `language_model.` with the Gated DeltaNet's projections apart (`in_proj_qkv`,
//! `in_proj_z`, `in_proj_b`, `in_proj_a`), RoPE from `rope_parameters` (its M-RoPE sections
//! are the same rotation for text), and the MoE on in every layer whenever `num_experts > 0`.
//! The vision tower and the multi-token-prediction layers are dropped. Reads like mlx_lm's
//! `models/qwen3_5.py` and `qwen3_5_moe.py`.

use super::decoder::{BaseArgs, DecoderModel};
use super::qwen3_next;
use crate::io::Weights;
use crate::nn::Loader;
use anyhow::Result;
use serde::Deserialize;

/// The text model's arguments (`text_config`, or the whole config when it has none), as
/// Qwen3-Next's.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "Wrapper")]
pub struct ModelArgs {
    pub text: qwen3_next::ModelArgs,
}

#[derive(Deserialize)]
struct Wrapper {
    #[serde(default)]
    text_config: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}

#[derive(Deserialize)]
struct TextArgs {
    #[serde(default = "super::count::<4096>")]
    hidden_size: usize,
    #[serde(default = "super::count::<14336>")]
    intermediate_size: usize,
    #[serde(default = "super::count::<32>")]
    num_hidden_layers: usize,
    #[serde(default = "super::count::<32>")]
    num_attention_heads: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default = "super::count::<151936>")]
    vocab_size: usize,
    #[serde(default = "super::count::<8>")]
    num_key_value_heads: usize,
    #[serde(default = "super::count::<131072>")]
    max_position_embeddings: usize,
    #[serde(default = "super::count::<64>")]
    linear_num_value_heads: usize,
    #[serde(default = "super::count::<16>")]
    linear_num_key_heads: usize,
    #[serde(default = "super::count::<192>")]
    linear_key_head_dim: usize,
    #[serde(default = "super::count::<128>")]
    linear_value_head_dim: usize,
    #[serde(default = "super::count::<4>")]
    linear_conv_kernel_dim: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    head_dim: Option<usize>,
    #[serde(default = "super::count::<4>")]
    full_attention_interval: usize,
    #[serde(default)]
    num_experts: usize,
    #[serde(default)]
    num_experts_per_tok: usize,
    #[serde(default)]
    shared_expert_intermediate_size: usize,
    #[serde(default)]
    moe_intermediate_size: usize,
    #[serde(default = "yes")]
    norm_topk_prob: bool,
    #[serde(default)]
    rope_parameters: Option<serde_json::Map<String, serde_json::Value>>,
}

fn default_eps() -> f64 {
    1e-6
}

fn yes() -> bool {
    true
}

impl TryFrom<Wrapper> for ModelArgs {
    type Error = serde_json::Error;

    fn try_from(w: Wrapper) -> Result<Self, Self::Error> {
        let t: TextArgs = serde_json::from_value(w.text_config.unwrap_or(w.rest).into())?;
        // rope_parameters always exists in mlx_lm (its default: theta 1e5, a quarter of each head)
        let rp = t.rope_parameters.unwrap_or_default();
        let f = |k: &str, d: f64| rp.get(k).and_then(|v| v.as_f64()).unwrap_or(d);
        let scaling = rp.get("rope_type").or(rp.get("type")).and_then(|v| v.as_str()).filter(|&ty| ty != "default");
        let text = qwen3_next::ModelArgs {
            base: BaseArgs {
                hidden_size: t.hidden_size,
                num_hidden_layers: t.num_hidden_layers,
                intermediate_size: t.intermediate_size,
                num_attention_heads: t.num_attention_heads,
                rms_norm_eps: t.rms_norm_eps,
                vocab_size: t.vocab_size,
            },
            linear_num_value_heads: t.linear_num_value_heads,
            linear_num_key_heads: t.linear_num_key_heads,
            linear_key_head_dim: t.linear_key_head_dim,
            linear_value_head_dim: t.linear_value_head_dim,
            linear_conv_kernel_dim: t.linear_conv_kernel_dim,
            num_experts: t.num_experts,
            num_experts_per_tok: t.num_experts_per_tok,
            decoder_sparse_step: 1,
            shared_expert_intermediate_size: t.shared_expert_intermediate_size,
            mlp_only_layers: vec![],
            moe_intermediate_size: t.moe_intermediate_size,
            num_key_value_heads: t.num_key_value_heads,
            rope_theta: f("rope_theta", 100000.0),
            partial_rotary_factor: f("partial_rotary_factor", 0.25),
            max_position_embeddings: t.max_position_embeddings,
            head_dim: t.head_dim.unwrap_or(t.hidden_size / t.num_attention_heads.max(1)),
            norm_topk_prob: t.norm_topk_prob,
            tie_word_embeddings: t.tie_word_embeddings,
            attention_bias: t.attention_bias,
            rope_scaling: scaling.map(|_| serde_json::Value::Object(rp.clone())),
            full_attention_interval: t.full_attention_interval,
        };
        Ok(Self { text })
    }
}

const PREFIX: &str = "language_model.";

/// The Hugging Face layout into mlx_lm's: the vision tower dropped, `model.language_model.` as
/// `language_model.model.`, everything else under `language_model.`; the multi-token-prediction
/// layers dropped; `qwen3_5_moe`'s fused experts (`experts.gate_up_proj`, gate rows first, and
/// `experts.down_proj`) as `switch_mlp`; and, when the convolutions are still in Hugging Face's
/// layout, those in mlx's and the zero-centred norms shifted by 1.
pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    weights.sanitize(|k| {
        if k.starts_with("vision_tower") || k.starts_with("model.visual") || k.contains("mtp.") {
            None
        } else if let Some(rest) = k.strip_prefix("model.language_model.") {
            Some(format!("{PREFIX}model.{rest}"))
        } else if k.starts_with(PREFIX) {
            Some(k.to_string())
        } else {
            Some(format!("{PREFIX}{k}"))
        }
    });
    let a = &args.text;
    if a.tie_word_embeddings {
        weights.sanitize(|k| (k != "language_model.lm_head.weight").then(|| k.to_string()));
    }
    for l in 0..a.base.num_hidden_layers {
        let m = format!("{PREFIX}model.layers.{l}.mlp");
        let fused = format!("{m}.experts.gate_up_proj");
        if weights.contains(&fused) {
            let parts = [format!("{m}.switch_mlp.gate_proj.weight"), format!("{m}.switch_mlp.up_proj.weight")];
            weights.split_axis(&fused, 1, &parts)?;
            weights.rename(&format!("{m}.experts.down_proj"), &format!("{m}.switch_mlp.down_proj.weight"))?;
        }
    }
    qwen3_next::convs_and_norms_to_mlx(weights, false)
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    qwen3_next::load_with(&args.text, ld, PREFIX, true)
}
