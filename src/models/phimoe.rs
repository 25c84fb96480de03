//! Phi-3.5-MoE / Phi-mini-MoE (`phimoe`): attention with biases everywhere and Phi-3's
//! "longrope" RoPE (always the long factors), LayerNorms, an `lm_head` with a bias, and in every
//! layer a mixture of experts routed by "sparsemixer": the `k` experts are taken one after
//! another by their router logits, each weighted by a softmax over the logits within a band
//! (relative to `router_jitter_noise`) of its own. Reads like mlx_lm's `models/phimoe.py`.

use super::attention::{Heads, SelfAttention};
use super::decoder::{BaseArgs, DecoderModel, Layer, ModelSpec, Residual};
use super::llama::Attention;
use super::switch::{combine, stack_experts, Activation, SwitchGlu};
use crate::cache::KvCache;
use crate::io::Weights;
use crate::nn::{Branch, LayerNorm, Linear, Loader, Normed, Rope, RopeTables};
use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use serde::Deserialize;
use std::sync::Arc;

#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    #[serde(default = "super::count::<32064>")]
    pub vocab_size: usize,
    #[serde(default = "super::count::<4096>")]
    pub hidden_size: usize,
    #[serde(default = "super::count::<6400>")]
    pub intermediate_size: usize,
    #[serde(default = "super::count::<32>")]
    pub num_hidden_layers: usize,
    #[serde(default = "super::count::<32>")]
    pub num_attention_heads: usize,
    #[serde(default = "super::count::<8>")]
    pub num_key_value_heads: usize,
    #[serde(default = "super::count::<131072>")]
    pub max_position_embeddings: usize,
    #[serde(default = "super::count::<4096>")]
    pub original_max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default = "super::count::<16>")]
    pub num_local_experts: usize,
    #[serde(default = "super::count::<2>")]
    pub num_experts_per_tok: usize,
    #[serde(default = "super::num::<10000>")]
    pub rope_theta: f64,
    #[serde(default = "default_jitter")]
    pub router_jitter_noise: f64,
}

fn default_eps() -> f64 {
    1e-6
}

fn default_jitter() -> f64 {
    0.01
}

/// Stacks Hugging Face's per-expert `experts.{e}.w1/w2/w3` into `switch_mlp`.
pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    super::drop_unused(weights, false);
    let p = |l: usize| format!("model.layers.{l}.block_sparse_moe");
    stack_experts(
        weights,
        args.num_hidden_layers,
        args.num_local_experts,
        &[("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")],
        |l, e, n| format!("{}.experts.{e}.{n}", p(l)),
        |l, n| format!("{}.switch_mlp.{n}", p(l)),
    )
}

/// Sparsemixer's choices for one row of router logits: `k` experts in the order taken, each
/// with its weight.
fn sparsemixer(gates: &[f32], k: usize, eps: f32) -> (Vec<u32>, Vec<f32>) {
    let mut masked = gates.to_vec();
    let (mut inds, mut scores) = (vec![], vec![]);
    for _ in 0..k {
        // the first largest (argmax's tie rule)
        let (ind, top) =
            masked.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b });
        // a softmax over the logits within the band of the chosen one
        let band: Vec<f32> = gates
            .iter()
            .zip(&masked)
            .map(|(&g, &m)| if (top - g) / g.abs().max(top) > 2.0 * eps { f32::NEG_INFINITY } else { m })
            .collect();
        let max = band.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = band.iter().map(|&v| (v - max).exp()).sum();
        scores.push((band[ind] - max).exp() / sum);
        inds.push(ind as u32);
        masked[ind] = f32::NEG_INFINITY;
    }
    (inds, scores)
}

struct MoE {
    gate: Linear,
    switch_mlp: SwitchGlu,
    top_k: usize,
    jitter: f64,
}

