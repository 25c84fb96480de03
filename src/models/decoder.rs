//! The model body every decoder-only architecture shares: token embedding (optionally scaled)
//! → the architecture's layers, each with its RoPE and sliding window → final norm → head (a
//! separate `lm_head` or the tied embedding, optionally soft-capped); the residual stream the
//! layers pass along ([`Residual`]); and the [`Layer`] trait an architecture's decoder layer
//! implements.

use super::attention::SelfAttention;
use super::mlp::FeedForward;
use super::LanguageModel;
use crate::cache::KvCache;
use crate::nn::{Branch, Embedding, LayerNorm, Linear, Loader, RmsNorm, Rope, RopeTables};
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use std::sync::Arc;

/// One decoder layer as a model runs it: the residual stream in, the residual stream out.
pub trait Layer: Send + Sync {
    /// The layer on the stream `x`, leaving its own last residual branch un-added in the
    /// stream it returns (see [`Residual`]).
    fn forward<'a>(&'a self, x: Residual<'a>, rope: &RopeTables, cache: &mut KvCache) -> Result<Residual<'a>>;

    /// Whether the layer's decode step does all its work on the device, so that a CUDA graph
    /// may capture it and replay it at every position. A layer that reads values back to the
    /// host (a router's choices, say) says `false`, and its model decodes eagerly.
    fn graphable(&self) -> bool {
        true
    }

    /// The layer on hidden states `x`, giving hidden states (its branch added).
    fn forward_tensor(&self, x: &Tensor, rope: &RopeTables, cache: &mut KvCache) -> Result<Tensor> {
        self.forward(Residual::new(x.clone()), rope, cache)?.sum()
    }
}

/// The residual stream between layers: hidden states `h` plus, not yet added, the last
/// residual branch of the layer before (`h + branch` is the stream's value). The next norm
/// takes the add, and a branch that is an output projection not yet run, with it: on CUDA the
/// residual add runs inside the norm's kernel, and a decode row's projection + add + norm inside
/// the matmuls around it ([`RmsNorm::forward_branch`]); elsewhere the same values come from the
/// separate ops.
pub struct Residual<'a> {
    pub h: Tensor,
    pub branch: Option<Branch<'a>>,
}

impl<'a> Residual<'a> {
    /// `h` with nothing pending.
    pub fn new(h: Tensor) -> Self {
        Self { h, branch: None }
    }

    /// `h + branch`, the add left to the next norm.
    pub fn plus(h: Tensor, branch: Branch<'a>) -> Self {
        Self { h, branch: Some(branch) }
    }

    /// `h + out · Wᵀ` of an output projection `W` not yet run.
    pub fn plus_projection(h: Tensor, out: Tensor, w: &'a Linear) -> Self {
        Self::plus(h, Branch::Projection(out, w))
    }

    /// The stream's value, `h + branch`.
    pub fn sum(&self) -> Result<Tensor> {
        Ok(match Branch::resolve(self.branch.as_ref())? {
            Some(b) => (&self.h + b)?,
            None => self.h.clone(),
        })
    }

    /// `(s, norm(s))` of the stream's value `s`; `next`: the linear layers that take the
    /// norm's output (where all of them can take a deferred norm, it is deferred into them).
    pub fn norm(&self, norm: &RmsNorm, next: &[&Linear]) -> Result<(Tensor, crate::nn::Normed)> {
        norm.forward_branch(&self.h, self.branch.as_ref(), next)
    }

    /// Positions `start .. start + len` along `dim`.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Self> {
        Ok(Self {
            h: self.h.narrow(dim, start, len)?,
            branch: self.branch.as_ref().map(|b| b.narrow(dim, start, len)).transpose()?,
        })
    }
}

/// The decoder layer of llama and most of its descendants, around an architecture's attention
/// and MLP: `h = x + attn(input_layernorm(x))`, `out = h + mlp(post_attention_layernorm(h))`.
pub struct PreNormBlock<A, M> {
    pub self_attn: A,
    pub mlp: M,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
}

