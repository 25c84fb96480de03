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
fn later_subcommands_say_not_yet_with_exit_2() {
    for sub in ["chat", "lora", "fuse", "manage", "server", "perplexity"] {
        let out = wick().args([sub, "--model", "x"]).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{sub}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("not yet available"), "{sub}");
    }
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
