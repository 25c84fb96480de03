//! Training adapters against mlx_lm: the loss and the gradients of the LoRA / DoRA parameters
//! for one batch (tests/golden/lora_grads, made by mlx_lm's `default_loss` and
//! `nn.value_and_grad` from the same initial adapters), dense and 4-bit bases.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use wick::lora::train;
use wick::nn::lora::FineTuneType;

#[test]
fn loss_and_adapter_gradients_match_mlx_lm() {
    lora_gradients_match_mlx_lm(&Device::Cpu);
}

/// 50 steps of `wick lora` on mlx_lm's reference run (tests/golden/lora_run: a tiny random
/// llama in the default model's vocabulary, 4-bit quantized by mlx_lm, the committed dataset),
/// from the same initial adapters, same data and order: every reported training loss and every
/// validation loss within 2 % of mlx_lm's, validation loss going down, and the adapter folder
/// written as mlx_lm writes it.
#[test]
fn fifty_steps_follow_mlx_lm_loss_curve() {
    let tmp = tempfile::tempdir().unwrap();
    let q4 = lora_run_model(tmp.path());
    let adapters = tmp.path().join("adapters");
    let (out, lines) = follow_mlx_lm_run(&golden("lora_run"), &q4, &adapters, 25);
    let (first, last) = (out.val_losses[0].1, out.val_losses.last().unwrap().1);
    assert!(last < 0.8 * first, "validation loss {first} -> {last} did not go down");
    // mlx_lm's report lines and files
    assert!(
        lines.iter().any(|l| l.starts_with("Iter 5: Train loss ") && l.contains("Learning Rate 1.000e-03")),
        "{lines:#?}"
    );
    assert!(lines.iter().any(|l| l.starts_with("Iter 1: Val loss ")));
    for f in [
        "adapters.safetensors",
        "adapter_config.json",
        "0000025_adapters.safetensors",
        "0000050_adapters.safetensors",
        "loss.svg",
    ] {
        assert!(adapters.join(f).is_file(), "{f} missing");
    }
    let ac = wick::nn::lora::AdapterConfig::read(&adapters).unwrap();
    assert_eq!((ac.num_layers, ac.lora.rank), (2, 8));
    // the trained adapters load for generation and change the model
    let a = wick::engine::load_model_with(&q4, Some(DType::F32), &Device::Cpu, Some(&adapters)).unwrap();
    let b = wick::engine::load_model_with(&q4, Some(DType::F32), &Device::Cpu, None).unwrap();
    let x = Tensor::new(&[[1u32, 2, 3, 4, 5]], &Device::Cpu).unwrap();
    let la: Vec<f32> =
        a.model.forward(&x, &mut a.model.make_cache(None), true).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let lb: Vec<f32> =
        b.model.forward(&x, &mut b.model.make_cache(None), true).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert!(max_abs_diff(&la, &lb) > 1e-3);

    // mlx_lm loads the adapters wick wrote and generates the same greedy tokens
    let prompt = [504u32, 2365, 282, 253, 5150];
    let want = greedy(a.model.as_ref(), &prompt, 12);
    assert_eq!(mlx_greedy(&q4, &adapters, &prompt, 12), want, "mlx_lm's greedy tokens with wick's adapters");
    assert_ne!(want, greedy(b.model.as_ref(), &prompt, 12), "the adapters should change the greedy tokens");
}

