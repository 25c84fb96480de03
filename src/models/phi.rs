//! Phi-2 (`phi`): one LayerNorm feeds attention and the MLP in parallel
//! (`x + attn(n(x)) + mlp(n(x))`), RoPE over `partial_rotary_factor` of each head, biases on
//! every projection (the output one is `dense`), an ungated GELU MLP (`fc1`, `fc2`), a final
//! LayerNorm and a biased head. Reads like mlx_lm's `models/phi.py`.

use super::attention::{Heads, SelfAttention};
use super::decoder::{BaseArgs, DecoderModel, Layer, ModelSpec, Residual};
use super::llama::Attention;
use super::mlp::{Activation, DenseMlp, UngatedMlp};
use crate::cache::KvCache;
use crate::io::Weights;
use crate::nn::{LayerNorm, Loader, Normed, Rope, RopeTables};
use anyhow::Result;
use serde::Deserialize;

/// mlx_lm's defaults are Phi-2's sizes.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    #[serde(default = "super::count::<2048>")]
    pub max_position_embeddings: usize,
    #[serde(default = "super::count::<51200>")]
    pub vocab_size: usize,
    #[serde(default = "super::count::<2560>")]
    pub hidden_size: usize,
    #[serde(default = "super::count::<32>")]
    pub num_attention_heads: usize,
    #[serde(default = "super::count::<32>")]
    pub num_hidden_layers: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "default_partial_rotary_factor")]
    pub partial_rotary_factor: f64,
    #[serde(default = "super::count::<10240>")]
    pub intermediate_size: usize,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "super::num::<10000>")]
    pub rope_theta: f64,
}

fn default_partial_rotary_factor() -> f64 {
    0.4
}
fn default_layer_norm_eps() -> f64 {
    1e-5
}

pub fn sanitize(_args: &ModelArgs, _weights: &mut Weights) -> Result<()> {
    Ok(())
}

/// A decoder layer running attention and the MLP in parallel on one LayerNorm (Phi-2,
/// Cohere): `out = x + attn(n) + mlp(n)` with `n = input_layernorm(x)`.
pub struct ParallelBlock<A, M> {
    pub input_layernorm: LayerNorm,
    pub self_attn: A,
    pub mlp: M,
}

impl<A: SelfAttention, M: DenseMlp> Layer for ParallelBlock<A, M> {
    fn forward<'a>(&'a self, x: Residual<'a>, rope: &RopeTables, cache: &mut KvCache) -> Result<Residual<'a>> {
        let x = x.sum()?;
        let n = Normed::Plain(self.input_layernorm.forward(&x)?);
        let attn = self.self_attn.o_proj().forward(&self.self_attn.forward(&n, rope, cache)?)?;
        let mlp = self.mlp.down_proj().forward(&self.mlp.forward(&n)?)?;
        Ok(Residual::new(((attn + mlp)? + x)?))
    }
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    let base = BaseArgs {
        hidden_size: args.hidden_size,
        num_hidden_layers: args.num_hidden_layers,
        intermediate_size: args.intermediate_size,
        num_attention_heads: args.num_attention_heads,
        rms_norm_eps: args.layer_norm_eps,
        vocab_size: args.vocab_size,
    };
    let (dim, hidden) = (args.hidden_size, args.intermediate_size);
    let head_dim = dim / args.num_attention_heads;
    let heads =
        Heads::new(args.num_attention_heads, args.num_key_value_heads.unwrap_or(args.num_attention_heads), head_dim);
    let layers = (0..args.num_hidden_layers)
        .map(|i| {
            let p = format!("model.layers.{i}");
            let (pa, pm) = (format!("{p}.self_attn"), format!("{p}.mlp"));
            let layer = ParallelBlock {
                input_layernorm: LayerNorm::load(ld, &format!("{p}.input_layernorm"), dim, args.layer_norm_eps)?,
                // llama's attention with biases everywhere, the output projection named `dense`
                self_attn: Attention::new(
                    heads.load_qkv(ld, &pa, dim, true)?,
                    heads.load_out(ld, &pa, "dense", dim, true)?,
                    heads,
                ),
                mlp: UngatedMlp::load(ld, &pm, ["fc1", "fc2"], dim, hidden, true, Activation::Gelu)?,
            };
            Ok(std::sync::Arc::new(layer) as std::sync::Arc<dyn Layer>)
        })
        .collect::<Result<Vec<_>>>()?;
    let rope =
        Rope::from_config((args.partial_rotary_factor * head_dim as f64) as usize, args.rope_theta, false, None, None)?;
    let ctx = Some(args.max_position_embeddings);
    let mut spec = ModelSpec::plain(args.num_hidden_layers, rope, false, ctx);
    spec.final_layernorm = Some(("model.final_layernorm", true));
    spec.lm_head_bias = true;
    base.decoder(ld, spec, layers)
}
