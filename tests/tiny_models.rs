//! Forward pass of tiny random-weight models made by mlx_lm (same weights): full-sequence logits
//! and chunked-prefill + decode logits through the KV cache, in f32, to 1e-4.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use wick::models::load_model;

fn check(name: &str) {
    let dir = golden(name);
    let inputs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("inputs.json")).unwrap()).unwrap();
    let ids: Vec<u32> = inputs["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let gold = load_f32(&dir.join("logits.safetensors"));
    let m = load_model(&dir, Some(DType::F32), &Device::Cpu).unwrap();
    let model = m.model.as_ref();

    // whole sequence at once
    let mut cache = model.make_cache();
    let x = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let full = model.forward(&x, &mut cache, false).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let d = max_abs_diff(&full, &gold["full"].1);
    assert!(d < 1e-4, "{name}: full-sequence logits differ from mlx_lm by {d}");

    // chunked prefill, then decode one token at a time
    let mut cache = model.make_cache();
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
    assert!(d < 1e-4, "{name}: cached logits differ from mlx_lm by {d}");
}

#[test]
fn tiny_llama3_rope_scaling_gqa_bias_matches_mlx_lm() {
    check("tiny_llama3");
}

#[test]
fn tiny_mistral_tied_linear_rope_matches_mlx_lm() {
    check("tiny_mistral");
}
