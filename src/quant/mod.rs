//! MLX's quantization formats only: affine groups (pack/unpack, quantize, dequantize, bit-exact
//! with `mx.quantize` / `mx.dequantize`), the float modes `mxfp4` / `nvfp4` / `mxfp8` (`fp`), the
//! modes themselves, and the config.json `quantization` block. The quantized matmuls and the
//! quantized weights they take are the op `crate::ops::qmatmul`.

pub mod affine;
pub mod config;
pub mod fp;
pub mod mode;

pub use affine::{dequantize, pack, quantize, quantize_tensor, unpack, QuantParams};
pub use config::QuantSpec;
pub use mode::Mode;
