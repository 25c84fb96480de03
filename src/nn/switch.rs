//! [`SwitchLinear`]: the stacked linear layers of `E` experts (mlx_lm's `SwitchLinear` /
//! `QuantizedSwitchLinear`): `{prefix}.weight` is `E × out × in` (or its affine-quantized
//! parts with the same leading expert axis), `{prefix}.bias`, when there is one, `E × out`.

use super::Loader;
use crate::ops::gather_mm::{ExpertWeights, Routing};
use anyhow::Result;
use candle_core::Tensor;

#[derive(Debug, Clone)]
pub struct SwitchLinear {
    weight: ExpertWeights,
    bias: Option<Tensor>,
    experts: usize,
}

impl SwitchLinear {
    pub fn load(ld: &Loader, prefix: &str, experts: usize, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = match ld.quant_params(prefix, in_dim)? {
            Some(p) => ExpertWeights::Quantized(ld.quantized_experts(prefix, experts, out_dim, in_dim, p)?),
            None => ExpertWeights::Dense(ld.matrix(&format!("{prefix}.weight"), &[experts, out_dim, in_dim])?),
        };
        let bias = if bias { Some(ld.tensor(&format!("{prefix}.bias"), &[experts, out_dim])?) } else { None };
        Ok(Self { weight, bias, experts })
    }

    pub fn experts(&self) -> usize {
        self.experts
    }

    /// Each sorted row `x_j` (rows × in) of `routing` times its expert's weight (plus its
    /// expert's bias); rows stay in sorted order.
    pub fn forward(&self, x: &Tensor, routing: &Routing) -> Result<Tensor> {
        let y = self.weight.gather_matmul(x, routing)?.to_dtype(x.dtype())?;
        match &self.bias {
            None => Ok(y),
            Some(b) => Ok((y + routing.per_row(b)?)?),
        }
    }
}
