//! Norms: the residual add and the RMSNorm after it in one launch on CUDA.

#[cfg(feature = "cuda")]
pub mod cuda;
