//! The quantized store (`--kv-bits`), as mlx_lm's `QuantizedKVCache`: keys and values in the
//! affine format, buffers grown in steps of 256 positions; attention sees them dequantized.

use super::{cat2, CACHE_STEP};
use crate::ops::qmatmul::dequantize_tensor;
use crate::quant::affine::{quantize_tensor, QuantParams};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// A quantized key or value buffer: packed codes, scales and biases, as `mx.quantize` returns.
#[derive(Debug, Clone)]
pub(super) struct QuantBuf {
    packed: Tensor,
    scales: Tensor,
    biases: Tensor,
}

impl QuantBuf {
    /// `t` (B, kv_heads, L, head_dim) quantized along the head dimension.
    fn quantize(t: &Tensor, p: QuantParams) -> Result<Self> {
        let d = t.dim(3)?;
        if d % p.group_size != 0 {
            bail!("--kv-group-size {}: does not divide the attention head size {d}", p.group_size);
        }
        let (packed, scales, biases) = quantize_tensor(&t.contiguous()?, p)?;
        Ok(Self { packed, scales, biases })
    }

    fn parts(&self) -> [&Tensor; 3] {
        [&self.packed, &self.scales, &self.biases]
    }

    fn map(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Self> {
        Ok(Self { packed: f(&self.packed)?, scales: f(&self.scales)?, biases: f(&self.biases)? })
    }

    /// The first `n` positions as (packed, scales, biases).
    fn first(&self, n: usize) -> Result<[Tensor; 3]> {
        let b = self.map(|t| Ok(t.narrow(2, 0, n)?))?;
        Ok([b.packed, b.scales, b.biases])
    }
}

/// Keys and values quantized with the affine format.
#[derive(Debug, Clone)]
pub struct Quantized {
    pub(super) params: QuantParams,
    keys: QuantBuf,
    values: QuantBuf,
    /// dtype of the keys and values the model passes in (and gets back)
    dtype: DType,
}

impl Quantized {
    /// The keys' then the values' packed codes, scales and biases.
    pub fn parts(&self) -> Vec<&Tensor> {
        self.keys.parts().into_iter().chain(self.values.parts()).collect()
    }

    /// The keys and values of a standard cache's buffers, quantized (mlx_lm's `to_quantized`).
    pub fn from_buffers(k: &Tensor, v: &Tensor, params: QuantParams) -> Result<Self> {
        Ok(Self {
            params,
            dtype: k.dtype(),
            keys: QuantBuf::quantize(k, params)?,
            values: QuantBuf::quantize(v, params)?,
        })
    }

    /// Appends `k`, `v` after `offset` positions and returns all `offset + L` positions
    /// dequantized (in the model's dtype).
    pub fn update(&mut self, offset: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let p = self.params;
        let (nk, nv) = (QuantBuf::quantize(k, p)?, QuantBuf::quantize(v, p)?);
        let l = k.dim(2)?;
        let capacity = self.keys.packed.dim(2)?;
        if offset + l > capacity {
            let grow = l.div_ceil(CACHE_STEP) * CACHE_STEP;
            let extend = |old: &QuantBuf, new: &QuantBuf| -> Result<QuantBuf> {
                let mut parts = old.parts().into_iter().zip(new.parts()).map(|(o, n)| {
                    let mut shape = n.dims().to_vec();
                    shape[2] = grow;
                    let zeros = Tensor::zeros(shape, n.dtype(), n.device())?;
                    cat2(&[o.narrow(2, 0, offset)?, zeros])
                });
                Ok(QuantBuf {
                    packed: parts.next().expect("3 parts")?,
                    scales: parts.next().expect("3 parts")?,
                    biases: parts.next().expect("3 parts")?,
                })
            };
            self.keys = extend(&self.keys, &nk)?;
            self.values = extend(&self.values, &nv)?;
        }
        for (buf, new) in [(&self.keys, &nk), (&self.values, &nv)] {
            for (b, n) in buf.parts().into_iter().zip(new.parts()) {
                b.slice_set(n, 2, offset)?;
            }
        }
        let n = offset + l;
        let deq = |b: &QuantBuf| -> Result<Tensor> {
            let [packed, scales, biases] = b.first(n)?;
            Ok(dequantize_tensor(&packed, &scales, &biases, self.params)?.to_dtype(self.dtype)?)
        };
        Ok((deq(&self.keys)?, deq(&self.values)?))
    }

    /// Keeps the batch rows `idx` (u32 indices on the device).
    pub fn select_rows(&mut self, idx: &Tensor) -> Result<()> {
        let pick = |t: &Tensor| -> Result<Tensor> { Ok(t.index_select(idx, 0)?) };
        self.keys = self.keys.map(pick)?;
        self.values = self.values.map(pick)?;
        Ok(())
    }

    pub fn device(&self) -> &candle_core::Device {
        self.keys.packed.device()
    }

    /// The first `offset` positions of the keys and of the values as (packed, scales, biases).
    pub fn state(&self, offset: usize) -> Result<([Tensor; 3], [Tensor; 3])> {
        Ok((self.keys.first(offset)?, self.values.first(offset)?))
    }

    /// A store holding the first `offset` positions of `keys` and `values` (packed, scales,
    /// biases), handing back keys and values in `dtype`.
    pub fn from_state(
        keys: [Tensor; 3],
        values: [Tensor; 3],
        offset: usize,
        params: QuantParams,
        dtype: DType,
    ) -> Result<Self> {
        let buf = |[packed, scales, biases]: [Tensor; 3]| -> Result<QuantBuf> {
            let n = |t: Tensor| -> Result<Tensor> { Ok(t.narrow(2, 0, offset)?.contiguous()?) };
            Ok(QuantBuf { packed: n(packed)?, scales: n(scales)?, biases: n(biases)? })
        };
        Ok(Self { params, keys: buf(keys)?, values: buf(values)?, dtype })
    }
}
