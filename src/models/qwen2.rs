//! Qwen2 / Qwen2.5: llama's layers with biases on q, k and v (not on the output projection),
//! rope_theta 1e6 by default. Reads like mlx_lm's `models/qwen2.py`.

use super::blocks::{BaseArgs, DecoderModel, PreNormSpec, RopeArgs};
use crate::load::Weights;
use crate::nn::Loader;
use anyhow::Result;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    #[serde(flatten)]
    pub base: BaseArgs,
    pub num_key_value_heads: usize,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "super::yes")]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(flatten)]
    pub rope: RopeArgs,
}

fn default_max_position_embeddings() -> usize {
    32768
}
fn default_rope_theta() -> f64 {
    1_000_000.0
}

pub fn sanitize(args: &ModelArgs, weights: &mut Weights) {
    super::drop_unused(weights, args.tie_word_embeddings);
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    let a = &args.base;
    let head_dim = a.hidden_size / a.num_attention_heads;
    let ctx = args.max_position_embeddings;
    let rope = args.rope.rope(head_dim, args.rope_theta, Some(ctx))?;
    a.prenorm_model(
        ld,
        PreNormSpec {
            n_kv_heads: args.num_key_value_heads,
            head_dim,
            qkv_bias: true,
            o_bias: false,
            qk_norm: false,
            mlp_bias: false,
            tie_word_embeddings: args.tie_word_embeddings,
            max_context: Some(ctx),
            rope,
            windows: vec![None; a.num_hidden_layers],
        },
    )
}
