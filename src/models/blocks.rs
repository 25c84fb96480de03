//! The pieces decoder-only architectures share, so each architecture file only says what is its
//! own (config fields, weight names, which options it uses): attention (separate or fused q/k/v,
//! biases, per-head q/k norms, score soft-capping), the gated MLP (separate or fused gate/up,
//! SiLU or GELU), the decoder layer (pre-norm, or gemma's four-norm sandwich), and the model body
//! (embedding → layers → norm → head) that implements [`LanguageModel`].

use super::LanguageModel;
use crate::cache::KvCache;
use crate::nn::{Embedding, LayerNorm, Linear, Loader, Normed, Pending, RmsNorm, Rope, RopeTables};
use crate::ops::attention::scaled_dot_product_attention;
use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};
use serde::Deserialize;

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

/// Shapes and options of one attention layer.
#[derive(Debug, Clone)]
pub struct AttentionSpec {
    pub hidden: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// one `qkv_proj` instead of `q_proj`, `k_proj`, `v_proj` (phi3)
    pub fused_qkv: bool,
    /// bias on q, k and v
    pub qkv_bias: bool,
    /// bias on the output projection
    pub o_bias: bool,
    /// the output projection's name (`o_proj`; phi: `dense`)
    pub o_name: &'static str,
    /// RMSNorm over each head of q and k before RoPE (qwen3, gemma3)
    pub qk_norm: bool,
    /// score scale; `head_dim^-0.5` when `None`
    pub scale: Option<f64>,
    /// `c · tanh(scores / c)` (gemma2)
    pub softcap: Option<f64>,
}

/// How norms are read: eps, and the constant added to the stored weight (1 for gemma).
#[derive(Debug, Clone, Copy)]
pub struct NormSpec {
    pub eps: f64,
    pub shift: f64,
}

impl NormSpec {
    pub fn load(&self, ld: &Loader, name: &str, dim: usize) -> Result<RmsNorm> {
        RmsNorm::load_shifted(ld, name, dim, self.eps, self.shift)
    }
}

enum QkvProj {
    Separate(Linear, Linear, Linear),
    Fused(Linear),
}

pub struct Attention {
    qkv: QkvProj,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    scale: f64,
    softcap: Option<f64>,
}

impl Attention {
    /// Loads `{p}.{q,k,v}_proj` or `{p}.qkv_proj`, `{p}.o_proj` (and `{p}.{q,k}_norm`).
    pub fn load(s: &AttentionSpec, norm: NormSpec, ld: &Loader, p: &str) -> Result<Self> {
        let (dim, h, kv, hd) = (s.hidden, s.n_heads, s.n_kv_heads, s.head_dim);
        let lin = |n: &str, out: usize| Linear::load(ld, &format!("{p}.{n}"), dim, out, s.qkv_bias);
        let qkv = if s.fused_qkv {
            QkvProj::Fused(lin("qkv_proj", (h + 2 * kv) * hd)?)
        } else {
            QkvProj::Separate(lin("q_proj", h * hd)?, lin("k_proj", kv * hd)?, lin("v_proj", kv * hd)?)
        };
        let qk_norm = |n: &str| s.qk_norm.then(|| norm.load(ld, &format!("{p}.{n}"), hd)).transpose();
        Ok(Self {
            qkv,
            o_proj: Linear::load(ld, &format!("{p}.{}", s.o_name), h * hd, dim, s.o_bias)?,
            q_norm: qk_norm("q_norm")?,
            k_norm: qk_norm("k_norm")?,
            n_heads: h,
            n_kv_heads: kv,
            head_dim: hd,
            scale: s.scale.unwrap_or((hd as f64).powf(-0.5)),
            softcap: s.softcap,
        })
    }

    pub fn forward(&self, x: &Tensor, rope: &RopeTables, cache: &mut KvCache) -> Result<Tensor> {
        self.o_proj.forward(&self.forward_normed(&Normed::Plain(x.clone()), rope, cache)?)
    }

