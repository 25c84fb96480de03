#![allow(dead_code)]
//! Shared helpers for the integration tests: golden files (written by
//! tests/reference/make_goldens.py from mlx_lm) and the default model.

pub mod gpu;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn golden(name: &str) -> PathBuf {
    root().join("tests/golden").join(name)
}

/// The default model folder; a test that needs it fails (never skips) when it is missing.
pub fn default_model() -> PathBuf {
    let p = root().join("models/SmolLM2-135M-Instruct");
    assert!(
        p.join("config.json").is_file(),
        "the default model is missing at {}: run models/fetch-default.sh first",
        p.display()
    );
    p
}

pub fn default_gguf() -> PathBuf {
    let p = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.is_file(), "{} is missing: run models/fetch-default.sh first", p.display());
    p
}

/// f32 tensors of a golden safetensors file as flat vectors with shapes.
pub fn load_f32(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let t = candle_core::safetensors::load(path, &candle_core::Device::Cpu).expect("golden safetensors");
    t.into_iter()
        .map(|(k, v)| {
            let shape = v.dims().to_vec();
            let data = v.to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (k, (shape, data))
        })
        .collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

pub fn wick() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_wick"))
}

/// `n` greedy tokens after `prompt` (whole-prompt prefill, then one token per step).
pub fn greedy(model: &dyn wick::models::LanguageModel, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut cache = model.make_cache(None);
    let mut l = wick::engine::generate::prefill(model, prompt, &mut cache, 2048).unwrap();
    let mut out = vec![];
    for _ in 0..n {
        let t = wick::engine::sample::argmax(&l);
        out.push(t);
        l = wick::engine::generate::step_logits(model, &[t], &mut cache).unwrap();
    }
    out
}

/// `n` tokens of [`wick::engine::generate::generate`] at temperature 0, no eos (on CUDA: each picked on
/// the device, the next step queued before it is read).
pub fn generated(model: &dyn wick::models::LanguageModel, prompt: &[u32], n: usize) -> Vec<u32> {
    let opts = wick::engine::generate::GenerateOptions { max_tokens: n, ..Default::default() };
    let mut out = vec![];
    let no_eos = std::collections::BTreeSet::new();
    wick::engine::generate::generate(model, prompt, &opts, &no_eos, |t| {
        out.push(t);
        Ok(true)
    })
    .unwrap();
    out
}

/// The loss and the gradient of every trainable tensor (LoRA, DoRA, full fine-tuning; dense and
/// 4-bit tiny models) for one batch, on `dev` in f32, equal mlx_lm's (tests/golden/lora_grads,
/// `nn.value_and_grad(default_loss)`) to 1e-4 relative, with and without gradient checkpointing.
pub fn lora_gradients_match_mlx_lm(dev: &candle_core::Device) {
    use candle_core::{DType, Tensor};
    use wick::lora::train;
    use wick::nn::lora::{AdapterConfig, Adapters, FineTuneType, LoraParameters};
    let root = golden("lora_grads");
    let mut cases: Vec<_> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().path()).collect();
    cases.sort();
    assert_eq!(cases.len(), 8);
    for dir in cases {
        let c: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
        let config = AdapterConfig {
            fine_tune_type: FineTuneType::parse(c["fine_tune_type"].as_str().unwrap()).unwrap(),
            num_layers: c["num_layers"].as_i64().unwrap(),
            lora: LoraParameters::from_json(&c["lora_parameters"], "case.json").unwrap(),
            raw: c.clone(),
        };
        let init = dir.join("adapters.safetensors");
        let base = golden(c["base"].as_str().unwrap());
        let base_config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(base.join("config.json")).unwrap()).unwrap();
        let layers = base_config["num_hidden_layers"].as_u64().unwrap() as usize;
        let adapters = Adapters::for_training(&dir, config, layers, Some(&init), 0).unwrap();
        let m = wick::engine::load_model_adapted(&base, Some(DType::F32), dev, Some(&adapters)).unwrap();
        let rows: Vec<Vec<u32>> = c["batch"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect())
            .collect();
        let batch = Tensor::new(rows, dev).unwrap();
        let lengths: Vec<(usize, usize)> = c["lengths"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p[0].as_u64().unwrap() as usize, p[1].as_u64().unwrap() as usize))
            .collect();
        let (loss, ntoks) = train::loss(m.model.as_ref(), &batch, &lengths).unwrap();
        assert_eq!(ntoks as u64, c["ntoks"].as_u64().unwrap());
        let l = loss.to_scalar::<f32>().unwrap();
        let want = c["loss"].as_f64().unwrap() as f32;
        assert!((l - want).abs() < 1e-4 * want.abs(), "{}: loss {l}, mlx_lm {want}", dir.display());
        let gold = load_f32(&dir.join("grads.safetensors"));
        let vars = adapters.trainable();
        assert_eq!(vars.len(), gold.len(), "{}: trainable tensors", dir.display());
        // plain backward, then with every layer checkpointed (recomputed in the backward pass)
        let plain: Vec<candle_core::Var> = vars.iter().map(|(_, v)| v.clone()).collect();
        for checkpointed in [false, true] {
            wick::models::checkpoint::enable(if checkpointed { &plain } else { &[] });
            let (loss, _) = train::loss(m.model.as_ref(), &batch, &lengths).unwrap();
            let grads = train::gradients(&vars, &loss).unwrap();
            wick::models::checkpoint::enable(&[]);
            for ((name, _), g) in vars.iter().zip(grads) {
                let g = g.unwrap_or_else(|| panic!("{name}: no gradient (checkpointed: {checkpointed})"));
                let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
                let (_, w) = gold.get(name).unwrap_or_else(|| panic!("{name}: not in mlx_lm's gradients"));
                let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
                assert!(scale > 0.0, "{name}: mlx_lm's gradient is zero");
                let d = max_abs_diff(&g, w);
                assert!(
                    d <= 1e-4 * scale,
                    "{} {name} (checkpointed: {checkpointed}): gradient differs by {d} (max |g| {scale})",
                    dir.display()
                );
            }
        }
    }
}
