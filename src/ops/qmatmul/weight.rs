//! A quantized weight matrix (out × in) as stored by mlx: `{name}.weight` (u32, out × in·bits/32),
//! `{name}.scales` and `{name}.biases` (float, out × in/group_size).

use crate::quant::QuantParams;
use anyhow::Result;
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
    /// The dense matrix (out × in) in the scales' dtype (f32 on the CPU).
    pub fn dequantize(&self) -> Result<Tensor> {
        super::dequantize_tensor(&self.packed, &self.scales, &self.biases, self.params)
    }

    /// The dense matrix with the scales and biases first cast to `dtype` (what mlx computes when
    /// the weight's scales are stored in `dtype`).
    pub fn dequantize_in(&self, dtype: DType) -> Result<Tensor> {
        let scales = self.scales.to_dtype(dtype)?;
        let biases = self.biases.to_dtype(dtype)?;
        super::dequantize_tensor(&self.packed, &scales, &biases, self.params)
    }

    /// `x Wᵀ` for `x` of shape (…, in).
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        super::quantized_matmul(x, self)
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
