//! Qwen2 / Qwen2.5: llama's layers with biases on q, k and v (not on the output projection),
//! rope_theta 1e6 by default. Reads like mlx_lm's `models/qwen2.py`.

use super::attention::Heads;
use super::decoder::{BaseArgs, DecoderModel, ModelSpec, PreNormBlock, RopeArgs};
use super::llama::Attention;
use super::mlp::Mlp;
use crate::io::Weights;
use crate::nn::Loader;
use anyhow::Result;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    #[serde(flatten)]
    pub base: BaseArgs,
    pub num_key_value_heads: usize,
    #[serde(default = "super::count::<32768>")]
    pub max_position_embeddings: usize,
    #[serde(default = "super::yes")]
    pub tie_word_embeddings: bool,
    #[serde(default = "super::num::<1000000>")]
    pub rope_theta: f64,
    #[serde(flatten)]
    pub rope: RopeArgs,
}

pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    super::drop_unused(weights, args.tie_word_embeddings);
    Ok(())
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    let a = &args.base;
    let head_dim = a.hidden_size / a.num_attention_heads;
    let ctx = args.max_position_embeddings;
    let rope = args.rope.rope(head_dim, args.rope_theta, Some(ctx))?;
    let heads = Heads::new(a.num_attention_heads, args.num_key_value_heads, head_dim);
    let layers = (0..a.num_hidden_layers)
        .map(|i| {
            let p = format!("model.layers.{i}");
            // llama's attention with biases on q, k and v (not on the output projection)
            let attn = Attention::load(ld, &format!("{p}.self_attn"), a.hidden_size, heads, true, false)?;
            let mlp = Mlp::load(ld, &format!("{p}.mlp"), a.hidden_size, a.intermediate_size, false)?;
            PreNormBlock::load(ld, &p, a.hidden_size, a.rms_norm_eps, attn, mlp)
        })
        .collect::<Result<Vec<_>>>()?;
    a.decoder(ld, ModelSpec::plain(a.num_hidden_layers, rope, args.tie_word_embeddings, Some(ctx)), layers)
}
