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
use super::deepseek_v3::{DeepseekMoe, Router};
use super::llama;
use super::mlp::{FeedForward, Mlp};
use super::switch::stack_mlp_experts;
use crate::cache::KvCache;
use crate::io::Weights;
use crate::nn::{Linear, Loader, Normed, RmsNorm, Rope, RopeTables};
use anyhow::{bail, Result};
use candle_core::Tensor;
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

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    let a = &args.base;
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
                    let gate = Router::sigmoid(
                        ld,
                        &m,
                        e,
                        dim,
                        args.num_experts_per_tok,
                        args.n_group,
                        args.topk_group,
                        args.norm_topk_prob,
                        args.routed_scaling_factor,
                    )?;
                    let (hidden, shared) = (args.moe_intermediate_size, args.n_shared_experts);
                    Box::new(DeepseekMoe::load(ld, &m, gate, e, dim, hidden, shared)?)
                }
                _ => Box::new(Mlp::load(ld, &m, dim, a.intermediate_size, false)?),
            };
            PreNormBlock::load(ld, &p, dim, a.rms_norm_eps, attn, mlp)
        })
        .collect::<Result<Vec<_>>>()?;
    a.decoder(ld, ModelSpec::plain(a.num_hidden_layers, rope, false, None), layers)
}
