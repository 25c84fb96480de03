//! The default model (SmolLM2-135M-Instruct imported from its GGUF) against mlx_lm goldens:
//! prompt token ids (raw and chat-templated), 32 greedy tokens in f32, last-position logits.

mod common;

use candle_core::{DType, Device};
use common::*;
use wick::engine::generate::{prefill, step_logits};
use wick::engine::load_model;
use wick::engine::sample::argmax;
use wick::tokenizer::Tokenizer;

fn goldens() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(golden("smollm2_greedy.json")).unwrap()).unwrap()
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn prompt_ids_match_mlx_lm() {
    let tok = Tokenizer::load(&default_model()).unwrap();
    let g = goldens();
    let cases = g["cases"].as_array().unwrap();
    assert!(cases.len() >= 6);
    for c in cases {
        let prompt = c["prompt"].as_str().unwrap();
        let system = c["system_prompt"].as_str();
        let ignore = !c["chat"].as_bool().unwrap();
        let ids = wick::cli::generate::prompt_ids(&tok, prompt, system, ignore, None, false).unwrap();
        assert_eq!(ids, ids_of(&c["prompt_ids"]), "prompt ids differ for {prompt:?}");
        if !ignore {
            let msgs: Vec<_> = system
                .map(|s| wick::tokenizer::Message::new("system", s))
                .into_iter()
                .chain([wick::tokenizer::Message::new("user", prompt)])
                .collect();
            let text = tok.apply_chat_template(&msgs, true, &Default::default()).unwrap();
            assert_eq!(text, c["rendered"].as_str().unwrap(), "chat template rendering differs");
        }
    }
}

#[test]
fn greedy_tokens_and_logits_match_mlx_lm_in_f32() {
    check_greedy(DType::F32);
}

/// The folder stores float16 weights; loaded as float16 on the CPU they stay half precision and
/// activations are f32, so the values mlx_lm saw in f32 are the same and so must the tokens be.
#[test]
fn greedy_tokens_match_mlx_lm_with_f16_weights() {
    check_greedy(DType::F16);
}

fn check_greedy(dtype: DType) {
    let dir = default_model();
    let m = load_model(&dir, Some(dtype), &Device::Cpu).unwrap();
    let model = m.model.as_ref();
    let g = goldens();
    let logits = load_f32(&golden("smollm2_logits.safetensors"));
    for (i, c) in g["cases"].as_array().unwrap().iter().enumerate() {
        let prompt = ids_of(&c["prompt_ids"]);
        let want = ids_of(&c["greedy_f32"]);
        let mut cache = model.make_cache(None);
        // a small prefill step so chunking is exercised too
        let mut l = prefill(model, &prompt, &mut cache, 7).unwrap();
        if let Some((_, gold)) = logits.get(&format!("case{i}")) {
            let d = max_abs_diff(&l, gold);
            assert!(d < 1e-2, "case {i}: last-position logits differ from mlx_lm by {d}");
        }
        let mut got = vec![];
        for _ in 0..want.len() {
            let t = argmax(&l);
            got.push(t);
            l = step_logits(model, &[t], &mut cache).unwrap();
        }
        assert_eq!(got, want, "case {i} ({:?}): greedy tokens differ from mlx_lm", c["prompt"]);
    }
    assert_eq!(logits.len(), 2, "two logits goldens expected");
}

#[test]
fn streaming_detokenizer_never_splits_characters() {
    let tok = Tokenizer::load(&default_model()).unwrap();
    for text in ["日本の首都は東京です。", "Zürich café — naïve 🤖 emoji", " leading  spaces\tand\nnewlines"]
    {
        let ids = tok.encode(text, false).unwrap();
        let mut d = tok.streaming_detokenizer();
        let mut pieces = vec![];
        for &t in &ids {
            let p = d.add_token(t);
            assert!(!p.contains('\u{FFFD}'), "emitted a broken character for {text:?}: {p:?}");
            pieces.push(p);
        }
        pieces.push(d.finalize());
        assert_eq!(pieces.concat(), tok.decode(&ids).unwrap());
        assert_eq!(pieces.concat(), text);
    }
}

#[test]
fn gguf_import_matches_gguf_package_dequantization() {
    use sha2_like::sha256_hex;
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden("gguf_import_f16.json")).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("imported");
    wick::convert::gguf::import(&default_gguf(), &out, Some(DType::F16), false).unwrap();
    let w = wick::io::Weights::open(&out).unwrap();
    let want = want.as_object().unwrap();
    assert_eq!(w.names().count(), want.len(), "tensor count");
    for (name, info) in want {
        let t = w.raw(name, &Device::Cpu).unwrap();
        assert_eq!(t.dtype(), DType::F16);
        let shape: Vec<usize> =
            info["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        assert_eq!(t.dims(), shape.as_slice(), "{name} shape");
        let bytes: Vec<u8> =
            t.flatten_all().unwrap().to_vec1::<half::f16>().unwrap().iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(
            sha256_hex(&bytes),
            info["sha256_f16"].as_str().unwrap(),
            "{name} differs from the gguf package's dequantization"
        );
    }
    // the imported folder's tokenizer loads with its chat template and eos token
    let a = Tokenizer::load(&out).unwrap();
    assert!(a.has_chat_template());
    assert_eq!(a.eos_token.as_deref(), Some("<|im_end|>"));
}

