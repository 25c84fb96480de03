//! What MLPs share: the [`FeedForward`] interface a decoder layer runs (dense MLPs through
//! [`DenseMlp`], mixtures of experts in `switch.rs`), and llama's SwiGLU MLP ([`Mlp`],
//! `down(silu(gate(x)) · up(x))`), which most architectures use as it is.

use crate::nn::{Branch, Linear, Loader, Normed};
use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};

/// The feed-forward part of a decoder layer as the layer runs it.
pub trait FeedForward: Send + Sync {
    /// Its output on the norm's output `x`, as the residual branch the layer adds.
    fn branch<'a>(&'a self, x: &Normed) -> Result<Branch<'a>>;

    /// The linear layers that take the norm before it (a deferred norm can be finished inside
    /// their fused kernel); none by default.
    fn input_layers(&self) -> Vec<&Linear> {
        vec![]
    }

    /// Whether its decode step runs on the device alone (see `Layer::graphable`).
    fn graphable(&self) -> bool {
        true
    }
}

impl<T: DenseMlp> FeedForward for T {
    /// The down projection is left to the next norm, which runs it with the residual add.
    fn branch<'a>(&'a self, x: &Normed) -> Result<Branch<'a>> {
        Ok(Branch::Projection(self.forward(x)?, self.down_proj()))
    }

    fn input_layers(&self) -> Vec<&Linear> {
        DenseMlp::input_layers(self)
    }
}

/// A dense MLP ending in a down projection.
pub trait DenseMlp: Send + Sync {
    /// The MLP of the norm's output `x` before its down projection: the layer adds
    /// `down_proj` of it to the residual stream.
    fn forward(&self, x: &Normed) -> Result<Tensor>;

    /// The down projection.
    fn down_proj(&self) -> &Linear;

    /// The linear layers that take the norm before the MLP (separate gate and up: a deferred
    /// norm can be finished inside their fused kernel); none by default.
    fn input_layers(&self) -> Vec<&Linear> {
        vec![]
    }

    /// The whole MLP on hidden states (the down projection applied).
    fn forward_tensor(&self, x: &Tensor) -> Result<Tensor> {
        self.down_proj().forward(&self.forward(&Normed::Plain(x.clone()))?)
    }
}

/// `silu(x Gᵀ) · (x Uᵀ)`: one fused kernel where the backend has one (CUDA decode of bias-free
/// quantized projections), else the two projections and candle's SwiGLU (one kernel on CUDA).
pub fn swiglu(x: &Normed, gate: &Linear, up: &Linear) -> Result<Tensor> {
    if let Some(h) = crate::nn::fused_swiglu(x, gate, up)? {
        return Ok(h);
    }
    let x = x.tensor()?;
    crate::ops::swiglu::swiglu(&gate.forward(&x)?, &up.forward(&x)?)
}

/// llama's MLP: `down(silu(gate(x)) · up(x))` (`gate_proj`, `up_proj`, `down_proj`).
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    /// `{p}.gate_proj`, `{p}.up_proj` (dim → hidden) and `{p}.down_proj` (hidden → dim).
    pub fn load(ld: &Loader, p: &str, dim: usize, hidden: usize, bias: bool) -> Result<Self> {
        let lin = |n: &str, i: usize, o: usize| Linear::load(ld, &format!("{p}.{n}"), i, o, bias);
        Ok(Self {
            gate_proj: lin("gate_proj", dim, hidden)?,
            up_proj: lin("up_proj", dim, hidden)?,
            down_proj: lin("down_proj", hidden, dim)?,
        })
    }
}

impl DenseMlp for Mlp {
    fn forward(&self, x: &Normed) -> Result<Tensor> {
        swiglu(x, &self.gate_proj, &self.up_proj)
    }

    fn down_proj(&self) -> &Linear {
        &self.down_proj
    }

    fn input_layers(&self) -> Vec<&Linear> {
        vec![&self.gate_proj, &self.up_proj]
    }
}

/// llama's MLP with the gate and up projections in one `gate_up_proj` (gate rows first), as
/// Phi-3 and GLM-4 store it: `down(silu(gate) · up)`.
pub struct FusedMlp {
    gate_up_proj: Linear,
    down_proj: Linear,
    hidden: usize,
}

impl FusedMlp {
    /// `{p}.gate_up_proj` (dim → 2·hidden) and `{p}.down_proj` (hidden → dim), without biases.
    pub fn load(ld: &Loader, p: &str, dim: usize, hidden: usize) -> Result<Self> {
        Self::load_named(ld, p, ["gate_up_proj", "down_proj"], dim, hidden)
    }

