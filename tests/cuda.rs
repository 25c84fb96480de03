//! CUDA backend (built with `--features cuda`, run on a machine with an NVIDIA GPU; see
//! docs/cuda.md). Without a CUDA device each test prints why it is skipped and passes.
//! - the quantized-matmul kernels against dequantize-then-matmul (cuBLAS, f32) over random
//!   shapes, every bits × group size, f32/f16/bf16 activations, decode and prefill row counts;
//! - the dequantize kernel bit-exact with the CPU's (which is bit-exact with `mx.dequantize`);
//! - the default model's greedy tokens on CUDA (f32) equal mlx_lm's goldens, which the CPU
//!   matches too, and so do its 4-bit conversion's.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor};
use common::{default_model, golden, greedy};
use rand::{Rng, SeedableRng};
use wick::convert::{convert, ConvertOptions, QuantizeOptions};
use wick::quant::{quantize_tensor, QuantParams, QuantizedWeight};

fn cuda() -> Option<Device> {
    match wick::device::select_device(Some("cuda")) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
    }
}

/// `w` (n × k, f32 on the CPU) rounded to `dtype` and quantized as `mx.quantize` does.
fn quantized(w: &Tensor, p: QuantParams, dtype: DType) -> QuantizedWeight {
    let (n, k) = w.dims2().unwrap();
    let (packed, scales, biases) = quantize_tensor(&w.to_dtype(dtype).unwrap(), p).unwrap();
    QuantizedWeight { packed, scales, biases, params: p, out_dim: n, in_dim: k, compute_dtype: dtype }
}