mod sha2_like {
    pub fn sha256_hex(data: &[u8]) -> String {
        use sha2::Digest;
        let d = sha2::Sha256::digest(data);
        d.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// `--model FILE.gguf` imports the GGUF for the run; its greedy text is mlx_lm's on the folder
/// imported from the same file (up to the first eos, where generation stops).
#[test]
fn generate_runs_a_gguf_file_directly() {
    let g = goldens();
    let c = &g["cases"][0];
    assert!(c["chat"].as_bool().unwrap() && c["system_prompt"].is_null());
    let want = c["greedy_text"].as_str().unwrap().split("<|im_end|>").next().unwrap();
    let out = wick()
        .args(["generate", "--model", default_gguf().to_str().unwrap(), "--dtype", "float32", "-m", "32"])
        .args(["-p", c["prompt"].as_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("==========\n{want}\n==========")), "{stdout}");
}

/// `--max-kv-size`: a rotating cache keeping the first 4 positions and the most recent ones.
/// Generation runs past the window (prompt + 48 tokens > max_kv_size) and matches mlx_lm's
/// greedy tokens with the same cache, whole-prompt and chunked prefill alike.
#[test]
fn max_kv_size_matches_mlx_lm_beyond_the_window() {
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden("smollm2_max_kv.json")).unwrap()).unwrap();
    let m = load_model(&default_model(), Some(DType::F32), &Device::Cpu).unwrap();
    let model = m.model.as_ref();
    for c in g["cases"].as_array().unwrap() {
        let prompt = ids_of(&c["prompt_ids"]);
        let size = c["max_kv_size"].as_u64().unwrap() as usize;
        let step = c["prefill_step_size"].as_u64().unwrap() as usize;
        let want = ids_of(&c["greedy_f32"]);
        assert!(prompt.len() + want.len() > size + 16, "the case must run past the window");
        assert_ne!(want, ids_of(&c["greedy_f32_full_cache"]), "the window must change the tokens");
        let mut cache = model.make_cache(Some(size));
        let mut l = prefill(model, &prompt, &mut cache, step).unwrap();
        let mut got = vec![];
        for _ in 0..want.len() {
            let t = argmax(&l);
            got.push(t);
            l = step_logits(model, &[t], &mut cache).unwrap();
        }
        assert_eq!(got, want, "max_kv_size {size}, prefill step {step}: greedy tokens differ from mlx_lm");
    }
}

fn chat_goldens() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(golden("smollm2_chat.json")).unwrap()).unwrap()
}

/// mlx_lm.chat's session: each turn adds only the new message to the cache (the eos that ended
/// the previous answer included), `r` starts over; tokens and cache sizes as mlx_lm's.
#[test]
fn chat_session_keeps_the_cache_across_turns_like_mlx_lm() {
    let g = chat_goldens();
    let m = load_model(&default_model(), Some(DType::F32), &Device::Cpu).unwrap();
    let tok = Tokenizer::load(&default_model()).unwrap();
    let opts = wick::engine::generate::GenerateOptions {
        max_tokens: g["max_tokens"].as_u64().unwrap() as usize,
        ..Default::default()
    };
    let mut chat = wick::engine::chat::ChatSession::new(m.model.as_ref(), &tok, opts, None).unwrap();
    for t in g["turns"].as_array().unwrap() {
        let q = t["query"].as_str().unwrap();
        if q == "r" {
            chat.reset();
            assert_eq!(chat.context_len(), 0);
            continue;
        }
        assert_eq!(chat.turn_ids(q).unwrap(), ids_of(&t["prompt_ids"]), "{q}: prompt ids");
        let mut got = vec![];
        chat.turn(q, |x| {
            got.push(x);
            Ok(true)
        })
        .unwrap();
        assert_eq!(got, ids_of(&t["tokens"]), "{q}: tokens differ from mlx_lm's chat");
        assert_eq!(
            chat.context_len() as u64,
            t["cache_offset_after"].as_u64().unwrap(),
            "{q}: cache size after the turn"
        );
    }
}

/// `wick chat` with turns piped on stdin prints mlx_lm's answers, one per line.
#[test]
fn chat_cli_reads_turns_from_stdin() {
    use std::io::Write;
    let g = chat_goldens();
    let turns = g["turns"].as_array().unwrap();
    let mut child = wick()
        .args(["chat", "--dtype", "float32", "-m", &g["max_tokens"].to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let input: String = turns.iter().map(|t| format!("{}\n", t["query"].as_str().unwrap())).collect::<String>() + "q\n";
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let want: Vec<&str> = turns.iter().filter_map(|t| t["text"].as_str()).collect();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().collect::<Vec<_>>(), want);
    assert!(String::from_utf8_lossy(&out.stderr).contains("reset"));
}
