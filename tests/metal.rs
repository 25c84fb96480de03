//! Metal backend (built with `--features metal` on a Mac; see docs/metal.md). Where no Metal
//! device exists — any build without the feature, a Mac without Metal support — each test
//! prints why it is skipped and passes. The checks are the CUDA backend's (tests/common/gpu.rs):
//! - the quantized-matmul kernels against dequantize-then-matmul in f32 over random shapes,
//!   every bits × group size, f32/f16/bf16 activations, decode (≤ 8 rows) and prefill rows;
//! - the dequantize kernel bit-exact with the CPU's (which is bit-exact with `mx.dequantize`);
//! - the float modes (mxfp4, nvfp4 with and without a global scale, mxfp8): the decode and
//!   gathered kernels against the CPU's matmul, the dequantize kernel bit-exact with the CPU's;
//! - the default model's greedy tokens (f32) equal mlx_lm's goldens, and so do its 4-bit
//!   conversion's;
//! - training: LoRA / DoRA / full fine-tuning gradients equal mlx_lm's (with and without
//!   gradient checkpointing).
//!
//! These tests have never run: this project has no Mac. On one:
//! `cargo test --release --features metal --test metal -- --nocapture`.

mod common;

use candle_core::Device;
use common::gpu;

fn metal() -> Option<Device> {
    gpu::device("metal")
}

#[test]
fn metal_quantized_matmul_matches_dequantize_then_matmul() {
    let Some(dev) = metal() else { return };
    gpu::quantized_matmul_matches_dequantize_then_matmul(&dev);
}

#[test]
fn metal_dequantize_is_bit_exact_with_the_cpu() {
    let Some(dev) = metal() else { return };
    gpu::dequantize_is_bit_exact_with_the_cpu(&dev);
}

#[test]
fn metal_greedy_tokens_equal_mlx_lm_goldens_in_f32() {
    let Some(dev) = metal() else { return };
    gpu::greedy_tokens_equal_mlx_lm_goldens_in_f32(&dev);
}

#[test]
fn metal_4bit_greedy_tokens_match_mlx_lm() {
    let Some(dev) = metal() else { return };
    gpu::greedy_4bit_tokens_match_mlx_lm(&dev);
}

#[test]
fn metal_lora_gradients_match_mlx_lm() {
    let Some(dev) = metal() else { return };
    common::lora_gradients_match_mlx_lm(&dev);
}

/// The float modes (mxfp4, nvfp4 with and without a global scale, mxfp8) on Metal, the CUDA
/// backend's checks (tests/cuda.rs) against the same CPU references: the decode and gathered
/// kernels (`wick_fpmv_*`, `wick_gfpmv_*`) against the CPU's matmul, the dequantize kernel
/// (`wick_fp_dequant_*`) bit-exact with the CPU's (which is bit-exact with `mx.dequantize`).
#[cfg(feature = "metal")]
mod fp {
    use super::{gpu, metal};

    const METAL_FP: gpu::FpBackend = gpu::FpBackend {
        matmul: wick::ops::qmatmul::fp_metal::matmul,
        dequantize: wick::ops::qmatmul::fp_metal::dequantize,
        gather_rows: wick::ops::qmatmul::fp_metal::gather_rows,
    };

    #[test]
    fn metal_fp_matmul_matches_the_cpu() {
        let Some(dev) = metal() else { return };
        gpu::fp_matmul_matches_the_cpu(&dev, &METAL_FP);
    }

    #[test]
    fn metal_fp_dequantize_is_bit_exact_with_the_cpu() {
        let Some(dev) = metal() else { return };
        gpu::fp_dequantize_is_bit_exact_with_the_cpu(&dev, &METAL_FP);
    }

    #[test]
    fn metal_fp_gathered_matmul_matches_each_routed_rows_matmul() {
        let Some(dev) = metal() else { return };
        gpu::fp_gathered_matmul_matches_each_routed_rows_matmul(&dev, &METAL_FP);
    }
}
