//! Apertus (Swiss AI): llama's pre-norm layers under other norm names (`attention_layernorm`,
//! `feedforward_layernorm`), qwen3's per-head q/k norms, no attention biases, and an ungated MLP
//! with the xIELU activation, `down(xielu(up(x)))`, whose four scalars each layer learns.
//! Reads like mlx_lm's `models/apertus.py`.

use super::attention::Heads;
use super::decoder::{BaseArgs, DecoderModel, ModelSpec, PreNormBlock, RopeArgs};
use super::mlp::DenseMlp;
use super::qwen3::Attention;
use crate::io::Weights;
use crate::nn::{Linear, Loader, Normed, RmsNorm};
use anyhow::{bail, Result};
use candle_core::Tensor;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    #[serde(flatten)]
    pub base: BaseArgs,
    pub num_key_value_heads: usize,
    pub mlp_bias: bool,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    #[serde(flatten)]
    pub rope: RopeArgs,
}

pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    super::drop_unused(weights, args.tie_word_embeddings);
    Ok(())
}

/// xIELU with its learned scalars: `ap·x² + β·x` for `x > 0`, else
/// `(expm1(min(x, ε)) − x)·an + β·x`, where `ap = softplus(α_p)` and `an = β + softplus(α_n)`.
struct XieLu {
    ap: f64,
    an: f64,
    beta: f64,
    eps: f64,
}

impl XieLu {
    /// `{p}.alpha_p`, `{p}.alpha_n`, `{p}.beta`, `{p}.eps`: scalars (Hugging Face stores the
    /// alphas with shape [1]).
    fn load(ld: &Loader, p: &str) -> Result<Self> {
        let scalar = |n: &str| -> Result<f64> {
            let name = format!("{p}.{n}");
            let shape = ld.weights.shape(&name)?;
            if shape.iter().product::<usize>() != 1 || shape.len() > 1 {
                bail!("tensor `{name}` has shape {shape:?}; expected a scalar");
            }
            let t = ld.weights.get(&name, &shape, candle_core::DType::F32, &candle_core::Device::Cpu)?;
            Ok(t.flatten_all()?.to_vec1::<f32>()?[0] as f64)
        };
        let softplus = |t: f64| t.exp().ln_1p();
        let beta = scalar("beta")?;
        Ok(Self {
            ap: softplus(scalar("alpha_p")?),
            an: beta + softplus(scalar("alpha_n")?),
            beta,
            eps: scalar("eps")?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let linear = (x * self.beta)?;
        let pos = ((x.sqr()? * self.ap)? + &linear)?;
        let neg = (((x.minimum(self.eps)?.exp()? - 1.0)? - x)? * self.an)?;
        Ok(x.gt(0.0)?.where_cond(&pos, &(neg + linear)?)?)
    }
}

/// Apertus's MLP: `down(xielu(up(x)))`.
struct Mlp {
    up_proj: Linear,
    down_proj: Linear,
    act_fn: XieLu,
}

impl DenseMlp for Mlp {
    fn forward(&self, x: &Normed) -> Result<Tensor> {
        self.act_fn.forward(&self.up_proj.forward(&x.tensor()?)?)
    }

    fn down_proj(&self) -> &Linear {
        &self.down_proj
    }
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    let a = &args.base;
    let (dim, hidden, eps) = (a.hidden_size, a.intermediate_size, a.rms_norm_eps);
    let hd = dim / a.num_attention_heads;
    let ctx = Some(args.max_position_embeddings);
    let rope = args.rope.rope(hd, args.rope_theta, ctx)?;
    let heads = Heads::new(a.num_attention_heads, args.num_key_value_heads, hd);
    let layers = (0..a.num_hidden_layers)
        .map(|i| {
            let p = format!("model.layers.{i}");
            let norm = |n: &str, d: usize| RmsNorm::load(ld, n, d, eps);
            let attn = Attention::load(ld, &format!("{p}.self_attn"), dim, heads, |n| norm(n, hd))?;
            let lin = |n: &str, i: usize, o: usize| Linear::load(ld, &format!("{p}.mlp.{n}"), i, o, args.mlp_bias);
            let mlp = Mlp {
                up_proj: lin("up_proj", dim, hidden)?,
                down_proj: lin("down_proj", hidden, dim)?,
                act_fn: XieLu::load(ld, &format!("{p}.mlp.act_fn"))?,
            };
            let layer = PreNormBlock {
                self_attn: attn,
                mlp,
                input_layernorm: norm(&format!("{p}.attention_layernorm"), dim)?,
                post_attention_layernorm: norm(&format!("{p}.feedforward_layernorm"), dim)?,
            };
            Ok(std::sync::Arc::new(layer) as std::sync::Arc<dyn super::decoder::Layer>)
        })
        .collect::<Result<Vec<_>>>()?;
    a.decoder(ld, ModelSpec::plain(a.num_hidden_layers, rope, args.tie_word_embeddings, ctx), layers)
}
