//! Qwen3: llama's layers without biases, an explicit `head_dim`, and an RMSNorm over each head
//! of the queries and keys before RoPE. Reads like mlx_lm's `models/qwen3.py`.

use super::attention::{qkv, Heads, SelfAttention};
use super::decoder::{BaseArgs, DecoderModel, ModelSpec, PreNormBlock};
use super::mlp::Mlp;
use crate::cache::KvCache;
use crate::io::Weights;
use crate::nn::{Linear, Loader, Normed, RmsNorm, Rope, RopeTables};
use anyhow::{Context, Result};
use candle_core::Tensor;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    #[serde(flatten)]
    pub base: BaseArgs,
    pub num_key_value_heads: usize,
    pub max_position_embeddings: usize,
    pub head_dim: usize,
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers >= 5 nests rope_theta and the scaling here
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
}

pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    super::drop_unused(weights, args.tie_word_embeddings);
    Ok(())
}

/// Qwen3's attention: bias-free q/k/v projections, then an RMSNorm over each head of the
/// queries (`q_norm`) and of the keys (`k_norm`) before RoPE.
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    heads: Heads,
}

impl Attention {
    fn load(ld: &Loader, p: &str, hidden: usize, heads: Heads, eps: f64) -> Result<Self> {
        let [q_proj, k_proj, v_proj] = heads.load_qkv(ld, p, hidden, false)?;
        let norm = |n: &str| RmsNorm::load(ld, &format!("{p}.{n}"), heads.head_dim, eps);
        Ok(Self {
            q_proj,
            k_proj,
            v_proj,
            o_proj: heads.load_out(ld, p, "o_proj", hidden, false)?,
            q_norm: norm("q_norm")?,
            k_norm: norm("k_norm")?,
            heads,
        })
    }
}

impl SelfAttention for Attention {
    fn forward(&self, x: &Normed, rope: &RopeTables, cache: &mut KvCache) -> Result<Tensor> {
        let qkv = qkv(x, &self.q_proj, &self.k_proj, &self.v_proj)?;
        self.heads.attend(qkv, Some((&self.q_norm, &self.k_norm)), rope, cache)
    }

    fn o_proj(&self) -> &Linear {
        &self.o_proj
    }

    fn input_layers(&self) -> Vec<&Linear> {
        vec![&self.q_proj, &self.k_proj, &self.v_proj]
    }
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    let a = &args.base;
    let params = args.rope_parameters.as_ref();
    let theta = args
        .rope_theta
        .or_else(|| params.and_then(|p| p.get("rope_theta")).and_then(|t| t.as_f64()))
        .context("config.json: `rope_theta` is missing (neither at the top level nor in `rope_parameters`)")?;
    let scaling = args.rope_scaling.as_ref().or(params);
    let ctx = args.max_position_embeddings;
    let rope = Rope::from_config(args.head_dim, theta, false, scaling, Some(ctx))?;
    let heads = Heads::new(a.num_attention_heads, args.num_key_value_heads, args.head_dim);
    let layers = (0..a.num_hidden_layers)
        .map(|i| {
            let p = format!("model.layers.{i}");
            let attn = Attention::load(ld, &format!("{p}.self_attn"), a.hidden_size, heads, a.rms_norm_eps)?;
            let mlp = Mlp::load(ld, &format!("{p}.mlp"), a.hidden_size, a.intermediate_size, false)?;
            PreNormBlock::load(ld, &p, a.hidden_size, a.rms_norm_eps, attn, mlp)
        })
        .collect::<Result<Vec<_>>>()?;
    a.decoder(ld, ModelSpec::plain(a.num_hidden_layers, rope, args.tie_word_embeddings, Some(ctx)), layers)
}
