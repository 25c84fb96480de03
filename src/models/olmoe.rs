//! OLMoE: llama-style attention with an RMSNorm over the whole query and key projections (not
//! per head) before RoPE, and in every layer a sparse MoE block: a softmax router, the `k` best
//! experts mixed by their router probabilities (renormalized with `norm_topk_prob`). Reads like
//! mlx_lm's `models/olmoe.py`.

use super::attention::Heads;
use super::decoder::{DecoderModel, ModelSpec, PreNormBlock};
use super::llama;
use super::olmo2::Attention;
use super::switch::{stack_mlp_experts, SoftmaxMoe};
use crate::io::Weights;
use crate::nn::Loader;
use anyhow::Result;
use serde::Deserialize;

/// llama's arguments (flattened: the same config keys and defaults) and the experts'.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    #[serde(flatten)]
    pub llama: llama::ModelArgs,
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    #[serde(default)]
    pub norm_topk_prob: bool,
}

/// Stacks Hugging Face's per-expert weights into `mlp.switch_mlp`.
pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    super::drop_unused(weights, args.llama.tie_word_embeddings);
    stack_mlp_experts(weights, args.llama.base.num_hidden_layers, args.num_experts)
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    let (la, a) = (&args.llama, &args.llama.base);
    let dim = a.hidden_size;
    let (hd, n_kv) = (la.head_dim(), la.n_kv_heads());
    let rope = la.rope.rope(hd, la.rope_theta, la.max_position_embeddings)?;
    let heads = Heads::new(a.num_attention_heads, n_kv, hd);
    let layers = (0..a.num_hidden_layers)
        .map(|l| {
            let p = format!("model.layers.{l}");
            let bias = la.attention_bias;
            let attn = Attention::load(ld, &format!("{p}.self_attn"), dim, heads, bias, a.rms_norm_eps)?;
            let (e, k) = (args.num_experts, args.num_experts_per_tok);
            let (hidden, norm) = (a.intermediate_size, args.norm_topk_prob);
            let mlp = SoftmaxMoe::load(ld, &format!("{p}.mlp"), dim, hidden, e, k, norm, la.mlp_bias)?;
            PreNormBlock::load(ld, &p, dim, a.rms_norm_eps, attn, mlp)
        })
        .collect::<Result<Vec<_>>>()?;
    let spec = ModelSpec::plain(a.num_hidden_layers, rope, la.tie_word_embeddings, la.max_position_embeddings);
    a.decoder(ld, spec, layers)
}
