//! Bad input gets a clear message naming the file/field and a non-zero exit — never a panic.

mod common;

use common::*;
use std::path::Path;

/// Runs wick; asserts a non-zero exit without a panic, and returns stderr.
fn fails(args: &[&str]) -> String {
    let out = wick().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "expected failure for {args:?}");
    assert!(!err.contains("panicked"), "panic for {args:?}: {err}");
    assert_eq!(out.status.code(), Some(1), "exit code for {args:?}: {err}");
    err
}

/// A copy of a tiny golden model plus the default model's tokenizer files.
fn model_copy(dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(golden("tiny_llama3").join(f), dst.join(f)).unwrap();
    }
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(default_model().join(f), dst.join(f)).unwrap();
    }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(v.as_object_mut().unwrap());
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
}

#[test]
fn missing_folder() {
    let err = fails(&["generate", "--model", "/nonexistent/model-folder", "-m", "1"]);
    assert!(err.contains("/nonexistent/model-folder") && err.contains("not found"), "{err}");
}

#[test]
fn config_missing_a_key() {
    let t = tempfile::tempdir().unwrap();
    model_copy(t.path());
    edit_config(t.path(), |c| {
        c.remove("hidden_size");
    });
    let err = fails(&["generate", "--model", t.path().to_str().unwrap(), "-m", "1"]);
    assert!(err.contains("config.json") && err.contains("hidden_size"), "{err}");
}

#[test]
fn truncated_safetensors() {
    let t = tempfile::tempdir().unwrap();
    model_copy(t.path());
    let p = t.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let err = fails(&["generate", "--model", t.path().to_str().unwrap(), "-m", "1"]);
    assert!(err.contains("model.safetensors") && err.contains("truncated"), "{err}");
}

#[test]
fn tensor_with_wrong_shape() {
    let t = tempfile::tempdir().unwrap();
    model_copy(t.path());
    // config says a bigger MLP than the weights hold
    edit_config(t.path(), |c| {
        c.insert("intermediate_size".into(), 100.into());
    });
    let err = fails(&["generate", "--model", t.path().to_str().unwrap(), "-m", "1"]);
    assert!(err.contains("gate_proj.weight") && err.contains("[96, 64]") && err.contains("[100, 64]"), "{err}");
}

#[test]
fn unknown_model_type_lists_supported() {
    let t = tempfile::tempdir().unwrap();
    model_copy(t.path());
    edit_config(t.path(), |c| {
        c.insert("model_type".into(), "transformer9000".into());
    });
    let err = fails(&["generate", "--model", t.path().to_str().unwrap(), "-m", "1"]);
    assert!(err.contains("transformer9000") && err.contains("llama") && err.contains("mistral"), "{err}");
}

#[test]
fn prompt_longer_than_context() {
    let t = tempfile::tempdir().unwrap();
    model_copy(t.path());
    // tiny_llama3 has max_position_embeddings = 256
    let prompt = "hello ".repeat(400);
    let err =
        fails(&["generate", "--model", t.path().to_str().unwrap(), "--ignore-chat-template", "-m", "1", "-p", &prompt]);
    assert!(err.contains("context of 256 tokens") && err.contains("max_position_embeddings"), "{err}");
}

#[test]
fn bad_flags_name_the_flag() {
    let err = fails(&["generate", "--model", default_model().to_str().unwrap(), "--dtype", "int3", "-m", "1"]);
    assert!(err.contains("--dtype") && err.contains("int3"), "{err}");
    let err = fails(&[
        "generate",
        "--model",
        default_model().to_str().unwrap(),
        "--chat-template-config",
        "{oops",
        "-m",
        "1",
    ]);
    assert!(err.contains("--chat-template-config"), "{err}");
}

