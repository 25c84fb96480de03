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

use crate::ops::attention::{write_at_device_pos, DevicePos, MaskSpec};
use crate::ops::qmatmul::dequantize_tensor;
use crate::quant::affine::{quantize_tensor, QuantParams};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use std::sync::Arc;

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

/// A quantized key or value buffer: packed codes, scales and biases, as `mx.quantize` returns.
#[derive(Debug, Clone)]
struct QuantBuf {
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
}

/// Keys and values quantized with the affine format (`--kv-bits`), as mlx_lm's
/// `QuantizedKVCache`: buffers grow in steps of 256 positions; attention sees them dequantized.
#[derive(Debug, Clone)]
struct QuantStore {
    params: QuantParams,
    keys: QuantBuf,
    values: QuantBuf,
    /// dtype of the keys and values the model passes in (and gets back)
    dtype: DType,
}

/// Keys and values of one attention layer, shape (B, kv_heads, capacity, head_dim).
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    keys: Option<Tensor>,
    values: Option<Tensor>,
    offset: usize,
    rotation: Option<Rotation>,
    quant: Option<QuantStore>,
    /// per batch row, the number of padding positions before its sequence
    left_padding: Option<Arc<[usize]>>,
    /// set while a decode step is captured into a CUDA graph: writes go to this device position
    graph_pos: Option<DevicePos>,
}

/// What a cache is, in mlx_lm's class names (prompt cache files record it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheKind {
    Standard,
    Rotating { max_size: usize, keep: usize },
    Quantized { bits: usize, group_size: usize },
}

impl CacheKind {
    pub fn class_name(&self) -> &'static str {
        match self {
            Self::Standard => "KVCache",
            Self::Rotating { .. } => "RotatingKVCache",
            Self::Quantized { .. } => "QuantizedKVCache",
        }
    }
}

/// The stored state of one layer's cache, as mlx_lm's `cache.state` holds it (prompt cache files).
#[derive(Debug, Clone)]
pub enum CacheState {
    Standard { keys: Tensor, values: Tensor, offset: usize },
    Rotating { keys: Tensor, values: Tensor, offset: usize, keep: usize, max_size: usize, idx: usize },
    Quantized { keys: [Tensor; 3], values: [Tensor; 3], offset: usize, group_size: usize, bits: usize },
}

/// `parts` concatenated along the sequence axis (2), as a contiguous tensor (decode steps write
/// into it in place).
fn cat2(parts: &[Tensor]) -> Result<Tensor> {
    let parts: Vec<&Tensor> = parts.iter().filter(|t| t.dim(2).is_ok_and(|n| n > 0)).collect();
    Ok(if parts.len() == 1 { parts[0].contiguous()? } else { Tensor::cat(&parts, 2)? })
}

