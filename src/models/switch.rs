//! What mixture-of-experts layers share (mlx_lm's `switch_layers.py`): [`SwitchGlu`], the
//! experts' gated MLPs over stacked weights, run for each token's chosen experts; the routers'
//! arithmetic ([`softmax`], [`top_k`], [`combine`]); and [`stack_experts`], the `sanitize` step
//! that stacks per-expert weights (the Hugging Face layout) into mlx's `switch_mlp` tensors.

use super::mlp::FeedForward;
use crate::io::Weights;
use crate::nn::{Branch, Linear, Loader, Normed, SwitchLinear};
use crate::ops::gather_mm::{Routing, DEVICE_ROUTED_ROWS};
use anyhow::Result;
use candle_core::{DType, Tensor, D};

/// The gate activation of an expert's MLP, `act(gate, up)`.
#[derive(Debug, Clone, Copy)]
pub enum Activation {
    /// `silu(gate) · up`
    Swiglu,
    /// gpt-oss's clamped SwiGLU: `(clip(up, ±limit) + 1) · g · σ(alpha · g)`, `g = min(gate, limit)`
    SwigluOai { alpha: f64, limit: f64 },
    /// `gelu_approx(gate) · up` (gemma)
    GeluGlu,
}

impl Activation {
    pub fn apply(self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Swiglu => crate::ops::swiglu::swiglu(gate, up)?,
            Self::SwigluOai { alpha, limit } => {
                let g = gate.clamp(f64::NEG_INFINITY, limit)?;
                let u = (up.clamp(-limit, limit)? + 1.0)?;
                let glu = (&g * candle_nn::ops::sigmoid(&(&g * alpha)?)?)?;
                (u * glu)?
            }
            Self::GeluGlu => (gate.gelu()? * up)?,
        })
    }
}

/// The experts' MLPs (`{p}.gate_proj`, `{p}.up_proj`, `{p}.down_proj`, each stacked over the
/// experts): `down(act(gate(x), up(x)))` with each token's chosen experts.
pub struct SwitchGlu {
    pub gate_proj: SwitchLinear,
    pub up_proj: SwitchLinear,
    pub down_proj: SwitchLinear,
    pub activation: Activation,
}

impl SwitchGlu {
    pub fn load(
        ld: &Loader,
        p: &str,
        experts: usize,
        dim: usize,
        hidden: usize,
        bias: bool,
        activation: Activation,
    ) -> Result<Self> {
        let lin = |n: &str, i: usize, o: usize| SwitchLinear::load(ld, &format!("{p}.{n}"), experts, i, o, bias);
        Ok(Self {
            gate_proj: lin("gate_proj", dim, hidden)?,
            up_proj: lin("up_proj", dim, hidden)?,
            down_proj: lin("down_proj", hidden, dim)?,
            activation,
        })
    }

    /// For `x` (…, dim) and the chosen experts `inds` (…, k): each chosen expert's output
    /// (…, k, dim), not yet weighted. The rows are grouped by expert, so each chosen expert's
    /// weights are read once.
    pub fn forward(&self, x: &Tensor, inds: &Tensor) -> Result<Tensor> {
        let dim = x.dim(D::Minus1)?;
        let k = inds.dim(D::Minus1)?;
        let mut shape = inds.dims().to_vec();
        shape.push(dim);
        if inds.elem_count() <= DEVICE_ROUTED_ROWS && self.routes_on_device(x.device()) {
            let xs = x.reshape(((), dim))?;
            let fused = match self.activation {
                Activation::Swiglu => SwitchLinear::gather_swiglu(&self.gate_proj, &self.up_proj, &xs, inds, k)?,
                _ => None,
            };
            let h = match fused {
                Some(h) => h,
                None => self
                    .activation
                    .apply(&self.gate_proj.gather_rows(&xs, inds, k)?, &self.up_proj.gather_rows(&xs, inds, k)?)?,
            };
            return Ok(self.down_proj.gather_rows(&h, inds, 1)?.reshape(shape)?);
        }
        let routing = Routing::new(inds, self.gate_proj.experts())?;
        let xs = routing.sort(&x.reshape(((), dim))?, k)?;
        let h =
            self.activation.apply(&self.gate_proj.forward(&xs, &routing)?, &self.up_proj.forward(&xs, &routing)?)?;
        let y = routing.unsort(&self.down_proj.forward(&h, &routing)?)?;
        Ok(y.reshape(shape)?)
    }

    /// Whether a decode step keeps the router's choices on `device` (see
    /// [`SwitchLinear::routes_on_device`]).
    pub fn routes_on_device(&self, device: &candle_core::Device) -> bool {
        [&self.gate_proj, &self.up_proj, &self.down_proj].iter().all(|l| l.routes_on_device(device))
    }

    /// Whether a decode step on CUDA keeps the router's choices there (a graph may capture it).
    pub fn graphable(&self) -> bool {
        [&self.gate_proj, &self.up_proj, &self.down_proj].iter().all(|l| l.routes_on_cuda())
    }
}

/// Softmax over the last axis, computed in f32 (mlx's `precise=True`), in `x`'s dtype;
/// differentiable when `x` is (training through the router).
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let x32 = x.to_dtype(DType::F32)?;
    let p = if x32.track_op() {
        candle_nn::ops::softmax(&x32, D::Minus1)?
    } else {
        candle_nn::ops::softmax_last_dim(&x32)?
    };
    Ok(p.to_dtype(x.dtype())?)
}

