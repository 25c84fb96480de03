//! Qwen3-Next: Gated DeltaNet layers (linear attention with a recurrent state, three in four by
//! `full_attention_interval`) among gated attention layers, and a sparse MoE with a gated
//! shared expert (Qwen2-MoE's, renormalized by `norm_topk_prob`) except in `mlp_only_layers`.
//! Reads like mlx_lm's `models/qwen3_next.py`; the recurrence is `ops::gated_delta`.
//!
//! - Gated DeltaNet: `in_proj_qkvz` and `in_proj_ba` interleaved per key head; q|k|v through a
//!   causal depthwise convolution (its last `kernel - 1` inputs kept in the cache) and SiLU;
//!   q and k L2-normalized (q also scaled by 1/√Dk); `β = σ(b)`, `g = exp(−exp(A_log) ·
//!   softplus(a + dt_bias))`; the gated delta rule; a per-head RMSNorm of the output gated by
//!   `silu(z)`; `out_proj`.
//! - Attention: `q_proj` gives each head's queries and an output gate (`o · σ(gate)`), per-head
//!   q/k norms, RoPE over `partial_rotary_factor` of each head.

use super::attention::{Heads, QkNorms, SelfAttention};
use super::decoder::{BaseArgs, DecoderModel, ModelSpec, PreNormBlock};
use super::mlp::{FeedForward, Mlp};
use super::qwen2_moe::SparseMoeBlock;
use super::ssm::softplus;
use super::switch::stack_mlp_experts;
use crate::cache::KvCache;
use crate::io::Weights;
use crate::nn::{rms_normalize, CausalConv1d, Linear, Loader, Normed, RmsNorm, Rope, RopeTables};
use crate::ops::gated_delta::gated_delta_update;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    #[serde(flatten)]
    pub base: BaseArgs,
    pub linear_num_value_heads: usize,
    pub linear_num_key_heads: usize,
    pub linear_key_head_dim: usize,
    pub linear_value_head_dim: usize,
    pub linear_conv_kernel_dim: usize,
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    pub decoder_sparse_step: usize,
    pub shared_expert_intermediate_size: usize,
    pub mlp_only_layers: Vec<usize>,
    pub moe_intermediate_size: usize,
    pub num_key_value_heads: usize,
    pub rope_theta: f64,
    pub partial_rotary_factor: f64,
    pub max_position_embeddings: usize,
    pub head_dim: usize,
    #[serde(default)]
    pub norm_topk_prob: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_interval")]
    pub full_attention_interval: usize,
}

fn default_interval() -> usize {
    4
}

impl ModelArgs {
    /// Whether layer `l` is a Gated DeltaNet layer (else full attention).
    pub fn is_linear(&self, l: usize) -> bool {
        !(l + 1).is_multiple_of(self.full_attention_interval.max(1))
    }

    fn is_moe(&self, l: usize) -> bool {
        !self.mlp_only_layers.contains(&l)
            && self.num_experts > 0
            && (l + 1).is_multiple_of(self.decoder_sparse_step.max(1))
    }
}

/// From the Hugging Face layout (per-expert weights present; otherwise the weights are taken as
/// they are, as mlx_lm does): the multi-token-prediction layers dropped, the experts stacked,
/// the convolutions in mlx's layout and the zero-centred norms shifted by 1.
pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    let n = args.base.num_hidden_layers;
    if !(0..n).any(|l| weights.contains(&format!("model.layers.{l}.mlp.experts.0.up_proj.weight"))) {
        return Ok(());
    }
    weights.sanitize(|k| (!k.contains("mtp.")).then(|| k.to_string()));
    super::drop_unused(weights, args.tie_word_embeddings);
    stack_mlp_experts(weights, n, args.num_experts)?;
    convs_and_norms_to_mlx(weights, true)
}

/// Hugging Face's convolution weights (channels, 1, kernel) in mlx's layout (channels, kernel,
/// 1), and the zero-centred norms (the layers', the final one, q/k) shifted by 1: always, or
/// (`always` false: Qwen3.5) only when a convolution was in Hugging Face's layout.
pub fn convs_and_norms_to_mlx(weights: &mut Weights, always: bool) -> Result<()> {
    let hf_layout = crate::nn::conv1d_weights_to_mlx(weights)?;
    if always || hf_layout {
        let names: Vec<String> = weights.names().map(str::to_string).collect();
        let shifted = [
            ".input_layernorm.weight",
            ".post_attention_layernorm.weight",
            "model.norm.weight",
            ".q_norm.weight",
            ".k_norm.weight",
        ];
        for k in names {
            if weights.shape(&k)?.len() == 1 && shifted.iter().any(|s| k.ends_with(s)) {
                weights.add_one(&k)?;
            }
        }
    }
    Ok(())
}

