//! Llama (and mistral without a sliding window; SmolLM2, Llama 2/3): GQA attention with RoPE,
//! RMSNorm, SwiGLU MLP, optionally tied embeddings. Reads like mlx_lm's `models/llama.py`.

use super::LanguageModel;
use crate::cache::KvCache;
use crate::load::Weights;
use crate::nn::{scaled_dot_product_attention, swiglu, Embedding, Linear, Loader, RmsNorm, Rope, RopeTables};
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    pub model_type: String,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub rms_norm_eps: f64,
    pub vocab_size: usize,
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
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_traditional: bool,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
}

fn default_rope_theta() -> f64 {
    10000.0
}
fn yes() -> bool {
    true
}

impl ModelArgs {
    fn n_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }
}

/// Drops precomputed rotary frequencies and, with tied embeddings, a stray `lm_head`.
pub fn sanitize(args: &ModelArgs, weights: &mut Weights) {
    let tied = args.tie_word_embeddings;
    weights.sanitize(|k| {
        if k.contains("self_attn.rotary_emb.inv_freq") || (tied && k == "lm_head.weight") {
            None
        } else {
            Some(k.to_string())
        }
    });
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    scale: f64,
}

impl Attention {
    fn load(args: &ModelArgs, ld: &Loader, p: &str) -> Result<Self> {
        let (dim, h, kv, hd) = (args.hidden_size, args.num_attention_heads, args.n_kv_heads(), args.head_dim());
        let b = args.attention_bias;
        Ok(Self {
            q_proj: Linear::load(ld, &format!("{p}.q_proj"), dim, h * hd, b)?,
            k_proj: Linear::load(ld, &format!("{p}.k_proj"), dim, kv * hd, b)?,
            v_proj: Linear::load(ld, &format!("{p}.v_proj"), dim, kv * hd, b)?,
            o_proj: Linear::load(ld, &format!("{p}.o_proj"), h * hd, dim, b)?,
            n_heads: h,
            n_kv_heads: kv,
            head_dim: hd,
            scale: (hd as f64).powf(-0.5),
        })
    }

    fn forward(&self, x: &Tensor, rope: &RopeTables, cache: &mut KvCache) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let q = self.q_proj.forward(x)?.reshape((b, l, self.n_heads, self.head_dim))?.transpose(1, 2)?;
        let k = self.k_proj.forward(x)?.reshape((b, l, self.n_kv_heads, self.head_dim))?.transpose(1, 2)?;
        let v = self.v_proj.forward(x)?.reshape((b, l, self.n_kv_heads, self.head_dim))?.transpose(1, 2)?;
        let offset = cache.offset();
        let q = rope.apply(&q.contiguous()?)?;
        let k = rope.apply(&k.contiguous()?)?;
        let (k, v) = cache.update_and_fetch(&k, &v)?;
        let out = scaled_dot_product_attention(&q, &k, &v, self.scale, offset)?;
        let out = out.transpose(1, 2)?.reshape((b, l, self.n_heads * self.head_dim))?;
        self.o_proj.forward(&out)
    }
}

struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn load(args: &ModelArgs, ld: &Loader, p: &str) -> Result<Self> {
        let (d, h, b) = (args.hidden_size, args.intermediate_size, args.mlp_bias);
        Ok(Self {
            gate_proj: Linear::load(ld, &format!("{p}.gate_proj"), d, h, b)?,
            up_proj: Linear::load(ld, &format!("{p}.up_proj"), d, h, b)?,
            down_proj: Linear::load(ld, &format!("{p}.down_proj"), h, d, b)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.down_proj.forward(&swiglu(&self.gate_proj.forward(x)?, &self.up_proj.forward(x)?)?)
    }
}

struct TransformerBlock {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl TransformerBlock {
    fn load(args: &ModelArgs, ld: &Loader, p: &str) -> Result<Self> {
        let (d, eps) = (args.hidden_size, args.rms_norm_eps);
        Ok(Self {
            self_attn: Attention::load(args, ld, &format!("{p}.self_attn"))?,
            mlp: Mlp::load(args, ld, &format!("{p}.mlp"))?,
            input_layernorm: RmsNorm::load(ld, &format!("{p}.input_layernorm"), d, eps)?,
            post_attention_layernorm: RmsNorm::load(ld, &format!("{p}.post_attention_layernorm"), d, eps)?,
        })
    }

    fn forward(&self, x: &Tensor, rope: &RopeTables, cache: &mut KvCache) -> Result<Tensor> {
        let h = (x + self.self_attn.forward(&self.input_layernorm.forward(x)?, rope, cache)?)?;
        Ok((&h + self.mlp.forward(&self.post_attention_layernorm.forward(&h)?)?)?)
    }
}

pub struct Model {
    args: ModelArgs,
    embed_tokens: Embedding,
    layers: Vec<TransformerBlock>,
    norm: RmsNorm,
    lm_head: Option<Linear>,
    rope: Rope,
    dtype: DType,
    device: Device,
}

impl Model {
    pub fn load(args: ModelArgs, ld: &Loader) -> Result<Self> {
        let embed_tokens = Embedding::load(ld, "model.embed_tokens", args.vocab_size, args.hidden_size)?;
        let layers = (0..args.num_hidden_layers)
            .map(|i| TransformerBlock::load(&args, ld, &format!("model.layers.{i}")))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(ld, "model.norm", args.hidden_size, args.rms_norm_eps)?;
        let lm_head = if args.tie_word_embeddings {
            None
        } else {
            Some(Linear::load(ld, "lm_head", args.hidden_size, args.vocab_size, false)?)
        };
        let rope = Rope::from_config(
            args.head_dim(),
            args.rope_theta,
            args.rope_traditional,
            args.rope_scaling.as_ref(),
            args.max_position_embeddings,
        )?;
        Ok(Self { args, embed_tokens, layers, norm, lm_head, rope, dtype: ld.act_dtype, device: ld.device.clone() })
    }
}

impl LanguageModel for Model {
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

    fn make_cache(&self) -> Vec<KvCache> {
        (0..self.layers.len()).map(|_| KvCache::new()).collect()
    }

    fn max_context(&self) -> Option<usize> {
        self.args.max_position_embeddings
    }

    fn vocab_size(&self) -> usize {
        self.args.vocab_size
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn device(&self) -> &Device {
        &self.device
    }
}
