//! DeepSeek-V3 / R1 and Kimi K2 (`deepseek_v3`; mlx_lm remaps `kimi_k2` here): multi-head
//! latent attention ([`super::mla`]) with a low-rank query, then a dense MLP in the first
//! `first_k_dense_replace` layers and in every layer off the `moe_layer_freq` beat, DeepSeek's
//! mixture of experts in the others: sigmoid scores plus `e_score_correction_bias` choose the
//! experts, only the `topk_group` best of `n_group` groups (ranked by their two best scores)
//! compete, the chosen experts' uncorrected scores (renormalized with `norm_topk_prob`) times
//! `routed_scaling_factor` weigh them, and shared experts are added. Reads like mlx_lm's
//! `models/deepseek_v3.py`; glm4_moe_lite, kimi_k25 and mistral4 load through [`load_with`].

use super::decoder::{BaseArgs, DecoderModel, ModelSpec, PreNormBlock};
use super::mla::{softmax_scale, split_kv_b, MlaAttention, MlaDims};
use super::mlp::{DenseMlp, FeedForward, Mlp};
use super::switch::{combine, stack_mlp_experts, top_k, Activation, SwitchGlu};
use crate::io::Weights;
use crate::nn::{Branch, Linear, Loader, Normed, Rope};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};
use serde::Deserialize;

/// The config of every DeepSeek-style MLA model (deepseek_v3, kimi_k25's text model,
/// glm4_moe_lite, mistral4), with deepseek_v3's defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    #[serde(flatten)]
    pub base: BaseArgs,
    #[serde(default = "super::count::<1407>")]
    pub moe_intermediate_size: usize,
    #[serde(default)]
    pub n_shared_experts: Option<usize>,
    #[serde(default)]
    pub n_routed_experts: Option<usize>,
    #[serde(default = "super::num::<1>")]
    pub routed_scaling_factor: f64,
    #[serde(default = "super::count::<512>")]
    pub kv_lora_rank: usize,
    #[serde(default = "default_q_lora_rank")]
    pub q_lora_rank: Option<usize>,
    #[serde(default = "super::count::<64>")]
    pub qk_rope_head_dim: usize,
    #[serde(default = "super::count::<128>")]
    pub v_head_dim: usize,
    #[serde(default = "super::count::<128>")]
    pub qk_nope_head_dim: usize,
    #[serde(default)]
    pub topk_method: Option<String>,
    #[serde(default = "yes")]
    pub norm_topk_prob: bool,
    #[serde(default = "super::count::<1>")]
    pub n_group: usize,
    #[serde(default = "super::count::<1>")]
    pub topk_group: usize,
    #[serde(default = "super::count::<1>")]
    pub num_experts_per_tok: usize,
    #[serde(default = "super::count::<1>")]
    pub moe_layer_freq: usize,
    #[serde(default)]
    pub first_k_dense_replace: usize,
    #[serde(default = "super::count::<2048>")]
    pub max_position_embeddings: usize,
    /// each family's own default when absent
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub attention_bias: bool,
    /// mistral4 only
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// mistral4 only: traditional RoPE unless `false`
    #[serde(default)]
    pub rope_interleave: Option<bool>,
    /// mistral4 only: RoPE, yarn and the Llama-4 query scaling
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
}

fn default_q_lora_rank() -> Option<usize> {
    Some(1536)
}

fn yes() -> bool {
    true
}

impl ModelArgs {
    pub fn dims(&self) -> MlaDims {
        MlaDims {
            heads: self.base.num_attention_heads,
            q_lora_rank: self.q_lora_rank,
            kv_lora_rank: self.kv_lora_rank,
            qk_nope_head_dim: self.qk_nope_head_dim,
            qk_rope_head_dim: self.qk_rope_head_dim,
            v_head_dim: self.v_head_dim,
        }
    }
}

/// The families that share this file's model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// deepseek_v3 and Kimi K2 / K2.5
    DeepseekV3,
    /// glm4_moe_lite: the q/kv norms take `rms_norm_eps`, RoPE base 1e6 by default
    Glm4MoeLite,
    /// mistral4: RoPE from `rope_parameters`, position-scaled queries, a softmax router that is
    /// a linear layer, MoE in every layer from `first_k_dense_replace`, optionally tied
    Mistral4,
}

