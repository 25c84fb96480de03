//! Gemma 2: four RMSNorms per layer (stored as offsets from 1), GELU-gated MLP, embeddings
//! scaled by sqrt(hidden_size) and tied to the head, attention scores and final logits
//! soft-capped, queries scaled by `query_pre_attn_scalar`. Like mlx_lm's `models/gemma2.py`,
//! every layer attends to the whole context.

use super::attention::{Heads, SelfAttention};
use super::decoder::{BaseArgs, DecoderModel, Layer, ModelSpec, Residual, RopeArgs};
use super::llama::Attention;
use super::mlp::{DenseMlp, Mlp};
use crate::cache::KvCache;
use crate::io::Weights;
use crate::nn::{Branch, Linear, Loader, Normed, RmsNorm, RopeTables};
use anyhow::Result;
use candle_core::Tensor;
use serde::Deserialize;
use std::sync::Arc;

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

/// Gemma's norms store their scale as an offset from 1.
pub fn norm(ld: &Loader, name: &str, dim: usize, eps: f64) -> Result<RmsNorm> {
    RmsNorm::load_shifted(ld, name, dim, eps, 1.0)
}

/// Gemma's MLP: llama's projections with GELU (its tanh approximation) in place of SiLU,
/// `down(gelu(gate(x)) · up(x))`.
pub struct GeluMlp(Mlp);

impl DenseMlp for GeluMlp {
    fn forward(&self, x: &Normed) -> Result<Tensor> {
        let x = x.tensor()?;
        Ok((self.0.gate_proj.forward(&x)?.gelu()? * self.0.up_proj.forward(&x)?)?)
    }

    fn down_proj(&self) -> &Linear {
        &self.0.down_proj
    }
}

/// A decoder layer with a norm on each side of attention and of the MLP (Gemma, GLM-4):
/// `h = x + post_attention_layernorm(attn(input_layernorm(x)))`,
/// `out = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))`.
pub struct SandwichBlock<A, M> {
    self_attn: A,
    mlp: M,
    /// input, post-attention, pre-feedforward and post-feedforward norms
    norms: [RmsNorm; 4],
}

impl<A: SelfAttention + 'static, M: DenseMlp + 'static> SandwichBlock<A, M> {
    /// The layer around `self_attn` and `mlp` with its four norms in the order of the formula.
    pub fn layer(self_attn: A, mlp: M, norms: [RmsNorm; 4]) -> Arc<dyn Layer> {
        Arc::new(Self { self_attn, mlp, norms })
    }
}

impl<A: SelfAttention + 'static> SandwichBlock<A, GeluMlp> {
    /// Gemma's layer of prefix `p` around `self_attn` and `{p}.mlp`.
    pub fn load(ld: &Loader, p: &str, a: &BaseArgs, self_attn: A) -> Result<Arc<dyn Layer>> {
        let n = |name: &str| norm(ld, &format!("{p}.{name}"), a.hidden_size, a.rms_norm_eps);
        let mlp = GeluMlp(Mlp::load(ld, &format!("{p}.mlp"), a.hidden_size, a.intermediate_size, false)?);
        let names =
            ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"];
        Ok(Self::layer(self_attn, mlp, [n(names[0])?, n(names[1])?, n(names[2])?, n(names[3])?]))
    }
}

impl<A: SelfAttention, M: DenseMlp> Layer for SandwichBlock<A, M> {
    fn forward<'a>(&'a self, x: Residual<'a>, rope: &RopeTables, cache: &mut KvCache) -> Result<Residual<'a>> {
        let [input, post_attn, pre_ff, post_ff] = &self.norms;
        let (x, n) = x.norm(input, &self.self_attn.input_layers())?;
        let a = self.self_attn.o_proj().forward(&self.self_attn.forward(&n, rope, cache)?)?;
        let h = Residual::plus(x, Branch::Tensor(post_attn.forward(&a)?));
        let (h, n) = h.norm(pre_ff, &[])?;
        let m = self.mlp.down_proj().forward(&self.mlp.forward(&n)?)?;
        Ok(Residual::plus(h, Branch::Tensor(post_ff.forward(&m)?)))
    }
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    let a = &args.base;
    let rope_args = RopeArgs { rope_traditional: args.rope_traditional, rope_scaling: None };
    let rope = rope_args.rope(args.head_dim, args.rope_theta, None)?;
    let heads = Heads {
        scale: args.query_pre_attn_scalar.powf(-0.5),
        softcap: Some(args.attn_logit_softcapping),
        ..Heads::new(a.num_attention_heads, args.num_key_value_heads, args.head_dim)
    };
    let layers = (0..a.num_hidden_layers)
        .map(|i| {
            let p = format!("model.layers.{i}");
            // llama's attention, its scores scaled and soft-capped as `heads` says
            let attn = Attention::load(ld, &format!("{p}.self_attn"), a.hidden_size, heads, false, false)?;
            SandwichBlock::load(ld, &p, a, attn)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut spec = ModelSpec::plain(a.num_hidden_layers, rope, true, None);
    spec.norm_shift = 1.0;
    spec.embed_scale = Some((a.hidden_size as f64).sqrt());
    spec.final_softcap = Some(args.final_logit_softcapping);
    a.decoder(ld, spec, layers)
}
