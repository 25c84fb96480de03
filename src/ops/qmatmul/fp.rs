//! The quantized matmul of weights in mlx's float modes (`mxfp4`, `nvfp4`, `mxfp8`; the format
//! is `crate::quant::fp`): `y = x · dequant(W)ᵀ`. On the CPU each weight row is decoded to f32
//! once per call and dotted with the input rows (the decode and prefill drivers of
//! `crate::backend::cpu`); on CUDA the decode rows run in our kernels (`fp.cu`, launched by
//! `fp_cuda.rs`) and longer inputs through a dequantized copy and cuBLAS; on other devices the
//! weight is dequantized and multiplied densely.

use crate::backend::cpu::{matmul_f32, WeightRows};
use crate::quant::{fp, Mode};
use anyhow::{bail, Result};
use candle_core::{backend::BackendStorage, CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

/// A matrix (out × in), or a stack of them (… × out × in), in a float mode: `packed` u32
/// (… × out × in·bits/32), `scales` u8 (… × out × in/group); nvfp4's optional `global_scale`
/// (f32, one per matrix of the stack: shape `…`, or `()` for one matrix).
#[derive(Debug, Clone)]
pub struct FpWeight {
    pub mode: Mode,
    pub packed: Tensor,
    pub scales: Tensor,
    pub global_scale: Option<Tensor>,
    pub out_dim: usize,
    pub in_dim: usize,
}

impl FpWeight {
    /// The global scales as host values (one per matrix), if any.
    pub fn global_values(&self) -> Result<Option<Vec<f32>>> {
        self.global_scale.as_ref().map(|g| Ok(g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)).transpose()
    }

    /// The dense matrix (… × out × in) as `mx.dequantize(…, dtype)` gives it (f32 with a global
    /// scale), on the weight's device.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.packed.device().is_cuda() {
            return super::fp_cuda::dequantize(self, dtype);
        }
        #[cfg(feature = "metal")]
        if self.packed.device().is_metal() {
            return super::fp_metal::dequantize(self, dtype);
        }
        let g = self.global_values()?;
        let out = fp::dequantize_tensor(&self.packed, &self.scales, self.mode, dtype, g.as_deref())?;
        Ok(out.to_device(self.packed.device())?)
    }

    /// Matrix `e` of a stack: views of its packed rows, scales and global scale.
    pub fn get(&self, e: usize) -> Result<FpWeight> {
        Ok(FpWeight {
            packed: self.packed.get(e)?,
            scales: self.scales.get(e)?,
            global_scale: self.global_scale.as_ref().map(|g| g.get(e)).transpose()?,
            ..self.clone()
        })
    }

    /// The global scale factor `g / 2688` of a single matrix (1 without one).
    fn factor(&self) -> Result<f32> {
        Ok(match self.global_values()? {
            Some(g) if g.len() == 1 => g[0] / 2688.0,
            Some(g) => bail!("{} matmul: {} global scales for one matrix", self.mode, g.len()),
            None => 1.0,
        })
    }

    /// `x Wᵀ` for `x` of shape (…, in).
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        if x.dim(candle_core::D::Minus1)? != self.in_dim {
            bail!(
                "{} matmul: input has {} features, the weight expects {}",
                self.mode,
                x.dim(candle_core::D::Minus1)?,
                self.in_dim
            );
        }
        if x.device().is_cpu() {
            return Ok(x.contiguous()?.apply_op1(FpMatMul { w: self.clone(), factor: self.factor()? })?);
        }
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() && x.elem_count() / self.in_dim <= super::fp_cuda::DECODE_ROWS {
            return super::fp_cuda::matmul(x, self);
        }
        #[cfg(feature = "metal")]
        if x.device().is_metal() && x.elem_count() / self.in_dim <= super::fp_metal::DECODE_ROWS {
            return super::fp_metal::matmul(x, self);
        }
        crate::ops::dense_matmul::dense_matmul(x, &self.dequantize(x.dtype())?.to_dtype(x.dtype())?)
    }

    /// `(x Qᵀ, x Kᵀ, x Vᵀ)` in one launch where a fused kernel takes these weights (CUDA, one
    /// input row); `None`: run them one by one.
    pub fn fused_qkv(x: &Tensor, q: &FpWeight, k: &FpWeight, v: &FpWeight) -> Result<Option<[Tensor; 3]>> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            return super::fp_cuda::fused_qkv(x, q, k, v);
        }
        let _ = (x, q, k, v);
        Ok(None)
    }

    /// `silu(x Gᵀ) · (x Uᵀ)` in one launch where a fused kernel takes these weights (CUDA, one
    /// input row); `None`: run the projections and the activation separately.
    pub fn fused_swiglu(x: &Tensor, gate: &FpWeight, up: &FpWeight) -> Result<Option<Tensor>> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            return super::fp_cuda::fused_swiglu(x, gate, up);
        }
        let _ = (x, gate, up);
        Ok(None)
    }

    /// Rows `ids` of the dense matrix (an embedding lookup), in `dtype`.
    pub fn gather_rows(&self, ids: &Tensor, dtype: DType) -> Result<Tensor> {
        let sub = FpWeight {
            packed: self.packed.index_select(ids, 0)?,
            scales: self.scales.index_select(ids, 0)?,
            out_dim: ids.dim(0)?,
            ..self.clone()
        };
        Ok(sub.dequantize(dtype)?.to_dtype(dtype)?)
    }

    /// The weight re-quantized from a dense `w` of the same shape in the same mode (a fused
    /// adapter): (packed, scales, global scales) as stored.
    pub fn requantize(&self, w: &Tensor) -> Result<Vec<(&'static str, Tensor)>> {
        if self.global_scale.is_some() {
            let (p, s, g) = fp::quantize_experts_global(w)?;
            return Ok(vec![("weight", p), ("scales", s), ("global_scale", g)]);
        }
        let (p, s) = fp::quantize_tensor(w, self.mode, None)?;
        Ok(vec![("weight", p), ("scales", s)])
    }
}