/// The input projections of a Gated DeltaNet layer.
enum Projections {
    /// Qwen3-Next: q|k|v|z and b|a, each interleaved per key head
    Interleaved { in_proj_qkvz: Linear, in_proj_ba: Linear },
    /// Qwen3.5: q|k|v (one block each), z, b and a apart
    Separate { in_proj_qkv: Linear, in_proj_z: Linear, in_proj_b: Linear, in_proj_a: Linear },
}

/// The Gated DeltaNet mixer (`linear_attn`); its output projection is the block's.
pub struct GatedDeltaNet {
    proj: Projections,
    conv1d: CausalConv1d,
    dt_bias: Tensor,
    /// −exp(A_log), f32
    a: Tensor,
    norm: RmsNorm,
    out_proj: Linear,
    /// (key heads, key head dim, value heads, value head dim)
    hk: usize,
    dk: usize,
    hv: usize,
    dv: usize,
}

impl GatedDeltaNet {
    /// `separate`: Qwen3.5's projections (else Qwen3-Next's interleaved ones).
    fn load(ld: &Loader, p: &str, args: &ModelArgs, separate: bool) -> Result<Self> {
        let (hk, dk, hv, dv) = (
            args.linear_num_key_heads,
            args.linear_key_head_dim,
            args.linear_num_value_heads,
            args.linear_value_head_dim,
        );
        if hk == 0 || hv % hk != 0 {
            bail!("config.json: linear_num_value_heads ({hv}) must be a multiple of linear_num_key_heads ({hk})");
        }
        let dim = args.base.hidden_size;
        let (key_dim, value_dim) = (hk * dk, hv * dv);
        let lin = |n: &str, i: usize, o: usize| Linear::load(ld, &format!("{p}.{n}"), i, o, false);
        let conv_dim = 2 * key_dim + value_dim;
        let proj = if separate {
            Projections::Separate {
                in_proj_qkv: lin("in_proj_qkv", dim, 2 * key_dim + value_dim)?,
                in_proj_z: lin("in_proj_z", dim, value_dim)?,
                in_proj_b: lin("in_proj_b", dim, hv)?,
                in_proj_a: lin("in_proj_a", dim, hv)?,
            }
        } else {
            Projections::Interleaved {
                in_proj_qkvz: lin("in_proj_qkvz", dim, 2 * key_dim + 2 * value_dim)?,
                in_proj_ba: lin("in_proj_ba", dim, 2 * hv)?,
            }
        };
        Ok(Self {
            proj,
            conv1d: CausalConv1d::load(ld, &format!("{p}.conv1d"), conv_dim, args.linear_conv_kernel_dim, false)?,
            dt_bias: ld.tensor(&format!("{p}.dt_bias"), &[hv])?,
            a: ld.tensor(&format!("{p}.A_log"), &[hv])?.to_dtype(DType::F32)?.exp()?.neg()?,
            norm: RmsNorm::load(ld, &format!("{p}.norm"), dv, args.base.rms_norm_eps)?,
            out_proj: lin("out_proj", value_dim, dim)?,
            hk,
            dk,
            hv,
            dv,
        })
    }

