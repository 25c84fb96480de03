//! The CUDA quantized-matmul kernels alone on Llama-8B-shaped 4-bit g64 matrices (bf16), on a
//! GPU: time per call and achieved bandwidth (bytes of packed codes, scales, biases, input and
//! output over time) for decode (m = 1, 8 and 32: `wick_qmv` / `wick_qmt`), and time and TFLOP/s for prefill
//! (m = 512: dequantize + cuBLAS). Each shape is cycled over enough copies to exceed the L2 cache.
//!
//! With a model folder as argument it also takes one decode step apart: the host time to issue
//! a step's kernels (`forward` returning) against the whole step (until the logits are on the
//! host), which says whether decoding is bound by the GPU or by the host's per-launch work.
//!
//! `cargo run --release --features cuda --example cuda_kernels [MODEL]` (or the carried binary;
//! see docs/cuda.md).

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use std::time::Instant;
use wick::ops::qmatmul::QuantizedWeight;
use wick::quant::QuantParams;

fn weight(n: usize, k: usize, p: QuantParams, dev: &Device) -> Result<QuantizedWeight> {
    let g = k / p.group_size;
    let packed = Tensor::rand(0f32, 4.0e9, (n, p.packed_width(k)), dev)?.to_dtype(DType::U32)?;
    let scales = Tensor::rand(0.002f32, 0.004, (n, g), dev)?.to_dtype(DType::BF16)?;
    let biases = Tensor::rand(-0.03f32, -0.02, (n, g), dev)?.to_dtype(DType::BF16)?;
    Ok(QuantizedWeight { packed, scales, biases, params: p, out_dim: n, in_dim: k, compute_dtype: DType::BF16 })
}

/// Decode-step anatomy on a real model: mean host issue time and mean full step time.
fn decode_step(dev: &Device, model_dir: &str) -> Result<()> {
    let m = wick::engine::load_model(std::path::Path::new(model_dir), None, dev)?;
    let model = m.model.as_ref();
    let mut cache = model.make_cache(None);
    let prompt: Vec<u32> = (0..512u32).map(|i| (i * 7919) % model.vocab_size() as u32).collect();
    wick::engine::generate::prefill(model, &prompt, &mut cache, 2048)?;
    let (mut issue, mut total) = (0f64, 0f64);
    let steps = 64;
    let mut tok = 1u32;
    for i in 0..steps + 8 {
        let input = Tensor::new(&[tok], dev)?.unsqueeze(0)?;
        let t0 = Instant::now();
        let logits = model.forward(&input, &mut cache, true)?;
        let t1 = Instant::now();
        let l: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        tok = wick::engine::sample::argmax(&l);
        if i >= 8 {
            issue += (t1 - t0).as_secs_f64();
            total += t0.elapsed().as_secs_f64();
        }
    }
    let n = steps as f64;
    println!(
        "decode step of {model_dir} at 512 tokens of context: host issue {:.0} µs, whole step {:.0} µs ({:.0} tok/s)",
        issue / n * 1e6,
        total / n * 1e6,
        n / total
    );
    Ok(())
}

fn main() -> Result<()> {
    let dev = wick::backend::device::select_device(Some("cuda"))?;
    if let Some(model) = std::env::args().nth(1) {
        return decode_step(&dev, &model);
    }
    let p = QuantParams::new(4, 64, "bench")?;
    let shapes = [
        ("q_proj/o_proj", 4096usize, 4096usize),
        ("k_proj/v_proj", 1024, 4096),
        ("gate/up_proj", 14336, 4096),
        ("down_proj", 4096, 14336),
        ("lm_head", 128256, 4096),
    ];
    println!("| matrix (n × k) | m | kernel | µs/call | GB/s | TFLOP/s |");
    println!("|---|---|---|---|---|---|");
    for (name, n, k) in shapes {
        let bytes_w = (n * k / 2 + 2 * 2 * n * k / p.group_size) as f64;
        let copies = (256e6 / bytes_w).ceil().max(1.0) as usize;
        let ws: Vec<QuantizedWeight> = (0..copies).map(|_| weight(n, k, p, &dev)).collect::<Result<_>>()?;
        for m in [1usize, 8, 32, 512] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?.to_dtype(DType::BF16)?;
            for w in &ws {
                w.matmul(&x)?;
            }
            dev.synchronize()?;
            let iters = if m == 512 { 20 } else { 200 }.max(copies);
            let t = Instant::now();
            for i in 0..iters {
                ws[i % copies].matmul(&x)?;
            }
            dev.synchronize()?;
            let s = t.elapsed().as_secs_f64() / iters as f64;
            let bytes = bytes_w + 2.0 * (m * (k + n)) as f64;
            let kernel = wick::ops::qmatmul::cuda::kernel_name(DType::BF16, p, m, n, k);
            println!(
                "| {name} ({n} × {k}) | {m} | {kernel} | {:.1} | {:.0} | {:.1} |",
                s * 1e6,
                bytes / s / 1e9,
                2.0 * (m * n * k) as f64 / s / 1e12
            );
        }
    }
    Ok(())
}
