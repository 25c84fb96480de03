//! The quantized matmul op `y = x · dequant(W)ᵀ` as a candle `CustomOp1` on `x` (the weight is
//! frozen and travels inside the op). Backends sit side by side: `cpu_fwd` runs our CPU kernels
//! (`cpu.rs`), `cuda_fwd` our CUDA kernels (`cuda.rs`, source in `affine.cu`);
//! `metal_fwd` our Metal kernels (`metal.rs`, source in `affine.metal`). The backward pass
//! gives the gradient with respect to `x` (for LoRA on quantized models).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod fp;
#[cfg(feature = "cuda")]
pub mod fp_cuda;
#[cfg(any(feature = "cuda", feature = "metal"))]
mod fp_gpu;
#[cfg(feature = "metal")]
pub mod fp_metal;
#[cfg(feature = "metal")]
pub mod metal;
mod weight;

pub use fp::FpWeight;
pub use weight::QuantizedWeight;

#[cfg(any(feature = "cuda", feature = "metal"))]
use crate::backend::GpuStorage;

use crate::backend::cpu::{matmul_f32, Elem};
use crate::quant::QuantParams;
use anyhow::Result;
use candle_core::{backend::BackendStorage, CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use cpu::AffineRows;
use half::{bf16, f16};

struct QMatMul {
    w: QuantizedWeight,
}

/// The contiguous CPU data of a weight part, borrowed from its storage guard.
pub(crate) fn cpu_data<'a, T: candle_core::WithDType>(
    st: &'a candle_core::Storage,
    l: &Layout,
) -> candle_core::Result<&'a [T]> {
    let cpu = match st {
        candle_core::Storage::Cpu(c) => c,
        _ => candle_core::bail!("quantized weight is not on the CPU"),
    };
    let (a, b) =
        l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("quantized weight is not contiguous".into()))?;
    Ok(&cpu.as_slice::<T>()?[a..b])
}

fn to_f32<T: Elem>(x: &[T]) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    T::to_f32_slice(x, &mut out);
    out
}

fn run<S: Elem>(w: &QuantizedWeight, packed: &[u32], scales: &[S], biases: &[S], xs: &[f32], m: usize) -> Vec<f32> {
    let rows = AffineRows { packed, scales, biases, n: w.out_dim, k: w.in_dim, p: w.params };
    matmul_f32(&rows, xs, m)
}

impl QMatMul {
    /// Fails unless the input's last axis is the weight's input size.
    fn check_features(&self, l: &Layout) -> candle_core::Result<()> {
        let k = *l.shape().dims().last().unwrap_or(&0);
        if k != self.w.in_dim {
            candle_core::bail!("quantized matmul: input has {k} features, the weight expects {}", self.w.in_dim);
        }
        Ok(())
    }

    /// [`Self::check_features`], and the GPU kernels' input dtype: the scales'.
    #[cfg(any(feature = "cuda", feature = "metal"))]
    fn check_gpu_input(&self, l: &Layout, dtype: DType, backend: &str) -> candle_core::Result<()> {
        self.check_features(l)?;
        if dtype != self.w.scales.dtype() {
            candle_core::bail!(
                "quantized matmul on {backend}: input dtype {dtype:?} differs from the scales' {:?}",
                self.w.scales.dtype()
            );
        }
        Ok(())
    }
}

