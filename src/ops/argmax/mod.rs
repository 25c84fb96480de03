//! Greedy decoding's argmax on the device (a CUDA graph's last kernel); the host's rule is
//! `crate::engine::sample::argmax`.

#[cfg(feature = "cuda")]
pub mod cuda;
