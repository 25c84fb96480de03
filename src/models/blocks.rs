//! The pieces decoder-only architectures share, so each architecture file only says what is its
//! own (config fields, weight names, which options it uses): attention with optional q/k/v bias
//! and per-head q/k norms, the gated MLP, the pre-norm decoder layer, and the model body
//! (embedding → layers → norm → head) that implements [`LanguageModel`].

use super::LanguageModel;
use crate::cache::KvCache;
use crate::nn::{scaled_dot_product_attention, swiglu, Embedding, Linear, Loader, RmsNorm, Rope, RopeTables};
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

/// Shapes and options of one attention layer.
#[derive(Debug, Clone)]
pub struct AttentionSpec {
    pub hidden: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// bias on q, k and v
    pub qkv_bias: bool,
    /// bias on the output projection
    pub o_bias: bool,
    /// RMSNorm over each head of q and k before RoPE (qwen3), with this eps
    pub qk_norm: Option<f64>,
}

pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    scale: f64,
}

impl Attention {
    /// Loads `{p}.{q,k,v,o}_proj` (and `{p}.{q,k}_norm`).
    pub fn load(s: &AttentionSpec, ld: &Loader, p: &str) -> Result<Self> {
        let (dim, h, kv, hd) = (s.hidden, s.n_heads, s.n_kv_heads, s.head_dim);
        let norm = |n: &str| s.qk_norm.map(|eps| RmsNorm::load(ld, &format!("{p}.{n}"), hd, eps)).transpose();
        Ok(Self {
            q_proj: Linear::load(ld, &format!("{p}.q_proj"), dim, h * hd, s.qkv_bias)?,
            k_proj: Linear::load(ld, &format!("{p}.k_proj"), dim, kv * hd, s.qkv_bias)?,
            v_proj: Linear::load(ld, &format!("{p}.v_proj"), dim, kv * hd, s.qkv_bias)?,
            o_proj: Linear::load(ld, &format!("{p}.o_proj"), h * hd, dim, s.o_bias)?,
            q_norm: norm("q_norm")?,
            k_norm: norm("k_norm")?,
            n_heads: h,
            n_kv_heads: kv,
            head_dim: hd,
            scale: (hd as f64).powf(-0.5),
        })
    }

    pub fn forward(&self, x: &Tensor, rope: &RopeTables, cache: &mut KvCache) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let heads = |t: Tensor, n: usize, norm: &Option<RmsNorm>| -> Result<Tensor> {
            let t = t.reshape((b, l, n, self.head_dim))?;
            let t = match norm {
                Some(nm) => nm.forward(&t)?,
                None => t,
            };
            Ok(t.transpose(1, 2)?)
        };
        let q = heads(self.q_proj.forward(x)?, self.n_heads, &self.q_norm)?;
        let k = heads(self.k_proj.forward(x)?, self.n_kv_heads, &self.k_norm)?;
        let v = heads(self.v_proj.forward(x)?, self.n_kv_heads, &None)?;
        let mask = cache.mask(l);
        let q = rope.apply(&q.contiguous()?)?;
        let k = rope.apply(&k.contiguous()?)?;
        let (k, v) = cache.update_and_fetch(&k, &v)?;
        let out = scaled_dot_product_attention(&q, &k, &v, self.scale, mask)?;
        let out = out.transpose(1, 2)?.reshape((b, l, self.n_heads * self.head_dim))?;
        self.o_proj.forward(&out)
    }
}