impl CustomOp1 for QMatMul {
    fn name(&self) -> &'static str {
        "affine-quantized-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.check_features(l)?;
        let m = l.shape().elem_count() / self.w.in_dim.max(1);
        let xs = cpu_input(s, l)?;
        let (pst, pl) = self.w.packed.storage_and_layout();
        let (sst, sl) = self.w.scales.storage_and_layout();
        let (bst, bl) = self.w.biases.storage_and_layout();
        let packed: &[u32] = cpu_data(&pst, pl)?;
        let y = match self.w.scales.dtype() {
            DType::F32 => run::<f32>(&self.w, packed, cpu_data(&sst, sl)?, cpu_data(&bst, bl)?, &xs, m),
            DType::F16 => run::<f16>(&self.w, packed, cpu_data(&sst, sl)?, cpu_data(&bst, bl)?, &xs, m),
            DType::BF16 => run::<bf16>(&self.w, packed, cpu_data(&sst, sl)?, cpu_data(&bst, bl)?, &xs, m),
            d => candle_core::bail!("quantized matmul: scales of dtype {d:?} are not supported"),
        };
        Ok(cpu_output(y, s.dtype(), l, self.w.out_dim))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.check_gpu_input(l, s.dtype(), "CUDA")?;
        with_parts(&self.w, |parts| cuda::qmv(s, l, parts))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s: &candle_core::MetalStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, Shape)> {
        self.check_gpu_input(l, s.dtype(), "Metal")?;
        with_parts(&self.w, |parts| metal::qmm(s, l, parts))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let w = self.w.dequantize().map_err(candle_core::Error::wrap)?;
        Ok(Some(input_grad(grad_res, &w)?))
    }
}

/// The contiguous input of a CPU quantized matmul as f32 values.
pub(crate) fn cpu_input(s: &CpuStorage, l: &Layout) -> candle_core::Result<Vec<f32>> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("quantized matmul needs a contiguous input".into()))?;
    Ok(match s {
        CpuStorage::F32(v) => v[start..end].to_vec(),
        CpuStorage::F16(v) => to_f32(&v[start..end]),
        CpuStorage::BF16(v) => to_f32(&v[start..end]),
        _ => candle_core::bail!("quantized matmul: input must be f32, f16 or bf16"),
    })
}

/// A CPU quantized matmul's f32 result `y` as storage of the input's `dtype`, shaped as the
/// input (layout `l`) with `n` outputs in the last axis.
pub(crate) fn cpu_output(y: Vec<f32>, dtype: DType, l: &Layout, n: usize) -> (CpuStorage, Shape) {
    let mut dims = l.shape().dims().to_vec();
    *dims.last_mut().expect("a matmul input has a feature axis") = n;
    let storage = match dtype {
        DType::F32 => CpuStorage::F32(y),
        DType::F16 => CpuStorage::F16(y.iter().map(|&v| f16::from_f32(v)).collect()),
        _ => CpuStorage::BF16(y.iter().map(|&v| bf16::from_f32(v)).collect()),
    };
    (storage, Shape::from(dims))
}

/// The gradient of `x Wᵀ` with respect to `x`: `dL/dy · W` for the dense `W` (out × in),
/// shaped as `x`.
pub(crate) fn input_grad(grad_res: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let w = w.to_dtype(grad_res.dtype())?;
    let mut dims = grad_res.dims().to_vec();
    let n = *dims.last().expect("a matmul output has a feature axis");
    let gx = grad_res.reshape((grad_res.elem_count() / n, n))?.matmul(&w)?;
    *dims.last_mut().expect("a matmul output has a feature axis") = w.dim(1)?;
    gx.reshape(dims)
}

/// The three parts of a quantized weight on one GPU device (storage `S`: CUDA or Metal), with
/// its shape (`n` rows of `k`): what the GPU kernels take.
#[cfg(any(feature = "cuda", feature = "metal"))]
pub struct WeightParts<'a, S> {
    pub packed: &'a S,
    pub packed_layout: &'a Layout,
    pub scales: &'a S,
    pub scales_layout: &'a Layout,
    pub biases: &'a S,
    pub biases_layout: &'a Layout,
    pub n: usize,
    pub k: usize,
    pub p: QuantParams,
}

/// The storage guards of one weight on a GPU device, held while a kernel is launched.
#[cfg(any(feature = "cuda", feature = "metal"))]
pub(crate) fn with_parts<S: GpuStorage, R>(
    w: &QuantizedWeight,
    f: impl FnOnce(&WeightParts<S>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (pst, pl) = w.packed.storage_and_layout();
    let (sst, sl) = w.scales.storage_and_layout();
    let (bst, bl) = w.biases.storage_and_layout();
    fn part<'a, S: GpuStorage>(st: &'a candle_core::Storage, what: &str) -> candle_core::Result<&'a S> {
        S::of(st).ok_or_else(|| {
            let b = S::BACKEND;
            candle_core::Error::Msg(format!("quantized matmul on {b}: the weight's {what} is not on the {b} device"))
        })
    }
    let parts = WeightParts {
        packed: part(&pst, "packed codes")?,
        packed_layout: pl,
        scales: part(&sst, "scales")?,
        scales_layout: sl,
        biases: part(&bst, "biases")?,
        biases_layout: bl,
        n: w.out_dim,
        k: w.in_dim,
        p: w.params,
    };
    f(&parts)
}

