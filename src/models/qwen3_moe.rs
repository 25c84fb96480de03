//! Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention (per-head q/k RMSNorm before
//! RoPE), and in every `decoder_sparse_step`-th layer not listed in `mlp_only_layers` a sparse
//! MoE block in place of the MLP: a softmax router over all experts, the `k` best run and mixed
//! by their router probabilities (renormalized to sum to 1 with `norm_topk_prob`). Reads like
//! mlx_lm's `models/qwen3_moe.py`, which ignores `rope_scaling`.

use super::attention::Heads;
use super::decoder::{BaseArgs, DecoderModel, ModelSpec, PreNormBlock};
use super::mlp::{FeedForward, Mlp};
use super::qwen3::Attention;
use super::switch::{stack_mlp_experts, SoftmaxMoe};
use crate::io::Weights;
use crate::nn::{Loader, RmsNorm, Rope};
use anyhow::Result;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    #[serde(flatten)]
    pub base: BaseArgs,
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    pub decoder_sparse_step: usize,
    pub mlp_only_layers: Vec<usize>,
    pub moe_intermediate_size: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub norm_topk_prob: bool,
}

impl ModelArgs {
    /// Whether layer `l` has the sparse MoE block (else the dense MLP).
    fn is_sparse(&self, l: usize) -> bool {
        !self.mlp_only_layers.contains(&l)
            && self.num_experts > 0
            && self.decoder_sparse_step > 0
            && (l + 1).is_multiple_of(self.decoder_sparse_step)
    }
}

/// Stacks Hugging Face's per-expert weights (`mlp.experts.{e}.{gate,up,down}_proj`) into
/// `mlp.switch_mlp`.
pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    super::drop_unused(weights, args.tie_word_embeddings);
    stack_mlp_experts(weights, args.base.num_hidden_layers, args.num_experts)
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    let a = &args.base;
    let (dim, hd, ctx) = (a.hidden_size, args.head_dim, args.max_position_embeddings);
    let rope = Rope::from_config(hd, args.rope_theta, false, None, Some(ctx))?;
    let heads = Heads::new(a.num_attention_heads, args.num_key_value_heads, hd);
    let layers = (0..a.num_hidden_layers)
        .map(|l| {
            let p = format!("model.layers.{l}");
            let norm = |n: &str| RmsNorm::load(ld, n, hd, a.rms_norm_eps);
            let attn = Attention::load(ld, &format!("{p}.self_attn"), dim, heads, norm)?;
            let mlp: Box<dyn FeedForward> = if args.is_sparse(l) {
                let (e, k, hidden) = (args.num_experts, args.num_experts_per_tok, args.moe_intermediate_size);
                let norm = args.norm_topk_prob;
                Box::new(SoftmaxMoe::load(ld, &format!("{p}.mlp"), dim, hidden, e, k, norm, false)?)
            } else {
                Box::new(Mlp::load(ld, &format!("{p}.mlp"), dim, a.intermediate_size, false)?)
            };
            PreNormBlock::load(ld, &p, dim, a.rms_norm_eps, attn, mlp)
        })
        .collect::<Result<Vec<_>>>()?;
    a.decoder(ld, ModelSpec::plain(a.num_hidden_layers, rope, args.tie_word_embeddings, Some(ctx)), layers)
}
