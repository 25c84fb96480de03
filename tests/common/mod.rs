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
    let mut l = wick::generate::prefill(model, prompt, &mut cache, 2048).unwrap();
    let mut out = vec![];
    for _ in 0..n {
        let t = wick::sample::argmax(&l);
        out.push(t);
        l = wick::generate::step_logits(model, &[t], &mut cache).unwrap();
    }
    out
}
