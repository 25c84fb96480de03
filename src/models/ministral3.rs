//! Ministral 3 (the text model of Mistral's `mistral3` checkpoints): llama with RoPE from
//! `rope_parameters` (yarn in the releases) and Llama 4's query scaling in every layer: after
//! RoPE the queries at position `p` are multiplied by
//! `1 + β · ln(1 + ⌊p / original_max_position_embeddings⌋)`. Sliding-window layers where
//! `layer_types` says. Reads like mlx_lm's `models/ministral3.py`.

use super::attention::{llama4_query_scale, row_positions, Heads, SelfAttention};
use super::decoder::{DecoderModel, ModelSpec, PreNormBlock};
use super::llama;
use super::mlp::Mlp;
use crate::cache::KvCache;
use crate::io::Weights;
use crate::nn::{Linear, Loader, Normed, Rope, RopeTables};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde::Deserialize;

/// llama's arguments (its `rope_theta` and `rope_scaling` unused) and `rope_parameters`.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    #[serde(flatten)]
    pub llama: llama::ModelArgs,
    pub rope_parameters: serde_json::Value,
}

impl ModelArgs {
    fn rope_parameter(&self, key: &str) -> Result<f64> {
        self.rope_parameters
            .get(key)
            .and_then(|v| v.as_f64())
            .with_context(|| format!("config.json: rope_parameters.{key} is missing or not a number"))
    }
}

pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    llama::sanitize(&args.llama, weights)
}

/// llama's attention with the queries scaled by position (the scale commutes with RoPE, so it
/// is applied to the projected queries).
struct Attention {
    llama: llama::Attention,
    beta: f64,
    original: f64,
}

impl SelfAttention for Attention {
    fn forward(&self, x: &Normed, rope: &RopeTables, cache: &mut KvCache) -> Result<Tensor> {
        let [q, k, v] = self.llama.project(x)?;
        let (b, l, _) = q.dims3()?;
        let scales = row_positions(cache, b, l).into_iter().map(|p| llama4_query_scale(p, self.beta, self.original));
        let s = Tensor::from_iter(scales, q.device())?.reshape((b, l, 1))?.to_dtype(q.dtype())?;
        let q = q.broadcast_mul(&s)?;
        self.llama.heads().attend([q, k, v], None, rope, cache)
    }

    fn o_proj(&self) -> &Linear {
        self.llama.o_proj()
    }

    fn input_layers(&self) -> Vec<&Linear> {
        self.llama.input_layers()
    }

    /// The scale is computed on the host from the cache's position, which a replayed CUDA
    /// graph would not update.
    fn graphable(&self) -> bool {
        false
    }
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    load_with(args, ld, "")
}

/// The model with every tensor name under `prefix` (inside mistral3: `language_model.`).
pub fn load_with(args: &ModelArgs, ld: &Loader, prefix: &'static str) -> Result<DecoderModel> {
    let (la, a) = (&args.llama, &args.llama.base);
    let (hd, ctx) = (la.head_dim(), la.max_position_embeddings);
    let theta = args.rope_parameter("rope_theta")?;
    let rope = Rope::from_config(hd, theta, false, Some(&args.rope_parameters), ctx)?;
    let (beta, original) =
        (args.rope_parameter("llama_4_scaling_beta")?, args.rope_parameter("original_max_position_embeddings")?);
    let heads = Heads::new(a.num_attention_heads, la.n_kv_heads(), hd);
    let windows = la.windows()?;
    if la.layer_types.is_some() && windows.iter().all(Option::is_some) {
        bail!("config.json: layer_types has no `full_attention` layer");
    }
    let layers = (0..a.num_hidden_layers)
        .map(|i| {
            let p = format!("{prefix}model.layers.{i}");
            let llama = llama::Attention::load(ld, &format!("{p}.self_attn"), a.hidden_size, heads, false, false)?;
            let attn = Attention { llama, beta, original };
            let mlp = Mlp::load(ld, &format!("{p}.mlp"), a.hidden_size, a.intermediate_size, false)?;
            PreNormBlock::load(ld, &p, a.hidden_size, a.rms_norm_eps, attn, mlp)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut spec = ModelSpec::plain(a.num_hidden_layers, rope, la.tie_word_embeddings, ctx);
    spec.windows = windows;
    spec.prefix = prefix;
    a.decoder(ld, spec, layers)
}
