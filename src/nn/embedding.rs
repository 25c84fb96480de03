//! [`Embedding`]: token embeddings, dense or quantized (also the tied lm head).

use super::Loader;
use crate::ops::dense_matmul::dense_matmul;
use crate::ops::qmatmul::{FpWeight, QuantizedWeight};
use anyhow::Result;
use candle_core::{DType, Tensor};

/// Token embeddings, dense or quantized (affine or a float mode); `as_linear` serves as the tied
/// lm head.
#[derive(Debug, Clone)]
pub enum Embedding {
    Dense { weight: Tensor, act_dtype: DType },
    Quantized(QuantizedWeight),
    Fp { weight: FpWeight, act_dtype: DType },
}

impl Embedding {
    pub fn load(ld: &Loader, prefix: &str, vocab: usize, dim: usize) -> Result<Self> {
        if let Some(params) = ld.quant_params(prefix, dim)? {
            if params.mode.is_fp() {
                return Ok(Embedding::Fp { weight: ld.fp(prefix, &[], vocab, dim, params)?, act_dtype: ld.act_dtype });
            }
            return Ok(Embedding::Quantized(ld.quantized(prefix, vocab, dim, params)?));
        }
        Ok(Embedding::Dense { weight: ld.matrix(&format!("{prefix}.weight"), &[vocab, dim])?, act_dtype: ld.act_dtype })
    }

    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let shape = ids.dims().to_vec();
        let flat = ids.flatten_all()?;
        let rows = match self {
            Embedding::Dense { weight, act_dtype } => weight.index_select(&flat, 0)?.to_dtype(*act_dtype)?,
            Embedding::Quantized(q) => q.gather_rows(&flat)?.to_dtype(q.compute_dtype)?,
            Embedding::Fp { weight, act_dtype } => weight.gather_rows(&flat, *act_dtype)?,
        };
        let mut out = shape;
        out.push(rows.dim(1)?);
        Ok(rows.reshape(out)?)
    }

    /// `x Eᵀ`: the embedding matrix used as the output projection (tied lm head).
    pub fn as_linear(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Embedding::Dense { weight, .. } => dense_matmul(x, weight),
            Embedding::Quantized(q) => q.matmul(x),
            Embedding::Fp { weight, .. } => weight.matmul(x),
        }
    }
}
