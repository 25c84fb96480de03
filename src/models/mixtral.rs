//! Mixtral: llama's attention with a sparse mixture of SwiGLU experts in place of the MLP; a
//! router picks `num_experts_per_tok` experts per token and mixes their outputs with a softmax
//! over the picked router logits. Reads like mlx_lm's `models/mixtral.py`: experts are stored
//! stacked (`switch_mlp.{gate,up,down}_proj`, first axis = expert, dense or quantized) or per
//! expert as Hugging Face writes them (`experts.{e}.w1/w2/w3`).

use super::attention::{Heads, SelfAttention};
use super::decoder::{BaseArgs, DecoderModel, Layer, ModelSpec, Residual, RopeArgs};
use super::llama::Attention;
use super::mlp::{FeedForward, Mlp};
use crate::cache::KvCache;
use crate::io::Weights;
use crate::nn::{Branch, Linear, Loader, RmsNorm, RopeTables};
use anyhow::Result;
use candle_core::{DType, Tensor};
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

/// The prefix of expert `e` of layer `l` after [`sanitize`].
fn expert(l: usize, e: usize) -> String {
    format!("model.layers.{l}.block_sparse_moe.experts.{e}")
}

/// Names each expert's projections `experts.{e}.{gate,up,down}_proj`: slices of the stacked
/// `switch_mlp` tensors, or the renamed Hugging Face `w1`, `w3`, `w2`.
pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    super::drop_unused(weights, args.tie_word_embeddings);
    weights.sanitize(|k| {
        let Some((head, tail)) = k.split_once(".block_sparse_moe.experts.") else { return Some(k.to_string()) };
        let (e, rest) = tail.split_once('.')?;
        let rest =
            rest.replacen("w1.", "gate_proj.", 1).replacen("w2.", "down_proj.", 1).replacen("w3.", "up_proj.", 1);
        Some(format!("{head}.block_sparse_moe.experts.{e}.{rest}"))
    });
    for l in 0..args.base.num_hidden_layers {
        for proj in ["gate_proj", "up_proj", "down_proj"] {
            for part in ["weight", "scales", "biases"] {
                let stacked = format!("model.layers.{l}.block_sparse_moe.switch_mlp.{proj}.{part}");
                if weights.contains(&stacked) {
                    weights.split_first_axis(&stacked, |e| format!("{}.{proj}.{part}", expert(l, e)))?;
                }
            }
        }
    }
    Ok(())
}

struct SparseMoe {
    gate: Linear,
    experts: Vec<Mlp>,
    top_k: usize,
}

impl SparseMoe {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        let flat = x.reshape((b * l, d))?;
        let logits = self.gate.forward(&flat)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        // per expert: the rows routed to it and their mixing weights
        let mut rows: Vec<Vec<u32>> = vec![vec![]; self.experts.len()];
        let mut weights: Vec<Vec<f32>> = vec![vec![]; self.experts.len()];
        for (r, g) in logits.iter().enumerate() {
            let mut order: Vec<usize> = (0..g.len()).collect();
            order.sort_by(|&a, &c| g[c].total_cmp(&g[a]));
            let picked = &order[..self.top_k];
            let max = picked.iter().map(|&e| g[e]).fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = picked.iter().map(|&e| (g[e] - max).exp()).sum();
            for &e in picked {
                rows[e].push(r as u32);
                weights[e].push((g[e] - max).exp() / sum);
            }
        }
        let mut out = Tensor::zeros((b * l, d), x.dtype(), x.device())?;
        for (e, mlp) in self.experts.iter().enumerate() {
            if rows[e].is_empty() {
                continue;
            }
            let n = rows[e].len();
            let idx = Tensor::from_vec(rows[e].clone(), n, x.device())?;
            let w = Tensor::from_vec(weights[e].clone(), (n, 1), x.device())?.to_dtype(x.dtype())?;
            let y = mlp.forward_tensor(&flat.index_select(&idx, 0)?)?.broadcast_mul(&w)?;
            out = out.index_add(&idx, &y, 0)?;
        }
        Ok(out.reshape((b, l, d))?)
    }
}

/// llama's layer with the sparse MoE in place of the MLP:
/// `h = x + attn(input_layernorm(x))`, `out = h + moe(post_attention_layernorm(h))`.
struct MixtralLayer {
    self_attn: Attention,
    moe: SparseMoe,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl Layer for MixtralLayer {
    fn forward<'a>(&'a self, x: Residual<'a>, rope: &RopeTables, cache: &mut KvCache) -> Result<Residual<'a>> {
        let (x, n) = x.norm(&self.input_layernorm, &self.self_attn.input_layers())?;
        let h = Residual::plus_projection(x, self.self_attn.forward(&n, rope, cache)?, self.self_attn.o_proj());
        let (h, n) = h.norm(&self.post_attention_layernorm, &[])?;
        Ok(Residual::plus(h, Branch::Tensor(self.moe.forward(&n.tensor()?)?)))
    }

    /// The router's choices are read on the host to group the rows per expert.
    fn graphable(&self) -> bool {
        false
    }
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    let a = &args.base;
    let (dim, eps) = (a.hidden_size, a.rms_norm_eps);
    let head_dim = dim / a.num_attention_heads;
    let heads = Heads::new(a.num_attention_heads, args.num_key_value_heads.unwrap_or(a.num_attention_heads), head_dim);
    let layers = (0..a.num_hidden_layers)
        .map(|l| {
            let p = format!("model.layers.{l}");
            let experts = (0..args.num_local_experts)
                .map(|e| Mlp::load(ld, &expert(l, e), dim, a.intermediate_size, false))
                .collect::<Result<Vec<_>>>()?;
            let gate = Linear::load(ld, &format!("{p}.block_sparse_moe.gate"), dim, args.num_local_experts, false)?;
            let layer = MixtralLayer {
                self_attn: Attention::load(ld, &format!("{p}.self_attn"), dim, heads, false, false)?,
                moe: SparseMoe { gate, experts, top_k: args.num_experts_per_tok },
                input_layernorm: RmsNorm::load(ld, &format!("{p}.input_layernorm"), dim, eps)?,
                post_attention_layernorm: RmsNorm::load(ld, &format!("{p}.post_attention_layernorm"), dim, eps)?,
            };
            Ok(std::sync::Arc::new(layer) as std::sync::Arc<dyn Layer>)
        })
        .collect::<Result<Vec<_>>>()?;
    let rope = args.rope.rope(head_dim, args.rope_theta, None)?;
    let spec = ModelSpec::plain(a.num_hidden_layers, rope, args.tie_word_embeddings, None);
    a.decoder(ld, spec, layers)
}
