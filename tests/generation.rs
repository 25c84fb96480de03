//! Generation features on the default model against mlx_lm (tests/golden/smollm2_generation.json
//! and smollm2_greedy.json): quantized KV cache, prompt cache files (mlx_lm's read by wick, and
//! wick's own round trip), batch generation, speculative decoding, perplexity.

mod common;

use candle_core::{DType, Device};
use common::*;
use std::collections::BTreeSet;
use wick::engine::generate::{generate, generate_with_cache, prefill, GenerateOptions, KvQuant};
use wick::engine::load_model;
use wick::engine::sample::Sampler;
use wick::models::LanguageModel;
use wick::quant::QuantParams;

fn json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(golden(name)).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn model() -> Box<dyn LanguageModel> {
    load_model(&default_model(), Some(DType::F32), &Device::Cpu).unwrap().model
}

/// Greedy tokens with no eos stop (mlx_lm's goldens run `generate_step`, which does not stop).
fn greedy(model: &dyn LanguageModel, prompt: &[u32], opts: &GenerateOptions) -> Vec<u32> {
    let mut out = vec![];
    generate(model, prompt, opts, &BTreeSet::new(), |t| {
        out.push(t);
        Ok(true)
    })
    .unwrap();
    out
}

/// Greedy tokens continuing `cache` with `prompt` (no eos stop).
fn continue_cache(
    model: &dyn LanguageModel,
    prompt: &[u32],
    cache: &mut [wick::cache::KvCache],
    opts: &GenerateOptions,
) -> Vec<u32> {
    let mut sampler = Sampler::new(opts.sampler.clone()).unwrap();
    let mut got = vec![];
    generate_with_cache(model, prompt, cache, &mut sampler, opts, &BTreeSet::new(), false, |t| {
        got.push(t);
        Ok(true)
    })
    .unwrap();
    got
}

