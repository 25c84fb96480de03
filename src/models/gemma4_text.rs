//! Gemma 4 (`gemma4_text`): sliding-window (`sliding_window`) and global layers in the pattern
//! `sliding_window_pattern`, global ones with their own head size, KV heads and "proportional"
//! RoPE (only the first `partial_rotary_factor` of each head rotates); q, k and v RMS-normed
//! (v without weight) and unscaled scores; the last `num_kv_shared_layers` layers attend with
//! the keys and values of the last earlier layer of their kind (no cache of their own) and may
//! have a double-wide MLP; sandwich norms with plain weights; a GELU-gated MLP and, with
//! `enable_moe_block`, experts beside it in every layer (a router on the RMS-normed stream);
//! per-layer token inputs gating the stream; a learned scalar on each layer's output; soft-capped
//! logits. Reads like mlx_lm's `models/gemma4_text.py`.

use super::decoder::RopeArgs;
use super::mlp::DenseMlp;
use super::switch::{combine, softmax, top_k, Activation, SwitchGlu};
use super::LanguageModel;
use crate::cache::KvCache;
use crate::io::Weights;
use crate::nn::{rms_normalize, Embedding, Linear, Loader, Normed, RmsNorm, Rope, RopeTables};
use crate::ops::attention::{scaled_dot_product_attention, MaskSpec};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    #[serde(default = "super::count::<1536>")]
    pub hidden_size: usize,
    #[serde(default = "super::count::<35>")]
    pub num_hidden_layers: usize,
    #[serde(default = "super::count::<6144>")]
    pub intermediate_size: usize,
    #[serde(default = "super::count::<8>")]
    pub num_attention_heads: usize,
    #[serde(default = "super::count::<256>")]
    pub head_dim: usize,
    #[serde(default = "super::count::<512>")]
    pub global_head_dim: usize,
    #[serde(default = "eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "super::count::<262144>")]
    pub vocab_size: usize,
    #[serde(default = "super::count::<262144>")]
    pub vocab_size_per_layer_input: usize,
    #[serde(default = "super::count::<1>")]
    pub num_key_value_heads: usize,
    #[serde(default)]
    pub num_global_key_value_heads: Option<usize>,
    #[serde(default = "super::count::<20>")]
    pub num_kv_shared_layers: usize,
    #[serde(default = "super::count::<256>")]
    pub hidden_size_per_layer_input: usize,
    #[serde(default)]
    pub rope_traditional: bool,
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default = "super::count::<512>")]
    pub sliding_window: usize,
    #[serde(default = "super::count::<5>")]
    pub sliding_window_pattern: usize,
    #[serde(default = "super::count::<131072>")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub attention_k_eq_v: bool,
    #[serde(default = "softcap")]
    pub final_logit_softcapping: Option<f64>,
    #[serde(default = "super::yes")]
    pub use_double_wide_mlp: bool,
    #[serde(default)]
    pub enable_moe_block: bool,
    #[serde(default)]
    pub num_experts: Option<usize>,
    #[serde(default)]
    pub top_k_experts: Option<usize>,
    #[serde(default)]
    pub moe_intermediate_size: Option<usize>,
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default = "super::yes")]
    pub tie_word_embeddings: bool,
}

fn eps() -> f64 {
    1e-6
}

fn softcap() -> Option<f64> {
    Some(30.0)
}

impl ModelArgs {
    /// Whether each layer slides (the others are global).
    fn sliding(&self) -> Result<Vec<bool>> {
        match &self.layer_types {
            Some(t) => {
                if t.len() < self.num_hidden_layers {
                    bail!("config.json: layer_types has {} entries for {} layers", t.len(), self.num_hidden_layers);
                }
                t[..self.num_hidden_layers]
                    .iter()
                    .map(|s| match s.as_str() {
                        "sliding_attention" => Ok(true),
                        "full_attention" => Ok(false),
                        o => bail!("config.json: layer type `{o}`; expected sliding_attention or full_attention"),
                    })
                    .collect()
            }
            None => {
                let p = self.sliding_window_pattern.max(1);
                Ok((0..self.num_hidden_layers).map(|l| (l + 1) % p != 0).collect())
            }
        }
    }

    /// The first layer that shares another's keys and values.
    fn first_shared(&self) -> Result<usize> {
        if self.num_kv_shared_layers >= self.num_hidden_layers {
            bail!(
                "config.json: num_kv_shared_layers ({}) must be less than num_hidden_layers ({})",
                self.num_kv_shared_layers,
                self.num_hidden_layers
            );
        }
        Ok(self.num_hidden_layers - self.num_kv_shared_layers)
    }

