//! Nemotron-H (NVIDIA Nemotron-H, Nemotron-Nano-v2 / 3): one block per character of
//! `hybrid_override_pattern` — `M` a Mamba-2 mixer (its gated norm per group), `*` attention
//! without positions, `-` an MLP `down(relu(up(x))²)`, `E` experts (DeepSeek's grouped sigmoid
//! router with a correction bias, ReLU² experts, optionally through a latent projection, plus
//! shared experts) — each `x + mixer(norm(x))` with one RMSNorm. Only `M` and `*` blocks have a
//! cache, so a wick layer is one of them with the MLP / expert blocks around it (the first also
//! takes the blocks before it): the cache list is mlx_lm's. Reads like mlx_lm's
//! `models/nemotron_h.py`.

use super::attention::{Heads, SelfAttention};
use super::decoder::{BaseArgs, DecoderModel, Layer, ModelSpec, Residual};
use super::deepseek_v3::Router;
use super::llama::Attention;
use super::mlp::{Activation, FeedForward, UngatedMlp};
use super::ssm::{Mamba2, Mamba2Dims};
use super::switch::{combine, stack_experts};
use crate::cache::KvCache;
use crate::io::Weights;
use crate::nn::{Branch, Linear, Loader, Normed, RmsNorm, Rope, RopeTables, SwitchLinear};
use anyhow::{bail, Result};
use candle_core::D;
use serde::Deserialize;
use std::sync::Arc;

#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub attention_bias: bool,
    pub mamba_num_heads: usize,
    pub mamba_head_dim: usize,
    pub mamba_proj_bias: bool,
    pub ssm_state_size: usize,
    pub conv_kernel: usize,
    pub n_groups: usize,
    pub mlp_bias: bool,
    pub layer_norm_epsilon: f64,
    pub use_conv_bias: bool,
    #[serde(default)]
    pub hybrid_override_pattern: Option<serde_json::Value>,
    #[serde(default)]
    pub layers_block_type: Option<Vec<String>>,
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default)]
    pub moe_intermediate_size: Option<usize>,
    #[serde(default)]
    pub moe_shared_expert_intermediate_size: Option<usize>,
    #[serde(default)]
    pub moe_latent_size: Option<usize>,
    #[serde(default)]
    pub n_group: Option<usize>,
    #[serde(default)]
    pub n_routed_experts: Option<usize>,
    #[serde(default)]
    pub n_shared_experts: Option<usize>,
    #[serde(default)]
    pub topk_group: Option<usize>,
    #[serde(default)]
    pub num_experts_per_tok: Option<usize>,
    #[serde(default)]
    pub norm_topk_prob: Option<bool>,
    #[serde(default)]
    pub routed_scaling_factor: Option<f64>,
    #[serde(default)]
    pub time_step_limit: Option<Vec<serde_json::Value>>,
}

impl ModelArgs {
    /// The block pattern: `hybrid_override_pattern` (a string or a list of characters), else
    /// `layers_block_type` / `layer_types` by name.
    pub fn pattern(&self) -> Result<Vec<char>> {
        if let Some(p) = &self.hybrid_override_pattern {
            return Ok(match p {
                serde_json::Value::String(s) => s.chars().collect(),
                serde_json::Value::Array(a) => a.iter().filter_map(|c| c.as_str()?.chars().next()).collect(),
                _ => bail!("config.json: hybrid_override_pattern should be a string such as \"M-M*-\""),
            });
        }
        let Some(names) = self.layers_block_type.as_ref().or(self.layer_types.as_ref()) else {
            bail!("config.json: hybrid_override_pattern (or layers_block_type) is required");
        };
        names
            .iter()
            .map(|n| {
                Ok(match n.as_str() {
                    "full_attention" | "attention" => '*',
                    "linear_attention" | "mamba" | "conv" => 'M',
                    "moe" => 'E',
                    "mlp" => '-',
                    other => bail!("config.json: layer type `{other}`; expected attention, mamba, moe or mlp"),
                })
            })
            .collect()
    }

    /// `time_step_limit` ((0, ∞) by default); ∞ may be written `{"__float__": "Infinity"}`.
    fn time_step_limit(&self) -> Result<(f64, f64)> {
        let Some(l) = &self.time_step_limit else { return Ok((0.0, f64::INFINITY)) };
        let num = |v: &serde_json::Value| -> Option<f64> {
            v.as_f64().or_else(|| match v.get("__float__")?.as_str()? {
                "Infinity" | "inf" => Some(f64::INFINITY),
                "-Infinity" | "-inf" => Some(f64::NEG_INFINITY),
                s => s.parse().ok(),
            })
        };
        match l.as_slice() {
            [lo, hi] => match (num(lo), num(hi)) {
                (Some(lo), Some(hi)) => Ok((lo, hi)),
                _ => bail!("config.json: time_step_limit should be two numbers"),
            },
            _ => bail!("config.json: time_step_limit should be two numbers"),
        }
    }
}