fn to_dev(w: &QuantizedWeight, dev: &Device) -> QuantizedWeight {
    QuantizedWeight {
        packed: w.packed.to_device(dev).unwrap(),
        scales: w.scales.to_device(dev).unwrap(),
        biases: w.biases.to_device(dev).unwrap(),
        ..w.clone()
    }
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// ‖a − b‖ / ‖b‖
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (flat(a), flat(b));
    let num: f64 = a.iter().zip(&b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt() as f32
}

#[test]
fn cuda_quantized_matmul_matches_dequantize_then_cublas() {
    let Some(dev) = cuda() else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(20261123);
    let mut worst = std::collections::BTreeMap::<String, f32>::new();
    let mut cases = 0;
    for bits in [2, 3, 4, 5, 6, 8] {
        for gs in [32, 64, 128] {
            for _ in 0..3 {
                let n = rng.random_range(1..=96) * 8 + rng.random_range(0..8);
                let k = gs * rng.random_range(1..=24);
                let p = QuantParams::new(bits, gs, "test").unwrap();
                let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
                for dtype in [DType::F32, DType::F16, DType::BF16] {
                    let qw = quantized(&w, p, dtype);
                    // reference: the CPU's dequantization (f32 arithmetic) and cuBLAS in f32
                    let dense = QuantizedWeight {
                        scales: qw.scales.to_dtype(DType::F32).unwrap(),
                        biases: qw.biases.to_dtype(DType::F32).unwrap(),
                        ..qw.clone()
                    }
                    .dequantize()
                    .unwrap()
                    .to_device(&dev)
                    .unwrap();
                    let gw = to_dev(&qw, &dev);
                    for m in [1usize, 2, 3, 5, 8, 9, 40] {
                        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap().to_dtype(dtype).unwrap();
                        let want = x.to_dtype(DType::F32).unwrap().matmul(&dense.t().unwrap()).unwrap();
                        let got = gw.matmul(&x).unwrap();
                        assert_eq!(got.dims(), &[m, n]);
                        assert_eq!(got.dtype(), dtype);
                        let e = rel_err(&got, &want);
                        let tol = match dtype {
                            DType::F32 => 1e-3,
                            DType::F16 => 5e-3,
                            _ => 1e-2,
                        };
                        assert!(
                            e < tol,
                            "bits {bits} group {gs} {dtype:?} m {m} n {n} k {k}: relative error {e:e} ≥ {tol:e}"
                        );
                        let key = format!("{dtype:?} m{}", if m <= 8 { "≤8" } else { ">8" });
                        let v = worst.entry(key).or_insert(0.0);
                        *v = v.max(e);
                        cases += 1;
                    }
                }
            }
        }
    }
    eprintln!("{cases} cases; worst relative error: {worst:?}");
}

#[test]
fn cuda_fused_decode_kernels_match_the_separate_matmuls() {
    let Some(dev) = cuda() else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for bits in [4, 8] {
        for gs in [32, 64, 128] {
            let p = QuantParams::new(bits, gs, "test").unwrap();
            let k = gs * rng.random_range(2..=12);
            // even sizes, as the kernel pairs rows (real projections are multiples of a head size)
            let ns = [2 * rng.random_range(4..=100), 2 * rng.random_range(1..=32), 2 * rng.random_range(1..=32)];
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let mk = |n: usize| {
                    let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
                    to_dev(&quantized(&w, p, dtype), &dev)
                };
                let [wq, wk, wv] = ns.map(mk);
                let wu = mk(ns[0]);
                for m in 1..=8usize {
                    let x = Tensor::randn(0f32, 1.0, (1, m, k), &dev).unwrap().to_dtype(dtype).unwrap();
                    let got =
                        wick::quant::matmul::fused_qkv(&x, &wq, &wk, &wv).unwrap().expect("a fused kernel applies");
                    for (g, w) in got.iter().zip([&wq, &wk, &wv]) {
                        let want = w.matmul(&x).unwrap();
                        assert_eq!(g.dims(), want.dims());
                        let e = rel_err(g, &want);
                        assert!(
                            e < 1e-5 || (dtype != DType::F32 && e < 1e-2),
                            "qkv bits {bits} gs {gs} {dtype:?} m {m}: {e:e}"
                        );
                    }
                    let got = wick::quant::matmul::fused_swiglu(&x, &wq, &wu).unwrap().expect("a fused kernel applies");
                    let g32 = wq.matmul(&x).unwrap().to_dtype(DType::F32).unwrap();
                    let u32_ = wu.matmul(&x).unwrap().to_dtype(DType::F32).unwrap();
                    let want = (candle_nn::ops::silu(&g32).unwrap() * u32_).unwrap();
                    let e = rel_err(&got, &want);
                    let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
                    assert!(e < tol, "swiglu bits {bits} gs {gs} {dtype:?} m {m}: {e:e}");
                }
            }
        }
    }
}