    /// For `x` (B, S, dim): q|k|v as the convolution takes them (B, S, 2·Hk·Dk + Hv·Dv), z (B, S,
    /// Hv, Dv), b and a (B, S, Hv).
    fn project(&self, x: &Tensor) -> Result<[Tensor; 4]> {
        let (b, s, _) = x.dims3()?;
        let (hk, dk, hv, dv) = (self.hk, self.dk, self.hv, self.dv);
        let r = hv / hk;
        Ok(match &self.proj {
            Projections::Interleaved { in_proj_qkvz, in_proj_ba } => {
                let qkvz = in_proj_qkvz.forward(x)?.reshape((b, s, hk, 2 * dk + 2 * r * dv))?;
                let flat = |t: Tensor| -> Result<Tensor> { Ok(t.reshape((b, s, ()))?) };
                let mixed = Tensor::cat(
                    &[
                        flat(qkvz.narrow(3, 0, dk)?)?,
                        flat(qkvz.narrow(3, dk, dk)?)?,
                        flat(qkvz.narrow(3, 2 * dk, r * dv)?)?,
                    ],
                    2,
                )?;
                let z = qkvz.narrow(3, 2 * dk + r * dv, r * dv)?.reshape((b, s, hv, dv))?;
                let ba = in_proj_ba.forward(x)?.reshape((b, s, hk, 2 * r))?;
                [mixed, z, ba.narrow(3, 0, r)?.reshape((b, s, hv))?, ba.narrow(3, r, r)?.reshape((b, s, hv))?]
            }
            Projections::Separate { in_proj_qkv, in_proj_z, in_proj_b, in_proj_a } => [
                in_proj_qkv.forward(x)?,
                in_proj_z.forward(x)?.reshape((b, s, hv, dv))?,
                in_proj_b.forward(x)?,
                in_proj_a.forward(x)?,
            ],
        })
    }
}

impl SelfAttention for GatedDeltaNet {
    fn forward(&self, x: &Normed, _rope: &RopeTables, cache: &mut KvCache) -> Result<Tensor> {
        let x = x.tensor()?;
        let (b, s, _) = x.dims3()?;
        let (hk, dk, hv, dv) = (self.hk, self.dk, self.hv, self.dv);
        let [mixed, z, b_, a] = self.project(&x)?;
        let beta = candle_nn::ops::sigmoid(&b_)?;
        let mixed = cache.zero_padding(&mixed)?;
        let (conv, state) = self.conv1d.forward(&mixed, cache.array(0))?;
        cache.set_array(0, state)?;
        let conv = candle_nn::ops::silu(&conv)?;
        let key_dim = hk * dk;
        let q = conv.narrow(2, 0, key_dim)?.reshape((b, s, hk, dk))?;
        let k = conv.narrow(2, key_dim, key_dim)?.reshape((b, s, hk, dk))?;
        let v = conv.narrow(2, 2 * key_dim, hv * dv)?.reshape((b, s, hv, dv))?;
        // L2 norms with eps 1e-6 (an RMSNorm with eps 1e-6 / Dk, scaled); q also by 1/√Dk
        let eps = 1e-6 / dk as f64;
        let q = (rms_normalize(&q, eps)? * (1.0 / dk as f64))?;
        let k = (rms_normalize(&k, eps)? * (1.0 / (dk as f64).sqrt()))?;
        let a_dt = softplus(&a.broadcast_add(&self.dt_bias)?)?.to_dtype(DType::F32)?;
        let g = a_dt.broadcast_mul(&self.a)?.exp()?;
        let (y, state) = gated_delta_update(&q, &k, &v, &g, &beta, cache.array(1))?;
        cache.set_array(1, state)?;
        cache.advance_by(s);
        // the gated RMSNorm: norm(y) · silu(z), in f32, rounded once
        let n = self.norm.forward(&y)?.to_dtype(DType::F32)?;
        let out = (candle_nn::ops::silu(&z.to_dtype(DType::F32)?)? * n)?.to_dtype(x.dtype())?;
        Ok(out.reshape((b, s, hv * dv))?)
    }

    fn o_proj(&self) -> &Linear {
        &self.out_proj
    }

    fn input_layers(&self) -> Vec<&Linear> {
        match &self.proj {
            Projections::Interleaved { in_proj_qkvz, in_proj_ba } => vec![in_proj_qkvz, in_proj_ba],
            Projections::Separate { in_proj_qkv, in_proj_z, in_proj_b, in_proj_a } => {
                vec![in_proj_qkv, in_proj_z, in_proj_b, in_proj_a]
            }
        }
    }

    /// Its states are replaced, not written in place, at every step.
    fn graphable(&self) -> bool {
        false
    }
}

/// The gated attention: queries and a per-head output gate from `q_proj`, q/k norms, partial
/// RoPE, `o · σ(gate)`.
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    heads: Heads,
}

