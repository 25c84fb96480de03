//! OLMo 2: llama's projections with an RMSNorm over the whole query and key projections (not
//! per head) before RoPE, and norms only after each branch — no norm on a branch's input
//! ([`PostNormBlock`]). Reads like mlx_lm's `models/olmo2.py`, which ignores `layer_types`.

use super::attention::{Heads, SelfAttention};
use super::decoder::{DecoderModel, Layer, ModelSpec, Residual};
use super::llama;
use super::mlp::{DenseMlp, Mlp};
use crate::cache::KvCache;
use crate::io::Weights;
use crate::nn::{Branch, Linear, Loader, Normed, RmsNorm, RopeTables};
use anyhow::Result;
use candle_core::Tensor;
use serde::Deserialize;
use std::sync::Arc;

/// llama's arguments (the same keys and defaults).
#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    #[serde(flatten)]
    pub llama: llama::ModelArgs,
}

pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    llama::sanitize(&args.llama, weights)
}

/// llama's attention with `q_norm` / `k_norm` over the whole query / key projection (OLMo 2,
/// OLMo 3, OLMoE).
pub struct Attention {
    llama: llama::Attention,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
}

impl Attention {
    /// `{p}.{q,k,v,o}_proj` (`bias` on all four) and `{p}.{q,k}_norm`.
    pub fn load(ld: &Loader, p: &str, hidden: usize, heads: Heads, bias: bool, eps: f64) -> Result<Self> {
        let norm = |n: &str, count: usize| RmsNorm::load(ld, &format!("{p}.{n}"), count * heads.head_dim, eps);
        Ok(Self {
            llama: llama::Attention::load(ld, p, hidden, heads, bias, bias)?,
            q_norm: norm("q_norm", heads.n_heads)?,
            k_norm: norm("k_norm", heads.n_kv_heads)?,
        })
    }
}

impl SelfAttention for Attention {
    fn forward(&self, x: &Normed, rope: &RopeTables, cache: &mut KvCache) -> Result<Tensor> {
        let [q, k, v] = self.llama.project(x)?;
        let (q, k) = (self.q_norm.forward(&q)?, self.k_norm.forward(&k)?);
        self.llama.heads().attend([q, k, v], None, rope, cache)
    }

    fn o_proj(&self) -> &Linear {
        self.llama.o_proj()
    }

    fn input_layers(&self) -> Vec<&Linear> {
        self.llama.input_layers()
    }
}

/// A decoder layer with a norm after each branch and none before it (OLMo 2, OLMo 3,
/// EXAONE 4): `h = x + post_attention_layernorm(attn(x))`,
/// `out = h + post_feedforward_layernorm(mlp(h))`.
pub struct PostNormBlock<A, M> {
    self_attn: A,
    mlp: M,
    post_attention_layernorm: RmsNorm,
    post_feedforward_layernorm: RmsNorm,
}

impl<A: SelfAttention + 'static, M: DenseMlp + 'static> PostNormBlock<A, M> {
    /// The layer of prefix `p` around `self_attn` and `mlp`.
    pub fn load(ld: &Loader, p: &str, dim: usize, eps: f64, self_attn: A, mlp: M) -> Result<Arc<dyn Layer>> {
        let norm = |n: &str| RmsNorm::load(ld, &format!("{p}.{n}"), dim, eps);
        Ok(Arc::new(Self {
            self_attn,
            mlp,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            post_feedforward_layernorm: norm("post_feedforward_layernorm")?,
        }))
    }
}

impl<A: SelfAttention, M: DenseMlp> Layer for PostNormBlock<A, M> {
    fn forward<'a>(&'a self, x: Residual<'a>, rope: &RopeTables, cache: &mut KvCache) -> Result<Residual<'a>> {
        let x = x.sum()?;
        let a = self.self_attn.o_proj().forward(&self.self_attn.forward(&Normed::Plain(x.clone()), rope, cache)?)?;
        let h = (x + self.post_attention_layernorm.forward(&a)?)?;
        let m = self.mlp.forward_tensor(&h)?;
        Ok(Residual::plus(h, Branch::Tensor(self.post_feedforward_layernorm.forward(&m)?)))
    }
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    let (la, a) = (&args.llama, &args.llama.base);
    let (hd, ctx) = (la.head_dim(), la.max_position_embeddings);
    let rope = la.rope.rope(hd, la.rope_theta, ctx)?;
    let heads = Heads::new(a.num_attention_heads, la.n_kv_heads(), hd);
    let layers = (0..a.num_hidden_layers)
        .map(|i| {
            let p = format!("model.layers.{i}");
            let attn = Attention::load(
                ld,
                &format!("{p}.self_attn"),
                a.hidden_size,
                heads,
                la.attention_bias,
                a.rms_norm_eps,
            )?;
            let mlp = Mlp::load(ld, &format!("{p}.mlp"), a.hidden_size, a.intermediate_size, la.mlp_bias)?;
            PostNormBlock::load(ld, &p, a.hidden_size, a.rms_norm_eps, attn, mlp)
        })
        .collect::<Result<Vec<_>>>()?;
    a.decoder(ld, ModelSpec::plain(a.num_hidden_layers, rope, la.tie_word_embeddings, ctx), layers)
}
