//! Decode-path kernel speed on SmolLM2-shaped matrices cycled over 30 layers (so the weights
//! come from memory as in a real decode step): f16 dense and 4-bit affine. `GEMV_ONLY=q4` (or
//! `f16`) times one of them. `GEMV_ONLY=q4` (or
//! `f16`) times one of them.

use std::time::Instant;
use wick::backend::cpu::{gemv, DenseRows, WeightRows};
use wick::ops::qmatmul::cpu::AffineRows;
use wick::quant::QuantParams;

/// Times 30 layers' matrix-vector products: from memory (each layer its own weights) and from
/// cache (layer 0 thirty times), so the gap shows whether the kernel waits on memory.
fn run<W: WeightRows>(name: &str, layers: &[Vec<W>], bytes: usize) {
    let pass = |hot: bool| {
        let t = Instant::now();
        for li in 0..layers.len() {
            for w in &layers[if hot { 0 } else { li }] {
                let x: Vec<f32> = vec![1.0; w.k()];
                std::hint::black_box(gemv(w, &x, 1));
            }
        }
        t.elapsed().as_secs_f64()
    };
    if std::env::var("GEMV_ONLY").is_ok_and(|o| o != name) {
        return;
    }
    if std::env::var("GEMV_ONLY").is_ok_and(|o| o != name) {
        return;
    }
    for hot in [false, true] {
        let best = (0..20).map(|_| pass(hot)).fold(f64::INFINITY, f64::min);
        let label = if hot { "cache " } else { "memory" };
        println!("{name} {label}: {:.2} ms per 30 layers, {:.2} GB/s", best * 1e3, bytes as f64 / best / 1e9);
    }
}

type Packed = (Vec<u32>, Vec<f32>, Vec<f32>);

fn main() {
    // as the CLI does: run on a pool worker so no idle worker competes for a core
    rayon::scope(|_| bench());
}

fn bench() {
    let shapes = [(576usize, 576usize), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)];
    let f16s: Vec<Vec<Vec<half::f16>>> = (0..30)
        .map(|l| {
            shapes
                .iter()
                .map(|&(n, k)| (0..n * k).map(|i| half::f16::from_f32(((i + l) % 7) as f32 * 0.01)).collect())
                .collect()
        })
        .collect();
    let dense: Vec<Vec<DenseRows<half::f16>>> =
        f16s.iter().map(|l| l.iter().zip(&shapes).map(|(w, &(n, k))| DenseRows { data: w, n, k }).collect()).collect();
    run("f16", &dense, shapes.iter().map(|(n, k)| n * k * 2).sum::<usize>() * 30);
    let p = QuantParams::new(4, 64, "x").unwrap();
    let q: Vec<Vec<Packed>> = (0..30)
        .map(|l| {
            shapes
                .iter()
                .map(|&(n, k)| {
                    (
                        (0..n * k / 8).map(|i| (i as u32).wrapping_mul(2654435761).wrapping_add(l)).collect(),
                        vec![0.01; n * k / 64],
                        vec![-0.05; n * k / 64],
                    )
                })
                .collect()
        })
        .collect();
    let qrows: Vec<Vec<AffineRows<f32>>> = q
        .iter()
        .map(|l| {
            l.iter()
                .zip(&shapes)
                .map(|((pk, s, b), &(n, k))| AffineRows { packed: pk, scales: s, biases: b, n, k, p })
                .collect()
        })
        .collect();
    run("q4", &qrows, shapes.iter().map(|(n, k)| n * k / 2 + n * k / 64 * 8).sum::<usize>() * 30);
}
