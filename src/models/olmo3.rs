//! OLMo 3: OLMo 2's layers (post-norms, q/k norms over the whole projections; no MLP biases)
//! with sliding-window layers as `layer_types` names them (by default three in four): those
//! attend to the last `sliding_window` positions with plain RoPE at `rope_theta`, the full
//! layers with `rope_scaling` applied. Reads like mlx_lm's `models/olmo3.py`.

use super::attention::Heads;
use super::decoder::{BaseArgs, DecoderModel, ModelSpec, RopeArgs};
use super::mlp::Mlp;
use super::olmo2::{Attention, PostNormBlock};
use crate::io::Weights;
use crate::nn::Loader;
use anyhow::Result;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    #[serde(flatten)]
    pub base: BaseArgs,
    pub max_position_embeddings: usize,
    pub sliding_window: usize,
    pub rope_theta: f64,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

impl ModelArgs {
    /// Whether each layer slides: `layer_types`, or three sliding layers then a full one.
    fn sliding(&self) -> Result<Vec<bool>> {
        let n = self.base.num_hidden_layers;
        match &self.layer_types {
            Some(types) => super::llama::sliding_layers(types, n),
            None => Ok((0..n).map(|i| (i + 1) % 4 != 0).collect()),
        }
    }
}

pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    super::drop_unused(weights, args.tie_word_embeddings);
    Ok(())
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    let a = &args.base;
    let hd = args.head_dim.unwrap_or(a.hidden_size / a.num_attention_heads);
    let ctx = args.max_position_embeddings;
    let full = RopeArgs { rope_traditional: false, rope_scaling: args.rope_scaling.clone() }.rope(
        hd,
        args.rope_theta,
        Some(ctx),
    )?;
    let local = RopeArgs::default().rope(hd, args.rope_theta, None)?;
    let heads = Heads::new(a.num_attention_heads, args.num_key_value_heads.unwrap_or(a.num_attention_heads), hd);
    let layers = (0..a.num_hidden_layers)
        .map(|i| {
            let p = format!("model.layers.{i}");
            let bias = args.attention_bias;
            let attn = Attention::load(ld, &format!("{p}.self_attn"), a.hidden_size, heads, bias, a.rms_norm_eps)?;
            let mlp = Mlp::load(ld, &format!("{p}.mlp"), a.hidden_size, a.intermediate_size, false)?;
            PostNormBlock::load(ld, &p, a.hidden_size, a.rms_norm_eps, attn, mlp)
        })
        .collect::<Result<Vec<_>>>()?;
    let sliding = args.sliding()?;
    let mut spec = ModelSpec::plain(a.num_hidden_layers, full, args.tie_word_embeddings, Some(ctx));
    spec.ropes.push(local);
    spec.layer_rope = sliding.iter().map(|&s| usize::from(s)).collect();
    spec.windows = sliding.iter().map(|&s| s.then_some(args.sliding_window)).collect();
    a.decoder(ld, spec, layers)
}
