//! Samplers and logits processors against mlx_lm's on fixed logits (tests/golden/sampling.json,
//! from mlx_lm.sample_utils): the same tokens kept with the same log-probabilities, the same
//! processed logits; and seeded draws whose frequencies follow the distribution the math says.

mod common;

use common::*;
use wick::engine::sample::{
    apply_min_p, apply_top_k, apply_top_p, apply_xtc, log_softmax, LogitsProcessors, Sampler, SamplerConfig,
};

fn goldens() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(golden("sampling.json")).unwrap()).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().map(|f| f as f32).unwrap_or(f32::NEG_INFINITY)).collect()
}

fn assert_same(got: &[f32], want: &[f32], what: &str) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if w.is_infinite() || g.is_infinite() {
            assert_eq!(g.is_infinite(), w.is_infinite(), "{what}: token {i} kept by one side only ({g} vs {w})");
        } else {
            assert!((g - w).abs() < 1e-5, "{what}: token {i}: {g} vs mlx_lm {w}");
        }
    }
}

#[test]
fn filters_keep_what_mlx_lm_keeps() {
    let g = goldens();
    let lp = log_softmax(&floats(&g["logits"]));
    for f in g["filters"].as_array().unwrap() {
        let a = &f["args"];
        let mut got = lp.clone();
        match f["name"].as_str().unwrap() {
            "top_p" => apply_top_p(&mut got, a["top_p"].as_f64().unwrap() as f32),
            "min_p" => apply_min_p(&mut got, a["min_p"].as_f64().unwrap() as f32, a["keep"].as_u64().unwrap() as usize),
            "top_k" => apply_top_k(&mut got, a["k"].as_u64().unwrap() as usize),
            "xtc" => {
                let special: Vec<u32> =
                    a["special"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
                apply_xtc(&mut got, a["threshold"].as_f64().unwrap() as f32, &special)
            }
            other => panic!("unknown filter {other}"),
        }
        assert_same(&got, &floats(&f["logprobs"]), &format!("{} {a}", f["name"]));
    }
}

#[test]
fn logits_processors_match_mlx_lm() {
    let g = goldens();
    let logits = floats(&g["logits"]);
    let tokens: Vec<u32> = g["tokens"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    for p in g["processors"].as_array().unwrap() {
        let a = &p["args"];
        let ctx = |k: &str| a.get(k).and_then(|v| v.as_u64()).unwrap_or(20) as usize;
        let pen = |k: &str| a.get(k).and_then(|v| v.as_f64()).map(|v| v as f32);
        let procs = LogitsProcessors {
            logit_bias: a
                .get("logit_bias")
                .map(|b| {
                    b.as_object()
                        .unwrap()
                        .iter()
                        .map(|(k, v)| (k.parse().unwrap(), v.as_f64().unwrap() as f32))
                        .collect()
                })
                .unwrap_or_default(),
            repetition_penalty: pen("repetition_penalty").map(|p| (p, ctx("repetition_context_size"))),
            presence_penalty: pen("presence_penalty").map(|p| (p, ctx("presence_context_size"))),
            frequency_penalty: pen("frequency_penalty").map(|p| (p, ctx("frequency_context_size"))),
        };
        let mut got = logits.clone();
        procs.apply(&tokens, &mut got);
        let want = floats(&p["logits"]);
        assert_ne!(want, logits, "{a}: the case must change something");
        assert_same(&got, &want, &a.to_string());
    }
}

/// Draw frequencies of a seeded sampler against the probabilities the math gives, each within
/// 5 standard errors (plus a little for f32 rounding).
fn check_distribution(cfg: SamplerConfig, logits: &[f32], want: &[f64], draws: usize) {
    let mut s = Sampler::new(cfg).unwrap();
    let mut counts = vec![0usize; logits.len()];
    for _ in 0..draws {
        counts[s.sample(logits).unwrap() as usize] += 1;
    }
    for (i, (&c, &p)) in counts.iter().zip(want).enumerate() {
        let f = c as f64 / draws as f64;
        let se = (p * (1.0 - p) / draws as f64).sqrt();
        assert!((f - p).abs() <= 5.0 * se + 1e-4, "token {i}: drawn {f:.4}, expected {p:.4}");
    }
}

fn softmax(xs: &[f32], t: f32) -> Vec<f64> {
    let m = xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f64> = xs.iter().map(|&x| (((x - m) / t) as f64).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

#[test]
fn seeded_draws_follow_the_filtered_distribution() {
    let g = goldens();
    let logits = floats(&g["logits"]);
    let lp = log_softmax(&logits);
    // temperature 0.7 after top-p 0.9: softmax(filtered logp / 0.7)
    let f =
        g["filters"].as_array().unwrap().iter().find(|f| f["name"] == "top_p" && f["args"]["top_p"] == 0.9).unwrap();
    let cfg = SamplerConfig { temp: 0.7, top_p: 0.9, seed: Some(1), ..Default::default() };
    check_distribution(cfg, &logits, &softmax(&floats(&f["logprobs"]), 0.7), 20_000);
    // XTC half of the time: the mixture of the full and the cut distributions
    let x = g["filters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "xtc" && f["args"]["special"] == serde_json::json!([5]))
        .unwrap();
    let cut = softmax(&floats(&x["logprobs"]), 1.0);
    let full = softmax(&lp, 1.0);
    let mix: Vec<f64> = full.iter().zip(&cut).map(|(a, b)| 0.5 * a + 0.5 * b).collect();
    let cfg = SamplerConfig {
        temp: 1.0,
        xtc_probability: 0.5,
        xtc_threshold: 0.02,
        xtc_special_tokens: vec![5],
        seed: Some(2),
        ..Default::default()
    };
    check_distribution(cfg, &logits, &mix, 40_000);
}
