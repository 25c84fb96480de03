//! The gathered matmuls of mixture-of-experts layers (mlx's `gather_mm` / `gather_qmm`): row `i`
//! of the input is multiplied by the weight of expert `ids[i]`, one of a stack of `E` weights
//! (`E × out × in`, dense, affine-quantized or in a float mode). Two forms:
//! - grouped ([`Routing`], [`ExpertWeights::gather_matmul`]): the rows are grouped by expert
//!   on the host (the expert ids are read back once per layer), then one matmul per chosen
//!   expert with the plain matmul ops (its weights a view into the stack on the CPU, a copy on
//!   GPUs), so each chosen expert is read once per call and unchosen ones not at all. Prefill,
//!   and every backend without a gathered kernel, take it.
//! - on the device ([`ExpertWeights::gather_rows`]): routed row `r` reads expert `ids[r]`'s
//!   weights itself and the ids never leave the device (CUDA: `wick_gqm1*` / `wick_gqmv*`;
//!   dense weights: a gather of the chosen matrices and one batched matmul). Decode may take it
//!   ([`DEVICE_ROUTED_ROWS`], [`device_routing`]), so a decode step with experts is captured as
//!   a CUDA graph.

#[cfg(feature = "cuda")]
pub mod cuda;

use crate::ops::dense_matmul::dense_matmul;
use crate::ops::qmatmul::{FpWeight, QuantizedWeight};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};

/// Up to this many routed rows (tokens × chosen experts: a decode batch of 32 at top-8) the
/// device form runs; beyond it (prefill) each expert's weights are worth reading once for all
/// its rows. Below it a routed row re-reads an expert another row chose (at most rows / experts
/// times, mostly from L2).
pub const DEVICE_ROUTED_ROWS: usize = 256;

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
    Fp(FpWeight),
}

impl ExpertWeights {
    /// `x_j W_{e_j}ᵀ` for the sorted rows `x` (rows × in) of `routing`; in sorted order.
    pub fn gather_matmul(&self, x: &Tensor, routing: &Routing) -> Result<Tensor> {
        match self {
            Self::Dense(w) => routing.per_expert(x, |e, rows| dense_matmul(rows, &w.get(e)?)),
            Self::Quantized(w) => routing.per_expert(x, |e, rows| expert(w, e)?.matmul(rows)),
            Self::Fp(w) => routing.per_expert(x, |e, rows| w.get(e)?.matmul(rows)),
        }
    }
}

/// Up to this many routed rows a float-mode stack runs the gathered decode kernel on CUDA or
/// Metal (as many as a decode step routes on the device, so a captured step never groups on the
/// host); more rows (prefill) are grouped per expert, each expert's matmul reading its weight once.
#[cfg(any(feature = "cuda", feature = "metal"))]
const FP_GATHERED_ROWS: usize = DEVICE_ROUTED_ROWS;

/// Whether the device form may run in models: `WICK_MOE_DEVICE_ROUTING=0` groups every call's
/// rows on the host (and so keeps mixture-of-experts decode steps out of CUDA graphs), for
/// comparisons. Read once per process.
pub fn device_routing() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("WICK_MOE_DEVICE_ROUTING").map_or(true, |v| v != "0"))
}

impl ExpertWeights {
    /// Whether [`Self::gather_rows`] runs on the device alone (no expert id read back) for an
    /// input on `device`.
    pub fn routes_on_device(&self, device: &candle_core::Device) -> bool {
        if device.is_cuda() {
            self.routes_on_cuda()
        } else {
            device_routing()
                && !device.is_cpu()
                && match self {
                    Self::Dense(_) => true,
                    Self::Fp(_) => cfg!(feature = "metal") && device.is_metal(),
                    Self::Quantized(_) => false,
                }
        }
    }

    /// [`Self::routes_on_device`] for a CUDA device.
    pub fn routes_on_cuda(&self) -> bool {
        device_routing()
            && match self {
                Self::Dense(_) => true,
                Self::Quantized(_) => cfg!(feature = "cuda"),
                Self::Fp(_) => cfg!(feature = "cuda"),
            }
    }

