//! [`SwitchLinear`]: the stacked linear layers of `E` experts (mlx_lm's `SwitchLinear` /
//! `QuantizedSwitchLinear`): `{prefix}.weight` is `E × out × in` (or its affine-quantized
//! parts with the same leading expert axis), `{prefix}.bias`, when there is one, `E × out`.

use super::lora::SwitchLora;
use super::Loader;
use crate::ops::gather_mm::{ExpertWeights, Routing};
use anyhow::Result;
use candle_core::{DType, Tensor};

#[derive(Debug, Clone)]
pub struct SwitchLinear {
    weight: ExpertWeights,
    bias: Option<Tensor>,
    experts: usize,
    /// a LoRA adapter's update (mlx_lm's `LoRASwitchLinear`)
    pub lora: Option<SwitchLora>,
}

impl SwitchLinear {
    pub fn load(ld: &Loader, prefix: &str, experts: usize, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let params = ld.quant_params(prefix, in_dim)?;
        if let (Some(_), Some(a)) = (params, ld.adapters) {
            a.check_trainable_quantized(prefix)?;
        }
        let weight = match params {
            Some(p) if p.mode.is_fp() => ExpertWeights::Fp(ld.fp(prefix, &[experts], out_dim, in_dim, p)?),
            Some(p) => ExpertWeights::Quantized(ld.quantized_experts(prefix, experts, out_dim, in_dim, p)?),
            None => ExpertWeights::Dense(ld.matrix(&format!("{prefix}.weight"), &[experts, out_dim, in_dim])?),
        };
        let bias = if bias { Some(ld.tensor(&format!("{prefix}.bias"), &[experts, out_dim])?) } else { None };
        let lora = match ld.adapters {
            Some(a) => a.switch_lora(prefix, experts, in_dim, out_dim, &ld.device)?,
            None => None,
        };
        Ok(Self { weight, bias, experts, lora })
    }

    pub fn experts(&self) -> usize {
        self.experts
    }

    /// Each sorted row `x_j` (rows × in) of `routing` times its expert's weight (plus its
    /// expert's bias); rows stay in sorted order.
    pub fn forward(&self, x: &Tensor, routing: &Routing) -> Result<Tensor> {
        let mut y = self.weight.gather_matmul(x, routing)?.to_dtype(x.dtype())?;
        if let Some(b) = &self.bias {
            y = (y + routing.per_row(b)?)?;
        }
        if let Some(l) = &self.lora {
            let xin = if l.dropout > 0.0 && super::lora::training() {
                candle_nn::ops::dropout(x, l.dropout as f32)?
            } else {
                x.clone()
            };
            let a = ExpertWeights::Dense(l.a.to_dtype(x.dtype())?);
            let b = ExpertWeights::Dense(l.b.to_dtype(x.dtype())?);
            let z = b.gather_matmul(&a.gather_matmul(&xin, routing)?, routing)?;
            y = (y + (z * l.scale)?)?;
        }
        Ok(y)
    }

    /// Whether [`Self::gather_rows`] keeps the expert ids on `device` (no adapter, and a weight
    /// form with a gathered kernel there).
    pub fn routes_on_device(&self, device: &candle_core::Device) -> bool {
        self.lora.is_none() && self.weight.routes_on_device(device)
    }

    /// [`Self::routes_on_device`] for a CUDA device.
    pub fn routes_on_cuda(&self) -> bool {
        self.lora.is_none() && self.weight.routes_on_cuda()
    }

    /// Routed row `r` (of `ids`, any shape) is row `r / xdiv` of `x` times expert `ids[r]`'s
    /// weight, plus its bias; rows in the ids' order, the ids staying on the device where
    /// [`Self::routes_on_device`].
    pub fn gather_rows(&self, x: &Tensor, ids: &Tensor, xdiv: usize) -> Result<Tensor> {
        if self.lora.is_some() {
            let routing = Routing::new(ids, self.experts)?;
            return routing.unsort(&self.forward(&routing.sort(x, xdiv)?, &routing)?);
        }
        let mut y = self.weight.gather_rows(x, ids, xdiv)?.to_dtype(x.dtype())?;
        if let Some(b) = &self.bias {
            let rows_bias = b.index_select(&ids.flatten_all()?.to_dtype(DType::U32)?, 0)?.to_dtype(y.dtype())?;
            y = (y + rows_bias)?;
        }
        Ok(y)
    }

    /// `silu(x·Gᵀ) · (x·Uᵀ)` of two layers without biases or adapters in one gathered launch,
    /// where a kernel exists for them; None otherwise.
    pub fn gather_swiglu(gate: &Self, up: &Self, x: &Tensor, ids: &Tensor, xdiv: usize) -> Result<Option<Tensor>> {
        if gate.bias.is_some() || up.bias.is_some() || gate.lora.is_some() || up.lora.is_some() {
            return Ok(None);
        }
        Ok(ExpertWeights::gather_swiglu(&gate.weight, &up.weight, x, ids, xdiv)?
            .map(|y| y.to_dtype(x.dtype()))
            .transpose()?)
    }

    /// The layer's stacked weight with its adapter folded in, as mlx_lm's
    /// `LoRASwitchLinear.fuse`: the weight in `store` (a quantized one dequantized in its scales'
    /// dtype) plus the update cast to it, re-quantized with its bits and group size unless
    /// `dequantize`; `None` without an adapter. The tensors (`weight`, and `scales` / `biases`).
    pub fn fuse(&self, dequantize: bool, store: DType) -> Result<Option<Vec<(&'static str, Tensor)>>> {
        let Some(l) = &self.lora else { return Ok(None) };
        let w = match &self.weight {
            ExpertWeights::Quantized(q) => q.dequantize_in(store)?,
            ExpertWeights::Dense(w) => w.to_dtype(store)?,
            ExpertWeights::Fp(q) => q.dequantize(store)?.to_dtype(store)?,
        };
        let fused = (w + l.delta()?.to_dtype(store)?)?;
        Ok(Some(match &self.weight {
            ExpertWeights::Quantized(q) if !dequantize => {
                let (packed, scales, biases) = crate::quant::quantize_tensor(&fused, q.params)?;
                vec![("weight", packed), ("scales", scales), ("biases", biases)]
            }
            ExpertWeights::Fp(q) if !dequantize => q.requantize(&fused)?,
            _ => vec![("weight", fused)],
        }))
    }
}
