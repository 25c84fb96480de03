//! GLM-4 (the 0414 dense models, GLM-Z1): four norms per layer around attention and the MLP
//! (Gemma's sandwich, under GLM's names), the gate and up projections fused, biases on q/k/v
//! only, and traditional RoPE over the first `partial_rotary_factor` of each head. The head is
//! always a separate `lm_head`. Reads like mlx_lm's `models/glm4.py`.

use super::attention::Heads;
use super::decoder::{BaseArgs, DecoderModel, ModelSpec};
use super::gemma2::SandwichBlock;
use super::llama;
use super::mlp::FusedMlp;
use crate::io::Weights;
use crate::nn::{Loader, RmsNorm, Rope};
use anyhow::Result;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    #[serde(flatten)]
    pub base: BaseArgs,
    pub attention_bias: bool,
    pub head_dim: usize,
    pub num_key_value_heads: usize,
    pub partial_rotary_factor: f64,
    pub rope_theta: f64,
    #[serde(default = "super::yes")]
    pub rope_traditional: bool,
    #[serde(default = "super::count::<32768>")]
    pub max_position_embeddings: usize,
}

pub fn sanitize(_args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    super::drop_unused(weights, false);
    Ok(())
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    let a = &args.base;
    let hd = args.head_dim;
    let rope = Rope::from_config(
        (hd as f64 * args.partial_rotary_factor) as usize,
        args.rope_theta,
        args.rope_traditional,
        None,
        None,
    )?;
    let heads = Heads::new(a.num_attention_heads, args.num_key_value_heads, hd);
    let layers = (0..a.num_hidden_layers)
        .map(|i| {
            let p = format!("model.layers.{i}");
            let bias = args.attention_bias;
            let attn = llama::Attention::load(ld, &format!("{p}.self_attn"), a.hidden_size, heads, bias, false)?;
            let mlp = FusedMlp::load(ld, &format!("{p}.mlp"), a.hidden_size, a.intermediate_size)?;
            let n = |name: &str| RmsNorm::load(ld, &format!("{p}.{name}"), a.hidden_size, a.rms_norm_eps);
            // GLM's names, in the sandwich's order: input, after attention, before and after the MLP
            let norms = [
                n("input_layernorm")?,
                n("post_self_attn_layernorm")?,
                n("post_attention_layernorm")?,
                n("post_mlp_layernorm")?,
            ];
            Ok(SandwichBlock::layer(attn, mlp, norms))
        })
        .collect::<Result<Vec<_>>>()?;
    let ctx = Some(args.max_position_embeddings);
    a.decoder(ld, ModelSpec::plain(a.num_hidden_layers, rope, false, ctx), layers)
}