impl MoE {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gates = self.gate.forward(x)?;
        let lead = gates.dims()[..gates.rank() - 1].to_vec();
        let rows: Vec<Vec<f32>> = gates.flatten_to(gates.rank() - 2)?.to_dtype(DType::F32)?.to_vec2()?;
        let (mut inds, mut scores) = (vec![], vec![]);
        for r in &rows {
            let (i, s) = sparsemixer(r, self.top_k, self.jitter as f32);
            inds.extend(i);
            scores.extend(s);
        }
        let shape: Vec<usize> = lead.iter().copied().chain([self.top_k]).collect();
        let inds = Tensor::from_vec(inds, shape.as_slice(), x.device())?;
        let scores = Tensor::from_vec(scores, shape.as_slice(), x.device())?;
        combine(&self.switch_mlp.forward(x, &inds)?, &scores)
    }
}

/// `h = x + attn(input_layernorm(x))`, `out = h + moe(post_attention_layernorm(h))`.
struct PhiMoeLayer {
    self_attn: Attention,
    moe: MoE,
    input_layernorm: LayerNorm,
    post_attention_layernorm: LayerNorm,
}

impl Layer for PhiMoeLayer {
    fn forward<'a>(&'a self, x: Residual<'a>, rope: &RopeTables, cache: &mut KvCache) -> Result<Residual<'a>> {
        let x = x.sum()?;
        let n = Normed::Plain(self.input_layernorm.forward(&x)?);
        let h = (&x + self.self_attn.o_proj().forward(&self.self_attn.forward(&n, rope, cache)?)?)?;
        let m = self.moe.forward(&self.post_attention_layernorm.forward(&h)?)?;
        Ok(Residual::plus(h, Branch::Tensor(m)))
    }

    /// The router's choices are read on the host.
    fn graphable(&self) -> bool {
        false
    }
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    let (dim, e, eps) = (args.hidden_size, args.num_local_experts, args.rms_norm_eps);
    super::switch::check_top_k(args.num_experts_per_tok, e, "num_experts_per_tok")?;
    let hd = dim / args.num_attention_heads;
    let rope = match &args.rope_scaling {
        None => Rope::from_config(hd, args.rope_theta, false, None, None)?,
        Some(s) => {
            let long = s.get("long_factor").context("config.json: rope_scaling needs `long_factor`")?;
            let mscale = s.get("long_mscale").and_then(|v| v.as_f64());
            let (max, orig) = (args.max_position_embeddings, args.original_max_position_embeddings);
            Rope::su_scaled(hd, args.rope_theta, max, orig, long, mscale)?
        }
    };
    let heads = Heads::new(args.num_attention_heads, args.num_key_value_heads, hd);
    let layers = (0..args.num_hidden_layers)
        .map(|l| {
            let p = format!("model.layers.{l}");
            let m = format!("{p}.block_sparse_moe");
            let norm = |n: &str| LayerNorm::load(ld, &format!("{p}.{n}"), dim, eps);
            let layer = PhiMoeLayer {
                self_attn: Attention::load(ld, &format!("{p}.self_attn"), dim, heads, true, true)?,
                moe: MoE {
                    gate: Linear::load(ld, &format!("{m}.gate"), dim, e, false)?,
                    switch_mlp: SwitchGlu::load(
                        ld,
                        &format!("{m}.switch_mlp"),
                        e,
                        dim,
                        args.intermediate_size,
                        false,
                        Activation::Swiglu,
                    )?,
                    top_k: args.num_experts_per_tok,
                    jitter: args.router_jitter_noise,
                },
                input_layernorm: norm("input_layernorm")?,
                post_attention_layernorm: norm("post_attention_layernorm")?,
            };
            Ok(Arc::new(layer) as Arc<dyn Layer>)
        })
        .collect::<Result<Vec<_>>>()?;
    let base = BaseArgs {
        hidden_size: dim,
        num_hidden_layers: args.num_hidden_layers,
        intermediate_size: args.intermediate_size,
        num_attention_heads: args.num_attention_heads,
        rms_norm_eps: eps,
        vocab_size: args.vocab_size,
    };
    let mut spec = ModelSpec::plain(args.num_hidden_layers, rope, false, Some(args.max_position_embeddings));
    spec.final_layernorm = Some(("model.norm", true));
    spec.lm_head_bias = true;
    base.decoder(ld, spec, layers)
}
