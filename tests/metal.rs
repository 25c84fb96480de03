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
    use candle_core::{DType, Device, Tensor};
    use gpu::{fp_bits, fp_to_dev, fp_tolerance, fp_weight, max_abs_diff, rel_err, FP_DECADES, FP_MODES};
    use rand::{Rng, SeedableRng};
    use wick::ops::qmatmul::{fp_metal, FpWeight};
    use wick::quant::Mode;

    /// The decode kernels against the CPU's `FpWeight::matmul` in f32 of the same inputs: f32 /
    /// f16 / bf16 activations, 1, 2, 3 and 8 input rows (and 11: two launches), shapes whose
    /// rows end mid-threadgroup and whose k is one chunk up to many per lane; inputs with a
    /// leading axis and narrowed from a larger tensor; one expert of a stack (a view at a nonzero
    /// offset of its storage), a weight at an offset that is not 16-byte aligned (copied), and
    /// nvfp4 rows of an odd number of groups (dequantized and multiplied densely); and
    /// `FpWeight::matmul` on Metal taking the kernel.
    #[test]
    fn metal_fp_matmul_matches_the_cpu() {
        let Some(dev) = metal() else { return };
        let mut rng = rand::rngs::StdRng::seed_from_u64(4242);
        let mut cases = 0;
        for (mode, global) in FP_MODES {
            for (n, k) in [(256, 512), (130, 2048), (96, 64), (7, 32), (33, 4128)] {
                let cw = fp_weight(mode, global, None, (n, k), FP_DECADES, &mut rng);
                let gw = fp_to_dev(&cw, &dev);
                for dtype in [DType::F32, DType::F16, DType::BF16] {
                    for m in [1, 2, 3, 8, 11] {
                        let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
                        let want = cw.matmul(&x.to_dtype(DType::F32).unwrap()).unwrap();
                        let got = fp_metal::matmul(&x.to_device(&dev).unwrap(), &gw).unwrap();
                        let what = format!("{mode} global {global} {dtype:?} n {n} k {k} m {m}");
                        assert_eq!(got.dtype(), dtype, "{what}");
                        assert_eq!(got.dims(), &[m, n], "{what}");
                        let e = rel_err(&got.to_device(&Device::Cpu).unwrap(), &want);
                        assert!(e < fp_tolerance(dtype), "{what}: relative error {e:e}");
                        cases += 1;
                    }
                    // (1, m, k), rows 1.. of a larger tensor (a storage offset)
                    let big = Tensor::randn(0f32, 1.0, (4, k), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
                    let x = big.narrow(0, 1, 3).unwrap().reshape((1, 3, k)).unwrap();
                    let want = cw.matmul(&x.to_dtype(DType::F32).unwrap()).unwrap();
                    let got = fp_metal::matmul(
                        &big.to_device(&dev).unwrap().narrow(0, 1, 3).unwrap().reshape((1, 3, k)).unwrap(),
                        &gw,
                    )
                    .unwrap();
                    assert_eq!(got.dims(), &[1, 3, n]);
                    let e = rel_err(&got.to_device(&Device::Cpu).unwrap(), &want);
                    assert!(e < fp_tolerance(dtype), "{mode} global {global} {dtype:?} n {n} k {k} narrowed: {e:e}");
                    // the weight's own matmul dispatches to the kernel on Metal
                    let x = Tensor::randn(0f32, 1.0, (2, k), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
                    let want = cw.matmul(&x.to_dtype(DType::F32).unwrap()).unwrap();
                    let got = gw.matmul(&x.to_device(&dev).unwrap()).unwrap();
                    let e = rel_err(&got.to_device(&Device::Cpu).unwrap(), &want);
                    assert!(e < fp_tolerance(dtype), "{mode} global {global} {dtype:?} FpWeight::matmul: {e:e}");
                }
            }
            if mode == Mode::Nvfp4 {
                // an odd number of nvfp4 groups per row: not whole chunks, dequantized and multiplied
                let (n, k) = (20, 80);
                let cw = fp_weight(mode, global, None, (n, k), FP_DECADES, &mut rng);
                let x = Tensor::randn(0f32, 1.0, (3, k), &Device::Cpu).unwrap();
                let got = fp_metal::matmul(&x.to_device(&dev).unwrap(), &fp_to_dev(&cw, &dev)).unwrap();
                let e = rel_err(&got.to_device(&Device::Cpu).unwrap(), &cw.matmul(&x).unwrap());
                assert!(e < 1e-5, "{mode} global {global} k {k}: {e:e}");
            }
            // each expert of a stack: views at nonzero offsets of the stack's storage
            let (experts, n, k) = (3, 40, 96);
            let cs = fp_weight(mode, global, Some(experts), (n, k), FP_DECADES, &mut rng);
            let gs = fp_to_dev(&cs, &dev);
            for e in 0..experts {
                let (ce, ge) = (cs.get(e).unwrap(), gs.get(e).unwrap());
                for m in [1, 4] {
                    let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
                    let want = ce.matmul(&x).unwrap();
                    let got = fp_metal::matmul(&x.to_device(&dev).unwrap(), &ge).unwrap();
                    let e2 = rel_err(&got.to_device(&Device::Cpu).unwrap(), &want);
                    assert!(e2 < 1e-5, "{mode} global {global} expert {e} m {m}: {e2:e}");
                }
            }
            // packed codes one word into their storage: not 16-byte aligned, so copied
            let (n, k) = (24, 256);
            let cw = fp_weight(mode, global, None, (n, k), FP_DECADES, &mut rng);
            let words = cw.packed.dim(1).unwrap();
            let padded = Tensor::cat(
                &[Tensor::zeros(1, DType::U32, &Device::Cpu).unwrap(), cw.packed.flatten_all().unwrap()],
                0,
            )
            .unwrap()
            .to_device(&dev)
            .unwrap();
            let shifted = FpWeight {
                packed: padded.narrow(0, 1, n * words).unwrap().reshape((n, words)).unwrap(),
                ..fp_to_dev(&cw, &dev)
            };
            assert_eq!(shifted.packed.layout().start_offset(), 1);
            let x = Tensor::randn(0f32, 1.0, (2, k), &Device::Cpu).unwrap();
            let want = cw.matmul(&x).unwrap();
            let got = fp_metal::matmul(&x.to_device(&dev).unwrap(), &shifted).unwrap();
            let e = rel_err(&got.to_device(&Device::Cpu).unwrap(), &want);
            assert!(e < 1e-5, "{mode} global {global} unaligned weight: {e:e}");
            let got = fp_metal::dequantize(&shifted, DType::F32).unwrap().to_device(&Device::Cpu).unwrap();
            let want = cw.dequantize(DType::F32).unwrap();
            assert_eq!(max_abs_diff(&got, &want), 0.0, "{mode} global {global} unaligned weight dequantized");
        }
        eprintln!("{cases} fp matmul cases");
    }

    /// The dequantize kernels equal the CPU's `quant::fp::dequantize_tensor` (which equals
    /// `mx.dequantize`) bit for bit: every mode, f32 / f16 / bf16 (nvfp4 with a global scale:
    /// f32 whatever the dtype asked), single matrices, stacks and one expert of a stack (nvfp4
    /// also rows of an odd number of groups), with rows scaled over twelve decades; and
    /// `FpWeight::dequantize` on Metal taking the kernel.
    #[test]
    fn metal_fp_dequantize_is_bit_exact_with_the_cpu() {
        use wick::quant::fp;
        let Some(dev) = metal() else { return };
        let mut rng = rand::rngs::StdRng::seed_from_u64(777);
        for (mode, global) in FP_MODES {
            let odd_groups = if mode == Mode::Nvfp4 { Some((Some(2), 10, 48)) } else { None };
            for (lead, n, k) in
                [(None, 256, 512), (None, 130, 2048), (None, 96, 64), (Some(5), 33, 160)].into_iter().chain(odd_groups)
            {
                let cw = fp_weight(mode, global, lead, (n, k), (-8.0, 4.0), &mut rng);
                let gw = fp_to_dev(&cw, &dev);
                let g = cw.global_values().unwrap();
                for dtype in [DType::F32, DType::F16, DType::BF16] {
                    let what = format!("{mode} global {global} {dtype:?} {lead:?} x {n} x {k}");
                    let want = fp::dequantize_tensor(&cw.packed, &cw.scales, mode, dtype, g.as_deref()).unwrap();
                    let got = fp_metal::dequantize(&gw, dtype).unwrap();
                    assert_eq!(got.dtype(), if global { DType::F32 } else { dtype }, "{what}");
                    assert_eq!(got.dtype(), want.dtype(), "{what}");
                    assert_eq!(got.dims(), want.dims(), "{what}");
                    assert!(fp_bits(&got) == fp_bits(&want), "{what}: dequantized values differ");
                    let got = gw.dequantize(dtype).unwrap();
                    assert!(fp_bits(&got) == fp_bits(&want), "{what}: FpWeight::dequantize differs");
                    if let Some(e) = lead {
                        // the last expert: a view at an offset of the stack's storage
                        let (ce, ge) = (cw.get(e - 1).unwrap(), gw.get(e - 1).unwrap());
                        let ge_vals = ce.global_values().unwrap();
                        let want =
                            fp::dequantize_tensor(&ce.packed, &ce.scales, mode, dtype, ge_vals.as_deref()).unwrap();
                        let got = fp_metal::dequantize(&ge, dtype).unwrap();
                        assert_eq!(got.dims(), want.dims(), "{what} expert {}", e - 1);
                        assert!(fp_bits(&got) == fp_bits(&want), "{what} expert {}: dequantized values differ", e - 1);
                    }
                }
            }
        }
    }

    /// The gathered matmul with the expert ids on the device (`wick_gfpmv_*`): routed row r is
    /// input row r / top_k times expert ids[r]'s matrix, against each routed row's CPU matmul
    /// with its expert (`FpWeight::get(e).matmul`), every mode (nvfp4 with per-expert global
    /// scales from `quantize_experts_global`; and rows of an odd number of nvfp4 groups, which
    /// take the dense path), f32 / f16 / bf16, a decode token and batches; an id outside the
    /// stack gives a NaN row; `ExpertWeights::gather_rows` routes a float-mode stack on the
    /// device on Metal.
    #[test]
    fn metal_fp_gathered_matmul_matches_each_routed_rows_matmul() {
        use wick::ops::gather_mm::ExpertWeights;
        let Some(dev) = metal() else { return };
        let mut rng = rand::rngs::StdRng::seed_from_u64(9001);
        let mut cases = 0;
        for (mode, global) in FP_MODES {
            // nvfp4 also with rows of an odd number of groups (dequantized, then a batched matmul)
            let odd_groups = if mode == Mode::Nvfp4 { Some((3, 10, 48)) } else { None };
            for (experts, n, k) in [(4, 130, 512), (7, 64, 2048), (3, 9, 96)].into_iter().chain(odd_groups) {
                let cw = fp_weight(mode, global, Some(experts), (n, k), FP_DECADES, &mut rng);
                let gw = fp_to_dev(&cw, &dev);
                for dtype in [DType::F32, DType::F16, DType::BF16] {
                    for (tokens, top_k) in [(1, experts.min(4)), (3, 2), (8, 1)] {
                        let rows = tokens * top_k;
                        let ids: Vec<u32> = (0..rows).map(|_| rng.random_range(0..experts as u32)).collect();
                        let x = Tensor::randn(0f32, 1.0, (tokens, k), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
                        let x32 = x.to_dtype(DType::F32).unwrap();
                        let want: Vec<Tensor> = ids
                            .iter()
                            .enumerate()
                            .map(|(r, &e)| {
                                cw.get(e as usize).unwrap().matmul(&x32.narrow(0, r / top_k, 1).unwrap()).unwrap()
                            })
                            .collect();
                        let want = Tensor::cat(&want, 0).unwrap();
                        let idt = Tensor::new(ids.clone(), &dev).unwrap();
                        let got = fp_metal::gather_rows(&x.to_device(&dev).unwrap(), &gw, &idt, top_k).unwrap();
                        let what = format!("{mode} global {global} {dtype:?} E {experts} n {n} k {k} rows {rows}");
                        assert_eq!(got.dtype(), dtype, "{what}");
                        assert_eq!(got.dims(), &[rows, n], "{what}");
                        let e = rel_err(&got.to_device(&Device::Cpu).unwrap(), &want);
                        assert!(e < fp_tolerance(dtype), "gathered {what}: relative error {e:e}");
                        cases += 1;
                    }
                }
                // the same through the experts' gathered matmul, routed on the device
                let stack = ExpertWeights::Fp(gw.clone());
                if wick::ops::gather_mm::device_routing() {
                    assert!(stack.routes_on_device(&dev), "{mode}: a float-mode stack routes on the Metal device");
                }
                let x = Tensor::randn(0f32, 1.0, (2, k), &Device::Cpu).unwrap();
                let ids: Vec<u32> = (0..4).map(|_| rng.random_range(0..experts as u32)).collect();
                let idt = Tensor::new(ids.clone(), &dev).unwrap();
                let xd = x.to_device(&dev).unwrap();
                let got = stack.gather_rows(&xd, &idt, 2).unwrap();
                let want = fp_metal::gather_rows(&xd, &gw, &idt, 2).unwrap();
                let e = rel_err(&got.to_device(&Device::Cpu).unwrap(), &want.to_device(&Device::Cpu).unwrap());
                assert!(e < 1e-6, "{mode} global {global}: ExpertWeights::gather_rows {e:e}");
                if k % 32 != 0 {
                    continue;
                }
                // an id outside the stack: its routed row is NaN, the others as before
                let x = Tensor::randn(0f32, 1.0, (2, k), &Device::Cpu).unwrap();
                let idt = Tensor::new(vec![0u32, experts as u32], &dev).unwrap();
                let got = fp_metal::gather_rows(&x.to_device(&dev).unwrap(), &gw, &idt, 1)
                    .unwrap()
                    .to_device(&Device::Cpu)
                    .unwrap();
                let v: Vec<Vec<f32>> = got.to_vec2().unwrap();
                assert!(v[1].iter().all(|x| x.is_nan()), "{mode}: an out-of-range expert id gives a NaN row");
                let want = cw.get(0).unwrap().matmul(&x.narrow(0, 0, 1).unwrap()).unwrap();
                let e = rel_err(&got.narrow(0, 0, 1).unwrap(), &want);
                assert!(e < 1e-5, "{mode} global {global}: routed row 0 beside an out-of-range id: {e:e}");
            }
        }
        eprintln!("{cases} gathered fp cases");
    }
}
