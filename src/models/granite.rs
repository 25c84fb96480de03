//! Granite (granite-3.x dense): llama's layers with granite's multipliers — the embedding
//! scaled by `embedding_multiplier`, attention scores by `attention_multiplier`, each residual
//! branch by `residual_multiplier`, the logits divided by `logits_scaling` — around a SwiGLU
//! MLP. Reads like mlx_lm's `models/granite.py`; the layer is granitemoe's with a dense MLP.

use super::attention::Heads;
use super::decoder::{BaseArgs, DecoderModel, Layer, ModelSpec, RopeArgs};
use super::granitemoe::GraniteLayer;
use super::llama::Attention;
use super::mlp::Mlp;
use crate::io::Weights;
use crate::nn::{Loader, RmsNorm};
use anyhow::Result;
use serde::Deserialize;
use std::sync::Arc;

#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    #[serde(flatten)]
    pub base: BaseArgs,
    pub logits_scaling: f64,
    pub attention_multiplier: f64,
    pub embedding_multiplier: f64,
    pub residual_multiplier: f64,
    pub max_position_embeddings: usize,
    pub num_key_value_heads: usize,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub rope_theta: f64,
    #[serde(flatten)]
    pub rope: RopeArgs,
    #[serde(default = "super::yes")]
    pub tie_word_embeddings: bool,
}

pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    super::drop_unused(weights, args.tie_word_embeddings);
    Ok(())
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    let a = &args.base;
    let dim = a.hidden_size;
    let hd = dim / a.num_attention_heads;
    let rope = args.rope.rope(hd, args.rope_theta, Some(args.max_position_embeddings))?;
    let heads =
        Heads { scale: args.attention_multiplier, ..Heads::new(a.num_attention_heads, args.num_key_value_heads, hd) };
    let layers = (0..a.num_hidden_layers)
        .map(|l| {
            let p = format!("model.layers.{l}");
            let bias = args.attention_bias;
            let norm = |n: &str| RmsNorm::load(ld, &format!("{p}.{n}"), dim, a.rms_norm_eps);
            let layer = GraniteLayer {
                self_attn: Attention::load(ld, &format!("{p}.self_attn"), dim, heads, bias, bias)?,
                ff: Mlp::load(ld, &format!("{p}.mlp"), dim, a.intermediate_size, args.mlp_bias)?,
                input_layernorm: norm("input_layernorm")?,
                post_attention_layernorm: norm("post_attention_layernorm")?,
                residual_multiplier: args.residual_multiplier,
            };
            Ok(Arc::new(layer) as Arc<dyn Layer>)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut spec =
        ModelSpec::plain(a.num_hidden_layers, rope, args.tie_word_embeddings, Some(args.max_position_embeddings));
    spec.embed_scale = Some(args.embedding_multiplier);
    spec.logits_scale = Some(1.0 / args.logits_scaling);
    a.decoder(ld, spec, layers)
}