/// Drops the multi-token-prediction layers, puts convolutions in mlx's layout and stacks the
/// per-expert `up_proj` / `down_proj` into `switch_mlp.fc1` / `fc2`.
pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    weights.sanitize(|k| (!k.starts_with("mtp.")).then(|| k.to_string()));
    crate::nn::conv1d_weights_to_mlx(weights)?;
    let layers = args.pattern()?.len();
    if let Some(e) = args.n_routed_experts {
        stack_experts(
            weights,
            layers,
            e,
            &[("up_proj", "fc1"), ("down_proj", "fc2")],
            |l, e, n| format!("backbone.layers.{l}.mixer.experts.{e}.{n}"),
            |l, n| format!("backbone.layers.{l}.mixer.switch_mlp.{n}"),
        )?;
    }
    Ok(())
}

/// The expert block: the router's experts (ReLU² MLPs, optionally in a latent space) and the
/// shared experts.
struct Experts {
    gate: Router,
    fc1: SwitchLinear,
    fc2: SwitchLinear,
    /// (into the latent space, out of it)
    latent: Option<(Linear, Linear)>,
    shared_experts: Option<UngatedMlp>,
}

impl FeedForward for Experts {
    fn branch<'a>(&'a self, x: &Normed) -> Result<Branch<'a>> {
        let x = x.tensor()?;
        let (inds, w) = self.gate.route(&x)?;
        let k = inds.dim(D::Minus1)?;
        let xe = match &self.latent {
            Some((into, _)) => into.forward(&x)?,
            None => x.clone(),
        };
        let de = xe.dim(D::Minus1)?;
        let flat = xe.reshape(((), de))?;
        let h = self.fc1.gather_rows(&flat, &inds, k)?.relu()?.sqr()?;
        let mut shape = inds.dims().to_vec();
        shape.push(de);
        let y = self.fc2.gather_rows(&h, &inds, 1)?.reshape(shape)?;
        let mut y = combine(&y, &w)?;
        if let Some((_, out)) = &self.latent {
            y = out.forward(&y)?;
        }
        if let Some(s) = &self.shared_experts {
            y = (y + Branch::resolve(Some(&s.branch(&Normed::Plain(x.clone()))?))?.expect("a branch"))?;
        }
        Ok(Branch::Tensor(y))
    }

    /// Not captured: the router's group limit uploads its bound from the host.
    fn graphable(&self) -> bool {
        false
    }
}

/// One block: its norm and what it runs.
enum Block {
    Mixer(Box<dyn SelfAttention>),
    Ff(Box<dyn FeedForward>),
}

/// One cached block (`M` or `*`) with the uncached blocks around it, in pattern order.
struct Group {
    blocks: Vec<(RmsNorm, Block)>,
}

impl Layer for Group {
    fn forward<'a>(&'a self, mut x: Residual<'a>, rope: &RopeTables, cache: &mut KvCache) -> Result<Residual<'a>> {
        for (norm, block) in &self.blocks {
            x = match block {
                Block::Mixer(m) => {
                    let (h, n) = x.norm(norm, &m.input_layers())?;
                    Residual::plus_projection(h, m.forward(&n, rope, cache)?, m.o_proj())
                }
                Block::Ff(f) => {
                    let (h, n) = x.norm(norm, &f.input_layers())?;
                    Residual::plus(h, f.branch(&n)?)
                }
            };
        }
        Ok(x)
    }

    fn graphable(&self) -> bool {
        self.blocks.iter().all(|(_, b)| match b {
            Block::Mixer(m) => m.graphable(),
            Block::Ff(f) => f.graphable(),
        })
    }
}

