//! DeepSeek-V2 / V2-Lite / V2.5 / Coder-V2 (`deepseek_v2`): the latent projections of
//! multi-head latent attention without the absorption: `kv_b_proj` expands each token's latent
//! into per-head keys and values, which are cached as in any multi-head attention (keys: the
//! non-RoPE part then the shared RoPE key, values). RoPE is always yarn (traditional). The MoE
//! layers route by softmax, in `group_limited_greedy` mode only within the `topk_group` groups
//! whose best score is highest, weigh the chosen experts by their scores times
//! `routed_scaling_factor` (never renormalized) and add shared experts. Reads like mlx_lm's
//! `models/deepseek_v2.py`.

use super::attention::SelfAttention;
use super::decoder::{DecoderModel, ModelSpec, PreNormBlock};
use super::deepseek_v3::{DeepseekMoe, GroupScore, Router, Scoring};
use super::mla::{softmax_scale, split_latent, MlaDims, QueryProj};
use super::mlp::{FeedForward, Mlp};
use super::switch::stack_mlp_experts;
use crate::cache::KvCache;
use crate::io::Weights;
use crate::nn::{Linear, Loader, Normed, RmsNorm, Rope, RopeTables};
use crate::ops::attention::scaled_dot_product_attention;
use anyhow::Result;
use candle_core::{Tensor, D};

pub use super::deepseek_v3::ModelArgs;

/// Stacks Hugging Face's per-expert weights into `mlp.switch_mlp`.
pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    super::drop_unused(weights, false);
    stack_mlp_experts(weights, args.base.num_hidden_layers, args.n_routed_experts.unwrap_or(0))
}

struct Attention {
    q: QueryProj,
    kv_a_proj_with_mqa: Linear,
    kv_a_layernorm: RmsNorm,
    kv_b_proj: Linear,
    o_proj: Linear,
    dims: MlaDims,
    scale: f64,
}

impl SelfAttention for Attention {
    fn forward(&self, x: &Normed, rope: &RopeTables, cache: &mut KvCache) -> Result<Tensor> {
        let x = x.tensor()?;
        let (b, l, _) = x.dims3()?;
        let d = &self.dims;
        let (h, dn, dv, dr) = (d.heads, d.qk_nope_head_dim, d.v_head_dim, d.qk_rope_head_dim);
        let (q_nope, q_pe) = self.q.heads(&x, d)?;
        let (latent, k_pe) = split_latent(&self.kv_a_proj_with_mqa.forward(&x)?, d)?;
        let kv = self.kv_b_proj.forward(&self.kv_a_layernorm.forward(&latent)?)?;
        let kv = kv.reshape((b, l, h, dn + dv))?.transpose(1, 2)?;
        let (k_nope, v) = (kv.narrow(D::Minus1, 0, dn)?, kv.narrow(D::Minus1, dn, dv)?.contiguous()?);
        let q_pe = rope.apply(&q_pe)?;
        let k_pe = rope.apply(&k_pe)?.broadcast_as((b, h, l, dr))?.contiguous()?;
        let q = Tensor::cat(&[&q_nope.contiguous()?, &q_pe], D::Minus1)?;
        let k = Tensor::cat(&[&k_nope.contiguous()?, &k_pe], D::Minus1)?;
        let mask = cache.mask(l);
        let (k, v) = cache.update_and_fetch(&k, &v)?;
        let out = scaled_dot_product_attention(&q, &k, &v, self.scale, mask, None)?;
        Ok(out.transpose(1, 2)?.reshape((b, l, h * dv))?)
    }

    fn o_proj(&self) -> &Linear {
        &self.o_proj
    }
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    let a = &args.base;
    let d = args.dims();
    let dim = a.hidden_size;
    // always yarn, whatever the type says (factor 1: plain RoPE)
    let yarn = args.rope_scaling.as_ref().map(|s| {
        let mut s = s.clone();
        if let Some(o) = s.as_object_mut() {
            o.remove("rope_type");
            o.insert("type".into(), "yarn".into());
        }
        s
    });
    let theta = args.rope_theta.unwrap_or(1e4);
    let rope = Rope::from_config(d.qk_rope_head_dim, theta, true, yarn.as_ref(), Some(args.max_position_embeddings))?;
    let scale = softmax_scale(d.q_head_dim(), args.rope_scaling.as_ref())?;
    let groups = match args.topk_method.as_deref() {
        Some("group_limited_greedy") => Some((args.n_group, args.topk_group, GroupScore::Max)),
        _ => None,
    };
    let layers = (0..a.num_hidden_layers)
        .map(|l| {
            let p = format!("model.layers.{l}");
            let s = format!("{p}.self_attn");
            let (h, r) = (d.heads, d.kv_lora_rank);
            let bias = args.attention_bias;
            let lin = |n: &str, i: usize, o: usize, bias: bool| Linear::load(ld, &format!("{s}.{n}"), i, o, bias);
            let attn = Attention {
                q: QueryProj::load(ld, &s, &d, dim, bias, 1e-6)?,
                kv_a_proj_with_mqa: lin("kv_a_proj_with_mqa", dim, r + d.qk_rope_head_dim, bias)?,
                kv_a_layernorm: RmsNorm::load(ld, &format!("{s}.kv_a_layernorm"), r, 1e-6)?,
                kv_b_proj: lin("kv_b_proj", r, h * (d.qk_nope_head_dim + d.v_head_dim), false)?,
                o_proj: lin("o_proj", h * d.v_head_dim, dim, bias)?,
                dims: d,
                scale,
            };
            let m = format!("{p}.mlp");
            let moe = l >= args.first_k_dense_replace && l.is_multiple_of(args.moe_layer_freq.max(1));
            let mlp: Box<dyn FeedForward> = match args.n_routed_experts {
                Some(e) if moe => {
                    let gate = Router {
                        weight: Linear::Dense {
                            weight: ld.tensor(&format!("{m}.gate.weight"), &[e, dim])?,
                            bias: None,
                        },
                        e_score_correction_bias: None,
                        scoring: Scoring::SoftmaxMasked,
                        groups,
                        top_k: args.num_experts_per_tok,
                        renormalize: false,
                        routed_scaling_factor: args.routed_scaling_factor,
                    };
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
