//! Hunyuan dense (0.5B–7B): llama with biases on all four attention projections
//! (`attention_bias`), a per-head RMSNorm of q and k applied after RoPE (`query_layernorm`,
//! `key_layernorm`), and RoPE at a base raised once by `rope_scaling.alpha`:
//! `θ · α^(d / (d − 2))` (mlx_lm's DynamicNTKAlphaRoPE, which does not depend on the
//! sequence length). Reads like mlx_lm's `models/hunyuan_v1_dense.py`.

use super::attention::{Heads, QkNorms, SelfAttention};
use super::decoder::{BaseArgs, DecoderModel, ModelSpec, PreNormBlock};
use super::llama;
use super::mlp::Mlp;
use crate::cache::KvCache;
use crate::io::Weights;
use crate::nn::{Linear, Loader, Normed, RmsNorm, Rope, RopeTables};
use anyhow::{bail, Result};
use candle_core::Tensor;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    #[serde(flatten)]
    pub base: BaseArgs,
    pub num_key_value_heads: usize,
    #[serde(default = "super::num::<10000>")]
    pub rope_theta: f64,
    #[serde(default = "super::count::<32768>")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "super::yes")]
    pub use_qk_norm: bool,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub head_dim: Option<usize>,
}

impl ModelArgs {
    /// `rope_scaling.alpha` (1 without scaling); mlx_lm wants `alpha`, `factor` and `type`.
    fn alpha(&self) -> Result<f64> {
        let Some(s) = self.rope_scaling.as_ref().filter(|s| s.as_object().is_some_and(|o| !o.is_empty())) else {
            return Ok(1.0);
        };
        if ["alpha", "factor", "type"].iter().any(|k| s.get(k).is_none()) {
            bail!("config.json: rope_scaling must have `alpha`, `factor` and `type`");
        }
        s["alpha"].as_f64().ok_or_else(|| anyhow::anyhow!("config.json: rope_scaling.alpha must be a number"))
    }
}

pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    super::drop_unused(weights, args.tie_word_embeddings);
    Ok(())
}

/// llama's attention with per-head q/k norms after RoPE.
struct Attention {
    llama: llama::Attention,
    qk_norms: Option<(RmsNorm, RmsNorm)>,
}

impl SelfAttention for Attention {
    fn forward(&self, x: &Normed, rope: &RopeTables, cache: &mut KvCache) -> Result<Tensor> {
        let norms = match &self.qk_norms {
            Some((q, k)) => QkNorms::AfterRope(q, k),
            None => QkNorms::None,
        };
        self.llama.heads().attend_with(self.llama.project(x)?, norms, Some(rope), cache)
    }

    fn o_proj(&self) -> &Linear {
        self.llama.o_proj()
    }

    fn input_layers(&self) -> Vec<&Linear> {
        self.llama.input_layers()
    }
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    let a = &args.base;
    let hd = args.head_dim.unwrap_or(a.hidden_size / a.num_attention_heads);
    let base = args.rope_theta * args.alpha()?.powf(hd as f64 / (hd as f64 - 2.0));
    let rope = Rope::from_config(hd, base, false, None, None)?;
    let heads = Heads::new(a.num_attention_heads, args.num_key_value_heads, hd);
    let layers = (0..a.num_hidden_layers)
        .map(|i| {
            let p = format!("model.layers.{i}");
            let pa = format!("{p}.self_attn");
            let norm = |n: &str| RmsNorm::load(ld, &format!("{pa}.{n}"), hd, a.rms_norm_eps);
            let bias = args.attention_bias;
            let attn = Attention {
                llama: llama::Attention::load(ld, &pa, a.hidden_size, heads, bias, bias)?,
                qk_norms: if args.use_qk_norm {
                    Some((norm("query_layernorm")?, norm("key_layernorm")?))
                } else {
                    None
                },
            };
            let mlp = Mlp::load(ld, &format!("{p}.mlp"), a.hidden_size, a.intermediate_size, false)?;
            PreNormBlock::load(ld, &p, a.hidden_size, a.rms_norm_eps, attn, mlp)
        })
        .collect::<Result<Vec<_>>>()?;
    let ctx = Some(args.max_position_embeddings);
    a.decoder(ld, ModelSpec::plain(a.num_hidden_layers, rope, args.tie_word_embeddings, ctx), layers)
}