/// Takes compressed-tensors' int4 weights as mlx's affine ones, dequantizes FP8 weights
/// (`weight_scale_inv`), stacks Hugging Face's per-expert weights into
/// `mlp.switch_mlp`, splits `kv_b_proj` into `embed_q` / `unembed_out`, and drops the multi-token-prediction layer (`model.layers.61`,
/// mlx_lm's fixed index) and rotary frequencies.
pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    sanitize_family(args, weights, Family::DeepseekV3)
}

/// [`sanitize`] as each family's own does it (glm4_moe_lite drops every layer from
/// `num_hidden_layers` on; mistral4 drops none).
pub fn sanitize_family(args: &ModelArgs, weights: &mut Weights, family: Family) -> Result<()> {
    // compressed-tensors' int4 (`weight_packed` i32 words, `weight_scale`, `weight_shape`): mlx's
    // affine 4-bit, the unsigned codes offset by 8 (biases = -8 · scales)
    let shapes: Vec<String> = weights.names().filter(|k| k.ends_with("weight_shape")).map(String::from).collect();
    for k in &shapes {
        let base = k.strip_suffix("weight_shape").expect("filtered");
        weights.rename(&format!("{base}weight_packed"), &format!("{base}weight"))?;
        weights.rename(&format!("{base}weight_scale"), &format!("{base}scales"))?;
        weights.add_scaled(&format!("{base}scales"), &format!("{base}biases"), -8.0)?;
    }
    if !shapes.is_empty() {
        weights.sanitize(|n| (!n.ends_with("weight_shape")).then(|| n.to_string()));
    }
    // FP8 weights with their inverse scales (`….weight_scale_inv`; Mistral's fused experts:
    // `experts.gate_up_proj_scale_inv`) dequantized to bf16
    let scales: Vec<String> = weights.names().filter(|k| k.ends_with("_scale_inv")).map(String::from).collect();
    for s in scales {
        weights.dequantize_fp8(s.strip_suffix("_scale_inv").expect("filtered"), &s)?;
    }
    let n = args.base.num_hidden_layers;
    weights.sanitize(|k| {
        let layer = k.strip_prefix("model.layers.").and_then(|r| r.split('.').next()).and_then(|i| i.parse().ok());
        let mtp = match family {
            Family::DeepseekV3 => k.starts_with("model.layers.61"),
            Family::Glm4MoeLite => layer.is_some_and(|l: usize| l >= n),
            Family::Mistral4 => false,
        };
        (!mtp && !k.contains("rotary_emb.inv_freq") && !k.ends_with("activation_scale")).then(|| k.to_string())
    });
    if family == Family::Mistral4 {
        // fused experts: gate_up_proj (E, 2·I, D), gate rows first; down_proj (E, D, I)
        for l in 0..n {
            let p = format!("model.layers.{l}.mlp");
            let fused = format!("{p}.experts.gate_up_proj");
            if weights.contains(&fused) {
                let halves = [format!("{p}.switch_mlp.gate_proj.weight"), format!("{p}.switch_mlp.up_proj.weight")];
                weights.split_axis(&fused, 1, &halves)?;
            }
            let down = format!("{p}.experts.down_proj");
            if weights.contains(&down) {
                weights.rename(&down, &format!("{p}.switch_mlp.down_proj.weight"))?;
            }
        }
    }
    stack_mlp_experts(weights, n, args.n_routed_experts.unwrap_or(0))?;
    let dims = args.dims();
    for l in 0..n {
        split_kv_b(weights, &format!("model.layers.{l}.self_attn"), &dims)?;
    }
    Ok(())
}

/// [`sanitize_family`] of a text model whose tensors sit under `prefix` (the names without it
/// are sanitized, then every name is put under it).
pub fn sanitize_prefixed(args: &ModelArgs, weights: &mut Weights, family: Family, prefix: &str) -> Result<()> {
    weights.sanitize(|k| Some(k.strip_prefix(prefix).unwrap_or(k).to_string()));
    sanitize_family(args, weights, family)?;
    weights.sanitize(|k| Some(format!("{prefix}{k}")));
    Ok(())
}