    /// The same under other names (Granite 4's `shared_mlp`: `input_linear`, `output_linear`).
    pub fn load_named(ld: &Loader, p: &str, [gate_up, down]: [&str; 2], dim: usize, hidden: usize) -> Result<Self> {
        Ok(Self {
            gate_up_proj: Linear::load(ld, &format!("{p}.{gate_up}"), dim, 2 * hidden, false)?,
            down_proj: Linear::load(ld, &format!("{p}.{down}"), hidden, dim, false)?,
            hidden,
        })
    }
}

impl DenseMlp for FusedMlp {
    fn forward(&self, x: &Normed) -> Result<Tensor> {
        let t = self.gate_up_proj.forward(&x.tensor()?)?;
        let h = self.hidden;
        crate::ops::swiglu::swiglu(&t.narrow(D::Minus1, 0, h)?, &t.narrow(D::Minus1, h, h)?)
    }

    fn down_proj(&self) -> &Linear {
        &self.down_proj
    }
}

/// An ungated MLP, `down(act(up(x)))`: Phi-2 (`fc1`, `fc2`, GELU), StarCoder2 (`c_fc`,
/// `c_proj`, exact GELU), Apertus (`up_proj`, `down_proj`, xIELU).
pub struct UngatedMlp {
    up: Linear,
    down: Linear,
    act: Activation,
}

/// The activation of an [`UngatedMlp`].
pub enum Activation {
    /// GELU in its tanh approximation
    Gelu,
    /// GELU exactly, with erf
    GeluErf,
    /// xIELU with its learned scalars: `ap·x² + β·x` for `x > 0`, else
    /// `(expm1(min(x, ε)) − x)·an + β·x`, where `ap = softplus(α_p)`, `an = β + softplus(α_n)`;
    /// `zero` and `eps` are 0 and ε on the model's device (a decode step captured into a CUDA
    /// graph copies nothing from the host)
    XieLu { ap: f64, an: f64, beta: f64, zero: Tensor, eps: Tensor },
    /// `relu(x)²` (Nemotron-H)
    Relu2,
}

impl Activation {
    /// xIELU from its stored scalars `α_p`, `α_n`, `β`, `ε`, for activations of `dtype` on
    /// `device`.
    pub fn xielu(alpha_p: f64, alpha_n: f64, beta: f64, eps: f64, dtype: DType, device: &Device) -> Result<Self> {
        let softplus = |t: f64| t.exp().ln_1p();
        let scalar = |v: f64| -> Result<Tensor> { Ok(Tensor::new(v as f32, device)?.to_dtype(dtype)?) };
        Ok(Self::XieLu {
            ap: softplus(alpha_p),
            an: beta + softplus(alpha_n),
            beta,
            zero: scalar(0.0)?,
            eps: scalar(eps)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Gelu => x.gelu()?,
            Self::GeluErf => x.gelu_erf()?,
            Self::Relu2 => x.relu()?.sqr()?,
            Self::XieLu { ap, an, beta, zero, eps } => {
                let linear = (x * *beta)?;
                let pos = ((x.sqr()? * *ap)? + &linear)?;
                let neg = ((((x.broadcast_minimum(eps)?.exp()? - 1.0)? - x)? * *an)? + linear)?;
                x.broadcast_gt(zero)?.where_cond(&pos, &neg)?
            }
        })
    }
}

impl UngatedMlp {
    /// `{p}.{up}` (dim → hidden) and `{p}.{down}` (hidden → dim), with or without biases.
    pub fn load(
        ld: &Loader,
        p: &str,
        [up, down]: [&str; 2],
        dim: usize,
        hidden: usize,
        bias: bool,
        act: Activation,
    ) -> Result<Self> {
        Ok(Self {
            up: Linear::load(ld, &format!("{p}.{up}"), dim, hidden, bias)?,
            down: Linear::load(ld, &format!("{p}.{down}"), hidden, dim, bias)?,
            act,
        })
    }
}

impl DenseMlp for UngatedMlp {
    fn forward(&self, x: &Normed) -> Result<Tensor> {
        self.act.forward(&self.up.forward(&x.tensor()?)?)
    }

    fn down_proj(&self) -> &Linear {
        &self.down
    }
}

/// A layer's feed-forward part chosen at load time (dense in some layers, experts in others).
impl FeedForward for Box<dyn FeedForward> {
    fn branch<'a>(&'a self, x: &Normed) -> Result<Branch<'a>> {
        (**self).branch(x)
    }

    fn input_layers(&self) -> Vec<&Linear> {
        (**self).input_layers()
    }

    fn graphable(&self) -> bool {
        (**self).graphable()
    }
}
