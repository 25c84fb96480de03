//! Checks shared by the GPU backends' tests (tests/cuda.rs, tests/metal.rs): each backend runs
//! the same checks against the same references on its own device.

use super::{default_model, generated, golden, greedy};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use wick::convert::{convert, ConvertOptions, QuantizeOptions};
use wick::ops::qmatmul::QuantizedWeight;
use wick::quant::{quantize_tensor, QuantParams};

/// The device `name` (`cuda`, `metal`), or `None` after printing why the test is skipped.
pub fn device(name: &str) -> Option<Device> {
    match wick::backend::device::select_device(Some(name)) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipped: no {name} device ({e})");
            None
        }
    }
}

/// `w` (n × k, f32 on the CPU) rounded to `dtype` and quantized as `mx.quantize` does.
pub fn quantized(w: &Tensor, p: QuantParams, dtype: DType) -> QuantizedWeight {
    let (n, k) = w.dims2().unwrap();
    let (packed, scales, biases) = quantize_tensor(&w.to_dtype(dtype).unwrap(), p).unwrap();
    QuantizedWeight { packed, scales, biases, params: p, out_dim: n, in_dim: k, compute_dtype: dtype }
}

pub fn to_dev(w: &QuantizedWeight, dev: &Device) -> QuantizedWeight {
    QuantizedWeight {
        packed: w.packed.to_device(dev).unwrap(),
        scales: w.scales.to_device(dev).unwrap(),
        biases: w.biases.to_device(dev).unwrap(),
        ..w.clone()
    }
}

pub fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// ‖a − b‖ / ‖b‖
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (flat(a), flat(b));
    let num: f64 = a.iter().zip(&b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt() as f32
}

/// max |a − b| in f32 (0 exactly when both hold the same values)
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The reference for a quantized weight: the CPU's dequantization (f32 arithmetic) on `dev`,
/// for the device's f32 matmul.
pub fn dense_reference(qw: &QuantizedWeight, dev: &Device) -> Tensor {
    QuantizedWeight {
        scales: qw.scales.to_dtype(DType::F32).unwrap(),
        biases: qw.biases.to_dtype(DType::F32).unwrap(),
        ..qw.clone()
    }
    .dequantize()
    .unwrap()
    .to_device(dev)
    .unwrap()
}

/// The relative error a quantized matmul with activations in `dtype` may have against the f32
/// reference.
fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-3,
        DType::F16 => 5e-3,
        _ => 1e-2,
    }
}

/// The quantized matmul on `dev` against dequantize-then-matmul in f32 on the same device,
/// over random shapes: every bits × group size, f32/f16/bf16 activations, decode and prefill
/// row counts. Relative error bounds 1e-3 (f32), 5e-3 (f16), 1e-2 (bf16).
pub fn quantized_matmul_matches_dequantize_then_matmul(dev: &Device) {
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
                    let dense = dense_reference(&qw, dev);
                    let gw = to_dev(&qw, dev);
                    for m in [1usize, 2, 3, 5, 8, 9, 20, 32, 40] {
                        let x = Tensor::randn(0f32, 1.0, (m, k), dev).unwrap().to_dtype(dtype).unwrap();
                        let want = x.to_dtype(DType::F32).unwrap().matmul(&dense.t().unwrap()).unwrap();
                        let got = gw.matmul(&x).unwrap();
                        assert_eq!(got.dims(), &[m, n]);
                        assert_eq!(got.dtype(), dtype);
                        let e = rel_err(&got, &want);
                        let tol = tolerance(dtype);
                        assert!(
                            e < tol,
                            "bits {bits} group {gs} {dtype:?} m {m} n {n} k {k}: relative error {e:e} ≥ {tol:e}"
                        );
                        let key = format!(
                            "{dtype:?} m{}",
                            if m <= 8 {
                                "≤8"
                            } else if m <= 32 {
                                " 9-32"
                            } else {
                                ">32"
                            }
                        );
                        let v = worst.entry(key).or_insert(0.0);
                        *v = v.max(e);
                        cases += 1;
                    }
                }
            }
        }
    }
    // a layer with many rows (a head): its blocks of four warps, and one input row on the
    // tensor-core kernel (4 bits, f16 / bf16 activations, from 2,048 tiles of 16 rows on)
    let (n, k) = (2048 * 16 + 24, 256);
    let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
    let p = QuantParams::new(4, 64, "test").unwrap();
    for dtype in [DType::F16, DType::BF16] {
        let qw = quantized(&w, p, dtype);
        let dense = dense_reference(&qw, dev);
        let gw = to_dev(&qw, dev);
        for m in [1usize, 3, 8, 32] {
            let x = Tensor::randn(0f32, 1.0, (m, k), dev).unwrap().to_dtype(dtype).unwrap();
            let want = x.to_dtype(DType::F32).unwrap().matmul(&dense.t().unwrap()).unwrap();
            let e = rel_err(&gw.matmul(&x).unwrap(), &want);
            let tol = tolerance(dtype);
            assert!(e < tol, "large layer {dtype:?} m {m}: relative error {e:e} ≥ {tol:e}");
            cases += 1;
        }
    }
    eprintln!("{cases} cases; worst relative error: {worst:?}");
}

