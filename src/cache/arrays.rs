//! The state store of a recurrent layer, as mlx_lm's `ArraysCache`: a fixed number of slots
//! (a convolution's last inputs, a recurrence's state), each empty until the layer's first
//! call, replaced whole at every call. It has no time axis: a batch's rows join and leave by
//! row, and nothing can be trimmed (mlx_lm's `is_trimmable` is false).

use anyhow::{bail, Result};
use candle_core::Tensor;

#[derive(Debug, Clone)]
pub struct Arrays {
    /// the layer's arrays, each (B, …); `None` until its first call
    pub(super) slots: Vec<Option<Tensor>>,
}

impl Arrays {
    pub fn new(size: usize) -> Self {
        Self { slots: vec![None; size] }
    }

    pub fn size(&self) -> usize {
        self.slots.len()
    }

    /// Whether the layer has not run yet (mlx_lm's `empty()`: the first slot is unset).
    pub fn is_empty(&self) -> bool {
        self.slots.first().is_none_or(|s| s.is_none())
    }

    /// Rows of the batch the state holds, where any slot is set.
    pub fn rows(&self) -> Option<usize> {
        self.slots.iter().flatten().next().and_then(|t| t.dim(0).ok())
    }

    pub fn get(&self, i: usize) -> Option<&Tensor> {
        self.slots.get(i).and_then(|s| s.as_ref())
    }

    pub fn set(&mut self, i: usize, t: Tensor) -> Result<()> {
        let n = self.slots.len();
        match self.slots.get_mut(i) {
            Some(s) => *s = Some(t),
            None => bail!("a recurrent layer's state has {n} arrays; there is no array {i}"),
        }
        Ok(())
    }

    /// Keeps the batch rows `idx` (u32 on the state's device) of every set slot.
    pub fn select_rows(&mut self, idx: &Tensor) -> Result<()> {
        for s in self.slots.iter_mut().flatten() {
            *s = s.index_select(&idx.to_device(s.device())?, 0)?;
        }
        Ok(())
    }

    /// Row `row` alone, in new storage.
    pub fn extract_row(&self, row: usize) -> Result<Self> {
        let slots = self.slots.iter().map(|s| s.as_ref().map(|t| t.narrow(0, row, 1)?.force_contiguous()).transpose());
        Ok(Self { slots: slots.collect::<candle_core::Result<_>>()? })
    }

    /// Row `row` of this batch takes `other`'s state (one row); a slot set on one side only
    /// takes zeros for the other.
    pub fn write_row(&mut self, row: usize, rows: usize, other: &Self) -> Result<()> {
        if other.size() != self.size() {
            bail!("a recurrent state of {} arrays cannot take one of {}", self.size(), other.size());
        }
        for (mine, theirs) in self.slots.iter_mut().zip(&other.slots) {
            match (mine.as_mut(), theirs) {
                (Some(m), Some(t)) => {
                    let parts = [m.narrow(0, 0, row)?, t.to_dtype(m.dtype())?, m.narrow(0, row + 1, rows - row - 1)?];
                    *m = Tensor::cat(&parts, 0)?;
                }
                (Some(m), None) => {
                    let z = m.narrow(0, row, 1)?.zeros_like()?;
                    let parts = [m.narrow(0, 0, row)?, z, m.narrow(0, row + 1, rows - row - 1)?];
                    *m = Tensor::cat(&parts, 0)?;
                }
                (None, Some(t)) => {
                    let mut dims = t.dims().to_vec();
                    dims[0] = rows;
                    let z = Tensor::zeros(dims, t.dtype(), t.device())?;
                    let parts = [z.narrow(0, 0, row)?, t.clone(), z.narrow(0, row + 1, rows - row - 1)?];
                    *mine = Some(Tensor::cat(&parts, 0)?);
                }
                (None, None) => {}
            }
        }
        Ok(())
    }

    /// The rows of `parts` (with their row counts) stacked in order; a slot unset in some part
    /// takes zeros there (mlx_lm's `merge`).
    pub fn merge(parts: &[(&Self, usize)]) -> Result<Self> {
        let size = parts.first().map_or(0, |(p, _)| p.size());
        if parts.iter().any(|(p, _)| p.size() != size) {
            bail!("recurrent states of different sizes cannot be batched");
        }
        let mut slots = Vec::with_capacity(size);
        for i in 0..size {
            let Some(proto) = parts.iter().find_map(|(p, _)| p.get(i)) else {
                slots.push(None);
                continue;
            };
            let rows = parts
                .iter()
                .map(|(p, n)| match p.get(i) {
                    Some(t) => Ok(t.to_dtype(proto.dtype())?),
                    None => {
                        let mut dims = proto.dims().to_vec();
                        dims[0] = *n;
                        Ok(Tensor::zeros(dims, proto.dtype(), proto.device())?)
                    }
                })
                .collect::<Result<Vec<_>>>()?;
            slots.push(Some(Tensor::cat(&rows, 0)?));
        }
        Ok(Self { slots })
    }
}
