//! InternLM3: llama under other config names — `qkv_bias` puts biases on q, k, v and the
//! output projection, `bias` on the MLP; `head_dim = hidden / heads`; RoPE scaling `linear` or
//! `dynamic` only. Reads like mlx_lm's `models/internlm3.py`.

use super::attention::Heads;
use super::decoder::{BaseArgs, DecoderModel, ModelSpec, PreNormBlock, RopeArgs};
use super::llama;
use super::mlp::Mlp;
use crate::io::Weights;
use crate::nn::Loader;
use anyhow::{bail, Result};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    #[serde(flatten)]
    pub base: BaseArgs,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub bias: bool,
    #[serde(default)]
    pub qkv_bias: bool,
    #[serde(default = "super::count::<32768>")]
    pub max_position_embeddings: usize,
    #[serde(default = "super::num::<10000>")]
    pub rope_theta: f64,
    #[serde(flatten)]
    pub rope: RopeArgs,
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

impl ModelArgs {
    /// mlx_lm takes `rope_scaling` with both `factor` and `rope_type`, the type linear or dynamic.
    fn check_rope_scaling(&self) -> Result<()> {
        let Some(s) = self.rope.rope_scaling.as_ref().filter(|s| !s.is_null()) else { return Ok(()) };
        if s.get("factor").is_none() || s.get("rope_type").is_none() {
            bail!("config.json: rope_scaling must have `factor` and `rope_type`");
        }
        match s["rope_type"].as_str() {
            Some("linear" | "dynamic") => Ok(()),
            other => bail!("config.json: rope_scaling.rope_type = {other:?}; expected linear or dynamic"),
        }
    }
}

/// Drops precomputed rotary frequencies (`attention.rope.inv_freq`).
pub fn sanitize(_args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    weights.sanitize(|k| (!k.contains("attention.rope.inv_freq")).then(|| k.to_string()));
    Ok(())
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    args.check_rope_scaling()?;
    let a = &args.base;
    let hd = a.hidden_size / a.num_attention_heads;
    let ctx = Some(args.max_position_embeddings);
    let rope = args.rope.rope(hd, args.rope_theta, ctx)?;
    let heads = Heads::new(a.num_attention_heads, args.num_key_value_heads.unwrap_or(a.num_attention_heads), hd);
    let layers = (0..a.num_hidden_layers)
        .map(|i| {
            let p = format!("model.layers.{i}");
            let bias = args.qkv_bias;
            let attn = llama::Attention::load(ld, &format!("{p}.self_attn"), a.hidden_size, heads, bias, bias)?;
            let mlp = Mlp::load(ld, &format!("{p}.mlp"), a.hidden_size, a.intermediate_size, args.bias)?;
            PreNormBlock::load(ld, &p, a.hidden_size, a.rms_norm_eps, attn, mlp)
        })
        .collect::<Result<Vec<_>>>()?;
    a.decoder(ld, ModelSpec::plain(a.num_hidden_layers, rope, args.tie_word_embeddings, ctx), layers)
}
