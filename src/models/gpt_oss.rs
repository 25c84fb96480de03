//! gpt-oss (gpt-oss-20b, gpt-oss-120b): layers alternating between sliding-window (a rotating
//! cache of `sliding_window` positions) and full attention, both with biased projections and a
//! learned sink logit per head (a query may attend to nothing), YaRN RoPE; every layer a
//! mixture of experts: a biased router, its `k` best logits softmaxed into the experts' weights,
//! experts with biases and gpt-oss's clamped SwiGLU. Reads like mlx_lm's `models/gpt_oss.py`.

use super::attention::{Heads, SelfAttention};
use super::decoder::{BaseArgs, DecoderModel, ModelSpec, PreNormBlock};
use super::mlp::FeedForward;
use super::switch::{combine, softmax, top_k, Activation, SwitchGlu};
use crate::cache::KvCache;
use crate::io::Weights;
use crate::nn::{Branch, Linear, Loader, Normed, Rope, RopeTables};
use crate::ops::attention::attention_with_sinks;
use anyhow::{bail, Result};
use candle_core::Tensor;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    #[serde(default = "super::count::<36>")]
    pub num_hidden_layers: usize,
    #[serde(default = "super::count::<128>")]
    pub num_local_experts: usize,
    #[serde(default = "super::count::<4>")]
    pub num_experts_per_tok: usize,
    #[serde(default = "super::count::<201088>")]
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "super::count::<2880>")]
    pub hidden_size: usize,
    #[serde(default = "super::count::<2880>")]
    pub intermediate_size: usize,
    #[serde(default = "super::count::<64>")]
    pub head_dim: usize,
    #[serde(default = "super::count::<64>")]
    pub num_attention_heads: usize,
    #[serde(default = "super::count::<8>")]
    pub num_key_value_heads: usize,
    #[serde(default = "super::count::<128>")]
    pub sliding_window: usize,
    #[serde(default = "super::num::<150000>")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
}

fn default_eps() -> f64 {
    1e-5
}

impl ModelArgs {
    /// `layer_types`, by default sliding and full alternating; as in mlx_lm, the model runs as
    /// many layers as this list has (an odd layer count with the default list drops the last).
    fn layer_types(&self) -> Vec<String> {
        self.layer_types.clone().unwrap_or_else(|| {
            ["sliding_attention", "full_attention"]
                .repeat(self.num_hidden_layers / 2)
                .into_iter()
                .map(String::from)
                .collect()
        })
    }

    /// The sliding window of each layer that runs (`None`: full attention).
    fn windows(&self) -> Result<Vec<Option<usize>>> {
        let n = self.num_hidden_layers.min(self.layer_types().len());
        self.layer_types()[..n]
            .iter()
            .enumerate()
            .map(|(i, t)| match t.as_str() {
                "sliding_attention" => Ok(Some(self.sliding_window)),
                "full_attention" => Ok(None),
                other => {
                    bail!("config.json: layer_types[{i}] = `{other}`; expected full_attention or sliding_attention")
                }
            })
            .collect()
    }
}

/// The mlx layout loads as it is. The original checkpoints' experts (MXFP4 `*_blocks` /
/// `*_scales` bytes, gate and up rows interleaved in `gate_up_proj`, biases beside them) become
/// mlx's `experts.{gate,up,down}_proj.{weight,scales,bias}`, as mlx_lm's `sanitize` does.
pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    super::drop_unused(weights, false);
    for l in 0..args.num_hidden_layers {
        let p = format!("model.layers.{l}.mlp.experts");
        if !weights.contains(&format!("{p}.gate_up_proj_blocks")) {
            continue;
        }
        let halves = |part: &str| [format!("{p}.gate_proj.{part}"), format!("{p}.up_proj.{part}")];
        let blocks = format!("{p}.gate_up_proj_blocks");
        weights.bytes_as_words(&blocks)?;
        let rows = weights.shape(&blocks)?.len() - 2;
        weights.deinterleave(&blocks, rows, &halves("weight"))?;
        weights.deinterleave(&format!("{p}.gate_up_proj_scales"), rows, &halves("scales"))?;
        weights.deinterleave(&format!("{p}.gate_up_proj_bias"), rows, &halves("bias"))?;
        let down = format!("{p}.down_proj_blocks");
        weights.bytes_as_words(&down)?;
        weights.rename(&down, &format!("{p}.down_proj.weight"))?;
        weights.rename(&format!("{p}.down_proj_scales"), &format!("{p}.down_proj.scales"))?;
        weights.rename(&format!("{p}.down_proj_bias"), &format!("{p}.down_proj.bias"))?;
    }
    Ok(())
}

