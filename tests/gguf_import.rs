//! GGUF import of every architecture wick runs (tests/golden/gguf, written in llama.cpp's layout
//! by tests/reference/make_goldens.py --only gguf_tiny from the tiny mlx_lm models): the imported
//! folder's greedy tokens are mlx_lm's for the model the file describes; vocabularies tokenize as
//! Python's tokenizers do; every GGML type dequantizes as the `gguf` package does; bad files get
//! one line naming what is wrong.

mod common;

use candle_core::{DType, Device};
use common::*;
use std::path::{Path, PathBuf};
use wick::engine::generate::{generate, GenerateOptions};
use wick::engine::load_model;

fn gguf_golden(name: &str) -> PathBuf {
    golden("gguf").join(name)
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Imports `tiny_<name>.gguf` (float32) and checks mlx_lm's 32 greedy tokens.
fn check(name: &str) {
    let gold = read_json(&gguf_golden(&format!("{name}.json")));
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("imported");
    wick::convert::gguf::import(&gguf_golden(gold["gguf"].as_str().unwrap()), &out, Some(DType::F32), false)
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
    let m = load_model(&out, Some(DType::F32), &Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    let (prompt, want) = (ids(&gold["prompt"]), ids(&gold["tokens"]));
    let opts = GenerateOptions { max_tokens: want.len(), ..Default::default() };
    let mut got = vec![];
    generate(m.model.as_ref(), &prompt, &opts, &Default::default(), |t| {
        got.push(t);
        Ok(true)
    })
    .unwrap();
    assert_eq!(got, want, "{name}: greedy tokens of the imported GGUF differ from mlx_lm's");
    // the tokenizer files load
    let tok = wick::tokenizer::Tokenizer::load(&out).unwrap_or_else(|e| panic!("{name}: tokenizer: {e:#}"));
    assert!(tok.vocab_size() > 0);
}

#[test]
fn llama3_with_rope_freqs_biases_gqa() {
    check("tiny_llama3");
}

#[test]
fn mistral_tied_linear_rope_sentencepiece() {
    check("tiny_mistral");
}

#[test]
fn mixtral_as_llama_with_stacked_experts() {
    check("tiny_mixtral");
}

#[test]
fn smollm3_every_fourth_layer_without_rope() {
    check("tiny_smollm3");
}

#[test]
fn granite_multipliers_and_biases() {
    check("tiny_granite");
}

#[test]
fn qwen2_unpermuted_with_biases() {
    check("tiny_qwen2");
}

#[test]
fn qwen3_qk_norms_yarn() {
    check("tiny_qwen3");
}

#[test]
fn qwen2_moe_shared_expert() {
    check("tiny_qwen2_moe");
}

#[test]
fn qwen3_moe_dense_and_sparse_layers() {
    check("tiny_qwen3_moe");
}

#[test]
fn phi3_fused_projections_longrope_factors() {
    check("tiny_phi3");
}

#[test]
fn gemma2_norms_stored_plus_one_softcaps() {
    check("tiny_gemma2");
}

#[test]
fn gemma3_norms_stored_plus_one_sliding_layers() {
    check("tiny_gemma3");
}

/// Byte-level BPE under each family's pre-tokenizer and SentencePiece vocabularies (byte
/// fallback, with and without a leading space) encode as Python's tokenizers do, and decode back.
#[test]
fn olmo2_post_norms_whole_projection_qk_norms() {
    check("tiny_olmo2");
}

#[test]
fn olmo3_as_olmo2_with_sliding_layers_yarn() {
    check("tiny_olmo3");
}

#[test]
fn glm4_fused_gate_up_partial_rope_four_norms() {
    check("tiny_glm4");
}

#[test]
fn starcoder2_layernorm_biases_ungated_mlp() {
    check("tiny_starcoder2");
}

#[test]
fn cohere2_fixed_sliding_pattern_logit_scale_no_biases() {
    check("tiny_cohere2");
}

#[test]
fn exaone4_sliding_pattern_rope_freqs() {
    check("tiny_exaone4");
}

#[test]
fn seed_oss_post_attention_norm_output_bias() {
    check("tiny_seed_oss");
}

#[test]
fn hunyuan_dense_alpha_scaled_rope_base() {
    check("tiny_hunyuan_v1_dense");
}

#[test]
fn apertus_xielu_scalars_from_metadata() {
    check("tiny_apertus");
}

#[test]
fn vocabularies_tokenize_as_python_tokenizers() {
    let gold = read_json(&gguf_golden("tokenizers.json"));
    let gold = gold.as_object().unwrap();
    assert_eq!(gold.len(), 6);
    for (file, case) in gold {
        let (tj, tc) =
            wick::convert::gguf::tokenizer_files(&gguf_golden(file)).unwrap_or_else(|e| panic!("{file}: {e:#}"));
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("tokenizer.json"), serde_json::to_string(&tj).unwrap()).unwrap();
        std::fs::write(tmp.path().join("tokenizer_config.json"), serde_json::to_string(&tc).unwrap()).unwrap();
        let tok = wick::tokenizer::Tokenizer::load(tmp.path()).unwrap_or_else(|e| panic!("{file}: {e:#}"));
        let texts = case["texts"].as_array().unwrap();
        let want = case["ids"].as_array().unwrap();
        for (text, want) in texts.iter().zip(want) {
            let text = text.as_str().unwrap();
            let got = tok.encode(text, false).unwrap();
            assert_eq!(got, ids(want), "{file}: ids of {text:?}");
            assert_eq!(tok.decode(&got).unwrap(), text, "{file}: decoding {text:?}");
        }
    }
}

/// Every GGML type candle dequantizes (F32, F16, BF16, Q4_0..Q8_0, Q2_K..Q6_K) imports as the
/// `gguf` package dequantizes it, Q/K rows unpermuted.
#[test]
fn every_tensor_type_imports_as_the_gguf_package_dequantizes() {
    let gold = read_json(&gguf_golden("quant_types.json"));
    let stride = gold["stride"].as_u64().unwrap() as usize;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("imported");
    wick::convert::gguf::import(&gguf_golden("quant_types.gguf"), &out, Some(DType::F32), false).unwrap();
    let got = load_f32(&out.join("model.safetensors"));
    let want = gold["tensors"].as_object().unwrap();
    assert_eq!(got.len(), want.len(), "tensor count");
    let mut types = std::collections::BTreeSet::new();
    for (name, w) in want {
        let (shape, data) = got.get(name).unwrap_or_else(|| panic!("{name} missing"));
        let want_shape: Vec<usize> = ids(&w["shape"]).into_iter().map(|x| x as usize).collect();
        assert_eq!(shape, &want_shape, "{name} shape");
        let samples: Vec<f32> = w["samples"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        let sampled: Vec<f32> = data.iter().step_by(stride).copied().collect();
        let scale = w["max_abs"].as_f64().unwrap() as f32;
        let d = max_abs_diff(&sampled, &samples);
        assert!(d <= 1e-6 * scale.max(1.0), "{name} ({}): differs by {d}", w["ggml_type"]);
        types.insert(w["ggml_type"].as_str().unwrap().to_string());
    }
    for t in ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"] {
        assert!(types.contains(t), "{t} not covered");
    }
}

/// `convert --gguf -q` imports, then quantizes as `--hf-path` would.
#[test]
fn convert_gguf_with_quantize_writes_an_affine_model() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q");
    let gguf = gguf_golden("tiny_qwen2.gguf");
    let st = wick()
        .args([
            "convert",
            "--gguf",
            gguf.to_str().unwrap(),
            "--mlx-path",
            out.to_str().unwrap(),
            "-q",
            "--q-group-size",
            "32",
        ])
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let cfg = read_json(&out.join("config.json"));
    assert_eq!(cfg["quantization"]["bits"], 4);
    assert_eq!(cfg["quantization"]["group_size"], 32);
    let w = wick::io::Weights::open(&out).unwrap();
    assert_eq!(w.dtype("model.layers.0.self_attn.q_proj.weight").unwrap(), DType::U32);
    assert!(out.join("tokenizer.json").is_file());
    load_model(&out, Some(DType::F32), &Device::Cpu).unwrap();
}

