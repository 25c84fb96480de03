//! Phi-2 (`phi`): one LayerNorm feeds attention and the MLP in parallel
//! (`x + attn(n(x)) + mlp(n(x))`), RoPE over `partial_rotary_factor` of each head, biases on
//! every projection (the output one is `dense`), an ungated GELU MLP (`fc1`, `fc2`), a final
//! LayerNorm and a biased head. Reads like mlx_lm's `models/phi.py`.

use super::blocks::{Act, Attention, AttentionSpec, BaseArgs, DecoderModel, Layer, Mlp, MlpSpec, ModelSpec, NormSpec};
use crate::cache::KvCache;
use crate::io::Weights;
use crate::nn::{LayerNorm, Loader, Rope, RopeTables};
use anyhow::Result;
use candle_core::Tensor;
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

struct PhiLayer {
    input_layernorm: LayerNorm,
    self_attn: Attention,
    mlp: Mlp,
}

impl Layer for PhiLayer {
    fn forward(&self, x: &Tensor, rope: &RopeTables, cache: &mut KvCache) -> Result<Tensor> {
        let h = self.input_layernorm.forward(x)?;
        let attn = self.self_attn.forward(&h, rope, cache)?;
        Ok(((attn + self.mlp.forward(&h)?)? + x)?)
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
    let head_dim = args.hidden_size / args.num_attention_heads;
    let attn = AttentionSpec {
        qkv_bias: true,
        o_bias: true,
        o_name: "dense",
        ..base.attention(args.num_key_value_heads.unwrap_or(args.num_attention_heads), head_dim)
    };
    let mlp = MlpSpec { bias: true, gated: false, act: Act::GeluApprox, ..base.mlp() };
    let no_norm = NormSpec { eps: args.layer_norm_eps, shift: 0.0 };
    let layers = (0..args.num_hidden_layers)
        .map(|i| {
            let p = format!("model.layers.{i}");
            let layer = PhiLayer {
                input_layernorm: LayerNorm::load(
                    ld,
                    &format!("{p}.input_layernorm"),
                    args.hidden_size,
                    args.layer_norm_eps,
                )?,
                self_attn: Attention::load(&attn, no_norm, ld, &format!("{p}.self_attn"))?,
                mlp: Mlp::load(ld, &format!("{p}.mlp"), args.hidden_size, &mlp)?,
            };
            Ok(std::sync::Arc::new(layer) as std::sync::Arc<dyn Layer>)
        })
        .collect::<Result<Vec<_>>>()?;
    let rope =
        Rope::from_config((args.partial_rotary_factor * head_dim as f64) as usize, args.rope_theta, false, None, None)?;
    let ctx = Some(args.max_position_embeddings);
    let mut spec = ModelSpec::plain(args.num_hidden_layers, rope, false, ctx);
    spec.final_layernorm = true;
    spec.lm_head_bias = true;
    base.build_with(ld, spec, layers)
}