fn prompts() -> Vec<(Vec<u32>, Vec<u32>)> {
    json("smollm2_greedy.json")["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (ids(&c["prompt_ids"]), ids(&c["greedy_f32"])))
        .collect()
}

/// Below this top-2 log-probability margin in mlx_lm's own run, a step is a near tie that a
/// different (equally exact) f32 summation order may break the other way (the 8-bit goldens
/// have none; the reference script says why 4-bit runs are not compared token for token).
const NEAR_TIE: f64 = 0.01;

#[test]
fn quantized_kv_cache_matches_mlx_lm() {
    let g = json("smollm2_generation.json");
    let m = model();
    let cases = prompts();
    let n = g["kv_quant"]["n_greedy"].as_u64().unwrap() as usize;
    let runs = g["kv_quant"]["runs"].as_array().unwrap();
    assert!(runs.iter().any(|r| r["bits"] == 8));
    let (mut differs_from_float, mut compared, mut total) = (0, 0, 0);
    for run in runs {
        let (bits, group, start) = (
            run["bits"].as_u64().unwrap() as usize,
            run["group_size"].as_u64().unwrap() as usize,
            run["quantized_kv_start"].as_u64().unwrap() as usize,
        );
        let opts = GenerateOptions {
            max_tokens: n,
            kv_quant: Some(KvQuant { params: QuantParams::new(bits, group, "test").unwrap(), start }),
            ..Default::default()
        };
        let margins = run["top2_margin"].as_array().unwrap();
        for (((prompt, float_tokens), want), margin) in
            cases.iter().zip(run["greedy_f32"].as_array().unwrap()).zip(margins)
        {
            let want = ids(want);
            let got = greedy(m.as_ref(), prompt, &opts);
            // compare through the first near tie (inclusive of the tokens before it)
            let upto = margin.as_array().unwrap().iter().position(|d| d.as_f64().unwrap() < NEAR_TIE).unwrap_or(n);
            assert_eq!(
                got[..upto],
                want[..upto],
                "--kv-bits {bits} --kv-group-size {group} --quantized-kv-start {start}"
            );
            differs_from_float += (want[..upto] != float_tokens[..upto]) as usize;
            compared += upto;
            total += n;
        }
    }
    assert!(compared * 5 >= total * 4, "only {compared} of {total} tokens compared");
    // the quantized cache must matter somewhere, or this test could not tell it apart
    assert!(differs_from_float > 0, "every quantized run equals the float cache's tokens");
}

#[test]
fn prompt_cache_written_by_mlx_lm_continues_like_mlx_lm() {
    let g = &json("smollm2_generation.json")["prompt_cache"];
    let file = golden(g["file"].as_str().unwrap());
    let m = model();
    let loaded = wick::engine::prompt_cache::load(&file, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(loaded.metadata["model"], g["model"].as_str().unwrap());
    let mut cache = loaded.cache;
    assert_eq!(cache[0].offset(), ids(&g["cached_ids"]).len());
    let want = ids(&g["greedy_f32"]);
    let opts = GenerateOptions { max_tokens: want.len(), ..Default::default() };
    assert_eq!(continue_cache(m.as_ref(), &ids(&g["query_ids"]), &mut cache, &opts), want);

    // the CLI: the query becomes the rest of the cached user message, as mlx_lm.generate does
    let out = wick()
        .current_dir(root())
        .args(["generate", "--model", g["model"].as_str().unwrap(), "--prompt-cache-file"])
        .arg(&file)
        .args(["-p", g["query"].as_str().unwrap(), "-m", &want.len().to_string(), "--dtype", "float32"])
        .args(["--verbose", "False"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tok = wick::tokenizer::Tokenizer::load(&default_model()).unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let eos: Vec<u32> = want.iter().copied().take_while(|t| !tok.eos_token_ids.contains(t)).collect();
    assert_eq!(text.trim_end_matches('\n'), tok.decode(&eos).unwrap());

    // wick cache-prompt makes the same cache (as mlx_lm.cache_prompt) and continues the same way
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours.safetensors");
    let st = wick()
        .current_dir(root())
        .args(["cache-prompt", "--model", g["model"].as_str().unwrap(), "--dtype", "float32"])
        .args(["--prompt", g["prompt"].as_str().unwrap(), "--prompt-cache-file"])
        .arg(&ours)
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let mine = wick::engine::prompt_cache::load(&ours, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(mine.cache[0].offset(), ids(&g["cached_ids"]).len());
    assert_eq!(mine.metadata["model"], g["model"].as_str().unwrap());
    let out = wick()
        .current_dir(root())
        .args(["generate", "--prompt-cache-file"])
        .arg(&ours)
        .args(["-p", g["query"].as_str().unwrap(), "-m", &want.len().to_string(), "--dtype", "float32"])
        .args(["--verbose", "False"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim_end_matches('\n'), tok.decode(&eos).unwrap());

    // another model is refused, naming both
    let out = wick()
        .current_dir(root())
        .args(["generate", "--model", "tests/golden/tiny_llama3", "--prompt-cache-file"])
        .arg(&file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("made with the model") && err.contains("tiny_llama3"), "{err}");
}

#[test]
fn saved_prompt_cache_continues_like_the_full_prompt() {
    let m = model();
    let (prompt, want) = prompts().swap_remove(2);
    let dir = tempfile::tempdir().unwrap();
    for (kind, quant) in
        [("standard", None), ("8-bit", Some(KvQuant { params: QuantParams::new(8, 64, "t").unwrap(), start: 0 }))]
    {
        let opts = GenerateOptions { max_tokens: want.len(), kv_quant: quant, ..Default::default() };
        let full = greedy(m.as_ref(), &prompt, &opts);
        if quant.is_none() {
            assert_eq!(full, want, "the float cache must give mlx_lm's greedy tokens");
        }
        let split = prompt.len() - 5;
        let mut cache = opts.new_cache(m.as_ref()).unwrap();
        wick::engine::generate::prefill_quantized(m.as_ref(), &prompt[..split], &mut cache, 2048, quant.as_ref())
            .unwrap();
        let path = dir.path().join(format!("{kind}.safetensors"));
        let meta = [("model".to_string(), "x".to_string())].into();
        wick::engine::prompt_cache::save(&path, &cache, &meta).unwrap();
        let loaded = wick::engine::prompt_cache::load(&path, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(loaded.metadata, meta);
        let mut cache = loaded.cache;
        assert_eq!(
            cache[0].kind(),
            if quant.is_some() {
                wick::cache::CacheKind::Quantized { bits: 8, group_size: 64 }
            } else {
                wick::cache::CacheKind::Standard
            }
        );
        let got = continue_cache(m.as_ref(), &prompt[split..], &mut cache, &opts);
        assert_eq!(got, full, "{kind} cache: continuing a saved cache differs from the full prompt");
    }
}

#[test]
fn batch_of_mixed_length_prompts_gives_each_rows_greedy_output() {
    let m = model();
    let cases = prompts();
    assert_eq!(cases.len(), 8);
    let lens: BTreeSet<usize> = cases.iter().map(|c| c.0.len()).collect();
    assert!(lens.len() > 4, "the prompts must differ in length");
    let n = cases[0].1.len();
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| c.0.clone()).collect();
    // with eos stopping and per-row max_tokens: rows leave the batch at different steps
    let tok = wick::tokenizer::Tokenizer::load(&default_model()).unwrap();
    let opts = GenerateOptions { max_tokens: n, ..Default::default() };
    let mut active = vec![];
    let out = wick::engine::batch::batch_generate(m.as_ref(), &prompts, &opts, &tok.eos_token_ids, |a| active.push(a))
        .unwrap();
    for (i, (got, (_, want))) in out.tokens.iter().zip(&cases).enumerate() {
        let want: Vec<u32> = want.iter().copied().take_while(|t| !tok.eos_token_ids.contains(t)).collect();
        assert_eq!(got, &want, "row {i}");
    }
    assert!(active.windows(2).all(|w| w[0] >= w[1]));
    // no eos: every row runs to the end
    let out = wick::engine::batch::batch_generate(m.as_ref(), &prompts, &opts, &BTreeSet::new(), |_| {}).unwrap();
    for (i, (got, (_, want))) in out.tokens.iter().zip(&cases).enumerate() {
        assert_eq!(got, want, "row {i} without eos");
    }
    assert_eq!(out.generation_tokens, 8 * n);
}

#[test]
fn speculative_decoding_with_a_4bit_draft_equals_greedy() {
    let dir = tempfile::tempdir().unwrap();
    let q4 = dir.path().join("q4");
    let st = wick()
        .args(["convert", "--hf-path"])
        .arg(default_model())
        .arg("--mlx-path")
        .arg(&q4)
        .args(["-q", "--q-bits", "4"])
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let m = model();
    let draft = load_model(&q4, Some(DType::F32), &Device::Cpu).unwrap().model;
    for (k, (prompt, want)) in [2usize, 4].into_iter().zip(prompts().into_iter().step_by(3)) {
        let opts = GenerateOptions { max_tokens: want.len(), ..Default::default() };
        let mut got = vec![];
        let s = wick::engine::speculative::speculative_generate(
            m.as_ref(),
            draft.as_ref(),
            &prompt,
            &opts,
            k,
            &BTreeSet::new(),
            |t, _| {
                got.push(t);
                Ok(true)
            },
        )
        .unwrap();
        assert_eq!(got, want, "{k} draft tokens");
        assert!(s.accepted > 0 && s.accepted <= s.drafted, "accepted {} of {}", s.accepted, s.drafted);
    }
    // the CLI prints the acceptance rate and the same text as plain generation
    let run = |extra: &[&str]| {
        let o = wick()
            .args(["generate", "--model"])
            .arg(default_model())
            .args(["-p", "Write a haiku about the sea.", "-m", "24", "--dtype", "float32"])
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let spec = run(&["--draft-model", q4.to_str().unwrap(), "--num-draft-tokens", "3"]);
    let plain = run(&[]);
    let text = |s: &str| s.split("==========").nth(1).unwrap().to_string();
    assert_eq!(text(&spec), text(&plain));
    assert!(spec.contains("draft tokens accepted"), "{spec}");
}

#[test]
fn perplexity_matches_mlx_lm_within_half_a_percent() {
    let g = &json("smollm2_generation.json")["perplexity"];
    let m = load_model(&default_model(), Some(DType::F32), &Device::Cpu).unwrap();
    let tok = wick::tokenizer::Tokenizer::load(&default_model()).unwrap();
    let records = wick::engine::perplexity::load_records(&root().join(g["file"].as_str().unwrap()), &tok).unwrap();
    assert_eq!(records[0].len(), g["tokens"].as_u64().unwrap() as usize);
    let seq = g["sequence_length"].as_u64().unwrap() as usize;
    let rows = wick::engine::perplexity::make_rows(&records, seq, None, 123).unwrap();
    assert_eq!(rows.len(), g["rows"].as_u64().unwrap() as usize);
    let p = wick::engine::perplexity::eval_ppl(m.model.as_ref(), &rows, 2, |_, _| {}).unwrap();
    let want = g["ppl"].as_f64().unwrap();
    let rel = (p.ppl - want).abs() / want;
    assert!(rel < 0.005, "perplexity {} vs mlx_lm {want} ({:.3}%)", p.ppl, rel * 100.0);
    let se = g["se"].as_f64().unwrap();
    assert!((p.standard_error - se).abs() / se < 0.01, "standard error {} vs {se}", p.standard_error);
}

#[test]
fn prefill_then_step_is_unchanged_by_the_new_paths() {
    // the plain path still reproduces mlx_lm's first greedy token
    let m = model();
    let (prompt, want) = prompts().swap_remove(0);
    let mut cache = m.make_cache(None);
    let logits = prefill(m.as_ref(), &prompt, &mut cache, 7).unwrap();
    assert_eq!(wick::engine::sample::argmax(&logits), want[0]);
}

#[test]
fn a_left_request_s_batch_slot_takes_a_new_sequence_in_place() {
    use candle_core::Tensor;
    use wick::cache::{CacheState, KvCache};
    // a sequence of n positions: 2 heads of size 3, values base + 0, 1, 2, ...
    let seq = |n: usize, base: f32| {
        let mut c = KvCache::new();
        let k = (Tensor::arange(0f32, (2 * n * 3) as f32, &Device::Cpu).unwrap().reshape((1, 2, n, 3)).unwrap()
            + base as f64)
            .unwrap();
        c.update_and_fetch(&k, &(&k + 0.5).unwrap()).unwrap();
        c
    };
    let keys = |c: &KvCache| match c.state().unwrap() {
        Some(CacheState::Standard { keys, .. }) => keys.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        _ => panic!("a standard cache"),
    };
    let (a, b) = (seq(5, 0.0), seq(3, 100.0));
    let mut batch = KvCache::merge(&[a.clone(), b]).unwrap();
    assert_eq!(batch.left_padding().unwrap().as_ref(), &[0, 2]);
    let buffer = batch.buffers().unwrap().0.id();
    batch.retire_row(1);
    assert_eq!(batch.left_padding().unwrap().as_ref(), &[0, 5], "a left row sees only its next position");
    // 4 positions take over row 1: they end at the batch's offset (5), one padding position first
    let c = seq(4, 200.0);
    batch.write_row(1, &c).unwrap();
    assert_eq!(batch.buffers().unwrap().0.id(), buffer, "written in place");
    assert_eq!(batch.left_padding().unwrap().as_ref(), &[0, 1]);
    assert_eq!(keys(&batch.extract_row(1).unwrap()), keys(&c));
    assert_eq!(keys(&batch.extract_row(0).unwrap()), keys(&a), "the other row is untouched");
    // a sequence longer than the batch's positions does not fit
    assert!(batch.write_row(1, &seq(6, 0.0)).is_err());
    assert!(batch.write_row(2, &seq(2, 0.0)).is_err(), "no row 2");
}
