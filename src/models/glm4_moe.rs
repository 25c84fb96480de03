//! GLM-4.5 / GLM-4.6 (`glm4_moe`): attention with biased q/k/v, optional per-head q/k
//! RMSNorm and RoPE over the first `partial_rotary_factor` of each head; the first
//! `first_k_dense_replace` layers dense, the rest a mixture of experts routed DeepSeek-V3 style:
//! sigmoid scores plus a learned correction bias pick the experts, only the best `topk_group`
//! of `n_group` expert groups (ranked by their two best scores) compete, the chosen experts'
//! uncorrected scores (renormalized with `norm_topk_prob`) times `routed_scaling_factor` weigh
//! them, and shared experts are added. Reads like mlx_lm's `models/glm4_moe.py`, which ignores
//! `rope_scaling` and `tie_word_embeddings` and drops the multi-token-prediction layer.

use super::attention::{Heads, SelfAttention};
use super::decoder::{BaseArgs, DecoderModel, ModelSpec, PreNormBlock};
use super::llama;
use super::mlp::{DenseMlp, FeedForward, Mlp};
use super::switch::{combine, stack_mlp_experts, top_k, Activation, SwitchGlu};
use crate::cache::KvCache;
use crate::io::Weights;
use crate::nn::{Branch, Linear, Loader, Normed, RmsNorm, Rope, RopeTables};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    #[serde(flatten)]
    pub base: BaseArgs,
    pub moe_intermediate_size: usize,
    pub norm_topk_prob: bool,
    pub n_group: usize,
    pub head_dim: usize,
    pub topk_group: usize,
    pub n_shared_experts: Option<usize>,
    pub n_routed_experts: Option<usize>,
    pub routed_scaling_factor: f64,
    pub num_experts_per_tok: usize,
    pub first_k_dense_replace: usize,
    pub num_key_value_heads: usize,
    pub rope_theta: f64,
    pub use_qk_norm: bool,
    pub attention_bias: bool,
    pub partial_rotary_factor: f64,
    #[serde(default)]
    pub topk_method: Option<String>,
}

/// Stacks Hugging Face's per-expert weights into `mlp.switch_mlp` and drops the
/// multi-token-prediction layer (`model.layers.{num_hidden_layers}`).
pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    let n = args.base.num_hidden_layers;
    let mtp = format!("model.layers.{n}.");
    weights.sanitize(|k| (!k.starts_with(&mtp)).then(|| k.to_string()));
    super::drop_unused(weights, false);
    stack_mlp_experts(weights, n, args.n_routed_experts.unwrap_or(0))
}

/// llama's attention (biased q/k/v, unbiased output) with optional per-head q/k norms.
struct Attention {
    llama: llama::Attention,
    qk_norms: Option<(RmsNorm, RmsNorm)>,
}

impl SelfAttention for Attention {
    fn forward(&self, x: &Normed, rope: &RopeTables, cache: &mut KvCache) -> Result<Tensor> {
        let norms = self.qk_norms.as_ref().map(|(q, k)| (q, k));
        self.llama.heads().attend(self.llama.project(x)?, norms, rope, cache)
    }

    fn o_proj(&self) -> &Linear {
        self.llama.o_proj()
    }

    fn input_layers(&self) -> Vec<&Linear> {
        self.llama.input_layers()
    }
}

/// The router (`MoEGate`, DeepSeek's, also Nemotron-H's): never quantized, a weight and the
/// score correction bias.
pub struct Gate {
    pub weight: Tensor,
    pub e_score_correction_bias: Tensor,
    pub top_k: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f64,
}

impl Gate {
    /// The chosen experts (…, k) and their weights (…, k, f32) for `x` (…, dim).
    pub fn route(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let logits = x.broadcast_matmul(&self.weight.to_dtype(x.dtype())?.t()?)?;
        let orig = candle_nn::ops::sigmoid(&logits.to_dtype(DType::F32)?)?;
        let mut scores = orig.broadcast_add(&self.e_score_correction_bias.to_dtype(DType::F32)?)?;
        if self.n_group > 1 {
            // zero every group but the `topk_group` whose two best scores sum highest
            let mut grouped = scores.dims().to_vec();
            let e = grouped.pop().expect("scores have an expert axis");
            grouped.extend([self.n_group, e / self.n_group]);
            let g = scores.reshape(grouped)?;
            let (_, best2) = top_k(&g, 2)?;
            let group_scores = best2.sum(D::Minus1)?;
            let rank = group_scores.arg_sort_last_dim(true)?.arg_sort_last_dim(true)?;
            let drop = (self.n_group - self.topk_group) as f64;
            let keep = rank.to_dtype(DType::F32)?.ge(drop)?.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?;
            scores = g.broadcast_mul(&keep)?.flatten_from(D::Minus2)?;
        }
        let (inds, _) = top_k(&scores, self.top_k)?;
        let mut w = orig.contiguous()?.gather(&inds, D::Minus1)?;
        if self.top_k > 1 && self.norm_topk_prob {
            w = w.broadcast_div(&w.sum_keepdim(D::Minus1)?)?;
        }
        Ok((inds, (w * self.routed_scaling_factor)?))
    }
}