// --- bad files -----------------------------------------------------------------------------

/// A minimal GGUF (v3): string metadata and tensor infos with the given GGML types, no data.
fn write_gguf(path: &Path, meta: &[(&str, &str)], tensors: &[(&str, &[u64], u32)]) {
    let mut b: Vec<u8> = vec![];
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend((x.len() as u64).to_le_bytes());
        b.extend(x.as_bytes());
    };
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        s(&mut b, k);
        b.extend(8u32.to_le_bytes());
        s(&mut b, v);
    }
    for (name, dims, t) in tensors {
        s(&mut b, name);
        b.extend((dims.len() as u32).to_le_bytes());
        for d in *dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(t.to_le_bytes());
        b.extend(0u64.to_le_bytes());
    }
    while !b.len().is_multiple_of(32) {
        b.push(0);
    }
    b.extend(vec![0u8; 4096]);
    std::fs::write(path, b).unwrap();
}

fn import_error(path: &Path) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let err = wick::convert::gguf::import(path, &tmp.path().join("out"), Some(DType::F16), false).unwrap_err();
    let msg = format!("{err:#}");
    assert!(!msg.contains('\n'), "one line expected: {msg}");
    msg
}

#[test]
fn unknown_architecture_is_named_with_the_supported_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("mamba.gguf");
    write_gguf(&p, &[("general.architecture", "mamba")], &[]);
    let msg = import_error(&p);
    assert!(msg.contains("`mamba`") && msg.contains("mamba.gguf"), "{msg}");
    for a in ["llama", "qwen2", "qwen3moe", "gemma3", "phi3", "smollm3", "granite"] {
        assert!(msg.contains(a), "{a} not listed: {msg}");
    }
}

