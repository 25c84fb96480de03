//! The standard store, as mlx_lm's `KVCache`: key and value buffers grown in steps of 256
//! positions, new positions written in place.

use super::CACHE_STEP;
use crate::ops::attention::{write_at_device_pos, DevicePos};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

#[derive(Debug, Clone, Default)]
pub struct Standard {
    /// (B, kv_heads, capacity, head_dim); `None` until the first update
    pub(super) keys: Option<Tensor>,
    pub(super) values: Option<Tensor>,
}

impl Standard {
    pub fn buffers(&self) -> Option<(&Tensor, &Tensor)> {
        self.keys.as_ref().zip(self.values.as_ref())
    }

    /// Positions the buffers hold room for.
    pub fn capacity(&self) -> Option<usize> {
        self.keys.as_ref().and_then(|k| k.dim(2).ok())
    }

    /// Appends `k`, `v` (B, kv_heads, L, head_dim) after `offset` positions: the keys and
    /// values to attend to. During a CUDA graph capture (`graph_pos`) the step is written at
    /// the device position instead and attention sees the whole buffers.
    pub fn update(
        &mut self,
        offset: usize,
        k: &Tensor,
        v: &Tensor,
        graph_pos: Option<&DevicePos>,
    ) -> Result<(Tensor, Tensor)> {
        if offset == 0 && (k.track_op() || v.track_op()) {
            // training: keep the keys and values in the autograd graph (a buffer written with
            // slice_set would cut them off); a later step appends by growing a fresh buffer
            (self.keys, self.values) = (Some(k.clone()), Some(v.clone()));
            return Ok((k.clone(), v.clone()));
        }
        if let Some(pos) = graph_pos {
            // a decode step being captured into a CUDA graph: written at the device position
            // (room reserved beforehand); attention sees the whole buffer up to that position
            let Some((keys, values)) = self.buffers() else {
                bail!("a captured decode step needs a filled cache");
            };
            write_at_device_pos(keys, k, &pos.pos)?;
            write_at_device_pos(values, v, &pos.pos)?;
            return Ok((keys.clone(), values.clone()));
        }
        let (b, h, l, dk) = k.dims4()?;
        self.grow_for(offset, l, (b, h, dk, v.dim(3)?), k.dtype(), k.device())?;
        let (keys, values) = self.buffers().expect("allocated above");
        keys.slice_set(&k.contiguous()?, 2, offset)?;
        values.slice_set(&v.contiguous()?, 2, offset)?;
        let n = offset + l;
        Ok((keys.narrow(2, 0, n)?, values.narrow(2, 0, n)?))
    }

    /// Grows the buffers by whole steps of 256 positions when `l` more after `offset` do not
    /// fit.
    pub fn grow_for(
        &mut self,
        offset: usize,
        l: usize,
        (b, h, dk, dv): (usize, usize, usize, usize),
        dtype: DType,
        device: &candle_core::Device,
    ) -> Result<()> {
        if offset + l <= self.capacity().unwrap_or(0) {
            return Ok(());
        }
        let grow = l.div_ceil(CACHE_STEP) * CACHE_STEP;
        let new_k = Tensor::zeros((b, h, grow, dk), dtype, device)?;
        let new_v = Tensor::zeros((b, h, grow, dv), dtype, device)?;
        let (nk, nv) = match self.buffers() {
            Some((ok, ov)) => {
                // Trim unused tail (as mlx_lm does when the previous size is not a multiple of the step).
                let ok = ok.narrow(2, 0, offset)?;
                let ov = ov.narrow(2, 0, offset)?;
                (Tensor::cat(&[&ok, &new_k], 2)?, Tensor::cat(&[&ov, &new_v], 2)?)
            }
            None => (new_k, new_v),
        };
        (self.keys, self.values) = (Some(nk), Some(nv));
        Ok(())
    }

    /// Keeps the batch rows `idx`.
    pub fn select_rows(&mut self, idx: &Tensor) -> Result<()> {
        if let Some((k, v)) = self.buffers() {
            (self.keys, self.values) = (Some(k.index_select(idx, 0)?), Some(v.index_select(idx, 0)?));
        }
        Ok(())
    }
}
