//! Norms: the residual add and the RMSNorm after it in one launch (CUDA); elsewhere the model
//! runs candle's add and `rms_norm`, which give the same values.

#[cfg(feature = "cuda")]
pub mod cuda;

use anyhow::Result;
use candle_core::Tensor;

/// `(x + r, rms_norm(x + r) · w)` in one kernel where the backend has one (CUDA: same dtypes,
/// same shapes, at most `cuda::ADD_RMS_NORM_MAX_DIM` features; the same values as candle's add
/// and `rms_norm`, bit for bit); `None`: run the add and the norm separately. Inference only
/// (no backward).
pub fn fused_add_rms_norm(x: &Tensor, r: &Tensor, w: &Tensor, eps: f32) -> Result<Option<(Tensor, Tensor)>> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda()
        && x.dtype() == r.dtype()
        && x.dtype() == w.dtype()
        && x.shape() == r.shape()
        && x.dim(candle_core::D::Minus1)? <= cuda::ADD_RMS_NORM_MAX_DIM
    {
        let both = x.contiguous()?.apply_op3_no_bwd(&r.contiguous()?, &w.contiguous()?, &cuda::AddRmsNorm { eps })?;
        return Ok(Some((both.get(1)?, both.get(0)?)));
    }
    let _ = (x, r, w, eps);
    Ok(None)
}