/// How a DeepSeek-style router scores the experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scoring {
    /// sigmoid in f32; the choice is made on the scores plus `e_score_correction_bias`
    Sigmoid,
    /// softmax in f32 (mistral4)
    Softmax,
    /// softmax in the activations' dtype, the weights read from the group-masked scores
    /// (deepseek_v2)
    SoftmaxMasked,
}

/// How a group of experts is ranked for the group limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupScore {
    /// the sum of its two best scores (DeepSeek-V3)
    TopTwoSum,
    /// its best score (DeepSeek-V2's `group_limited_greedy`)
    Max,
}

/// DeepSeek's router (`MoEGate`; also glm4_moe's, Nemotron-H's, mistral4's): scores, the group
/// limit, the top-k choice and the weights of the chosen experts.
pub struct Router {
    /// (experts × hidden): a plain weight, except mistral4's quantizable linear layer
    pub weight: Linear,
    pub e_score_correction_bias: Option<Tensor>,
    pub scoring: Scoring,
    /// `(n_group, topk_group, how a group ranks)`: only the `topk_group` best groups compete
    pub groups: Option<(usize, usize, GroupScore)>,
    pub top_k: usize,
    /// the chosen weights divided by their sum
    pub renormalize: bool,
    pub routed_scaling_factor: f64,
}

impl Router {
    /// DeepSeek-V3's router of MoE layer `{m}` (`{m}.gate.weight`, never quantized, and
    /// `{m}.gate.e_score_correction_bias`): sigmoid scores, the correction bias, two-best group
    /// ranking, renormalized (with `norm_topk_prob`) when more than one expert is chosen.
    #[allow(clippy::too_many_arguments)]
    pub fn sigmoid(
        ld: &Loader,
        m: &str,
        experts: usize,
        dim: usize,
        top_k: usize,
        n_group: usize,
        topk_group: usize,
        norm_topk_prob: bool,
        routed_scaling_factor: f64,
    ) -> Result<Self> {
        Ok(Self {
            weight: Linear::Dense { weight: ld.tensor(&format!("{m}.gate.weight"), &[experts, dim])?, bias: None },
            e_score_correction_bias: Some(ld.tensor(&format!("{m}.gate.e_score_correction_bias"), &[experts])?),
            scoring: Scoring::Sigmoid,
            groups: (n_group > 1).then_some((n_group, topk_group, GroupScore::TopTwoSum)),
            top_k,
            renormalize: norm_topk_prob && top_k > 1,
            routed_scaling_factor,
        })
    }

    /// The chosen experts (…, k) and their weights (…, k, f32; the activations' dtype for
    /// deepseek_v2) for `x` (…, dim).
    pub fn route(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let logits = match &self.weight {
            Linear::Dense { weight, .. } => x.broadcast_matmul(&weight.to_dtype(x.dtype())?.t()?)?,
            w => w.forward(x)?,
        };
        let scores = match self.scoring {
            Scoring::Sigmoid => candle_nn::ops::sigmoid(&logits.to_dtype(DType::F32)?)?,
            Scoring::Softmax => candle_nn::ops::softmax_last_dim(&logits.to_dtype(DType::F32)?)?,
            Scoring::SoftmaxMasked => super::switch::softmax(&logits)?,
        };
        let mut choice = match &self.e_score_correction_bias {
            Some(b) => scores.broadcast_add(&b.to_dtype(scores.dtype())?)?,
            None => scores.clone(),
        };
        if let Some((n_group, topk_group, rank)) = self.groups {
            // zero every group but the `topk_group` best
            let mut grouped = choice.dims().to_vec();
            let e = grouped.pop().expect("scores have an expert axis");
            grouped.extend([n_group, e / n_group]);
            let g = choice.reshape(grouped)?;
            let group_scores = match rank {
                GroupScore::TopTwoSum => top_k(&g, 2)?.1.sum(D::Minus1)?,
                GroupScore::Max => g.max(D::Minus1)?,
            };
            let ranks = group_scores.arg_sort_last_dim(true)?.arg_sort_last_dim(true)?;
            let drop = (n_group - topk_group) as f64;
            let keep = ranks.to_dtype(DType::F32)?.ge(drop)?.to_dtype(g.dtype())?.unsqueeze(D::Minus1)?;
            choice = g.broadcast_mul(&keep)?.flatten_from(D::Minus2)?;
        }
        let (inds, _) = top_k(&choice, self.top_k)?;
        let source = if self.scoring == Scoring::SoftmaxMasked { &choice } else { &scores };
        let mut w = source.contiguous()?.gather(&inds, D::Minus1)?;
        if self.renormalize {
            w = w.broadcast_div(&w.sum_keepdim(D::Minus1)?)?;
        }
        Ok((inds, (w * self.routed_scaling_factor)?))
    }
}