impl Attention {
    fn load(ld: &Loader, p: &str, args: &ModelArgs) -> Result<Self> {
        let (dim, hd, bias) = (args.base.hidden_size, args.head_dim, args.attention_bias);
        let (nh, nkv) = (args.base.num_attention_heads, args.num_key_value_heads);
        let lin = |n: &str, i: usize, o: usize| Linear::load(ld, &format!("{p}.{n}"), i, o, bias);
        let norm = |n: &str| RmsNorm::load(ld, &format!("{p}.{n}"), hd, args.base.rms_norm_eps);
        Ok(Self {
            q_proj: lin("q_proj", dim, 2 * nh * hd)?,
            k_proj: lin("k_proj", dim, nkv * hd)?,
            v_proj: lin("v_proj", dim, nkv * hd)?,
            o_proj: lin("o_proj", nh * hd, dim)?,
            q_norm: norm("q_norm")?,
            k_norm: norm("k_norm")?,
            heads: Heads::new(nh, nkv, hd),
        })
    }
}

impl SelfAttention for Attention {
    fn forward(&self, x: &Normed, rope: &RopeTables, cache: &mut KvCache) -> Result<Tensor> {
        let x = x.tensor()?;
        let (b, s, _) = x.dims3()?;
        let (nh, hd) = (self.heads.n_heads, self.heads.head_dim);
        let qg = self.q_proj.forward(&x)?.reshape((b, s, nh, 2 * hd))?;
        let q = qg.narrow(3, 0, hd)?.reshape((b, s, nh * hd))?;
        let gate = qg.narrow(3, hd, hd)?.reshape((b, s, nh * hd))?;
        let (k, v) = (self.k_proj.forward(&x)?, self.v_proj.forward(&x)?);
        let norms = QkNorms::BeforeRope(&self.q_norm, &self.k_norm);
        let o = self.heads.attend_with([q, k, v], norms, Some(rope), cache)?;
        Ok((o * candle_nn::ops::sigmoid(&gate)?)?)
    }

    fn o_proj(&self) -> &Linear {
        &self.o_proj
    }

    fn input_layers(&self) -> Vec<&Linear> {
        vec![&self.q_proj, &self.k_proj, &self.v_proj]
    }
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    load_with(args, ld, "", false)
}

/// The model with every tensor name after `prefix` (Qwen3.5: `language_model.`); `separate`:
/// Qwen3.5's Gated DeltaNet projections.
pub fn load_with(args: &ModelArgs, ld: &Loader, prefix: &'static str, separate: bool) -> Result<DecoderModel> {
    let a = &args.base;
    let (dim, n) = (a.hidden_size, a.num_hidden_layers);
    if args.num_experts > 0 {
        super::switch::check_top_k(args.num_experts_per_tok, args.num_experts, "num_experts_per_tok")?;
    }
    let layers = (0..n)
        .map(|l| {
            let p = format!("{prefix}model.layers.{l}");
            let m = format!("{p}.mlp");
            // the sparse MoE, or a dense MLP in `mlp_only_layers`
            let mlp: Box<dyn FeedForward> = if args.is_moe(l) {
                let (e, k, hidden) = (args.num_experts, args.num_experts_per_tok, args.moe_intermediate_size);
                let shared = args.shared_expert_intermediate_size;
                Box::new(SparseMoeBlock::load(ld, &m, dim, hidden, e, k, shared, args.norm_topk_prob)?)
            } else {
                Box::new(Mlp::load(ld, &m, dim, a.intermediate_size, false)?)
            };
            if args.is_linear(l) {
                let gdn = GatedDeltaNet::load(ld, &format!("{p}.linear_attn"), args, separate)?;
                PreNormBlock::load(ld, &p, dim, a.rms_norm_eps, gdn, mlp)
            } else {
                let attn = Attention::load(ld, &format!("{p}.self_attn"), args)?;
                PreNormBlock::load(ld, &p, dim, a.rms_norm_eps, attn, mlp)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let rope_dims = (args.head_dim as f64 * args.partial_rotary_factor) as usize;
    let ctx = Some(args.max_position_embeddings);
    let rope = Rope::from_config(rope_dims, args.rope_theta, false, args.rope_scaling.as_ref(), ctx)?;
    let mut spec = ModelSpec::plain(n, rope, args.tie_word_embeddings, ctx);
    spec.recurrent = (0..n).map(|l| args.is_linear(l).then_some(2)).collect();
    spec.prefix = prefix;
    a.decoder(ld, spec, layers)
}
