//! Granite 4.0-H (`granitemoehybrid`): Granite's body and multipliers with Mamba-2 layers among
//! attention layers (`layer_types`: `mamba` / `attention`; attention with RoPE unless
//! `position_embedding_type` is `nope`), and in every layer either the experts (granitemoe's,
//! `num_local_experts > 0`) plus a shared SwiGLU MLP (`shared_mlp`: `input_linear` gate|up,
//! `output_linear`), or a dense MLP. Reads like mlx_lm's `models/granitemoehybrid.py`; the mixer
//! is `ssm::Mamba2`.

use super::attention::{Heads, SelfAttention};
use super::decoder::{BaseArgs, DecoderModel, Layer, ModelSpec};
use super::granite::GraniteLayer;
use super::granitemoe::MoE;
use super::llama::Attention;
use super::mlp::{FeedForward, FusedMlp, Mlp};
use super::ssm::{Mamba2, Mamba2Dims};
use crate::io::Weights;
use crate::nn::{Branch, Loader, Normed, RmsNorm, Rope};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::sync::Arc;

#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    #[serde(flatten)]
    pub base: BaseArgs,
    pub max_position_embeddings: usize,
    pub num_key_value_heads: usize,
    pub attention_bias: bool,
    pub embedding_multiplier: f64,
    pub attention_multiplier: f64,
    pub logits_scaling: f64,
    pub residual_multiplier: f64,
    pub layer_types: Vec<String>,
    #[serde(default)]
    pub num_local_experts: Option<usize>,
    #[serde(default)]
    pub num_experts_per_tok: Option<usize>,
    #[serde(default)]
    pub shared_intermediate_size: Option<usize>,
    #[serde(default)]
    pub mamba_n_heads: Option<usize>,
    #[serde(default)]
    pub mamba_d_head: Option<usize>,
    #[serde(default)]
    pub mamba_proj_bias: Option<bool>,
    #[serde(default)]
    pub mamba_d_state: Option<usize>,
    #[serde(default)]
    pub mamba_d_conv: Option<usize>,
    #[serde(default)]
    pub mamba_n_groups: Option<usize>,
    #[serde(default)]
    pub mamba_conv_bias: Option<bool>,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub position_embedding_type: Option<String>,
    #[serde(default = "super::yes")]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub time_step_limit: Option<(f64, f64)>,
    #[serde(default = "super::num::<10000>")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
}

impl ModelArgs {
    fn use_moe(&self) -> bool {
        self.num_local_experts.unwrap_or(0) > 0
    }
}

/// Hugging Face's layouts into mlx_lm's: convolutions as (channels, kernel, 1); the experts'
/// fused `input_linear` (gate rows, then up) and `output_linear` as `switch_mlp`; in a dense
/// model the `shared_mlp` as `mlp`; a tied model's `lm_head` dropped.
pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    super::drop_unused(weights, args.tie_word_embeddings);
    crate::nn::conv1d_weights_to_mlx(weights)?;
    for l in 0..args.base.num_hidden_layers {
        let p = format!("model.layers.{l}");
        if args.use_moe() && weights.contains(&format!("{p}.block_sparse_moe.input_linear.weight")) {
            let m = format!("{p}.block_sparse_moe");
            let halves = [format!("{m}.switch_mlp.gate_proj.weight"), format!("{m}.switch_mlp.up_proj.weight")];
            weights.split_axis(&format!("{m}.input_linear.weight"), 1, &halves)?;
            weights.rename(&format!("{m}.output_linear.weight"), &format!("{m}.switch_mlp.down_proj.weight"))?;
        }
        if !args.use_moe() && weights.contains(&format!("{p}.shared_mlp.input_linear.weight")) {
            let halves = [format!("{p}.mlp.gate_proj.weight"), format!("{p}.mlp.up_proj.weight")];
            weights.split_axis(&format!("{p}.shared_mlp.input_linear.weight"), 0, &halves)?;
            weights.rename(&format!("{p}.shared_mlp.output_linear.weight"), &format!("{p}.mlp.down_proj.weight"))?;
        }
    }
    Ok(())
}

/// The MoE layers' feed-forward part: the experts plus the shared MLP.
struct MoeAndShared {
    moe: MoE,
    shared_mlp: FusedMlp,
}

