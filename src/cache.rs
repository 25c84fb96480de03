//! KV caches, one per attention layer.
//!
//! - Standard: grows its buffers in steps of 256 positions, like mlx_lm's `KVCache`, and writes
//!   new keys/values in place.
//! - Rotating (`--max-kv-size`, sliding-window layers): keeps at most `max_size` positions, the
//!   first `keep` of the sequence plus the most recent ones, as mlx_lm's `RotatingKVCache` does:
//!   a decode step overwrites the oldest position in place (attention does not care about the
//!   order of keys); a multi-token step first puts the buffer back in temporal order, trims it
//!   to `max_size - 1` positions and appends, so that every new query sees `max_size` keys
//!   through the window mask ([`KvCache::mask`]).

use anyhow::Result;
use candle_core::Tensor;

/// mlx_lm's growth step.
pub const CACHE_STEP: usize = 256;

/// Positions a rotating cache made for `--max-kv-size` always keeps (mlx_lm's `keep=4`).
pub const MAX_KV_KEEP: usize = 4;

#[derive(Debug, Clone, Copy)]
struct Rotation {
    max_size: usize,
    keep: usize,
    /// where the next decode step writes
    idx: usize,
}

/// Which keys the queries of one forward pass may see: query `i` sits at index `offset + i` of
/// the keys [`KvCache::update_and_fetch`] returns and sees key `j` when `j <= offset + i` and,
/// with a window, `j > offset + i - window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaskSpec {
    pub offset: usize,
    pub window: Option<usize>,
}

/// Keys and values of one attention layer, shape (B, kv_heads, capacity, head_dim).
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    keys: Option<Tensor>,
    values: Option<Tensor>,
    offset: usize,
    rotation: Option<Rotation>,
}

/// `parts` concatenated along the sequence axis (2), as a contiguous tensor (decode steps write
/// into it in place).
fn cat2(parts: &[Tensor]) -> Result<Tensor> {
    let parts: Vec<&Tensor> = parts.iter().filter(|t| t.dim(2).is_ok_and(|n| n > 0)).collect();
    Ok(if parts.len() == 1 { parts[0].contiguous()? } else { Tensor::cat(&parts, 2)? })
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// A cache that keeps at most `max_size` positions, the first `keep` among them.
    pub fn rotating(max_size: usize, keep: usize) -> Self {
        assert!(max_size > keep, "a rotating cache must hold more than the positions it keeps");
        Self { rotation: Some(Rotation { max_size, keep, idx: 0 }), ..Self::default() }
    }

    /// Number of positions seen so far (the position of the next token).
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// The mask for a forward pass of `l` new positions, given before the update.
    pub fn mask(&self, l: usize) -> MaskSpec {
        match self.rotation {
            Some(r) if l > 1 => MaskSpec { offset: self.offset.min(r.max_size - 1), window: Some(r.max_size) },
            _ => MaskSpec { offset: self.offset, window: None },
        }
    }

    /// Appends `k`, `v` (B, kv_heads, L, head_dim) and returns the keys and values to attend to.
    pub fn update_and_fetch(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        match self.rotation {
            None => self.update_growing(k, v),
            Some(_) if k.dim(2)? == 1 => self.update_in_place(k, v),
            Some(_) => self.update_concat(k, v),
        }
    }

    fn update_growing(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
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

    /// The buffer in temporal order (kept positions, then oldest to newest), unused tail cut.
    fn temporal_order(&self, t: &Tensor, r: &Rotation) -> Result<Tensor> {
        let n = t.dim(2)?;
        if r.idx == n {
            Ok(t.clone())
        } else if r.idx < self.offset {
            cat2(&[t.narrow(2, 0, r.keep)?, t.narrow(2, r.idx, n - r.idx)?, t.narrow(2, r.keep, r.idx - r.keep)?])
        } else {
            Ok(t.narrow(2, 0, r.idx)?)
        }
    }

    /// Drops `trim` positions after the kept ones, then appends `append`.
    fn trim(t: &Tensor, trim: usize, keep: usize, append: Option<&Tensor>) -> Result<Tensor> {
        let n = t.dim(2)?;
        let mut parts = if trim > 0 {
            vec![t.narrow(2, 0, keep)?, t.narrow(2, trim + keep, n - trim - keep)?]
        } else {
            vec![t.clone()]
        };
        parts.extend(append.cloned());
        cat2(&parts)
    }

    fn update_concat(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut r = self.rotation.expect("rotating cache");
        let (k, v) = (k.contiguous()?, v.contiguous()?);
        match (&self.keys, &self.values) {
            (Some(ok), Some(ov)) => {
                let ok = self.temporal_order(ok, &r)?;
                let ov = self.temporal_order(ov, &r)?;
                // every new query must still see max_size keys: keep max_size - 1 old ones
                let trim = (ok.dim(2)? + 1).saturating_sub(r.max_size);
                self.keys = Some(Self::trim(&ok, trim, r.keep, Some(&k))?);
                self.values = Some(Self::trim(&ov, trim, r.keep, Some(&v))?);
            }
            _ => {
                self.keys = Some(k.clone());
                self.values = Some(v.clone());
            }
        }
        self.offset += k.dim(2)?;
        let keys = self.keys.clone().expect("set above");
        r.idx = keys.dim(2)?;
        self.rotation = Some(r);
        Ok((keys, self.values.clone().expect("set above")))
    }

    fn update_in_place(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut r = self.rotation.expect("rotating cache");
        let (b, h, _, dk) = k.dims4()?;
        let dv = v.dim(3)?;
        let prev = self.offset;
        let size = self.keys.as_ref().map(|t| t.dim(2)).transpose()?.unwrap_or(0);
        if self.keys.is_none() || (prev >= size && size < r.max_size) {
            let grow = CACHE_STEP.min(r.max_size.saturating_sub(prev)).max(1);
            let new_k = Tensor::zeros((b, h, grow, dk), k.dtype(), k.device())?;
            let new_v = Tensor::zeros((b, h, grow, dv), v.dtype(), v.device())?;
            let (nk, nv) = match (&self.keys, &self.values) {
                (Some(ok), Some(ov)) => (Tensor::cat(&[ok, &new_k], 2)?, Tensor::cat(&[ov, &new_v], 2)?),
                _ => (new_k, new_v),
            };
            self.keys = Some(nk);
            self.values = Some(nv);
            r.idx = prev;
        }
        let size = self.keys.as_ref().expect("allocated above").dim(2)?;
        if size > r.max_size {
            let trim = size - r.max_size;
            self.keys = Some(Self::trim(self.keys.as_ref().expect("set"), trim, r.keep, None)?);
            self.values = Some(Self::trim(self.values.as_ref().expect("set"), trim, r.keep, None)?);
            r.idx = r.max_size;
        }
        if r.idx == r.max_size {
            r.idx = r.keep;
        }
        let keys = self.keys.as_ref().expect("allocated above");
        let values = self.values.as_ref().expect("allocated above");
        keys.slice_set(&k.contiguous()?, 2, r.idx)?;
        values.slice_set(&v.contiguous()?, 2, r.idx)?;
        self.offset += 1;
        r.idx += 1;
        self.rotation = Some(r);
        let n = keys.dim(2)?;
        if self.offset < n {
            Ok((keys.narrow(2, 0, self.offset)?, values.narrow(2, 0, self.offset)?))
        } else {
            Ok((keys.clone(), values.clone()))
        }
    }

    /// Drops everything stored.
    pub fn reset(&mut self) {
        let rotation = self.rotation.map(|r| Rotation { idx: 0, ..r });
        *self = Self { rotation, ..Self::default() };
    }
}