/// The device's dequantization equals the CPU's bit for bit (the CPU's equals `mx.dequantize`).
pub fn dequantize_is_bit_exact_with_the_cpu(dev: &Device) {
    for bits in [2, 3, 4, 5, 6, 8] {
        for gs in [32, 64, 128] {
            let p = QuantParams::new(bits, gs, "test").unwrap();
            let w = Tensor::randn(0f32, 1.0, (37, 3 * 128), &Device::Cpu).unwrap();
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let (packed, scales, biases) = quantize_tensor(&w.to_dtype(dtype).unwrap(), p).unwrap();
                let cpu = wick::ops::qmatmul::dequantize_tensor(&packed, &scales, &biases, p).unwrap();
                let gpu = wick::ops::qmatmul::dequantize_tensor(
                    &packed.to_device(dev).unwrap(),
                    &scales.to_device(dev).unwrap(),
                    &biases.to_device(dev).unwrap(),
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

/// The eight golden prompts (tests/golden/smollm2_greedy.json), 4 to 41 tokens.
pub fn golden_prompts() -> Vec<Vec<u32>> {
    json("smollm2_greedy.json")["cases"].as_array().unwrap().iter().map(|c| ids(&c["prompt_ids"])).collect()
}

fn check_greedy(model: &dyn wick::models::LanguageModel, want: &[Vec<u32>], what: &str) {
    let prompts = golden_prompts();
    for (i, (prompt, want)) in prompts.iter().zip(want).enumerate() {
        let got = greedy(model, prompt, want.len());
        assert_eq!(&got, want, "case {i}: {what}");
        let got = generated(model, prompt, want.len());
        assert_eq!(&got, want, "case {i}: {what} (generate)");
    }
}

/// The default model's greedy tokens on `dev` in f32 equal mlx_lm's goldens (as the CPU's do).
pub fn greedy_tokens_equal_mlx_lm_goldens_in_f32(dev: &Device) {
    let m = wick::engine::load_model(&default_model(), Some(DType::F32), dev).unwrap();
    let want: Vec<Vec<u32>> =
        json("smollm2_greedy.json")["cases"].as_array().unwrap().iter().map(|c| ids(&c["greedy_f32"])).collect();
    check_greedy(m.model.as_ref(), &want, &format!("greedy tokens on {dev:?} differ from mlx_lm's (and the CPU's)"));
}

/// The default model converted to 4 bits, group size 64 (as mlx_lm's `q4g64` goldens), in `dir`.
pub fn default_model_4bit(dir: &std::path::Path) -> std::path::PathBuf {
    convert_4bit_g64(&default_model(), dir)
}

/// The model folder `src` converted to 4 bits, group size 64, in `dir`/q4.
fn convert_4bit_g64(src: &std::path::Path, dir: &std::path::Path) -> std::path::PathBuf {
    let out = dir.join("q4");
    let opts = ConvertOptions {
        dtype: None,
        quantize: Some(QuantizeOptions { params: QuantParams::new(4, 64, "test").unwrap(), recipe: None }),
        ..Default::default()
    };
    convert(src, &out, &opts).unwrap();
    out
}

/// The default model's 4-bit g64 conversion gives mlx_lm's 4-bit greedy tokens on `dev` (f32).
pub fn greedy_4bit_tokens_match_mlx_lm(dev: &Device) {
    let tmp = tempfile::tempdir().unwrap();
    let out = default_model_4bit(tmp.path());
    let m = wick::engine::load_model(&out, Some(DType::F32), dev).unwrap();
    let want: Vec<Vec<u32>> =
        json("smollm2_quantized.json")["q4g64"]["greedy_f32"].as_array().unwrap().iter().map(ids).collect();
    check_greedy(m.model.as_ref(), &want, &format!("4-bit greedy tokens on {dev:?} differ from mlx_lm's"));
}

/// A random Llama (`hidden` wide, `ffn` in the MLP, `layers` deep; heads of 64, two query heads
/// per KV head, a vocabulary of 256) converted to 4 bits, group size 64, in `dir`. Its weights
/// are drawn with std 1/√(fan-in), so the activations keep their scale through the layers.
pub fn random_llama_4bit(dir: &std::path::Path, hidden: usize, ffn: usize, layers: usize) -> std::path::PathBuf {
    let (heads, head_dim, vocab) = (hidden / 64, 64, 256);
    let dense = dir.join("dense");
    std::fs::create_dir_all(&dense).unwrap();
    let config = serde_json::json!({
        "model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers, "intermediate_size": ffn,
        "num_attention_heads": heads, "num_key_value_heads": heads / 2, "rms_norm_eps": 1e-5,
        "vocab_size": vocab, "rope_theta": 10000.0, "max_position_embeddings": 512,
        "tie_word_embeddings": false, "torch_dtype": "bfloat16"
    });
    std::fs::write(dense.join("config.json"), config.to_string()).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(256);
    let mut tensors = std::collections::HashMap::new();
    let mut put = |name: String, shape: &[usize], f: &mut dyn FnMut() -> f32| {
        let v: Vec<f32> = (0..shape.iter().product::<usize>()).map(|_| f()).collect();
        tensors.insert(name, Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap());
    };
    let mut matrix = |name: String, out: usize, inp: usize, rng: &mut rand::rngs::StdRng| {
        let s = (3.0 / inp as f32).sqrt();
        put(name, &[out, inp], &mut || s * (2.0 * rng.random::<f32>() - 1.0));
    };
    let kv = heads / 2 * head_dim;
    matrix("model.embed_tokens.weight".into(), vocab, hidden, &mut rng);
    matrix("lm_head.weight".into(), vocab, hidden, &mut rng);
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        for (n, o, inp) in [
            ("self_attn.q_proj", heads * head_dim, hidden),
            ("self_attn.k_proj", kv, hidden),
            ("self_attn.v_proj", kv, hidden),
            ("self_attn.o_proj", hidden, heads * head_dim),
            ("mlp.gate_proj", ffn, hidden),
            ("mlp.up_proj", ffn, hidden),
            ("mlp.down_proj", hidden, ffn),
        ] {
            matrix(format!("{p}.{n}.weight"), o, inp, &mut rng);
        }
    }
    let mut norm = |name: String, rng: &mut rand::rngs::StdRng| {
        let v: Vec<f32> = (0..hidden).map(|_| 0.5 + rng.random::<f32>()).collect();
        tensors.insert(name, Tensor::from_vec(v, hidden, &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap());
    };
    for i in 0..layers {
        norm(format!("model.layers.{i}.input_layernorm.weight"), &mut rng);
        norm(format!("model.layers.{i}.post_attention_layernorm.weight"), &mut rng);
    }
    norm("model.norm.weight".into(), &mut rng);
    candle_core::safetensors::save(&tensors, dense.join("model.safetensors")).unwrap();
    convert_4bit_g64(&dense, dir)
}

/// A random float-mode weight for the GPU tests: `lead × n × k` values of random normal rows
/// each scaled by 10^[lo, hi) (`decades`; tiny rows give subnormal and underflowing scales:
/// nvfp4's E4M3 subnormals, mx scales that f16 rounds to zero; mxfp8 keeps negative zeros),
/// quantized on the CPU with `quant::fp::quantize_tensor`; nvfp4 with `global` per matrix
/// global scales (`quantize_experts_global`, or one `max|W|` for a single matrix).
pub fn fp_weight(
    mode: wick::quant::Mode,
    global: bool,
    lead: Option<usize>,
    (n, k): (usize, usize),
    decades: (f32, f32),
    rng: &mut rand::rngs::StdRng,
) -> wick::ops::qmatmul::FpWeight {
    use wick::quant::fp;
    let mats = lead.unwrap_or(1);
    let row_scales: Vec<f32> = (0..mats * n).map(|_| 10f32.powf(rng.random_range(decades.0..decades.1))).collect();
    let w = Tensor::randn(0f32, 1.0, (mats * n, k), &Device::Cpu)
        .unwrap()
        .broadcast_mul(&Tensor::from_vec(row_scales, (mats * n, 1), &Device::Cpu).unwrap())
        .unwrap();
    let w = match lead {
        Some(e) => w.reshape((e, n, k)).unwrap(),
        None => w,
    };
    let (packed, scales, global_scale) = match (global, lead) {
        (false, _) => {
            let (p, s) = fp::quantize_tensor(&w, mode, None).unwrap();
            (p, s, None)
        }
        (true, Some(_)) => {
            let (p, s, g) = fp::quantize_experts_global(&w).unwrap();
            (p, s, Some(g))
        }
        (true, None) => {
            let g = w.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let (p, s) = fp::quantize_tensor(&w, mode, Some(g)).unwrap();
            (p, s, Some(Tensor::new(g, &Device::Cpu).unwrap()))
        }
    };
    wick::ops::qmatmul::FpWeight { mode, packed, scales, global_scale, out_dim: n, in_dim: k }
}

pub fn fp_to_dev(w: &wick::ops::qmatmul::FpWeight, dev: &Device) -> wick::ops::qmatmul::FpWeight {
    wick::ops::qmatmul::FpWeight {
        packed: w.packed.to_device(dev).unwrap(),
        scales: w.scales.to_device(dev).unwrap(),
        global_scale: w.global_scale.as_ref().map(|g| g.to_device(dev).unwrap()),
        ..w.clone()
    }
}

/// The row scales of the matmul tests' weights (powers of ten): small enough that f16 results
/// stay finite.
pub const FP_DECADES: (f32, f32) = (-3.0, 1.0);

/// The float modes (and nvfp4 with a global scale) under test.
pub const FP_MODES: [(wick::quant::Mode, bool); 4] = [
    (wick::quant::Mode::Mxfp4, false),
    (wick::quant::Mode::Nvfp4, false),
    (wick::quant::Mode::Nvfp4, true),
    (wick::quant::Mode::Mxfp8, false),
];

/// The relative error the float-mode decode kernels may have against the CPU's f32 matmul of
/// the same (rounded) inputs: the f32 sums in another order, or the result rounded to f16 /
/// bf16.
pub fn fp_tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 2e-3,
        _ => 1e-2,
    }
}

/// The f32 bits of each value of `t` (f16 / bf16 values convert exactly), signed zeros and
/// NaN payloads included.
pub fn fp_bits(t: &Tensor) -> Vec<u32> {
    let v: Vec<f32> = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    v.iter().map(|x| x.to_bits()).collect()
}

/// A GPU backend's float-mode functions (`fp_cuda`, `fp_metal`), for the checks below.
pub struct FpBackend {
    pub matmul: fn(&Tensor, &wick::ops::qmatmul::FpWeight) -> anyhow::Result<Tensor>,
    pub dequantize: fn(&wick::ops::qmatmul::FpWeight, DType) -> anyhow::Result<Tensor>,
    pub gather_rows: fn(&Tensor, &wick::ops::qmatmul::FpWeight, &Tensor, usize) -> anyhow::Result<Tensor>,
}

/// The float-mode decode kernels (`wick_fpmv_*`: mxfp4, nvfp4 with and without a global scale,
/// mxfp8) against the CPU's `FpWeight::matmul` in f32 of the same inputs: f32 / f16 / bf16
/// activations, 1, 2, 3 and 8 input rows (and 11: two launches), shapes whose rows end
/// mid-warp and whose k is one chunk up to many per lane; inputs with a leading axis and
/// narrowed from a larger tensor; one expert of a stack (a view at a nonzero offset of its
/// storage), a weight at an offset that is not 16-byte aligned (copied), and nvfp4 rows of an
/// odd number of groups (not whole chunks: dequantized and multiplied densely).
pub fn fp_matmul_matches_the_cpu(dev: &Device, be: &FpBackend) {
    let dev = dev.clone();
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
                    let got = (be.matmul)(&x.to_device(&dev).unwrap(), &gw).unwrap();
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
                let got = (be.matmul)(
                    &big.to_device(&dev).unwrap().narrow(0, 1, 3).unwrap().reshape((1, 3, k)).unwrap(),
                    &gw,
                )
                .unwrap();
                assert_eq!(got.dims(), &[1, 3, n]);
                let e = rel_err(&got.to_device(&Device::Cpu).unwrap(), &want);
                assert!(e < fp_tolerance(dtype), "{mode} global {global} {dtype:?} n {n} k {k} narrowed: {e:e}");
                // the weight's own matmul dispatches to the kernel
                let x = Tensor::randn(0f32, 1.0, (2, k), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
                let want = cw.matmul(&x.to_dtype(DType::F32).unwrap()).unwrap();
                let got = gw.matmul(&x.to_device(&dev).unwrap()).unwrap();
                let e = rel_err(&got.to_device(&Device::Cpu).unwrap(), &want);
                assert!(e < fp_tolerance(dtype), "{mode} global {global} {dtype:?} FpWeight::matmul: {e:e}");
            }
        }
        if mode == wick::quant::Mode::Nvfp4 {
            // an odd number of nvfp4 groups per row: not whole chunks, dequantized and multiplied
            let (n, k) = (20, 80);
            let cw = fp_weight(mode, global, None, (n, k), FP_DECADES, &mut rng);
            let x = Tensor::randn(0f32, 1.0, (3, k), &Device::Cpu).unwrap();
            let got = (be.matmul)(&x.to_device(&dev).unwrap(), &fp_to_dev(&cw, &dev)).unwrap();
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
                let got = (be.matmul)(&x.to_device(&dev).unwrap(), &ge).unwrap();
                let e2 = rel_err(&got.to_device(&Device::Cpu).unwrap(), &want);
                assert!(e2 < 1e-5, "{mode} global {global} expert {e} m {m}: {e2:e}");
            }
        }
        // packed codes one word into their storage: not 16-byte aligned, so copied
        let (n, k) = (24, 256);
        let cw = fp_weight(mode, global, None, (n, k), FP_DECADES, &mut rng);
        let words = cw.packed.dim(1).unwrap();
        let padded =
            Tensor::cat(&[Tensor::zeros(1, DType::U32, &Device::Cpu).unwrap(), cw.packed.flatten_all().unwrap()], 0)
                .unwrap()
                .to_device(&dev)
                .unwrap();
        let shifted = wick::ops::qmatmul::FpWeight {
            packed: padded.narrow(0, 1, n * words).unwrap().reshape((n, words)).unwrap(),
            ..fp_to_dev(&cw, &dev)
        };
        assert_eq!(shifted.packed.layout().start_offset(), 1);
        let x = Tensor::randn(0f32, 1.0, (2, k), &Device::Cpu).unwrap();
        let want = cw.matmul(&x).unwrap();
        let got = (be.matmul)(&x.to_device(&dev).unwrap(), &shifted).unwrap();
        let e = rel_err(&got.to_device(&Device::Cpu).unwrap(), &want);
        assert!(e < 1e-5, "{mode} global {global} unaligned weight: {e:e}");
        let got = (be.dequantize)(&shifted, DType::F32).unwrap().to_device(&Device::Cpu).unwrap();
        let want = cw.dequantize(DType::F32).unwrap();
        assert_eq!(max_abs_diff(&got, &want), 0.0, "{mode} global {global} unaligned weight dequantized");
    }
    eprintln!("{cases} fp matmul cases");
}

