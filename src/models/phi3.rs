//! Phi-3: llama's layers with one fused `qkv_proj` and one fused `gate_up_proj`, RoPE over
//! `partial_rotary_factor` of each head, "su"/"longrope" scaling from the top-level
//! `original_max_position_embeddings`. Reads like mlx_lm's `models/phi3.py`.

use super::attention::{Heads, SelfAttention};
use super::decoder::{BaseArgs, DecoderModel, ModelSpec, PreNormBlock, RopeArgs};
use super::mlp::FusedMlp;
use crate::cache::KvCache;
use crate::io::Weights;
use crate::nn::{Linear, Loader, Normed, Rope, RopeTables};
use anyhow::{Context, Result};
use candle_core::Tensor;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    #[serde(flatten)]
    pub base: BaseArgs,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "super::num::<10000>")]
    pub rope_theta: f64,
    #[serde(flatten)]
    pub rope: RopeArgs,
    #[serde(default = "super::num::<1>")]
    pub partial_rotary_factor: f64,
    #[serde(default = "super::count::<131072>")]
    pub max_position_embeddings: usize,
    #[serde(default = "super::count::<4096>")]
    pub original_max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    super::drop_unused(weights, args.tie_word_embeddings);
    Ok(())
}

fn rope(args: &ModelArgs, dims: usize) -> Result<Rope> {
    let scaling = args.rope.rope_scaling.as_ref();
    match scaling.and_then(|s| s.get("type")).and_then(|t| t.as_str()) {
        Some("longrope") | Some("su") => {
            let long = scaling.and_then(|s| s.get("long_factor")).context("rope_scaling needs `long_factor`")?;
            let (max, orig) = (args.max_position_embeddings, args.original_max_position_embeddings);
            Rope::su_scaled(dims, args.rope_theta, max, orig, long, None)
        }
        // mlx_lm keeps linear scaling and drops any other kind (with a warning)
        Some("linear") => args.rope.rope(dims, args.rope_theta, None),
        _ => Rope::from_config(dims, args.rope_theta, args.rope.rope_traditional, None, None),
    }
}

/// Phi-3's attention: one `qkv_proj` for the queries, keys and values, RoPE over
/// `partial_rotary_factor` of each head.
struct Attention {
    qkv_proj: Linear,
    o_proj: Linear,
    heads: Heads,
}

impl SelfAttention for Attention {
    fn forward(&self, x: &Normed, rope: &RopeTables, cache: &mut KvCache) -> Result<Tensor> {
        let qkv = self.heads.split_qkv(&self.qkv_proj.forward(&x.tensor()?)?)?;
        self.heads.attend(qkv, None, rope, cache)
    }

    fn o_proj(&self) -> &Linear {
        &self.o_proj
    }
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    let a = &args.base;
    let (dim, hidden) = (a.hidden_size, a.intermediate_size);
    let head_dim = dim / a.num_attention_heads;
    let rope = rope(args, (head_dim as f64 * args.partial_rotary_factor) as usize)?;
    let heads = Heads::new(a.num_attention_heads, args.num_key_value_heads.unwrap_or(a.num_attention_heads), head_dim);
    let layers = (0..a.num_hidden_layers)
        .map(|i| {
            let p = format!("model.layers.{i}");
            let (pa, pm) = (format!("{p}.self_attn"), format!("{p}.mlp"));
            let qkv_out = (heads.n_heads + 2 * heads.n_kv_heads) * head_dim;
            let attn = Attention {
                qkv_proj: Linear::load(ld, &format!("{pa}.qkv_proj"), dim, qkv_out, false)?,
                o_proj: heads.load_out(ld, &pa, "o_proj", dim, false)?,
                heads,
            };
            let mlp = FusedMlp::load(ld, &pm, dim, hidden)?;
            PreNormBlock::load(ld, &p, dim, a.rms_norm_eps, attn, mlp)
        })
        .collect::<Result<Vec<_>>>()?;
    let ctx = Some(args.max_position_embeddings);
    a.decoder(ld, ModelSpec::plain(a.num_hidden_layers, rope, args.tie_word_embeddings, ctx), layers)
}