    /// The RoPE of a layer kind, from `rope_parameters` (mlx_lm's defaults without it).
    fn rope(&self, sliding: bool, head_dim: usize) -> Result<Rope> {
        let kind = if sliding { "sliding_attention" } else { "full_attention" };
        let default = if sliding {
            serde_json::json!({"rope_type": "default", "rope_theta": 10000.0})
        } else {
            serde_json::json!({"rope_type": "proportional", "rope_theta": 1e6, "partial_rotary_factor": 0.25})
        };
        let p = self.rope_parameters.as_ref().and_then(|r| r.get(kind)).unwrap_or(&default);
        let theta = p.get("rope_theta").and_then(|t| t.as_f64()).unwrap_or(10000.0);
        let args = RopeArgs { rope_traditional: self.rope_traditional, rope_scaling: Some(p.clone()) };
        args.rope(head_dim, theta, Some(self.max_position_embeddings))
    }
}

/// Drops what mlx_lm drops (rotary caches, activation ranges, the shared layers' own k/v
/// projections) and splits Hugging Face's fused experts (`gate_up_proj`: gate rows, then up).
pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    let first_shared = args.first_shared()?;
    let shared = |k: &str| {
        let rest = k.strip_prefix("model.layers.")?;
        let (l, tail) = rest.split_once('.')?;
        let l: usize = l.parse().ok()?;
        (l >= first_shared
            && ["self_attn.k_proj", "self_attn.v_proj", "self_attn.k_norm"].iter().any(|p| tail.starts_with(p)))
        .then_some(())
    };
    weights.sanitize(|k| {
        let dropped = ["self_attn.rotary_emb", "input_max", "input_min", "output_max", "output_min"]
            .iter()
            .any(|d| k.contains(d));
        (!dropped && shared(k).is_none()).then(|| k.to_string())
    });
    super::drop_unused(weights, args.tie_word_embeddings);
    for l in 0..args.num_hidden_layers {
        let p = format!("model.layers.{l}.experts");
        if weights.contains(&format!("{p}.gate_up_proj")) {
            let halves = [format!("{p}.switch_glu.gate_proj.weight"), format!("{p}.switch_glu.up_proj.weight")];
            weights.split_axis(&format!("{p}.gate_up_proj"), 1, &halves)?;
            weights.rename(&format!("{p}.down_proj"), &format!("{p}.switch_glu.down_proj.weight"))?;
        }
    }
    Ok(())
}

struct Attention {
    q_proj: Linear,
    /// k and v projections (v `None`: the values are the keys' projection) and k's norm;
    /// `None` for a layer that shares another's keys and values
    kv: Option<(Linear, Option<Linear>, RmsNorm)>,
    o_proj: Linear,
    q_norm: RmsNorm,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    eps: f64,
}

/// Keys and values after the cache, and the mask they were attended with: what a layer that
/// shares them reuses.
#[derive(Clone)]
struct SharedKv {
    keys: Tensor,
    values: Tensor,
    mask: MaskSpec,
}

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        cache: Option<&mut KvCache>,
        shared: Option<&SharedKv>,
    ) -> Result<(Tensor, SharedKv)> {
        let (b, l, _) = x.dims3()?;
        let heads = |t: Tensor, n: usize| -> Result<Tensor> { Ok(t.reshape((b, l, n, self.head_dim))?) };
        let q = self.q_norm.forward(&heads(self.q_proj.forward(x)?, self.n_heads)?)?.transpose(1, 2)?;
        let q = rope.apply(&q.contiguous()?)?;
        let kv = match (&self.kv, cache, shared) {
            (Some((k_proj, v_proj, k_norm)), Some(cache), _) => {
                let k = heads(k_proj.forward(x)?, self.n_kv_heads)?;
                let v = match v_proj {
                    Some(v) => heads(v.forward(x)?, self.n_kv_heads)?,
                    None => k.clone(),
                };
                let k = rope.apply(&k_norm.forward(&k)?.transpose(1, 2)?.contiguous()?)?;
                let v = rms_normalize(&v, self.eps)?.transpose(1, 2)?.contiguous()?;
                let mask = cache.mask(l);
                let (keys, values) = cache.update_and_fetch(&k, &v)?;
                SharedKv { keys, values, mask }
            }
            (None, _, Some(s)) => s.clone(),
            _ => bail!("gemma4: a layer has neither its own keys and values nor shared ones"),
        };
        let out = scaled_dot_product_attention(&q, &kv.keys, &kv.values, 1.0, kv.mask.clone(), None)?;
        let out = out.transpose(1, 2)?.reshape((b, l, self.n_heads * self.head_dim))?;
        Ok((self.o_proj.forward(&out)?, kv))
    }
}