    /// The attention before its output projection ([`Self::o_proj`]), of a norm's output.
    pub fn forward_normed(&self, x: &Normed, rope: &RopeTables, cache: &mut KvCache) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let (q, k, v) = match &self.qkv {
            QkvProj::Separate(q, k, v) => match crate::nn::fused_qkv(x, q, k, v)? {
                Some([q, k, v]) => (q, k, v),
                None => {
                    let x = x.tensor()?;
                    (q.forward(&x)?, k.forward(&x)?, v.forward(&x)?)
                }
            },
            QkvProj::Fused(qkv) => {
                let t = qkv.forward(&x.tensor()?)?;
                let (nq, nk) = (self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim);
                (t.narrow(D::Minus1, 0, nq)?, t.narrow(D::Minus1, nq, nk)?, t.narrow(D::Minus1, nq + nk, nk)?)
            }
        };
        let heads = |t: Tensor, n: usize, norm: &Option<RmsNorm>| -> Result<Tensor> {
            let t = t.reshape((b, l, n, self.head_dim))?;
            let t = match norm {
                Some(nm) => nm.forward(&t)?,
                None => t,
            };
            Ok(t.transpose(1, 2)?)
        };
        let q = heads(q, self.n_heads, &self.q_norm)?;
        let k = heads(k, self.n_kv_heads, &self.k_norm)?;
        let v = heads(v, self.n_kv_heads, &None)?;
        let mask = cache.mask(l);
        let fused = crate::ops::attention::decode_step_attention(
            &q,
            &k,
            &v,
            rope,
            &mask,
            cache.buffers(),
            self.scale,
            self.softcap,
        )?;
        let out = match fused {
            Some(out) => out,
            None => {
                let q = rope.apply(&q.contiguous()?)?;
                let k = rope.apply(&k.contiguous()?)?;
                let (k, v) = cache.update_and_fetch(&k, &v)?;
                scaled_dot_product_attention(&q, &k, &v, self.scale, mask, self.softcap)?
            }
        };
        Ok(out.transpose(1, 2)?.reshape((b, l, self.n_heads * self.head_dim))?)
    }

    pub fn o_proj(&self) -> &Linear {
        &self.o_proj
    }

    /// The layers that take the input norm (for [`RmsNorm::forward_pending`]): separate q, k
    /// and v (a fused qkv_proj never takes a deferred norm).
    pub fn input_layers(&self) -> Vec<&Linear> {
        match &self.qkv {
            QkvProj::Separate(q, k, v) => vec![q, k, v],
            QkvProj::Fused(_) => vec![],
        }
    }
}

/// The gate's activation.
#[derive(Debug, Clone, Copy)]
pub enum Act {
    Silu,
    /// tanh approximation (mlx's `gelu_approx`)
    GeluApprox,
}

enum GateUp {
    Separate(Linear, Linear),
    Fused(Linear),
    /// no gate: `fc2(act(fc1(x)))` (phi)
    Plain(Linear),
}

/// `down(act(gate(x)) * up(x))`, with `gate_proj`/`up_proj` or one `gate_up_proj`; or the
/// ungated `fc2(act(fc1(x)))`.
pub struct Mlp {
    gate_up: GateUp,
    down_proj: Linear,
    act: Act,
    hidden: usize,
}

impl Mlp {
    pub fn load(ld: &Loader, p: &str, dim: usize, s: &MlpSpec) -> Result<Self> {
        let lin = |n: &str, i: usize, o: usize| Linear::load(ld, &format!("{p}.{n}"), i, o, s.bias);
        let h = s.hidden;
        let (gate_up, down) = if !s.gated {
            (GateUp::Plain(lin("fc1", dim, h)?), "fc2")
        } else if s.fused {
            (GateUp::Fused(lin("gate_up_proj", dim, 2 * h)?), "down_proj")
        } else {
            (GateUp::Separate(lin("gate_proj", dim, h)?, lin("up_proj", dim, h)?), "down_proj")
        };
        Ok(Self { gate_up, down_proj: lin(down, h, dim)?, act: s.act, hidden: h })
    }

