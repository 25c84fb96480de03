//! The gathered matmuls of mixture-of-experts layers (mlx's `gather_mm` / `gather_qmm`): row `i`
//! of the input is multiplied by the weight of expert `ids[i]`, one of a stack of `E` weights
//! (`E × out × in`, dense or affine-quantized). Rows are grouped by expert first
//! ([`Routing`]), so each chosen expert's weight is read once per call however many rows chose
//! it, and experts no row chose are not read at all.
//!
//! Every backend runs the grouping on the host (the expert ids are read back once per layer)
//! and one matmul per chosen expert with the plain matmul ops; on the CPU the weights of one
//! expert are a view into the stack, on GPUs (no gathered kernel yet) a copy of that expert.

use crate::ops::dense_matmul::dense_matmul;
use crate::ops::qmatmul::{Mxfp4Weight, QuantizedWeight};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// Rows grouped by the expert they chose: the order that sorts them by expert (stable: equal
/// experts keep their rows' order), the order that undoes it, and each expert's run of the
/// sorted rows.
#[derive(Debug, Clone)]
pub struct Routing {
    /// `sorted[j]`: the row at position `j` of the sorted order
    sorted: Vec<u32>,
    /// `unsort[i]`: the position of row `i` in the sorted order
    unsort: Tensor,
    /// (expert, first sorted position, rows)
    runs: Vec<(usize, usize, usize)>,
    rows: usize,
}

impl Routing {
    /// Groups the rows of `ids` (one expert id per row, u32, any shape, read in row-major
    /// order) among `experts` experts.
    pub fn new(ids: &Tensor, experts: usize) -> Result<Self> {
        let ids: Vec<u32> = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?;
        if let Some(&bad) = ids.iter().find(|&&e| e as usize >= experts) {
            bail!("expert id {bad} is out of range: the layer has {experts} experts");
        }
        let mut order: Vec<u32> = (0..ids.len() as u32).collect();
        order.sort_by_key(|&r| ids[r as usize]);
        let mut unsort = vec![0u32; ids.len()];
        for (j, &r) in order.iter().enumerate() {
            unsort[r as usize] = j as u32;
        }
        let mut runs: Vec<(usize, usize, usize)> = vec![];
        for (j, &r) in order.iter().enumerate() {
            let e = ids[r as usize] as usize;
            match runs.last_mut() {
                Some((last, _, n)) if *last == e => *n += 1,
                _ => runs.push((e, j, 1)),
            }
        }
        let dev = candle_core::Device::Cpu;
        let rows = ids.len();
        Ok(Self { sorted: order, unsort: Tensor::new(unsort, &dev)?, runs, rows })
    }

    /// The rows of `x` (rows × …) in expert order; row `j` of the result is row
    /// `sorted[j] / repeat` of `x` (each row of `x` stands for `repeat` consecutive routed rows:
    /// a token and its `k` chosen experts).
    pub fn sort(&self, x: &Tensor, repeat: usize) -> Result<Tensor> {
        let idx: Vec<u32> = self.sorted.iter().map(|&r| r / repeat.max(1) as u32).collect();
        Ok(x.index_select(&Tensor::new(idx, x.device())?, 0)?)
    }

    /// Row `e_j` of `t` (experts × …) for each sorted row `j`: per-expert values (biases) laid
    /// out along the sorted rows.
    pub fn per_row(&self, t: &Tensor) -> Result<Tensor> {
        let idx: Vec<u32> = self.runs.iter().flat_map(|&(e, _, n)| std::iter::repeat_n(e as u32, n)).collect();
        Ok(t.index_select(&Tensor::new(idx, t.device())?, 0)?)
    }

    /// Rows in expert order back in the ids' order.
    pub fn unsort(&self, y: &Tensor) -> Result<Tensor> {
        Ok(y.index_select(&self.unsort.to_device(y.device())?, 0)?)
    }

    /// `f(expert, rows)` for each expert's run of the sorted rows `x`, concatenated.
    fn per_expert(&self, x: &Tensor, f: impl Fn(usize, &Tensor) -> Result<Tensor>) -> Result<Tensor> {
        if x.dim(0)? != self.rows {
            bail!("gathered matmul: {} rows for a routing of {}", x.dim(0)?, self.rows);
        }
        let parts = self.runs.iter().map(|&(e, start, n)| f(e, &x.narrow(0, start, n)?)).collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }
}

/// The stacked weights of `E` experts: dense (`E × out × in`) or affine-quantized (each part
/// with a leading expert axis).
#[derive(Debug, Clone)]
pub enum ExpertWeights {
    Dense(Tensor),
    Quantized(QuantizedWeight),
    Mxfp4(Mxfp4Weight),
}

impl ExpertWeights {
    /// `x_j W_{e_j}ᵀ` for the sorted rows `x` (rows × in) of `routing`; in sorted order.
    pub fn gather_matmul(&self, x: &Tensor, routing: &Routing) -> Result<Tensor> {
        match self {
            Self::Dense(w) => routing.per_expert(x, |e, rows| dense_matmul(rows, &w.get(e)?)),
            Self::Quantized(w) => routing.per_expert(x, |e, rows| expert(w, e)?.matmul(rows)),
            Self::Mxfp4(w) => routing.per_expert(x, |e, rows| mxfp4_expert(w, e)?.matmul(rows)),
        }
    }
}

/// Expert `e` of a stacked `mxfp4` weight: views of its packed rows and scales.
pub fn mxfp4_expert(w: &Mxfp4Weight, e: usize) -> Result<Mxfp4Weight> {
    Ok(Mxfp4Weight { packed: w.packed.get(e)?, scales: w.scales.get(e)?, ..w.clone() })
}

/// Expert `e` of a stacked quantized weight: views of its packed rows, scales and biases on the
/// CPU; on other devices copies (their kernels read a weight from the start of its buffer).
pub fn expert(w: &QuantizedWeight, e: usize) -> Result<QuantizedWeight> {
    let part = |t: &Tensor| -> Result<Tensor> {
        let v = t.get(e)?;
        Ok(if v.device().is_cpu() { v } else { v.force_contiguous()? })
    };
    Ok(QuantizedWeight { packed: part(&w.packed)?, scales: part(&w.scales)?, biases: part(&w.biases)?, ..w.clone() })
}
