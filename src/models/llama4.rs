//! Llama 4 (Scout, Maverick): the text model inside mlx_lm's `llama4.py` wrapper (tensors under
//! `language_model.`). Three layers in four attend within chunks of `attention_chunk_size`
//! positions with traditional RoPE (llama3-scaled) and, with `use_qk_norm`, a weightless RMSNorm
//! of q and k after RoPE; every fourth layer attends globally without RoPE (NoPE), its queries
//! scaled up with the position (attention temperature tuning). Every
//! `interleave_moe_layer_step`-th layer is a mixture of experts: a top-1 router whose sigmoid
//! score scales the expert's input, plus a shared expert; the others a dense SwiGLU MLP. Reads
//! like mlx_lm's `models/llama4.py`.

use super::attention::{row_positions, Heads, SelfAttention};
use super::decoder::{BaseArgs, DecoderModel, ModelSpec, PreNormBlock};
use super::llama;
use super::mlp::{DenseMlp, FeedForward, Mlp};
use super::switch::{top_k, Activation, SwitchGlu};
use crate::cache::KvCache;
use crate::io::Weights;
use crate::nn::{rms_normalize, Branch, Linear, Loader, Normed, Rope, RopeTables};
use crate::ops::attention::scaled_dot_product_attention;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    pub text_config: TextArgs,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TextArgs {
    pub attention_bias: bool,
    pub attention_chunk_size: usize,
    pub head_dim: Option<usize>,
    pub hidden_size: usize,
    pub interleave_moe_layer_step: usize,
    pub intermediate_size: usize,
    pub intermediate_size_mlp: usize,
    pub max_position_embeddings: usize,
    pub num_attention_heads: usize,
    pub num_experts_per_tok: usize,
    pub num_hidden_layers: usize,
    pub num_key_value_heads: usize,
    pub num_local_experts: usize,
    pub rms_norm_eps: f64,
    pub rope_scaling: Option<serde_json::Value>,
    pub rope_theta: f64,
    pub use_qk_norm: bool,
    pub vocab_size: usize,
    #[serde(default = "default_temperature_tuning")]
    pub attn_temperature_tuning: f64,
    #[serde(default = "super::num::<8192>")]
    pub floor_scale: f64,
    #[serde(default = "default_attn_scale")]
    pub attn_scale: f64,
}

fn default_temperature_tuning() -> f64 {
    4.0
}

fn default_attn_scale() -> f64 {
    0.1
}

const PREFIX: &str = "language_model.";

/// Drops the vision tower, and turns Hugging Face's fused expert tensors (`gate_up_proj`,
/// hidden × 2·intermediate per expert; `down_proj`) into mlx's (`gate_proj` / `up_proj` /
/// `down_proj`, out × in per expert).
pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    weights.sanitize(|k| (!k.contains("vision_model") && !k.contains("multi_modal_projector")).then(|| k.to_string()));
    for l in 0..args.text_config.num_hidden_layers {
        let p = format!("{PREFIX}model.layers.{l}.feed_forward.experts");
        let fused = format!("{p}.gate_up_proj");
        if weights.contains(&fused) {
            let halves = [format!("{p}.gate_proj.weight"), format!("{p}.up_proj.weight")];
            weights.split_axis(&fused, 2, &halves)?;
            for h in &halves {
                weights.transpose(h, 1, 2)?;
            }
            weights.rename(&format!("{p}.down_proj"), &format!("{p}.down_proj.weight"))?;
            weights.transpose(&format!("{p}.down_proj.weight"), 1, 2)?;
        }
    }
    Ok(())
}

/// Where Llama 4's weightless q/k RMSNorm runs.
#[derive(Debug, Clone, Copy)]
pub enum QkNorm {
    None,
    /// before RoPE, with this epsilon (llama4_text)
    BeforeRope(f64),
    /// after RoPE, with this epsilon (llama4)
    AfterRope(f64),
}

/// Llama 4's attention: llama's projections, RoPE unless the layer is NoPE, the weightless q/k
/// norm, chunked attention in RoPE layers when `chunk` is set, and the NoPE layers' temperature
/// tuning.
pub struct Attention {
    pub llama: llama::Attention,
    pub use_rope: bool,
    pub qk_norm: QkNorm,
    pub chunk: Option<usize>,
    /// (attn_scale, floor_scale) of the NoPE layers' temperature tuning
    pub temperature: Option<(f64, f64)>,
}

