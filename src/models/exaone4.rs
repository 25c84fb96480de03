//! EXAONE 4 (LG): OLMo 2's post-norm layers with qwen3's per-head q/k norms and no biases; the
//! string `sliding_window_pattern` (e.g. `LLLG`, repeated over the layers) makes each layer
//! local (`L`: RoPE, a window of `sliding_window` positions) or global (`G`: full attention
//! without RoPE). Without a pattern every layer is global with RoPE. Reads like mlx_lm's
//! `models/exaone4.py`.

use super::attention::Heads;
use super::decoder::{BaseArgs, DecoderModel, ModelSpec, RopeArgs};
use super::mlp::Mlp;
use super::olmo2::PostNormBlock;
use super::qwen3::Attention;
use crate::io::Weights;
use crate::nn::{Loader, RmsNorm};
use anyhow::{bail, Result};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    #[serde(flatten)]
    pub base: BaseArgs,
    pub num_key_value_heads: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub head_dim: usize,
    pub tie_word_embeddings: bool,
    pub rope_scaling: Option<serde_json::Value>,
    pub sliding_window: Option<usize>,
    pub sliding_window_pattern: Option<String>,
}

impl ModelArgs {
    /// Whether each layer is local (RoPE and a window).
    fn local(&self) -> Result<Vec<bool>> {
        let n = self.base.num_hidden_layers;
        let Some(pattern) = &self.sliding_window_pattern else { return Ok(vec![false; n]) };
        let p: Vec<char> = pattern.chars().collect();
        if p.is_empty() || p.iter().any(|c| !matches!(c, 'L' | 'G')) {
            bail!("config.json: sliding_window_pattern = {pattern:?}; expected a string of `L` and `G`");
        }
        if self.sliding_window.is_none() && p.contains(&'L') {
            bail!("config.json: sliding_window_pattern has local layers but `sliding_window` is missing");
        }
        Ok((0..n).map(|i| p[i % p.len()] == 'L').collect())
    }
}

pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    super::drop_unused(weights, args.tie_word_embeddings);
    Ok(())
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    let a = &args.base;
    let (hd, ctx) = (args.head_dim, args.max_position_embeddings);
    let rope = RopeArgs { rope_traditional: false, rope_scaling: args.rope_scaling.clone() }.rope(
        hd,
        args.rope_theta,
        Some(ctx),
    )?;
    let heads = Heads::new(a.num_attention_heads, args.num_key_value_heads, hd);
    let local = args.local()?;
    let patterned = args.sliding_window_pattern.is_some();
    let layers = (0..a.num_hidden_layers)
        .map(|i| {
            let p = format!("model.layers.{i}");
            let norm = |n: &str| RmsNorm::load(ld, n, hd, a.rms_norm_eps);
            let attn = Attention::load(ld, &format!("{p}.self_attn"), a.hidden_size, heads, norm)?
                .with_rope(local[i] || !patterned);
            let mlp = Mlp::load(ld, &format!("{p}.mlp"), a.hidden_size, a.intermediate_size, false)?;
            PostNormBlock::load(ld, &p, a.hidden_size, a.rms_norm_eps, attn, mlp)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut spec = ModelSpec::plain(a.num_hidden_layers, rope, args.tie_word_embeddings, Some(ctx));
    spec.windows = local.iter().map(|&l| if l { args.sliding_window } else { None }).collect();
    a.decoder(ld, spec, layers)
}
