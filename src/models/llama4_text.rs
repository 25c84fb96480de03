//! Llama 4's dense text stack (`llama4_text`, mlx_lm's `models/llama4_text.py`): Llama 4's
//! attention without chunking or temperature tuning — RoPE (traditional, unscaled) only in the
//! layers `no_rope_layers` marks, a weightless q/k RMSNorm before it — a SwiGLU MLP of
//! `intermediate_size_mlp`, and an untied head named `output`.

use super::attention::Heads;
use super::decoder::{BaseArgs, DecoderModel, ModelSpec, PreNormBlock};
use super::llama;
use super::llama4::{Attention, QkNorm};
use super::mlp::Mlp;
use crate::io::Weights;
use crate::nn::{Loader, Rope};
use anyhow::{bail, Result};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    pub num_hidden_layers: usize,
    pub vocab_size: usize,
    pub intermediate_size: usize,
    pub intermediate_size_mlp: usize,
    pub num_key_value_heads: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub head_dim: usize,
    pub tie_word_embeddings: bool,
    /// per layer, whether it uses RoPE (Hugging Face's meaning: 0 is a NoPE layer)
    pub no_rope_layers: Vec<u32>,
    pub use_qk_norm: bool,
}

pub fn sanitize(_args: &ModelArgs, _weights: &mut Weights) -> Result<()> {
    Ok(())
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    let (dim, n) = (args.hidden_size, args.num_hidden_layers);
    if args.no_rope_layers.len() < n {
        bail!("config.json: no_rope_layers has {} entries for {n} layers", args.no_rope_layers.len());
    }
    let heads = Heads::new(args.num_attention_heads, args.num_key_value_heads, args.head_dim);
    let rope = Rope::from_config(args.head_dim, args.rope_theta, true, None, None)?;
    let layers = (0..n)
        .map(|l| {
            let p = format!("model.layers.{l}");
            let attn = Attention {
                llama: llama::Attention::load(ld, &format!("{p}.self_attn"), dim, heads, false, false)?,
                use_rope: args.no_rope_layers[l] != 0,
                qk_norm: if args.use_qk_norm { QkNorm::BeforeRope(args.rms_norm_eps) } else { QkNorm::None },
                chunk: None,
                temperature: None,
            };
            let mlp = Mlp::load(ld, &format!("{p}.feed_forward"), dim, args.intermediate_size_mlp, false)?;
            PreNormBlock::load(ld, &p, dim, args.rms_norm_eps, attn, mlp)
        })
        .collect::<Result<Vec<_>>>()?;
    let base = BaseArgs {
        hidden_size: dim,
        num_hidden_layers: n,
        intermediate_size: args.intermediate_size,
        num_attention_heads: args.num_attention_heads,
        rms_norm_eps: args.rms_norm_eps,
        vocab_size: args.vocab_size,
    };
    let mut spec = ModelSpec::plain(n, rope, args.tie_word_embeddings, None);
    spec.head = "output";
    base.decoder(ld, spec, layers)
}
