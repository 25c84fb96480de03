//! LFM2 (Liquid): attention layers among gated short-convolution layers. A convolution layer
//! projects its input to (B, C, x), convolves B·x over the last `conv_L_cache` positions
//! (depthwise, causal: the cache keeps the last `conv_L_cache - 1` inputs) and gates the result
//! with C; attention layers have per-head q/k norms before RoPE. Every layer has a SwiGLU MLP
//! (`w1`, `w3`, `w2`); the final norm is `embedding_norm`, and the head is always the tied
//! embedding. Reads like mlx_lm's `models/lfm2.py`.

use super::attention::{Heads, SelfAttention};
use super::decoder::{BaseArgs, DecoderModel, Layer, ModelSpec, PreNormBlock};
use super::mlp::Mlp;
use super::{llama, qwen3};
use crate::cache::KvCache;
use crate::io::Weights;
use crate::nn::{CausalConv1d, Linear, Loader, Normed, RmsNorm, Rope, RopeTables};
use anyhow::{bail, Result};
use candle_core::{Tensor, D};
use serde::Deserialize;
use std::sync::Arc;

#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    pub max_position_embeddings: usize,
    pub norm_eps: f64,
    pub conv_bias: bool,
    #[serde(rename = "conv_L_cache")]
    pub conv_l_cache: usize,
    pub block_dim: usize,
    #[serde(default)]
    pub block_ff_dim: Option<usize>,
    #[serde(default)]
    pub intermediate_size: Option<usize>,
    pub block_multiple_of: usize,
    #[serde(default)]
    pub block_ffn_dim_multiplier: Option<f64>,
    pub block_auto_adjust_ff_dim: bool,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub full_attn_idxs: Option<Vec<usize>>,
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
}

fn default_rope_theta() -> f64 {
    1_000_000.0
}

impl ModelArgs {
    /// Which layers are attention layers: `full_attn_idxs`, else the `full_attention` entries of
    /// `layer_types`.
    pub fn attention_layers(&self) -> Result<Vec<bool>> {
        let n = self.num_hidden_layers;
        let idxs: Vec<usize> = match (&self.full_attn_idxs, &self.layer_types) {
            (Some(i), _) => i.clone(),
            (None, Some(t)) => {
                if t.len() != n {
                    bail!("config.json: layer_types has {} entries for {n} layers", t.len());
                }
                t.iter().enumerate().filter(|(_, t)| *t == "full_attention").map(|(i, _)| i).collect()
            }
            (None, None) => bail!("config.json: neither full_attn_idxs nor layer_types says which layers attend"),
        };
        if let Some(&bad) = idxs.iter().find(|&&i| i >= n) {
            bail!("config.json: full_attn_idxs names layer {bad}, but the model has {n} layers");
        }
        Ok((0..n).map(|i| idxs.contains(&i)).collect())
    }

    /// The MLP's hidden size (mlx_lm's `ff_dim` adjustment).
    pub fn ff_dim(&self) -> Result<usize> {
        let Some(mut ff) = self.block_ff_dim.or(self.intermediate_size) else {
            bail!("config.json: neither block_ff_dim nor intermediate_size is set");
        };
        if self.block_auto_adjust_ff_dim {
            ff = 2 * ff / 3;
            if let Some(m) = self.block_ffn_dim_multiplier {
                ff = (m * ff as f64) as usize;
            }
            ff = ff.div_ceil(self.block_multiple_of.max(1)) * self.block_multiple_of.max(1);
        }
        Ok(ff)
    }

    fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_theta"))
            .and_then(|t| t.as_f64())
            .unwrap_or(self.rope_theta)
    }
}

/// The Hugging Face layout stores a convolution's weight as (channels, 1, kernel); mlx's is
/// (channels, kernel, 1). LFM2 has no separate head.
pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    super::drop_unused(weights, true);
    for l in 0..args.num_hidden_layers {
        let name = format!("model.layers.{l}.conv.conv.weight");
        if weights.contains(&name) {
            let shape = weights.shape(&name)?;
            if shape.len() == 3 && shape[2] > shape[1] {
                weights.transpose(&name, 1, 2)?;
            }
        }
    }
    Ok(())
}

/// The gated short convolution (`ShortConv`): `out_proj(C · conv(B · x))`, `(B, C, x) =
/// in_proj(input)`; its output projection is the block's.
pub struct ShortConv {
    in_proj: Linear,
    conv: CausalConv1d,
    out_proj: Linear,
    hidden: usize,
}

