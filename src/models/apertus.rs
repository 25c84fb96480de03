//! Apertus (Swiss AI): llama's pre-norm layers under other norm names (`attention_layernorm`,
//! `feedforward_layernorm`), qwen3's per-head q/k norms, no attention biases, and an ungated MLP
//! with the xIELU activation, `down(xielu(up(x)))`, whose four scalars each layer learns.
//! Reads like mlx_lm's `models/apertus.py`.

use super::attention::Heads;
use super::decoder::{BaseArgs, DecoderModel, ModelSpec, PreNormBlock, RopeArgs};
use super::mlp::{Activation, UngatedMlp};
use super::qwen3::Attention;
use crate::io::Weights;
use crate::nn::{Loader, RmsNorm};
use anyhow::{bail, Result};
use candle_core::{DType, Device};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    #[serde(flatten)]
    pub base: BaseArgs,
    pub num_key_value_heads: usize,
    pub mlp_bias: bool,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    #[serde(flatten)]
    pub rope: RopeArgs,
}

pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    super::drop_unused(weights, args.tie_word_embeddings);
    Ok(())
}

/// Apertus's xIELU from `{p}.alpha_p`, `{p}.alpha_n`, `{p}.beta`, `{p}.eps`: scalars (Hugging
/// Face stores the alphas with shape [1]).
fn xielu(ld: &Loader, p: &str) -> Result<Activation> {
    let scalar = |n: &str| -> Result<f64> {
        let name = format!("{p}.{n}");
        let shape = ld.weights.shape(&name)?;
        if shape.iter().product::<usize>() != 1 || shape.len() > 1 {
            bail!("tensor `{name}` has shape {shape:?}; expected a scalar");
        }
        let t = ld.weights.get(&name, &shape, DType::F32, &Device::Cpu)?;
        Ok(t.flatten_all()?.to_vec1::<f32>()?[0] as f64)
    };
    let (alpha_p, alpha_n, beta, eps) = (scalar("alpha_p")?, scalar("alpha_n")?, scalar("beta")?, scalar("eps")?);
    Activation::xielu(alpha_p, alpha_n, beta, eps, ld.act_dtype, &ld.device)
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    let a = &args.base;
    let (dim, hidden, eps) = (a.hidden_size, a.intermediate_size, a.rms_norm_eps);
    let hd = dim / a.num_attention_heads;
    let ctx = Some(args.max_position_embeddings);
    let rope = args.rope.rope(hd, args.rope_theta, ctx)?;
    let heads = Heads::new(a.num_attention_heads, args.num_key_value_heads, hd);
    let layers = (0..a.num_hidden_layers)
        .map(|i| {
            let p = format!("model.layers.{i}");
            let norm = |n: &str, d: usize| RmsNorm::load(ld, n, d, eps);
            let attn = Attention::load(ld, &format!("{p}.self_attn"), dim, heads, |n| norm(n, hd))?;
            let act = xielu(ld, &format!("{p}.mlp.act_fn"))?;
            let mlp =
                UngatedMlp::load(ld, &format!("{p}.mlp"), ["up_proj", "down_proj"], dim, hidden, args.mlp_bias, act)?;
            let layer = PreNormBlock {
                self_attn: attn,
                mlp,
                input_layernorm: norm(&format!("{p}.attention_layernorm"), dim)?,
                post_attention_layernorm: norm(&format!("{p}.feedforward_layernorm"), dim)?,
            };
            Ok(std::sync::Arc::new(layer) as std::sync::Arc<dyn super::decoder::Layer>)
        })
        .collect::<Result<Vec<_>>>()?;
    a.decoder(ld, ModelSpec::plain(a.num_hidden_layers, rope, args.tie_word_embeddings, ctx), layers)
}