/// Attention with biased projections, RoPE, and a sink logit per query head.
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    sinks: Tensor,
    heads: Heads,
}

impl SelfAttention for Attention {
    fn forward(&self, x: &Normed, rope: &RopeTables, cache: &mut KvCache) -> Result<Tensor> {
        let [q, k, v] = super::attention::qkv(x, &self.q_proj, &self.k_proj, &self.v_proj)?;
        let (b, l, _) = q.dims3()?;
        let h = &self.heads;
        let split = |t: Tensor, n: usize| -> Result<Tensor> { Ok(t.reshape((b, l, n, h.head_dim))?.transpose(1, 2)?) };
        let q = rope.apply(&split(q, h.n_heads)?.contiguous()?)?;
        let k = rope.apply(&split(k, h.n_kv_heads)?.contiguous()?)?;
        let v = split(v, h.n_kv_heads)?;
        let mask = cache.mask(l);
        let (k, v) = cache.update_and_fetch(&k, &v)?;
        let out = attention_with_sinks(&q, &k, &v, h.scale, mask, &self.sinks)?;
        Ok(out.transpose(1, 2)?.reshape((b, l, h.n_heads * h.head_dim))?)
    }

    fn o_proj(&self) -> &Linear {
        &self.o_proj
    }

    fn input_layers(&self) -> Vec<&Linear> {
        vec![&self.q_proj, &self.k_proj, &self.v_proj]
    }
}

/// The experts: the router's `k` best logits, softmaxed, weigh the chosen experts' outputs.
struct MlpBlock {
    router: Linear,
    experts: SwitchGlu,
    top_k: usize,
}

impl FeedForward for MlpBlock {
    fn branch<'a>(&'a self, x: &Normed) -> Result<Branch<'a>> {
        let x = x.tensor()?;
        let (inds, logits) = top_k(&self.router.forward(&x)?, self.top_k)?;
        Ok(Branch::Tensor(combine(&self.experts.forward(&x, &inds)?, &softmax(&logits)?)?))
    }

    /// Not captured: the clamped SwiGLU uploads its limits from the host at every step.
    fn graphable(&self) -> bool {
        false
    }
}

/// The clamped SwiGLU of gpt-oss's experts.
const SWIGLU: Activation = Activation::SwigluOai { alpha: 1.702, limit: 7.0 };

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    let (dim, hd, e) = (args.hidden_size, args.head_dim, args.num_local_experts);
    super::switch::check_top_k(args.num_experts_per_tok, e, "num_experts_per_tok")?;
    let heads = Heads::new(args.num_attention_heads, args.num_key_value_heads, hd);
    let rope = Rope::from_config(hd, args.rope_theta, false, args.rope_scaling.as_ref(), None)?;
    let windows = args.windows()?;
    let layers = (0..windows.len())
        .map(|l| {
            let p = format!("model.layers.{l}");
            let [q_proj, k_proj, v_proj] = heads.load_qkv(ld, &format!("{p}.self_attn"), dim, true)?;
            let attn = Attention {
                q_proj,
                k_proj,
                v_proj,
                o_proj: heads.load_out(ld, &format!("{p}.self_attn"), "o_proj", dim, true)?,
                sinks: ld.tensor(&format!("{p}.self_attn.sinks"), &[args.num_attention_heads])?,
                heads,
            };
            let m = format!("{p}.mlp");
            let mlp = MlpBlock {
                router: Linear::load(ld, &format!("{m}.router"), dim, e, true)?,
                experts: SwitchGlu::load(ld, &format!("{m}.experts"), e, dim, args.intermediate_size, true, SWIGLU)?,
                top_k: args.num_experts_per_tok,
            };
            PreNormBlock::load(ld, &p, dim, args.rms_norm_eps, attn, mlp)
        })
        .collect::<Result<Vec<_>>>()?;
    let base = BaseArgs {
        hidden_size: dim,
        num_hidden_layers: windows.len(),
        intermediate_size: args.intermediate_size,
        num_attention_heads: args.num_attention_heads,
        rms_norm_eps: args.rms_norm_eps,
        vocab_size: args.vocab_size,
    };
    let mut spec = ModelSpec::plain(windows.len(), rope, false, None);
    spec.windows = windows;
    base.decoder(ld, spec, layers)
}