/// An input the GPU kernels take: in the scales' dtype (the model's), contiguous from offset 0
/// of its storage, so that their 16-byte loads are aligned.
#[cfg(any(feature = "cuda", feature = "metal"))]
pub(crate) fn kernel_input(x: &Tensor, dtype: DType) -> Result<Tensor> {
    let x = x.to_dtype(dtype)?;
    // (`copy` would keep the layout, offset included: a narrowed row needs its own storage)
    Ok(if x.is_contiguous() && x.layout().start_offset() == 0 { x } else { x.force_contiguous()? })
}

/// `mx.dequantize` as an op on (packed, scales, biases) for the GPU backends; the CPU path is
/// `affine::dequantize_tensor`'s own loop.
#[cfg(any(feature = "cuda", feature = "metal"))]
pub(crate) struct Dequantize {
    pub p: QuantParams,
}

#[cfg(any(feature = "cuda", feature = "metal"))]
impl Dequantize {
    /// (rows, columns) of the dense matrix that packed codes of layout `pl` hold.
    fn dims(&self, pl: &Layout) -> (usize, usize) {
        let width = *pl.shape().dims().last().unwrap_or(&0);
        (pl.shape().elem_count() / width.max(1), width * 32 / self.p.bits)
    }

    fn out_shape(&self, pl: &Layout) -> Shape {
        let mut dims = pl.shape().dims().to_vec();
        *dims.last_mut().expect("a matrix") = self.dims(pl).1;
        Shape::from(dims)
    }

    /// The op's three arguments as one weight.
    fn parts<'a, S>(
        &self,
        (packed, packed_layout): (&'a S, &'a Layout),
        (scales, scales_layout): (&'a S, &'a Layout),
        (biases, biases_layout): (&'a S, &'a Layout),
    ) -> WeightParts<'a, S> {
        let (n, k) = self.dims(packed_layout);
        WeightParts { packed, packed_layout, scales, scales_layout, biases, biases_layout, n, k, p: self.p }
    }
}

#[cfg(any(feature = "cuda", feature = "metal"))]
impl candle_core::CustomOp3 for Dequantize {
    fn name(&self) -> &'static str {
        "affine-dequantize"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("affine-dequantize op: on the CPU use quant::dequantize_tensor")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        packed: &candle_core::CudaStorage,
        pl: &Layout,
        scales: &candle_core::CudaStorage,
        sl: &Layout,
        biases: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let parts = self.parts((packed, pl), (scales, sl), (biases, bl));
        let out = cuda::dequantize(packed.device(), &parts, scales.dtype())?;
        Ok((out, self.out_shape(pl)))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        packed: &candle_core::MetalStorage,
        pl: &Layout,
        scales: &candle_core::MetalStorage,
        sl: &Layout,
        biases: &candle_core::MetalStorage,
        bl: &Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, Shape)> {
        let parts = self.parts((packed, pl), (scales, sl), (biases, bl));
        let out = metal::dequantize(packed.device(), &parts, scales.dtype())?;
        Ok((out, self.out_shape(pl)))
    }
}

/// `x Wᵀ` for a quantized `W`, `x` of shape (…, in).
pub fn quantized_matmul(x: &Tensor, w: &QuantizedWeight) -> Result<Tensor> {
    if x.device().is_cpu() {
        let x = x.contiguous()?;
        return Ok(x.apply_op1(QMatMul { w: w.clone() })?);
    }
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        let xin = kernel_input(x, w.scales.dtype())?;
        let m = xin.elem_count() / w.in_dim.max(1);
        let y = if m <= cuda::DECODE_PATH_ROWS {
            xin.apply_op1(QMatMul { w: w.clone() })?
        } else {
            crate::ops::dense_matmul::dense_matmul(&xin, &w.dequantize()?)?
        };
        return Ok(y.to_dtype(x.dtype())?);
    }
    #[cfg(feature = "metal")]
    if x.device().is_metal() {
        let xin = x.to_dtype(w.scales.dtype())?.contiguous()?;
        return Ok(xin.apply_op1(QMatMul { w: w.clone() })?.to_dtype(x.dtype())?);
    }
    let dense = w.dequantize()?.to_dtype(x.dtype())?;
    crate::ops::dense_matmul::dense_matmul(x, &dense)
}

