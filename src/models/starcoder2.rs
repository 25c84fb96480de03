//! StarCoder2: llama's layout with biased LayerNorms, biases on every projection, and an ungated
//! MLP, `c_proj(gelu(c_fc(x)))` with GELU in its exact (erf) form; `head_dim = hidden / heads`.
//! Reads like mlx_lm's `models/starcoder2.py`, which ignores `sliding_window` (every layer
//! attends to the whole context).

use super::attention::{Heads, SelfAttention};
use super::decoder::{BaseArgs, DecoderModel, Layer, ModelSpec, Residual};
use super::llama;
use super::mlp::{Activation, DenseMlp, UngatedMlp};
use crate::cache::KvCache;
use crate::io::Weights;
use crate::nn::{LayerNorm, Loader, Normed, Rope, RopeTables};
use anyhow::Result;
use serde::Deserialize;
use std::sync::Arc;

#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    #[serde(default = "default_eps")]
    pub norm_epsilon: f64,
    #[serde(default = "super::count::<49152>")]
    pub vocab_size: usize,
    #[serde(default = "super::num::<100000>")]
    pub rope_theta: f64,
    #[serde(default = "super::yes")]
    pub tie_word_embeddings: bool,
}

fn default_eps() -> f64 {
    1e-5
}

pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    super::drop_unused(weights, args.tie_word_embeddings);
    Ok(())
}

/// llama's pre-norm layer with LayerNorms: `h = x + attn(input_layernorm(x))`,
/// `out = h + mlp(post_attention_layernorm(h))`.
struct LayerNormBlock {
    self_attn: llama::Attention,
    mlp: UngatedMlp,
    input_layernorm: LayerNorm,
    post_attention_layernorm: LayerNorm,
}

impl Layer for LayerNormBlock {
    fn forward<'a>(&'a self, x: Residual<'a>, rope: &RopeTables, cache: &mut KvCache) -> Result<Residual<'a>> {
        let x = x.sum()?;
        let n = Normed::Plain(self.input_layernorm.forward(&x)?);
        let h = (&x + self.self_attn.o_proj().forward(&self.self_attn.forward(&n, rope, cache)?)?)?;
        let n = Normed::Plain(self.post_attention_layernorm.forward(&h)?);
        Ok(Residual::plus_projection(h, self.mlp.forward(&n)?, self.mlp.down_proj()))
    }
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    let base = BaseArgs {
        hidden_size: args.hidden_size,
        num_hidden_layers: args.num_hidden_layers,
        intermediate_size: args.intermediate_size,
        num_attention_heads: args.num_attention_heads,
        rms_norm_eps: args.norm_epsilon,
        vocab_size: args.vocab_size,
    };
    let (dim, hidden, eps) = (args.hidden_size, args.intermediate_size, args.norm_epsilon);
    let hd = dim / args.num_attention_heads;
    let rope = Rope::from_config(hd, args.rope_theta, false, None, None)?;
    let heads = Heads::new(args.num_attention_heads, args.num_key_value_heads, hd);
    let layers = (0..args.num_hidden_layers)
        .map(|i| {
            let p = format!("model.layers.{i}");
            let norm = |n: &str| LayerNorm::load(ld, &format!("{p}.{n}"), dim, eps);
            let layer = LayerNormBlock {
                self_attn: llama::Attention::load(ld, &format!("{p}.self_attn"), dim, heads, true, true)?,
                mlp: UngatedMlp::load(
                    ld,
                    &format!("{p}.mlp"),
                    ["c_fc", "c_proj"],
                    dim,
                    hidden,
                    true,
                    Activation::GeluErf,
                )?,
                input_layernorm: norm("input_layernorm")?,
                post_attention_layernorm: norm("post_attention_layernorm")?,
            };
            Ok(Arc::new(layer) as Arc<dyn Layer>)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut spec = ModelSpec::plain(args.num_hidden_layers, rope, args.tie_word_embeddings, None);
    spec.final_layernorm = Some(("model.norm", true));
    base.decoder(ld, spec, layers)
}