impl<A: SelfAttention, M: FeedForward> PreNormBlock<A, M> {
    /// The block of layer prefix `p` (`{p}.input_layernorm`, `{p}.post_attention_layernorm`)
    /// around `self_attn` and `mlp`.
    pub fn load(ld: &Loader, p: &str, dim: usize, eps: f64, self_attn: A, mlp: M) -> Result<Arc<dyn Layer>>
    where
        A: 'static,
        M: 'static,
    {
        let norm = |n: &str| RmsNorm::load(ld, &format!("{p}.{n}"), dim, eps);
        let (input_layernorm, post_attention_layernorm) = (norm("input_layernorm")?, norm("post_attention_layernorm")?);
        Ok(Arc::new(Self { self_attn, mlp, input_layernorm, post_attention_layernorm }))
    }
}

impl<A: SelfAttention, M: FeedForward> Layer for PreNormBlock<A, M> {
    fn forward<'a>(&'a self, x: Residual<'a>, rope: &RopeTables, cache: &mut KvCache) -> Result<Residual<'a>> {
        // h = x + attn(input_layernorm(x))
        let (x, n) = x.norm(&self.input_layernorm, &self.self_attn.input_layers())?;
        let h = Residual::plus_projection(x, self.self_attn.forward(&n, rope, cache)?, self.self_attn.o_proj());
        // h + mlp(post_attention_layernorm(h))
        let (h, n) = h.norm(&self.post_attention_layernorm, &self.mlp.input_layers())?;
        Ok(Residual::plus(h, self.mlp.branch(&n)?))
    }

    fn graphable(&self) -> bool {
        self.self_attn.graphable() && self.mlp.graphable()
    }
}

/// The config fields every decoder-only architecture has (flattened into each `ModelArgs`).
#[derive(Debug, Clone, Deserialize)]
pub struct BaseArgs {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub rms_norm_eps: f64,
    pub vocab_size: usize,
}

/// RoPE options as configs spell them (`rope_theta` is separate: its default differs by
/// architecture).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RopeArgs {
    #[serde(default)]
    pub rope_traditional: bool,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
}

impl RopeArgs {
    pub fn rope(&self, head_dim: usize, theta: f64, max_position_embeddings: Option<usize>) -> Result<Rope> {
        Rope::from_config(head_dim, theta, self.rope_traditional, self.rope_scaling.as_ref(), max_position_embeddings)
    }
}

