//! The quantized matmul kernels against dequantize-then-matmul (math, no golden): the decode
//! (matrix-vector) and prefill (tiles + gemm) paths, odd batch sizes, K not a multiple of 512,
//! every bits × group size, f32/f16/bf16 scales; and the gradient with respect to the input.

use candle_core::{DType, Device, Tensor, Var};
use wick::ops::qmatmul::QuantizedWeight;
use wick::quant::{quantize_tensor, QuantParams};

fn weight(n: usize, k: usize, p: QuantParams, dtype: DType) -> QuantizedWeight {
    let dev = Device::Cpu;
    let w = Tensor::randn_like(&Tensor::zeros((n, k), DType::F32, &dev).unwrap(), 0.0, 1.0).unwrap();
    let (packed, scales, biases) = quantize_tensor(&w.to_dtype(dtype).unwrap(), p).unwrap();
    QuantizedWeight { packed, scales, biases, params: p, out_dim: n, in_dim: k, compute_dtype: dtype }
}

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let a: Vec<f32> = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max) / scale
}

#[test]
fn quantized_matmul_matches_dequantize_then_matmul() {
    let dev = Device::Cpu;
    for &(n, k) in &[(96usize, 384usize), (40, 640), (130, 1152)] {
        for bits in [2, 3, 4, 5, 6, 8] {
            for gs in [32, 64, 128] {
                if k % gs != 0 {
                    continue;
                }
                let p = QuantParams::new(bits, gs, "test").unwrap();
                for dtype in [DType::F32, DType::F16, DType::BF16] {
                    let w = weight(n, k, p, dtype);
                    // dequantized in f32: scale·q + bias without rounding to the 16-bit dtype
                    let w32 = QuantizedWeight {
                        scales: w.scales.to_dtype(DType::F32).unwrap(),
                        biases: w.biases.to_dtype(DType::F32).unwrap(),
                        ..w.clone()
                    };
                    let dense = w32.dequantize().unwrap();
                    for m in [1usize, 3, 8, 9, 17, 38] {
                        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
                        // inputs in the weight's dtype; the reference sees the same rounded values
                        let xd = x.to_dtype(dtype).unwrap();
                        let want = xd.to_dtype(DType::F32).unwrap().matmul(&dense.t().unwrap()).unwrap();
                        let got = w.matmul(&xd).unwrap();
                        assert_eq!(got.dims(), &[m, n]);
                        assert_eq!(got.dtype(), dtype);
                        let tol = match dtype {
                            DType::F32 => 1e-4,
                            _ => 1e-2, // the output itself is rounded to 16 bits
                        };
                        let e = max_rel(&got, &want);
                        assert!(e < tol, "n={n} k={k} bits={bits} gs={gs} {dtype:?} m={m}: rel err {e}");
                    }
                }
            }
        }
    }
}

#[test]
fn batched_3d_input_is_supported() {
    let p = QuantParams::new(4, 64, "test").unwrap();
    let w = weight(48, 256, p, DType::F32);
    let x = Tensor::randn(0f32, 1.0, (2, 5, 256), &Device::Cpu).unwrap();
    let got = w.matmul(&x).unwrap();
    let want = x
        .reshape((10, 256))
        .unwrap()
        .matmul(&w.dequantize().unwrap().t().unwrap())
        .unwrap()
        .reshape((2, 5, 48))
        .unwrap();
    assert!(max_rel(&got, &want) < 1e-4);
}