/// The float-mode dequantize kernels (`wick_fp_dequant_*`) equal the CPU's
/// `quant::fp::dequantize_tensor` (which equals `mx.dequantize`) bit for bit: every mode, f32 /
/// f16 / bf16 (nvfp4 with a global scale: f32 whatever the dtype asked), single matrices,
/// stacks and one expert of a stack (nvfp4 also rows of an odd number of groups), with rows
/// scaled over twelve decades.
pub fn fp_dequantize_is_bit_exact_with_the_cpu(dev: &Device, be: &FpBackend) {
    let dev = dev.clone();
    use wick::quant::fp;
    let mut rng = rand::rngs::StdRng::seed_from_u64(777);
    for (mode, global) in FP_MODES {
        let odd_groups = if mode == wick::quant::Mode::Nvfp4 { Some((Some(2), 10, 48)) } else { None };
        for (lead, n, k) in
            [(None, 256, 512), (None, 130, 2048), (None, 96, 64), (Some(5), 33, 160)].into_iter().chain(odd_groups)
        {
            let cw = fp_weight(mode, global, lead, (n, k), (-8.0, 4.0), &mut rng);
            let gw = fp_to_dev(&cw, &dev);
            let g = cw.global_values().unwrap();
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let what = format!("{mode} global {global} {dtype:?} {lead:?} x {n} x {k}");
                let want = fp::dequantize_tensor(&cw.packed, &cw.scales, mode, dtype, g.as_deref()).unwrap();
                let got = (be.dequantize)(&gw, dtype).unwrap();
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
                    let want = fp::dequantize_tensor(&ce.packed, &ce.scales, mode, dtype, ge_vals.as_deref()).unwrap();
                    let got = (be.dequantize)(&ge, dtype).unwrap();
                    assert_eq!(got.dims(), want.dims(), "{what} expert {}", e - 1);
                    assert!(fp_bits(&got) == fp_bits(&want), "{what} expert {}: dequantized values differ", e - 1);
                }
            }
        }
    }
}

