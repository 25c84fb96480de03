//! A batch's row operations on standard caches: rows that leave (retired, selected out),
//! rows that join (written into a retired slot, or whole caches merged into one left-padded
//! batch), rows given back as caches of their own.

use super::{KvCache, Standard, Store, CACHE_STEP};
use anyhow::{bail, Result};
use candle_core::Tensor;

impl KvCache {
    /// Whether the next position does not fit the buffers of a plain cache (the next update
    /// grows them).
    pub fn is_full(&self) -> bool {
        self.standard().and_then(Standard::capacity).is_some_and(|c| self.offset >= c)
    }

    /// Marks row `row` of a batch as left: from the next step on, it sees only its own new
    /// positions (its slot computes a throwaway row until [`KvCache::write_row`] fills it).
    pub fn retire_row(&mut self, row: usize) {
        self.set_row_start(row, self.offset);
    }

    /// Sets row `row`'s left padding (the first key it sees) to `start`.
    fn set_row_start(&mut self, row: usize, start: usize) {
        let rows = self.rows().unwrap_or(1);
        let mut padding = self.left_padding.as_deref().map_or_else(|| vec![0; rows], |p| p.to_vec());
        if let Some(p) = padding.get_mut(row) {
            *p = start;
        }
        self.left_padding = Some(padding.into());
    }

    /// Puts the sequence of `other` (one row, unpadded) into row `row` of this batch, in place:
    /// its positions end at the batch's offset and padding fills the row before them. The
    /// buffers stay the same (a CUDA graph captured against them keeps being replayed).
    pub fn write_row(&mut self, row: usize, other: &KvCache) -> Result<()> {
        let n = other.offset;
        if !self.is_batchable() || !other.is_batchable() || other.left_padding.is_some() || other.rows()? != 1 {
            bail!("only a plain single-sequence cache can take over a batch row");
        }
        let rows = self.rows()?;
        if row >= rows || n > self.offset {
            bail!(
                "a sequence of {n} positions does not fit row {row} of a batch of {rows} rows at offset {}",
                self.offset
            );
        }
        if let (Store::Arrays(mine), Store::Arrays(theirs)) = (&mut self.store, &other.store) {
            mine.write_row(row, rows, theirs)?;
        } else if n > 0 {
            let (Some((k, v)), Some((ok, ov))) = (standard_buffers(self), standard_buffers(other)) else {
                bail!("taking over a batch row: a cache holds positions but no buffers");
            };
            k.narrow(0, row, 1)?.slice_set(&ok.narrow(2, 0, n)?.contiguous()?, 2, self.offset - n)?;
            v.narrow(0, row, 1)?.slice_set(&ov.narrow(2, 0, n)?.contiguous()?, 2, self.offset - n)?;
        }
        self.set_row_start(row, self.offset - n);
        Ok(())
    }

    /// Whether the cache can join a batch ([`KvCache::merge`]) and give rows back
    /// ([`KvCache::extract_row`]): plain storage (neither rotating nor quantized) or a
    /// recurrent state.
    pub fn is_batchable(&self) -> bool {
        matches!(self.store, Store::Standard(_) | Store::Arrays(_))
    }

    /// Rows in the cache (1 for an empty one).
    fn rows(&self) -> Result<usize> {
        let keys = match &self.store {
            Store::Standard(s) => s.buffers().map(|(k, _)| k),
            Store::Rotating(r) => r.buffers().map(|(k, _)| k),
            Store::Quantized(_) => None,
            Store::Arrays(a) => return Ok(a.rows().or(self.left_padding.as_ref().map(|p| p.len())).unwrap_or(1)),
        };
        Ok(match (keys, &self.left_padding) {
            (Some(k), _) => k.dim(0)?,
            (None, Some(p)) => p.len(),
            (None, None) => 1,
        })
    }

    /// Row `row` of a (left-padded) batch as a cache of its own holding only that row's
    /// positions, in new storage (writing to either cache never changes the other).
    pub fn extract_row(&self, row: usize) -> Result<KvCache> {
        if !self.is_batchable() {
            bail!("only a plain KV cache can give a batch row back (this one is rotating or quantized)");
        }
        let pad = self.left_padding.as_ref().map_or(0, |p| p[row]);
        let n = self.offset - pad;
        if let Store::Arrays(a) = &self.store {
            return Ok(Self::with(Store::Arrays(a.extract_row(row)?), n));
        }
        let Some((k, v)) = standard_buffers(self) else { return Ok(Self::new()) };
        let take = |t: &Tensor| -> Result<Option<Tensor>> {
            Ok(Some(t.narrow(0, row, 1)?.narrow(2, pad, n)?.force_contiguous()?))
        };
        Ok(Self::with(Store::Standard(Standard { keys: take(k)?, values: take(v)? }), n))
    }

