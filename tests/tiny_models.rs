//! Forward pass of tiny random-weight models made by mlx_lm (same weights), one per architecture:
//! full-sequence logits and chunked-prefill + decode logits through the KV cache, in f32, to
//! 1e-4; the same model quantized by mlx_lm (4-bit, group 32) against mlx_lm's 4-bit logits to 1e-3.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use wick::models::load_model;

fn check(name: &str) {
    check_folder(name, &golden(name), 1e-4);
    check_folder(name, &golden(name).join("q4"), 1e-3);
}

fn check_folder(name: &str, dir: &std::path::Path, tol: f32) {
    let inputs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden(name).join("inputs.json")).unwrap()).unwrap();
    let ids: Vec<u32> = inputs["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let gold = load_f32(&dir.join("logits.safetensors"));
    let m = load_model(dir, Some(DType::F32), &Device::Cpu).unwrap();
    let model = m.model.as_ref();

    // whole sequence at once
    let mut cache = model.make_cache(None);
    let x = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let full = model.forward(&x, &mut cache, false).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let d = max_abs_diff(&full, &gold["full"].1);
    assert!(d < tol, "{}: full-sequence logits differ from mlx_lm by {d}", dir.display());

    // chunked prefill, then decode one token at a time
    let mut cache = model.make_cache(None);
    let mut got = vec![];
    let mut bounds: Vec<(usize, usize)> = inputs["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c[0].as_u64().unwrap() as usize, c[1].as_u64().unwrap() as usize))
        .collect();
    let last = bounds.last().unwrap().1;
    bounds.extend((last..ids.len()).map(|t| (t, t + 1)));
    for (a, b) in bounds {
        let x = Tensor::new(&ids[a..b], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        got.extend(model.forward(&x, &mut cache, false).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    let d = max_abs_diff(&got, &gold["cached"].1);
    assert!(d < tol, "{}: cached logits differ from mlx_lm by {d}", dir.display());
}

#[test]
fn tiny_llama3_rope_scaling_gqa_bias_matches_mlx_lm() {
    check("tiny_llama3");
}

#[test]
fn tiny_mistral_tied_linear_rope_matches_mlx_lm() {
    check("tiny_mistral");
}

#[test]
fn tiny_sliding_window_layers_match_mlx_lm_across_chunks_and_wraparound() {
    check("tiny_mistral_swa");
}

#[test]
fn tiny_qwen2_qkv_bias_matches_mlx_lm() {
    check("tiny_qwen2");
}

#[test]
fn tiny_qwen3_qk_norm_yarn_rope_matches_mlx_lm() {
    check("tiny_qwen3");
}

#[test]
fn tiny_llama_dynamic_ntk_rope_matches_mlx_lm() {
    check("tiny_llama_dynamic");
}

#[test]
fn tiny_phi3_fused_projections_longrope_matches_mlx_lm() {
    check("tiny_phi3");
}

#[test]
fn tiny_gemma2_softcaps_sandwich_norms_match_mlx_lm() {
    check("tiny_gemma2");
}

#[test]
fn tiny_gemma3_local_global_layers_match_mlx_lm() {
    check("tiny_gemma3");
}

#[test]
fn tiny_phi2_parallel_layernorm_partial_rotary_matches_mlx_lm() {
    check("tiny_phi");
}