/// DeepSeek's mixture of experts: the routed experts' weighted outputs plus the shared experts'.
pub struct DeepseekMoe {
    pub gate: Router,
    pub switch_mlp: SwitchGlu,
    pub shared_experts: Option<Mlp>,
}

impl DeepseekMoe {
    /// The experts of `{m}.switch_mlp` and, with `n_shared_experts`, `{m}.shared_experts`
    /// (`n_shared_experts` experts' width in one MLP).
    pub fn load(
        ld: &Loader,
        m: &str,
        gate: Router,
        experts: usize,
        dim: usize,
        hidden: usize,
        n_shared_experts: Option<usize>,
    ) -> Result<Self> {
        super::switch::check_top_k(gate.top_k, experts, "num_experts_per_tok")?;
        if let Some((n_group, topk_group, _)) = gate.groups {
            if !experts.is_multiple_of(n_group) || topk_group > n_group || topk_group == 0 {
                bail!(
                    "config.json: {experts} experts cannot form n_group {n_group} groups of which topk_group {topk_group} are kept"
                );
            }
        }
        let switch_mlp =
            SwitchGlu::load(ld, &format!("{m}.switch_mlp"), experts, dim, hidden, false, Activation::Swiglu)?;
        let shared_experts = n_shared_experts
            .map(|n| Mlp::load(ld, &format!("{m}.shared_experts"), dim, hidden * n, false))
            .transpose()?;
        Ok(Self { gate, switch_mlp, shared_experts })
    }
}

impl FeedForward for DeepseekMoe {
    fn branch<'a>(&'a self, x: &Normed) -> Result<Branch<'a>> {
        let x = x.tensor()?;
        let (inds, w) = self.gate.route(&x)?;
        let mut y = combine(&self.switch_mlp.forward(&x, &inds)?.to_dtype(w.dtype())?, &w)?.to_dtype(x.dtype())?;
        if let Some(s) = &self.shared_experts {
            y = (y + s.forward_tensor(&x)?)?;
        }
        Ok(Branch::Tensor(y))
    }

    /// Not captured: the group limit's comparison uploads its bound from the host at every step.
    fn graphable(&self) -> bool {
        false
    }
}

/// Whether layer `l` is a mixture of experts.
fn is_moe(args: &ModelArgs, family: Family, l: usize) -> bool {
    args.n_routed_experts.is_some()
        && l >= args.first_k_dense_replace
        && (family == Family::Mistral4 || l.is_multiple_of(args.moe_layer_freq.max(1)))
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    load_with(args, ld, "", Family::DeepseekV3)
}

