//! Qwen3: llama's layers without biases, an explicit `head_dim`, and an RMSNorm over each head
//! of the queries and keys before RoPE. Reads like mlx_lm's `models/qwen3.py`.

use super::blocks::{BaseArgs, DecoderModel, ModelSpec};
use crate::io::Weights;
use crate::nn::{Loader, Rope};
use anyhow::{Context, Result};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    #[serde(flatten)]
    pub base: BaseArgs,
    pub num_key_value_heads: usize,
    pub max_position_embeddings: usize,
    pub head_dim: usize,
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers >= 5 nests rope_theta and the scaling here
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
}

pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    super::drop_unused(weights, args.tie_word_embeddings);
    Ok(())
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    let a = &args.base;
    let params = args.rope_parameters.as_ref();
    let theta = args
        .rope_theta
        .or_else(|| params.and_then(|p| p.get("rope_theta")).and_then(|t| t.as_f64()))
        .context("config.json: `rope_theta` is missing (neither at the top level nor in `rope_parameters`)")?;
    let scaling = args.rope_scaling.as_ref().or(params);
    let ctx = args.max_position_embeddings;
    let rope = Rope::from_config(args.head_dim, theta, false, scaling, Some(ctx))?;
    let mut attn = a.attention(args.num_key_value_heads, args.head_dim);
    attn.qk_norm = true;
    a.build(ld, &attn, &a.mlp(), ModelSpec::plain(a.num_hidden_layers, rope, args.tie_word_embeddings, Some(ctx)))
}