#[test]
fn generation_feature_flags_reject_bad_values() {
    let m = default_model();
    let m = m.to_str().unwrap();
    let err = fails(&["generate", "--model", m, "--kv-bits", "7", "-m", "1"]);
    assert!(err.contains("--kv-bits") && err.contains("bits = 7"), "{err}");
    let err = fails(&["generate", "--model", m, "--kv-bits", "8", "--max-kv-size", "64", "-m", "1"]);
    assert!(err.contains("--kv-bits") && err.contains("rotating"), "{err}");
    let err = fails(&["generate", "--model", m, "--prompt-cache-file", "/nonexistent/c.safetensors"]);
    assert!(err.contains("/nonexistent/c.safetensors"), "{err}");
    let not_cache = default_model().join("model.safetensors");
    let err = fails(&["generate", "--model", m, "--prompt-cache-file", not_cache.to_str().unwrap(), "-m", "1"]);
    assert!(err.contains("not a prompt cache file"), "{err}");
    let err = fails(&["generate", "--model", m, "--draft-model", m, "--num-draft-tokens", "0", "-m", "1"]);
    assert!(err.contains("--num-draft-tokens"), "{err}");
    let err = fails(&["perplexity", "--model", m, "--data-path", "/nonexistent/data.jsonl"]);
    assert!(err.contains("/nonexistent/data.jsonl"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("valid.jsonl");
    std::fs::write(&bad, "{\"text\": \"fine\"}\n{\"nope\": 1}\n").unwrap();
    let err = fails(&["perplexity", "--model", m, "--data-path", bad.to_str().unwrap()]);
    assert!(err.contains("line 2") && err.contains("valid.jsonl"), "{err}");
    let err = fails(&["perplexity", "--model", m, "--data-path", bad.to_str().unwrap(), "--num-samples", "0"]);
    assert!(err.contains("--num-samples"), "{err}");
    let out = dir.path().join("sub/c.safetensors");
    let err = fails(&["cache-prompt", "--model", m, "--prompt", "hi", "--prompt-cache-file", out.to_str().unwrap()]);
    assert!(err.contains("sub"), "{err}");
}

#[test]
fn generate_on_default_model_runs_and_reports_stats() {
    let out = wick()
        .args(["generate", "--model", default_model().to_str().unwrap(), "-p", "Hi", "-m", "4"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    for line in ["Prompt: ", "tokens-per-sec", "Generation: ", "Peak memory: "] {
        assert!(s.contains(line), "missing {line:?} in {s}");
    }
}

/// The tiny model quantized (4-bit, group 32) by wick into `dst`, with the default tokenizer.
fn quantized_copy(dst: &Path) {
    let src = tempfile::tempdir().unwrap();
    model_copy(src.path());
    let opts = wick::convert::ConvertOptions {
        quantize: Some(wick::convert::QuantizeOptions {
            params: wick::quant::QuantParams::new(4, 32, "test").unwrap(),
            recipe: None,
        }),
        ..Default::default()
    };
    wick::convert::convert(src.path(), dst, &opts).unwrap();
}

/// Rewrites one tensor of a model folder's model.safetensors.
fn replace_tensor(dir: &Path, name: &str, t: candle_core::Tensor) {
    let p = dir.join("model.safetensors");
    let mut all = candle_core::safetensors::load(&p, &candle_core::Device::Cpu).unwrap();
    all.insert(name.to_string(), t);
    candle_core::safetensors::save(&all, &p).unwrap();
}

#[test]
fn quantized_tiny_model_loads_and_runs() {
    let t = tempfile::tempdir().unwrap();
    let q = t.path().join("q");
    quantized_copy(&q);
    let m = wick::engine::load_model(&q, None, &candle_core::Device::Cpu).unwrap();
    let ids = candle_core::Tensor::new(&[[1u32, 5, 9, 127]], &candle_core::Device::Cpu).unwrap();
    let mut cache = m.model.make_cache(None);
    let logits = m.model.forward(&ids, &mut cache, false).unwrap();
    assert_eq!(logits.dims(), &[1, 4, 128]);
    let v: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
    assert!(v.iter().all(|x| x.is_finite()));
}

#[test]
fn tokenizer_that_does_not_match_the_model() {
    let t = tempfile::tempdir().unwrap();
    model_copy(t.path());
    // the tiny model has 128 tokens; the default tokenizer's ids go far beyond
    let err = fails(&["generate", "--model", t.path().to_str().unwrap(), "-m", "1", "-p", "hello world"]);
    assert!(err.contains("vocabulary of 128"), "{err}");
}

#[test]
fn unsupported_bits_or_group_size_in_config() {
    let t = tempfile::tempdir().unwrap();
    let q = t.path().join("q");
    quantized_copy(&q);
    edit_config(&q, |c| {
        c.insert("quantization".into(), serde_json::json!({"bits": 7, "group_size": 32}));
    });
    let err = fails(&["generate", "--model", q.to_str().unwrap(), "-m", "1"]);
    assert!(err.contains("bits = 7") && err.contains("config.json"), "{err}");
    edit_config(&q, |c| {
        c.insert("quantization".into(), serde_json::json!({"bits": 4, "group_size": 48}));
    });
    let err = fails(&["generate", "--model", q.to_str().unwrap(), "-m", "1"]);
    assert!(err.contains("group_size = 48"), "{err}");
}

#[test]
fn scales_with_the_wrong_shape() {
    let t = tempfile::tempdir().unwrap();
    let q = t.path().join("q");
    quantized_copy(&q);
    let layer = "model.layers.1.mlp.up_proj";
    edit_config(&q, |c| {
        c["quantization"]
            .as_object_mut()
            .unwrap()
            .insert(layer.into(), serde_json::json!({"bits": 4, "group_size": 32}));
    });
    // up_proj is 96 × 64: 2 groups of 32 per row; store 3
    replace_tensor(
        &q,
        &format!("{layer}.scales"),
        candle_core::Tensor::ones((96, 3), candle_core::DType::F16, &candle_core::Device::Cpu).unwrap(),
    );
    let err = fails(&["generate", "--model", q.to_str().unwrap(), "-m", "1"]);
    assert!(
        err.contains(layer) && err.contains("scales") && err.contains("[96, 3]") && err.contains("[96, 2]"),
        "{err}"
    );
}

#[test]
fn packed_width_that_disagrees_with_bits() {
    let t = tempfile::tempdir().unwrap();
    let q = t.path().join("q");
    quantized_copy(&q);
    let layer = "model.layers.0.self_attn.o_proj";
    // 4-bit rows of 64 inputs pack to 8 words; store 7
    replace_tensor(
        &q,
        &format!("{layer}.weight"),
        candle_core::Tensor::zeros((64, 7), candle_core::DType::U32, &candle_core::Device::Cpu).unwrap(),
    );
    let err = fails(&["generate", "--model", q.to_str().unwrap(), "-m", "1"]);
    assert!(err.contains(layer) && err.contains("7 u32 words"), "{err}");
    // listed in the config with explicit bits: the width must match them
    edit_config(&q, |c| {
        c["quantization"]
            .as_object_mut()
            .unwrap()
            .insert(layer.into(), serde_json::json!({"bits": 4, "group_size": 32}));
    });
    let err = fails(&["generate", "--model", q.to_str().unwrap(), "-m", "1"]);
    assert!(err.contains(layer) && err.contains("[64, 7]") && err.contains("[64, 8]"), "{err}");
}

#[test]
fn override_for_a_layer_that_does_not_exist() {
    let t = tempfile::tempdir().unwrap();
    let q = t.path().join("q");
    quantized_copy(&q);
    edit_config(&q, |c| {
        c["quantization"]
            .as_object_mut()
            .unwrap()
            .insert("model.layers.9.mlp.up_proj".into(), serde_json::json!({"bits": 8, "group_size": 64}));
    });
    let err = fails(&["generate", "--model", q.to_str().unwrap(), "-m", "1"]);
    assert!(err.contains("model.layers.9.mlp.up_proj") && err.contains("does not have"), "{err}");
}

#[test]
fn convert_refuses_an_existing_output_without_force_and_bad_recipes() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    model_copy(&src);
    let out = t.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let err = fails(&["convert", "--hf-path", src.to_str().unwrap(), "--mlx-path", out.to_str().unwrap(), "-q"]);
    assert!(err.contains("--mlx-path") && err.contains("--force"), "{err}");
    let err = fails(&[
        "convert",
        "--hf-path",
        src.to_str().unwrap(),
        "--mlx-path",
        t.path().join("o2").to_str().unwrap(),
        "-q",
        "--quant-predicate",
        "mixed_9_9",
    ]);
    assert!(err.contains("--quant-predicate") && err.contains("mixed_3_6"), "{err}");
    let err = fails(&[
        "convert",
        "--hf-path",
        src.to_str().unwrap(),
        "--mlx-path",
        t.path().join("o3").to_str().unwrap(),
        "-q",
        "--q-bits",
        "7",
    ]);
    assert!(err.contains("bits = 7"), "{err}");
    // a float mode with a group size mlx does not allow: mlx's refusal, word for word
    let o4 = t.path().join("o4");
    let err = fails(&[
        "convert",
        "--hf-path",
        src.to_str().unwrap(),
        "--mlx-path",
        o4.to_str().unwrap(),
        "-q",
        "--q-mode",
        "nvfp4",
        "--q-group-size",
        "32",
    ]);
    assert!(err.contains("[quantize] nvfp4 quantization requires group size 16 but got 32."), "{err}");
    let err = fails(&[
        "convert",
        "--hf-path",
        src.to_str().unwrap(),
        "--mlx-path",
        o4.to_str().unwrap(),
        "-q",
        "--q-mode",
        "mxfp8",
        "--q-bits",
        "4",
    ]);
    assert!(err.contains("[quantize] mxfp8 quantization requires bits to be 8 but got 4."), "{err}");
    let err = fails(&[
        "convert",
        "--hf-path",
        src.to_str().unwrap(),
        "--mlx-path",
        o4.to_str().unwrap(),
        "-q",
        "--q-mode",
        "mxfp4",
        "--quant-predicate",
        "mixed_3_6",
    ]);
    assert!(err.contains("Quant predicates only support 'affine' quantization."), "{err}");
    assert!(!o4.exists(), "no output for a refused mode");
    assert!(!t.path().join("o2").exists() && !t.path().join("o3").exists(), "no half-written output");
    // with --force the existing folder is replaced by a complete one
    let ok = wick()
        .args([
            "convert",
            "--hf-path",
            src.to_str().unwrap(),
            "--mlx-path",
            out.to_str().unwrap(),
            "-q",
            "--q-group-size",
            "32",
            "--force",
        ])
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(out.join("config.json").is_file() && out.join("model.safetensors").is_file());
}

/// A copy of the tiny qwen3_moe golden (f32, or the 4-bit one from `q4/`) with the default
/// model's tokenizer files.
fn moe_copy(dst: &Path, sub: &str) {
    std::fs::create_dir_all(dst).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(golden("tiny_qwen3_moe").join(sub).join(f), dst.join(f)).unwrap();
    }
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(default_model().join(f), dst.join(f)).unwrap();
    }
}

#[test]
fn moe_config_disagreeing_with_the_expert_tensors() {
    for sub in ["", "q4"] {
        let t = tempfile::tempdir().unwrap();
        moe_copy(t.path(), sub);
        let m = t.path().to_str().unwrap();
        // fewer experts than the tensors stack
        edit_config(t.path(), |c| {
            c.insert("num_experts".into(), 4.into());
        });
        let err = fails(&["generate", "--model", m, "-m", "1"]);
        assert!(err.contains("model.layers.1.mlp.") && err.contains("[8, ") && err.contains("[4, "), "{sub}: {err}");
        // more experts per token than there are
        edit_config(t.path(), |c| {
            c.insert("num_experts".into(), 8.into());
            c.insert("num_experts_per_tok".into(), 9.into());
        });
        let err = fails(&["generate", "--model", m, "-m", "1"]);
        assert!(err.contains("num_experts_per_tok is 9") && err.contains("8 experts"), "{sub}: {err}");
        // a layer list that makes a dense layer sparse
        edit_config(t.path(), |c| {
            c.insert("num_experts_per_tok".into(), 2.into());
            c.insert("mlp_only_layers".into(), serde_json::json!([]));
        });
        let err = fails(&["generate", "--model", m, "-m", "1"]);
        assert!(err.contains("model.layers.3.mlp.gate") && err.contains("missing"), "{sub}: {err}");
    }
}

#[test]
fn moe_missing_expert_tensor_in_the_per_expert_layout() {
    let t = tempfile::tempdir().unwrap();
    moe_copy(t.path(), "");
    let path = t.path().join("model.safetensors");
    let mut out = std::collections::HashMap::new();
    for (k, v) in candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap() {
        let Some((head, proj)) = k.split_once(".switch_mlp.") else {
            out.insert(k, v);
            continue;
        };
        for e in 0..v.dim(0).unwrap() {
            // expert 5 of layer 1 has no up projection
            if !(head == "model.layers.1.mlp" && e == 5 && proj.starts_with("up_proj")) {
                out.insert(format!("{head}.experts.{e}.{proj}"), v.get(e).unwrap());
            }
        }
    }
    candle_core::safetensors::save(&out, &path).unwrap();
    let err = fails(&["generate", "--model", t.path().to_str().unwrap(), "-m", "1"]);
    assert!(err.contains("model.layers.1.mlp.experts.5.up_proj.weight") && err.contains("8 experts"), "{err}");
    assert!(err.contains(t.path().to_str().unwrap()), "{err}");
}

/// A latent-attention model whose config.json disagrees with its tensors: the error names the
/// tensor, its shape and the config fields that size it.
#[test]
fn latent_attention_ranks_that_do_not_match_the_tensors() {
    for (field, value, tensor, fields) in [
        ("kv_lora_rank", 48, "kv_a_proj_with_mqa.weight", "kv_lora_rank 48 + qk_rope_head_dim 16"),
        ("v_head_dim", 16, "unembed_out.weight", "v_head_dim 16"),
        ("q_lora_rank", 24, "q_a_proj.weight", "q_lora_rank 24"),
    ] {
        let t = tempfile::tempdir().unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(golden("tiny_deepseek_v3").join(f), t.path().join(f)).unwrap();
        }
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(default_model().join(f), t.path().join(f)).unwrap();
        }
        edit_config(t.path(), |c| {
            c.insert(field.into(), value.into());
        });
        let err = fails(&["generate", "--model", t.path().to_str().unwrap(), "-m", "1"]);
        assert!(err.contains(tensor) && err.contains(fields), "{field}: {err}");
    }
}