/// `down(gelu_approx(gate(x)) · up(x))`.
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl DenseMlp for Mlp {
    fn forward(&self, x: &Normed) -> Result<Tensor> {
        let x = x.tensor()?;
        Activation::GeluGlu.apply(&self.gate_proj.forward(&x)?, &self.up_proj.forward(&x)?)
    }

    fn down_proj(&self) -> &Linear {
        &self.down_proj
    }
}

/// The experts beside the MLP: a router on the RMS-normed stream (weight `scale / √hidden`),
/// its `k` best logits softmaxed and scaled per expert.
struct Moe {
    proj: Linear,
    scale: Tensor,
    per_expert_scale: Tensor,
    switch_glu: SwitchGlu,
    top_k: usize,
    eps: f64,
}

impl Moe {
    /// The experts' mixed output on `x`, routed by the stream `h`.
    fn forward(&self, h: &Tensor, x: &Tensor) -> Result<Tensor> {
        let dim = h.dim(D::Minus1)?;
        let w = (self.scale.to_dtype(h.dtype())? * (dim as f64).powf(-0.5))?;
        let scores = self.proj.forward(&candle_nn::ops::rms_norm(h, &w, self.eps as f32)?)?;
        let (inds, logits) = top_k(&scores, self.top_k)?;
        let per_expert = self.per_expert_scale.to_dtype(logits.dtype())?.index_select(&inds.flatten_all()?, 0)?;
        let weights = (softmax(&logits)? * per_expert.reshape(inds.shape())?)?;
        combine(&self.switch_glu.forward(x, &inds)?, &weights)
    }
}

/// One decoder layer with its norms (plain RMSNorm weights).
struct Layer {
    self_attn: Attention,
    mlp: Mlp,
    moe: Option<(Moe, [RmsNorm; 3])>,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
    pre_feedforward_layernorm: RmsNorm,
    post_feedforward_layernorm: RmsNorm,
    /// per_layer_input_gate, per_layer_projection, post_per_layer_input_norm
    per_layer: Option<(Linear, Linear, RmsNorm)>,
    layer_scalar: Tensor,
    sliding: bool,
}

impl Layer {
    fn forward(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        cache: Option<&mut KvCache>,
        shared: Option<&SharedKv>,
        per_layer_input: Option<&Tensor>,
    ) -> Result<(Tensor, SharedKv)> {
        let (a, kv) = self.self_attn.forward(&self.input_layernorm.forward(x)?, rope, cache, shared)?;
        let h = (x + self.post_attention_layernorm.forward(&a)?)?;
        let mlp = |t: &Tensor| self.mlp.forward_tensor(&self.pre_feedforward_layernorm.forward(t)?);
        let f = match &self.moe {
            Some((moe, [post1, post2, pre2])) => {
                let h1 = post1.forward(&mlp(&h)?)?;
                let h2 = post2.forward(&moe.forward(&h, &pre2.forward(&h)?)?)?;
                (h1 + h2)?
            }
            None => mlp(&h)?,
        };
        let mut h = (&h + self.post_feedforward_layernorm.forward(&f)?)?;
        if let (Some((gate, proj, norm)), Some(p)) = (&self.per_layer, per_layer_input) {
            let g = proj.forward(&(gate.forward(&h)?.gelu()? * p)?)?;
            h = (&h + norm.forward(&g)?)?;
        }
        Ok((h.broadcast_mul(&self.layer_scalar.to_dtype(h.dtype())?)?, kv))
    }
}

/// The per-layer token inputs: their own embedding, and a projection of the stream's.
struct PerLayerInputs {
    embed_tokens_per_layer: Embedding,
    per_layer_model_projection: Linear,
    per_layer_projection_norm: RmsNorm,
    width: usize,
}

pub struct Gemma4 {
    embed_tokens: Embedding,
    per_layer: Option<PerLayerInputs>,
    layers: Vec<Layer>,
    /// for each layer, the layer whose keys and values it attends with (itself, when it has
    /// its own)
    kv_source: Vec<usize>,
    first_shared: usize,
    norm: RmsNorm,
    lm_head: Option<Linear>,
    /// the sliding and the global layers' RoPEs
    ropes: [Rope; 2],
    sliding_window: usize,
    final_softcap: Option<f64>,
    hidden_size: usize,
    vocab_size: usize,
    max_context: usize,
    dtype: DType,
    device: Device,
}