/// The gathered float-mode matmul with the expert ids on the device (`wick_gfpmv_*`): routed
/// row r is input row r / top_k times expert ids[r]'s matrix, against each routed row's CPU
/// matmul with its expert (`FpWeight::get(e).matmul`), every mode (nvfp4 with per-expert global
/// scales from `quantize_experts_global`; and rows of an odd number of nvfp4 groups, which take
/// the dense path), f32 / f16 / bf16, a decode token and batches; an id outside the stack gives
/// a NaN row.
pub fn fp_gathered_matmul_matches_each_routed_rows_matmul(dev: &Device, be: &FpBackend) {
    let dev = dev.clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(9001);
    let mut cases = 0;
    for (mode, global) in FP_MODES {
        // nvfp4 also with rows of an odd number of groups (dequantized, then a batched matmul)
        let odd_groups = if mode == wick::quant::Mode::Nvfp4 { Some((3, 10, 48)) } else { None };
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
                    let got = (be.gather_rows)(&x.to_device(&dev).unwrap(), &gw, &idt, top_k).unwrap();
                    let what = format!("{mode} global {global} {dtype:?} E {experts} n {n} k {k} rows {rows}");
                    assert_eq!(got.dtype(), dtype, "{what}");
                    assert_eq!(got.dims(), &[rows, n], "{what}");
                    let e = rel_err(&got.to_device(&Device::Cpu).unwrap(), &want);
                    assert!(e < fp_tolerance(dtype), "gathered {what}: relative error {e:e}");
                    cases += 1;
                }
            }
            // the same through the experts' gathered matmul, routed on the device
            let stack = wick::ops::gather_mm::ExpertWeights::Fp(gw.clone());
            if wick::ops::gather_mm::device_routing() {
                assert!(stack.routes_on_device(&dev), "{mode}: a float-mode stack routes on the device");
            }
            let x = Tensor::randn(0f32, 1.0, (2, k), &Device::Cpu).unwrap();
            let ids: Vec<u32> = (0..4).map(|_| rng.random_range(0..experts as u32)).collect();
            let idt = Tensor::new(ids.clone(), &dev).unwrap();
            let xd = x.to_device(&dev).unwrap();
            let got = stack.gather_rows(&xd, &idt, 2).unwrap();
            let want = (be.gather_rows)(&xd, &gw, &idt, 2).unwrap();
            let e = rel_err(&got.to_device(&Device::Cpu).unwrap(), &want.to_device(&Device::Cpu).unwrap());
            assert!(e < 1e-6, "{mode} global {global}: ExpertWeights::gather_rows {e:e}");
            if k % 32 != 0 {
                continue;
            }
            // an id outside the stack: its routed row is NaN, the others as before
            let x = Tensor::randn(0f32, 1.0, (2, k), &Device::Cpu).unwrap();
            let idt = Tensor::new(vec![0u32, experts as u32], &dev).unwrap();
            let got =
                (be.gather_rows)(&x.to_device(&dev).unwrap(), &gw, &idt, 1).unwrap().to_device(&Device::Cpu).unwrap();
            let v: Vec<Vec<f32>> = got.to_vec2().unwrap();
            assert!(v[1].iter().all(|x| x.is_nan()), "{mode}: an out-of-range expert id gives a NaN row");
            let want = cw.get(0).unwrap().matmul(&x.narrow(0, 0, 1).unwrap()).unwrap();
            let e = rel_err(&got.narrow(0, 0, 1).unwrap(), &want);
            assert!(e < 1e-5, "{mode} global {global}: routed row 0 beside an out-of-range id: {e:e}");
        }
    }
    eprintln!("{cases} gathered fp cases");
}