#[test]
fn cuda_decode_attention_matches_the_cpu() {
    let Some(dev) = cuda() else { return };
    use std::sync::Arc;
    use wick::cache::MaskSpec;
    // (batch, heads, kv heads, cache capacity, keys used, head size, softcap, left padding)
    type Case = (usize, usize, usize, usize, usize, usize, Option<f64>, Option<Vec<usize>>);
    let cases: [Case; 6] = [
        (1, 4, 4, 64, 37, 64, None, None),
        (1, 32, 8, 1024, 640, 128, None, None),
        (2, 16, 2, 300, 300, 96, Some(50.0), None),
        (3, 8, 1, 80, 77, 128, None, Some(vec![0, 5, 76])),
        (1, 8, 8, 9000, 8500, 64, None, None),
        // a head size that is not a whole number of 16-byte loads: the scalar path
        (1, 4, 2, 50, 45, 20, None, None),
    ];
    for (b, h, kvh, cap, t, d, softcap, pads) in cases {
        for dtype in [DType::F32, DType::BF16] {
            let q = Tensor::randn(0f32, 1.0, (b, h, 1, d), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            // keys and values as views of a larger cache, as KvCache hands them out
            let kc = Tensor::randn(0f32, 1.0, (b, kvh, cap, d), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let vc = Tensor::randn(0f32, 1.0, (b, kvh, cap, d), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let spec = MaskSpec { offset: t - 1, window: None, left_padding: pads.clone().map(Arc::from) };
            let run = |dev: &Device| {
                let (q, kc, vc) = (q.to_device(dev).unwrap(), kc.to_device(dev).unwrap(), vc.to_device(dev).unwrap());
                let (k, v) = (kc.narrow(2, 0, t).unwrap(), vc.narrow(2, 0, t).unwrap());
                wick::nn::scaled_dot_product_attention(&q, &k, &v, (d as f64).powf(-0.5), spec.clone(), softcap)
                    .unwrap()
            };
            let want = run(&Device::Cpu);
            let got = run(&dev);
            let e = rel_err(&got, &want);
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
            assert!(e < tol, "b {b} h {h} kv {kvh} t {t} d {d} softcap {softcap:?} {dtype:?}: relative error {e:e}");
        }
    }
}

#[test]
fn cuda_dequantize_is_bit_exact_with_the_cpu() {
    let Some(dev) = cuda() else { return };
    for bits in [2, 3, 4, 5, 6, 8] {
        for gs in [32, 64, 128] {
            let p = QuantParams::new(bits, gs, "test").unwrap();
            let w = Tensor::randn(0f32, 1.0, (37, 3 * 128), &Device::Cpu).unwrap();
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let (packed, scales, biases) = quantize_tensor(&w.to_dtype(dtype).unwrap(), p).unwrap();
                let cpu = wick::quant::dequantize_tensor(&packed, &scales, &biases, p).unwrap();
                let gpu = wick::quant::dequantize_tensor(
                    &packed.to_device(&dev).unwrap(),
                    &scales.to_device(&dev).unwrap(),
                    &biases.to_device(&dev).unwrap(),
                    p,
                )
                .unwrap();
                assert_eq!(gpu.dtype(), dtype);
                assert_eq!(flat(&gpu), flat(&cpu), "bits {bits} group {gs} {dtype:?}: dequantized values differ");
            }
        }
    }
}

fn json(file: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(golden(file)).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect()
}

/// The golden prompts' ids.
fn prompts() -> Vec<Vec<u32>> {
    json("smollm2_greedy.json")["cases"].as_array().unwrap().iter().map(|c| ids(&c["prompt_ids"])).collect()
}

fn check_greedy(model: &dyn wick::models::LanguageModel, want: &[Vec<u32>], what: &str) {
    for (i, (prompt, want)) in prompts().iter().zip(want).enumerate() {
        let got = greedy(model, prompt, want.len());
        assert_eq!(&got, want, "case {i}: {what}");
    }
}

#[test]
fn cuda_greedy_tokens_equal_mlx_lm_goldens_in_f32() {
    let Some(dev) = cuda() else { return };
    let m = wick::models::load_model(&default_model(), Some(DType::F32), &dev).unwrap();
    let want: Vec<Vec<u32>> =
        json("smollm2_greedy.json")["cases"].as_array().unwrap().iter().map(|c| ids(&c["greedy_f32"])).collect();
    check_greedy(m.model.as_ref(), &want, "greedy tokens on CUDA differ from mlx_lm's (and the CPU's)");
}

#[test]
fn cuda_4bit_greedy_tokens_match_mlx_lm() {
    let Some(dev) = cuda() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q4");
    let opts = ConvertOptions {
        dtype: None,
        quantize: Some(QuantizeOptions {
            params: QuantParams::new(4, 64, "test").unwrap(),
            mode: "affine".into(),
            recipe: None,
        }),
        ..Default::default()
    };
    convert(&default_model(), &out, &opts).unwrap();
    let m = wick::models::load_model(&out, Some(DType::F32), &dev).unwrap();
    let want: Vec<Vec<u32>> =
        json("smollm2_quantized.json")["q4g64"]["greedy_f32"].as_array().unwrap().iter().map(ids).collect();
    check_greedy(m.model.as_ref(), &want, "4-bit greedy tokens on CUDA differ from mlx_lm's");
}
