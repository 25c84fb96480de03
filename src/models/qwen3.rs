//! Qwen3: llama's layers without biases, an explicit `head_dim`, and an RMSNorm over each head
//! of the queries and keys before RoPE. Reads like mlx_lm's `models/qwen3.py`.

use super::attention::{Heads, QkNorms, SelfAttention};
use super::decoder::{BaseArgs, DecoderModel, ModelSpec, PreNormBlock};
use super::llama;
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

/// Qwen3's attention: llama's, bias-free, with an RMSNorm over each head of the queries
/// (`q_norm`) and of the keys (`k_norm`) before RoPE.
pub struct Attention {
    llama: llama::Attention,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
}

impl Attention {
    /// `{p}.{q,k,v,o}_proj` and `{p}.{q,k}_norm` (loaded by `norm`: gemma 3 stores its norms
    /// as offsets from 1).
    pub fn load(
        ld: &Loader,
        p: &str,
        hidden: usize,
        heads: Heads,
        norm: impl Fn(&str) -> Result<RmsNorm>,
    ) -> Result<Self> {
        Ok(Self {
            llama: llama::Attention::load(ld, p, hidden, heads, false, false)?,
            q_norm: norm(&format!("{p}.q_norm"))?,
            k_norm: norm(&format!("{p}.k_norm"))?,
        })
    }

    /// From llama's attention and the two norms (LFM2 names them `q_layernorm`, `k_layernorm`).
    pub fn new(llama: llama::Attention, q_norm: RmsNorm, k_norm: RmsNorm) -> Self {
        Self { llama, q_norm, k_norm }
    }

    /// The same attention with RoPE (`true`) or without it (EXAONE 4's global layers).
    pub fn with_rope(self, use_rope: bool) -> Self {
        Self { llama: self.llama.with_rope(use_rope), ..self }
    }
}

impl SelfAttention for Attention {
    fn forward(&self, x: &Normed, rope: &RopeTables, cache: &mut KvCache) -> Result<Tensor> {
        let qkv = self.llama.project(x)?;
        let norms = QkNorms::BeforeRope(&self.q_norm, &self.k_norm);
        self.llama.heads().attend_with(qkv, norms, self.llama.rope(rope), cache)
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
            let norm = |n: &str| RmsNorm::load(ld, n, args.head_dim, a.rms_norm_eps);
            let attn = Attention::load(ld, &format!("{p}.self_attn"), a.hidden_size, heads, norm)?;
            let mlp = Mlp::load(ld, &format!("{p}.mlp"), a.hidden_size, a.intermediate_size, false)?;
            PreNormBlock::load(ld, &p, a.hidden_size, a.rms_norm_eps, attn, mlp)
        })
        .collect::<Result<Vec<_>>>()?;
    a.decoder(ld, ModelSpec::plain(a.num_hidden_layers, rope, args.tie_word_embeddings, Some(ctx)), layers)
}