    fn act(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self.act {
            Act::Silu => candle_nn::ops::silu(x)?,
            Act::GeluApprox => x.gelu()?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.down_proj.forward(&self.forward_hidden(&Normed::Plain(x.clone()))?)
    }

    /// The activation before the down projection ([`Self::down_proj`]), of a norm's output.
    pub fn forward_hidden(&self, x: &Normed) -> Result<Tensor> {
        let (gate, up) = match &self.gate_up {
            GateUp::Separate(g, u) => {
                if let Act::Silu = self.act {
                    if let Some(h) = crate::nn::fused_swiglu(x, g, u)? {
                        return Ok(h);
                    }
                }
                let x = x.tensor()?;
                (g.forward(&x)?, u.forward(&x)?)
            }
            GateUp::Fused(gu) => {
                let t = gu.forward(&x.tensor()?)?;
                (t.narrow(D::Minus1, 0, self.hidden)?, t.narrow(D::Minus1, self.hidden, self.hidden)?)
            }
            GateUp::Plain(fc1) => return self.act(&fc1.forward(&x.tensor()?)?),
        };
        Ok(match self.act {
            Act::Silu => crate::ops::swiglu::swiglu(&gate, &up)?,
            Act::GeluApprox => (self.act(&gate)? * up)?,
        })
    }

    pub fn down_proj(&self) -> &Linear {
        &self.down_proj
    }

    /// The layers that take the norm before the MLP (for [`RmsNorm::forward_pending`]):
    /// separate gate and up with SiLU, the fused SwiGLU's.
    pub fn input_layers(&self) -> Vec<&Linear> {
        match (&self.gate_up, self.act) {
            (GateUp::Separate(g, u), Act::Silu) => vec![g, u],
            _ => vec![],
        }
    }
}

/// One decoder layer as a model runs it: hidden states in, hidden states out.
pub trait Layer: Send + Sync {
    fn forward(&self, x: &Tensor, rope: &RopeTables, cache: &mut KvCache) -> Result<Tensor>;

    /// Whether the layer's decode step does all its work on the device, so that a CUDA graph
    /// may capture it and replay it at every position. A layer that reads values back to the
    /// host (a router's choices, say) says `false`, and its model decodes eagerly.
    fn graphable(&self) -> bool {
        true
    }

    /// The layer on `x + pending` (`pending`: the previous layer's last residual branch, not
    /// yet added, or its projection not yet run), returning its output as `h` and its own last
    /// branch left so, so that the next norm can take the add with it (one CUDA kernel instead
    /// of two: see [`RmsNorm::forward_residual`]), or the projection too (decode on CUDA:
    /// [`RmsNorm::forward_pending`]). The output is `h + branch`, or `h` without one.
    fn forward_deferred<'a>(
        &'a self,
        x: &Tensor,
        pending: Option<&Pending<'a>>,
        rope: &RopeTables,
        cache: &mut KvCache,
    ) -> Result<(Tensor, Option<Pending<'a>>)> {
        Ok((self.forward(&plus(x, pending)?, rope, cache)?, None))
    }
}

/// `x + p`, or `x` without `p` (a residual branch left for later, see [`Layer::forward_deferred`]).
fn plus(x: &Tensor, p: Option<&Pending>) -> Result<Tensor> {
    Ok(match Pending::resolve(p)? {
        Some(p) => (x + p)?,
        None => x.clone(),
    })
}

/// The decoder layer of llama-like models, `h = x + attn(n1(x)); h + mlp(n2(h))`, or with
/// gemma's sandwich norms, `h = x + n2(attn(n1(x))); h + n4(mlp(n3(h)))`.
pub struct Block {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
    /// gemma: `pre_feedforward_layernorm`, `post_feedforward_layernorm`
    sandwich: Option<(RmsNorm, RmsNorm)>,
}

impl Block {
    /// Loads `{p}.self_attn`, `{p}.mlp` and the norms of layer prefix `p`.
    pub fn load(attn: &AttentionSpec, mlp: &MlpSpec, norm: NormSpec, ld: &Loader, p: &str) -> Result<Self> {
        let d = attn.hidden;
        let n = |name: &str| norm.load(ld, &format!("{p}.{name}"), d);
        Ok(Self {
            self_attn: Attention::load(attn, norm, ld, &format!("{p}.self_attn"))?,
            mlp: Mlp::load(ld, &format!("{p}.mlp"), d, mlp)?,
            input_layernorm: n("input_layernorm")?,
            post_attention_layernorm: n("post_attention_layernorm")?,
            sandwich: if mlp.sandwich {
                Some((n("pre_feedforward_layernorm")?, n("post_feedforward_layernorm")?))
            } else {
                None
            },
        })
    }
}

