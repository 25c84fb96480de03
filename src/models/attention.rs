//! What attention layers share, so that each architecture's attention states only its own
//! parts (which projections, biases, per-head norms, score scale and soft-capping): the
//! [`SelfAttention`] interface a decoder layer runs, the q/k/v projections of one input (one
//! fused kernel on CUDA where it applies), and [`Heads`]: the heads' shapes, RoPE, the KV
//! cache and causal attention over it.

use crate::cache::KvCache;
use crate::nn::{Linear, Loader, Normed, RmsNorm, RopeTables};
use crate::ops::attention::{decode_step_attention, scaled_dot_product_attention};
use anyhow::Result;
use candle_core::{Tensor, D};

/// An attention layer as a decoder layer runs it.
pub trait SelfAttention: Send + Sync {
    /// The attention of the norm's output `x` (B, L, hidden), before the output projection
    /// (B, L, heads·head_dim): the layer adds `o_proj` of it to the residual stream.
    fn forward(&self, x: &Normed, rope: &RopeTables, cache: &mut KvCache) -> Result<Tensor>;

    /// The output projection.
    fn o_proj(&self) -> &Linear;

    /// The linear layers that take the norm before attention (separate q, k and v: a deferred
    /// norm can be finished inside their fused kernel); none by default.
    fn input_layers(&self) -> Vec<&Linear> {
        vec![]
    }

    /// Whether its decode step runs on the device alone (see `Layer::graphable`).
    fn graphable(&self) -> bool {
        true
    }
}

/// A layer's mixer chosen at load time (attention in some layers, a recurrent one in others).
impl SelfAttention for Box<dyn SelfAttention> {
    fn forward(&self, x: &Normed, rope: &RopeTables, cache: &mut KvCache) -> Result<Tensor> {
        (**self).forward(x, rope, cache)
    }

    fn o_proj(&self) -> &Linear {
        (**self).o_proj()
    }

    fn input_layers(&self) -> Vec<&Linear> {
        (**self).input_layers()
    }

    fn graphable(&self) -> bool {
        (**self).graphable()
    }
}

/// `(x Qᵀ, x Kᵀ, x Vᵀ)` of separate projections: one fused kernel where the backend has one
/// (CUDA decode of bias-free quantized projections), else one by one.
pub fn qkv(x: &Normed, q: &Linear, k: &Linear, v: &Linear) -> Result<[Tensor; 3]> {
    if let Some(out) = crate::nn::fused_qkv(x, q, k, v)? {
        return Ok(out);
    }
    let x = x.tensor()?;
    Ok([q.forward(&x)?, k.forward(&x)?, v.forward(&x)?])
}

/// The heads of an attention layer and how their scores are taken: `n_heads` query heads over
/// `n_kv_heads` key/value heads (grouped-query attention) of `head_dim`, scores scaled by
/// `scale` and optionally soft-capped, `c · tanh(s / c)`.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f64,
    pub softcap: Option<f64>,
}

impl Heads {
    /// Scores scaled by `head_dim^-0.5`, not capped.
    pub fn new(n_heads: usize, n_kv_heads: usize, head_dim: usize) -> Self {
        Self { n_heads, n_kv_heads, head_dim, scale: (head_dim as f64).powf(-0.5), softcap: None }
    }

    /// `{p}.q_proj`, `{p}.k_proj`, `{p}.v_proj` from `hidden` features, with or without biases.
    pub fn load_qkv(&self, ld: &Loader, p: &str, hidden: usize, bias: bool) -> Result<[Linear; 3]> {
        let lin = |n: &str, heads: usize| Linear::load(ld, &format!("{p}.{n}"), hidden, heads * self.head_dim, bias);
        Ok([lin("q_proj", self.n_heads)?, lin("k_proj", self.n_kv_heads)?, lin("v_proj", self.n_kv_heads)?])
    }

    /// The output projection `{p}.{name}` back to `hidden` features.
    pub fn load_out(&self, ld: &Loader, p: &str, name: &str, hidden: usize, bias: bool) -> Result<Linear> {
        Linear::load(ld, &format!("{p}.{name}"), self.n_heads * self.head_dim, hidden, bias)
    }

    /// Splits one fused `qkv_proj` output (…, (heads + 2·kv_heads)·head_dim) into q, k and v.
    pub fn split_qkv(&self, t: &Tensor) -> Result<[Tensor; 3]> {
        let (nq, nk) = (self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim);
        Ok([t.narrow(D::Minus1, 0, nq)?, t.narrow(D::Minus1, nq, nk)?, t.narrow(D::Minus1, nq + nk, nk)?])
    }