/// Trains adapters on `model` with the config of mlx_lm's reference run in `gold` (run.json),
/// from its initial adapters (init_adapters.safetensors), saving every `save_every` steps into
/// `adapters`; asserts every reported training loss (and learning rate) and every validation
/// loss within 2 % of mlx_lm's. Returns the outcome and the report lines.
fn follow_mlx_lm_run(
    gold_dir: &std::path::Path,
    model: &std::path::Path,
    adapters: &std::path::Path,
    save_every: usize,
) -> (train::TrainOutcome, Vec<String>) {
    let gold: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(gold_dir.join("run.json")).unwrap()).unwrap();
    let r = &gold["config"];
    let mut m = train::defaults();
    for k in [
        "iters",
        "batch_size",
        "learning_rate",
        "steps_per_report",
        "steps_per_eval",
        "val_batches",
        "num_layers",
        "seed",
        "lora_parameters",
    ] {
        m.insert(k.into(), r[k].clone());
    }
    m.insert("train".into(), serde_json::json!(true));
    m.insert("data".into(), serde_json::json!(root().join("tests/data/lora")));
    m.insert("adapter_path".into(), serde_json::json!(adapters));
    m.insert("resume_adapter_file".into(), serde_json::json!(gold_dir.join("init_adapters.safetensors")));
    m.insert("save_every".into(), serde_json::json!(save_every));
    let cfg = train::TrainConfig::from_map(m, "test").unwrap();
    let mut lines = vec![];
    let out = train::run(&cfg, model, &Device::Cpu, &mut |s| lines.push(s.to_string())).unwrap();

    let want = gold["train"].as_array().unwrap();
    assert_eq!(out.reports.len(), want.len(), "{lines:#?}");
    for (got, w) in out.reports.iter().zip(want) {
        assert_eq!(got.iteration as u64, w["iteration"].as_u64().unwrap());
        let wl = w["train_loss"].as_f64().unwrap();
        let rel = (got.train_loss - wl).abs() / wl;
        assert!(
            rel < 0.02,
            "iter {}: train loss {} vs mlx_lm {wl} ({:.2} %)",
            got.iteration,
            got.train_loss,
            rel * 100.0
        );
        let lr = w["learning_rate"].as_f64().unwrap();
        assert!((got.learning_rate - lr).abs() < 1e-12 + 1e-6 * lr);
    }
    let want = gold["val"].as_array().unwrap();
    assert_eq!(out.val_losses.len(), want.len());
    for ((it, l), w) in out.val_losses.iter().zip(want) {
        assert_eq!(*it as u64, w["iteration"].as_u64().unwrap());
        let wl = w["val_loss"].as_f64().unwrap();
        assert!((l - wl).abs() / wl < 0.02, "iter {it}: val loss {l} vs mlx_lm {wl}");
    }
    (out, lines)
}

/// The acceptance run on the default model itself: 4-bit g64 (wick's conversion, bit-exact with
/// mlx_lm's), 50 steps of LoRA on the committed dataset from mlx_lm's initial adapters, against
/// mlx_lm's trainer (tests/golden/lora_run_default, computed on a GPU by mlx's CUDA backend in
/// f32; wick computes in f32 on the CPU): every reported loss within 2 %, validation loss down.
#[test]
fn default_model_fifty_steps_follow_mlx_lm_loss_curve() {
    let tmp = tempfile::tempdir().unwrap();
    let q4 = tmp.path().join("q4");
    let opts = wick::convert::ConvertOptions {
        quantize: Some(wick::convert::QuantizeOptions {
            params: wick::quant::QuantParams::new(4, 64, "test").unwrap(),
            recipe: None,
        }),
        ..Default::default()
    };
    wick::convert::convert(&default_model(), &q4, &opts).unwrap();
    let (out, lines) = follow_mlx_lm_run(&golden("lora_run_default"), &q4, &tmp.path().join("adapters"), 1000);
    let (first, last) = (out.val_losses[0].1, out.val_losses.last().unwrap().1);
    assert!(last < 0.5 * first, "validation loss {first} -> {last} did not go down: {lines:#?}");
    for l in &lines {
        eprintln!("{l}");
    }
}

/// mlx_lm's reference-run model (tests/golden/lora_run: a tiny random llama, 4-bit) with the
/// default model's tokenizer files, in a folder under `dir`.
fn lora_run_model(dir: &std::path::Path) -> std::path::PathBuf {
    let q4 = dir.join("model");
    std::fs::create_dir(&q4).unwrap();
    for (src, f) in [
        (golden("lora_run").join("model"), "model.safetensors"),
        (golden("lora_run").join("model"), "config.json"),
        (default_model(), "tokenizer.json"),
        (default_model(), "tokenizer_config.json"),
    ] {
        std::fs::copy(src.join(f), q4.join(f)).unwrap();
    }
    q4
}