impl Layer for Block {
    fn forward(&self, x: &Tensor, rope: &RopeTables, cache: &mut KvCache) -> Result<Tensor> {
        let (h, branch) = self.forward_deferred(x, None, rope, cache)?;
        plus(&h, branch.as_ref())
    }

    /// The output projections (o, down) are left to the norms after them, which may run them
    /// fused with the residual add (see [`RmsNorm::forward_pending`]).
    fn forward_deferred<'a>(
        &'a self,
        x: &Tensor,
        pending: Option<&Pending<'a>>,
        rope: &RopeTables,
        cache: &mut KvCache,
    ) -> Result<(Tensor, Option<Pending<'a>>)> {
        let (x, n1) = self.input_layernorm.forward_pending(x, pending, &self.self_attn.input_layers())?;
        let a = self.self_attn.forward_normed(&n1, rope, cache)?;
        let o_proj = self.self_attn.o_proj();
        let (h, n2) = match &self.sandwich {
            None => {
                let attn = Pending::Projection(a, o_proj);
                self.post_attention_layernorm.forward_pending(&x, Some(&attn), &self.mlp.input_layers())?
            }
            Some((pre, _)) => {
                let r = self.post_attention_layernorm.forward(&o_proj.forward(&a)?)?;
                let (h, n) = pre.forward_residual(&x, Some(&r))?;
                (h, Normed::Plain(n))
            }
        };
        let m = self.mlp.forward_hidden(&n2)?;
        let branch = match &self.sandwich {
            None => Pending::Projection(m, self.mlp.down_proj()),
            Some((_, post)) => Pending::Branch(post.forward(&self.mlp.down_proj().forward(&m)?)?),
        };
        Ok((h, Some(branch)))
    }
}

/// The MLP and layer shape of a [`Block`].
#[derive(Debug, Clone, Copy)]
pub struct MlpSpec {
    pub hidden: usize,
    pub bias: bool,
    /// `false`: the ungated `fc1`/`fc2` MLP
    pub gated: bool,
    pub fused: bool,
    pub act: Act,
    /// gemma's four norms per layer
    pub sandwich: bool,
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
    /// (phi) the final norm is the LayerNorm `model.final_layernorm`, not the RMSNorm `model.norm`
    pub final_layernorm: bool,
    pub lm_head_bias: bool,
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
            final_layernorm: false,
            lm_head_bias: false,
        }
    }
}

impl BaseArgs {
    /// The attention every llama-like layer has, with `n_kv_heads` KV heads of `head_dim`.
    pub fn attention(&self, n_kv_heads: usize, head_dim: usize) -> AttentionSpec {
        AttentionSpec {
            hidden: self.hidden_size,
            n_heads: self.num_attention_heads,
            n_kv_heads,
            head_dim,
            fused_qkv: false,
            qkv_bias: false,
            o_bias: false,
            o_name: "o_proj",
            qk_norm: false,
            scale: None,
            softcap: None,
        }
    }

    /// A SiLU-gated MLP of `intermediate_size` units.
    pub fn mlp(&self) -> MlpSpec {
        MlpSpec {
            hidden: self.intermediate_size,
            bias: false,
            gated: true,
            fused: false,
            act: Act::Silu,
            sandwich: false,
        }
    }

    /// A model of [`Block`]s (`model.layers.{i}`), each with `attn` and `mlp`, in the body
    /// `spec` describes.
    pub fn build(&self, ld: &Loader, attn: &AttentionSpec, mlp: &MlpSpec, spec: ModelSpec) -> Result<DecoderModel> {
        let norm = NormSpec { eps: self.rms_norm_eps, shift: spec.norm_shift };
        let layers = (0..self.num_hidden_layers)
            .map(|i| {
                Ok(std::sync::Arc::new(Block::load(attn, mlp, norm, ld, &format!("model.layers.{i}"))?)
                    as std::sync::Arc<dyn Layer>)
            })
            .collect::<Result<Vec<_>>>()?;
        self.build_with(ld, spec, layers)
    }

