//! SwiGLU, `silu(gate) · up`.

#[cfg(feature = "cuda")]
pub mod cuda;

use anyhow::Result;
use candle_core::Tensor;

/// SwiGLU activation: `silu(gate) * up` (one kernel on CUDA in f16 / bf16 where
/// `cuda::SwiGlu` fits, rounded once).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if cuda::SwiGlu::fits(gate, up) {
        return Ok(gate.apply_op2_no_bwd(up, &cuda::SwiGlu)?);
    }
    Ok((candle_nn::ops::silu(gate)? * up)?)
}
