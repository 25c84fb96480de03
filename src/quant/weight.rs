//! A quantized weight matrix (out × in) as stored by mlx: `{name}.weight` (u32, out × in·bits/32),
//! `{name}.scales` and `{name}.biases` (float, out × in/group_size).

use super::affine::{self, QuantParams};
use crate::nn::Loader;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

#[derive(Debug, Clone)]
pub struct QuantizedWeight {
    pub packed: Tensor,
    pub scales: Tensor,
    pub biases: Tensor,
    pub params: QuantParams,
    pub out_dim: usize,
    pub in_dim: usize,
    /// the model's compute dtype (embedding rows are returned in it)
    pub compute_dtype: DType,
}

impl QuantizedWeight {
    /// Loads and validates the three tensors of a quantized layer.
    pub fn load(ld: &Loader, prefix: &str, out_dim: usize, in_dim: usize, params: QuantParams) -> Result<Self> {
        let w = ld.weights;
        let wname = format!("{prefix}.weight");
        if !w.contains(&format!("{prefix}.scales")) {
            bail!(
                "layer `{prefix}` should be quantized ({}-bit, group {}) according to config.json, but `{prefix}.scales` is missing from the weights",
                params.bits,
                params.group_size
            );
        }
        let wshape = w.shape(&wname)?;
        if w.dtype(&wname)? != DType::U32 {
            bail!("layer `{prefix}`: quantized weight `{wname}` must be uint32, found {:?}", w.dtype(&wname)?);
        }
        if !in_dim.is_multiple_of(params.group_size) {
            bail!("layer `{prefix}`: input dimension {in_dim} is not divisible by group_size {}", params.group_size);
        }
        let expect_w = [out_dim, params.packed_width(in_dim)];
        if wshape != expect_w {
            bail!(
                "layer `{prefix}`: packed weight has shape {wshape:?}, but {}-bit values of a {out_dim}×{in_dim} matrix pack to {expect_w:?} (does `bits` in config.json match the file?)",
                params.bits
            );
        }
        let gshape = [out_dim, in_dim / params.group_size];
        for part in ["scales", "biases"] {
            let s = w.shape(&format!("{prefix}.{part}"))?;
            if s != gshape {
                bail!(
                    "layer `{prefix}`: {part} have shape {s:?}, expected {gshape:?} ({out_dim} rows × {in_dim}/{} groups; does `group_size` in config.json match the file?)",
                    params.group_size
                );
            }
        }
        let packed = w.raw(&wname, &ld.device)?;
        // On the CPU the kernels read scales and biases as f32 (exact for f16/bf16 values):
        // no per-group conversion in the inner loop, and the bias term becomes one dot product.
        let sdtype = if ld.device.is_cpu() { DType::F32 } else { ld.dtype };
        let scales = w.raw(&format!("{prefix}.scales"), &ld.device)?.to_dtype(sdtype)?;
        let biases = w.raw(&format!("{prefix}.biases"), &ld.device)?.to_dtype(sdtype)?;
        Ok(Self { packed, scales, biases, params, out_dim, in_dim, compute_dtype: ld.act_dtype })
    }

    /// The dense matrix (out × in) in the scales' dtype (f32 on the CPU).
    pub fn dequantize(&self) -> Result<Tensor> {
        affine::dequantize_tensor(&self.packed, &self.scales, &self.biases, self.params)
    }

    /// `x Wᵀ` for `x` of shape (…, in).
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        super::matmul::quantized_matmul(x, self)
    }

    /// Rows `ids` of the dense matrix (an embedding lookup), in the scales' dtype.
    pub fn gather_rows(&self, ids: &Tensor) -> Result<Tensor> {
        let packed = self.packed.index_select(ids, 0)?;
        let scales = self.scales.index_select(ids, 0)?;
        let biases = self.biases.index_select(ids, 0)?;
        let n = ids.dim(0)?;
        let sub = QuantizedWeight { packed, scales, biases, out_dim: n, ..self.clone() };
        sub.dequantize()
    }
}