impl ShortConv {
    fn load(ld: &Loader, p: &str, hidden: usize, kernel: usize, bias: bool) -> Result<Self> {
        Ok(Self {
            in_proj: Linear::load(ld, &format!("{p}.in_proj"), hidden, 3 * hidden, bias)?,
            conv: CausalConv1d::load(ld, &format!("{p}.conv"), hidden, kernel, bias)?,
            out_proj: Linear::load(ld, &format!("{p}.out_proj"), hidden, hidden, bias)?,
            hidden,
        })
    }
}

impl SelfAttention for ShortConv {
    fn forward(&self, x: &Normed, _rope: &RopeTables, cache: &mut KvCache) -> Result<Tensor> {
        let bcx = self.in_proj.forward(&x.tensor()?)?;
        let h = self.hidden;
        let (b, c, xx) = (bcx.narrow(D::Minus1, 0, h)?, bcx.narrow(D::Minus1, h, h)?, bcx.narrow(D::Minus1, 2 * h, h)?);
        let bx = cache.zero_padding(&(b * xx)?)?;
        let (conv, state) = self.conv.forward(&bx, cache.array(0))?;
        cache.set_array(0, state)?;
        cache.advance_by(bx.dim(1)?);
        Ok((c * conv)?)
    }

    fn o_proj(&self) -> &Linear {
        &self.out_proj
    }

    fn input_layers(&self) -> Vec<&Linear> {
        vec![&self.in_proj]
    }

    /// Its state is replaced, not written in place, at every step.
    fn graphable(&self) -> bool {
        false
    }
}

/// A layer: its operator (attention or short convolution) and the SwiGLU MLP, each after its
/// RMSNorm (`operator_norm`, `ffn_norm`).
fn block<A: SelfAttention + 'static>(ld: &Loader, p: &str, args: &ModelArgs, op: A) -> Result<Arc<dyn Layer>> {
    let (dim, eps, ff) = (args.hidden_size, args.norm_eps, args.ff_dim()?);
    let lin = |n: &str, i: usize, o: usize| Linear::load(ld, &format!("{p}.feed_forward.{n}"), i, o, false);
    let mlp = Mlp {
        gate_proj: lin("w1", args.block_dim, ff)?,
        up_proj: lin("w3", args.block_dim, ff)?,
        down_proj: lin("w2", ff, args.block_dim)?,
    };
    let norm = |n: &str| RmsNorm::load(ld, &format!("{p}.{n}"), dim, eps);
    Ok(Arc::new(PreNormBlock {
        self_attn: op,
        mlp,
        input_layernorm: norm("operator_norm")?,
        post_attention_layernorm: norm("ffn_norm")?,
    }))
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    let n = args.num_hidden_layers;
    let hd = args.hidden_size / args.num_attention_heads;
    let heads = Heads::new(args.num_attention_heads, args.num_key_value_heads.unwrap_or(args.num_attention_heads), hd);
    let attends = args.attention_layers()?;
    if args.conv_l_cache == 0 {
        bail!("config.json: conv_L_cache is 0; a short convolution needs at least one tap");
    }
    let layers = attends
        .iter()
        .enumerate()
        .map(|(i, &attn)| {
            let p = format!("model.layers.{i}");
            if attn {
                let a = format!("{p}.self_attn");
                let [q, k, v] = heads.load_qkv(ld, &a, args.hidden_size, false)?;
                let o = heads.load_out(ld, &a, "out_proj", args.hidden_size, false)?;
                let norm = |m: &str| RmsNorm::load(ld, &format!("{a}.{m}"), hd, args.norm_eps);
                let attn = qwen3::Attention::new(
                    llama::Attention::new([q, k, v], o, heads),
                    norm("q_layernorm")?,
                    norm("k_layernorm")?,
                );
                block(ld, &p, args, attn)
            } else {
                let conv =
                    ShortConv::load(ld, &format!("{p}.conv"), args.hidden_size, args.conv_l_cache, args.conv_bias)?;
                block(ld, &p, args, conv)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let base = BaseArgs {
        hidden_size: args.hidden_size,
        num_hidden_layers: n,
        intermediate_size: args.ff_dim()?,
        num_attention_heads: args.num_attention_heads,
        rms_norm_eps: args.norm_eps,
        vocab_size: args.vocab_size,
    };
    let rope = Rope::from_config(hd, args.rope_theta(), false, None, None)?;
    let mut spec = ModelSpec::plain(n, rope, true, Some(args.max_position_embeddings));
    spec.final_norm = "model.embedding_norm";
    spec.recurrent = attends.iter().map(|&a| (!a).then_some(1)).collect();
    base.decoder(ld, spec, layers)
}
