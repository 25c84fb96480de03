//! KV caches, one per attention layer: [`KvCache`] is the one interface the models, the engine
//! and the server use, over three stores, each its own type as in mlx_lm:
//!
//! - [`Standard`] (`standard.rs`, mlx_lm's `KVCache`): grows its buffers in steps of 256
//!   positions and writes new keys/values in place;
//! - [`Rotating`] (`rotating.rs`, `RotatingKVCache`; `--max-kv-size`, sliding-window layers):
//!   keeps at most `max_size` positions, the first `keep` plus the most recent ones;
//! - [`Quantized`] (`quantized.rs`, `QuantizedKVCache`; `--kv-bits`): affine-quantized keys and
//!   values, dequantized for attention;
//! - [`Arrays`] (`arrays.rs`, `ArraysCache`): not keys and values but a recurrent layer's state
//!   (convolution inputs, a recurrence's state), replaced whole at every call.
//!
//! What every store shares lives in [`KvCache`]: the positions seen, each batch row's left
//! padding, and the device position a CUDA graph's captured step writes at. A batch's row
//! operations (rows joining, leaving, given back: `rows.rs`) take standard caches. Prompt-cache
//! files keep mlx_lm's format ([`CacheState`]).

mod arrays;
mod quantized;
mod rotating;
mod rows;
mod standard;

pub use arrays::Arrays;
pub use quantized::Quantized;
pub use rotating::Rotating;
pub use standard::Standard;

use crate::ops::attention::{DevicePos, MaskSpec};
use crate::quant::affine::QuantParams;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use std::sync::Arc;

/// mlx_lm's growth step.
pub const CACHE_STEP: usize = 256;

/// Positions a rotating cache made for `--max-kv-size` always keeps (mlx_lm's `keep=4`).
pub const MAX_KV_KEEP: usize = 4;

/// Where one layer's keys and values are kept.
#[derive(Debug, Clone)]
enum Store {
    Standard(Standard),
    Rotating(Rotating),
    Quantized(Quantized),
    Arrays(Arrays),
}

/// The cache of one attention layer: its store and what every store shares.
#[derive(Debug, Clone)]
pub struct KvCache {
    store: Store,
    /// positions seen so far
    offset: usize,
    /// per batch row, the number of padding positions before its sequence
    left_padding: Option<Arc<[usize]>>,
    /// set while a decode step is captured into a CUDA graph: writes go to this device position
    graph_pos: Option<DevicePos>,
}

impl Default for KvCache {
    fn default() -> Self {
        Self::with(Store::Standard(Standard::default()), 0)
    }
}

/// What a cache is, in mlx_lm's class names (prompt cache files record it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheKind {
    Standard,
    Rotating { max_size: usize, keep: usize },
    Quantized { bits: usize, group_size: usize },
    Arrays { size: usize },
}

impl CacheKind {
    pub fn class_name(&self) -> &'static str {
        match self {
            Self::Standard => "KVCache",
            Self::Rotating { .. } => "RotatingKVCache",
            Self::Quantized { .. } => "QuantizedKVCache",
            Self::Arrays { .. } => "ArraysCache",
        }
    }
}

/// The stored state of one layer's cache, as mlx_lm's `cache.state` holds it (prompt cache files).
#[derive(Debug, Clone)]
pub enum CacheState {
    Standard {
        keys: Tensor,
        values: Tensor,
        offset: usize,
    },
    Rotating {
        keys: Tensor,
        values: Tensor,
        offset: usize,
        keep: usize,
        max_size: usize,
        idx: usize,
    },
    Quantized {
        keys: [Tensor; 3],
        values: [Tensor; 3],
        offset: usize,
        group_size: usize,
        bits: usize,
    },
    /// a recurrent layer's arrays (mlx_lm's file has no offset for them: the attention layers'
    /// is theirs)
    Arrays {
        arrays: Vec<Option<Tensor>>,
        offset: usize,
    },
}

