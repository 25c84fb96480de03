//! Granite MoE (granite-3.x MoE): llama's layers with granite's multipliers — the embedding
//! scaled by `embedding_multiplier`, attention scores by `attention_multiplier` (in place of
//! `head_dim^-0.5`), each residual branch by `residual_multiplier`, the logits divided by
//! `logits_scaling` — and in every layer a mixture of experts whose router's `k` best logits
//! are softmaxed into the experts' weights. Reads like mlx_lm's `models/granitemoe.py`.

use super::attention::{Heads, SelfAttention};
use super::decoder::{BaseArgs, DecoderModel, Layer, ModelSpec, Residual, RopeArgs};
use super::llama::Attention;
use super::mlp::FeedForward;
use super::switch::{combine, softmax, top_k, Activation, SwitchGlu};
use crate::cache::KvCache;
use crate::io::Weights;
use crate::nn::{Branch, Linear, Loader, Normed, RmsNorm, RopeTables};
use anyhow::Result;
use candle_core::DType;
use serde::Deserialize;
use std::sync::Arc;

#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    #[serde(flatten)]
    pub base: BaseArgs,
    pub logits_scaling: f64,
    pub attention_multiplier: f64,
    pub embedding_multiplier: f64,
    pub residual_multiplier: f64,
    pub max_position_embeddings: usize,
    pub num_key_value_heads: usize,
    pub attention_bias: bool,
    pub rope_theta: f64,
    pub num_local_experts: usize,
    pub num_experts_per_tok: usize,
    #[serde(flatten)]
    pub rope: RopeArgs,
    #[serde(default = "super::yes")]
    pub tie_word_embeddings: bool,
}

/// Splits Hugging Face's fused expert `input_linear` (gate rows, then up rows) and renames
/// `output_linear`, as mlx_lm's `sanitize` does.
pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    super::drop_unused(weights, args.tie_word_embeddings);
    for l in 0..args.base.num_hidden_layers {
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
struct MoE {
    router: Linear,
    switch_mlp: SwitchGlu,
    top_k: usize,
}

impl FeedForward for MoE {
    fn branch<'a>(&'a self, x: &Normed) -> Result<Branch<'a>> {
        let x = x.tensor()?;
        let (inds, logits) = top_k(&self.router.forward(&x)?, self.top_k)?;
        let w = softmax(&logits.to_dtype(DType::F32)?)?;
        Ok(Branch::Tensor(combine(&self.switch_mlp.forward(&x, &inds)?, &w)?))
    }

    /// The router's choices are read on the host to group the rows per expert.
    fn graphable(&self) -> bool {
        false
    }
}

/// Granite's layer, around its experts (granitemoe) or dense MLP (granite):
/// `h = x + attn(input_layernorm(x))·m`, `out = h + ff(post_attention_layernorm(h))·m`.
pub struct GraniteLayer<F> {
    pub self_attn: Attention,
    pub ff: F,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
    pub residual_multiplier: f64,
}

impl<F: FeedForward> Layer for GraniteLayer<F> {
    fn forward<'a>(&'a self, x: Residual<'a>, rope: &RopeTables, cache: &mut KvCache) -> Result<Residual<'a>> {
        let m = self.residual_multiplier;
        let (x, n) = x.norm(&self.input_layernorm, &self.self_attn.input_layers())?;
        let a = self.self_attn.o_proj().forward(&self.self_attn.forward(&n, rope, cache)?)?;
        let h = Residual::plus(x, Branch::Tensor((a * m)?));
        let (h, n) = h.norm(&self.post_attention_layernorm, &[])?;
        let y = Branch::resolve(Some(&self.ff.branch(&n)?))?.expect("a branch");
        Ok(Residual::plus(h, Branch::Tensor((y * m)?)))
    }

    fn graphable(&self) -> bool {
        self.ff.graphable()
    }
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    let a = &args.base;
    let (dim, e) = (a.hidden_size, args.num_local_experts);
    super::switch::check_top_k(args.num_experts_per_tok, e, "num_experts_per_tok")?;
    let hd = dim / a.num_attention_heads;
    let rope = args.rope.rope(hd, args.rope_theta, Some(args.max_position_embeddings))?;
    let heads =
        Heads { scale: args.attention_multiplier, ..Heads::new(a.num_attention_heads, args.num_key_value_heads, hd) };
    let layers = (0..a.num_hidden_layers)
        .map(|l| {
            let p = format!("model.layers.{l}");
            let m = format!("{p}.block_sparse_moe");
            let bias = args.attention_bias;
            let norm = |n: &str| RmsNorm::load(ld, &format!("{p}.{n}"), dim, a.rms_norm_eps);
            let layer = GraniteLayer {
                self_attn: Attention::load(ld, &format!("{p}.self_attn"), dim, heads, bias, bias)?,
                ff: MoE {
                    router: Linear::load(ld, &format!("{m}.router.layer"), dim, e, false)?,
                    switch_mlp: SwitchGlu::load(
                        ld,
                        &format!("{m}.switch_mlp"),
                        e,
                        dim,
                        a.intermediate_size,
                        false,
                        Activation::Swiglu,
                    )?,
                    top_k: args.num_experts_per_tok,
                },
                input_layernorm: norm("input_layernorm")?,
                post_attention_layernorm: norm("post_attention_layernorm")?,
                residual_multiplier: args.residual_multiplier,
            };
            Ok(Arc::new(layer) as Arc<dyn Layer>)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut spec =
        ModelSpec::plain(a.num_hidden_layers, rope, args.tie_word_embeddings, Some(args.max_position_embeddings));
    spec.embed_scale = Some(args.embedding_multiplier);
    spec.logits_scale = Some(1.0 / args.logits_scaling);
    a.decoder(ld, spec, layers)
}

/// mlx_lm's `quant_predicate` of granite and granitemoe (8 bits, group 64): the router, the
/// attention's output projection, every `mlp.down_proj` (the experts' too) and the head.
pub fn eight_bit(path: &str) -> bool {
    ["block_sparse_moe.router.layer", "self_attn.o_proj", "mlp.down_proj"].iter().any(|s| path.ends_with(s))
        || path == "lm_head"
}