    /// A model around `layers` (an architecture's own layer type).
    pub fn build_with(
        &self,
        ld: &Loader,
        spec: ModelSpec,
        layers: Vec<std::sync::Arc<dyn Layer>>,
    ) -> Result<DecoderModel> {
        let final_norm = if spec.final_layernorm {
            Norm::Layer(LayerNorm::load(ld, "model.final_layernorm", self.hidden_size, self.rms_norm_eps)?)
        } else {
            NormSpec { eps: self.rms_norm_eps, shift: spec.norm_shift }
                .load(ld, "model.norm", self.hidden_size)
                .map(Norm::Rms)?
        };
        let embed_tokens = Embedding::load(ld, "model.embed_tokens", self.vocab_size, self.hidden_size)?;
        let lm_head = if spec.tie_word_embeddings {
            None
        } else {
            Some(Linear::load(ld, "lm_head", self.hidden_size, self.vocab_size, spec.lm_head_bias)?)
        };
        Ok(DecoderModel {
            embed_tokens,
            graphable: layers.iter().all(|l| l.graphable()),
            layers,
            windows: spec.windows,
            norm: final_norm,
            lm_head,
            ropes: spec.ropes,
            layer_rope: spec.layer_rope,
            embed_scale: spec.embed_scale,
            final_softcap: spec.final_softcap,
            vocab_size: self.vocab_size,
            max_context: spec.max_context,
            dtype: ld.act_dtype,
            device: ld.device.clone(),
        })
    }
}

/// RMSNorm or LayerNorm.
pub enum Norm {
    Rms(RmsNorm),
    Layer(LayerNorm),
}

impl Norm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Norm::Rms(n) => n.forward(x),
            Norm::Layer(n) => n.forward(x),
        }
    }

    /// The norm of `x + r`, or of `x` without `r` (the add fused into an RMSNorm where it can be).
    pub fn forward_residual(&self, x: &Tensor, r: Option<&Pending>) -> Result<Tensor> {
        match self {
            Norm::Rms(n) => Ok(n.forward_residual(x, Pending::resolve(r)?.as_ref())?.1),
            Norm::Layer(n) => n.forward(&plus(x, r)?),
        }
    }
}

/// The model body: token embedding, the layers, a final norm and the head (a separate
/// `lm_head`, or the embedding used as a linear layer when tied).
pub struct DecoderModel {
    embed_tokens: Embedding,
    layers: Vec<std::sync::Arc<dyn Layer>>,
    windows: Vec<Option<usize>>,
    norm: Norm,
    lm_head: Option<Linear>,
    ropes: Vec<Rope>,
    layer_rope: Vec<usize>,
    embed_scale: Option<f64>,
    final_softcap: Option<f64>,
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
        let checkpoint = crate::models::checkpoint::active(&h, offset);
        // each layer's last residual branch, added by the next norm (Layer::forward_deferred)
        let mut pending: Option<Pending> = None;
        for (((layer, c), r), w) in self.layers.iter().zip(cache.iter_mut()).zip(&self.layer_rope).zip(&self.windows) {
            if checkpoint && w.is_none() && h.track_op() {
                // training with --grad-checkpoint: the layer's activations are recomputed in
                // the backward pass instead of kept
                h = crate::models::checkpoint::run(layer.clone(), &plus(&h, pending.take().as_ref())?, &tables[*r])?;
            } else {
                (h, pending) = layer.forward_deferred(&h, pending.as_ref(), &tables[*r], c)?;
            }
        }
        if last_only {
            h = h.narrow(1, l - 1, 1)?;
            pending = pending.map(|p| p.narrow(1, l - 1, 1)).transpose()?;
        }
        let h = self.norm.forward_residual(&h, pending.as_ref())?;
        let logits = match &self.lm_head {
            Some(head) => head.forward(&h)?,
            None => self.embed_tokens.as_linear(&h)?,
        };
        if raw && self.final_softcap.is_none() {
            return Ok(logits);
        }
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
