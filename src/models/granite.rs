//! Granite (granite-3.x dense): llama's layers with granite's multipliers — the embedding
//! scaled by `embedding_multiplier`, attention scores by `attention_multiplier` (in place of
//! `head_dim^-0.5`), each residual branch by `residual_multiplier`, the logits divided by
//! `logits_scaling` — around a SwiGLU MLP. Reads like mlx_lm's `models/granite.py`; granitemoe
//! is the same body around experts ([`load_with`]).

use super::attention::{Heads, SelfAttention};
use super::decoder::{BaseArgs, DecoderModel, Layer, ModelSpec, Residual, RopeArgs};
use super::llama::Attention;
use super::mlp::{FeedForward, Mlp};
use crate::cache::KvCache;
use crate::io::Weights;
use crate::nn::{Branch, Loader, RmsNorm, RopeTables};
use anyhow::Result;
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
    #[serde(default)]
    pub mlp_bias: bool,
    pub rope_theta: f64,
    #[serde(flatten)]
    pub rope: RopeArgs,
    #[serde(default = "super::yes")]
    pub tie_word_embeddings: bool,
}

pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    super::drop_unused(weights, args.tie_word_embeddings);
    Ok(())
}

/// Granite's layer around its mixer (attention, or granitemoehybrid's Mamba2) and its
/// feed-forward part `ff` (a dense MLP, or granitemoe's experts):
/// `h = x + attn(input_layernorm(x))·m`, `out = h + ff(post_attention_layernorm(h))·m`.
pub struct GraniteLayer<F, A = Attention> {
    pub self_attn: A,
    pub ff: F,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
    pub residual_multiplier: f64,
}

impl<F: FeedForward, A: SelfAttention> Layer for GraniteLayer<F, A> {
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
        self.self_attn.graphable() && self.ff.graphable()
    }
}

/// Granite's body with the feed-forward part `ff(layer prefix)` in each layer.
pub fn load_with<F: FeedForward + 'static>(
    args: &ModelArgs,
    ld: &Loader,
    ff: impl Fn(&str) -> Result<F>,
) -> Result<DecoderModel> {
    let a = &args.base;
    let dim = a.hidden_size;
    let hd = dim / a.num_attention_heads;
    let ctx = Some(args.max_position_embeddings);
    let rope = args.rope.rope(hd, args.rope_theta, ctx)?;
    let heads =
        Heads { scale: args.attention_multiplier, ..Heads::new(a.num_attention_heads, args.num_key_value_heads, hd) };
    let layers = (0..a.num_hidden_layers)
        .map(|l| {
            let p = format!("model.layers.{l}");
            let bias = args.attention_bias;
            let norm = |n: &str| RmsNorm::load(ld, &format!("{p}.{n}"), dim, a.rms_norm_eps);
            let layer = GraniteLayer {
                self_attn: Attention::load(ld, &format!("{p}.self_attn"), dim, heads, bias, bias)?,
                ff: ff(&p)?,
                input_layernorm: norm("input_layernorm")?,
                post_attention_layernorm: norm("post_attention_layernorm")?,
                residual_multiplier: args.residual_multiplier,
            };
            Ok(Arc::new(layer) as Arc<dyn Layer>)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut spec = ModelSpec::plain(a.num_hidden_layers, rope, args.tie_word_embeddings, ctx);
    spec.embed_scale = Some(args.embedding_multiplier);
    spec.logits_scale = Some(1.0 / args.logits_scaling);
    a.decoder(ld, spec, layers)
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    let (dim, hidden) = (args.base.hidden_size, args.base.intermediate_size);
    load_with(args, ld, |p| Mlp::load(ld, &format!("{p}.mlp"), dim, hidden, args.mlp_bias))
}

/// mlx_lm's `quant_predicate` of granite and granitemoe (8 bits, group 64): the attention's
/// output projection, every `mlp.down_proj` (the experts' too), the head, and granitemoe's router.
pub fn eight_bit(path: &str) -> bool {
    ["block_sparse_moe.router.layer", "self_attn.o_proj", "mlp.down_proj"].iter().any(|s| path.ends_with(s))
        || path == "lm_head"
}
