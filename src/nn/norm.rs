//! Norms: [`RmsNorm`] (optionally `1 + w`), [`LayerNorm`], and the residual branch a layer leaves
//! for the norm after it ([`Branch`], [`Normed`]).

use super::linear::{quantized_weights, Linear};
use super::Loader;
use anyhow::Result;
use candle_core::{DType, Tensor, D};

/// `x / sqrt(mean(x²) + eps)` over the last axis, computed in f32: an RMSNorm without a weight
/// (mlx's `rms_norm(x, None, eps)`; llama 4's q/k norm, gemma 4's v norm).
pub fn rms_normalize(x: &Tensor, eps: f64) -> Result<Tensor> {
    let x32 = x.to_dtype(DType::F32)?;
    let r = (x32.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?;
    Ok(x32.broadcast_div(&r)?.to_dtype(x.dtype())?)
}

/// RMSNorm with a learned scale, computed in f32 internally.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    pub(super) eps: f32,
    /// Added to the weight in each pass (a trained gemma weight); 0 otherwise.
    shift: f64,
}

impl RmsNorm {
    pub fn load(ld: &Loader, name: &str, dim: usize, eps: f64) -> Result<Self> {
        Self::load_shifted(ld, name, dim, eps, 0.0)
    }

    /// Scale by `shift + weight` (gemma stores the weight as an offset from 1).
    /// A trained weight (full fine-tuning) keeps its shift apart and adds it in each pass, as
    /// the optimizer updates the weight in place.
    pub fn load_shifted(ld: &Loader, name: &str, dim: usize, eps: f64, shift: f64) -> Result<Self> {
        let weight = ld.tensor(&format!("{name}.weight"), &[dim])?;
        if weight.is_variable() || shift == 0.0 {
            return Ok(Self { weight, eps: eps as f32, shift });
        }
        Ok(Self { weight: (weight + shift)?, eps: eps as f32, shift: 0.0 })
    }

    /// Normalizes `x` over groups of `groups` equal parts of its last axis, then scales by the
    /// weight (Nemotron-H's gated norm; with one group the same as [`Self::forward`]).
    pub fn forward_grouped(&self, x: &Tensor, groups: usize) -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        let last = dims.pop().unwrap_or(0);
        let grouped = x.reshape([dims.as_slice(), &[groups, last / groups.max(1)]].concat())?;
        let n = rms_normalize(&grouped, self.eps as f64)?.reshape(x.dims())?;
        Ok(n.broadcast_mul(&(self.weight.to_dtype(x.dtype())? + self.shift)?)?)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.track_op() || self.weight.track_op() {
            // training: candle's fused kernel has no backward; the same formula in tensor ops
            let x32 = x.to_dtype(DType::F32)?;
            let inv = (x32.sqr()?.mean_keepdim(D::Minus1)? + self.eps as f64)?.sqrt()?.recip()?;
            let w = (self.weight.to_dtype(DType::F32)? + self.shift)?;
            return Ok(x32.broadcast_mul(&inv)?.broadcast_mul(&w)?.to_dtype(x.dtype())?);
        }
        Ok(candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)?)
    }

    /// The residual add before the norm: `(x + r, norm(x + r))`, in one CUDA kernel where it
    /// applies (inference, same dtypes, contiguous; the same values as the two ops); without
    /// `r`, `(x, norm(x))`.
    pub fn forward_residual(&self, x: &Tensor, r: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let Some(r) = r else { return Ok((x.clone(), self.forward(x)?)) };
        if !(x.track_op() || r.track_op() || self.weight.track_op()) && self.shift == 0.0 {
            if let Some(both) = crate::ops::norm::fused_add_rms_norm(x, r, &self.weight, self.eps)? {
                return Ok(both);
            }
        }
        let h = (x + r)?;
        let n = self.forward(&h)?;
        Ok((h, n))
    }

    /// The norm of `x` plus the residual branch `pending` (none, a tensor, or a projection not
    /// yet run: see [`Branch`]): `(h, norm(h))`. With a projection and `next` (the weights
    /// of the matmuls that take the norm) the norm is deferred where the CUDA decode kernels
    /// apply: one launch runs the projection, adds the residual and leaves the norm's scale to
    /// the next fused matmul ([`Normed::Deferred`]).
    pub fn forward_branch(&self, x: &Tensor, pending: Option<&Branch>, next: &[&Linear]) -> Result<(Tensor, Normed)> {
        if let (Some(Branch::Projection(a, Linear::Quantized { weight, bias: None })), Some(next)) =
            (pending, quantized_weights(next))
        {
            if self.shift == 0.0 && deferred_norms_enabled() {
                if let Some(carrier) = crate::ops::qmatmul::deferred_norm(a, weight, x, &self.weight, &next)? {
                    crate::backend::stats::count(crate::backend::stats::Counter::DeferredNorms);
                    let d = DeferredNorm::new(carrier, x.shape(), self.clone())?;
                    return Ok((d.h.clone(), Normed::Deferred(d)));
                }
            }
        }
        let (h, n) = self.forward_residual(x, Branch::resolve(pending)?.as_ref())?;
        Ok((h, Normed::Plain(n)))
    }
}

