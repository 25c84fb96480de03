//! Mixtral: llama's attention with a sparse mixture of SwiGLU experts in place of the MLP; a
//! router picks `num_experts_per_tok` experts per token and mixes their outputs with a softmax
//! over the picked router logits. Reads like mlx_lm's `models/mixtral.py`: experts are stored
//! stacked (`switch_mlp.{gate,up,down}_proj`, first axis = expert, dense or quantized) or per
//! expert as Hugging Face writes them (`experts.{e}.w1/w2/w3`).

use super::attention::Heads;
use super::decoder::{BaseArgs, DecoderModel, ModelSpec, PreNormBlock, RopeArgs};
use super::llama::Attention;
use super::mlp::FeedForward;
use super::switch::{combine, softmax, stack_experts, top_k, Activation, SwitchGlu};
use crate::io::Weights;
use crate::nn::{Branch, Linear, Loader, Normed};
use anyhow::Result;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    #[serde(flatten)]
    pub base: BaseArgs,
    #[serde(default = "super::count::<2>")]
    pub num_experts_per_tok: usize,
    #[serde(default = "super::count::<8>")]
    pub num_local_experts: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "super::num::<1000000>")]
    pub rope_theta: f64,
    #[serde(flatten)]
    pub rope: RopeArgs,
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

/// Stacks Hugging Face's per-expert `experts.{e}.w1/w2/w3` into mlx's
/// `switch_mlp.{gate,down,up}_proj`, as mlx_lm's `sanitize` does.
pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    super::drop_unused(weights, args.tie_word_embeddings);
    let p = |l: usize| format!("model.layers.{l}.block_sparse_moe");
    stack_experts(
        weights,
        args.base.num_hidden_layers,
        args.num_local_experts,
        &[("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")],
        |l, e, n| format!("{}.experts.{e}.{n}", p(l)),
        |l, n| format!("{}.switch_mlp.{n}", p(l)),
    )
}

/// The sparse MoE block: the router (`gate`) scores every expert, the `k` best are run and
/// mixed with a softmax over their scores.
struct SparseMoe {
    gate: Linear,
    switch_mlp: SwitchGlu,
    top_k: usize,
}

impl FeedForward for SparseMoe {
    fn branch<'a>(&'a self, x: &Normed) -> Result<Branch<'a>> {
        let x = x.tensor()?;
        let (inds, scores) = top_k(&self.gate.forward(&x)?, self.top_k)?;
        let y = self.switch_mlp.forward(&x, &inds)?;
        Ok(Branch::Tensor(combine(&y, &softmax(&scores)?)?))
    }

    /// The router's choices stay on the device (see `SwitchGlu::graphable`).
    fn graphable(&self) -> bool {
        self.switch_mlp.graphable()
    }
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    let a = &args.base;
    super::switch::check_top_k(args.num_experts_per_tok, args.num_local_experts, "num_experts_per_tok")?;
    let (dim, eps) = (a.hidden_size, a.rms_norm_eps);
    let head_dim = dim / a.num_attention_heads;
    let heads = Heads::new(a.num_attention_heads, args.num_key_value_heads.unwrap_or(a.num_attention_heads), head_dim);
    let layers = (0..a.num_hidden_layers)
        .map(|l| {
            let p = format!("model.layers.{l}");
            let (moe, e) = (format!("{p}.block_sparse_moe"), args.num_local_experts);
            let switch_mlp = SwitchGlu::load(
                ld,
                &format!("{moe}.switch_mlp"),
                e,
                dim,
                a.intermediate_size,
                false,
                Activation::Swiglu,
            )?;
            let gate = Linear::load(ld, &format!("{moe}.gate"), dim, e, false)?;
            let mlp = SparseMoe { gate, switch_mlp, top_k: args.num_experts_per_tok };
            let attn = Attention::load(ld, &format!("{p}.self_attn"), dim, heads, false, false)?;
            PreNormBlock::load(ld, &p, dim, eps, attn, mlp)
        })
        .collect::<Result<Vec<_>>>()?;
    let rope = args.rope.rope(head_dim, args.rope_theta, None)?;
    let spec = ModelSpec::plain(a.num_hidden_layers, rope, args.tie_word_embeddings, None);
    a.decoder(ld, spec, layers)
}
