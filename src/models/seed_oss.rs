//! Seed-OSS (ByteDance): llama with a bias flag of its own for the output projection
//! (`attention_out_bias`) and a required `head_dim`. Reads like mlx_lm's `models/seed_oss.py`,
//! which ignores `layer_types` (every layer attends to the whole context).

use super::attention::Heads;
use super::decoder::{DecoderModel, ModelSpec, PreNormBlock};
use super::llama;
use super::mlp::Mlp;
use crate::io::Weights;
use crate::nn::Loader;
use anyhow::Result;
use serde::Deserialize;

/// llama's arguments and the output projection's bias.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    #[serde(flatten)]
    pub llama: llama::ModelArgs,
    #[serde(default)]
    pub attention_out_bias: bool,
}

/// Drops a stray `lm_head` of a tied model.
pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    super::drop_unused(weights, args.llama.tie_word_embeddings);
    Ok(())
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    let (la, a) = (&args.llama, &args.llama.base);
    let (hd, ctx) = (la.head_dim(), la.max_position_embeddings);
    let rope = la.rope.rope(hd, la.rope_theta, ctx)?;
    let heads = Heads::new(a.num_attention_heads, la.n_kv_heads(), hd);
    let layers = (0..a.num_hidden_layers)
        .map(|i| {
            let p = format!("model.layers.{i}");
            let (qkv_bias, o_bias) = (la.attention_bias, args.attention_out_bias);
            let attn = llama::Attention::load(ld, &format!("{p}.self_attn"), a.hidden_size, heads, qkv_bias, o_bias)?;
            let mlp = Mlp::load(ld, &format!("{p}.mlp"), a.hidden_size, a.intermediate_size, la.mlp_bias)?;
            PreNormBlock::load(ld, &p, a.hidden_size, a.rms_norm_eps, attn, mlp)
        })
        .collect::<Result<Vec<_>>>()?;
    a.decoder(ld, ModelSpec::plain(a.num_hidden_layers, rope, la.tie_word_embeddings, ctx), layers)
}