/// A layer's last residual branch, left for the next norm to add (see
/// the models' residual stream, `Residual`): computed, or the projection that will
/// compute it (so that the norm may run it: [`RmsNorm::forward_branch`]).
#[derive(Clone)]
pub enum Branch<'a> {
    /// computed
    Tensor(Tensor),
    /// `input · Wᵀ` of this input and layer
    Projection(Tensor, &'a Linear),
}

impl Branch<'_> {
    /// The branch as a tensor (the projection run).
    pub fn resolve(p: Option<&Self>) -> Result<Option<Tensor>> {
        p.map(|p| match p {
            Branch::Tensor(t) => Ok(t.clone()),
            Branch::Projection(x, l) => l.forward(x),
        })
        .transpose()
    }

    /// Positions `start .. start + len` along `dim` (of the branch, or the projection's input).
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Self> {
        Ok(match self {
            Branch::Tensor(t) => Branch::Tensor(t.narrow(dim, start, len)?),
            Branch::Projection(x, l) => Branch::Projection(x.narrow(dim, start, len)?, l),
        })
    }
}

/// A norm's output as the next matmuls take it.
pub enum Normed {
    Plain(Tensor),
    /// CUDA decode: the residual sum and the carrier from which the next fused matmul finishes
    /// the norm ([`crate::ops::qmatmul::deferred_norm`])
    Deferred(DeferredNorm),
}

/// See [`Normed::Deferred`].
pub struct DeferredNorm {
    pub(super) carrier: Tensor,
    /// the residual sum the norm is of (the norm's input, shaped as the layer's hidden states)
    h: Tensor,
    pub(super) norm: RmsNorm,
}

impl DeferredNorm {
    fn new(carrier: Tensor, shape: &candle_core::Shape, norm: RmsNorm) -> Result<Self> {
        let d = shape.dims().last().copied().unwrap_or(0);
        let h = carrier.narrow(0, d, d)?.reshape(shape)?;
        Ok(Self { carrier, h, norm })
    }

    /// The norm input's leading dimensions (all but the features).
    pub(super) fn lead(&self) -> &[usize] {
        &self.h.dims()[..self.h.rank() - 1]
    }
}

impl Normed {
    /// The normalized tensor (a deferred norm computed from its input as [`RmsNorm::forward`]).
    pub fn tensor(&self) -> Result<Tensor> {
        match self {
            Normed::Plain(t) => Ok(t.clone()),
            Normed::Deferred(d) => d.norm.forward(&d.h),
        }
    }

    pub fn dims3(&self) -> Result<(usize, usize, usize)> {
        Ok(match self {
            Normed::Plain(t) => t.dims3()?,
            Normed::Deferred(d) => d.h.dims3()?,
        })
    }
}

/// Whether norms may be deferred: `WICK_DEFERRED_NORM=0` turns it off (with the `testing`
/// feature, [`set_deferred_norms`] overrides that on the calling thread).
fn deferred_norms_enabled() -> bool {
    #[cfg(feature = "testing")]
    if let Some(on) = DEFER_ON_THIS_THREAD.get() {
        return on;
    }
    static ENV_OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    !*ENV_OFF.get_or_init(|| std::env::var("WICK_DEFERRED_NORM").is_ok_and(|v| v == "0"))
}

#[cfg(feature = "testing")]
thread_local! {
    static DEFER_ON_THIS_THREAD: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Turns the deferred norm off (`false`) or back on for the norms this thread runs.
#[cfg(feature = "testing")]
pub fn set_deferred_norms(on: bool) {
    DEFER_ON_THIS_THREAD.set(Some(on));
}

/// LayerNorm with a learned scale and bias (a bias of zeros where the model has none).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    /// `{name}.weight` and `{name}.bias`.
    pub fn load(ld: &Loader, name: &str, dim: usize, eps: f64) -> Result<Self> {
        Self::load_with(ld, name, dim, eps, true)
    }

    /// `{name}.weight`, and `{name}.bias` where `bias` says the model has one (Cohere's have not).
    pub fn load_with(ld: &Loader, name: &str, dim: usize, eps: f64, bias: bool) -> Result<Self> {
        let weight = ld.tensor(&format!("{name}.weight"), &[dim])?;
        let bias = if bias { ld.tensor(&format!("{name}.bias"), &[dim])? } else { weight.zeros_like()? };
        Ok(Self { weight, bias, eps: eps as f32 })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.track_op() || self.weight.track_op() || self.bias.track_op() {
            // training: the fused kernel has no backward
            let x32 = x.to_dtype(DType::F32)?;
            let c = x32.broadcast_sub(&x32.mean_keepdim(D::Minus1)?)?;
            let inv = (c.sqr()?.mean_keepdim(D::Minus1)? + self.eps as f64)?.sqrt()?.recip()?;
            let y = c.broadcast_mul(&inv)?.broadcast_mul(&self.weight.to_dtype(DType::F32)?)?;
            return Ok(y.broadcast_add(&self.bias.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?);
        }
        Ok(candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps)?)
    }
}
