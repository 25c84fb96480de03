//! KV caches. `KvCache` grows its buffers in steps of 256 positions, like mlx_lm's `KVCache`,
//! and writes new keys/values in place.

use anyhow::Result;
use candle_core::Tensor;

/// mlx_lm's growth step.
pub const CACHE_STEP: usize = 256;

/// Keys and values of one attention layer, shape (B, kv_heads, capacity, head_dim).
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    keys: Option<Tensor>,
    values: Option<Tensor>,
    offset: usize,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of positions stored.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Appends `k`, `v` (B, kv_heads, L, head_dim) and returns all keys and values so far.
    pub fn update_and_fetch(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, h, l, dk) = k.dims4()?;
        let dv = v.dim(3)?;
        let prev = self.offset;
        let capacity = self.keys.as_ref().map(|t| t.dim(2)).transpose()?.unwrap_or(0);
        if prev + l > capacity {
            let steps = l.div_ceil(CACHE_STEP);
            let grow = steps * CACHE_STEP;
            let new_k = Tensor::zeros((b, h, grow, dk), k.dtype(), k.device())?;
            let new_v = Tensor::zeros((b, h, grow, dv), v.dtype(), v.device())?;
            let (nk, nv) = match (&self.keys, &self.values) {
                (Some(ok), Some(ov)) => {
                    // Trim unused tail (as mlx_lm does when the previous size is not a multiple of the step).
                    let ok = ok.narrow(2, 0, prev)?;
                    let ov = ov.narrow(2, 0, prev)?;
                    (Tensor::cat(&[&ok, &new_k], 2)?, Tensor::cat(&[&ov, &new_v], 2)?)
                }
                _ => (new_k, new_v),
            };
            self.keys = Some(nk);
            self.values = Some(nv);
        }
        let keys = self.keys.as_ref().expect("allocated above");
        let values = self.values.as_ref().expect("allocated above");
        keys.slice_set(&k.contiguous()?, 2, prev)?;
        values.slice_set(&v.contiguous()?, 2, prev)?;
        self.offset = prev + l;
        Ok((keys.narrow(2, 0, self.offset)?, values.narrow(2, 0, self.offset)?))
    }

    /// Drops everything stored.
    pub fn reset(&mut self) {
        *self = Self::default();
    }
}