/// The rows of a float-mode matrix for the CPU drivers.
struct FpRows<'a> {
    mode: Mode,
    packed: &'a [u32],
    scales: &'a [u8],
    factor: f32,
    n: usize,
    k: usize,
}

impl WeightRows for FpRows<'_> {
    fn n(&self) -> usize {
        self.n
    }
    fn k(&self) -> usize {
        self.k
    }
    type Prep = ();
    fn prepare(&self, _xs: &[f32], _m: usize) {}
    fn row_dots(&self, r: usize, xs: &[f32], m: usize, _prep: &(), scratch: &mut Vec<f32>, out: &mut [f32]) {
        let (k, mode) = (self.k, self.mode);
        let (words, groups) = (k / fp::per_word(mode), k / fp::group(mode));
        // the row's scales as f32, then per input row one pass over its codes
        scratch.clear();
        scratch
            .extend(self.scales[r * groups..(r + 1) * groups].iter().map(|&s| fp::scale_value(mode, s) * self.factor));
        let row = &self.packed[r * words..(r + 1) * words];
        let wpg = fp::group(mode) / fp::per_word(mode);
        for (i, o) in out.iter_mut().enumerate().take(m) {
            *o = crate::backend::cpu::simd::dot_fp_row(&xs[i * k..(i + 1) * k], row, scratch, wpg, mode == Mode::Mxfp8);
        }
    }
    fn rows_f32(&self, r0: usize, cnt: usize, dst: &mut [f32]) {
        let (k, words, groups) = (self.k, self.k / fp::per_word(self.mode), self.k / fp::group(self.mode));
        for (j, row) in dst.chunks_mut(k).enumerate().take(cnt) {
            let r = r0 + j;
            fp::decode_row(
                self.mode,
                &self.packed[r * words..(r + 1) * words],
                &self.scales[r * groups..(r + 1) * groups],
                self.factor,
                row,
            );
        }
    }
}

struct FpMatMul {
    w: FpWeight,
    factor: f32,
}

impl CustomOp1 for FpMatMul {
    fn name(&self) -> &'static str {
        "fp-quantized-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (k, n) = (self.w.in_dim, self.w.out_dim);
        let m = l.shape().elem_count() / k;
        let xs = super::cpu_input(s, l)?;
        let (pst, pl) = self.w.packed.storage_and_layout();
        let (sst, sl) = self.w.scales.storage_and_layout();
        let packed: &[u32] = super::cpu_data(&pst, pl)?;
        let scales: &[u8] = super::cpu_data(&sst, sl)?;
        let rows = FpRows { mode: self.w.mode, packed, scales, factor: self.factor, n, k };
        Ok(super::cpu_output(matmul_f32(&rows, &xs, m), s.dtype(), l, n))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let w = self.w.dequantize(grad_res.dtype()).map_err(candle_core::Error::wrap)?;
        Ok(Some(super::input_grad(grad_res, &w)?))
    }
}
