//! CUDA backend (built with `--features cuda`, run on a machine with an NVIDIA GPU; see
//! docs/cuda.md). Without a CUDA device each test prints why it is skipped and passes.
//! - the quantized-matmul kernels against dequantize-then-matmul (cuBLAS, f32) over random
//!   shapes, every bits × group size, f32/f16/bf16 activations, decode and prefill row counts;
//!   one-row matmuls chained by programmatic launches equal the same launches synchronized;
//! - decode and prefill attention (flash attention on the tensor cores) against the CPU's f32;
//! - the fused SwiGLU within half an ulp of the exact product;
//! - the fused residual add + RMSNorm bit-exact with candle's two kernels; the decode step's
//!   deferred norm (o / down add the residual, q/k/v and gate/up apply the norm's scale) against
//!   the matmul, the add and the exact norm, and in a random 4-bit Llama's decode steps (eager
//!   and replayed from a graph) against the separate norms;
//! - the dequantize kernel bit-exact with the CPU's (which is bit-exact with `mx.dequantize`);
//! - the float modes (mxfp4, nvfp4 with and without a global scale, mxfp8): the decode and
//!   gathered kernels against the CPU's matmul, the dequantize kernel bit-exact with the CPU's;
//! - the default model's greedy tokens on CUDA (f32) equal mlx_lm's goldens, which the CPU
//!   matches too, and so do its 4-bit conversion's;
//! - RoPE tables kept on the device equal the host's, bit for bit;
//! - the decode step replayed as a CUDA graph gives the eager step's tokens, across the cache
//!   growing (an eager step on the new buffers, then a capture that updates the first one's
//!   instance) in f32 and bf16, for one sequence and a left-padded batch whose rows leave at
//!   different steps;
//! - greedy generation picking on the device (the argmax kernel, each step queued before the
//!   last one's token is read) gives the host loop's tokens and leaves its cache when an eos
//!   or the caller stops it; the argmax kernel picks as the host's (ties, NaN, -inf); the
//!   server's greedy batches picked on the device equal those picked from the logits;
//! - training: LoRA / DoRA / full fine-tuning gradients on CUDA equal mlx_lm's (with and
//!   without gradient checkpointing).
#![cfg(all(feature = "cuda", feature = "testing"))]

mod common;

use candle_core::{DType, Device, Tensor};
use common::gpu::{
    self, dense_reference, fp_to_dev, fp_tolerance, fp_weight, max_abs_diff, quantized, rel_err, to_dev, FP_DECADES,
};
use rand::{Rng, SeedableRng};
use wick::quant::QuantParams;

fn cuda() -> Option<Device> {
    gpu::device("cuda")
}

