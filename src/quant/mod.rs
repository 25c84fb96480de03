//! MLX's quantization formats only: affine groups (pack/unpack, quantize, dequantize, bit-exact
//! with `mx.quantize` / `mx.dequantize`), `mxfp4`, and the config.json `quantization` block. The quantized
//! matmul and the quantized weight it takes are the op `crate::ops::qmatmul`.

pub mod affine;
pub mod config;
pub mod mxfp4;

pub use affine::{dequantize, pack, quantize, quantize_tensor, unpack, QuantParams};
pub use config::QuantSpec;
