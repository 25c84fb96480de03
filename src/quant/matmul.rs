//! The quantized matmul op `y = x · dequant(W)ᵀ` as a candle `CustomOp1` on `x` (the weight is
//! frozen and travels inside the op). Backends sit side by side: `cpu_fwd` runs our CPU kernels
//! (`quant::cpu`), `cuda_fwd` our CUDA kernels (`quant::cuda`, source in `quant/cuda/affine.cu`);
//! Metal dequantizes and uses the device's matmul until its kernels land. The backward pass
//! gives the gradient with respect to `x` (for LoRA on quantized models).

use super::cpu::AffineRows;
use super::weight::QuantizedWeight;
use crate::kernels::{matmul_f32, Elem};
use anyhow::Result;
use candle_core::{backend::BackendStorage, CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use half::{bf16, f16};

struct QMatMul {
    w: QuantizedWeight,
}

/// The contiguous CPU data of a weight part, borrowed from its storage guard.
fn cpu_data<'a, T: candle_core::WithDType>(st: &'a candle_core::Storage, l: &Layout) -> candle_core::Result<&'a [T]> {
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
        let dims = l.shape().dims();
        self.check_features(l)?;
        let k = self.w.in_dim;
        let m = l.shape().elem_count() / k.max(1);
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("quantized matmul needs a contiguous input".into()))?;
        let xs: Vec<f32> = match s {
            CpuStorage::F32(v) => v[start..end].to_vec(),
            CpuStorage::F16(v) => to_f32(&v[start..end]),
            CpuStorage::BF16(v) => to_f32(&v[start..end]),
            _ => candle_core::bail!("quantized matmul: input must be f32, f16 or bf16"),
        };
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
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().unwrap() = self.w.out_dim;
        let storage = match s.dtype() {
            DType::F32 => CpuStorage::F32(y),
            DType::F16 => CpuStorage::F16(y.iter().map(|&v| f16::from_f32(v)).collect()),
            _ => CpuStorage::BF16(y.iter().map(|&v| bf16::from_f32(v)).collect()),
        };
        Ok((storage, Shape::from(out_dims)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.check_gpu_input(l, s.dtype(), "CUDA")?;
        with_parts(&self.w, |parts| super::cuda::qmv(s, l, parts))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s: &candle_core::MetalStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, Shape)> {
        self.check_gpu_input(l, s.dtype(), "Metal")?;
        with_parts(&self.w, |parts| super::metal::qmm(s, l, parts))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // dL/dx = dL/dy · W
        let w = self.w.dequantize().map_err(candle_core::Error::wrap)?.to_dtype(grad_res.dtype())?;
        let dims = grad_res.dims().to_vec();
        let n = *dims.last().unwrap();
        let rows = grad_res.elem_count() / n;
        let gx = grad_res.reshape((rows, n))?.matmul(&w)?;
        let mut out = dims;
        *out.last_mut().unwrap() = self.w.in_dim;
        Ok(Some(gx.reshape(out)?))
    }
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
    pub p: super::QuantParams,
}

/// A GPU backend's storage, as found inside a candle `Storage`.
#[cfg(any(feature = "cuda", feature = "metal"))]
pub(crate) trait GpuStorage: Sized {
    /// The backend's name in errors.
    const BACKEND: &'static str;
    fn of(st: &candle_core::Storage) -> Option<&Self>;
}

#[cfg(feature = "cuda")]
impl GpuStorage for candle_core::CudaStorage {
    const BACKEND: &'static str = "CUDA";
    fn of(st: &candle_core::Storage) -> Option<&Self> {
        match st {
            candle_core::Storage::Cuda(c) => Some(c),
            _ => None,
        }
    }
}

#[cfg(feature = "metal")]
impl GpuStorage for candle_core::MetalStorage {
    const BACKEND: &'static str = "Metal";
    fn of(st: &candle_core::Storage) -> Option<&Self> {
        match st {
            candle_core::Storage::Metal(m) => Some(m),
            _ => None,
        }
    }
}

/// The storage guards of one weight on a GPU device, held while a kernel is launched.
#[cfg(any(feature = "cuda", feature = "metal"))]
fn with_parts<S: GpuStorage, R>(
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

/// An input the CUDA kernels take: in the scales' dtype (the model's), contiguous from offset 0
/// of its storage, so that their 16-byte loads are aligned.
#[cfg(feature = "cuda")]
fn kernel_input(x: &Tensor, dtype: DType) -> Result<Tensor> {
    let x = x.to_dtype(dtype)?;
    // (`copy` would keep the layout, offset included: a narrowed row needs its own storage)
    Ok(if x.is_contiguous() && x.layout().start_offset() == 0 { x } else { x.force_contiguous()? })
}

/// `mx.dequantize` as an op on (packed, scales, biases) for the GPU backends; the CPU path is
/// `affine::dequantize_tensor`'s own loop.
#[cfg(any(feature = "cuda", feature = "metal"))]
pub(crate) struct Dequantize {
    pub p: super::QuantParams,
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
        let out = super::cuda::dequantize(packed.device(), &parts, scales.dtype())?;
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
        let out = super::metal::dequantize(packed.device(), &parts, scales.dtype())?;
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
        let y = if m <= super::cuda::DECODE_PATH_ROWS {
            xin.apply_op1(QMatMul { w: w.clone() })?
        } else {
            crate::nn::dense_matmul(&xin, &w.dequantize()?)?
        };
        return Ok(y.to_dtype(x.dtype())?);
    }
    #[cfg(feature = "metal")]
    if x.device().is_metal() {
        let xin = x.to_dtype(w.scales.dtype())?.contiguous()?;
        return Ok(xin.apply_op1(QMatMul { w: w.clone() })?.to_dtype(x.dtype())?);
    }
    let dense = w.dequantize()?.to_dtype(x.dtype())?;
    crate::nn::dense_matmul(x, &dense)
}