    /// Causal attention of the projected `q`, `k`, `v` (B, L, heads·head_dim each): split into
    /// heads (q and k each normalized per head first where a norm is given), RoPE on q and k,
    /// k and v appended to `cache`, q attending over the cache; returns (B, L, heads·head_dim).
    /// A decode step captured into a CUDA graph does RoPE, the cache write and attention in one
    /// kernel where it fits.
    pub fn attend(
        &self,
        qkv: [Tensor; 3],
        qk_norms: Option<(&RmsNorm, &RmsNorm)>,
        rope: &RopeTables,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let norms = match qk_norms {
            Some((q, k)) => QkNorms::BeforeRope(q, k),
            None => QkNorms::None,
        };
        self.attend_with(qkv, norms, Some(rope), cache)
    }

    /// [`Self::attend`] with the per-head norms where `norms` puts them and RoPE only where
    /// `rope` is given (`None`: a NoPE layer).
    pub fn attend_with(
        &self,
        [q, k, v]: [Tensor; 3],
        norms: QkNorms,
        rope: Option<&RopeTables>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (b, l, _) = q.dims3()?;
        let heads = |t: Tensor, n: usize, norm: Option<&RmsNorm>| -> Result<Tensor> {
            let t = t.reshape((b, l, n, self.head_dim))?;
            let t = match norm {
                Some(nm) => nm.forward(&t)?,
                None => t,
            };
            Ok(t.transpose(1, 2)?)
        };
        let before = match norms {
            QkNorms::BeforeRope(q, k) => Some((q, k)),
            _ => None,
        };
        let q = heads(q, self.n_heads, before.map(|n| n.0))?;
        let k = heads(k, self.n_kv_heads, before.map(|n| n.1))?;
        let v = heads(v, self.n_kv_heads, None)?;
        let mask = cache.mask(l);
        // only a step being captured into a CUDA graph (`mask.pos`) attends over the buffers
        let buffers = mask.pos.as_ref().and_then(|_| cache.buffers());
        let fused = match (rope, &norms) {
            (Some(rope), QkNorms::None | QkNorms::BeforeRope(..)) => {
                decode_step_attention(&q, &k, &v, rope, &mask, buffers, self.scale, self.softcap)?
            }
            _ => None,
        };
        let out = match fused {
            Some(out) => out,
            None => {
                let (mut q, mut k) = (q.contiguous()?, k.contiguous()?);
                if let Some(rope) = rope {
                    (q, k) = (rope.apply(&q)?, rope.apply(&k)?);
                }
                if let QkNorms::AfterRope(qn, kn) = norms {
                    (q, k) = (qn.forward(&q)?, kn.forward(&k)?);
                }
                let (k, v) = cache.update_and_fetch(&k, &v)?;
                scaled_dot_product_attention(&q, &k, &v, self.scale, mask, self.softcap)?
            }
        };
        Ok(out.transpose(1, 2)?.reshape((b, l, self.n_heads * self.head_dim))?)
    }
}

/// Each batch row's positions for this call's `l` tokens (rows × l, row-major): from the cache's
/// offset on, a left-padded row's counted from after its padding (its padding at 0).
pub fn row_positions(cache: &KvCache, rows: usize, l: usize) -> Vec<usize> {
    let (offset, pad) = (cache.offset(), cache.left_padding());
    (0..rows)
        .flat_map(|b| {
            let pad = pad.map_or(0, |p| p[b]);
            (0..l).map(move |i| (offset + i).saturating_sub(pad))
        })
        .collect()
}

/// `1 + β · ln(1 + ⌊p / original⌋)`: Llama 4's query scale at position `p`, as Mistral's models
/// apply it (ministral3, mistral4).
pub fn llama4_query_scale(p: usize, beta: f64, original: f64) -> f32 {
    (1.0 + beta * (1.0 + (p as f64 / original).floor()).ln()) as f32
}

/// Where an attention layer's per-head q/k RMSNorms run.
#[derive(Clone, Copy)]
pub enum QkNorms<'a> {
    None,
    /// on each head before RoPE (qwen3, gemma 3)
    BeforeRope(&'a RmsNorm, &'a RmsNorm),
    /// on each head after RoPE (hunyuan)
    AfterRope(&'a RmsNorm, &'a RmsNorm),
}
