//! The SwiGLU kernel on CUDA (swiglu.cu).

use crate::backend::cuda::{by_dtype, contiguous_view, dtype_suffix, function, Launch, Module};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, WrapErr};
use candle_core::{DType, Layout, Result, Shape, WithDType};

/// `silu(g) · u` in one launch of `wick_swiglu_*` (norm.cu): f32 inside and rounded once, as the
/// fused gate/up matmuls of decode round it; for inputs [`SwiGlu::fits`] takes.
pub struct SwiGlu;

impl SwiGlu {
    /// Whether the kernel takes `g` and `u`: on CUDA, f16 or bf16 alike, one shape, contiguous
    /// from 16-byte boundaries, a multiple of 8 elements, no gradient to track.
    pub fn fits(g: &candle_core::Tensor, u: &candle_core::Tensor) -> bool {
        let aligned = |x: &candle_core::Tensor| {
            x.is_contiguous() && (x.layout().start_offset() * x.dtype().size_in_bytes()).is_multiple_of(16)
        };
        g.device().is_cuda()
            && matches!(g.dtype(), DType::F16 | DType::BF16)
            && u.dtype() == g.dtype()
            && g.shape() == u.shape()
            && g.elem_count().is_multiple_of(8)
            && !g.track_op()
            && !u.track_op()
            && aligned(g)
            && aligned(u)
    }
}

impl candle_core::CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("the fused SwiGLU runs on CUDA only")
    }

    fn cuda_fwd(&self, gs: &CudaStorage, gl: &Layout, us: &CudaStorage, ul: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = gs.device().clone();
        let out = by_dtype!(gs.dtype(), "SwiGLU", dev, swiglu_typed(&dev, (gs, gl), (us, ul)));
        Ok((out, gl.shape().clone()))
    }
}

fn swiglu_typed<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    (gs, gl): (&CudaStorage, &Layout),
    (us, ul): (&CudaStorage, &Layout),
) -> Result<CudaSlice<T>> {
    let n = gl.shape().elem_count();
    if T::DTYPE == DType::F32 || !n.is_multiple_of(8) || ul.shape() != gl.shape() {
        candle_core::bail!(
            "SwiGLU on CUDA: {:?} gate {:?} and up {:?} do not fit the kernel",
            T::DTYPE,
            gl.shape(),
            ul.shape()
        );
    }
    let g = contiguous_view::<T>(gs, gl, "SwiGLU: the gate")?;
    let u = contiguous_view::<T>(us, ul, "SwiGLU: the up projection")?;
    let out = unsafe { dev.alloc::<T>(n)? };
    let f = function(dev, Module::Swiglu, &format!("wick_swiglu_{}", dtype_suffix(T::DTYPE, "SwiGLU")?))?;
    let n_u = n as u64;
    let stream = dev.cuda_stream();
    let mut lb = Launch::new(&stream, &f);
    lb.arg(&g).arg(&u).arg(&out).arg(&n_u);
    let cfg =
        LaunchConfig { grid_dim: ((n / 8).div_ceil(256) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    unsafe { lb.launch(cfg) }.w()?;
    Ok(out)
}
