//! [`MultiLinear`]: one linear layer per attention head (mlx_lm's `MultiLinear` /
//! `QuantizedMultiLinear` in `models/mla.py`): `{prefix}.weight` is `heads × out × in` (or its
//! affine-quantized parts, quantized along `in`, with the same leading head axis). Multi-head
//! latent attention keeps its key and value up-projections this way, so that they can be
//! applied to the latent (prefill) or absorbed into the query and the output (decode).

use super::Loader;
use crate::ops::gather_mm::ExpertWeights;
use crate::ops::qmatmul::{FpWeight, QuantizedWeight};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
pub struct MultiLinear {
    weight: ExpertWeights,
    heads: usize,
    in_dim: usize,
    out_dim: usize,
    /// the last head ids routed rows took ((B, heads, L) of `h`), kept so that a decode step
    /// uploads none (an upload from the host waits for the device on CUDA)
    ids: Arc<Mutex<Option<Tensor>>>,
}

impl MultiLinear {
    pub fn load(ld: &Loader, prefix: &str, in_dim: usize, out_dim: usize, heads: usize) -> Result<Self> {
        let weight = match ld.quant_params(prefix, in_dim)? {
            Some(p) if p.mode.is_fp() => ExpertWeights::Fp(ld.fp(prefix, &[heads], out_dim, in_dim, p)?),
            Some(p) => ExpertWeights::Quantized(ld.quantized_experts(prefix, heads, out_dim, in_dim, p)?),
            None => ExpertWeights::Dense(ld.matrix(&format!("{prefix}.weight"), &[heads, out_dim, in_dim])?),
        };
        Ok(Self { weight, heads, in_dim, out_dim, ids: Arc::default() })
    }

    /// `x W_hᵀ` (mlx's `transpose=True`): `x` (B, heads or 1, L, in) → (B, heads, L, out). A
    /// single input head is shared by every head's weight.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, hx, l, i) = x.dims4()?;
        self.check(i, self.in_dim, hx)?;
        let (h, o) = (self.heads, self.out_dim);
        match &self.weight {
            ExpertWeights::Dense(w) => Ok(x.broadcast_matmul(&w.to_dtype(x.dtype())?.t()?)?),
            // one input for every head: the heads' weights are one (heads·out × in) matrix
            ExpertWeights::Quantized(w) if hx == 1 => {
                let whole = QuantizedWeight {
                    packed: w.packed.flatten_to(1)?,
                    scales: w.scales.flatten_to(1)?,
                    biases: w.biases.flatten_to(1)?,
                    out_dim: h * o,
                    ..w.clone()
                };
                let y = whole.matmul(&x.squeeze(1)?)?.to_dtype(x.dtype())?; // (B, L, heads·out)
                Ok(y.reshape((b, l, h, o))?.transpose(1, 2)?)
            }
            ExpertWeights::Fp(w) if hx == 1 && w.global_scale.is_none() => {
                let whole = FpWeight {
                    packed: w.packed.flatten_to(1)?,
                    scales: w.scales.flatten_to(1)?,
                    out_dim: h * o,
                    ..w.clone()
                };
                let y = whole.matmul(&x.squeeze(1)?)?.to_dtype(x.dtype())?;
                Ok(y.reshape((b, l, h, o))?.transpose(1, 2)?)
            }
            // each head's rows through its own weight: the heads routed like experts (a shared
            // input repeated for each head)
            _ => {
                let x = x.broadcast_as((b, h, l, i))?;
                let rows = x.contiguous()?.reshape((b * h * l, i))?;
                let y = self.weight.gather_rows(&rows, &self.head_ids(b, l, x.device())?, 1)?.to_dtype(x.dtype())?;
                Ok(y.reshape((b, h, l, o))?)
            }
        }
    }

    /// The head of each routed row of a (B, heads, L) input: `h` for row (b, h, l).
    fn head_ids(&self, b: usize, l: usize, device: &candle_core::Device) -> Result<Tensor> {
        let mut last = self.ids.lock().map_err(|_| anyhow::anyhow!("multi-head linear layer: a thread panicked"))?;
        if let Some(ids) = last.as_ref().filter(|t| t.dims() == [b, self.heads, l] && t.device().same_device(device)) {
            return Ok(ids.clone());
        }
        let h = self.heads;
        let ids = Tensor::arange(0u32, h as u32, device)?.reshape((1, h, 1))?.broadcast_as((b, h, l))?.contiguous()?;
        *last = Some(ids.clone());
        Ok(ids)
    }

    /// `x W_h` (mlx's `transpose=False`, contracting over `out`): `x` (B, heads or 1, S, out) →
    /// (B, heads, S, in). A quantized weight is dequantized for it (its groups run along `in`).
    pub fn forward_untransposed(&self, x: &Tensor) -> Result<Tensor> {
        let (_, hx, _, o) = x.dims4()?;
        self.check(o, self.out_dim, hx)?;
        Ok(x.broadcast_matmul(&self.dense(x.dtype())?)?)
    }

    /// The weights as one dense (heads × out × in) tensor in `dtype`.
    pub fn dense(&self, dtype: DType) -> Result<Tensor> {
        Ok(match &self.weight {
            ExpertWeights::Dense(w) => w.to_dtype(dtype)?,
            ExpertWeights::Quantized(q) => q.dequantize_in(dtype)?,
            ExpertWeights::Fp(q) => q.dequantize(dtype)?.to_dtype(dtype)?,
        })
    }

    fn check(&self, features: usize, want: usize, heads: usize) -> Result<()> {
        if features != want || (heads != 1 && heads != self.heads) {
            bail!(
                "multi-head linear layer: input of {heads} heads × {features} features, expected 1 or {} heads × {want}",
                self.heads
            );
        }
        Ok(())
    }
}