impl FeedForward for MoeAndShared {
    fn branch<'a>(&'a self, x: &Normed) -> Result<Branch<'a>> {
        let moe = Branch::resolve(Some(&self.moe.branch(x)?))?.expect("a branch");
        let shared = Branch::resolve(Some(&self.shared_mlp.branch(x)?))?.expect("a branch");
        Ok(Branch::Tensor((moe + shared)?))
    }

    fn graphable(&self) -> bool {
        self.moe.graphable()
    }
}

fn need<T: Copy>(v: Option<T>, field: &str) -> Result<T> {
    v.with_context(|| format!("config.json: `{field}` is required for the mamba layers"))
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    let a = &args.base;
    let (dim, n) = (a.hidden_size, a.num_hidden_layers);
    if args.layer_types.len() != n {
        bail!("config.json: layer_types has {} entries for {n} layers", args.layer_types.len());
    }
    let hd = dim / a.num_attention_heads;
    let heads =
        Heads { scale: args.attention_multiplier, ..Heads::new(a.num_attention_heads, args.num_key_value_heads, hd) };
    let use_rope = args.position_embedding_type.as_deref() != Some("nope");
    let limit = args.time_step_limit.unwrap_or((0.001, 100.0));
    let layers = args
        .layer_types
        .iter()
        .enumerate()
        .map(|(l, kind)| {
            let p = format!("model.layers.{l}");
            let mixer: Box<dyn SelfAttention> = match kind.as_str() {
                "attention" => {
                    let b = args.attention_bias;
                    Box::new(Attention::load(ld, &format!("{p}.self_attn"), dim, heads, b, b)?.with_rope(use_rope))
                }
                "mamba" => {
                    let dims = Mamba2Dims {
                        heads: need(args.mamba_n_heads, "mamba_n_heads")?,
                        head_dim: need(args.mamba_d_head, "mamba_d_head")?,
                        groups: need(args.mamba_n_groups, "mamba_n_groups")?,
                        state: need(args.mamba_d_state, "mamba_d_state")?,
                        kernel: need(args.mamba_d_conv, "mamba_d_conv")?,
                    };
                    let bias = (args.mamba_proj_bias.unwrap_or(false), args.mamba_conv_bias.unwrap_or(false));
                    Box::new(Mamba2::load(ld, &format!("{p}.mamba"), dim, dims, bias, a.rms_norm_eps, limit)?)
                }
                other => bail!("config.json: layer_types[{l}] is `{other}`; expected `mamba` or `attention`"),
            };
            let ff: Box<dyn FeedForward> = if args.use_moe() {
                let (e, k) = (
                    need(args.num_local_experts, "num_local_experts")?,
                    need(args.num_experts_per_tok, "num_experts_per_tok")?,
                );
                let shared = need(args.shared_intermediate_size, "shared_intermediate_size")?;
                Box::new(MoeAndShared {
                    moe: MoE::load(ld, &format!("{p}.block_sparse_moe"), dim, a.intermediate_size, e, k)?,
                    shared_mlp: FusedMlp::load_named(
                        ld,
                        &format!("{p}.shared_mlp"),
                        ["input_linear", "output_linear"],
                        dim,
                        shared,
                    )?,
                })
            } else {
                Box::new(Mlp::load(ld, &format!("{p}.mlp"), dim, a.intermediate_size, args.mlp_bias)?)
            };
            let norm = |m: &str| RmsNorm::load(ld, &format!("{p}.{m}"), dim, a.rms_norm_eps);
            let layer = GraniteLayer {
                self_attn: mixer,
                ff,
                input_layernorm: norm("input_layernorm")?,
                post_attention_layernorm: norm("post_attention_layernorm")?,
                residual_multiplier: args.residual_multiplier,
            };
            Ok(Arc::new(layer) as Arc<dyn Layer>)
        })
        .collect::<Result<Vec<_>>>()?;
    let theta = args
        .rope_parameters
        .as_ref()
        .and_then(|p| p.get("rope_theta"))
        .and_then(|t| t.as_f64())
        .unwrap_or(args.rope_theta);
    let ctx = Some(args.max_position_embeddings);
    let rope = Rope::from_config(hd, theta, false, None, ctx)?;
    let mut spec = ModelSpec::plain(n, rope, args.tie_word_embeddings, ctx);
    spec.embed_scale = Some(args.embedding_multiplier);
    spec.logits_scale = Some(1.0 / args.logits_scaling);
    spec.recurrent = args.layer_types.iter().map(|t| (t == "mamba").then_some(2)).collect();
    a.decoder(ld, spec, layers)
}