#[test]
fn cuda_quantized_matmul_matches_dequantize_then_cublas() {
    let Some(dev) = cuda() else { return };
    gpu::quantized_matmul_matches_dequantize_then_matmul(&dev);
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
                // ≤ 8 rows: one launch; up to 32 (decode batches): slices of 8
                for m in (1..=8usize).chain([9, 16, 21, 32]) {
                    let x = Tensor::randn(0f32, 1.0, (1, m, k), &dev).unwrap().to_dtype(dtype).unwrap();
                    let got =
                        wick::ops::qmatmul::fused_qkv(&x, &wq, &wk, &wv).unwrap().expect("a fused kernel applies");
                    for (g, w) in got.iter().zip([&wq, &wk, &wv]) {
                        let want = w.matmul(&x).unwrap();
                        assert_eq!(g.dims(), want.dims());
                        let e = rel_err(g, &want);
                        assert!(
                            e < 1e-5 || (dtype != DType::F32 && e < 1e-2),
                            "qkv bits {bits} gs {gs} {dtype:?} m {m}: {e:e}"
                        );
                    }
                    let got = wick::ops::qmatmul::fused_swiglu(&x, &wq, &wu).unwrap().expect("a fused kernel applies");
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

/// One input row through the one-row tensor-core kernels (`wick_qm1*`: 4 bits, f16 / bf16, k a
/// multiple of 128): plain, fused q/k/v and fused gate/up, at tile counts that pick each block
/// width (16, 8 and 4 warps per tile) and row counts that end mid-tile, against the f32 matmul
/// of the CPU's dequantization. The bound is twice the error that rounding the exact result to
/// the activation dtype alone leaves (plus 1e-4), far tighter than the other kernels' tolerances.
#[test]
fn cuda_one_row_kernels_match_dequantize_then_matmul() {
    let Some(dev) = cuda() else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(1124);
    let mut cases = 0;
    for gs in [32, 64, 128] {
        let p = QuantParams::new(4, gs, "test").unwrap();
        // tiles of 16 rows (plain and q/k/v: 16 warps each below 375 tiles, 8 below 750, then
        // 4; gate/up: 16 below 256, 8 below 512, then 4); even sizes for the fused q/k/v
        // (fused_qkv's rule)
        let ns = [
            2 * rng.random_range(8..=1200),
            16 * rng.random_range(380..=500) + 6,
            16 * rng.random_range(520..=700) + 10,
            16 * rng.random_range(760..=800) + 2 * rng.random_range(0..8),
        ];
        for n in ns {
            let k = 128 * rng.random_range(1..=12);
            for dtype in [DType::F16, DType::BF16] {
                let mk = |n: usize| quantized(&Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap(), p, dtype);
                let (qa, qb, qc) = (mk(n), mk(2 * rng.random_range(1..=64)), mk(2 * rng.random_range(1..=64)));
                let x = Tensor::randn(0f32, 1.0, (1, 1, k), &dev).unwrap().to_dtype(dtype).unwrap();
                let x32 = x.to_dtype(DType::F32).unwrap().reshape((1, k)).unwrap();
                let exact = |w: &wick::ops::qmatmul::QuantizedWeight| {
                    x32.matmul(&dense_reference(w, &dev).t().unwrap()).unwrap()
                };
                let check = |got: &Tensor, want: &Tensor, what: &str| {
                    let bound = 2.0 * rel_err(&want.to_dtype(dtype).unwrap(), want) + 1e-4;
                    let e = rel_err(got, want);
                    assert!(e < bound, "{what} gs {gs} {dtype:?} n {n} k {k}: relative error {e:e} ≥ {bound:e}");
                };
                let [wa, wb, wc] = [&qa, &qb, &qc].map(|w| to_dev(w, &dev));
                let wants = [&qa, &qb, &qc].map(exact);
                check(&wa.matmul(&x).unwrap(), &wants[0], "matmul");
                let qkv = wick::ops::qmatmul::fused_qkv(&x, &wa, &wb, &wc).unwrap().expect("a fused kernel applies");
                for ((got, want), name) in qkv.iter().zip(&wants).zip(["q", "k", "v"]) {
                    check(got, want, name);
                }
                let qu = mk(n);
                let wu = to_dev(&qu, &dev);
                let got = wick::ops::qmatmul::fused_swiglu(&x, &wa, &wu).unwrap().expect("a fused kernel applies");
                let want = (candle_nn::ops::silu(&wants[0]).unwrap() * exact(&qu)).unwrap();
                check(&got, &want, "swiglu");
                cases += 5;
            }
        }
    }
    eprintln!("{cases} one-row cases");
}

/// The gathered (mixture-of-experts) matmul with the expert ids on the device: routed row r is
/// input row r / top_k times expert ids[r]'s weight. Stacks of random experts, every bits ×
/// group size, f32 / f16 / bf16, one-row tensor-core and scalar kernels (k a multiple of 128 or
/// not), a decode token and a batch, plain and fused with SiLU (gate / up), against each routed
/// row's f32 product with the CPU's dequantization of its expert; and a dense stack against
/// the same rows, and against the host-grouped path.
#[test]
fn cuda_gathered_matmul_matches_each_routed_rows_matmul() {
    use wick::ops::gather_mm::ExpertWeights;
    let Some(dev) = cuda() else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(3312);
    let mut cases = 0;
    for bits in [2, 3, 4, 5, 6, 8] {
        for gs in [32, 64, 128] {
            let p = QuantParams::new(bits, gs, "test").unwrap();
            let experts = rng.random_range(4..=16);
            let k = if rng.random_bool(0.5) { 128 * rng.random_range(1..=8) } else { gs * rng.random_range(1..=12) };
            let n = 2 * rng.random_range(8..=300);
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let stack = || quantized(&Tensor::randn(0f32, 1.0, (experts * n, k), &Device::Cpu).unwrap(), p, dtype);
                // one quantization of E·n rows, split as E experts of n rows
                let split = |q: &wick::ops::qmatmul::QuantizedWeight| wick::ops::qmatmul::QuantizedWeight {
                    packed: q.packed.reshape((experts, n, ())).unwrap(),
                    scales: q.scales.reshape((experts, n, ())).unwrap(),
                    biases: q.biases.reshape((experts, n, ())).unwrap(),
                    out_dim: n,
                    ..q.clone()
                };
                let (qg, qu) = (stack(), stack());
                let dense = |q: &wick::ops::qmatmul::QuantizedWeight| {
                    dense_reference(q, &Device::Cpu).reshape((experts, n, k)).unwrap()
                };
                let (dg, du) = (dense(&qg), dense(&qu));
                let (wg, wu) = (
                    ExpertWeights::Quantized(split(&to_dev(&qg, &dev))),
                    ExpertWeights::Quantized(split(&to_dev(&qu, &dev))),
                );
                for (tokens, top_k) in [(1, rng.random_range(1..=experts.min(8))), (rng.random_range(2..=8), 2)] {
                    let rows = tokens * top_k;
                    let ids: Vec<u32> = (0..rows).map(|_| rng.random_range(0..experts as u32)).collect();
                    let x = Tensor::randn(0f32, 1.0, (tokens, k), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
                    let x32 = x.to_dtype(DType::F32).unwrap();
                    let want = |d: &Tensor| {
                        let rows: Vec<Tensor> = ids
                            .iter()
                            .enumerate()
                            .map(|(r, &e)| {
                                let xr = x32.narrow(0, r / top_k, 1).unwrap();
                                xr.matmul(&d.get(e as usize).unwrap().t().unwrap()).unwrap()
                            })
                            .collect();
                        Tensor::cat(&rows, 0).unwrap()
                    };
                    let (ig, iu) = (want(&dg), want(&du));
                    let idt = Tensor::new(ids.clone(), &dev).unwrap();
                    let xd = x.to_device(&dev).unwrap();
                    let tol = match dtype {
                        DType::F32 => 1e-4,
                        DType::F16 => 5e-3,
                        _ => 1e-2,
                    };
                    let what = format!("bits {bits} gs {gs} {dtype:?} E {experts} n {n} k {k} rows {rows}");
                    let got = wg.gather_rows(&xd, &idt, top_k).unwrap();
                    assert_eq!(got.dims(), &[rows, n], "{what}");
                    let e = rel_err(&got.to_device(&Device::Cpu).unwrap(), &ig);
                    assert!(e < tol, "gathered {what}: {e:e}");
                    if let Some(got) = ExpertWeights::gather_swiglu(&wg, &wu, &xd, &idt, top_k).unwrap() {
                        let exact = (candle_nn::ops::silu(&ig).unwrap() * &iu).unwrap();
                        let e = rel_err(&got.to_device(&Device::Cpu).unwrap(), &exact);
                        assert!(e < tol, "gathered swiglu {what}: {e:e}");
                        cases += 1;
                    } else {
                        assert!(![4, 8].contains(&bits), "{what}: no fused gate/up");
                    }
                    if bits == 4 && gs == 64 {
                        let wd = ExpertWeights::Dense(dg.to_dtype(dtype).unwrap().to_device(&dev).unwrap());
                        let got = wd.gather_rows(&xd, &idt, top_k).unwrap().to_device(&Device::Cpu).unwrap();
                        let e = rel_err(&got, &ig);
                        assert!(e < tol, "dense {what}: {e:e}");
                        // the same stack on the CPU groups the rows on the host
                        let wh = ExpertWeights::Dense(dg.to_dtype(dtype).unwrap());
                        let got = wh.gather_rows(&x, &Tensor::new(ids.clone(), &Device::Cpu).unwrap(), top_k).unwrap();
                        let e = rel_err(&got, &ig);
                        assert!(e < tol, "dense on the host {what}: {e:e}");
                    }
                    cases += 1;
                }
            }
        }
    }
    eprintln!("{cases} gathered cases");
}

/// One-row matmuls back to back, each reading the one before's output, as a decode step chains
/// them. Launched programmatically (Hopper), a kernel's blocks start while the one ahead still
/// runs, and may load weights then but must not read their input before the wait: the chain
/// must give the same bits as the same launches with the device synchronized after each.
#[test]
fn cuda_chained_one_row_matmuls_wait_for_their_input() {
    let Some(dev) = cuda() else { return };
    let p = QuantParams::new(4, 64, "test").unwrap();
    let k = 4096;
    let scale = 1.0 / (k as f64).sqrt();
    let ws: Vec<_> = (0..6)
        .map(|_| {
            let w = (Tensor::randn(0f32, 1.0, (k, k), &Device::Cpu).unwrap() * scale).unwrap();
            to_dev(&quantized(&w, p, DType::BF16), &dev)
        })
        .collect();
    let x = Tensor::randn(0f32, 1.0, (1, 1, k), &dev).unwrap().to_dtype(DType::BF16).unwrap();
    let run = |sync: bool| -> Vec<Tensor> {
        let mut outs = vec![x.clone()];
        for w in &ws {
            let y = w.matmul(outs.last().unwrap()).unwrap();
            if sync {
                dev.synchronize().unwrap();
            }
            outs.push(y);
        }
        outs
    };
    let want = run(true);
    for round in 0..5 {
        let got = run(false);
        for (i, (g, w)) in got.iter().zip(&want).enumerate().skip(1) {
            assert_eq!(max_abs_diff(g, w), 0.0, "round {round}, matmul {i}: the chained launch read another input");
        }
    }
}

/// The decode step's deferred RMSNorm (an o or down projection adds the residual and leaves
/// the norm's scale to the next fused matmul) against the matmul, the add and candle's norm:
/// the residual sum bit for bit, and q/k/v and gate/up, against the exact f32 products of the
/// exact norm, at most twice as far off as the same kernels fed the rounded norm (plus 1e-4).
#[test]
fn cuda_deferred_norm_matches_the_matmul_then_the_norm() {
    let Some(dev) = cuda() else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(2411);
    let mut cases = 0;
    for gs in [32, 64, 128] {
        let p = QuantParams::new(4, gs, "test").unwrap();
        // norm dimensions from 1 tile row of partial sums to the largest (8,192: 512 sums)
        for d in [128 * rng.random_range(1..=8), 128 * rng.random_range(9..=40), 4096, 8192] {
            let k = 128 * rng.random_range(1..=24);
            for dtype in [DType::F16, DType::BF16] {
                let mk = |n: usize, k: usize, s: f64| {
                    let w = (Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap() * s).unwrap();
                    quantized(&w, p, dtype)
                };
                let rand = |shape: &[usize], lo: f32, hi: f32, rng: &mut rand::rngs::StdRng| {
                    let n: usize = shape.iter().product();
                    let v: Vec<f32> = (0..n).map(|_| lo + (hi - lo) * rng.random::<f32>()).collect();
                    Tensor::from_vec(v, shape, &dev).unwrap().to_dtype(dtype).unwrap()
                };
                let w = to_dev(&mk(d, k, 1.0 / (k as f64).sqrt()), &dev);
                let x = rand(&[1, 1, k], -1.0, 1.0, &mut rng);
                let r = rand(&[1, 1, d], -2.0, 2.0, &mut rng);
                let nw = rand(&[d], 0.5, 1.5, &mut rng);
                // at least 64 outputs each: the bound compares two realized errors, whose ratio
                // over a handful of outputs strays past 2 by chance
                let (nq, nkv) = (2 * rng.random_range(32..=600), 2 * rng.random_range(32..=128));
                // std 1/√d: outputs of order 1 (f16's range holds gate · up)
                let sd = 1.0 / (d as f64).sqrt();
                let (qq, qk, qv, qg, qu) =
                    (mk(nq, d, sd), mk(nkv, d, sd), mk(nkv, d, sd), mk(nq, d, sd), mk(nq, d, sd));
                let [wq, wk, wv, wg, wu] = [&qq, &qk, &qv, &qg, &qu].map(|q| to_dev(q, &dev));
                let h = (w.matmul(&x).unwrap() + &r).unwrap();
                let n = candle_nn::ops::rms_norm(&h, &nw, 1e-5).unwrap();
                // the exact norm of h (f32), and each weight's exact product with it
                let h32 = h.to_dtype(DType::F32).unwrap().reshape((1, d)).unwrap();
                let nw32 = nw.to_dtype(DType::F32).unwrap();
                let inv =
                    (h32.sqr().unwrap().mean_keepdim(1).unwrap() + 1e-5).unwrap().sqrt().unwrap().recip().unwrap();
                let n32 = h32.broadcast_mul(&inv).unwrap().broadcast_mul(&nw32).unwrap();
                let exact = |q: &wick::ops::qmatmul::QuantizedWeight| {
                    n32.matmul(&dense_reference(q, &dev).t().unwrap()).unwrap().flatten_all().unwrap()
                };
                let what = format!("gs {gs} {dtype:?} d {d} k {k}");
                let check = |got: &Tensor, rounded: &Tensor, want: &Tensor, name: &str| {
                    let (got, rounded) = (got.flatten_all().unwrap(), rounded.flatten_all().unwrap());
                    let (e, bound) = (rel_err(&got, want), 2.0 * rel_err(&rounded, want) + 1e-4);
                    assert!(e < bound, "{name}, {what}: relative error {e:e} ≥ {bound:e}");
                };

                let carrier = wick::ops::qmatmul::deferred_norm(&x, &w, &r, &nw, &[&wq, &wk, &wv])
                    .unwrap()
                    .expect("the deferred norm applies");
                assert_eq!(carrier.dims(), &[3 * d]);
                let hd = carrier.narrow(0, d, d).unwrap();
                assert_eq!(max_abs_diff(&hd, &h.flatten_all().unwrap()), 0.0, "x Wᵀ + r, {what}");
                let got = wick::ops::qmatmul::fused_qkv_deferred(&carrier, 1e-5, &[1, 1], &wq, &wk, &wv).unwrap();
                let rounded = wick::ops::qmatmul::fused_qkv(&n, &wq, &wk, &wv).unwrap().unwrap();
                for (((g, r), q), name) in got.iter().zip(&rounded).zip([&qq, &qk, &qv]).zip(["q", "k", "v"]) {
                    check(g, r, &exact(q), name);
                }

                let carrier = wick::ops::qmatmul::deferred_norm(&x, &w, &r, &nw, &[&wg, &wu]).unwrap().unwrap();
                let got = wick::ops::qmatmul::fused_swiglu_deferred(&carrier, 1e-5, &[1, 1], &wg, &wu).unwrap();
                let rounded = wick::ops::qmatmul::fused_swiglu(&n, &wg, &wu).unwrap().unwrap();
                let want = (candle_nn::ops::silu(&exact(&qg)).unwrap() * exact(&qu)).unwrap();
                check(&got, &rounded, &want, "gate/up");
                cases += 4;
            }
        }
    }
    // where the kernels do not apply (several rows, f32), the norm is not deferred
    let p = QuantParams::new(4, 64, "test").unwrap();
    let w = to_dev(&quantized(&Tensor::randn(0f32, 1.0, (256, 256), &Device::Cpu).unwrap(), p, DType::BF16), &dev);
    let x2 = Tensor::randn(0f32, 1.0, (1, 2, 256), &dev).unwrap().to_dtype(DType::BF16).unwrap();
    let r2 = x2.clone();
    let nw = Tensor::ones(256, DType::BF16, &dev).unwrap();
    assert!(wick::ops::qmatmul::deferred_norm(&x2, &w, &r2, &nw, &[&w, &w]).unwrap().is_none(), "two rows");
    eprintln!("{cases} deferred-norm cases");
}

/// A random 4-bit Llama whose hidden size the one-row kernels take (256): its decode steps
/// defer the norms (2 per layer but the first layer's input norm), give the logits of the
/// same steps without deferring within the rounding of the norm's output, and a CUDA graph's
/// replays give the eager deferred steps' logits bit for bit.
#[test]
fn cuda_decode_with_deferred_norms_equals_the_separate_norms() {
    use wick::backend::stats::{read, Counter};
    use wick::nn::set_deferred_norms;
    let Some(dev) = cuda() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let model = gpu::random_llama_4bit(tmp.path(), 256, 512, 3);
    let m = wick::engine::load_model(&model, Some(DType::BF16), &dev).unwrap();
    let lm = m.model.as_ref();
    let prompt: Vec<u32> = (0..9).map(|i| (i * 37 + 5) % 256).collect();
    let steps: Vec<u32> = (0..24).map(|i| (i * 101 + 17) % 256).collect();
    // the prompt, then one token per step; the logits of every step
    let run = |last_only: bool| -> Vec<Tensor> {
        let mut cache = lm.make_cache(None);
        let x = Tensor::new(prompt.as_slice(), &dev).unwrap().unsqueeze(0).unwrap();
        lm.forward(&x, &mut cache, true).unwrap();
        steps
            .iter()
            .map(|&t| {
                let x = Tensor::new(&[t], &dev).unwrap().unsqueeze(0).unwrap();
                lm.forward(&x, &mut cache, last_only).unwrap().flatten_all().unwrap().to_dtype(DType::F32).unwrap()
            })
            .collect()
    };
    set_deferred_norms(false);
    let before = read(Counter::DeferredNorms);
    let separate = run(false);
    assert_eq!(read(Counter::DeferredNorms), before, "deferred while off");
    set_deferred_norms(true);
    let deferred = run(false);
    assert_eq!(read(Counter::DeferredNorms) - before, steps.len() * (2 * 3 - 1), "norms deferred per step");
    for (i, (a, b)) in deferred.iter().zip(&separate).enumerate() {
        let e = rel_err(a, b);
        assert!(e < 2e-2, "step {i}: deferred-norm logits off by {e:e} (relative) from the separate norms'");
    }
    wick::engine::cuda_graph::set_enabled(true);
    let graphed = run(true);
    for (i, (a, b)) in graphed.iter().zip(&deferred).enumerate() {
        assert_eq!(max_abs_diff(a, b), 0.0, "step {i}: graph replay differs from the eager deferred step");
    }
}

#[test]
fn cuda_decode_attention_matches_the_cpu() {
    let Some(dev) = cuda() else { return };
    use std::sync::Arc;
    use wick::ops::attention::MaskSpec;
    // (batch, heads, kv heads, cache capacity, keys used, head size, softcap, left padding)
    type Case = (usize, usize, usize, usize, usize, usize, Option<f64>, Option<Vec<usize>>);
    let cases: [Case; 7] = [
        (1, 4, 4, 64, 37, 64, None, None),
        (1, 32, 8, 1024, 640, 128, None, None),
        (2, 16, 2, 300, 300, 96, Some(50.0), None),
        (3, 8, 1, 80, 77, 128, None, Some(vec![0, 5, 76])),
        (1, 8, 8, 9000, 8500, 64, None, None),
        // a head size that is not a whole number of 16-byte loads: the scalar path
        (1, 4, 2, 50, 45, 20, None, None),
        // the largest head: one lane group per value row in bf16, the scalar value path in f32
        (1, 4, 1, 200, 150, 256, None, None),
    ];
    for (b, h, kvh, cap, t, d, softcap, pads) in cases {
        for dtype in [DType::F32, DType::BF16] {
            let q = Tensor::randn(0f32, 1.0, (b, h, 1, d), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            // keys and values as views of a larger cache, as KvCache hands them out
            let kc = Tensor::randn(0f32, 1.0, (b, kvh, cap, d), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let vc = Tensor::randn(0f32, 1.0, (b, kvh, cap, d), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let spec = MaskSpec {
                offset: t - 1,
                window: None,
                chunk: None,
                left_padding: pads.clone().map(Arc::from),
                pos: None,
            };
            let run = |dev: &Device| {
                let (q, kc, vc) = (q.to_device(dev).unwrap(), kc.to_device(dev).unwrap(), vc.to_device(dev).unwrap());
                let (k, v) = (kc.narrow(2, 0, t).unwrap(), vc.narrow(2, 0, t).unwrap());
                wick::ops::attention::scaled_dot_product_attention(
                    &q,
                    &k,
                    &v,
                    (d as f64).powf(-0.5),
                    spec.clone(),
                    softcap,
                )
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

/// RoPE tables of single sequences come from tables of positions 0..n kept on the device
/// (grown when a prompt reaches past them): RoPE through them equals RoPE through tables the
/// host computes for the prompt's positions alone, bit for bit.
#[test]
fn cuda_rope_tables_kept_on_the_device_equal_the_host_tables() {
    let Some(dev) = cuda() else { return };
    let llama3 = serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
    for (dims, base, traditional, scaling) in
        [(64, 10000.0, false, None), (128, 500000.0, false, Some(&llama3)), (32, 10000.0, true, None)]
    {
        let rope = wick::nn::Rope::from_config(dims, base, traditional, scaling, Some(131072)).unwrap();
        // (offset, length): the last but one grows the kept tables from 1,024 positions to 8,192
        for (offset, len) in [(0, 7), (700, 300), (1023, 1), (3000, 2000), (5, 1)] {
            for dtype in [DType::F32, DType::BF16] {
                let x = Tensor::randn(0f32, 1.0, (1, 4, len, dims), &dev).unwrap().to_dtype(dtype).unwrap();
                let kept = rope.tables(offset, len, dtype, &dev).unwrap().apply(&x).unwrap();
                let host = rope.batch_tables(offset, len, &[0], dtype, &dev).unwrap().apply(&x).unwrap();
                let what = format!("dims {dims}, {dtype:?}, positions {offset}..{}", offset + len);
                assert_eq!(max_abs_diff(&kept, &host), 0.0, "{what}: the kept tables differ from the host's");
            }
        }
    }
}

#[test]
fn cuda_prefill_attention_matches_the_cpu_in_f32() {
    let Some(dev) = cuda() else { return };
    use std::sync::Arc;
    use wick::ops::attention::cuda::PrefillAttention;
    use wick::ops::attention::MaskSpec;
    // (batch, heads, kv heads, queries, offset: keys cached before them, head size, softcap,
    // window, left padding)
    type Case = (usize, usize, usize, usize, usize, usize, Option<f64>, Option<usize>, Option<Vec<usize>>);
    let cases: [Case; 7] = [
        // fewer queries than a block
        (1, 4, 4, 7, 0, 64, None, None, None),
        // grouped-query heads, a partial last block
        (1, 32, 8, 300, 0, 128, None, None, None),
        // a later chunk (keys cached before the queries), softcap
        (2, 8, 2, 130, 57, 96, Some(30.0), None, None),
        // a sliding window shorter than the chunk
        (1, 8, 4, 200, 100, 64, None, Some(77), None),
        // left-padded batch rows, one of them all padding but its last query
        (3, 4, 1, 70, 0, 128, None, None, Some(vec![0, 5, 69])),
        (1, 2, 2, 513, 0, 128, None, None, None),
        (2, 6, 3, 65, 190, 64, None, Some(100), Some(vec![3, 200])),
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for (b, h, kvh, l, offset, d, softcap, window, pads) in cases {
        let t = offset + l;
        let cap = t + rng.random_range(1..40);
        let spec = MaskSpec { offset, window, chunk: None, left_padding: pads.clone().map(Arc::from), pos: None };
        let scale = (d as f64).powf(-0.5);
        for dtype in [DType::F16, DType::BF16] {
            let rand = |shape: (usize, usize, usize, usize)| {
                Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
            };
            let (q, kc, vc) = (rand((b, h, l, d)), rand((b, kvh, cap, d)), rand((b, kvh, cap, d)));
            // the reference: the CPU's matmul + mask + softmax in f32 on the same (rounded) inputs
            let f32_ = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
            let (k32, v32) = (f32_(&kc).narrow(2, 0, t).unwrap(), f32_(&vc).narrow(2, 0, t).unwrap());
            let want =
                wick::ops::attention::scaled_dot_product_attention(&f32_(&q), &k32, &v32, scale, spec.clone(), softcap)
                    .unwrap();
            // keys and values as views of a larger cache, as KvCache hands them out
            let (q, kc, vc) = (q.to_device(&dev).unwrap(), kc.to_device(&dev).unwrap(), vc.to_device(&dev).unwrap());
            let (k, v) = (kc.narrow(2, 0, t).unwrap(), vc.narrow(2, 0, t).unwrap());
            assert!(
                PrefillAttention::fits(&q, &k, &v).unwrap(),
                "case b {b} h {h} l {l} d {d} does not reach the kernel"
            );
            let op = PrefillAttention {
                scale: scale as f32,
                softcap: softcap.map(|c| c as f32),
                offset,
                window,
                starts: pads.clone().map(Arc::from),
            };
            let got = q.apply_op3_no_bwd(&k, &v, &op).unwrap().transpose(1, 2).unwrap();
            let e = rel_err(&got, &want);
            let tol = if dtype == DType::F16 { 2e-3 } else { 1e-2 };
            let what = format!("b {b} h {h}/{kvh} l {l} offset {offset} d {d} softcap {softcap:?} window {window:?} pads {pads:?} {dtype:?}");
            assert!(e < tol, "{what}: relative error {e:e}");
            // scaled_dot_product_attention takes the kernel for these inputs
            let via =
                wick::ops::attention::scaled_dot_product_attention(&q, &k, &v, scale, spec.clone(), softcap).unwrap();
            assert_eq!(gpu::flat(&via), gpu::flat(&got), "{what}: scaled_dot_product_attention did not use the kernel");
        }
    }
}

#[test]
fn cuda_swiglu_rounds_the_f32_result_once() {
    let Some(dev) = cuda() else { return };
    for dtype in [DType::F16, DType::BF16] {
        // half the ulp at 1: the most a once-rounded value may lie from the exact one
        let half_ulp = if dtype == DType::F16 { 2f32.powi(-11) } else { 2f32.powi(-8) };
        let shapes = [candle_core::Shape::from((3, 8)), (511, 14336).into(), (2, 5, 1000).into()];
        for shape in shapes {
            let g = (Tensor::randn(0f32, 3.0, &shape, &Device::Cpu).unwrap()).to_dtype(dtype).unwrap();
            let u = Tensor::randn(0f32, 1.0, &shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let (g32, u32_) = (gpu::flat(&g), gpu::flat(&u));
            let (gd, ud) = (g.to_device(&dev).unwrap(), u.to_device(&dev).unwrap());
            assert!(wick::ops::swiglu::cuda::SwiGlu::fits(&gd, &ud), "{shape:?} does not reach the kernel");
            let got = gpu::flat(&wick::ops::swiglu::swiglu(&gd, &ud).unwrap());
            for (i, ((&x, &y), &z)) in g32.iter().zip(&u32_).zip(&got).enumerate() {
                let want = x as f64 / (1.0 + (-x as f64).exp()) * y as f64;
                let bound = want.abs() * half_ulp as f64 * 1.01 + 1e-6;
                assert!(
                    (z as f64 - want).abs() <= bound,
                    "{dtype:?} {shape:?} element {i}: silu({x}) * {y} = {want}, got {z}"
                );
            }
        }
    }
}

#[test]
fn cuda_add_rms_norm_equals_the_separate_add_and_norm_bit_for_bit() {
    let Some(dev) = cuda() else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        // both block sizes (one warp below 1,024 columns, 1,024 threads from there), ragged tails
        for d in [64, 576, 1000, 1024, 2048, 3000, 4096, 8192] {
            let rows = rng.random_range(1..=5);
            let rand = |shape: &[usize], scale: f64, rng: &mut rand::rngs::StdRng| -> Tensor {
                let n: usize = shape.iter().product();
                let v: Vec<f32> = (0..n).map(|_| (rng.random::<f64>() * 2.0 - 1.0) as f32 * scale as f32).collect();
                Tensor::from_vec(v, shape, &dev).unwrap().to_dtype(dtype).unwrap()
            };
            let (x, r, w) =
                (rand(&[1, rows, d], 3.0, &mut rng), rand(&[1, rows, d], 1.0, &mut rng), rand(&[d], 1.5, &mut rng));
            let both = x.apply_op3_no_bwd(&r, &w, &wick::ops::norm::cuda::AddRmsNorm { eps: 1e-5 }).unwrap();
            assert_eq!(both.dims(), &[2, 1, rows, d]);
            let h = (&x + &r).unwrap();
            let n = candle_nn::ops::rms_norm(&h, &w, 1e-5).unwrap();
            for (got, want, what) in [(both.get(1).unwrap(), h, "x + r"), (both.get(0).unwrap(), n, "the norm")] {
                assert_eq!(max_abs_diff(&got, &want), 0.0, "{what}, {dtype:?}, {rows} x {d}");
            }
        }
    }
}

#[test]
fn cuda_dequantize_is_bit_exact_with_the_cpu() {
    let Some(dev) = cuda() else { return };
    gpu::dequantize_is_bit_exact_with_the_cpu(&dev);
}

#[test]
fn cuda_greedy_tokens_equal_mlx_lm_goldens_in_f32() {
    let Some(dev) = cuda() else { return };
    gpu::greedy_tokens_equal_mlx_lm_goldens_in_f32(&dev);
}

#[test]
fn cuda_4bit_greedy_tokens_match_mlx_lm() {
    let Some(dev) = cuda() else { return };
    gpu::greedy_4bit_tokens_match_mlx_lm(&dev);
}

#[test]
fn cuda_graph_decode_equals_eager_decode() {
    use wick::backend::stats::{read, Counter};
    use wick::engine::cuda_graph::set_enabled;
    let Some(dev) = cuda() else { return };
    let prompt = gpu::golden_prompts()[1].clone();
    // 38 prompt positions + 300 steps: the cache grows past 256 positions during the decode
    let n = 300;
    let tmp = tempfile::tempdir().unwrap();
    let q4 = gpu::default_model_4bit(tmp.path());
    // the dense model (cuBLAS's kernels between wick's) and its 4-bit conversion in bf16 (the
    // decode kernels of a quantized model: every kernel but the embedding and a cast is wick's)
    for (model, dtype) in
        [(common::default_model(), DType::F32), (common::default_model(), DType::BF16), (q4, DType::BF16)]
    {
        let m = wick::engine::load_model(&model, Some(dtype), &dev).unwrap();
        let quantized = model != common::default_model();
        let dtype = format!("{dtype:?}{}", if quantized { ", 4-bit" } else { "" });
        set_enabled(false);
        let r0 = read(Counter::GraphReplays);
        let eager = common::greedy(m.model.as_ref(), &prompt, n);
        assert_eq!(read(Counter::GraphReplays), r0, "graphs were off");
        set_enabled(true);
        let (c0, r0, b0, u0) = (
            read(Counter::GraphCaptures),
            read(Counter::GraphReplays),
            read(Counter::GraphsRebuilt),
            read(Counter::GraphsUpdated),
        );
        let (s0, e0) = (read(Counter::StepAttention), read(Counter::GraphEagerSteps));
        let graphed = common::greedy(m.model.as_ref(), &prompt, n);
        // the captured steps attend through the fused kernel (RoPE, cache write, attention)
        assert!(read(Counter::StepAttention) > s0, "{dtype}: the fused step attention did not run");
        let (captures, replays) = (read(Counter::GraphCaptures) - c0, read(Counter::GraphReplays) - r0);
        let (rebuilt, eager_steps) = (read(Counter::GraphsRebuilt) - b0, read(Counter::GraphEagerSteps) - e0);
        println!(
            "{dtype}: {eager_steps} steps on the graph's path before a capture, {captures} captures \
             ({rebuilt} rebuilt for programmatic launches), {replays} replays"
        );
        // a quantized model's step is rebuilt wherever programmatic launches are on (Hopper)
        // and the second capture (the cache grown) updates the first one's instance: the
        // tokens after it come from the updated graph
        if quantized && wick::backend::cuda::programmatic_launches(&dev).unwrap() {
            assert_eq!(rebuilt, captures, "{dtype}: captures kept as they were");
            assert_eq!(read(Counter::GraphsUpdated) - u0, captures - 1, "{dtype}: a capture instantiated anew");
        }
        // the prompt's last token and every decode step; per cache size (256, 512) one step
        // run eagerly on the graph's path, then a capture on the next
        assert_eq!(replays + eager_steps, n + 1, "{dtype}: decode steps not replayed from the graph");
        assert_eq!((eager_steps, captures), (2, 2), "{dtype}: one capture per cache buffer");
        assert_eq!(graphed, eager, "{dtype}: graph replay differs from the eager decode");
    }
}

/// Every architecture that offers a graph step (tests/tiny_models.rs lists them) decodes the
/// same from CUDA graphs as eagerly: mlx_lm's tiny models, f32, their caches past 256 positions.
/// Sliding-window models rotate their caches, which a graph does not capture: they decode
/// eagerly (no replays) and must still give the same tokens.
#[test]
fn cuda_graph_decode_equals_eager_for_every_architecture() {
    use wick::backend::stats::{read, Counter};
    use wick::engine::cuda_graph::set_enabled;
    let Some(dev) = cuda() else { return };
    let replayed = [
        "tiny_llama3",
        "tiny_mistral",
        "tiny_qwen2",
        "tiny_qwen3",
        "tiny_phi",
        "tiny_phi3",
        "tiny_gemma2",
        "tiny_smollm3",
        "tiny_granite",
        "tiny_seed_oss",
        "tiny_helium",
        "tiny_olmo2",
        "tiny_glm4",
        "tiny_starcoder2",
        "tiny_apertus",
        "tiny_hunyuan_v1_dense",
        "tiny_mistral3_llama",
        "tiny_mixtral",
        "tiny_qwen3_moe",
        "tiny_qwen2_moe",
        "tiny_olmoe",
        "tiny_granitemoe",
    ];
    let rotating = ["tiny_mistral_swa", "tiny_gemma3", "tiny_olmo3", "tiny_exaone4", "tiny_cohere2", "tiny_gemma3_vlm"];
    for name in replayed.iter().chain(&rotating) {
        let m = wick::engine::load_model(&common::golden(name), Some(DType::F32), &dev).unwrap();
        assert!(m.model.graph_step().is_some(), "{name}: no graph step");
        let prompt: Vec<u32> = (1..20).map(|i| (i * 7) % m.model.vocab_size() as u32).collect();
        set_enabled(false);
        let eager = common::greedy(m.model.as_ref(), &prompt, 300);
        set_enabled(true);
        let r0 = read(Counter::GraphReplays);
        let graphed = common::greedy(m.model.as_ref(), &prompt, 300);
        let replays = read(Counter::GraphReplays) - r0;
        if replayed.contains(name) {
            assert!(replays >= 290, "{name}: {replays} of 300 steps replayed from a graph");
        }
        assert_eq!(graphed, eager, "{name}: graph replay differs from the eager decode");
    }
}

#[test]
fn cuda_graph_batch_decode_equals_eager_batch_decode() {
    use std::collections::BTreeSet;
    use wick::backend::stats::{read, Counter};
    use wick::engine::cuda_graph::set_enabled;
    let Some(dev) = cuda() else { return };
    // the eight golden prompts, 4 to 41 tokens: a left-padded batch
    let prompts = gpu::golden_prompts();
    let tok = wick::tokenizer::Tokenizer::load(&common::default_model()).unwrap();
    let opts = wick::engine::generate::GenerateOptions { max_tokens: 120, ..Default::default() };
    for dtype in [DType::F32, DType::BF16] {
        let m = wick::engine::load_model(&common::default_model(), Some(dtype), &dev).unwrap();
        let model = m.model.as_ref();
        let run = |eos: &BTreeSet<u32>| {
            wick::engine::batch::batch_generate(model, &prompts, &opts, eos, |_| {}).unwrap().tokens
        };
        for eos in [BTreeSet::new(), tok.eos_token_ids.clone()] {
            set_enabled(false);
            let r0 = read(Counter::GraphReplays);
            let eager = run(&eos);
            assert_eq!(read(Counter::GraphReplays), r0, "graphs were off");
            set_enabled(true);
            let (c0, r0, e0) =
                (read(Counter::GraphCaptures), read(Counter::GraphReplays), read(Counter::GraphEagerSteps));
            let graphed = run(&eos);
            let (captures, replays) = (read(Counter::GraphCaptures) - c0, read(Counter::GraphReplays) - r0);
            let replays = replays + read(Counter::GraphEagerSteps) - e0;
            let steps = graphed.iter().map(Vec::len).max().unwrap();
            println!("{dtype:?}, {} eos ids: {captures} captures, {replays} replays, {steps} steps", eos.len());
            // every step takes the graph's path: the prompts' last tokens, then one per token
            // but the last (and the last too when the longest row ends with an eos), replayed
            // but the first on each batch buffer (rows leaving with eos make new ones)
            assert!(
                (steps..=steps + 1).contains(&replays),
                "{dtype:?}: batch decode steps not replayed from the graph"
            );
            assert!(captures >= 1, "{dtype:?}: no capture");
            assert_eq!(graphed, eager, "{dtype:?}: the batch's graph replay differs from its eager decode");
        }
    }
}

#[test]
fn cuda_greedy_argmax_picks_as_the_host() {
    use wick::backend::cuda::HostRing;
    use wick::ops::argmax::cuda::argmax_rows;
    let Some(dev) = cuda() else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    // vocab sizes with and without 16-byte rows; ties (the first index wins), NaN (never
    // picked), -inf, all -inf or NaN (0), the largest value last
    for vocab in [1usize, 3, 7, 1024, 4099, 49152, 128256] {
        let mut rows: Vec<Vec<f32>> = vec![];
        for case in 0..6 {
            let mut r: Vec<f32> = (0..vocab).map(|_| rng.random_range(-4.0f32..4.0)).collect();
            let at = |rng: &mut rand::rngs::StdRng| rng.random_range(0..vocab);
            match case {
                1 => {
                    let (a, b) = (at(&mut rng), at(&mut rng));
                    r[a] = 9.0;
                    r[b] = 9.0;
                }
                2 => {
                    for _ in 0..vocab.div_ceil(3) {
                        let i = at(&mut rng);
                        r[i] = f32::NAN;
                    }
                }
                3 => r.iter_mut().for_each(|x| *x = f32::NEG_INFINITY),
                4 => r
                    .iter_mut()
                    .enumerate()
                    .for_each(|(i, x)| *x = if i % 2 == 0 { f32::NAN } else { f32::NEG_INFINITY }),
                5 => r[vocab - 1] = 100.0,
                _ => {}
            }
            rows.push(r);
        }
        let n = rows.len();
        let f32_logits = Tensor::new(rows.concat(), &dev).unwrap().reshape((n, 1, vocab)).unwrap();
        // in each dtype a step's head may give (f16 / bf16 round the values: many more ties),
        // against the host's argmax of the same values in f32; then rows 1.. of them, which
        // start off 16 bytes for odd sizes
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let logits = f32_logits.to_dtype(dtype).unwrap();
            let host: Vec<Vec<f32>> = logits.to_dtype(DType::F32).unwrap().squeeze(1).unwrap().to_vec2().unwrap();
            let want: Vec<u32> = host.iter().map(|r| wick::engine::sample::argmax(r)).collect();
            for first in [0, 1] {
                let (logits, want, m) = (logits.narrow(0, first, n - first).unwrap(), &want[first..], n - first);
                let what = format!("vocab {vocab} {dtype:?} rows {first}..");
                let token = Tensor::zeros((m, 1), DType::U32, &dev).unwrap();
                let pos = Tensor::new(&[6u32], &dev).unwrap();
                let ring = HostRing::new(dev.as_cuda_device().unwrap(), m, 4).unwrap();
                argmax_rows(&logits, &token, &ring, &pos).unwrap();
                dev.synchronize().unwrap();
                assert_eq!(token.flatten_all().unwrap().to_vec1::<u32>().unwrap(), want, "{what}: the step's tokens");
                assert_eq!(ring.read(6), want, "{what}: the host's copy (slot 6 % 4)");
                assert_eq!(ring.read(2), want, "{what}: slot 2 is slot 6");
            }
        }
    }
}

#[test]
fn cuda_greedy_generation_on_the_device_equals_the_host_loop() {
    use std::collections::BTreeSet;
    use wick::backend::stats::{read, Counter};
    use wick::engine::generate::{generate_with_cache, GenerateOptions};
    let Some(dev) = cuda() else { return };
    let prompt = gpu::golden_prompts()[2].clone();
    // past 256 positions: the graph is captured again on the way, with the token on the device
    let n = 300;
    for dtype in [DType::F32, DType::BF16] {
        let m = wick::engine::load_model(&common::default_model(), Some(dtype), &dev).unwrap();
        let model = m.model.as_ref();
        // the host's argmax of each replayed step's logits
        let host = common::greedy(model, &prompt, n);
        let (c0, r0, e0) = (read(Counter::GraphCaptures), read(Counter::GraphReplays), read(Counter::GraphEagerSteps));
        let device = common::generated(model, &prompt, n);
        let (captures, replays) = (read(Counter::GraphCaptures) - c0, read(Counter::GraphReplays) - r0);
        let eager_steps = read(Counter::GraphEagerSteps) - e0;
        println!("{dtype:?}: {captures} captures, {replays} replays");
        assert_eq!(device, host, "{dtype:?}: greedy tokens picked on the device differ from the host's");
        // the prompt's last token, then every token but the last; per cache size one step run
        // eagerly on the graph's path, then a capture
        assert_eq!(replays + eager_steps, n, "{dtype:?}: greedy steps not replayed");
        assert_eq!((eager_steps, captures), (2, 2), "{dtype:?}: one greedy capture per cache buffer");
        // stopping early: at an eos (the first token after the 100th not drawn before) or when
        // the caller says so; the cache then holds the prompt and every token fed (the
        // stopping one too with feed_last), as the host loop leaves it, although the device
        // had already fed the stopping token
        let stop_at = (100..n).find(|&i| !host[..i].contains(&host[i])).expect("a new token after the 100th");
        for (eos, feed_last, cut) in
            [(true, false, stop_at), (true, true, stop_at), (false, false, 150), (false, true, 150)]
        {
            let ids = if eos { BTreeSet::from([host[stop_at]]) } else { BTreeSet::new() };
            let opts = GenerateOptions { max_tokens: n, ..Default::default() };
            let mut cache = model.make_cache(None);
            let mut sampler = wick::engine::sample::Sampler::new(Default::default()).unwrap();
            let mut got = vec![];
            let stats = generate_with_cache(model, &prompt, &mut cache, &mut sampler, &opts, &ids, feed_last, |t| {
                got.push(t);
                Ok(eos || got.len() <= cut)
            })
            .unwrap();
            let case = format!("{dtype:?}, eos {eos}, feed_last {feed_last}");
            // an eos is not passed on, but counted
            assert_eq!(got, host[..cut + !eos as usize], "{case}: tokens");
            assert_eq!(stats.generation_tokens, cut + 1, "{case}: counted tokens");
            let fed = prompt.len() + cut + feed_last as usize;
            assert!(
                cache.iter().all(|c| c.offset() == fed),
                "{case}: the cache holds {} positions, not {fed}",
                cache[0].offset()
            );
            // and decoding on from that cache: feeding the next token gives the one after
            let (feed, want) = if feed_last { (host[cut + 1], host[cut + 2]) } else { (host[cut], host[cut + 1]) };
            let logits = wick::engine::generate::prefill(model, &[feed], &mut cache, 2048).unwrap();
            assert_eq!(wick::engine::sample::argmax(&logits), want, "{case}: decoding on from the cache");
        }
    }
}

#[test]
fn cuda_server_greedy_batches_pick_on_the_device_as_the_host_does() {
    use std::collections::BTreeSet;
    use wick::server::scheduler::{Event, Job, Scheduler, SchedulerConfig};
    let Some(dev) = cuda() else { return };
    let prompts = gpu::golden_prompts();
    // the eight golden prompts as concurrent greedy requests (all queued before the scheduler
    // starts, so both runs batch them alike), each with its own length; asking for
    // log-probabilities sends the scheduler through the logits and the host's argmax
    let serve = |dtype: DType, logprobs: Option<usize>| -> Vec<Vec<u32>> {
        let m = wick::engine::load_model(&common::default_model(), Some(dtype), &dev).unwrap();
        let cfg = SchedulerConfig {
            max_batch: 8,
            max_queue: 8,
            prefill_step_size: 2048,
            prompt_cache_size: 0,
            eos_token_ids: BTreeSet::new(),
        };
        let (scheduler, worker) = Scheduler::new(m.model, cfg).unwrap();
        let receivers: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let (events, rx) = tokio::sync::mpsc::unbounded_channel();
                let max_tokens = 30 + 10 * i;
                let job = Job {
                    prompt: p.clone(),
                    max_tokens,
                    sampler: Default::default(),
                    processors: Default::default(),
                    logprobs,
                    events,
                };
                assert!(scheduler.submit(job).is_ok());
                rx
            })
            .collect();
        let worker = std::thread::spawn(move || worker.run());
        let out = receivers
            .into_iter()
            .map(|mut rx| {
                let mut ids = vec![];
                while let Some(e) = rx.blocking_recv() {
                    match e {
                        Event::Token { id, finish, .. } => {
                            ids.push(id);
                            if finish.is_some() {
                                break;
                            }
                        }
                        Event::Error(e) => panic!("{dtype:?}: {e}"),
                        Event::Started { .. } => {}
                    }
                }
                ids
            })
            .collect();
        drop(scheduler);
        worker.join().unwrap();
        out
    };
    for dtype in [DType::F32, DType::BF16] {
        let host = serve(dtype, Some(1));
        let device = serve(dtype, None);
        assert!(host.iter().enumerate().all(|(i, t)| t.len() == 30 + 10 * i), "{dtype:?}: lengths");
        assert_eq!(device, host, "{dtype:?}: the server's greedy tokens picked on the device differ from the host's");
    }
}

#[test]
fn cuda_lora_gradients_match_mlx_lm() {
    let Some(dev) = cuda() else { return };
    common::lora_gradients_match_mlx_lm(&dev);
}

/// Latent attention on the GPU: every golden position's logits as mlx_lm's in f32, from the whole
/// sequence (prompt chunks expand the latents) and from chunked prefill then one-token steps
/// (decode absorbed into latent space: the per-head quantized matmuls of `embed_q` /
/// `unembed_out`, attention over the latent cache).
#[test]
fn cuda_latent_attention_matches_mlx_lm() {
    let Some(dev) = cuda() else { return };
    for name in ["tiny_deepseek_v3", "tiny_deepseek_v3_b", "tiny_deepseek_v2", "tiny_glm4_moe_lite", "tiny_mistral4"] {
        for (sub, tol) in [("", 1e-3), ("q4", 2e-3)] {
            let dir = common::golden(name).join(sub);
            let inputs: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(common::golden(name).join("inputs.json")).unwrap())
                    .unwrap();
            let ids: Vec<u32> = inputs["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            let gold = common::load_f32(&dir.join("logits.safetensors"));
            let m = wick::engine::load_model(&dir, Some(DType::F32), &dev).unwrap();
            let run = |chunks: &[(usize, usize)]| -> Vec<f32> {
                let mut cache = m.model.make_cache(None);
                let mut out = vec![];
                for &(a, b) in chunks {
                    let x = Tensor::new(&ids[a..b], &dev).unwrap().unsqueeze(0).unwrap();
                    let y = m.model.forward(&x, &mut cache, false).unwrap();
                    out.extend(y.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                }
                out
            };
            let d = common::max_abs_diff(&run(&[(0, ids.len())]), &gold["full"].1);
            assert!(d < tol, "{name}/{sub}: CUDA logits differ from mlx_lm's by {d}");
            let mut chunks = vec![(0, 24), (24, 40), (40, 56)];
            chunks.extend((56..ids.len()).map(|t| (t, t + 1)));
            let d = common::max_abs_diff(&run(&chunks), &gold["cached"].1);
            assert!(d < tol, "{name}/{sub}: CUDA cached decode differs from mlx_lm's by {d}");
        }
    }
}

/// Architectures on the GPU: mixtures of experts (the gathered matmul reading one expert of a
/// stacked weight, quantized or not; gpt-oss's mxfp4 experts) and the dense families' own parts
/// (NoPE layers, q/k norms after RoPE, post-norms, LayerNorms, xIELU, query scaling): the
/// golden ids' logits as mlx_lm's, in f32.
#[test]
fn cuda_tiny_models_match_mlx_lm() {
    let Some(dev) = cuda() else { return };
    let dense = [
        "tiny_seed_oss",
        "tiny_helium",
        "tiny_internlm3",
        "tiny_olmo2",
        "tiny_olmo3",
        "tiny_exaone4",
        "tiny_glm4",
        "tiny_cohere2",
        "tiny_starcoder2",
        "tiny_apertus",
        "tiny_hunyuan_v1_dense",
        "tiny_ministral3",
        "tiny_mistral3",
        "tiny_gemma3_vlm",
    ];
    let moe = [
        ("tiny_qwen3_moe", "", 1e-3),
        ("tiny_qwen3_moe", "q4", 2e-3),
        ("tiny_gpt_oss", "q4", 2e-3),
        ("tiny_gpt_oss", "mxfp4", 2e-3),
        ("tiny_glm4_moe", "q4", 2e-3),
    ];
    let cases = dense.iter().flat_map(|n| [(*n, "", 1e-3), (*n, "q4", 2e-3)]).chain(moe);
    for (name, sub, tol) in cases {
        let dir = common::golden(name).join(sub);
        let inputs: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(common::golden(name).join("inputs.json")).unwrap()).unwrap();
        let ids: Vec<u32> = inputs["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let gold = common::load_f32(&dir.join("logits.safetensors"));
        let m = wick::engine::load_model(&dir, Some(DType::F32), &dev).unwrap();
        let mut cache = m.model.make_cache(None);
        let x = Tensor::new(ids.as_slice(), &dev).unwrap().unsqueeze(0).unwrap();
        let got: Vec<f32> = m.model.forward(&x, &mut cache, false).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let d = common::max_abs_diff(&got, &gold["full"].1);
        assert!(d < tol, "{name}/{sub}: CUDA logits differ from mlx_lm's by {d}");
        // one decode step on from the cache: the gathered matmul's one-row path
        let next = Tensor::new(&[ids[0]], &dev).unwrap().unsqueeze(0).unwrap();
        let step: Vec<f32> =
            m.model.forward(&next, &mut cache, false).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!(step.iter().all(|v| v.is_finite()), "{name}/{sub}: decode step");
    }
}

/// A gemma GGUF imported without a dtype (bfloat16, as the gemma family must run) decodes on
/// the GPU in that dtype, its logits those of the float32 model within bfloat16's rounding.
#[test]
fn cuda_imported_gemma_runs_in_its_default_dtype() {
    let Some(dev) = cuda() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let gguf = common::golden("gguf").join("tiny_gemma3.gguf");
    let out = wick::convert::gguf::import(&gguf, &tmp.path().join("m"), None, false).unwrap();
    let m = wick::engine::load_model(&out, None, &dev).unwrap();
    assert_eq!(m.model.dtype(), DType::BF16);
    let f32_model = wick::engine::load_model(&out, Some(DType::F32), &Device::Cpu).unwrap();
    let ids: Vec<u32> = (0..40).map(|i| (i * 5 + 3) % m.model.vocab_size() as u32).collect();
    let logits = |model: &dyn wick::models::LanguageModel, d: &Device| -> Vec<f32> {
        let mut cache = model.make_cache(None);
        let x = Tensor::new(ids.as_slice(), d).unwrap().unsqueeze(0).unwrap();
        model.forward(&x, &mut cache, false).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    };
    let (got, want) = (logits(m.model.as_ref(), &dev), logits(f32_model.model.as_ref(), &Device::Cpu));
    assert!(got.iter().all(|v| v.is_finite()), "bfloat16 logits overflow");
    let d = common::max_abs_diff(&got, &want);
    assert!(d < 0.25, "bfloat16 logits differ from float32's by {d}");
}

/// The float-mode kernels of the CUDA backend, for the shared checks.
const CUDA_FP: gpu::FpBackend = gpu::FpBackend {
    matmul: wick::ops::qmatmul::fp_cuda::matmul,
    dequantize: wick::ops::qmatmul::fp_cuda::dequantize,
    gather_rows: wick::ops::qmatmul::fp_cuda::gather_rows,
};

/// The float-mode decode kernels (`wick_fpmv_*`: mxfp4, nvfp4 with and without a global scale,
/// mxfp8) against the CPU's `FpWeight::matmul` in f32 of the same inputs: f32 / f16 / bf16
/// activations, 1, 2, 3 and 8 input rows (and 11: two launches), shapes whose rows end
/// mid-warp and whose k is one chunk up to many per lane; inputs with a leading axis and
/// narrowed from a larger tensor; one expert of a stack (a view at a nonzero offset of its
/// storage), a weight at an offset that is not 16-byte aligned (copied), and nvfp4 rows of an
/// odd number of groups (not whole chunks: dequantized and multiplied densely).
#[test]
fn cuda_fp_matmul_matches_the_cpu() {
    let Some(dev) = cuda() else { return };
    gpu::fp_matmul_matches_the_cpu(&dev, &CUDA_FP);
}

/// The float-mode dequantize kernels (`wick_fp_dequant_*`) equal the CPU's
/// `quant::fp::dequantize_tensor` (which equals `mx.dequantize`) bit for bit: every mode, f32 /
/// f16 / bf16 (nvfp4 with a global scale: f32 whatever the dtype asked), single matrices,
/// stacks and one expert of a stack (nvfp4 also rows of an odd number of groups), with rows
/// scaled over twelve decades.
#[test]
fn cuda_fp_dequantize_is_bit_exact_with_the_cpu() {
    let Some(dev) = cuda() else { return };
    gpu::fp_dequantize_is_bit_exact_with_the_cpu(&dev, &CUDA_FP);
}

/// The gathered float-mode matmul with the expert ids on the device (`wick_gfpmv_*`): routed
/// row r is input row r / top_k times expert ids[r]'s matrix, against each routed row's CPU
/// matmul with its expert (`FpWeight::get(e).matmul`), every mode (nvfp4 with per-expert global
/// scales from `quantize_experts_global`; and rows of an odd number of nvfp4 groups, which take
/// the dense path), f32 / f16 / bf16, a decode token and batches; an id outside the stack gives
/// a NaN row.
#[test]
fn cuda_fp_gathered_matmul_matches_each_routed_rows_matmul() {
    let Some(dev) = cuda() else { return };
    gpu::fp_gathered_matmul_matches_each_routed_rows_matmul(&dev, &CUDA_FP);
}

/// The one-row fused float-mode kernels (`wick_fpmv3_*`: q, k and v in one launch;
/// `wick_fpswiglu_*`: silu(x·Gᵀ)·(x·Uᵀ)) against the CPU's separate matmuls (and the SwiGLU
/// computed from them in f32), each mode, f32 / f16 / bf16 activations, odd row counts.
#[test]
fn cuda_fp_fused_decode_kernels_match_the_separate_matmuls() {
    use wick::ops::qmatmul::FpWeight;
    let Some(dev) = cuda() else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(77);
    for mode in [wick::quant::Mode::Mxfp4, wick::quant::Mode::Nvfp4, wick::quant::Mode::Mxfp8] {
        let k = 512;
        let cws: Vec<FpWeight> =
            [256, 63, 64].iter().map(|&n| fp_weight(mode, false, None, (n, k), FP_DECADES, &mut rng)).collect();
        let gws: Vec<FpWeight> = cws.iter().map(|w| fp_to_dev(w, &dev)).collect();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let x = Tensor::randn(0f32, 1.0, (1, 1, k), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let xf = x.to_dtype(DType::F32).unwrap();
            let xd = x.to_device(&dev).unwrap();
            let got = FpWeight::fused_qkv(&xd, &gws[0], &gws[1], &gws[2]).unwrap().expect("the fused kernel applies");
            for (g, c) in got.iter().zip(&cws) {
                let want = c.matmul(&xf).unwrap();
                assert_eq!(g.dims(), want.dims());
                let e = rel_err(&g.to_device(&Device::Cpu).unwrap(), &want);
                assert!(e < fp_tolerance(dtype), "{mode} {dtype:?} qkv n {}: {e:e}", c.out_dim);
            }
            let (gate, up) = (&cws[0], &fp_weight(mode, false, None, (256, k), FP_DECADES, &mut rng));
            let got = FpWeight::fused_swiglu(&xd, &gws[0], &fp_to_dev(up, &dev)).unwrap().expect("fused");
            let (g, u) = (gate.matmul(&xf).unwrap(), up.matmul(&xf).unwrap());
            let want = (candle_nn::ops::silu(&g).unwrap() * u).unwrap();
            let e = rel_err(&got.to_device(&Device::Cpu).unwrap(), &want);
            assert!(e < fp_tolerance(dtype), "{mode} {dtype:?} swiglu: {e:e}");
        }
    }
}
