//! Llama (and mistral; SmolLM2, Llama 2/3): GQA attention with RoPE, RMSNorm, SwiGLU MLP,
//! optionally tied embeddings, sliding-window layers where `layer_types` names them (a rotating
//! cache of `sliding_window` positions). Reads like mlx_lm's `models/llama.py`, which also
//! ignores a `sliding_window` that no `layer_types` entry uses.

use super::attention::{qkv, Heads, QkNorms, SelfAttention};
use super::decoder::{BaseArgs, DecoderModel, ModelSpec, PreNormBlock, RopeArgs};
use super::mlp::Mlp;
use crate::cache::KvCache;
use crate::io::Weights;
use crate::nn::{Linear, Loader, Normed, RopeTables};
use anyhow::Result;
use candle_core::Tensor;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    #[serde(flatten)]
    pub base: BaseArgs,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "super::num::<10000>")]
    pub rope_theta: f64,
    #[serde(flatten)]
    pub rope: RopeArgs,
    #[serde(default = "super::yes")]
    pub tie_word_embeddings: bool,
    /// `full_attention` or `sliding_attention` per layer
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default)]
    pub sliding_window: Option<usize>,
}

impl ModelArgs {
    pub fn n_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.base.num_attention_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.base.hidden_size / self.base.num_attention_heads)
    }
    /// The sliding window of each layer (`None`: full attention), as `layer_types` says.
    pub fn windows(&self) -> Result<Vec<Option<usize>>> {
        let n = self.base.num_hidden_layers;
        let Some(types) = &self.layer_types else { return Ok(vec![None; n]) };
        sliding_layers(types, n)?
            .into_iter()
            .enumerate()
            .map(|(i, sliding)| match (sliding, self.sliding_window) {
                (false, _) => Ok(None),
                (true, Some(w)) if w > 0 => Ok(Some(w)),
                (true, _) => {
                    anyhow::bail!("config.json: layer {i} is `sliding_attention` but `sliding_window` is missing")
                }
            })
            .collect()
    }
}

/// Whether each of the first `n` layers of `layer_types` is `sliding_attention` (or
/// `full_attention`).
pub fn sliding_layers(types: &[String], n: usize) -> Result<Vec<bool>> {
    if types.len() < n {
        anyhow::bail!("config.json: layer_types has {} entries for {n} layers", types.len());
    }
    types[..n]
        .iter()
        .enumerate()
        .map(|(i, t)| match t.as_str() {
            "sliding_attention" => Ok(true),
            "full_attention" => Ok(false),
            other => {
                anyhow::bail!("config.json: layer_types[{i}] = `{other}`; expected full_attention or sliding_attention")
            }
        })
        .collect()
}

/// Drops precomputed rotary frequencies and, with tied embeddings, a stray `lm_head`.
pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    super::drop_unused(weights, args.tie_word_embeddings);
    Ok(())
}

/// llama's attention: separate q/k/v projections (biased with `attention_bias`, as the output
/// projection), RoPE, grouped-query attention over the cache.
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: Heads,
    /// false in a NoPE layer
    use_rope: bool,
}

impl Attention {
    /// `{p}.{q,k,v,o}_proj` of `heads` over `hidden` features; `qkv_bias` on q, k and v,
    /// `o_bias` on the output.
    pub fn load(ld: &Loader, p: &str, hidden: usize, heads: Heads, qkv_bias: bool, o_bias: bool) -> Result<Self> {
        let [q_proj, k_proj, v_proj] = heads.load_qkv(ld, p, hidden, qkv_bias)?;
        let o_proj = heads.load_out(ld, p, "o_proj", hidden, o_bias)?;
        Ok(Self::new([q_proj, k_proj, v_proj], o_proj, heads))
    }

    /// From its projections (phi names the output one `dense`).
    pub fn new([q_proj, k_proj, v_proj]: [Linear; 3], o_proj: Linear, heads: Heads) -> Self {
        Self { q_proj, k_proj, v_proj, o_proj, heads, use_rope: true }
    }

    /// The same attention with RoPE (`true`) or without it (a NoPE layer: SmolLM3, Cohere 2).
    pub fn with_rope(self, use_rope: bool) -> Self {
        Self { use_rope, ..self }
    }
}

impl Attention {
    /// The queries, keys and values of `x` (B, L, heads·head_dim each).
    pub fn project(&self, x: &Normed) -> Result<[Tensor; 3]> {
        qkv(x, &self.q_proj, &self.k_proj, &self.v_proj)
    }

    pub fn heads(&self) -> &Heads {
        &self.heads
    }

    /// `rope`, or none in a NoPE layer.
    pub fn rope<'a>(&self, rope: &'a RopeTables) -> Option<&'a RopeTables> {
        self.use_rope.then_some(rope)
    }
}

impl SelfAttention for Attention {
    fn forward(&self, x: &Normed, rope: &RopeTables, cache: &mut KvCache) -> Result<Tensor> {
        self.heads.attend_with(self.project(x)?, QkNorms::None, self.rope(rope), cache)
    }

    fn o_proj(&self) -> &Linear {
        &self.o_proj
    }

    fn input_layers(&self) -> Vec<&Linear> {
        vec![&self.q_proj, &self.k_proj, &self.v_proj]
    }
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    load_with(args, ld, "")
}

/// The model with every tensor name under `prefix` (mistral3's text model: `language_model.`).
pub fn load_with(args: &ModelArgs, ld: &Loader, prefix: &'static str) -> Result<DecoderModel> {
    let a = &args.base;
    let (hd, ctx) = (args.head_dim(), args.max_position_embeddings);
    let rope = args.rope.rope(hd, args.rope_theta, ctx)?;
    let heads = Heads::new(a.num_attention_heads, args.n_kv_heads(), hd);
    let layers = (0..a.num_hidden_layers)
        .map(|i| {
            let p = format!("{prefix}model.layers.{i}");
            let bias = args.attention_bias;
            let attn = Attention::load(ld, &format!("{p}.self_attn"), a.hidden_size, heads, bias, bias)?;
            let mlp = Mlp::load(ld, &format!("{p}.mlp"), a.hidden_size, a.intermediate_size, args.mlp_bias)?;
            PreNormBlock::load(ld, &p, a.hidden_size, a.rms_norm_eps, attn, mlp)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut spec = ModelSpec::plain(a.num_hidden_layers, rope, args.tie_word_embeddings, ctx);
    spec.windows = args.windows()?;
    spec.prefix = prefix;
    a.decoder(ld, spec, layers)
}
