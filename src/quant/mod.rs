//! MLX affine group quantization: the format (pack/unpack, quantize, dequantize — bit-exact
//! with `mx.quantize` / `mx.dequantize`), the config.json `quantization` block, and the
//! quantized weight used by `Linear` and `Embedding`.

pub mod affine;
pub mod config;
pub mod weight;

pub use affine::{dequantize, dequantize_tensor, pack, quantize, quantize_tensor, unpack, QuantParams};
pub use config::QuantSpec;
pub use weight::QuantizedWeight;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod matmul;
#[cfg(feature = "metal")]
pub mod metal;