/// What an architecture chooses on top of [`BaseArgs`] for the model body around its layers.
pub struct ModelSpec {
    /// added to every stored norm weight (1 for gemma)
    pub norm_shift: f64,
    pub tie_word_embeddings: bool,
    pub max_context: Option<usize>,
    /// the RoPEs the layers use, and which one each layer uses
    pub ropes: Vec<Rope>,
    pub layer_rope: Vec<usize>,
    /// the sliding window of each layer (`None`: full attention)
    pub windows: Vec<Option<usize>>,
    /// the embedding output is multiplied by this (gemma: sqrt(hidden_size))
    pub embed_scale: Option<f64>,
    /// `c · tanh(logits / c)` (gemma2)
    pub final_softcap: Option<f64>,
    /// the logits are multiplied by this (granite: `1 / logits_scaling`); it must be positive
    /// (a greedy step's argmax reads the unscaled logits)
    pub logits_scale: Option<f64>,
    /// the final norm is the LayerNorm of this name (phi: `model.final_layernorm`), with a
    /// bias or not, instead of the RMSNorm `final_norm`
    pub final_layernorm: Option<(&'static str, bool)>,
    /// the final RMSNorm's name (`model.norm`; LFM2: `model.embedding_norm`)
    pub final_norm: &'static str,
    /// the embedding's name (`model.embed_tokens`; Nemotron-H: `backbone.embeddings`)
    pub embed: &'static str,
    /// per layer, `Some(n)`: a recurrent layer whose cache holds `n` arrays (an `ArraysCache`)
    pub recurrent: Vec<Option<usize>>,
    pub lm_head_bias: bool,
    /// before every tensor name of the body (llama 4's text model: `language_model.`)
    pub prefix: &'static str,
    /// the untied head's name (llama4_text: `output`)
    pub head: &'static str,
}

impl ModelSpec {
    /// One RoPE for every layer, no windows, nothing gemma-specific.
    pub fn plain(n_layers: usize, rope: Rope, tie_word_embeddings: bool, max_context: Option<usize>) -> Self {
        Self {
            norm_shift: 0.0,
            tie_word_embeddings,
            max_context,
            ropes: vec![rope],
            layer_rope: vec![0; n_layers],
            windows: vec![None; n_layers],
            embed_scale: None,
            final_softcap: None,
            logits_scale: None,
            final_layernorm: None,
            final_norm: "model.norm",
            embed: "model.embed_tokens",
            recurrent: vec![None; n_layers],
            lm_head_bias: false,
            prefix: "",
            head: "lm_head",
        }
    }
}

impl BaseArgs {
    /// The model body around `layers` (`model.embed_tokens`, the final norm, the head), as
    /// `spec` describes it.
    pub fn decoder(&self, ld: &Loader, spec: ModelSpec, layers: Vec<Arc<dyn Layer>>) -> Result<DecoderModel> {
        let name = |n: &str| format!("{}{n}", spec.prefix);
        let final_norm = if let Some((n, bias)) = spec.final_layernorm {
            Norm::Layer(LayerNorm::load_with(ld, &name(n), self.hidden_size, self.rms_norm_eps, bias)?)
        } else {
            let (dim, eps) = (self.hidden_size, self.rms_norm_eps);
            Norm::Rms(RmsNorm::load_shifted(ld, &name(spec.final_norm), dim, eps, spec.norm_shift)?)
        };
        let embed_tokens = Embedding::load(ld, &name(spec.embed), self.vocab_size, self.hidden_size)?;
        let lm_head = if spec.tie_word_embeddings {
            None
        } else {
            Some(Linear::load(ld, &name(spec.head), self.hidden_size, self.vocab_size, spec.lm_head_bias)?)
        };
        Ok(DecoderModel {
            embed_tokens,
            graphable: layers.iter().all(|l| l.graphable()),
            layers,
            windows: spec.windows,
            recurrent: spec.recurrent,
            norm: final_norm,
            lm_head,
            ropes: spec.ropes,
            layer_rope: spec.layer_rope,
            embed_scale: spec.embed_scale,
            final_softcap: spec.final_softcap,
            logits_scale: spec.logits_scale,
            vocab_size: self.vocab_size,
            max_context: spec.max_context,
            dtype: ld.act_dtype,
            device: ld.device.clone(),
        })
    }
}

/// The final norm: RMSNorm, or LayerNorm (phi).
enum Norm {
    Rms(RmsNorm),
    Layer(LayerNorm),
}

impl Norm {
    /// The norm of the residual stream's sum (the add fused into an RMSNorm where it can be).
    pub fn forward_residual(&self, x: &Residual) -> Result<Tensor> {
        match self {
            Norm::Rms(n) => Ok(n.forward_residual(&x.h, Branch::resolve(x.branch.as_ref())?.as_ref())?.1),
            Norm::Layer(n) => n.forward(&x.sum()?),
        }
    }
}

/// The model body: token embedding, the layers, a final norm and the head (a separate
/// `lm_head`, or the embedding used as a linear layer when tied).
pub struct DecoderModel {
    embed_tokens: Embedding,
    layers: Vec<std::sync::Arc<dyn Layer>>,
    windows: Vec<Option<usize>>,
    recurrent: Vec<Option<usize>>,
    norm: Norm,
    lm_head: Option<Linear>,
    ropes: Vec<Rope>,
    layer_rope: Vec<usize>,
    embed_scale: Option<f64>,
    final_softcap: Option<f64>,
    logits_scale: Option<f64>,
    vocab_size: usize,
    max_context: Option<usize>,
    dtype: DType,
    device: Device,
    /// whether the layers' decode step may be captured into a CUDA graph
    graphable: bool,
}

impl DecoderModel {
    /// The forward pass, giving f32 logits; `tables`: RoPE tables to use instead of computing
    /// them (a captured decode step's, written in place before each replay). With `raw` (for a
    /// pick on the device: an argmax over the head's own dtype, which converts to f32 exactly)
    /// the logits stay in the model's dtype when the model has no final soft-capping (whose tanh
    /// in f32 could tie two of them).
    fn forward_logits(
        &self,
        tokens: &Tensor,
        cache: &mut [KvCache],
        last_only: bool,
        tables: Option<&[RopeTables]>,
        raw: bool,
    ) -> Result<Tensor> {
        let mut h = self.embed_tokens.forward(tokens)?;
        if let Some(s) = self.embed_scale {
            h = (h * s)?;
        }
        let offset = cache.first().map(|c| c.offset()).unwrap_or(0);
        let l = tokens.dim(1)?;
        let padding = cache.first().and_then(|c| c.left_padding().cloned());
        let tables = match tables {
            Some(t) => t.to_vec(),
            None => self
                .ropes
                .iter()
                .map(|r| match &padding {
                    Some(p) => r.batch_tables(offset, l, p, self.dtype, &self.device),
                    None => r.tables(offset, l, self.dtype, &self.device),
                })
                .collect::<Result<Vec<_>>>()?,
        };
        let checkpoint = super::checkpoint::active(&h, offset);
        let mut x = Residual::new(h);
        for (((layer, c), r), w) in self.layers.iter().zip(cache.iter_mut()).zip(&self.layer_rope).zip(&self.windows) {
            x = if checkpoint && w.is_none() && !c.is_arrays() && x.h.track_op() {
                // training with --grad-checkpoint: the layer's activations are recomputed in
                // the backward pass instead of kept
                Residual::new(super::checkpoint::run(layer.clone(), &x.sum()?, &tables[*r])?)
            } else {
                layer.forward(x, &tables[*r], c)?
            };
        }
        if last_only {
            x = x.narrow(1, l - 1, 1)?;
        }
        let h = self.norm.forward_residual(&x)?;
        let logits = match &self.lm_head {
            Some(head) => head.forward(&h)?,
            None => self.embed_tokens.as_linear(&h)?,
        };
        if raw && self.final_softcap.is_none() {
            return Ok(logits);
        }
        let logits = match self.logits_scale {
            Some(s) => (logits * s)?,
            None => logits,
        };
        let logits = logits.to_dtype(DType::F32)?;
        Ok(match self.final_softcap {
            Some(c) => ((logits / c)?.tanh()? * c)?,
            None => logits,
        })
    }
}

impl super::GraphStep for DecoderModel {
    fn ropes(&self) -> &[Rope] {
        &self.ropes
    }

    /// A greedy step's argmax (`raw`) reads the head's output in the model's dtype (no f32 copy).
    fn step(&self, tokens: &Tensor, cache: &mut [KvCache], tables: &[RopeTables], raw: bool) -> Result<Tensor> {
        self.forward_logits(tokens, cache, true, Some(tables), raw)
    }
}

impl LanguageModel for DecoderModel {
    fn forward(&self, tokens: &Tensor, cache: &mut [KvCache], last_only: bool) -> Result<Tensor> {
        self.forward_logits(tokens, cache, last_only, None, false)
    }

    fn graph_step(&self) -> Option<&dyn super::GraphStep> {
        self.graphable.then_some(self as &dyn super::GraphStep)
    }

    fn make_cache(&self, max_kv_size: Option<usize>) -> Vec<KvCache> {
        let caches = super::layer_caches(&self.windows, max_kv_size);
        caches.into_iter().zip(&self.recurrent).map(|(c, r)| r.map_or(c, KvCache::arrays)).collect()
    }

    fn max_context(&self) -> Option<usize> {
        self.max_context
    }

    fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn device(&self) -> &Device {
        &self.device
    }
}
