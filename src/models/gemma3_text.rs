//! Gemma 3 text models (`gemma3_text`): gemma2's sandwich layers without soft-capping, plus
//! per-head q/k norms; every `sliding_window_pattern`-th layer attends globally (RoPE at
//! `rope_theta` with `rope_scaling`), the others to a window of `sliding_window` positions (a
//! rotating cache; RoPE at `rope_local_base_freq`). Reads like mlx_lm's `models/gemma3_text.py`.

use super::attention::Heads;
use super::decoder::{BaseArgs, DecoderModel, ModelSpec, RopeArgs};
use super::gemma2::{norm, SandwichBlock};
use super::qwen3::Attention;
use crate::io::Weights;
use crate::nn::Loader;
use anyhow::Result;
use serde::Deserialize;

/// mlx_lm's defaults (Gemma 3 1B's sizes): the text configs inside `gemma3` checkpoints state
/// only what differs.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    #[serde(default = "super::count::<1152>")]
    pub hidden_size: usize,
    #[serde(default = "super::count::<26>")]
    pub num_hidden_layers: usize,
    #[serde(default = "super::count::<6912>")]
    pub intermediate_size: usize,
    #[serde(default = "super::count::<4>")]
    pub num_attention_heads: usize,
    #[serde(default = "super::count::<256>")]
    pub head_dim: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "super::count::<262144>")]
    pub vocab_size: usize,
    #[serde(default = "super::count::<1>")]
    pub num_key_value_heads: usize,
    #[serde(default = "super::num::<1000000>")]
    pub rope_theta: f64,
    #[serde(default = "super::num::<10000>")]
    pub rope_local_base_freq: f64,
    #[serde(default = "super::num::<256>")]
    pub query_pre_attn_scalar: f64,
    #[serde(default = "super::count::<512>")]
    pub sliding_window: usize,
    #[serde(default = "super::count::<6>")]
    pub sliding_window_pattern: usize,
    #[serde(default = "super::count::<32768>")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
}

fn default_eps() -> f64 {
    1e-6
}

/// mlx_lm ties the head to the embedding when the weights have no `lm_head`.
pub fn sanitize(_args: &ModelArgs, _weights: &mut Weights) -> Result<()> {
    Ok(())
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    load_with(args, ld, "")
}

/// The model with every tensor name under `prefix` (inside gemma3: `language_model.`).
pub fn load_with(args: &ModelArgs, ld: &Loader, prefix: &'static str) -> Result<DecoderModel> {
    let a = &BaseArgs {
        hidden_size: args.hidden_size,
        num_hidden_layers: args.num_hidden_layers,
        intermediate_size: args.intermediate_size,
        num_attention_heads: args.num_attention_heads,
        rms_norm_eps: args.rms_norm_eps,
        vocab_size: args.vocab_size,
    };
    let hd = args.head_dim;
    let ctx = args.max_position_embeddings;
    let global = RopeArgs { rope_traditional: false, rope_scaling: args.rope_scaling.clone() }.rope(
        hd,
        args.rope_theta,
        Some(ctx),
    )?;
    let local = RopeArgs::default().rope(hd, args.rope_local_base_freq, None)?;
    let heads = Heads {
        scale: args.query_pre_attn_scalar.powf(-0.5),
        ..Heads::new(a.num_attention_heads, args.num_key_value_heads, hd)
    };
    let layers = (0..a.num_hidden_layers)
        .map(|i| {
            let p = format!("{prefix}model.layers.{i}");
            // qwen3's attention (per-head q/k norms), with gemma's norms and score scale
            let qk_norm = |n: &str| norm(ld, n, hd, a.rms_norm_eps);
            let attn = Attention::load(ld, &format!("{p}.self_attn"), a.hidden_size, heads, qk_norm)?;
            SandwichBlock::load(ld, &p, a, attn)
        })
        .collect::<Result<Vec<_>>>()?;
    let tied = !ld.weights.contains(&format!("{prefix}lm_head.weight"));
    let mut spec = ModelSpec::plain(a.num_hidden_layers, global, tied, Some(ctx));
    spec.ropes.push(local);
    let pattern = args.sliding_window_pattern.max(1);
    let is_global = |i: usize| i % pattern == pattern - 1;
    spec.layer_rope = (0..a.num_hidden_layers).map(|i| if is_global(i) { 0 } else { 1 }).collect();
    spec.windows = (0..a.num_hidden_layers).map(|i| (!is_global(i)).then_some(args.sliding_window)).collect();
    spec.norm_shift = 1.0;
    spec.prefix = prefix;
    spec.embed_scale = Some(half::bf16::from_f64((a.hidden_size as f64).sqrt()).to_f64());
    a.decoder(ld, spec, layers)
}
