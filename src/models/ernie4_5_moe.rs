//! ERNIE 4.5 MoE: llama-style attention (biases with `use_bias`, traditional RoPE), dense
//! layers outside `moe_layer_start_index ..= moe_layer_end_index` (every
//! `moe_layer_interval`-th inside), and in the others a mixture of experts: softmax (or sigmoid)
//! router scores in f32, the `moe_k` best renormalized to sum to 1, plus shared experts. Reads
//! like mlx_lm's `models/ernie4_5_moe.py`, which drops the multi-token-prediction weights and
//! the score correction bias.

use super::attention::Heads;
use super::decoder::{BaseArgs, DecoderModel, ModelSpec, PreNormBlock};
use super::llama::Attention;
use super::mlp::{DenseMlp, FeedForward, Mlp};
use super::switch::{combine, softmax, stack_mlp_experts, top_k, Activation, SwitchGlu};
use crate::io::Weights;
use crate::nn::{Branch, Linear, Loader, Normed, Rope};
use anyhow::{bail, Result};
use candle_core::{DType, D};
use serde::Deserialize;

/// An index, or (in some configs) a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(usize),
    Many(Vec<usize>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    #[serde(flatten)]
    pub base: BaseArgs,
    pub max_position_embeddings: usize,
    pub num_key_value_heads: usize,
    pub rope_theta: f64,
    pub use_bias: bool,
    pub tie_word_embeddings: bool,
    pub moe_num_experts: usize,
    #[serde(default)]
    pub moe_layer_start_index: Option<OneOrMany>,
    #[serde(default)]
    pub moe_intermediate_size: usize,
    #[serde(default = "super::count::<1>")]
    pub moe_k: usize,
    #[serde(default = "super::count::<1>")]
    pub moe_layer_interval: usize,
    #[serde(default)]
    pub moe_num_shared_experts: usize,
    #[serde(default)]
    pub moe_layer_end_index: Option<OneOrMany>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default)]
    pub moe_gate_act: Option<String>,
}

impl ModelArgs {
    fn is_moe(&self, l: usize) -> bool {
        let start = match &self.moe_layer_start_index {
            None => 0,
            Some(OneOrMany::One(i)) => *i,
            Some(OneOrMany::Many(v)) => v.iter().copied().min().unwrap_or(0),
        };
        let end = match &self.moe_layer_end_index {
            None => self.base.num_hidden_layers.saturating_sub(1),
            Some(OneOrMany::One(i)) => *i,
            Some(OneOrMany::Many(v)) => v.iter().copied().max().unwrap_or(0),
        };
        (l + 1).is_multiple_of(self.moe_layer_interval.max(1)) && start <= l && l <= end
    }

    fn moe_hidden(&self) -> usize {
        if self.moe_intermediate_size == 0 {
            self.base.intermediate_size
        } else {
            self.moe_intermediate_size
        }
    }
}

/// Drops the multi-token-prediction weights and the score correction bias, and stacks the
/// per-expert weights into `mlp.switch_mlp`.
pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    const DROPPED: [&str; 5] =
        ["mtp_block.", "mtp_linear_proj.", "mtp_hidden_norm.", "mtp_emb_norm.", "e_score_correction_bias"];
    weights.sanitize(|k| (!DROPPED.iter().any(|d| k.contains(d))).then(|| k.to_string()));
    super::drop_unused(weights, args.tie_word_embeddings);
    stack_mlp_experts(weights, args.base.num_hidden_layers, args.moe_num_experts)
}

struct MoE {
    gate: Linear,
    sigmoid: bool,
    switch_mlp: SwitchGlu,
    shared_experts: Option<Mlp>,
    top_k: usize,
}

impl FeedForward for MoE {
    fn branch<'a>(&'a self, x: &Normed) -> Result<Branch<'a>> {
        let x = x.tensor()?;
        let logits = self.gate.forward(&x)?.to_dtype(DType::F32)?;
        let g = if self.sigmoid { candle_nn::ops::sigmoid(&logits)? } else { softmax(&logits)? };
        let (inds, s) = top_k(&g, self.top_k)?;
        let s = s.broadcast_div(&s.sum_keepdim(D::Minus1)?.clamp(1e-12, f64::INFINITY)?)?;
        let mut y = combine(&self.switch_mlp.forward(&x, &inds)?, &s)?;
        if let Some(sh) = &self.shared_experts {
            y = (y + sh.forward_tensor(&x)?)?;
        }
        Ok(Branch::Tensor(y))
    }

    /// Not captured: the router's clamp uploads its bound from the host at every step.
    fn graphable(&self) -> bool {
        false
    }
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    let a = &args.base;
    super::switch::check_top_k(args.moe_k, args.moe_num_experts, "moe_k")?;
    let dim = a.hidden_size;
    let hd = args.head_dim.unwrap_or(dim / a.num_attention_heads);
    let sigmoid = match args.moe_gate_act.as_deref() {
        None | Some("softmax") => false,
        Some("sigmoid") => true,
        Some(other) => bail!("config.json: moe_gate_act `{other}`; expected softmax or sigmoid"),
    };
    let rope = Rope::from_config(hd, args.rope_theta, true, None, Some(args.max_position_embeddings))?;
    let heads = Heads::new(a.num_attention_heads, args.num_key_value_heads, hd);
    let layers = (0..a.num_hidden_layers)
        .map(|l| {
            let p = format!("model.layers.{l}");
            let bias = args.use_bias;
            let attn = Attention::load(ld, &format!("{p}.self_attn"), dim, heads, bias, bias)?;
            let m = format!("{p}.mlp");
            let mlp: Box<dyn FeedForward> = if args.is_moe(l) {
                let (e, hidden) = (args.moe_num_experts, args.moe_hidden());
                let shared = args.moe_num_shared_experts;
                Box::new(MoE {
                    gate: Linear::load(ld, &format!("{m}.gate"), dim, e, false)?,
                    sigmoid,
                    switch_mlp: SwitchGlu::load(
                        ld,
                        &format!("{m}.switch_mlp"),
                        e,
                        dim,
                        hidden,
                        bias,
                        Activation::Swiglu,
                    )?,
                    shared_experts: (shared > 0)
                        .then(|| Mlp::load(ld, &format!("{m}.shared_experts"), dim, hidden * shared, bias))
                        .transpose()?,
                    top_k: args.moe_k,
                })
            } else {
                Box::new(Mlp::load(ld, &m, dim, a.intermediate_size, bias)?)
            };
            PreNormBlock::load(ld, &p, dim, a.rms_norm_eps, attn, mlp)
        })
        .collect::<Result<Vec<_>>>()?;
    let spec =
        ModelSpec::plain(a.num_hidden_layers, rope, args.tie_word_embeddings, Some(args.max_position_embeddings));
    a.decoder(ld, spec, layers)
}