/// mlx_lm's greedy tokens (f32) after `prompt` with the model and adapters (tests/mlx_greedy.py).
fn mlx_greedy(model: &std::path::Path, adapters: &std::path::Path, prompt: &[u32], n: usize) -> Vec<u32> {
    let ids: Vec<String> = prompt.iter().map(|t| t.to_string()).collect();
    let py = std::process::Command::new("python3")
        .arg(root().join("tests/mlx_greedy.py"))
        .args([model.to_str().unwrap(), adapters.to_str().unwrap(), &ids.join(","), &n.to_string()])
        .output()
        .expect("python3 with mlx and mlx-lm (tests/requirements.txt)");
    assert!(py.status.success(), "mlx_lm failed: {}", String::from_utf8_lossy(&py.stderr));
    serde_json::from_slice(&py.stdout).unwrap()
}

/// Full fine-tuning (`fine_tune_type: full`): refused on a quantized model with mlx_lm's reason;
/// on its float (dequantized) form, 10 steps lower the validation loss, the file holds the last
/// block's own tensors under the model's names, and both wick and mlx_lm load it as adapters
/// and generate the same greedy tokens. (Its gradients are checked against mlx_lm's in
/// `loss_and_adapter_gradients_match_mlx_lm`.)
#[test]
fn full_fine_tuning_trains_the_last_blocks_and_loads_in_mlx_lm() {
    let tmp = tempfile::tempdir().unwrap();
    let q4 = lora_run_model(tmp.path());
    let config = |adapters: &std::path::Path| {
        let mut m = train::defaults();
        for (k, v) in [
            ("fine_tune_type", serde_json::json!("full")),
            ("num_layers", serde_json::json!(1)),
            ("iters", serde_json::json!(10)),
            ("batch_size", serde_json::json!(4)),
            ("learning_rate", serde_json::json!(1e-3)),
            ("steps_per_report", serde_json::json!(5)),
            ("steps_per_eval", serde_json::json!(10)),
            ("val_batches", serde_json::json!(-1)),
            ("train", serde_json::json!(true)),
            ("data", serde_json::json!(root().join("tests/data/lora"))),
            ("adapter_path", serde_json::json!(adapters)),
        ] {
            m.insert(k.into(), v);
        }
        train::TrainConfig::from_map(m, "test").unwrap()
    };
    let err = train::run(&config(&tmp.path().join("a4")), &q4, &Device::Cpu, &mut |_| {}).unwrap_err();
    assert!(format!("{err:#}").contains("quantized weights cannot be trained"), "{err:#}");

    let dense = tmp.path().join("dense");
    let opts = wick::convert::ConvertOptions { dequantize: true, ..Default::default() };
    wick::convert::convert(&q4, &dense, &opts).unwrap();
    let adapters = tmp.path().join("full");
    let mut lines = vec![];
    let out = train::run(&config(&adapters), &dense, &Device::Cpu, &mut |s| lines.push(s.to_string())).unwrap();
    let (first, last) = (out.val_losses[0].1, out.val_losses.last().unwrap().1);
    assert!(last < first, "validation loss {first} -> {last} did not go down: {lines:#?}");
    let saved = load_f32(&adapters.join("adapters.safetensors"));
    let mut names: Vec<&String> = saved.keys().collect();
    names.sort();
    // the last of two blocks, whole: two norms and seven projections
    assert_eq!(names.len(), 9, "{names:?}");
    assert!(names.iter().all(|n| n.starts_with("model.layers.1.")), "{names:?}");
    assert!(names.contains(&&"model.layers.1.input_layernorm.weight".to_string()));
    let ac = wick::nn::lora::AdapterConfig::read(&adapters).unwrap();
    assert_eq!((ac.fine_tune_type, ac.num_layers), (FineTuneType::Full, 1));

    let a = wick::engine::load_model_with(&dense, Some(DType::F32), &Device::Cpu, Some(&adapters)).unwrap();
    let b = wick::engine::load_model_with(&dense, Some(DType::F32), &Device::Cpu, None).unwrap();
    let prompt = [504u32, 2365, 282, 253, 5150];
    let want = greedy(a.model.as_ref(), &prompt, 12);
    assert_ne!(want, greedy(b.model.as_ref(), &prompt, 12), "the trained weights should change the greedy tokens");
    assert_eq!(mlx_greedy(&dense, &adapters, &prompt, 12), want, "mlx_lm's greedy tokens with wick's full fine-tune");
}