#[test]
fn gradient_with_respect_to_input_matches_dense_and_finite_differences() {
    let p = QuantParams::new(4, 32, "test").unwrap();
    let w = weight(24, 96, p, DType::F32);
    let dense = w.dequantize().unwrap();
    let x0 = Tensor::randn(0f32, 1.0, (3, 96), &Device::Cpu).unwrap();
    let coef = Tensor::randn(0f32, 1.0, (3, 24), &Device::Cpu).unwrap();
    let loss = |x: &Tensor| -> Tensor { (w.matmul(x).unwrap() * &coef).unwrap().sum_all().unwrap() };
    let xv = Var::from_tensor(&x0).unwrap();
    let grads = loss(xv.as_tensor()).backward().unwrap();
    let g = grads.get(xv.as_tensor()).expect("gradient of x");
    // dense reference: d/dx Σ coef ⊙ (x Wᵀ) = coef · W
    let want = coef.matmul(&dense).unwrap();
    assert!(max_rel(g, &want) < 1e-5, "analytic gradient");
    // central finite differences on a few coordinates
    let xs: Vec<f32> = x0.flatten_all().unwrap().to_vec1().unwrap();
    let gs: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
    for idx in [0usize, 17, 95, 150, 287] {
        let h = 1e-2f32;
        let mut plus = xs.clone();
        plus[idx] += h;
        let mut minus = xs.clone();
        minus[idx] -= h;
        let f = |v: Vec<f32>| loss(&Tensor::from_vec(v, (3, 96), &Device::Cpu).unwrap()).to_scalar::<f32>().unwrap();
        let fd = (f(plus) - f(minus)) / (2.0 * h);
        assert!((fd - gs[idx]).abs() < 1e-2 * (1.0 + gs[idx].abs()), "coord {idx}: fd {fd} vs grad {}", gs[idx]);
    }
}

#[test]
fn decode_path_keeps_precision_with_outlier_inputs() {
    // activations after RMSNorm have a few channels far larger than the rest; the decode
    // kernels must stay within 1e-4 of dequantize-then-matmul in f32 there too
    let dev = Device::Cpu;
    for gs in [32, 64, 128] {
        let p = QuantParams::new(4, gs, "test").unwrap();
        let w = weight(64, 768, p, DType::F32);
        let mut x: Vec<f32> =
            Tensor::randn(0f32, 1.0, (2, 768), &dev).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        for (i, v) in x.iter_mut().enumerate() {
            if i % 97 == 5 {
                *v *= 300.0;
            }
            if i % 13 == 0 {
                *v *= 1e-3;
            }
        }
        let x = Tensor::from_vec(x, (2, 768), &dev).unwrap();
        let want = x.matmul(&w.dequantize().unwrap().t().unwrap()).unwrap();
        for m in [1, 2] {
            let xm = x.narrow(0, 0, m).unwrap();
            let e = max_rel(&w.matmul(&xm).unwrap(), &want.narrow(0, 0, m).unwrap());
            assert!(e < 1e-4, "gs={gs} m={m}: rel err {e}");
        }
    }
}

/// A batch of decode rows (up to the decode path's limit) gets, row for row, the bits each
/// row gets alone: batched requests in the server stay identical to single ones. Checked
/// for 4 and 8 bits and dense f16 weights (multi-input kernels, up to 64 rows) and for 3 bits
/// (one input row at a time, up to 8 rows).
#[test]
fn batch_rows_equal_single_rows_bit_for_bit() {
    let dev = Device::Cpu;
    let (n, k) = (70usize, 320usize);
    let rows = |x: &Tensor, f: &dyn Fn(&Tensor) -> Tensor| -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let batch: Vec<Vec<f32>> = f(x).to_dtype(DType::F32).unwrap().to_vec2().unwrap();
        let single = (0..x.dim(0).unwrap())
            .map(|i| {
                let r = f(&x.narrow(0, i, 1).unwrap());
                r.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap().remove(0)
            })
            .collect();
        (batch, single)
    };
    // the multi-input kernels exist on AVX-512 builds; elsewhere only the 8-row decode path
    let avx512 = cfg!(all(target_arch = "x86_64", target_feature = "avx512f"));
    for m in [2usize, 5, 16, 23, 64] {
        if !avx512 && m > wick::backend::cpu::GEMV_MAX_ROWS {
            continue;
        }
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        for bits in [3, 4, 8] {
            // widths without a multi-input kernel take the decode path up to 8 rows only
            if bits == 3 && m > wick::backend::cpu::GEMV_MAX_ROWS {
                continue;
            }
            for gs in [32, 64] {
                let w = weight(n, k, QuantParams::new(bits, gs, "test").unwrap(), DType::F16);
                let (batch, single) = rows(&x, &|x| w.matmul(&x.to_dtype(DType::F16).unwrap()).unwrap());
                assert_eq!(batch, single, "bits={bits} gs={gs} m={m}");
            }
        }
        let wd = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap().to_dtype(DType::F16).unwrap();
        let (batch, single) = rows(&x, &|x| wick::ops::dense_matmul::dense_matmul(x, &wd).unwrap());
        assert_eq!(batch, single, "dense f16 m={m}");
    }
}