/// The model of `family` with every tensor name under `prefix` (kimi_k25's and mistral3's
/// `language_model.`).
pub fn load_with(args: &ModelArgs, ld: &Loader, prefix: &'static str, family: Family) -> Result<DecoderModel> {
    let a = &args.base;
    let dims = args.dims();
    let dim = a.hidden_size;
    if family != Family::Mistral4 && args.n_routed_experts.is_some() {
        if let Some(m) = args.topk_method.as_deref().filter(|m| *m != "noaux_tc") {
            bail!("config.json: topk_method `{m}` is not supported by {family:?} (only noaux_tc)");
        }
    }
    let AttentionRope { rope, scale, position_scaling } = match family {
        Family::Mistral4 => mistral4_rope(args)?,
        _ => {
            let theta = args.rope_theta.unwrap_or(if family == Family::Glm4MoeLite { 1e6 } else { 1e4 });
            let scaling = args.rope_scaling.as_ref();
            let rope =
                Rope::from_config(dims.qk_rope_head_dim, theta, true, scaling, Some(args.max_position_embeddings))?;
            AttentionRope { rope, scale: softmax_scale(dims.q_head_dim(), scaling)?, position_scaling: None }
        }
    };
    let norm_eps = if family == Family::Glm4MoeLite { a.rms_norm_eps } else { 1e-6 };
    let layers = (0..a.num_hidden_layers)
        .map(|l| {
            let p = format!("{prefix}model.layers.{l}");
            let mut attn =
                MlaAttention::load(ld, &format!("{p}.self_attn"), dims, dim, args.attention_bias, norm_eps, scale)?;
            attn.position_scaling = position_scaling;
            let m = format!("{p}.mlp");
            let mlp: Box<dyn FeedForward> = match args.n_routed_experts {
                Some(e) if is_moe(args, family, l) => {
                    let gate = router(args, ld, &m, e, dim, family)?;
                    let (hidden, shared) = (args.moe_intermediate_size, args.n_shared_experts);
                    Box::new(DeepseekMoe::load(ld, &m, gate, e, dim, hidden, shared)?)
                }
                _ => Box::new(Mlp::load(ld, &m, dim, a.intermediate_size, false)?),
            };
            PreNormBlock::load(ld, &p, dim, a.rms_norm_eps, attn, mlp)
        })
        .collect::<Result<Vec<_>>>()?;
    let tied = family == Family::Mistral4 && args.tie_word_embeddings;
    let mut spec = ModelSpec::plain(a.num_hidden_layers, rope, tied, None);
    spec.prefix = prefix;
    a.decoder(ld, spec, layers)
}

/// The router of MoE layer `{m}`.
fn router(args: &ModelArgs, ld: &Loader, m: &str, experts: usize, dim: usize, family: Family) -> Result<Router> {
    if family == Family::Mistral4 {
        return Ok(Router {
            weight: Linear::load(ld, &format!("{m}.gate"), dim, experts, false)?,
            e_score_correction_bias: None,
            scoring: Scoring::Softmax,
            groups: (args.n_group > 1).then_some((args.n_group, args.topk_group, GroupScore::TopTwoSum)),
            top_k: args.num_experts_per_tok,
            renormalize: args.norm_topk_prob,
            routed_scaling_factor: args.routed_scaling_factor,
        });
    }
    Router::sigmoid(
        ld,
        m,
        experts,
        dim,
        args.num_experts_per_tok,
        args.n_group,
        args.topk_group,
        args.norm_topk_prob,
        args.routed_scaling_factor,
    )
}

/// Mistral 4's RoPE (from `rope_parameters`: base `rope_theta` (default 1e5), traditional unless
/// `rope_interleave` is false, yarn when its type says so), softmax scale (yarn's correction
/// unless the type is `default`) and query position scaling (`llama_4_scaling_beta`,
/// `original_max_position_embeddings`).
fn mistral4_rope(args: &ModelArgs) -> Result<AttentionRope> {
    let Some(p) = args.rope_parameters.as_ref() else {
        bail!("config.json: mistral4 needs `rope_parameters` (with `llama_4_scaling_beta` and `original_max_position_embeddings`)")
    };
    let get = |k: &str| p.get(k).and_then(|v| v.as_f64());
    let theta = get("rope_theta").unwrap_or(1e5);
    let traditional = args.rope_interleave.unwrap_or(true);
    let dims = args.dims();
    let rope =
        Rope::from_config(dims.qk_rope_head_dim, theta, traditional, Some(p), Some(args.max_position_embeddings))?;
    let kind = p.get("type").or_else(|| p.get("rope_type")).and_then(|v| v.as_str()).unwrap_or("default");
    let scale = softmax_scale(dims.q_head_dim(), (kind != "default").then_some(p))?;
    let (Some(beta), Some(orig)) = (get("llama_4_scaling_beta"), get("original_max_position_embeddings")) else {
        bail!("config.json: mistral4's rope_parameters need `llama_4_scaling_beta` and `original_max_position_embeddings`")
    };
    Ok(AttentionRope { rope, scale, position_scaling: Some((beta, orig)) })
}

/// A family's RoPE, softmax scale and query position scaling.
struct AttentionRope {
    rope: Rope,
    scale: f64,
    position_scaling: Option<(f64, f64)>,
}