/// `down(silu(gate(x)) * up(x))`.
pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    pub fn load(ld: &Loader, p: &str, dim: usize, hidden: usize, bias: bool) -> Result<Self> {
        Ok(Self {
            gate_proj: Linear::load(ld, &format!("{p}.gate_proj"), dim, hidden, bias)?,
            up_proj: Linear::load(ld, &format!("{p}.up_proj"), dim, hidden, bias)?,
            down_proj: Linear::load(ld, &format!("{p}.down_proj"), hidden, dim, bias)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.down_proj.forward(&swiglu(&self.gate_proj.forward(x)?, &self.up_proj.forward(x)?)?)
    }
}

/// One decoder layer as a model runs it: hidden states in, hidden states out.
pub trait Layer: Send + Sync {
    fn forward(&self, x: &Tensor, rope: &RopeTables, cache: &mut KvCache) -> Result<Tensor>;
}

/// The pre-norm layer of llama-like models: `h = x + attn(norm(x)); h + mlp(norm(h))`.
pub struct PreNormLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl PreNormLayer {
    /// Loads `{p}.self_attn`, `{p}.mlp` and the two RMSNorms of layer prefix `p`.
    pub fn load(
        attn: &AttentionSpec,
        ld: &Loader,
        p: &str,
        mlp_hidden: usize,
        mlp_bias: bool,
        eps: f64,
    ) -> Result<Self> {
        let d = attn.hidden;
        Ok(Self {
            self_attn: Attention::load(attn, ld, &format!("{p}.self_attn"))?,
            mlp: Mlp::load(ld, &format!("{p}.mlp"), d, mlp_hidden, mlp_bias)?,
            input_layernorm: RmsNorm::load(ld, &format!("{p}.input_layernorm"), d, eps)?,
            post_attention_layernorm: RmsNorm::load(ld, &format!("{p}.post_attention_layernorm"), d, eps)?,
        })
    }
}

impl Layer for PreNormLayer {
    fn forward(&self, x: &Tensor, rope: &RopeTables, cache: &mut KvCache) -> Result<Tensor> {
        let h = (x + self.self_attn.forward(&self.input_layernorm.forward(x)?, rope, cache)?)?;
        Ok((&h + self.mlp.forward(&self.post_attention_layernorm.forward(&h)?)?)?)
    }
}

/// The model body: token embedding, the layers, a final norm and the head (a separate
/// `lm_head`, or the embedding used as a linear layer when tied).
pub struct DecoderModel {
    embed_tokens: Embedding,
    layers: Vec<Box<dyn Layer>>,
    /// the sliding window of each layer
    windows: Vec<Option<usize>>,
    norm: RmsNorm,
    lm_head: Option<Linear>,
    rope: Rope,
    vocab_size: usize,
    max_context: Option<usize>,
    dtype: DType,
    device: Device,
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

/// What a llama-like architecture chooses on top of [`BaseArgs`].
pub struct PreNormSpec {
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub qkv_bias: bool,
    pub o_bias: bool,
    /// RMSNorm (with `rms_norm_eps`) over each head of q and k
    pub qk_norm: bool,
    pub mlp_bias: bool,
    pub tie_word_embeddings: bool,
    pub max_context: Option<usize>,
    pub rope: Rope,
    /// the sliding window of each layer (`None`: full attention)
    pub windows: Vec<Option<usize>>,
}

impl BaseArgs {
    /// A model of [`PreNormLayer`]s (`model.layers.{i}`) as `spec` describes it.
    pub fn prenorm_model(&self, ld: &Loader, spec: PreNormSpec) -> Result<DecoderModel> {
        let attn = AttentionSpec {
            hidden: self.hidden_size,
            n_heads: self.num_attention_heads,
            n_kv_heads: spec.n_kv_heads,
            head_dim: spec.head_dim,
            qkv_bias: spec.qkv_bias,
            o_bias: spec.o_bias,
            qk_norm: spec.qk_norm.then_some(self.rms_norm_eps),
        };
        let layers = (0..self.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                let l = PreNormLayer::load(&attn, ld, &p, self.intermediate_size, spec.mlp_bias, self.rms_norm_eps)?;
                Ok(Box::new(l) as Box<dyn Layer>)
            })
            .collect::<Result<Vec<_>>>()?;
        DecoderModel::load(self, ld, layers, spec)
    }
}

impl DecoderModel {
    /// Loads `model.embed_tokens`, `model.norm` and (untied) `lm_head` around `layers`.
    pub fn load(a: &BaseArgs, ld: &Loader, layers: Vec<Box<dyn Layer>>, spec: PreNormSpec) -> Result<Self> {
        let embed_tokens = Embedding::load(ld, "model.embed_tokens", a.vocab_size, a.hidden_size)?;
        let norm = RmsNorm::load(ld, "model.norm", a.hidden_size, a.rms_norm_eps)?;
        let lm_head = if spec.tie_word_embeddings {
            None
        } else {
            Some(Linear::load(ld, "lm_head", a.hidden_size, a.vocab_size, false)?)
        };
        Ok(Self {
            embed_tokens,
            layers,
            windows: spec.windows,
            norm,
            lm_head,
            rope: spec.rope,
            vocab_size: a.vocab_size,
            max_context: spec.max_context,
            dtype: ld.act_dtype,
            device: ld.device.clone(),
        })
    }
}

impl LanguageModel for DecoderModel {
    fn forward(&self, tokens: &Tensor, cache: &mut [KvCache], last_only: bool) -> Result<Tensor> {
        let mut h = self.embed_tokens.forward(tokens)?;
        let offset = cache.first().map(|c| c.offset()).unwrap_or(0);
        let rope = self.rope.tables(offset, tokens.dim(1)?, self.dtype, &self.device)?;
        for (layer, c) in self.layers.iter().zip(cache.iter_mut()) {
            h = layer.forward(&h, &rope, c)?;
        }
        if last_only {
            let l = h.dim(1)?;
            h = h.narrow(1, l - 1, 1)?;
        }
        let h = self.norm.forward(&h)?;
        let logits = match &self.lm_head {
            Some(head) => head.forward(&h)?,
            None => self.embed_tokens.as_linear(&h)?,
        };
        Ok(logits.to_dtype(DType::F32)?)
    }

    fn make_cache(&self, max_kv_size: Option<usize>) -> Vec<KvCache> {
        super::layer_caches(&self.windows, max_kv_size)
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
