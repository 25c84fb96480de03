//! The rotating store (`--max-kv-size`, sliding-window layers), as mlx_lm's `RotatingKVCache`:
//! it keeps at most `max_size` positions, the first `keep` of the sequence plus the most recent
//! ones. A decode step overwrites the oldest position in place (attention does not care about
//! the order of keys); a multi-token step first puts the buffer back in temporal order, trims it
//! to `max_size - 1` positions and appends, so that every new query sees `max_size` keys through
//! the window mask.

use super::{cat2, CACHE_STEP};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

#[derive(Debug, Clone)]
pub struct Rotating {
    keys: Option<Tensor>,
    values: Option<Tensor>,
    pub(super) max_size: usize,
    pub(super) keep: usize,
    /// where the next decode step writes
    idx: usize,
}

impl Rotating {
    /// Empty, keeping at most `max_size` positions, the first `keep` among them.
    pub fn new(max_size: usize, keep: usize) -> Self {
        assert!(max_size > keep, "a rotating cache must hold more than the positions it keeps");
        Self { keys: None, values: None, max_size, keep, idx: 0 }
    }

    pub fn buffers(&self) -> Option<(&Tensor, &Tensor)> {
        self.keys.as_ref().zip(self.values.as_ref())
    }

    /// Forgets the newest `n` positions (the caller's offset goes back by as many).
    pub fn trim(&mut self, n: usize) {
        self.idx -= n;
    }

    /// Keeps the batch rows `idx`.
    pub fn select_rows(&mut self, idx: &Tensor) -> Result<()> {
        if let (Some(k), Some(v)) = (&self.keys, &self.values) {
            (self.keys, self.values) = (Some(k.index_select(idx, 0)?), Some(v.index_select(idx, 0)?));
        }
        Ok(())
    }

    /// The buffer in temporal order (kept positions, then oldest to newest), unused tail cut;
    /// `offset`: positions seen so far.
    fn temporal_order(&self, t: &Tensor, offset: usize) -> Result<Tensor> {
        let n = t.dim(2)?;
        if self.idx == n {
            Ok(t.clone())
        } else if self.idx < offset {
            let keep = self.keep;
            cat2(&[t.narrow(2, 0, keep)?, t.narrow(2, self.idx, n - self.idx)?, t.narrow(2, keep, self.idx - keep)?])
        } else {
            Ok(t.narrow(2, 0, self.idx)?)
        }
    }

    /// Drops `trim` positions after the kept ones, then appends `append`.
    fn trim_buf(t: &Tensor, trim: usize, keep: usize, append: Option<&Tensor>) -> Result<Tensor> {
        let n = t.dim(2)?;
        let mut parts = if trim > 0 {
            vec![t.narrow(2, 0, keep)?, t.narrow(2, trim + keep, n - trim - keep)?]
        } else {
            vec![t.clone()]
        };
        parts.extend(append.cloned());
        cat2(&parts)
    }

    /// Appends several positions `k`, `v` after `offset` seen ones: the keys and values to
    /// attend to (in temporal order).
    pub fn update_concat(&mut self, offset: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = (k.contiguous()?, v.contiguous()?);
        match (&self.keys, &self.values) {
            (Some(ok), Some(ov)) => {
                let ok = self.temporal_order(ok, offset)?;
                let ov = self.temporal_order(ov, offset)?;
                // every new query must still see max_size keys: keep max_size - 1 old ones
                let trim = (ok.dim(2)? + 1).saturating_sub(self.max_size);
                self.keys = Some(Self::trim_buf(&ok, trim, self.keep, Some(&k))?);
                self.values = Some(Self::trim_buf(&ov, trim, self.keep, Some(&v))?);
            }
            _ => {
                self.keys = Some(k.clone());
                self.values = Some(v.clone());
            }
        }
        let keys = self.keys.clone().expect("set above");
        self.idx = keys.dim(2)?;
        Ok((keys, self.values.clone().expect("set above")))
    }

    /// Writes one position `k`, `v` after `offset` seen ones, over the oldest one not kept once
    /// the buffer is full: the keys and values to attend to (in any order).
    pub fn update_in_place(&mut self, offset: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, h, _, dk) = k.dims4()?;
        let dv = v.dim(3)?;
        let size = self.keys.as_ref().map(|t| t.dim(2)).transpose()?.unwrap_or(0);
        if self.keys.is_none() || (offset >= size && size < self.max_size) {
            let grow = CACHE_STEP.min(self.max_size.saturating_sub(offset)).max(1);
            let new_k = Tensor::zeros((b, h, grow, dk), k.dtype(), k.device())?;
            let new_v = Tensor::zeros((b, h, grow, dv), v.dtype(), v.device())?;
            let (nk, nv) = match (&self.keys, &self.values) {
                (Some(ok), Some(ov)) => (Tensor::cat(&[ok, &new_k], 2)?, Tensor::cat(&[ov, &new_v], 2)?),
                _ => (new_k, new_v),
            };
            self.keys = Some(nk);
            self.values = Some(nv);
            self.idx = offset;
        }
        let size = self.keys.as_ref().expect("allocated above").dim(2)?;
        if size > self.max_size {
            let trim = size - self.max_size;
            self.keys = Some(Self::trim_buf(self.keys.as_ref().expect("set"), trim, self.keep, None)?);
            self.values = Some(Self::trim_buf(self.values.as_ref().expect("set"), trim, self.keep, None)?);
            self.idx = self.max_size;
        }
        if self.idx == self.max_size {
            self.idx = self.keep;
        }
        let keys = self.keys.as_ref().expect("allocated above");
        let values = self.values.as_ref().expect("allocated above");
        keys.slice_set(&k.contiguous()?, 2, self.idx)?;
        values.slice_set(&v.contiguous()?, 2, self.idx)?;
        self.idx += 1;
        let (seen, n) = (offset + 1, keys.dim(2)?);
        if seen < n {
            Ok((keys.narrow(2, 0, seen)?, values.narrow(2, 0, seen)?))
        } else {
            Ok((keys.clone(), values.clone()))
        }
    }

    /// The whole buffers and the write index (mlx_lm's state); `None` when empty.
    pub fn state(&self) -> Option<(Tensor, Tensor, usize)> {
        Some((self.keys.clone()?, self.values.clone()?, self.idx))
    }

    /// A store holding `keys`, `values` (in `dtype`) of `offset` seen positions, written up to
    /// `idx`.
    pub fn from_state(
        (keys, values): (Tensor, Tensor),
        (offset, keep, max_size, idx): (usize, usize, usize, usize),
        dtype: DType,
    ) -> Result<Self> {
        if max_size <= keep || idx > keys.dim(2)? || keys.dim(2)? > max_size.max(offset) {
            bail!("RotatingKVCache: inconsistent state (max_size {max_size}, keep {keep}, idx {idx})");
        }
        Ok(Self {
            keys: Some(keys.to_dtype(dtype)?.contiguous()?),
            values: Some(values.to_dtype(dtype)?.contiguous()?),
            max_size,
            keep,
            idx,
        })
    }
}
