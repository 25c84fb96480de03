//! Phi-3: llama's layers with one fused `qkv_proj` and one fused `gate_up_proj`, RoPE over
//! `partial_rotary_factor` of each head, "su"/"longrope" scaling from the top-level
//! `original_max_position_embeddings`. Reads like mlx_lm's `models/phi3.py`.

use super::blocks::{BaseArgs, DecoderModel, ModelSpec, RopeArgs};
use crate::io::Weights;
use crate::nn::{Loader, Rope};
use anyhow::{Context, Result};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    #[serde(flatten)]
    pub base: BaseArgs,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "super::num::<10000>")]
    pub rope_theta: f64,
    #[serde(flatten)]
    pub rope: RopeArgs,
    #[serde(default = "super::num::<1>")]
    pub partial_rotary_factor: f64,
    #[serde(default = "super::count::<131072>")]
    pub max_position_embeddings: usize,
    #[serde(default = "super::count::<4096>")]
    pub original_max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    super::drop_unused(weights, args.tie_word_embeddings);
    Ok(())
}

fn rope(args: &ModelArgs, dims: usize) -> Result<Rope> {
    let scaling = args.rope.rope_scaling.as_ref();
    match scaling.and_then(|s| s.get("type")).and_then(|t| t.as_str()) {
        Some("longrope") | Some("su") => {
            let long = scaling.and_then(|s| s.get("long_factor")).context("rope_scaling needs `long_factor`")?;
            let (max, orig) = (args.max_position_embeddings, args.original_max_position_embeddings);
            Rope::su_scaled(dims, args.rope_theta, max, orig, long, None)
        }
        // mlx_lm keeps linear scaling and drops any other kind (with a warning)
        Some("linear") => args.rope.rope(dims, args.rope_theta, None),
        _ => Rope::from_config(dims, args.rope_theta, args.rope.rope_traditional, None, None),
    }
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    let a = &args.base;
    let head_dim = a.hidden_size / a.num_attention_heads;
    let rope = rope(args, (head_dim as f64 * args.partial_rotary_factor) as usize)?;
    let mut attn = a.attention(args.num_key_value_heads.unwrap_or(a.num_attention_heads), head_dim);
    attn.fused_qkv = true;
    let mlp = super::blocks::MlpSpec { fused: true, ..a.mlp() };
    let ctx = Some(args.max_position_embeddings);
    a.build(ld, &attn, &mlp, ModelSpec::plain(a.num_hidden_layers, rope, args.tie_word_embeddings, ctx))
}
