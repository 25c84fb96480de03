//! Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen2's attention (biases on q, k and v) and
//! in every layer a sparse MoE block: a softmax router, the `k` best experts mixed by their
//! router probabilities (not renormalized), plus a shared expert, a dense SwiGLU MLP whose
//! output is scaled by `sigmoid(shared_expert_gate(x))`. Reads like mlx_lm's
//! `models/qwen2_moe.py`, which ignores `rope_scaling` and always has an `lm_head`.

use super::attention::Heads;
use super::decoder::{BaseArgs, DecoderModel, ModelSpec, PreNormBlock};
use super::llama::Attention;
use super::mlp::{DenseMlp, FeedForward, Mlp};
use super::switch::{stack_mlp_experts, SoftmaxMoe};
use crate::io::Weights;
use crate::nn::{Branch, Linear, Loader, Normed, Rope};
use anyhow::Result;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    #[serde(flatten)]
    pub base: BaseArgs,
    pub num_experts_per_tok: usize,
    pub num_experts: usize,
    pub moe_intermediate_size: usize,
    pub shared_expert_intermediate_size: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "super::num::<1000000>")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_traditional: bool,
}

/// Stacks Hugging Face's per-expert weights into `mlp.switch_mlp`.
pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    super::drop_unused(weights, false);
    stack_mlp_experts(weights, args.base.num_hidden_layers, args.num_experts)
}

/// The routed experts and the gated shared expert (shared with Qwen3-Next).
pub struct SparseMoeBlock {
    routed: SoftmaxMoe,
    shared_expert: Mlp,
    shared_expert_gate: Linear,
}

impl SparseMoeBlock {
    /// `{m}.gate`, `{m}.switch_mlp` (`experts` of `hidden`, top `k`, renormalized with
    /// `norm_topk_prob`), `{m}.shared_expert` (`shared` wide) and `{m}.shared_expert_gate`.
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        ld: &Loader,
        m: &str,
        dim: usize,
        hidden: usize,
        experts: usize,
        k: usize,
        shared: usize,
        norm_topk_prob: bool,
    ) -> Result<Self> {
        Ok(Self {
            routed: SoftmaxMoe::load(ld, m, dim, hidden, experts, k, norm_topk_prob, false)?,
            shared_expert: Mlp::load(ld, &format!("{m}.shared_expert"), dim, shared, false)?,
            shared_expert_gate: Linear::load(ld, &format!("{m}.shared_expert_gate"), dim, 1, false)?,
        })
    }
}

impl FeedForward for SparseMoeBlock {
    fn branch<'a>(&'a self, x: &Normed) -> Result<Branch<'a>> {
        let x = x.tensor()?;
        let y = self.routed.forward(&x)?;
        let shared = self.shared_expert.forward_tensor(&x)?;
        let g = candle_nn::ops::sigmoid(&self.shared_expert_gate.forward(&x)?)?;
        Ok(Branch::Tensor((y + shared.broadcast_mul(&g)?)?))
    }

    /// The router's choices stay on the device (see `SwitchGlu::graphable`).
    fn graphable(&self) -> bool {
        self.routed.switch_mlp.graphable()
    }
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    let a = &args.base;
    let dim = a.hidden_size;
    let hd = dim / a.num_attention_heads;
    let rope = Rope::from_config(hd, args.rope_theta, args.rope_traditional, None, None)?;
    let heads = Heads::new(a.num_attention_heads, args.num_key_value_heads.unwrap_or(a.num_attention_heads), hd);
    let layers = (0..a.num_hidden_layers)
        .map(|l| {
            let p = format!("model.layers.{l}");
            let attn = Attention::load(ld, &format!("{p}.self_attn"), dim, heads, true, false)?;
            let m = format!("{p}.mlp");
            let (e, k, hidden) = (args.num_experts, args.num_experts_per_tok, args.moe_intermediate_size);
            let shared = args.shared_expert_intermediate_size;
            let mlp = SparseMoeBlock::load(ld, &m, dim, hidden, e, k, shared, false)?;
            PreNormBlock::load(ld, &p, dim, a.rms_norm_eps, attn, mlp)
        })
        .collect::<Result<Vec<_>>>()?;
    a.decoder(ld, ModelSpec::plain(a.num_hidden_layers, rope, false, None), layers)
}