    /// One left-padded batch of the rows of `parts` (in order), each part plain: a part
    /// holding fewer positions than the longest gets padding before its rows, so that every row
    /// computes what it would alone (see [`crate::engine::batch`]).
    pub fn merge(parts: &[KvCache]) -> Result<KvCache> {
        if parts.iter().any(|p| !p.is_batchable()) {
            bail!("only plain KV caches can be batched (not rotating or quantized ones)");
        }
        if let [one] = parts {
            return Ok(one.clone());
        }
        let total = parts.iter().map(|p| p.offset).max().unwrap_or(0);
        let mut padding = Vec::new();
        for p in parts {
            let add = total - p.offset;
            match &p.left_padding {
                Some(own) => padding.extend(own.iter().map(|x| x + add)),
                None => padding.extend(std::iter::repeat_n(add, p.rows()?)),
            }
        }
        if parts.iter().all(|p| p.is_arrays()) {
            let states = parts
                .iter()
                .map(|p| match &p.store {
                    Store::Arrays(a) => Ok((a, p.rows()?)),
                    _ => bail!("a recurrent state batched with an attention layer's cache"),
                })
                .collect::<Result<Vec<_>>>()?;
            let store = Store::Arrays(super::Arrays::merge(&states)?);
            return Ok(Self { left_padding: Some(padding.into()), ..Self::with(store, total) });
        }
        if parts.iter().any(|p| p.is_arrays()) {
            bail!("a recurrent state batched with an attention layer's cache");
        }
        let mut merged =
            Self { left_padding: Some(padding.into()), ..Self::with(Store::Standard(Standard::default()), total) };
        let Some(proto) = parts.iter().find_map(standard_buffers) else {
            return Ok(merged);
        };
        // room for the next CACHE_STEP positions, so that the decode steps after a join do not
        // grow (copy) the merged buffer again at once
        let capacity = (total + 1).next_multiple_of(CACHE_STEP);
        let side = |pick: for<'t> fn((&'t Tensor, &'t Tensor)) -> &'t Tensor, like: &Tensor| -> Result<Tensor> {
            let (_, h, _, d) = like.dims4()?;
            let mut rows = Vec::with_capacity(parts.len());
            for p in parts {
                let b = p.rows()?;
                let mut seq = Vec::with_capacity(3);
                if p.offset < total {
                    seq.push(Tensor::zeros((b, h, total - p.offset, d), like.dtype(), like.device())?);
                }
                if let Some(t) = standard_buffers(p).map(pick).filter(|_| p.offset > 0) {
                    seq.push(t.narrow(2, 0, p.offset)?);
                }
                seq.push(Tensor::zeros((b, h, capacity - total, d), like.dtype(), like.device())?);
                rows.push(Tensor::cat(&seq, 2)?);
            }
            Ok(Tensor::cat(&rows, 0)?.contiguous()?)
        };
        let store = Standard { keys: Some(side(|(k, _)| k, proto.0)?), values: Some(side(|(_, v)| v, proto.1)?) };
        merged.store = Store::Standard(store);
        Ok(merged)
    }

    /// Drops the padding every row of a batch has (rows that left may have needed it), and the
    /// padding record once no row has any.
    pub fn drop_common_padding(&mut self) -> Result<()> {
        let Some(p) = &self.left_padding else { return Ok(()) };
        let m = p.iter().copied().min().unwrap_or(0);
        if m > 0 && self.is_batchable() {
            let n = self.offset - m;
            if let Store::Standard(s) = &mut self.store {
                if let Some((k, v)) = s.buffers() {
                    // the unused tail is kept: the next steps write there without growing
                    let cap = k.dim(2)?;
                    let cut = |t: &Tensor| -> Result<Option<Tensor>> {
                        Ok(Some(t.narrow(2, m, cap - m)?.force_contiguous()?))
                    };
                    (s.keys, s.values) = (cut(k)?, cut(v)?);
                }
            }
            self.offset = n;
            self.left_padding = Some(p.iter().map(|x| x - m).collect());
        }
        if self.left_padding.as_ref().is_some_and(|p| p.iter().all(|&x| x == 0)) {
            self.left_padding = None;
        }
        Ok(())
    }
}

/// The buffers of a standard cache.
fn standard_buffers(c: &KvCache) -> Option<(&Tensor, &Tensor)> {
    c.standard().and_then(Standard::buffers)
}
