//! Gemma 2: four RMSNorms per layer (stored as offsets from 1), GELU-gated MLP, embeddings
//! scaled by sqrt(hidden_size) and tied to the head, attention scores and final logits
//! soft-capped, queries scaled by `query_pre_attn_scalar`. Like mlx_lm's `models/gemma2.py`,
//! every layer attends to the whole context.

use super::blocks::{Act, BaseArgs, DecoderModel, ModelSpec, RopeArgs};
use crate::io::Weights;
use crate::nn::Loader;
use anyhow::Result;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    #[serde(flatten)]
    pub base: BaseArgs,
    pub head_dim: usize,
    pub num_key_value_heads: usize,
    #[serde(default = "super::num::<10000>")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_traditional: bool,
    #[serde(default = "super::num::<50>")]
    pub attn_logit_softcapping: f64,
    #[serde(default = "super::num::<30>")]
    pub final_logit_softcapping: f64,
    #[serde(default = "super::num::<144>")]
    pub query_pre_attn_scalar: f64,
}

pub fn sanitize(_args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    super::drop_unused(weights, true);
    Ok(())
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    let a = &args.base;
    let rope_args = RopeArgs { rope_traditional: args.rope_traditional, rope_scaling: None };
    let rope = rope_args.rope(args.head_dim, args.rope_theta, None)?;
    let mut attn = a.attention(args.num_key_value_heads, args.head_dim);
    attn.scale = Some(args.query_pre_attn_scalar.powf(-0.5));
    attn.softcap = Some(args.attn_logit_softcapping);
    let mlp = super::blocks::MlpSpec { act: Act::GeluApprox, sandwich: true, ..a.mlp() };
    let mut spec = ModelSpec::plain(a.num_hidden_layers, rope, true, None);
    spec.norm_shift = 1.0;
    spec.embed_scale = Some((a.hidden_size as f64).sqrt());
    spec.final_softcap = Some(args.final_logit_softcapping);
    a.build(ld, &attn, &mlp, spec)
}