/// The float modes' CPU matmul (the decode path's per-row dots, explicit SIMD where the build
/// has AVX2, and the prefill path's decoded rows) against `mx.dequantize`'s f32 matrix times the
/// input: every code of each mode (random words; E4M3's NaN codes left out, as mlx never writes
/// them), scales from tiny to large, nvfp4 with a global scale, 1 to 40 input rows.
#[test]
fn float_mode_matmul_matches_dequantize_then_matmul() {
    use rand::{Rng, SeedableRng};
    use wick::ops::qmatmul::FpWeight;
    use wick::quant::{fp, Mode};
    let dev = Device::Cpu;
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for (mode, global) in [(Mode::Mxfp4, None), (Mode::Nvfp4, None), (Mode::Nvfp4, Some(3.5f32)), (Mode::Mxfp8, None)] {
        let (n, k) = (37, 640);
        let words: Vec<u32> = (0..n * k / fp::per_word(mode))
            .map(|_| {
                let w: u32 = rng.random();
                if mode == Mode::Mxfp8 {
                    w & 0xf7f7_f7f7 // exponent 14 at most: no 0x7f / 0xff
                } else {
                    w
                }
            })
            .collect();
        let scales: Vec<u8> = (0..n * k / fp::group(mode))
            .map(|_| if mode == Mode::Nvfp4 { rng.random_range(1..0x7e) } else { rng.random_range(100..140) })
            .collect();
        let w = FpWeight {
            mode,
            packed: Tensor::from_vec(words, (n, k / fp::per_word(mode)), &dev).unwrap(),
            scales: Tensor::from_vec(scales, (n, k / fp::group(mode)), &dev).unwrap(),
            global_scale: global.map(|g| Tensor::new(g, &dev).unwrap()),
            out_dim: n,
            in_dim: k,
        };
        let dense = w.dequantize(DType::F32).unwrap();
        for m in [1, 2, 5, 40] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let want = x.matmul(&dense.t().unwrap()).unwrap();
            let got = w.matmul(&x).unwrap();
            let e = max_rel(&got, &want);
            assert!(e < 1e-5, "{mode} global {global:?} m {m}: relative error {e:e}");
        }
    }
}

/// The explicit-SIMD float-mode row dot (AVX2 builds) equals the portable one (what other
/// targets run) up to f32 summation order, for every code.
#[test]
fn float_mode_row_dot_simd_equals_portable() {
    use rand::{Rng, SeedableRng};
    use wick::backend::cpu::simd::{dot_fp_row, dot_fp_row_portable};
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    for (fp8, wpg) in [(false, 4), (false, 2), (true, 8)] {
        let words: Vec<u32> = (0..160).map(|_| rng.random::<u32>() & if fp8 { 0xf7f7_f7f7 } else { !0 }).collect();
        let per = if fp8 { 4 } else { 8 };
        let x: Vec<f32> = (0..160 * per).map(|_| rng.random_range(-1.0..1.0)).collect();
        let scales: Vec<f32> = (0..160 / wpg).map(|_| rng.random_range(0.01..2.0)).collect();
        let (a, b) = (dot_fp_row(&x, &words, &scales, wpg, fp8), dot_fp_row_portable(&x, &words, &scales, wpg, fp8));
        assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "fp8 {fp8} wpg {wpg}: {a} vs {b}");
    }
}
