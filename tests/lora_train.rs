//! Training adapters against mlx_lm: the loss and the gradients of the LoRA / DoRA parameters
//! for one batch (tests/golden/lora_grads, made by mlx_lm's `default_loss` and
//! `nn.value_and_grad` from the same initial adapters), dense and 4-bit bases.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use wick::lora::{train, AdapterConfig, Adapters, FineTuneType, LoraParameters};
use wick::models::load_model_adapted;

#[test]
fn loss_and_adapter_gradients_match_mlx_lm() {
    let root = golden("lora_grads");
    let mut cases: Vec<_> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().path()).collect();
    cases.sort();
    assert_eq!(cases.len(), 4);
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
        let adapters = Adapters::for_training(&dir, config, 2, Some(&init), 0).unwrap();
        let base = golden(c["base"].as_str().unwrap());
        let m = load_model_adapted(&base, Some(DType::F32), &Device::Cpu, Some(&adapters)).unwrap();
        let rows: Vec<Vec<u32>> = c["batch"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect())
            .collect();
        let batch = Tensor::new(rows, &Device::Cpu).unwrap();
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
        let grads = loss.backward().unwrap();
        let gold = load_f32(&dir.join("grads.safetensors"));
        let vars = adapters.trainable();
        assert_eq!(vars.len(), gold.len(), "{}: trainable tensors", dir.display());
        for (name, var) in &vars {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient"));
            let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
            let (_, w) = gold.get(name).unwrap_or_else(|| panic!("{name}: not in mlx_lm's gradients"));
            let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(scale > 0.0, "{name}: mlx_lm's gradient is zero");
            let d = max_abs_diff(&g, w);
            assert!(d <= 1e-4 * scale, "{} {name}: gradient differs by {d} (max |g| {scale})", dir.display());
        }
    }
}