/// Forgets the newest `n` positions of every layer's cache ([`KvCache::trim`]).
pub fn trim_all(cache: &mut [KvCache], n: usize) {
    for c in cache.iter_mut() {
        c.trim(n);
    }
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

    pub fn kind(&self) -> CacheKind {
        match (&self.quant, self.rotation) {
            (Some(q), _) => CacheKind::Quantized { bits: q.params.bits, group_size: q.params.group_size },
            (None, Some(r)) => CacheKind::Rotating { max_size: r.max_size, keep: r.keep },
            (None, None) => CacheKind::Standard,
        }
    }

    /// Whether nothing has been stored yet.
    pub fn is_empty(&self) -> bool {
        self.keys.is_none() && self.quant.is_none()
    }

    /// Per batch row, the padding positions before its sequence (None outside batches).
    pub fn left_padding(&self) -> Option<&Arc<[usize]>> {
        self.left_padding.as_ref()
    }

    /// Marks this (empty) cache as holding a left-padded batch.
    pub fn set_left_padding(&mut self, padding: Arc<[usize]>) {
        self.left_padding = Some(padding);
    }

    /// The mask for a forward pass of `l` new positions, given before the update.
    pub fn mask(&self, l: usize) -> MaskSpec {
        let left_padding = self.left_padding.clone();
        match self.rotation {
            Some(r) if l > 1 => {
                MaskSpec { offset: self.offset.min(r.max_size - 1), window: Some(r.max_size), left_padding, pos: None }
            }
            _ => MaskSpec { offset: self.offset, window: None, left_padding, pos: self.graph_pos.clone() },
        }
    }

    /// Whether [`KvCache::trim`] can drop the newest positions (mlx_lm's `is_trimmable`): always,
    /// except for a rotating cache that has started overwriting.
    pub fn is_trimmable(&self) -> bool {
        self.rotation.is_none_or(|r| self.offset < r.max_size)
    }

    /// Forgets the newest `n` positions (speculative decoding's rewind); returns how many were
    /// dropped.
    pub fn trim(&mut self, n: usize) -> usize {
        let n = n.min(self.offset);
        self.offset -= n;
        if let Some(r) = &mut self.rotation {
            r.idx -= n;
        }
        n
    }

    /// Switches a standard cache to affine-quantized storage (mlx_lm's `to_quantized`); a no-op
    /// when already quantized, and on an empty cache (the generation loop quantizes after each
    /// model call, once positions are stored).
    pub fn quantize(&mut self, params: QuantParams) -> Result<()> {
        if self.quant.is_some() {
            return Ok(());
        }
        if self.rotation.is_some() {
            bail!("--kv-bits: a rotating cache (--max-kv-size or a sliding-window layer) cannot be quantized");
        }
        let (Some(k), Some(v)) = (&self.keys, &self.values) else { return Ok(()) };
        let store = QuantStore {
            params,
            dtype: k.dtype(),
            keys: QuantBuf::quantize(k, params)?,
            values: QuantBuf::quantize(v, params)?,
        };
        (self.keys, self.values, self.quant) = (None, None, Some(store));
        Ok(())
    }

    /// Appends `k`, `v` (B, kv_heads, L, head_dim) and returns the keys and values to attend to.
    pub fn update_and_fetch(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        if self.quant.is_some() {
            return self.update_quantized(k, v);
        }
        match self.rotation {
            None => self.update_growing(k, v),
            Some(_) if k.dim(2)? == 1 => self.update_in_place(k, v),
            Some(_) => self.update_concat(k, v),
        }
    }

    fn update_growing(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        if self.offset == 0 && (k.track_op() || v.track_op()) {
            // training: keep the keys and values in the autograd graph (a buffer written with
            // slice_set would cut them off); a later step appends by growing a fresh buffer
            self.offset = k.dim(2)?;
            (self.keys, self.values) = (Some(k.clone()), Some(v.clone()));
            return Ok((k.clone(), v.clone()));
        }
        if let Some(pos) = &self.graph_pos {
            // a decode step being captured into a CUDA graph: written at the device position
            // (room reserved beforehand); attention sees the whole buffer up to that position
            let (Some(keys), Some(values)) = (&self.keys, &self.values) else {
                bail!("a captured decode step needs a filled cache");
            };
            write_at_device_pos(keys, k, &pos.pos)?;
            write_at_device_pos(values, v, &pos.pos)?;
            return Ok((keys.clone(), values.clone()));
        }
        let (b, h, l, dk) = k.dims4()?;
        let prev = self.offset;
        self.grow_for(l, (b, h, dk, v.dim(3)?), k.dtype(), k.device())?;
        let keys = self.keys.as_ref().expect("allocated above");
        let values = self.values.as_ref().expect("allocated above");
        keys.slice_set(&k.contiguous()?, 2, prev)?;
        values.slice_set(&v.contiguous()?, 2, prev)?;
        self.offset = prev + l;
        Ok((keys.narrow(2, 0, self.offset)?, values.narrow(2, 0, self.offset)?))
    }

    /// Grows the standard buffers by whole steps of 256 positions when `l` more do not fit.
    fn grow_for(
        &mut self,
        l: usize,
        (b, h, dk, dv): (usize, usize, usize, usize),
        dtype: DType,
        device: &candle_core::Device,
    ) -> Result<()> {
        let prev = self.offset;
        let capacity = self.keys.as_ref().map(|t| t.dim(2)).transpose()?.unwrap_or(0);
        if prev + l <= capacity {
            return Ok(());
        }
        let grow = l.div_ceil(CACHE_STEP) * CACHE_STEP;
        let new_k = Tensor::zeros((b, h, grow, dk), dtype, device)?;
        let new_v = Tensor::zeros((b, h, grow, dv), dtype, device)?;
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
        Ok(())
    }

    /// The key and value buffers a CUDA graph of the next decode step can be captured against:
    /// a filled standard cache of a sequence or a (left-padded) batch (not rotating, quantized
    /// or training), grown first when the next position does not fit. `None`: the step runs
    /// eagerly.
    pub fn graph_buffers(&mut self) -> Result<Option<(Tensor, Tensor)>> {
        if self.rotation.is_some() || self.quant.is_some() {
            return Ok(None);
        }
        let (Some(k), Some(v)) = (&self.keys, &self.values) else { return Ok(None) };
        if k.track_op() || v.track_op() {
            return Ok(None);
        }
        let (b, h, _, dk) = k.dims4()?;
        let (dtype, device) = (k.dtype(), k.device().clone());
        self.grow_for(1, (b, h, dk, v.dim(3)?), dtype, &device)?;
        Ok(self.keys.clone().zip(self.values.clone()))
    }

    /// The key and value buffers of a standard cache (all its capacity).
    pub fn buffers(&self) -> Option<(Tensor, Tensor)> {
        match (&self.keys, &self.values, &self.quant) {
            (Some(k), Some(v), None) => Some((k.clone(), v.clone())),
            _ => None,
        }
    }

    /// While a decode step is captured: write at `pos` on the device instead of at the offset.
    pub fn set_graph_pos(&mut self, pos: Option<DevicePos>) {
        self.graph_pos = pos;
    }

    /// After a replayed decode step wrote position `offset`: one more position stored.
    pub fn advance(&mut self) {
        self.offset += 1;
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

    fn update_concat(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut r = self.rotation.expect("rotating cache");
        let (k, v) = (k.contiguous()?, v.contiguous()?);
        match (&self.keys, &self.values) {
            (Some(ok), Some(ov)) => {
                let ok = self.temporal_order(ok, &r)?;
                let ov = self.temporal_order(ov, &r)?;
                // every new query must still see max_size keys: keep max_size - 1 old ones
                let trim = (ok.dim(2)? + 1).saturating_sub(r.max_size);
                self.keys = Some(Self::trim_buf(&ok, trim, r.keep, Some(&k))?);
                self.values = Some(Self::trim_buf(&ov, trim, r.keep, Some(&v))?);
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
            self.keys = Some(Self::trim_buf(self.keys.as_ref().expect("set"), trim, r.keep, None)?);
            self.values = Some(Self::trim_buf(self.values.as_ref().expect("set"), trim, r.keep, None)?);
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

    fn update_quantized(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let store = self.quant.as_mut().expect("quantized cache");
        let p = store.params;
        let (nk, nv) = (QuantBuf::quantize(k, p)?, QuantBuf::quantize(v, p)?);
        let prev = self.offset;
        let l = k.dim(2)?;
        let capacity = store.keys.packed.dim(2)?;
        if prev + l > capacity {
            let grow = l.div_ceil(CACHE_STEP) * CACHE_STEP;
            let extend = |old: &QuantBuf, new: &QuantBuf| -> Result<QuantBuf> {
                let mut parts = old.parts().into_iter().zip(new.parts()).map(|(o, n)| {
                    let mut shape = n.dims().to_vec();
                    shape[2] = grow;
                    let zeros = Tensor::zeros(shape, n.dtype(), n.device())?;
                    cat2(&[o.narrow(2, 0, prev)?, zeros])
                });
                Ok(QuantBuf {
                    packed: parts.next().expect("3 parts")?,
                    scales: parts.next().expect("3 parts")?,
                    biases: parts.next().expect("3 parts")?,
                })
            };
            store.keys = extend(&store.keys, &nk)?;
            store.values = extend(&store.values, &nv)?;
        }
        for (buf, new) in [(&store.keys, &nk), (&store.values, &nv)] {
            for (b, n) in buf.parts().into_iter().zip(new.parts()) {
                b.slice_set(n, 2, prev)?;
            }
        }
        self.offset = prev + l;
        let store = self.quant.as_ref().expect("quantized cache");
        let n = self.offset;
        let deq = |b: &QuantBuf| -> Result<Tensor> {
            let b = b.map(|t| Ok(t.narrow(2, 0, n)?))?;
            Ok(dequantize_tensor(&b.packed, &b.scales, &b.biases, store.params)?.to_dtype(store.dtype)?)
        };
        Ok((deq(&store.keys)?, deq(&store.values)?))
    }

    /// Keeps only the given batch rows (finished sequences leave a batch).
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        if self.is_empty() {
            return Ok(());
        }
        let dev = match (&self.keys, &self.quant) {
            (Some(k), _) => k.device().clone(),
            (None, Some(q)) => q.keys.packed.device().clone(),
            _ => return Ok(()),
        };
        let idx = Tensor::new(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), &dev)?;
        let pick = |t: &Tensor| -> Result<Tensor> { Ok(t.index_select(&idx, 0)?) };
        if let (Some(k), Some(v)) = (&self.keys, &self.values) {
            self.keys = Some(pick(k)?);
            self.values = Some(pick(v)?);
        }
        if let Some(q) = &mut self.quant {
            q.keys = q.keys.map(pick)?;
            q.values = q.values.map(pick)?;
        }
        if let Some(p) = &self.left_padding {
            self.left_padding = Some(rows.iter().map(|&r| p[r]).collect());
        }
        Ok(())
    }

    /// Whether the next position does not fit the buffers of a plain cache (the next update
    /// grows them).
    pub fn is_full(&self) -> bool {
        let cap = self.keys.as_ref().and_then(|k| k.dim(2).ok());
        self.is_batchable() && cap.is_some_and(|c| self.offset >= c)
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
        if n > 0 {
            let (Some(k), Some(v), Some(ok), Some(ov)) = (&self.keys, &self.values, &other.keys, &other.values) else {
                bail!("taking over a batch row: a cache holds positions but no buffers");
            };
            k.narrow(0, row, 1)?.slice_set(&ok.narrow(2, 0, n)?.contiguous()?, 2, self.offset - n)?;
            v.narrow(0, row, 1)?.slice_set(&ov.narrow(2, 0, n)?.contiguous()?, 2, self.offset - n)?;
        }
        self.set_row_start(row, self.offset - n);
        Ok(())
    }

    /// Whether the cache can join a batch ([`KvCache::merge`]) and give rows back
    /// ([`KvCache::extract_row`]): plain storage, neither rotating nor quantized.
    pub fn is_batchable(&self) -> bool {
        self.rotation.is_none() && self.quant.is_none()
    }

    /// Rows in the cache (1 for an empty one).
    fn rows(&self) -> Result<usize> {
        Ok(match (&self.keys, &self.left_padding) {
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
        let (Some(k), Some(v)) = (&self.keys, &self.values) else { return Ok(Self::new()) };
        let take = |t: &Tensor| -> Result<Option<Tensor>> {
            Ok(Some(t.narrow(0, row, 1)?.narrow(2, pad, n)?.force_contiguous()?))
        };
        Ok(Self { keys: take(k)?, values: take(v)?, offset: n, ..Self::new() })
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
        let mut merged = Self { offset: total, left_padding: Some(padding.into()), ..Self::new() };
        let Some(proto) = parts.iter().find_map(|p| p.keys.as_ref().zip(p.values.as_ref())) else {
            return Ok(merged);
        };
        // room for the next CACHE_STEP positions, so that the decode steps after a join do not
        // grow (copy) the merged buffer again at once
        let capacity = (total + 1).next_multiple_of(CACHE_STEP);
        let side = |pick: fn(&KvCache) -> Option<&Tensor>, like: &Tensor| -> Result<Tensor> {
            let (_, h, _, d) = like.dims4()?;
            let mut rows = Vec::with_capacity(parts.len());
            for p in parts {
                let b = p.rows()?;
                let mut seq = Vec::with_capacity(3);
                if p.offset < total {
                    seq.push(Tensor::zeros((b, h, total - p.offset, d), like.dtype(), like.device())?);
                }
                if let Some(t) = pick(p).filter(|_| p.offset > 0) {
                    seq.push(t.narrow(2, 0, p.offset)?);
                }
                seq.push(Tensor::zeros((b, h, capacity - total, d), like.dtype(), like.device())?);
                rows.push(Tensor::cat(&seq, 2)?);
            }
            Ok(Tensor::cat(&rows, 0)?.contiguous()?)
        };
        merged.keys = Some(side(|p| p.keys.as_ref(), proto.0)?);
        merged.values = Some(side(|p| p.values.as_ref(), proto.1)?);
        Ok(merged)
    }

    /// Drops the padding every row of a batch has (rows that left may have needed it), and the
    /// padding record once no row has any.
    pub fn drop_common_padding(&mut self) -> Result<()> {
        let Some(p) = &self.left_padding else { return Ok(()) };
        let m = p.iter().copied().min().unwrap_or(0);
        if m > 0 && self.is_batchable() {
            let n = self.offset - m;
            if let (Some(k), Some(v)) = (&self.keys, &self.values) {
                // the unused tail is kept: the next steps write there without growing
                let cap = k.dim(2)?;
                self.keys = Some(k.narrow(2, m, cap - m)?.force_contiguous()?);
                self.values = Some(v.narrow(2, m, cap - m)?.force_contiguous()?);
            }
            self.offset = n;
            self.left_padding = Some(p.iter().map(|x| x - m).collect());
        }
        if self.left_padding.as_ref().is_some_and(|p| p.iter().all(|&x| x == 0)) {
            self.left_padding = None;
        }
        Ok(())
    }

    /// The state mlx_lm's `cache.state` holds (for prompt cache files); `None` when empty.
    pub fn state(&self) -> Result<Option<CacheState>> {
        let offset = self.offset;
        if let Some(q) = &self.quant {
            let cut = |b: &QuantBuf| -> Result<[Tensor; 3]> {
                let b = b.map(|t| Ok(t.narrow(2, 0, offset)?))?;
                Ok([b.packed, b.scales, b.biases])
            };
            return Ok(Some(CacheState::Quantized {
                keys: cut(&q.keys)?,
                values: cut(&q.values)?,
                offset,
                group_size: q.params.group_size,
                bits: q.params.bits,
            }));
        }
        let (Some(k), Some(v)) = (&self.keys, &self.values) else { return Ok(None) };
        Ok(Some(match self.rotation {
            None => CacheState::Standard { keys: k.narrow(2, 0, offset)?, values: v.narrow(2, 0, offset)?, offset },
            Some(r) => CacheState::Rotating {
                keys: k.clone(),
                values: v.clone(),
                offset,
                keep: r.keep,
                max_size: r.max_size,
                idx: r.idx,
            },
        }))
    }

    /// A cache holding `state` (read from a prompt cache file), with keys and values in `dtype`.
    pub fn from_state(state: CacheState, dtype: DType) -> Result<Self> {
        let check = |k: &Tensor, v: &Tensor, need: usize, what: &str| -> Result<()> {
            if k.rank() != 4 || v.rank() != 4 || k.dim(2)? < need || v.dim(2)? < need {
                bail!("{what}: keys/values of shape {:?}/{:?} do not hold {need} positions", k.dims(), v.dims());
            }
            Ok(())
        };
        Ok(match state {
            CacheState::Standard { keys, values, offset } => {
                check(&keys, &values, offset, "KVCache")?;
                Self {
                    keys: Some(keys.narrow(2, 0, offset)?.to_dtype(dtype)?.contiguous()?),
                    values: Some(values.narrow(2, 0, offset)?.to_dtype(dtype)?.contiguous()?),
                    offset,
                    ..Self::default()
                }
            }
            CacheState::Rotating { keys, values, offset, keep, max_size, idx } => {
                check(&keys, &values, keys.dim(2)?.min(offset), "RotatingKVCache")?;
                if max_size <= keep || idx > keys.dim(2)? || keys.dim(2)? > max_size.max(offset) {
                    bail!("RotatingKVCache: inconsistent state (max_size {max_size}, keep {keep}, idx {idx})");
                }
                Self {
                    keys: Some(keys.to_dtype(dtype)?.contiguous()?),
                    values: Some(values.to_dtype(dtype)?.contiguous()?),
                    offset,
                    rotation: Some(Rotation { max_size, keep, idx }),
                    ..Self::default()
                }
            }
            CacheState::Quantized { keys, values, offset, group_size, bits } => {
                let params = QuantParams::new(bits, group_size, "QuantizedKVCache")?;
                check(&keys[0], &values[0], offset, "QuantizedKVCache")?;
                let buf = |[packed, scales, biases]: [Tensor; 3]| -> Result<QuantBuf> {
                    let n = |t: Tensor| -> Result<Tensor> { Ok(t.narrow(2, 0, offset)?.contiguous()?) };
                    Ok(QuantBuf { packed: n(packed)?, scales: n(scales)?, biases: n(biases)? })
                };
                Self {
                    quant: Some(QuantStore { params, keys: buf(keys)?, values: buf(values)?, dtype }),
                    offset,
                    ..Self::default()
                }
            }
        })
    }

    /// Drops everything stored.
    pub fn reset(&mut self) {
        let rotation = self.rotation.map(|r| Rotation { idx: 0, ..r });
        // back to plain storage: the generation loop quantizes again from --quantized-kv-start
        *self = Self { rotation, ..Self::default() };
    }
}
