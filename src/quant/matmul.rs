//! The quantized matmul `y = x · dequant(W)ᵀ`.

use super::weight::QuantizedWeight;
use crate::nn::dense_matmul;
use anyhow::Result;
use candle_core::Tensor;

/// `x Wᵀ` for a quantized `W`.
pub fn quantized_matmul(x: &Tensor, w: &QuantizedWeight) -> Result<Tensor> {
    let dense = w.dequantize()?.to_dtype(x.dtype())?;
    dense_matmul(x, &dense)
}
