//! Granite MoE (granite-3.x MoE): llama's layers with granite's multipliers — the embedding
//! scaled by `embedding_multiplier`, attention scores by `attention_multiplier` (in place of
//! `head_dim^-0.5`), each residual branch by `residual_multiplier`, the logits divided by
//! `logits_scaling` — and in every layer a mixture of experts whose router's `k` best logits
//! are softmaxed into the experts' weights. Reads like mlx_lm's `models/granitemoe.py`.

use super::decoder::DecoderModel;
use super::granite;
use super::mlp::FeedForward;
use super::switch::{combine, softmax, top_k, Activation, SwitchGlu};
use crate::io::Weights;
use crate::nn::{Branch, Linear, Loader, Normed};
use anyhow::Result;
use candle_core::DType;
use serde::Deserialize;

/// Granite's arguments (flattened: the same keys) and the experts'.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    #[serde(flatten)]
    pub granite: granite::ModelArgs,
    pub num_local_experts: usize,
    pub num_experts_per_tok: usize,
}

/// Splits Hugging Face's fused expert `input_linear` (gate rows, then up rows) and renames
/// `output_linear`, as mlx_lm's `sanitize` does.
pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    super::drop_unused(weights, args.granite.tie_word_embeddings);
    for l in 0..args.granite.base.num_hidden_layers {
        let p = format!("model.layers.{l}.block_sparse_moe");
        let fused = format!("{p}.input_linear.weight");
        if weights.contains(&fused) {
            let halves = [format!("{p}.switch_mlp.gate_proj.weight"), format!("{p}.switch_mlp.up_proj.weight")];
            weights.split_axis(&fused, 1, &halves)?;
            weights.rename(&format!("{p}.output_linear.weight"), &format!("{p}.switch_mlp.down_proj.weight"))?;
        }
    }
    Ok(())
}

/// The experts: the router's `k` best logits, softmaxed in f32, weigh the chosen experts.
pub struct MoE {
    router: Linear,
    switch_mlp: SwitchGlu,
    top_k: usize,
}

impl MoE {
    /// `{m}.router.layer` and `{m}.switch_mlp` (`experts` SwiGLU experts `dim → hidden → dim`,
    /// the `top_k` best chosen).
    pub fn load(ld: &Loader, m: &str, dim: usize, hidden: usize, experts: usize, top_k: usize) -> Result<Self> {
        super::switch::check_top_k(top_k, experts, "num_experts_per_tok")?;
        Ok(Self {
            router: Linear::load(ld, &format!("{m}.router.layer"), dim, experts, false)?,
            switch_mlp: SwitchGlu::load(
                ld,
                &format!("{m}.switch_mlp"),
                experts,
                dim,
                hidden,
                false,
                Activation::Swiglu,
            )?,
            top_k,
        })
    }
}

impl FeedForward for MoE {
    fn branch<'a>(&'a self, x: &Normed) -> Result<Branch<'a>> {
        let x = x.tensor()?;
        let (inds, logits) = top_k(&self.router.forward(&x)?, self.top_k)?;
        let w = softmax(&logits.to_dtype(DType::F32)?)?;
        Ok(Branch::Tensor(combine(&self.switch_mlp.forward(&x, &inds)?, &w)?))
    }

    /// The router's choices stay on the device (see `SwitchGlu::graphable`).
    fn graphable(&self) -> bool {
        self.switch_mlp.graphable()
    }
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    let (dim, e, hidden) = (args.granite.base.hidden_size, args.num_local_experts, args.granite.base.intermediate_size);
    super::switch::check_top_k(args.num_experts_per_tok, e, "num_experts_per_tok")?;
    granite::load_with(&args.granite, ld, |p| {
        MoE::load(ld, &format!("{p}.block_sparse_moe"), dim, hidden, e, args.num_experts_per_tok)
    })
}
