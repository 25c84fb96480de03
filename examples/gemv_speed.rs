use half::f16;
use std::time::Instant;
use wick::kernels::{gemv, DenseRows};
fn main() {
    // 30 layers of SmolLM2-shaped matrices, cycled so they come from DRAM as in decode
    let shapes = [(576usize, 576usize), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)];
    let layers: Vec<Vec<Vec<f16>>> = (0..30)
        .map(|l| {
            shapes
                .iter()
                .map(|&(n, k)| (0..n * k).map(|i| f16::from_f32(((i + l) % 7) as f32 * 0.01)).collect())
                .collect()
        })
        .collect();
    let bytes: usize = shapes.iter().map(|(n, k)| n * k * 2).sum::<usize>() * 30;
    for _ in 0..3 {
        let t = Instant::now();
        for l in &layers {
            for (w, &(n, k)) in l.iter().zip(&shapes) {
                let x: Vec<f32> = vec![1.0; k];
                std::hint::black_box(gemv(&DenseRows { data: w, n, k }, &x, 1));
                let s = Instant::now();
                while s.elapsed().as_micros() < 40 {}
            }
        }
        let dt = t.elapsed().as_secs_f64();
        println!("layers: {:.2} ms, {:.2} GB/s", dt * 1e3, bytes as f64 / dt / 1e9);
    }
}
