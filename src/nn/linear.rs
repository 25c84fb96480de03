//! [`Linear`]: dense, quantized or adapted (LoRA / DoRA) linear layers, and the fused decode
//! projections over several of them.

use super::norm::Normed;
use super::Loader;
use crate::nn::lora::LoraLinear;
use crate::ops::dense_matmul::dense_matmul;
use crate::ops::qmatmul::{FpWeight, QuantizedWeight};
use anyhow::Result;
use candle_core::{DType, Module, Tensor};

/// A linear layer `y = x Wᵀ + b`, dense, MLX-affine-quantized or quantized in one of mlx's float
/// modes, or one of those with a LoRA / DoRA adapter.
#[derive(Debug, Clone)]
pub enum Linear {
    Dense { weight: Tensor, bias: Option<Tensor> },
    Quantized { weight: QuantizedWeight, bias: Option<Tensor> },
    Fp { weight: FpWeight, bias: Option<Tensor> },
    Lora(Box<LoraLinear>),
}

impl Linear {
    /// Loads `{prefix}.weight` (and `.bias` when `bias`), quantized when the config says so.
    pub fn load(ld: &Loader, prefix: &str, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let bias_name = format!("{prefix}.bias");
        let base = if let Some(params) = ld.quant_params(prefix, in_dim)? {
            if let Some(a) = ld.adapters {
                a.check_trainable_quantized(prefix)?;
            }
            let bias = if bias { Some(ld.frozen_tensor(&bias_name, &[out_dim])?) } else { None };
            if params.mode.is_fp() {
                Linear::Fp { weight: ld.fp(prefix, &[], out_dim, in_dim, params)?, bias }
            } else {
                Linear::Quantized { weight: ld.quantized(prefix, out_dim, in_dim, params)?, bias }
            }
        } else {
            let bias = if bias { Some(ld.tensor(&bias_name, &[out_dim])?) } else { None };
            Linear::Dense { weight: ld.matrix(&format!("{prefix}.weight"), &[out_dim, in_dim])?, bias }
        };
        match ld.adapters {
            Some(a) => a.wrap(prefix, base, in_dim, out_dim, ld.act_dtype, &ld.device),
            None => Ok(base),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Linear::Lora(l) = self {
            return l.forward(x);
        }
        let y = self.forward_no_bias(x)?;
        Ok(match self.bias() {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// `x Wᵀ` without the bias (with the adapter's update for an adapted layer).
    pub fn forward_no_bias(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Dense { weight, .. } => dense_matmul(x, weight),
            Linear::Quantized { weight, .. } => weight.matmul(x),
            Linear::Fp { weight, .. } => weight.matmul(x),
            Linear::Lora(l) => l.base.forward_no_bias(x),
        }
    }

    pub fn bias(&self) -> Option<&Tensor> {
        match self {
            Linear::Dense { bias, .. } | Linear::Quantized { bias, .. } | Linear::Fp { bias, .. } => bias.as_ref(),
            Linear::Lora(l) => l.base.bias(),
        }
    }

    /// The (base) weight as a dense matrix (out × in) in `dtype`, dequantized when quantized.
    pub fn dense_weight(&self, dtype: DType) -> Result<Tensor> {
        match self {
            Linear::Dense { weight, .. } => Ok(weight.to_dtype(dtype)?),
            Linear::Quantized { weight, .. } => Ok(weight.dequantize()?.to_dtype(dtype)?),
            Linear::Fp { weight, .. } => Ok(weight.dequantize(dtype)?.to_dtype(dtype)?),
            Linear::Lora(l) => l.base.dense_weight(dtype),
        }
    }

    /// The dtype the (base) weight is stored in: an affine-quantized weight's scales' dtype; a
    /// float mode's bfloat16 (what `mx.dequantize` gives for u8 scales).
    pub fn weight_dtype(&self) -> DType {
        match self {
            Linear::Dense { weight, .. } => weight.dtype(),
            Linear::Quantized { weight, .. } => weight.scales.dtype(),
            Linear::Fp { .. } => DType::BF16,
            Linear::Lora(l) => l.base.weight_dtype(),
        }
    }
}

/// `(x Qᵀ, x Kᵀ, x Vᵀ)` with one fused kernel where the backend has one (CUDA decode with
/// bias-free quantized projections); `None`: run them one by one.
/// A deferred norm's input ([`Normed::Deferred`]) always takes it: [`RmsNorm::forward_branch`]
/// deferred it for these weights.
pub fn fused_qkv(x: &Normed, q: &Linear, k: &Linear, v: &Linear) -> Result<Option<[Tensor; 3]>> {
    if let (Normed::Plain(x), Some([qw, kw, vw])) = (x, fp_weights(&[q, k, v]).as_deref()) {
        return FpWeight::fused_qkv(x, qw, kw, vw);
    }
    let Some([qw, kw, vw]) = quantized_weights(&[q, k, v]).map(|w| [w[0], w[1], w[2]]) else { return Ok(None) };
    match x {
        Normed::Plain(x) => crate::ops::qmatmul::fused_qkv(x, qw, kw, vw),
        Normed::Deferred(d) => {
            Ok(Some(crate::ops::qmatmul::fused_qkv_deferred(&d.carrier, d.norm.eps, d.lead(), qw, kw, vw)?))
        }
    }
}

/// `silu(x Gᵀ) · (x Uᵀ)` with one fused kernel where the backend has one; `None`: run the
/// projections and the activation separately.
/// A deferred norm's input takes it as [`fused_qkv`]'s.
pub fn fused_swiglu(x: &Normed, gate: &Linear, up: &Linear) -> Result<Option<Tensor>> {
    if let (Normed::Plain(x), Some([g, u])) = (x, fp_weights(&[gate, up]).as_deref()) {
        return FpWeight::fused_swiglu(x, g, u);
    }
    let Some([g, u]) = quantized_weights(&[gate, up]).map(|w| [w[0], w[1]]) else { return Ok(None) };
    match x {
        Normed::Plain(x) => crate::ops::qmatmul::fused_swiglu(x, g, u),
        Normed::Deferred(d) => {
            Ok(Some(crate::ops::qmatmul::fused_swiglu_deferred(&d.carrier, d.norm.eps, d.lead(), g, u)?))
        }
    }
}

/// A plain module wrapper so candle's `Module` users can call our layers.
impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Linear::forward(self, x).map_err(candle_core::Error::wrap)
    }
}

/// The quantized weights of bias-free quantized layers, or `None` (also for no layers).
pub(super) fn quantized_weights<'a>(ls: &[&'a Linear]) -> Option<Vec<&'a QuantizedWeight>> {
    if ls.is_empty() {
        return None;
    }
    ls.iter()
        .map(|l| match l {
            Linear::Quantized { weight, bias: None } => Some(weight),
            _ => None,
        })
        .collect()
}

/// The weights of bias-free layers quantized in a float mode, or `None`.
fn fp_weights<'a>(ls: &[&'a Linear]) -> Option<Vec<&'a FpWeight>> {
    ls.iter()
        .map(|l| match l {
            Linear::Fp { weight, bias: None } => Some(weight),
            _ => None,
        })
        .collect()
}
