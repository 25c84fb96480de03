//! Helium (Kyutai): llama with traditional (interleaved) RoPE, biases on q/k/v only
//! (`attention_bias`; the output projection never has one), `head_dim = hidden / heads`. Reads
//! like mlx_lm's `models/helium.py`.

use super::attention::Heads;
use super::decoder::{BaseArgs, DecoderModel, ModelSpec, PreNormBlock};
use super::llama;
use super::mlp::Mlp;
use crate::io::Weights;
use crate::nn::{Loader, Rope};
use anyhow::Result;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    #[serde(flatten)]
    pub base: BaseArgs,
    pub num_key_value_heads: usize,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
}

/// A tied model ignores its `lm_head` (mlx_lm builds one it never uses).
pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    super::drop_unused(weights, args.tie_word_embeddings);
    Ok(())
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    let a = &args.base;
    let hd = a.hidden_size / a.num_attention_heads;
    let rope = Rope::from_config(hd, args.rope_theta, true, None, None)?;
    let heads = Heads::new(a.num_attention_heads, args.num_key_value_heads, hd);
    let layers = (0..a.num_hidden_layers)
        .map(|i| {
            let p = format!("model.layers.{i}");
            let bias = args.attention_bias;
            let attn = llama::Attention::load(ld, &format!("{p}.self_attn"), a.hidden_size, heads, bias, false)?;
            let mlp = Mlp::load(ld, &format!("{p}.mlp"), a.hidden_size, a.intermediate_size, args.mlp_bias)?;
            PreNormBlock::load(ld, &p, a.hidden_size, a.rms_norm_eps, attn, mlp)
        })
        .collect::<Result<Vec<_>>>()?;
    let ctx = Some(args.max_position_embeddings);
    a.decoder(ld, ModelSpec::plain(a.num_hidden_layers, rope, args.tie_word_embeddings, ctx), layers)
}