#[cfg(feature = "cuda")]
mod fused;
#[cfg(feature = "cuda")]
pub use fused::{deferred_norm, fused_qkv, fused_qkv_deferred, fused_swiglu, fused_swiglu_deferred};

/// Without CUDA there is no fused decode kernel: the separate matmuls run.
#[cfg(not(feature = "cuda"))]
pub fn fused_qkv(
    _x: &Tensor,
    _q: &QuantizedWeight,
    _k: &QuantizedWeight,
    _v: &QuantizedWeight,
) -> Result<Option<[Tensor; 3]>> {
    Ok(None)
}

/// Without CUDA there is no fused decode kernel: the separate matmuls run.
#[cfg(not(feature = "cuda"))]
pub fn fused_swiglu(_x: &Tensor, _gate: &QuantizedWeight, _up: &QuantizedWeight) -> Result<Option<Tensor>> {
    Ok(None)
}

/// Without CUDA the norm is never deferred: the matmul and the norm run as they are.
#[cfg(not(feature = "cuda"))]
pub fn deferred_norm(
    _x: &Tensor,
    _w: &QuantizedWeight,
    _r: &Tensor,
    _norm_weight: &Tensor,
    _next: &[&QuantizedWeight],
) -> Result<Option<Tensor>> {
    Ok(None)
}

/// Without CUDA no deferred-norm carrier exists ([`deferred_norm`] gives none).
#[cfg(not(feature = "cuda"))]
pub fn fused_qkv_deferred(
    _carrier: &Tensor,
    _eps: f32,
    _lead: &[usize],
    _q: &QuantizedWeight,
    _k: &QuantizedWeight,
    _v: &QuantizedWeight,
) -> Result<[Tensor; 3]> {
    anyhow::bail!("deferred norms run on CUDA only")
}

/// Without CUDA no deferred-norm carrier exists ([`deferred_norm`] gives none).
#[cfg(not(feature = "cuda"))]
pub fn fused_swiglu_deferred(
    _carrier: &Tensor,
    _eps: f32,
    _lead: &[usize],
    _gate: &QuantizedWeight,
    _up: &QuantizedWeight,
) -> Result<Tensor> {
    anyhow::bail!("deferred norms run on CUDA only")
}

/// Tensor-level dequantization as `mx.dequantize`: the result has the scales' dtype.
pub fn dequantize_tensor(
    packed: &candle_core::Tensor,
    scales: &candle_core::Tensor,
    biases: &candle_core::Tensor,
    p: QuantParams,
) -> Result<candle_core::Tensor> {
    use candle_core::{DType, Tensor};
    let (lead, width) = crate::quant::affine::split_last(packed.dims())?;
    #[cfg(any(feature = "cuda", feature = "metal"))]
    if packed.device().is_cuda() || packed.device().is_metal() {
        let op = Dequantize { p };
        return Ok(packed.contiguous()?.apply_op3_no_bwd(&scales.contiguous()?, &biases.contiguous()?, &op)?);
    }
    let rows = lead.iter().product();
    let cols = width * 32 / p.bits;
    let dtype = scales.dtype();
    let pk: Vec<u32> = packed.flatten_all()?.to_vec1()?;
    let s: Vec<f32> = scales.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let b: Vec<f32> = biases.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let out =
        crate::quant::affine::dequantize_rounded(&pk, &s, &b, rows, cols, p, crate::quant::affine::rounding(dtype));
    Ok(Tensor::from_vec(out, [lead.as_slice(), &[cols]].concat(), packed.device())?.to_dtype(dtype)?)
}
