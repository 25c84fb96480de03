//! Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention (per-head q/k RMSNorm before
//! RoPE), and in every `decoder_sparse_step`-th layer not listed in `mlp_only_layers` a sparse
//! MoE block in place of the MLP: a softmax router over all experts, the `k` best run and mixed
//! by their router probabilities (renormalized to sum to 1 with `norm_topk_prob`). Reads like
//! mlx_lm's `models/qwen3_moe.py`, which ignores `rope_scaling`.

use super::attention::Heads;
use super::decoder::{BaseArgs, DecoderModel, ModelSpec, PreNormBlock};
use super::mlp::{FeedForward, Mlp};
use super::qwen3::Attention;
use super::switch::{combine, softmax, stack_experts, top_k, Activation, SwitchGlu};
use crate::io::Weights;
use crate::nn::{Branch, Linear, Loader, Normed, RmsNorm, Rope};
use anyhow::Result;
use candle_core::D;
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
    let p = |l: usize| format!("model.layers.{l}.mlp");
    let projections = [("gate_proj", "gate_proj"), ("up_proj", "up_proj"), ("down_proj", "down_proj")];
    stack_experts(
        weights,
        args.base.num_hidden_layers,
        args.num_experts,
        &projections,
        |l, e, n| format!("{}.experts.{e}.{n}", p(l)),
        |l, n| format!("{}.switch_mlp.{n}", p(l)),
    )
}

/// The sparse MoE block: `softmax(gate(x))`, the `top_k` experts, their probabilities
/// (renormalized with `norm_topk_prob`) mixing their outputs.
pub struct SparseMoeBlock {
    gate: Linear,
    switch_mlp: SwitchGlu,
    top_k: usize,
    norm_topk_prob: bool,
}

impl SparseMoeBlock {
    pub fn load(
        ld: &Loader,
        p: &str,
        dim: usize,
        hidden: usize,
        experts: usize,
        top_k: usize,
        norm: bool,
    ) -> Result<Self> {
        Ok(Self {
            gate: Linear::load(ld, &format!("{p}.gate"), dim, experts, false)?,
            switch_mlp: SwitchGlu::load(
                ld,
                &format!("{p}.switch_mlp"),
                experts,
                dim,
                hidden,
                false,
                Activation::Swiglu,
            )?,
            top_k,
            norm_topk_prob: norm,
        })
    }
}

impl FeedForward for SparseMoeBlock {
    fn branch<'a>(&'a self, x: &Normed) -> Result<Branch<'a>> {
        let x = x.tensor()?;
        let gates = softmax(&self.gate.forward(&x)?)?;
        let (inds, mut scores) = top_k(&gates, self.top_k)?;
        if self.norm_topk_prob {
            scores = scores.broadcast_div(&scores.sum_keepdim(D::Minus1)?)?;
        }
        Ok(Branch::Tensor(combine(&self.switch_mlp.forward(&x, &inds)?, &scores)?))
    }

    /// The router's choices are read on the host to group the rows per expert.
    fn graphable(&self) -> bool {
        false
    }
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    let a = &args.base;
    super::switch::check_top_k(args.num_experts_per_tok, args.num_experts, "num_experts_per_tok")?;
    let (dim, hd, ctx) = (a.hidden_size, args.head_dim, args.max_position_embeddings);
    let rope = Rope::from_config(hd, args.rope_theta, false, None, Some(ctx))?;
    let heads = Heads::new(a.num_attention_heads, args.num_key_value_heads, hd);
    let layers = (0..a.num_hidden_layers)
        .map(|l| {
            let p = format!("model.layers.{l}");
            let norm = |n: &str| RmsNorm::load(ld, n, hd, a.rms_norm_eps);
            let attn = Attention::load(ld, &format!("{p}.self_attn"), dim, heads, norm)?;
            let mlp: Box<dyn FeedForward> = if args.is_sparse(l) {
                let (e, k) = (args.num_experts, args.num_experts_per_tok);
                let hidden = args.moe_intermediate_size;
                Box::new(SparseMoeBlock::load(ld, &format!("{p}.mlp"), dim, hidden, e, k, args.norm_topk_prob)?)
            } else {
                Box::new(Mlp::load(ld, &format!("{p}.mlp"), dim, a.intermediate_size, false)?)
            };
            PreNormBlock::load(ld, &p, dim, a.rms_norm_eps, attn, mlp)
        })
        .collect::<Result<Vec<_>>>()?;
    a.decoder(ld, ModelSpec::plain(a.num_hidden_layers, rope, args.tie_word_embeddings, Some(ctx)), layers)
}