/// `parts` concatenated along the sequence axis (2), as a contiguous tensor (decode steps write
/// into it in place).
pub(crate) fn cat2(parts: &[Tensor]) -> Result<Tensor> {
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
    fn with(store: Store, offset: usize) -> Self {
        Self { store, offset, left_padding: None, graph_pos: None }
    }

    /// An empty standard cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty cache that keeps at most `max_size` positions, the first `keep` among them.
    pub fn rotating(max_size: usize, keep: usize) -> Self {
        Self::with(Store::Rotating(Rotating::new(max_size, keep)), 0)
    }

    /// The empty state of a recurrent layer with `size` arrays (mlx_lm's `ArraysCache(size)`).
    pub fn arrays(size: usize) -> Self {
        Self::with(Store::Arrays(Arrays::new(size)), 0)
    }

    /// A recurrent layer's array `i`, once set.
    pub fn array(&self, i: usize) -> Option<&Tensor> {
        match &self.store {
            Store::Arrays(a) => a.get(i),
            _ => None,
        }
    }

    /// Sets a recurrent layer's array `i` (the state after its call).
    pub fn set_array(&mut self, i: usize, t: Tensor) -> Result<()> {
        match &mut self.store {
            Store::Arrays(a) => a.set(i, t),
            _ => bail!("a recurrent layer was given an attention layer's cache: the cache was made for another model"),
        }
    }

    /// After a recurrent layer's call on `n` new positions: `n` more positions seen.
    pub fn advance_by(&mut self, n: usize) {
        self.offset += n;
    }

    /// `x` (B, L, …), the next `L` positions' inputs of a recurrent layer, with the positions
    /// that are a row's left padding zeroed (mlx_lm's `create_ssm_mask`), so that they leave
    /// the state as it was; `x` as it is outside padded batches.
    pub fn zero_padding(&self, x: &Tensor) -> Result<Tensor> {
        let Some(pad) = &self.left_padding else { return Ok(x.clone()) };
        let (offset, l) = (self.offset, x.dim(1)?);
        if pad.iter().all(|&p| p <= offset) {
            return Ok(x.clone());
        }
        let keep: Vec<f32> =
            pad.iter().flat_map(|&p| (0..l).map(move |t| if offset + t >= p { 1.0 } else { 0.0 })).collect();
        let mut shape = vec![pad.len(), l];
        shape.extend(std::iter::repeat_n(1, x.rank() - 2));
        let keep = Tensor::from_vec(keep, shape, x.device())?.to_dtype(x.dtype())?;
        Ok(x.broadcast_mul(&keep)?)
    }

    /// Whether this is a recurrent layer's state ([`KvCache::arrays`]).
    pub fn is_arrays(&self) -> bool {
        matches!(self.store, Store::Arrays(_))
    }

    /// Number of positions seen so far (the position of the next token).
    pub fn offset(&self) -> usize {
        self.offset
    }

    pub fn kind(&self) -> CacheKind {
        match &self.store {
            Store::Standard(_) => CacheKind::Standard,
            Store::Rotating(r) => CacheKind::Rotating { max_size: r.max_size, keep: r.keep },
            Store::Quantized(q) => CacheKind::Quantized { bits: q.params.bits, group_size: q.params.group_size },
            Store::Arrays(a) => CacheKind::Arrays { size: a.size() },
        }
    }

    /// Bytes one more position takes in this cache, per batch row (keys and values, or their
    /// quantized parts; 0 for a recurrent layer's fixed-size state, or before anything is
    /// stored).
    pub fn bytes_per_position(&self) -> usize {
        let per = |ts: &[&Tensor]| -> usize {
            ts.iter()
                .map(|t| t.dims().iter().skip(3).product::<usize>() * t.dim(1).unwrap_or(0) * t.dtype().size_in_bytes())
                .sum()
        };
        match &self.store {
            Store::Standard(s) => s.buffers().map_or(0, |(k, v)| per(&[k, v])),
            Store::Rotating(r) => r.buffers().map_or(0, |(k, v)| per(&[k, v])),
            Store::Quantized(q) => per(&q.parts()),
            Store::Arrays(_) => 0,
        }
    }

    /// The standard store, when that is what this cache is.
    fn standard(&self) -> Option<&Standard> {
        match &self.store {
            Store::Standard(s) => Some(s),
            _ => None,
        }
    }

    /// Whether nothing has been stored yet.
    pub fn is_empty(&self) -> bool {
        match &self.store {
            Store::Standard(s) => s.buffers().is_none(),
            Store::Rotating(r) => r.buffers().is_none(),
            Store::Quantized(_) => false,
            Store::Arrays(a) => a.is_empty(),
        }
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
        match &self.store {
            Store::Rotating(r) if l > 1 => MaskSpec {
                offset: self.offset.min(r.max_size - 1),
                window: Some(r.max_size),
                chunk: None,
                left_padding,
                pos: None,
            },
            _ => MaskSpec { offset: self.offset, window: None, chunk: None, left_padding, pos: self.graph_pos.clone() },
        }
    }

    /// Whether [`KvCache::trim`] can drop the newest positions (mlx_lm's `is_trimmable`): always,
    /// except for a rotating cache that has started overwriting, and a recurrent state.
    pub fn is_trimmable(&self) -> bool {
        match &self.store {
            Store::Rotating(r) => self.offset < r.max_size,
            Store::Arrays(_) => false,
            _ => true,
        }
    }

    /// Forgets the newest `n` positions (speculative decoding's rewind); returns how many were
    /// dropped.
    pub fn trim(&mut self, n: usize) -> usize {
        if !self.is_trimmable() && matches!(self.store, Store::Arrays(_)) {
            return 0;
        }
        let n = n.min(self.offset);
        self.offset -= n;
        if let Store::Rotating(r) = &mut self.store {
            r.trim(n);
        }
        n
    }

    /// Switches a standard cache to affine-quantized storage (mlx_lm's `to_quantized`); a no-op
    /// when already quantized, and on an empty cache (the generation loop quantizes after each
    /// model call, once positions are stored).
    pub fn quantize(&mut self, params: QuantParams) -> Result<()> {
        let quantized = match &self.store {
            // a recurrent state stays as it is (mlx_lm quantizes KV caches only)
            Store::Quantized(_) | Store::Arrays(_) => return Ok(()),
            Store::Rotating(_) => {
                bail!("--kv-bits: a rotating cache (--max-kv-size or a sliding-window layer) cannot be quantized")
            }
            Store::Standard(s) => match s.buffers() {
                Some((k, v)) => Quantized::from_buffers(k, v, params)?,
                None => return Ok(()),
            },
        };
        self.store = Store::Quantized(quantized);
        Ok(())
    }

    /// Appends `k`, `v` (B, kv_heads, L, head_dim) and returns the keys and values to attend to.
    pub fn update_and_fetch(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (offset, l) = (self.offset, k.dim(2)?);
        let out = match &mut self.store {
            Store::Quantized(q) => q.update(offset, k, v)?,
            // a captured step's position advances when the graph replays it
            Store::Standard(s) if self.graph_pos.is_some() => return s.update(offset, k, v, self.graph_pos.as_ref()),
            Store::Standard(s) => s.update(offset, k, v, None)?,
            Store::Rotating(r) if l == 1 => r.update_in_place(offset, k, v)?,
            Store::Rotating(r) => r.update_concat(offset, k, v)?,
            Store::Arrays(_) => {
                bail!("an attention layer was given a recurrent layer's cache: the cache was made for another model")
            }
        };
        self.offset += l;
        Ok(out)
    }

    /// The key and value buffers a CUDA graph of the next decode step can be captured against:
    /// a filled standard cache of a sequence or a (left-padded) batch (not rotating, quantized
    /// or training), grown first when the next position does not fit. `None`: the step runs
    /// eagerly.
    pub fn graph_buffers(&mut self) -> Result<Option<(Tensor, Tensor)>> {
        let offset = self.offset;
        let Store::Standard(s) = &mut self.store else { return Ok(None) };
        let Some((k, v)) = s.buffers() else { return Ok(None) };
        if k.track_op() || v.track_op() {
            return Ok(None);
        }
        let (b, h, _, dk) = k.dims4()?;
        let (dv, dtype, device) = (v.dim(3)?, k.dtype(), k.device().clone());
        s.grow_for(offset, 1, (b, h, dk, dv), dtype, &device)?;
        Ok(s.buffers().map(|(k, v)| (k.clone(), v.clone())))
    }

    /// The key and value buffers of a standard cache (all its capacity).
    pub fn buffers(&self) -> Option<(Tensor, Tensor)> {
        self.standard()?.buffers().map(|(k, v)| (k.clone(), v.clone()))
    }

    /// While a decode step is captured: write at `pos` on the device instead of at the offset.
    pub fn set_graph_pos(&mut self, pos: Option<DevicePos>) {
        self.graph_pos = pos;
    }

    /// After a replayed decode step wrote position `offset`: one more position stored.
    pub fn advance(&mut self) {
        self.offset += 1;
    }

    /// Keeps only the given batch rows (finished sequences leave a batch).
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        if self.is_empty() {
            return Ok(());
        }
        let dev = match &self.store {
            Store::Standard(s) => s.buffers().map(|(k, _)| k.device().clone()),
            Store::Rotating(r) => r.buffers().map(|(k, _)| k.device().clone()),
            Store::Quantized(q) => Some(q.device().clone()),
            Store::Arrays(a) => a.slots.iter().flatten().next().map(|t| t.device().clone()),
        };
        let Some(dev) = dev else { return Ok(()) };
        let idx = Tensor::new(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), &dev)?;
        match &mut self.store {
            Store::Standard(s) => s.select_rows(&idx)?,
            Store::Rotating(r) => r.select_rows(&idx)?,
            Store::Quantized(q) => q.select_rows(&idx)?,
            Store::Arrays(a) => a.select_rows(&idx)?,
        }
        if let Some(p) = &self.left_padding {
            self.left_padding = Some(rows.iter().map(|&r| p[r]).collect());
        }
        Ok(())
    }

    /// The state mlx_lm's `cache.state` holds (for prompt cache files); `None` when empty.
    pub fn state(&self) -> Result<Option<CacheState>> {
        let offset = self.offset;
        Ok(match &self.store {
            Store::Quantized(q) => {
                let (keys, values) = q.state(offset)?;
                let (group_size, bits) = (q.params.group_size, q.params.bits);
                Some(CacheState::Quantized { keys, values, offset, group_size, bits })
            }
            Store::Standard(s) => match s.buffers() {
                Some((k, v)) => Some(CacheState::Standard {
                    keys: k.narrow(2, 0, offset)?,
                    values: v.narrow(2, 0, offset)?,
                    offset,
                }),
                None => None,
            },
            Store::Rotating(r) => r.state().map(|(keys, values, idx)| CacheState::Rotating {
                keys,
                values,
                offset,
                keep: r.keep,
                max_size: r.max_size,
                idx,
            }),
            Store::Arrays(a) => (!a.is_empty()).then(|| CacheState::Arrays { arrays: a.slots.clone(), offset }),
        })
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
                let store = Standard {
                    keys: Some(keys.narrow(2, 0, offset)?.to_dtype(dtype)?.contiguous()?),
                    values: Some(values.narrow(2, 0, offset)?.to_dtype(dtype)?.contiguous()?),
                };
                Self::with(Store::Standard(store), offset)
            }
            CacheState::Rotating { keys, values, offset, keep, max_size, idx } => {
                check(&keys, &values, keys.dim(2)?.min(offset), "RotatingKVCache")?;
                let store = Rotating::from_state((keys, values), (offset, keep, max_size, idx), dtype)?;
                Self::with(Store::Rotating(store), offset)
            }
            CacheState::Quantized { keys, values, offset, group_size, bits } => {
                let params = QuantParams::new(bits, group_size, "QuantizedKVCache")?;
                check(&keys[0], &values[0], offset, "QuantizedKVCache")?;
                Self::with(Store::Quantized(Quantized::from_state(keys, values, offset, params, dtype)?), offset)
            }
            // recurrent states keep their dtypes (a recurrence's state is f32 whatever the model's)
            CacheState::Arrays { arrays, offset } => Self::with(Store::Arrays(Arrays { slots: arrays }), offset),
        })
    }

    /// Drops everything stored.
    pub fn reset(&mut self) {
        // back to plain storage: the generation loop quantizes again from --quantized-kv-start
        *self = match &self.store {
            Store::Rotating(r) => Self::rotating(r.max_size, r.keep),
            Store::Arrays(a) => Self::arrays(a.size()),
            _ => Self::new(),
        };
    }
}