impl LanguageModel for Gemma4 {
    fn forward(&self, tokens: &Tensor, cache: &mut [KvCache], last_only: bool) -> Result<Tensor> {
        let (b, l) = tokens.dims2()?;
        let mut h = (self.embed_tokens.forward(tokens)? * (self.hidden_size as f64).sqrt())?;
        let n = self.layers.len();
        let per_layer = match &self.per_layer {
            Some(p) => {
                let raw = (p.embed_tokens_per_layer.forward(tokens)? * (p.width as f64).sqrt())?;
                let raw = raw.reshape((b, l, n, p.width))?;
                let proj = (p.per_layer_model_projection.forward(&h)? * (self.hidden_size as f64).powf(-0.5))?;
                let proj = p.per_layer_projection_norm.forward(&proj.reshape((b, l, n, p.width))?)?;
                Some(((proj + raw)? * 2f64.powf(-0.5))?)
            }
            None => None,
        };
        let offset = cache.first().map(KvCache::offset).unwrap_or(0);
        let padding = cache.first().and_then(|c| c.left_padding().cloned());
        let tables = self
            .ropes
            .iter()
            .map(|r| match &padding {
                Some(p) => r.batch_tables(offset, l, p, self.dtype, &self.device),
                None => r.tables(offset, l, self.dtype, &self.device),
            })
            .collect::<Result<Vec<_>>>()?;
        let mut kvs: Vec<Option<SharedKv>> = vec![None; n];
        for (i, layer) in self.layers.iter().enumerate() {
            let rope = &tables[if layer.sliding { 0 } else { 1 }];
            let pli = per_layer.as_ref().map(|p| p.narrow(2, i, 1)?.squeeze(2)).transpose()?;
            let own = (i < self.first_shared).then(|| &mut cache[i]);
            let shared = kvs[self.kv_source[i]].clone();
            let (out, kv) = layer.forward(&h, rope, own, shared.as_ref(), pli.as_ref())?;
            h = out;
            kvs[i] = Some(kv);
        }
        if last_only {
            h = h.narrow(1, l - 1, 1)?;
        }
        let h = self.norm.forward(&h)?;
        let logits = match &self.lm_head {
            Some(head) => head.forward(&h)?,
            None => self.embed_tokens.as_linear(&h)?,
        };
        let logits = logits.to_dtype(DType::F32)?;
        Ok(match self.final_softcap {
            Some(c) => ((logits / c)?.tanh()? * c)?,
            None => logits,
        })
    }

    /// Caches for the layers with keys and values of their own: rotating at the window for
    /// sliding layers.
    fn make_cache(&self, max_kv_size: Option<usize>) -> Vec<KvCache> {
        let windows: Vec<Option<usize>> =
            self.layers[..self.first_shared].iter().map(|l| l.sliding.then_some(self.sliding_window)).collect();
        super::layer_caches(&windows, max_kv_size)
    }