fn need<T: Copy>(v: Option<T>, field: &str) -> Result<T> {
    v.ok_or_else(|| anyhow::anyhow!("config.json: `{field}` is required for the expert (`E`) blocks"))
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    let pattern = args.pattern()?;
    let dim = args.hidden_size;
    let hd = args.head_dim.unwrap_or(dim / args.num_attention_heads);
    let heads = Heads::new(args.num_attention_heads, args.num_key_value_heads, hd);
    let limit = args.time_step_limit()?;
    let mut blocks = vec![];
    for (l, c) in pattern.iter().enumerate() {
        let p = format!("backbone.layers.{l}");
        let m = format!("{p}.mixer");
        let block = match c {
            'M' => {
                let dims = Mamba2Dims {
                    heads: args.mamba_num_heads,
                    head_dim: args.mamba_head_dim,
                    groups: args.n_groups,
                    state: args.ssm_state_size,
                    kernel: args.conv_kernel,
                };
                let bias = (args.mamba_proj_bias, args.use_conv_bias);
                let mut mixer = Mamba2::load(ld, &m, dim, dims, bias, args.layer_norm_epsilon, limit)?;
                mixer.norm_per_group = true;
                Block::Mixer(Box::new(mixer))
            }
            '*' => {
                let b = args.attention_bias;
                Block::Mixer(Box::new(Attention::load(ld, &m, dim, heads, b, b)?.with_rope(false)))
            }
            '-' => Block::Ff(Box::new(UngatedMlp::load(
                ld,
                &m,
                ["up_proj", "down_proj"],
                dim,
                args.intermediate_size,
                args.mlp_bias,
                Activation::Relu2,
            )?)),
            'E' => {
                let e = need(args.n_routed_experts, "n_routed_experts")?;
                let k = need(args.num_experts_per_tok, "num_experts_per_tok")?;
                super::switch::check_top_k(k, e, "num_experts_per_tok")?;
                let hidden = need(args.moe_intermediate_size, "moe_intermediate_size")?;
                let de = args.moe_latent_size.unwrap_or(dim);
                let gate = Router::sigmoid(
                    ld,
                    &m,
                    e,
                    dim,
                    k,
                    args.n_group.unwrap_or(1),
                    args.topk_group.unwrap_or(1),
                    args.norm_topk_prob.unwrap_or(false),
                    args.routed_scaling_factor.unwrap_or(1.0),
                )?;
                let latent = match args.moe_latent_size {
                    Some(ls) => Some((
                        Linear::load(ld, &format!("{m}.fc1_latent_proj"), dim, ls, args.mlp_bias)?,
                        Linear::load(ld, &format!("{m}.fc2_latent_proj"), ls, dim, args.mlp_bias)?,
                    )),
                    None => None,
                };
                let shared_experts = match args.n_shared_experts {
                    Some(_) => Some(UngatedMlp::load(
                        ld,
                        &format!("{m}.shared_experts"),
                        ["up_proj", "down_proj"],
                        dim,
                        need(args.moe_shared_expert_intermediate_size, "moe_shared_expert_intermediate_size")?,
                        args.mlp_bias,
                        Activation::Relu2,
                    )?),
                    None => None,
                };
                let sw = |n: &str, i: usize, o: usize| {
                    SwitchLinear::load(ld, &format!("{m}.switch_mlp.{n}"), e, i, o, false)
                };
                Block::Ff(Box::new(Experts {
                    gate,
                    fc1: sw("fc1", de, hidden)?,
                    fc2: sw("fc2", hidden, de)?,
                    latent,
                    shared_experts,
                }))
            }
            other => bail!("config.json: hybrid_override_pattern has `{other}` at block {l}; expected M, *, - or E"),
        };
        blocks.push((RmsNorm::load(ld, &format!("{p}.norm"), dim, args.layer_norm_epsilon)?, block));
    }
    // a layer per cached block, with the uncached ones after it (and the first with those before)
    let mut groups: Vec<Group> = vec![];
    let mut recurrent = vec![];
    let mut pending = vec![];
    for (c, b) in pattern.iter().zip(blocks) {
        match c {
            'M' | '*' => {
                pending.push(b);
                groups.push(Group { blocks: std::mem::take(&mut pending) });
                recurrent.push((*c == 'M').then_some(2));
            }
            _ => match groups.last_mut() {
                Some(g) => g.blocks.push(b),
                None => pending.push(b),
            },
        }
    }
    if groups.is_empty() {
        bail!("config.json: hybrid_override_pattern has no M or * block");
    }
    let base = BaseArgs {
        hidden_size: dim,
        num_hidden_layers: groups.len(),
        intermediate_size: args.intermediate_size,
        num_attention_heads: args.num_attention_heads,
        rms_norm_eps: args.layer_norm_epsilon,
        vocab_size: args.vocab_size,
    };
    let n = groups.len();
    let layers = groups.into_iter().map(|g| Arc::new(g) as Arc<dyn Layer>).collect();
    // no block uses positions; the body still wants a RoPE
    let rope = Rope::from_config(hd, 10000.0, false, None, None)?;
    let mut spec = ModelSpec::plain(n, rope, false, Some(args.max_position_embeddings));
    spec.embed = "backbone.embeddings";
    spec.final_norm = "backbone.norm_f";
    spec.recurrent = recurrent;
    base.decoder(ld, spec, layers)
}