#[test]
fn unsupported_tensor_type_is_named_with_the_supported_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("iq.gguf");
    // IQ4_NL (type 20): candle has no dequantization for it
    write_gguf(&p, &[("general.architecture", "llama")], &[("blk.0.attn_q.weight", &[32, 4], 20)]);
    let msg = import_error(&p);
    assert!(msg.contains("blk.0.attn_q.weight") && msg.contains("IQ4_NL"), "{msg}");
    assert!(msg.contains("Q4_K") && msg.contains("Q8_0") && msg.contains("BF16"), "{msg}");
}

#[test]
fn unknown_tensor_name_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("odd.gguf");
    write_gguf(&p, &[("general.architecture", "qwen2")], &[("blk.0.mystery.weight", &[32, 4], 0)]);
    let msg = import_error(&p);
    assert!(msg.contains("blk.0.mystery.weight") && msg.contains("qwen2"), "{msg}");
}

#[test]
fn unknown_tokenizer_model_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("bert.gguf");
    write_gguf(&p, &[("general.architecture", "llama"), ("tokenizer.ggml.model", "bert")], &[]);
    let err = format!("{:#}", wick::convert::gguf::tokenizer_files(&p).unwrap_err());
    assert!(err.contains("`bert`") && err.contains("gpt2") && err.contains("llama"), "{err}");
}

/// Without a dtype the gemma family imports to bfloat16 (its activations overflow float16) and
/// the others to float16: the config says so and the weights are stored so.
#[test]
fn default_dtype_is_bfloat16_for_gemma_and_float16_otherwise() {
    for (file, want, name) in [
        ("tiny_gemma3.gguf", DType::BF16, "bfloat16"),
        ("tiny_gemma2.gguf", DType::BF16, "bfloat16"),
        ("tiny_qwen3.gguf", DType::F16, "float16"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let out = wick::convert::gguf::import(&gguf_golden(file), &tmp.path().join("m"), None, false).unwrap();
        assert_eq!(read_json(&out.join("config.json"))["torch_dtype"], name, "{file}");
        let w = wick::io::Weights::open(&out).unwrap();
        assert_eq!(w.dtype("model.embed_tokens.weight").unwrap(), want, "{file}");
    }
}