    fn max_context(&self) -> Option<usize> {
        Some(self.max_context)
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

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<Gemma4> {
    let (dim, eps, n) = (args.hidden_size, args.rms_norm_eps, args.num_hidden_layers);
    let sliding = args.sliding()?;
    let first_shared = args.first_shared()?;
    let head_dim = |s: bool| if s || args.global_head_dim == 0 { args.head_dim } else { args.global_head_dim };
    let ropes = [args.rope(true, args.head_dim)?, args.rope(false, head_dim(false))?];
    // shared layers attend with the last earlier layer of their kind
    let mut kv_source: Vec<usize> = (0..n).collect();
    for j in first_shared..n {
        kv_source[j] = (0..first_shared)
            .rev()
            .find(|&i| sliding[i] == sliding[j])
            .context("gemma4: a KV-shared layer has no earlier layer of its kind")?;
    }
    let norm = |name: &str, width: usize| RmsNorm::load(ld, name, width, eps);
    let lin = |name: String, i: usize, o: usize| Linear::load(ld, &name, i, o, false);
    let layers = (0..n)
        .map(|l| {
            let p = format!("model.layers.{l}");
            let s = sliding[l];
            let hd = head_dim(s);
            let k_eq_v = args.attention_k_eq_v && !s;
            let n_kv = match (k_eq_v, args.num_global_key_value_heads) {
                (true, Some(g)) => g,
                _ => args.num_key_value_heads,
            };
            let a = format!("{p}.self_attn");
            let kv = if l < first_shared {
                let v = (!k_eq_v).then(|| lin(format!("{a}.v_proj"), dim, n_kv * hd)).transpose()?;
                Some((lin(format!("{a}.k_proj"), dim, n_kv * hd)?, v, norm(&format!("{a}.k_norm"), hd)?))
            } else {
                None
            };
            let self_attn = Attention {
                q_proj: lin(format!("{a}.q_proj"), dim, args.num_attention_heads * hd)?,
                kv,
                o_proj: lin(format!("{a}.o_proj"), args.num_attention_heads * hd, dim)?,
                q_norm: norm(&format!("{a}.q_norm"), hd)?,
                n_heads: args.num_attention_heads,
                n_kv_heads: n_kv,
                head_dim: hd,
                eps,
            };
            let wide = args.use_double_wide_mlp && l >= first_shared && first_shared > 0;
            let inter = args.intermediate_size * if wide { 2 } else { 1 };
            let mlp = Mlp {
                gate_proj: lin(format!("{p}.mlp.gate_proj"), dim, inter)?,
                up_proj: lin(format!("{p}.mlp.up_proj"), dim, inter)?,
                down_proj: lin(format!("{p}.mlp.down_proj"), inter, dim)?,
            };
            let moe = if args.enable_moe_block {
                let e = args.num_experts.context("config.json: enable_moe_block needs num_experts")?;
                let k = args.top_k_experts.context("config.json: enable_moe_block needs top_k_experts")?;
                let hidden =
                    args.moe_intermediate_size.context("config.json: enable_moe_block needs moe_intermediate_size")?;
                super::switch::check_top_k(k, e, "top_k_experts")?;
                let moe = Moe {
                    proj: lin(format!("{p}.router.proj"), dim, e)?,
                    scale: ld.tensor(&format!("{p}.router.scale"), &[dim])?,
                    per_expert_scale: ld.tensor(&format!("{p}.router.per_expert_scale"), &[e])?,
                    switch_glu: SwitchGlu::load(
                        ld,
                        &format!("{p}.experts.switch_glu"),
                        e,
                        dim,
                        hidden,
                        false,
                        Activation::GeluGlu,
                    )?,
                    top_k: k,
                    eps,
                };
                let norms = [
                    norm(&format!("{p}.post_feedforward_layernorm_1"), dim)?,
                    norm(&format!("{p}.post_feedforward_layernorm_2"), dim)?,
                    norm(&format!("{p}.pre_feedforward_layernorm_2"), dim)?,
                ];
                Some((moe, norms))
            } else {
                None
            };
            let pw = args.hidden_size_per_layer_input;
            let per_layer = (pw > 0)
                .then(|| -> Result<_> {
                    Ok((
                        lin(format!("{p}.per_layer_input_gate"), dim, pw)?,
                        lin(format!("{p}.per_layer_projection"), pw, dim)?,
                        norm(&format!("{p}.post_per_layer_input_norm"), dim)?,
                    ))
                })
                .transpose()?;
            Ok(Layer {
                self_attn,
                mlp,
                moe,
                input_layernorm: norm(&format!("{p}.input_layernorm"), dim)?,
                post_attention_layernorm: norm(&format!("{p}.post_attention_layernorm"), dim)?,
                pre_feedforward_layernorm: norm(&format!("{p}.pre_feedforward_layernorm"), dim)?,
                post_feedforward_layernorm: norm(&format!("{p}.post_feedforward_layernorm"), dim)?,
                per_layer,
                layer_scalar: ld.tensor(&format!("{p}.layer_scalar"), &[1])?,
                sliding: s,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let pw = args.hidden_size_per_layer_input;
    let per_layer = (pw > 0)
        .then(|| -> Result<_> {
            Ok(PerLayerInputs {
                embed_tokens_per_layer: Embedding::load(
                    ld,
                    "model.embed_tokens_per_layer",
                    args.vocab_size_per_layer_input,
                    n * pw,
                )?,
                per_layer_model_projection: lin("model.per_layer_model_projection".into(), dim, n * pw)?,
                per_layer_projection_norm: norm("model.per_layer_projection_norm", pw)?,
                width: pw,
            })
        })
        .transpose()?;
    Ok(Gemma4 {
        embed_tokens: Embedding::load(ld, "model.embed_tokens", args.vocab_size, dim)?,
        per_layer,
        layers,
        kv_source,
        first_shared,
        norm: norm("model.norm", dim)?,
        lm_head: (!args.tie_word_embeddings).then(|| lin("lm_head".into(), dim, args.vocab_size)).transpose()?,
        ropes,
        sliding_window: args.sliding_window,
        final_softcap: args.final_logit_softcapping,
        hidden_size: dim,
        vocab_size: args.vocab_size,
        max_context: args.max_position_embeddings,
        dtype: ld.act_dtype,
        device: ld.device.clone(),
    })
}