impl SelfAttention for Attention {
    fn forward(&self, x: &Normed, rope: &RopeTables, cache: &mut KvCache) -> Result<Tensor> {
        let [q, k, v] = self.llama.project(x)?;
        let h: &Heads = self.llama.heads();
        let (b, l, _) = q.dims3()?;
        let split = |t: Tensor, n: usize| -> Result<Tensor> { Ok(t.reshape((b, l, n, h.head_dim))?.transpose(1, 2)?) };
        let (mut q, mut k, v) = (split(q, h.n_heads)?, split(k, h.n_kv_heads)?, split(v, h.n_kv_heads)?);
        if let QkNorm::BeforeRope(eps) = self.qk_norm {
            (q, k) = (rms_normalize(&q, eps)?, rms_normalize(&k, eps)?);
        }
        if self.use_rope {
            q = rope.apply(&q.contiguous()?)?;
            k = rope.apply(&k.contiguous()?)?;
        }
        if let QkNorm::AfterRope(eps) = self.qk_norm {
            (q, k) = (rms_normalize(&q, eps)?, rms_normalize(&k, eps)?);
        }
        if let (false, Some((attn_scale, floor_scale))) = (self.use_rope, self.temperature) {
            let scales: Vec<f32> = row_positions(cache, b, l)
                .into_iter()
                .map(|p| (1.0 + attn_scale * (((p + 1) as f64 / floor_scale).floor() + 1.0).ln()) as f32)
                .collect();
            let scales = Tensor::from_vec(scales, (b, 1, l, 1), q.device())?.to_dtype(q.dtype())?;
            q = q.broadcast_mul(&scales)?;
        }
        let mut mask = cache.mask(l);
        if self.use_rope {
            mask.chunk = self.chunk;
        }
        let (k, v) = cache.update_and_fetch(&k.contiguous()?, &v.contiguous()?)?;
        let out = scaled_dot_product_attention(&q.contiguous()?, &k, &v, h.scale, mask, None)?;
        Ok(out.transpose(1, 2)?.reshape((b, l, h.n_heads * h.head_dim))?)
    }

    fn o_proj(&self) -> &Linear {
        self.llama.o_proj()
    }

    fn input_layers(&self) -> Vec<&Linear> {
        self.llama.input_layers()
    }

    /// Not captured: a RoPE layer's chunks and a NoPE layer's temperature follow the position
    /// on the host.
    fn graphable(&self) -> bool {
        if self.use_rope {
            self.chunk.is_none()
        } else {
            self.temperature.is_none()
        }
    }
}

/// The top-1 expert, its input scaled by the router's sigmoid score, plus the shared expert.
struct MoE {
    router: Linear,
    experts: SwitchGlu,
    shared_expert: Mlp,
}

impl FeedForward for MoE {
    fn branch<'a>(&'a self, x: &Normed) -> Result<Branch<'a>> {
        let x = x.tensor()?;
        let (inds, logits) = top_k(&self.router.forward(&x)?, 1)?;
        let score = candle_nn::ops::sigmoid(&logits.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?;
        let routed = self.experts.forward(&x.broadcast_mul(&score)?, &inds)?.squeeze(D::Minus2)?;
        Ok(Branch::Tensor((routed + self.shared_expert.forward_tensor(&x)?)?))
    }

    /// The router's choices stay on the device (see `SwitchGlu::graphable`).
    fn graphable(&self) -> bool {
        self.experts.graphable()
    }
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    let a = &args.text_config;
    if a.num_experts_per_tok != 1 {
        bail!(
            "config.json: text_config.num_experts_per_tok is {}; Llama 4 routes each token to 1 expert",
            a.num_experts_per_tok
        );
    }
    if a.num_hidden_layers < 4 {
        bail!("config.json: Llama 4 has a global layer every 4 layers; {} layers are too few", a.num_hidden_layers);
    }
    let dim = a.hidden_size;
    let hd = a.head_dim.unwrap_or(dim / a.num_attention_heads);
    let rope = Rope::from_config(hd, a.rope_theta, true, a.rope_scaling.as_ref(), Some(a.max_position_embeddings))?;
    let heads = Heads::new(a.num_attention_heads, a.num_key_value_heads, hd);
    let step = a.interleave_moe_layer_step.max(1);
    let layers = (0..a.num_hidden_layers)
        .map(|l| {
            let p = format!("{PREFIX}model.layers.{l}");
            let use_rope = !(l + 1).is_multiple_of(4);
            let bias = a.attention_bias;
            let attn = Attention {
                llama: llama::Attention::load(ld, &format!("{p}.self_attn"), dim, heads, bias, bias)?,
                use_rope,
                qk_norm: if a.use_qk_norm && use_rope { QkNorm::AfterRope(1e-6) } else { QkNorm::None },
                chunk: Some(a.attention_chunk_size),
                temperature: (a.attn_temperature_tuning != 0.0).then_some((a.attn_scale, a.floor_scale)),
            };
            let f = format!("{p}.feed_forward");
            let ff: Box<dyn FeedForward> = if l % step == step - 1 {
                let e = a.num_local_experts;
                Box::new(MoE {
                    router: Linear::load(ld, &format!("{f}.router"), dim, e, false)?,
                    experts: SwitchGlu::load(
                        ld,
                        &format!("{f}.experts"),
                        e,
                        dim,
                        a.intermediate_size,
                        false,
                        Activation::Swiglu,
                    )?,
                    shared_expert: Mlp::load(ld, &format!("{f}.shared_expert"), dim, a.intermediate_size, false)?,
                })
            } else {
                Box::new(Mlp::load(ld, &f, dim, a.intermediate_size_mlp, false)?)
            };
            PreNormBlock::load(ld, &p, dim, a.rms_norm_eps, attn, ff)
        })
        .collect::<Result<Vec<_>>>()?;
    let base = BaseArgs {
        hidden_size: dim,
        num_hidden_layers: a.num_hidden_layers,
        intermediate_size: a.intermediate_size,
        num_attention_heads: a.num_attention_heads,
        rms_norm_eps: a.rms_norm_eps,
        vocab_size: a.vocab_size,
    };
    let mut spec = ModelSpec::plain(a.num_hidden_layers, rope, false, Some(a.max_position_embeddings));
    spec.prefix = PREFIX;
    base.decoder(ld, spec, layers)
}
