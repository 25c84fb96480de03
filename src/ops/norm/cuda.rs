//! The residual add + RMSNorm kernel on CUDA (norm.cu).

use crate::backend::cuda::{by_dtype, contiguous_view, cuda_only_op3, dtype_suffix, function, Launch, Module};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, WrapErr};
use candle_core::{Layout, Result, Shape, WithDType};

/// The residual add and the RMSNorm after it in one launch (norm.cu): inputs x and r
/// (the same shape, last dimension d) and the norm's weight (d); the output stacks
/// `rms_norm(x + r) * w` (index 0, so that it starts at offset 0, as the matmul kernels take it)
/// and `x + r` (index 1) along a new first dimension. Both equal candle's separate `badd` and
/// `rmsnorm` bit for bit.
pub struct AddRmsNorm {
    pub eps: f32,
}

/// The largest last dimension [`AddRmsNorm`] takes (1,024 threads, 8 columns each).
pub const ADD_RMS_NORM_MAX_DIM: usize = 8192;

cuda_only_op3!(
    AddRmsNorm,
    "add-rms-norm",
    "the fused residual add and RMSNorm runs on CUDA only",
    |op, (xs, xl), r, w| {
        let dev = xs.device().clone();
        let out = by_dtype!(xs.dtype(), "add + RMSNorm", dev, add_rms_norm_typed(&dev, op.eps, (xs, xl), r, w));
        let mut dims = vec![2];
        dims.extend_from_slice(xl.shape().dims());
        Ok((out, Shape::from(dims)))
    }
);

fn add_rms_norm_typed<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    eps: f32,
    (xs, xl): (&CudaStorage, &Layout),
    (rs, rl): (&CudaStorage, &Layout),
    (ws, wl): (&CudaStorage, &Layout),
) -> Result<CudaSlice<T>> {
    let d = xl.shape().dims().last().copied().unwrap_or(0);
    let rows = xl.shape().elem_count() / d.max(1);
    if rl.shape() != xl.shape() || wl.shape().dims() != [d] || d == 0 || d > ADD_RMS_NORM_MAX_DIM {
        candle_core::bail!(
            "add + RMSNorm: x {:?}, r {:?} and weight {:?} do not fit (last dimension 1..={ADD_RMS_NORM_MAX_DIM})",
            xl.shape(),
            rl.shape(),
            wl.shape()
        );
    }
    let view = |s, l, what: &str| contiguous_view::<T>(s, l, &format!("add + RMSNorm: {what}"));
    let (x, r, w) = (view(xs, xl, "x")?, view(rs, rl, "r")?, view(ws, wl, "the weight")?);
    let out = unsafe { dev.alloc::<T>(2 * rows * d)? };
    let tn = dtype_suffix(T::DTYPE, "add + RMSNorm")?;
    // candle's rmsnorm block sizes, so that the sums come out in the same order
    let (name, threads) = if d < 1024 {
        (format!("wick_add_rms_norm_small_{tn}"), 32)
    } else {
        (format!("wick_add_rms_norm_{tn}"), 1024)
    };
    let f = function(dev, Module::Norm, &name)?;
    let d_i = d as i32;
    let stream = dev.cuda_stream();
    let mut lb = Launch::new(&stream, &f);
    let (n, h) = (out.slice(0..rows * d), out.slice(rows * d..));
    lb.arg(&x).arg(&r).arg(&w).arg(&n).arg(&h).arg(&d_i).arg(&eps);
    let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
    unsafe { lb.launch(cfg) }.w()?;
    Ok(out)
}
