//! SmolLM3: llama with NoPE layers — every `no_rope_layer_interval`-th layer (or those
//! `no_rope_layers` marks 0) attends without RoPE. Reads like mlx_lm's `models/smollm3.py`, a
//! llama whose NoPE layers' RoPE is a no-op.

use super::attention::Heads;
use super::decoder::{DecoderModel, ModelSpec, PreNormBlock};
use super::llama;
use super::mlp::Mlp;
use crate::io::Weights;
use crate::nn::Loader;
use anyhow::{bail, Result};
use serde::Deserialize;

/// llama's arguments and which layers use RoPE.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    #[serde(flatten)]
    pub llama: llama::ModelArgs,
    #[serde(default = "super::count::<4>")]
    pub no_rope_layer_interval: usize,
    /// per layer, 1 where it uses RoPE, 0 for a NoPE layer
    #[serde(default)]
    pub no_rope_layers: Option<Vec<u32>>,
}

impl ModelArgs {
    fn uses_rope(&self) -> Result<Vec<bool>> {
        let n = self.llama.base.num_hidden_layers;
        match &self.no_rope_layers {
            Some(v) if v.len() != n => bail!("config.json: no_rope_layers has {} entries for {n} layers", v.len()),
            Some(v) => Ok(v.iter().map(|&u| u != 0).collect()),
            None => Ok((0..n).map(|i| !(i + 1).is_multiple_of(self.no_rope_layer_interval.max(1))).collect()),
        }
    }
}

pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    llama::sanitize(&args.llama, weights)
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    let (la, a) = (&args.llama, &args.llama.base);
    let (hd, ctx) = (la.head_dim(), la.max_position_embeddings);
    let rope = la.rope.rope(hd, la.rope_theta, ctx)?;
    let heads = Heads::new(a.num_attention_heads, la.n_kv_heads(), hd);
    let rope_layers = args.uses_rope()?;
    let layers = (0..a.num_hidden_layers)
        .map(|i| {
            let p = format!("model.layers.{i}");
            let bias = la.attention_bias;
            let attn = llama::Attention::load(ld, &format!("{p}.self_attn"), a.hidden_size, heads, bias, bias)?
                .with_rope(rope_layers[i]);
            let mlp = Mlp::load(ld, &format!("{p}.mlp"), a.hidden_size, a.intermediate_size, la.mlp_bias)?;
            PreNormBlock::load(ld, &p, a.hidden_size, a.rms_norm_eps, attn, mlp)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut spec = ModelSpec::plain(a.num_hidden_layers, rope, la.tie_word_embeddings, ctx);
    spec.windows = la.windows()?;
    a.decoder(ld, spec, layers)
}