/// The fused decode ops of the CUDA backend (no CPU or backward: inference only).
#[cfg(feature = "cuda")]
mod fused {
    use super::*;
    use crate::quant::cuda;

    /// q/k/v of one input; `deferred`: the input is a deferred-norm carrier and this the
    /// norm's eps (see [`deferred_norm`]).
    struct Qmv3(pub [QuantizedWeight; 3], pub Option<f32>);

    impl CustomOp1 for Qmv3 {
        fn name(&self) -> &'static str {
            "affine-quantized-matmul-x3"
        }
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("affine-quantized-matmul-x3 runs on CUDA only")
        }
        fn cuda_fwd(
            &self,
            s: &candle_core::CudaStorage,
            l: &Layout,
        ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
            let [a, b, c] = &self.0;
            with_parts(a, |pa| {
                with_parts(b, |pb| {
                    with_parts(c, |pc| match self.1 {
                        Some(eps) => cuda::qmv3_deferred(s, l, [pa, pb, pc], eps),
                        None => cuda::qmv3(s, l, [pa, pb, pc]),
                    })
                })
            })
        }
    }

    /// gate/up of one input; `deferred` as [`Qmv3`]'s.
    struct QmvSwiGlu(pub QuantizedWeight, pub QuantizedWeight, pub Option<f32>);

    impl CustomOp1 for QmvSwiGlu {
        fn name(&self) -> &'static str {
            "affine-quantized-swiglu"
        }
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("affine-quantized-swiglu runs on CUDA only")
        }
        fn cuda_fwd(
            &self,
            s: &candle_core::CudaStorage,
            l: &Layout,
        ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
            with_parts(&self.0, |g| {
                with_parts(&self.1, |u| match self.2 {
                    Some(eps) => cuda::qmv_swiglu_deferred(s, l, g, u, eps),
                    None => cuda::qmv_swiglu(s, l, g, u),
                })
            })
        }
    }

    /// One row times `W` plus the residual, as a deferred-norm carrier ([`cuda::qm1_res`]):
    /// inputs x, the residual and the norm's weight.
    struct QmvRes(pub QuantizedWeight);

    crate::cuda::cuda_only_op3!(
        QmvRes,
        "affine-quantized-matmul-residual-norm",
        "affine-quantized-matmul-residual-norm runs on CUDA only",
        |op, x, r, nw| with_parts(&op.0, |w| cuda::qm1_res(x, w, r, nw))
    );

    /// Whether weights taking one input are of one family (same input size, bits, group size
    /// and scale dtype) and fit a fused kernel's shapes: three (q/k/v) of even output sizes, as
    /// the kernels pair rows within each projection, or two (gate/up) of the same output size.
    fn fused_weights(ws: &[&QuantizedWeight]) -> bool {
        let w0 = ws[0];
        let same =
            ws.iter().all(|w| w.in_dim == w0.in_dim && w.params == w0.params && w.scales.dtype() == w0.scales.dtype());
        let shapes = match ws {
            [_, _, _] => ws.iter().all(|w| w.out_dim % 2 == 0),
            [g, u] => g.out_dim == u.out_dim,
            _ => false,
        };
        same && shapes
    }

    /// The input of a fused decode kernel when one applies: `x` on CUDA with at most 8 rows,
    /// and weights that [`fused_weights`] takes with bits the fused kernels are built for.
    /// `None`: use the separate matmuls.
    fn fused_input(x: &Tensor, ws: &[&QuantizedWeight]) -> Result<Option<Tensor>> {
        let w0 = ws[0];
        if !x.device().is_cuda() || !fused_weights(ws) || !cuda::has_fused(w0.params) {
            return Ok(None);
        }
        if x.elem_count() / w0.in_dim.max(1) > cuda::DECODE_PATH_ROWS {
            return Ok(None);
        }
        Ok(Some(kernel_input(x, w0.scales.dtype())?))
    }

    /// `(x Qᵀ, x Kᵀ, x Vᵀ)` in one launch on CUDA for decode; `None` where no fused kernel applies.
    pub fn fused_qkv(
        x: &Tensor,
        q: &QuantizedWeight,
        k: &QuantizedWeight,
        v: &QuantizedWeight,
    ) -> Result<Option<[Tensor; 3]>> {
        let Some(xin) = fused_input(x, &[q, k, v])? else { return Ok(None) };
        let flat = xin.apply_op1_no_bwd(&Qmv3([q.clone(), k.clone(), v.clone()], None))?;
        Ok(Some(split_qkv(&flat, &x.dims()[..x.rank() - 1], [q, k, v], x.dtype())?))
    }

    /// A q/k/v kernel's flat output (all rows' q, then k, then v) as q, k and v, each shaped
    /// `lead` (the input's leading dimensions) × its outputs, in `dtype`.
    fn split_qkv(flat: &Tensor, lead: &[usize], qkv: [&QuantizedWeight; 3], dtype: DType) -> Result<[Tensor; 3]> {
        let m: usize = lead.iter().product();
        let mut at = 0;
        let mut part = |n: usize| -> Result<Tensor> {
            let t = flat.narrow(0, at, m * n)?.reshape([lead, &[n]].concat())?.to_dtype(dtype)?;
            at += m * n;
            Ok(t)
        };
        let [q, k, v] = qkv;
        Ok([part(q.out_dim)?, part(k.out_dim)?, part(v.out_dim)?])
    }

    /// `silu(x Gᵀ) · (x Uᵀ)` in one launch on CUDA for decode; `None` where no fused kernel applies.
    pub fn fused_swiglu(x: &Tensor, gate: &QuantizedWeight, up: &QuantizedWeight) -> Result<Option<Tensor>> {
        let Some(xin) = fused_input(x, &[gate, up])? else { return Ok(None) };
        let y = xin.apply_op1_no_bwd(&QmvSwiGlu(gate.clone(), up.clone(), None))?;
        Ok(Some(y.to_dtype(x.dtype())?))
    }

    /// The first half of the decode step's deferred RMSNorm on CUDA: `x Wᵀ + r` (`x` one row,
    /// `w` the o or down projection, `r` the residual) and what the next matmul needs to
    /// finish `rms_norm(x Wᵀ + r) · norm_weight` itself (see affine.cu `qm1_res_impl`): a flat
    /// carrier of 3·d values, u = h · norm_weight, then h, then the partial sums of h².
    /// `next`: the weights that will take the carrier ([`fused_qkv_deferred`]: three;
    /// [`fused_swiglu_deferred`]: two). `None` where the kernels do not apply (then run the
    /// matmul and the norm as before).
    pub fn deferred_norm(
        x: &Tensor,
        w: &QuantizedWeight,
        r: &Tensor,
        norm_weight: &Tensor,
        next: &[&QuantizedWeight],
    ) -> Result<Option<Tensor>> {
        let (dtype, d) = (w.scales.dtype(), w.out_dim);
        let Some(n0) = next.first() else { return Ok(None) };
        let inference = ![x, r, norm_weight].iter().any(|t| t.track_op());
        let fits = x.device().is_cuda()
            && inference
            && x.elem_count() == w.in_dim
            && r.elem_count() == d
            && norm_weight.dims() == [d]
            && [x.dtype(), r.dtype(), norm_weight.dtype()].iter().all(|&t| t == dtype)
            && fused_weights(next)
            && n0.in_dim == d
            && n0.scales.dtype() == dtype
            && cuda::deferred_norm_fits(dtype, w.params, w.in_dim, d, n0.params);
        if !fits {
            return Ok(None);
        }
        let (x, r, nw) = (kernel_input(x, dtype)?, r.contiguous()?, norm_weight.contiguous()?);
        Ok(Some(x.apply_op3_no_bwd(&r, &nw, &QmvRes(w.clone()))?))
    }

    /// q/k/v of a deferred-norm carrier ([`deferred_norm`], whose `next` they were), the norm's
    /// `eps` applied, each shaped `lead` (the norm input's leading dimensions) × its outputs.
    pub fn fused_qkv_deferred(
        carrier: &Tensor,
        eps: f32,
        lead: &[usize],
        q: &QuantizedWeight,
        k: &QuantizedWeight,
        v: &QuantizedWeight,
    ) -> Result<[Tensor; 3]> {
        let flat = carrier.apply_op1_no_bwd(&Qmv3([q.clone(), k.clone(), v.clone()], Some(eps)))?;
        split_qkv(&flat, lead, [q, k, v], carrier.dtype())
    }

    /// `silu(n Gᵀ) · (n Uᵀ)` of a deferred-norm carrier (n its norm), shaped `lead` × outputs.
    pub fn fused_swiglu_deferred(
        carrier: &Tensor,
        eps: f32,
        lead: &[usize],
        gate: &QuantizedWeight,
        up: &QuantizedWeight,
    ) -> Result<Tensor> {
        let y = carrier.apply_op1_no_bwd(&QmvSwiGlu(gate.clone(), up.clone(), Some(eps)))?;
        Ok(y.reshape([lead, &[gate.out_dim]].concat())?)
    }
}

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
