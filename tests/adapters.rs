//! Adapters made by mlx_lm (tests/reference/make_goldens.py, job `adapters`) loaded by wick:
//! LoRA and DoRA, dense and 4-bit bases, all layers or the top ones, default or listed keys.
//! The adapted logits must equal mlx_lm's, `fuse` must write the tensors mlx_lm.fuse writes and
//! a model with mlx_lm's fused logits, and the default model with an adapter must give mlx_lm's
//! greedy tokens through `wick generate --adapter-path` and through a fused folder.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use wick::convert::{convert, ConvertOptions};
use wick::engine::{load_model, load_model_with};

const CASES: [&str; 6] = [
    "tiny_llama3_lora",
    "tiny_llama3_q4_dora",
    "tiny_qwen2_dora",
    "tiny_qwen2_q4_lora",
    "tiny_qwen3_moe_lora",
    "tiny_gpt_oss_q4_lora",
];

fn json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Full-sequence f32 logits of the model in `dir` (with the adapters of `adapter`).
fn logits(dir: &std::path::Path, adapter: Option<&std::path::Path>, ids: &[u32]) -> Vec<f32> {
    let m = load_model_with(dir, Some(DType::F32), &Device::Cpu, adapter).unwrap();
    let mut cache = m.model.make_cache(None);
    let x = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    m.model.forward(&x, &mut cache, false).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn case(name: &str) -> (std::path::PathBuf, std::path::PathBuf, Vec<u32>, serde_json::Value) {
    let c = json(&golden(name).join("case.json"));
    let base = c["base"].as_str().unwrap();
    let ids = ids_of(&json(&golden(base.split('/').next().unwrap()).join("inputs.json"))["ids"]);
    (golden(base), golden(name), ids, c)
}

#[test]
fn adapted_logits_match_mlx_lm() {
    for name in CASES {
        let (base, adapter, ids, _) = case(name);
        let gold = load_f32(&adapter.join("logits.safetensors"));
        let got = logits(&base, Some(&adapter), &ids);
        let tol = if name.contains("q4") { 1e-3 } else { 1e-4 };
        let d = max_abs_diff(&got, &gold["adapted"].1);
        assert!(d < tol, "{name}: adapted logits differ from mlx_lm by {d}");
        // the adapter matters: without it the logits are far from the adapted ones
        let plain = logits(&base, None, &ids);
        let moved = max_abs_diff(&plain, &gold["adapted"].1);
        assert!(moved > 100.0 * tol, "{name}: the adapter changes the logits by only {moved}");
    }
}

#[test]
fn fuse_writes_what_mlx_lm_fuse_writes() {
    let tmp = tempfile::tempdir().unwrap();
    for name in CASES {
        let (base, adapter, ids, c) = case(name);
        let out = tmp.path().join(name);
        let opts = ConvertOptions { adapter: Some(adapter.clone()), ..Default::default() };
        convert(&base, &out, &opts).unwrap();

        // the fused layers' tensors
        let want = load_raw(&adapter.join("fused.safetensors"));
        let got = load_raw(&out.join("model.safetensors"));
        let layers = c["layers"].as_array().unwrap();
        assert_eq!(want.len(), layers.len() * if name.contains("q4") { 3 } else { 1 });
        for (k, w) in &want {
            let g = got.get(k).unwrap_or_else(|| panic!("{name}: fused folder lacks `{k}`"));
            assert_eq!(g.dims(), w.dims(), "{name}: `{k}` shape");
            assert_eq!(g.dtype(), w.dtype(), "{name}: `{k}` dtype");
            if k.ends_with(".weight") && w.dtype() == DType::U32 {
                // a re-quantized weight: where mlx_lm's float sum and ours differ in the last
                // bit, a group may round to the neighbouring code or pick the other extreme as
                // its anchor, so compare the dequantized weights to within one code step
                let layer = k.strip_suffix(".weight").unwrap();
                // the layer's bits and group size: its entry in the quantization block, else 4 / 32
                let q = &json(&base.join("config.json"))["quantization"];
                let entry = q.get(layer).filter(|e| e.is_object()).unwrap_or(q);
                let (bits, group) = (entry["bits"].as_u64().unwrap(), entry["group_size"].as_u64().unwrap());
                let deq = |t: &std::collections::HashMap<String, Tensor>| {
                    let p = wick::quant::QuantParams::new(bits as usize, group as usize, "test").unwrap();
                    let d = wick::ops::qmatmul::dequantize_tensor(
                        &t[k],
                        &t[&format!("{layer}.scales")],
                        &t[&format!("{layer}.biases")],
                        p,
                    )
                    .unwrap();
                    f32s(&d)
                };
                let step = f32s(&want[&format!("{layer}.scales")]).iter().fold(0f32, |m, x| m.max(x.abs()));
                let (a, b) = (deq(&got), deq(&want));
                let d = max_abs_diff(&a, &b);
                assert!(
                    d <= 1.01 * step,
                    "{name}: `{layer}` dequantized differs from mlx_lm.fuse's by {d} (step {step})"
                );
                let mean = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32;
                assert!(mean <= 0.02 * step, "{name}: `{layer}` dequantized mean difference {mean} (step {step})");
            } else if w.dtype().is_float() && !k.ends_with(".scales") && !k.ends_with(".biases") {
                let (a, b) = (f32s(g), f32s(w));
                let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
                let d = max_abs_diff(&a, &b);
                assert!(d <= 2e-3 * scale, "{name}: `{k}` differs from mlx_lm.fuse's by {d} (max |w| {scale})");
            }
        }
        // every other tensor is copied unchanged
        let orig = load_raw(&base.join("model.safetensors"));
        for (k, t) in &orig {
            if !want.contains_key(k) {
                assert_eq!(f32s(&got[k]), f32s(t), "{name}: `{k}` changed");
            }
        }

        // the fused model's logits
        let gold = load_f32(&adapter.join("logits.safetensors"));
        let d = max_abs_diff(&logits(&out, None, &ids), &gold["fused"].1);
        let tol = if name.contains("q4") { 2e-2 } else { 1e-2 };
        assert!(d < tol, "{name}: fused model's logits differ from mlx_lm's fused model by {d}");
    }
}

#[test]
fn fuse_dequantize_writes_a_float_model() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, adapter, ids, _) = case("tiny_qwen2_q4_lora");
    let out = tmp.path().join("deq");
    let st = wick()
        .args(["fuse", "--model", base.to_str().unwrap(), "--adapter-path", adapter.to_str().unwrap()])
        .args(["--save-path", out.to_str().unwrap(), "--dequantize"])
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let cfg = json(&out.join("config.json"));
    assert!(cfg.get("quantization").is_none(), "--dequantize leaves a quantization block");
    for (k, t) in load_raw(&out.join("model.safetensors")) {
        assert!(t.dtype().is_float(), "`{k}` is still {:?}", t.dtype());
        assert!(!k.ends_with(".scales"), "`{k}` left");
    }
    // the dequantized fused model computes what the adapted 4-bit model computes
    let gold = load_f32(&adapter.join("logits.safetensors"));
    let d = max_abs_diff(&logits(&out, None, &ids), &gold["adapted"].1);
    assert!(d < 1e-2, "dequantized fused logits differ from the adapted model's by {d}");
    // and running it again without --force is refused, naming the flag
    let again = wick()
        .args(["fuse", "--model", base.to_str().unwrap(), "--adapter-path", adapter.to_str().unwrap()])
        .args(["--save-path", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--save-path"));
}

/// The default model with an mlx_lm adapter: `wick generate --adapter-path` prints mlx_lm's
/// greedy text (up to the first eos), and so does the folder `wick fuse` writes.
#[test]
fn default_model_adapter_greedy_text_matches_mlx_lm() {
    let adapter = golden("smollm2_lora");
    let g = json(&adapter.join("greedy.json"));
    let tmp = tempfile::tempdir().unwrap();
    let fused = tmp.path().join("fused");
    let st = wick()
        .args(["fuse", "--model", default_model().to_str().unwrap(), "--adapter-path", adapter.to_str().unwrap()])
        .args(["--save-path", fused.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let base = json(&golden("smollm2_greedy.json"));
    let mut differs = false;
    for (i, c) in g["cases"].as_array().unwrap().iter().enumerate() {
        let want = c["greedy_text"].as_str().unwrap().split("<|im_end|>").next().unwrap();
        differs |= base["cases"][i]["greedy_f32"].as_array().unwrap()[..24] != c["greedy_f32"].as_array().unwrap()[..];
        for run in [
            vec!["--model", default_model().to_str().unwrap(), "--adapter-path", adapter.to_str().unwrap()],
            vec!["--model", fused.to_str().unwrap()],
        ] {
            let out = wick()
                .arg("generate")
                .args(&run)
                .args(["--dtype", "float32", "-m", "24", "-p", c["prompt"].as_str().unwrap()])
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            assert!(stdout.contains(&format!("==========\n{want}")), "{run:?}: {stdout}");
        }
    }
    assert!(differs, "the adapter should change at least one greedy answer of the base model");
}

#[test]
fn bad_adapters_get_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let base = golden("tiny_llama3");
    let load = |dir: &std::path::Path| match load_model_with(&base, Some(DType::F32), &Device::Cpu, Some(dir)) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => format!("{e:#}"),
    };
    // a missing folder
    let e = load(&tmp.path().join("nope"));
    assert!(e.contains("does not exist"), "{e}");
    // an adapter for another model: layers it does not have, or other shapes
    let e = load(&golden("smollm2_lora"));
    assert!(e.contains("model.layers.28.mlp.down_proj.lora_a") && e.contains("not adapter parameters"), "{e}");
    let d = tmp.path().join("rank");
    std::fs::create_dir(&d).unwrap();
    std::fs::copy(golden("tiny_llama3_lora").join("adapters.safetensors"), d.join("adapters.safetensors")).unwrap();
    std::fs::write(
        d.join("adapter_config.json"),
        r#"{"fine_tune_type": "lora", "num_layers": 1, "lora_parameters": {"rank": 8, "scale": 2.0}}"#,
    )
    .unwrap();
    let e = load(&d);
    assert!(e.contains("shape [64, 4]") && e.contains("different model"), "{e}");
    // `alpha` instead of `scale`
    let d = tmp.path().join("alpha");
    std::fs::create_dir(&d).unwrap();
    std::fs::copy(golden("tiny_llama3_lora").join("adapters.safetensors"), d.join("adapters.safetensors")).unwrap();
    std::fs::write(
        d.join("adapter_config.json"),
        r#"{"fine_tune_type": "lora", "num_layers": 1, "lora_parameters": {"rank": 4, "alpha": 16}}"#,
    )
    .unwrap();
    let e = load(&d);
    assert!(e.contains("alpha") && e.contains("scale") && e.contains("adapter_config.json"), "{e}");
    // a tensor that is no layer's adapter
    let d = tmp.path().join("extra");
    std::fs::create_dir(&d).unwrap();
    std::fs::copy(golden("tiny_llama3_lora").join("adapter_config.json"), d.join("adapter_config.json")).unwrap();
    let mut t = load_raw(&golden("tiny_llama3_lora").join("adapters.safetensors"));
    t.insert("model.layers.0.self_attn.nope.lora_a".into(), Tensor::zeros((64, 4), DType::F32, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&t, d.join("adapters.safetensors")).unwrap();
    let e = load(&d);
    assert!(e.contains("model.layers.0.self_attn.nope.lora_a") && e.contains("not adapter parameters"), "{e}");
    // the base model still loads without adapters
    assert!(load_model(&base, Some(DType::F32), &Device::Cpu).is_ok());
}

fn load_raw(path: &std::path::Path) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}