/// The `k` largest entries along the last axis: (their indices as u32, their values).
pub fn top_k(scores: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
    let scores = scores.contiguous()?;
    let inds = scores.arg_sort_last_dim(false)?.narrow(D::Minus1, 0, k)?.contiguous()?;
    let vals = scores.gather(&inds, D::Minus1)?;
    Ok((inds, vals))
}

/// `(y · w[…, None]).sum(-2)`: the chosen experts' outputs `y` (…, k, dim) mixed by their
/// weights `w` (…, k), in `y`'s dtype.
pub fn combine(y: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(y.broadcast_mul(&w.to_dtype(y.dtype())?.unsqueeze(D::Minus1)?)?.sum(D::Minus2)?)
}

/// Stacks per-expert tensors into mlx's layout, as mlx_lm's `sanitize`s do: for each layer `l`
/// whose expert 0 is stored per expert (`expert(l, 0, from)` with `.weight`), each projection
/// `(from, to)` and each part present (`weight`, `scales`, `biases`, `bias`), the tensors
/// `expert(l, e, from).part` for every expert `e` become `stacked(l, to).part`.
pub fn stack_experts(
    weights: &mut Weights,
    layers: usize,
    experts: usize,
    projections: &[(&str, &str)],
    expert: impl Fn(usize, usize, &str) -> String,
    stacked: impl Fn(usize, &str) -> String,
) -> Result<()> {
    for l in 0..layers {
        for (from, to) in projections {
            for part in ["weight", "scales", "biases", "bias"] {
                if !weights.contains(&format!("{}.{part}", expert(l, 0, from))) {
                    continue;
                }
                let parts: Vec<String> = (0..experts).map(|e| format!("{}.{part}", expert(l, e, from))).collect();
                if let Some(missing) = parts.iter().find(|p| !weights.contains(p)) {
                    anyhow::bail!(
                        "{}: `{missing}` is missing: config.json says the model has {experts} experts",
                        weights.dir.display()
                    );
                }
                weights.stack(&format!("{}.{part}", stacked(l, to)), &parts)?;
            }
        }
    }
    Ok(())
}

/// Fails unless `top_k` experts (config field `field`) can be chosen from `experts`.
pub fn check_top_k(top_k: usize, experts: usize, field: &str) -> Result<()> {
    if top_k == 0 || top_k > experts {
        anyhow::bail!(
            "config.json: {field} is {top_k}, but a token must choose 1 to {experts} experts (the model has {experts})"
        );
    }
    Ok(())
}

/// The sparse MoE block most families share (mlx_lm's qwen3_moe / qwen2_moe / olmoe): a linear
/// router (`gate`), a softmax over all experts, the `top_k` most probable run (`switch_mlp`)
/// and mixed by their probabilities, renormalized to sum to 1 with `norm_topk_prob`.
pub struct SoftmaxMoe {
    pub gate: Linear,
    pub switch_mlp: SwitchGlu,
    pub top_k: usize,
    pub norm_topk_prob: bool,
}

impl SoftmaxMoe {
    /// `{p}.gate` and `{p}.switch_mlp` (SwiGLU experts `dim → hidden → dim`, with biases when
    /// `bias`).
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        ld: &Loader,
        p: &str,
        dim: usize,
        hidden: usize,
        experts: usize,
        top_k: usize,
        norm_topk_prob: bool,
        bias: bool,
    ) -> Result<Self> {
        check_top_k(top_k, experts, "num_experts_per_tok")?;
        Ok(Self {
            gate: Linear::load(ld, &format!("{p}.gate"), dim, experts, false)?,
            switch_mlp: SwitchGlu::load(
                ld,
                &format!("{p}.switch_mlp"),
                experts,
                dim,
                hidden,
                bias,
                Activation::Swiglu,
            )?,
            top_k,
            norm_topk_prob,
        })
    }

    /// The mixed experts' output for `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gates = softmax(&self.gate.forward(x)?)?;
        let (inds, mut scores) = top_k(&gates, self.top_k)?;
        if self.norm_topk_prob {
            scores = scores.broadcast_div(&scores.sum_keepdim(D::Minus1)?)?;
        }
        combine(&self.switch_mlp.forward(x, &inds)?, &scores)
    }
}

impl FeedForward for SoftmaxMoe {
    fn branch<'a>(&'a self, x: &Normed) -> Result<Branch<'a>> {
        Ok(Branch::Tensor(self.forward(&x.tensor()?)?))
    }

    /// The router's choices stay on the device in a decode step (see [`SwitchGlu::graphable`]).
    fn graphable(&self) -> bool {
        self.switch_mlp.graphable()
    }
}

/// [`stack_experts`] for the usual names: `model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj`
/// into `model.layers.{l}.mlp.switch_mlp.{gate,up,down}_proj`.
pub fn stack_mlp_experts(weights: &mut Weights, layers: usize, experts: usize) -> Result<()> {
    let p = |l: usize| format!("model.layers.{l}.mlp");
    stack_experts(
        weights,
        layers,
        experts,
        &[("gate_proj", "gate_proj"), ("up_proj", "up_proj"), ("down_proj", "down_proj")],
        |l, e, n| format!("{}.experts.{e}.{n}", p(l)),
        |l, n| format!("{}.switch_mlp.{n}", p(l)),
    )
}