    /// Routed row `r` of the result (rows × out) is row `r / xdiv` of `x` (rows / xdiv × in)
    /// times expert `ids[r]`'s weight: `ids` (u32, any shape) on `x`'s device. Where
    /// [`Self::routes_on_device`] says no, the rows are grouped on the host instead.
    pub fn gather_rows(&self, x: &Tensor, ids: &Tensor, xdiv: usize) -> Result<Tensor> {
        let ids = ids.flatten_all()?.to_dtype(DType::U32)?.contiguous()?;
        let rows = ids.dim(0)?;
        if x.dim(0)? * xdiv != rows {
            bail!("gathered matmul: {} input rows for {rows} routed rows ({xdiv} per input row)", x.dim(0)?);
        }
        match self {
            #[cfg(feature = "cuda")]
            Self::Quantized(w) if x.device().is_cuda() => gathered_qmm(x, &[w], &ids, xdiv),
            #[cfg(feature = "cuda")]
            Self::Fp(w) if x.device().is_cuda() && rows <= FP_GATHERED_ROWS => {
                crate::ops::qmatmul::fp_cuda::gather_rows(x, w, &ids, xdiv)
            }
            #[cfg(feature = "metal")]
            Self::Fp(w) if x.device().is_metal() && rows <= FP_GATHERED_ROWS => {
                crate::ops::qmatmul::fp_metal::gather_rows(x, w, &ids, xdiv)
            }
            Self::Dense(w) if !x.device().is_cpu() => {
                let xin = x.dim(D::Minus1)?;
                let xr = x.unsqueeze(1)?.broadcast_as((x.dim(0)?, xdiv, xin))?.reshape((rows, 1, xin))?;
                let ws = w.index_select(&ids, 0)?.transpose(1, 2)?;
                Ok(xr.matmul(&ws.to_dtype(x.dtype())?)?.squeeze(1)?)
            }
            _ => {
                let routing = Routing::new(&ids, self.experts()?)?;
                routing.unsort(&self.gather_matmul(&routing.sort(x, xdiv)?, &routing)?)
            }
        }
    }

    /// `silu(x·Gᵀ) · (x·Uᵀ)` of the gate and up stacks in one gathered launch where a kernel
    /// exists for them (quantized, on CUDA); None otherwise.
    pub fn gather_swiglu(gate: &Self, up: &Self, x: &Tensor, ids: &Tensor, xdiv: usize) -> Result<Option<Tensor>> {
        match (gate, up) {
            #[cfg(feature = "cuda")]
            (Self::Quantized(g), Self::Quantized(u)) if x.device().is_cuda() && g.params == u.params => {
                if !cuda::has_swiglu(g.scales.dtype(), g.params, g.in_dim) {
                    return Ok(None);
                }
                let ids = ids.flatten_all()?.to_dtype(DType::U32)?.contiguous()?;
                Ok(Some(gathered_qmm(x, &[g, u], &ids, xdiv)?))
            }
            _ => {
                let _ = (x, ids, xdiv);
                Ok(None)
            }
        }
    }

    /// The number of experts in the stack.
    fn experts(&self) -> Result<usize> {
        Ok(match self {
            Self::Dense(w) => w.dim(0)?,
            Self::Quantized(w) => w.packed.dim(0)?,
            Self::Fp(w) => w.packed.dim(0)?,
        })
    }
}

/// The gathered quantized matmul op on (x, ids): one weight, or gate and up fused with SiLU.
#[cfg(feature = "cuda")]
struct GatherQmm {
    ws: Vec<QuantizedWeight>,
    xdiv: usize,
}

#[cfg(feature = "cuda")]
impl candle_core::CustomOp2 for GatherQmm {
    fn name(&self) -> &'static str {
        "gathered-quantized-matmul"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        candle_core::bail!("gathered-quantized-matmul runs on CUDA only (the CPU groups rows on the host)")
    }

    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &candle_core::Layout,
        ids: &candle_core::CudaStorage,
        il: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        use crate::ops::qmatmul::with_parts;
        let ids = cuda::Ids { ids, layout: il, xdiv: self.xdiv };
        match self.ws.as_slice() {
            [w] => with_parts(w, |p| cuda::gathered((x, xl), &[p], &ids)),
            [g, u] => with_parts(g, |pg| with_parts(u, |pu| cuda::gathered((x, xl), &[pg, pu], &ids))),
            _ => candle_core::bail!("gathered-quantized-matmul: one weight, or gate and up"),
        }
    }
}

#[cfg(feature = "cuda")]
fn gathered_qmm(x: &Tensor, ws: &[&QuantizedWeight], ids: &Tensor, xdiv: usize) -> Result<Tensor> {
    let w = ws[0];
    if x.dim(D::Minus1)? != w.in_dim {
        bail!("gathered matmul: input has {} features, the experts expect {}", x.dim(D::Minus1)?, w.in_dim);
    }
    let xin = crate::ops::qmatmul::kernel_input(x, w.scales.dtype())?;
    let op = GatherQmm { ws: ws.iter().map(|w| (*w).clone()).collect(), xdiv };
    Ok(xin.apply_op2_no_bwd(ids, &op)?.to_dtype(x.dtype())?)
}

/// Expert `e` of a stacked quantized weight: views of its packed rows, scales and biases on the
/// CPU; on other devices copies (the CUDA kernels take views from a 16-byte aligned offset, but
/// until that has run on a GPU the copy stays).
pub fn expert(w: &QuantizedWeight, e: usize) -> Result<QuantizedWeight> {
    let part = |t: &Tensor| -> Result<Tensor> {
        let v = t.get(e)?;
        Ok(if v.device().is_cpu() { v } else { v.force_contiguous()? })
    };
    Ok(QuantizedWeight { packed: part(&w.packed)?, scales: part(&w.scales)?, biases: part(&w.biases)?, ..w.clone() })
}
