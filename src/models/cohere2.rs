//! Cohere 2 (Command R7B, Command A): attention and a SwiGLU MLP in parallel on one LayerNorm
//! (without a bias unless `layer_norm_bias`), traditional RoPE; in each group of
//! `sliding_window_pattern` layers all but the last attend to a window of `sliding_window`
//! positions, the last globally without RoPE. The head is the tied embedding, its logits
//! scaled by `logit_scale`. Reads like mlx_lm's `models/cohere2.py`.

use super::attention::Heads;
use super::decoder::{BaseArgs, DecoderModel, Layer, ModelSpec};
use super::llama;
use super::mlp::Mlp;
use super::phi::ParallelBlock;
use crate::io::Weights;
use crate::nn::{LayerNorm, Loader, Rope};
use anyhow::{bail, Result};
use serde::Deserialize;
use std::sync::Arc;

/// mlx_lm's defaults are Command R7B's sizes.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    #[serde(default = "super::count::<4096>")]
    pub hidden_size: usize,
    #[serde(default = "super::count::<128>")]
    pub head_dim: usize,
    #[serde(default = "super::count::<32>")]
    pub num_hidden_layers: usize,
    #[serde(default = "super::count::<14336>")]
    pub intermediate_size: usize,
    #[serde(default = "super::count::<32>")]
    pub num_attention_heads: usize,
    #[serde(default = "super::count::<8>")]
    pub num_key_value_heads: usize,
    #[serde(default = "super::num::<50000>")]
    pub rope_theta: f64,
    #[serde(default = "super::count::<256000>")]
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_logit_scale")]
    pub logit_scale: f64,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub layer_norm_bias: bool,
    #[serde(default = "super::count::<4096>")]
    pub sliding_window: usize,
    #[serde(default = "super::count::<4>")]
    pub sliding_window_pattern: usize,
}

fn default_eps() -> f64 {
    1e-5
}

fn default_logit_scale() -> f64 {
    0.0625
}

pub fn sanitize(_args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    super::drop_unused(weights, true);
    Ok(())
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    if args.head_dim * args.num_attention_heads != args.hidden_size {
        bail!(
            "config.json: head_dim ({}) × num_attention_heads ({}) must equal hidden_size ({})",
            args.head_dim,
            args.num_attention_heads,
            args.hidden_size
        );
    }
    let base = BaseArgs {
        hidden_size: args.hidden_size,
        num_hidden_layers: args.num_hidden_layers,
        intermediate_size: args.intermediate_size,
        num_attention_heads: args.num_attention_heads,
        rms_norm_eps: args.layer_norm_eps,
        vocab_size: args.vocab_size,
    };
    let (dim, eps) = (args.hidden_size, args.layer_norm_eps);
    let rope = Rope::from_config(args.head_dim, args.rope_theta, true, None, None)?;
    let heads = Heads::new(args.num_attention_heads, args.num_key_value_heads, args.head_dim);
    let pattern = args.sliding_window_pattern.max(1);
    let sliding = |i: usize| !(i + 1).is_multiple_of(pattern);
    let layers = (0..args.num_hidden_layers)
        .map(|i| {
            let p = format!("model.layers.{i}");
            let bias = args.attention_bias;
            let layer = ParallelBlock {
                input_layernorm: LayerNorm::load_with(
                    ld,
                    &format!("{p}.input_layernorm"),
                    dim,
                    eps,
                    args.layer_norm_bias,
                )?,
                // the global layers attend without RoPE
                self_attn: llama::Attention::load(ld, &format!("{p}.self_attn"), dim, heads, bias, bias)?
                    .with_rope(sliding(i)),
                mlp: Mlp::load(ld, &format!("{p}.mlp"), dim, args.intermediate_size, false)?,
            };
            Ok(Arc::new(layer) as Arc<dyn Layer>)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut spec = ModelSpec::plain(args.num_hidden_layers, rope, true, None);
    spec.windows = (0..args.num_hidden_layers).map(|i| sliding(i).then_some(args.sliding_window)).collect();
    spec.final_layernorm = Some(("model.norm", args.layer_norm_bias));
    spec.logits_scale = Some(args.logit_scale);
    base.decoder(ld, spec, layers)
}