struct MoE {
    gate: Gate,
    switch_mlp: SwitchGlu,
    shared_experts: Option<Mlp>,
}

impl FeedForward for MoE {
    fn branch<'a>(&'a self, x: &Normed) -> Result<Branch<'a>> {
        let x = x.tensor()?;
        let (inds, w) = self.gate.route(&x)?;
        let mut y = combine(&self.switch_mlp.forward(&x, &inds)?, &w)?;
        if let Some(s) = &self.shared_experts {
            y = (y + s.forward_tensor(&x)?)?;
        }
        Ok(Branch::Tensor(y))
    }

    /// Not captured: the group limit's comparison uploads its bound from the host at every step.
    fn graphable(&self) -> bool {
        false
    }
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    let a = &args.base;
    if let Some(e) = args.n_routed_experts {
        super::switch::check_top_k(args.num_experts_per_tok, e, "num_experts_per_tok")?;
    }
    if args.topk_method.as_deref().is_some_and(|m| m != "noaux_tc") {
        bail!(
            "config.json: topk_method `{}` is not supported (only noaux_tc)",
            args.topk_method.as_deref().unwrap_or("")
        );
    }
    let (dim, hd) = (a.hidden_size, args.head_dim);
    let rotary = (hd as f64 * args.partial_rotary_factor) as usize;
    let rope = Rope::from_config(rotary, args.rope_theta, false, None, None)?;
    let heads = Heads::new(a.num_attention_heads, args.num_key_value_heads, hd);
    let layers = (0..a.num_hidden_layers)
        .map(|l| {
            let p = format!("model.layers.{l}");
            let norm = |n: &str| RmsNorm::load(ld, &format!("{p}.self_attn.{n}"), hd, a.rms_norm_eps);
            let attn = Attention {
                llama: llama::Attention::load(ld, &format!("{p}.self_attn"), dim, heads, args.attention_bias, false)?,
                qk_norms: if args.use_qk_norm { Some((norm("q_norm")?, norm("k_norm")?)) } else { None },
            };
            let m = format!("{p}.mlp");
            let mlp: Box<dyn FeedForward> = match args.n_routed_experts {
                Some(e) if l >= args.first_k_dense_replace => {
                    if !e.is_multiple_of(args.n_group.max(1)) || args.topk_group > args.n_group {
                        bail!(
                            "config.json: {e} experts cannot form n_group {} groups of which topk_group {} are kept",
                            args.n_group,
                            args.topk_group
                        );
                    }
                    let gate = Gate {
                        weight: ld.tensor(&format!("{m}.gate.weight"), &[e, dim])?,
                        e_score_correction_bias: ld.tensor(&format!("{m}.gate.e_score_correction_bias"), &[e])?,
                        top_k: args.num_experts_per_tok,
                        n_group: args.n_group,
                        topk_group: args.topk_group,
                        norm_topk_prob: args.norm_topk_prob,
                        routed_scaling_factor: args.routed_scaling_factor,
                    };
                    let hidden = args.moe_intermediate_size;
                    let switch_mlp =
                        SwitchGlu::load(ld, &format!("{m}.switch_mlp"), e, dim, hidden, false, Activation::Swiglu)?;
                    let shared_experts = args
                        .n_shared_experts
                        .map(|n| Mlp::load(ld, &format!("{m}.shared_experts"), dim, hidden * n, false))
                        .transpose()?;
                    Box::new(MoE { gate, switch_mlp, shared_experts })
                }
                _ => Box::new(Mlp::load(ld, &m, dim, a.intermediate_size, false)?),
            };
            PreNormBlock::load(ld, &p, dim, a.rms_norm_eps, attn, mlp)
        })
        .collect::<Result<Vec<_>>>()?;
    a.decoder(ld, ModelSpec::plain(a.num_hidden_layers, rope, false, None), layers)
}
