//! Forward pass of tiny random-weight models made by mlx_lm (same weights), one per architecture:
//! full-sequence logits and chunked-prefill + decode logits through the KV cache, in f32, to
//! 1e-4; the same model quantized by mlx_lm (4-bit, group 32) against mlx_lm's 4-bit logits to 1e-3.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use wick::engine::load_model;

fn check(name: &str) {
    check_folder(name, &golden(name), 1e-4);
    check_folder(name, &golden(name).join("q4"), 1e-3);
    check_greedy(&golden(name));
    check_greedy(&golden(name).join("q4"));
}

/// A golden folder's `greedy.json`: the prompt and mlx_lm's greedy tokens after it.
fn golden_greedy(dir: &std::path::Path) -> (Vec<u32>, Vec<u32>) {
    let gold: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("greedy.json")).unwrap()).unwrap();
    let ids =
        |k: &str| -> Vec<u32> { gold[k].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect() };
    (ids("prompt"), ids("tokens"))
}

/// mlx_lm's 32 greedy tokens after the first 8 golden ids (`greedy.json`), token for token.
fn check_greedy(dir: &std::path::Path) {
    use wick::engine::generate::{generate, GenerateOptions};
    let (prompt, want) = golden_greedy(dir);
    let m = load_model(dir, Some(DType::F32), &Device::Cpu).unwrap();
    let opts = GenerateOptions { max_tokens: want.len(), ..Default::default() };
    let mut got = vec![];
    generate(m.model.as_ref(), &prompt, &opts, &Default::default(), |t| {
        got.push(t);
        Ok(true)
    })
    .unwrap();
    assert_eq!(got, want, "{}: greedy tokens differ from mlx_lm's", dir.display());
}

fn check_folder(name: &str, dir: &std::path::Path, tol: f32) {
    let inputs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden(name).join("inputs.json")).unwrap()).unwrap();
    let ids: Vec<u32> = inputs["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let gold = load_f32(&dir.join("logits.safetensors"));
    let m = load_model(dir, Some(DType::F32), &Device::Cpu).unwrap();
    let model = m.model.as_ref();

    // whole sequence at once
    let mut cache = model.make_cache(None);
    let x = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let full = model.forward(&x, &mut cache, false).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let d = max_abs_diff(&full, &gold["full"].1);
    assert!(d < tol, "{}: full-sequence logits differ from mlx_lm by {d}", dir.display());

    // chunked prefill, then decode one token at a time
    let mut cache = model.make_cache(None);
    let mut got = vec![];
    let mut bounds: Vec<(usize, usize)> = inputs["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c[0].as_u64().unwrap() as usize, c[1].as_u64().unwrap() as usize))
        .collect();
    let last = bounds.last().unwrap().1;
    assert!(ids.len() >= 64 && ids.len() - last >= 16, "{name}: a 64+ token sequence with 16+ decode steps expected");
    bounds.extend((last..ids.len()).map(|t| (t, t + 1)));
    for (a, b) in bounds {
        let x = Tensor::new(&ids[a..b], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        got.extend(model.forward(&x, &mut cache, false).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    let d = max_abs_diff(&got, &gold["cached"].1);
    assert!(d < tol, "{}: cached logits differ from mlx_lm by {d}", dir.display());
}

#[test]
fn tiny_llama3_rope_scaling_gqa_bias_matches_mlx_lm() {
    check("tiny_llama3");
}

#[test]
fn tiny_mistral_tied_linear_rope_matches_mlx_lm() {
    check("tiny_mistral");
}

#[test]
fn tiny_sliding_window_layers_match_mlx_lm_across_chunks_and_wraparound() {
    check("tiny_mistral_swa");
}

#[test]
fn tiny_qwen2_qkv_bias_matches_mlx_lm() {
    check("tiny_qwen2");
}

#[test]
fn tiny_qwen3_qk_norm_yarn_rope_matches_mlx_lm() {
    check("tiny_qwen3");
}

#[test]
fn tiny_llama_dynamic_ntk_rope_matches_mlx_lm() {
    check("tiny_llama_dynamic");
}

#[test]
fn tiny_phi3_fused_projections_longrope_matches_mlx_lm() {
    check("tiny_phi3");
}

#[test]
fn tiny_gemma2_softcaps_sandwich_norms_match_mlx_lm() {
    check("tiny_gemma2");
}

#[test]
fn tiny_gemma3_local_global_layers_match_mlx_lm() {
    check("tiny_gemma3");
}

#[test]
fn tiny_phi2_parallel_layernorm_partial_rotary_matches_mlx_lm() {
    check("tiny_phi");
}

#[test]
fn tiny_mixtral_routed_experts_match_mlx_lm() {
    check("tiny_mixtral");
}

/// The same mixtral with its experts stored one by one, as Hugging Face checkpoints name them
/// (`experts.{e}.w1` gate, `w2` down, `w3` up): sanitize must find them.
#[test]
fn tiny_qwen3_moe_sparse_and_dense_layers_match_mlx_lm() {
    check("tiny_qwen3_moe");
}

#[test]
fn tiny_qwen2_moe_shared_expert_matches_mlx_lm() {
    check("tiny_qwen2_moe");
}

#[test]
fn tiny_olmoe_projection_qk_norms_match_mlx_lm() {
    check("tiny_olmoe");
}

#[test]
fn tiny_gpt_oss_sinks_sliding_layers_clamped_experts_match_mlx_lm() {
    check("tiny_gpt_oss");
}

#[test]
fn tiny_glm4_moe_grouped_sigmoid_routing_shared_experts_partial_rope_match_mlx_lm() {
    check("tiny_glm4_moe");
}

#[test]
fn tiny_ernie4_5_moe_dense_and_moe_layers_shared_experts_match_mlx_lm() {
    check("tiny_ernie4_5_moe");
}

#[test]
fn tiny_phimoe_sparsemixer_layernorms_longrope_match_mlx_lm() {
    check("tiny_phimoe");
}

#[test]
fn tiny_llama4_chunked_nope_layers_top1_experts_match_mlx_lm() {
    check("tiny_llama4");
}

#[test]
fn tiny_gemma4_moe_shared_kv_per_layer_inputs_experts_match_mlx_lm() {
    check("tiny_gemma4_moe");
}

#[test]
fn tiny_gemma4_dense_per_layer_inputs_shared_kv_match_mlx_lm() {
    check("tiny_gemma4");
}

#[test]
fn tiny_llama4_text_dense_nope_layer_qk_norm_match_mlx_lm() {
    check("tiny_llama4_text");
}

#[test]
fn tiny_smollm3_nope_layers_match_mlx_lm() {
    check("tiny_smollm3");
}

#[test]
fn tiny_granite_dense_multipliers_match_mlx_lm() {
    check("tiny_granite");
}

#[test]
fn tiny_seed_oss_output_bias_flag_match_mlx_lm() {
    check("tiny_seed_oss");
}

/// LFM2: gated short convolutions (their conv state in an ArraysCache) around attention layers,
/// from `layer_types` (kernel 3, biases, auto-adjusted MLP) and from `full_attn_idxs` (kernel 4,
/// no biases).
#[test]
fn tiny_lfm2_short_convolutions_match_mlx_lm() {
    check("tiny_lfm2");
    check("tiny_lfm2_idxs");
}

/// Qwen3-Next: Gated DeltaNet layers (conv and recurrent states in an ArraysCache) among gated
/// attention layers with partial RoPE, MoE with a gated shared expert; held-out: another layer
/// interval, head split, kernel, biases and a tied head.
#[test]
fn tiny_qwen3_next_gated_deltanet_matches_mlx_lm() {
    check("tiny_qwen3_next");
    check("tiny_qwen3_next_b");
}

/// Qwen3.5 and Qwen3.5-MoE (text of the multimodal checkpoints): separate Gated DeltaNet
/// projections, RoPE from rope_parameters, experts in every layer of the MoE variant.
#[test]
fn tiny_qwen3_5_match_mlx_lm() {
    check("tiny_qwen3_5");
    check("tiny_qwen3_5_moe");
}

/// Granite 4.0-H: Mamba-2 layers (conv and SSM states in an ArraysCache) among attention layers
/// with granite's multipliers; experts plus a shared MLP, and (held out) a dense NoPE variant.
#[test]
fn tiny_granitemoehybrid_mamba2_matches_mlx_lm() {
    check("tiny_granitemoehybrid");
    check("tiny_granitemoehybrid_dense");
}

/// Nemotron-H: Mamba-2 (per-group gated norm), position-free attention, ReLU² MLP and expert
/// blocks (grouped sigmoid router, latent space, shared expert), the cache list only the Mamba
/// and attention blocks'; held out: block names, leading MLP blocks, biases.
#[test]
fn tiny_nemotron_h_blocks_match_mlx_lm() {
    check("tiny_nemotron_h");
    check("tiny_nemotron_h_b");
}

#[test]
fn tiny_helium_traditional_rope_qkv_bias_match_mlx_lm() {
    check("tiny_helium");
}

#[test]
fn tiny_internlm3_dynamic_rope_biases_match_mlx_lm() {
    check("tiny_internlm3");
}

#[test]
fn tiny_olmo2_post_norms_projection_qk_norms_match_mlx_lm() {
    check("tiny_olmo2");
}

#[test]
fn tiny_olmo3_sliding_layer_types_yarn_match_mlx_lm() {
    check("tiny_olmo3");
}

#[test]
fn tiny_exaone4_post_norms_nope_global_layers_match_mlx_lm() {
    check("tiny_exaone4");
}

#[test]
fn tiny_glm4_sandwich_norms_partial_traditional_rope_match_mlx_lm() {
    check("tiny_glm4");
}

#[test]
fn tiny_cohere2_parallel_layernorm_nope_global_layers_match_mlx_lm() {
    check("tiny_cohere2");
}

#[test]
fn tiny_starcoder2_layernorms_exact_gelu_match_mlx_lm() {
    check("tiny_starcoder2");
}

#[test]
fn tiny_apertus_xielu_mlp_qk_norms_match_mlx_lm() {
    check("tiny_apertus");
}

#[test]
fn tiny_hunyuan_v1_dense_qk_norms_after_alpha_rope_match_mlx_lm() {
    check("tiny_hunyuan_v1_dense");
}

#[test]
fn tiny_ministral3_yarn_query_scaling_match_mlx_lm() {
    check("tiny_ministral3");
}

#[test]
fn tiny_mistral3_wrapped_ministral3_match_mlx_lm() {
    check("tiny_mistral3");
}

#[test]
fn tiny_mistral3_llama_wrapped_mistral_match_mlx_lm() {
    check("tiny_mistral3_llama");
}

#[test]
fn tiny_gemma3_vlm_wrapper_defaults_match_mlx_lm() {
    check("tiny_gemma3_vlm");
}

#[test]
fn tiny_granitemoe_multipliers_match_mlx_lm() {
    check("tiny_granitemoe");
}

/// A copy of golden model `name` with its stacked expert tensors (`.switch_mlp.` and the like)
/// written back in a Hugging Face layout by `hf`, which gets the module prefix before the
/// stacked layer, the projection (`gate_proj.weight`, …) and the tensor.
fn hf_layout(
    name: &str,
    stacked: &str,
    hf: impl Fn(&str, &str, Tensor, &mut std::collections::HashMap<String, Tensor>),
) -> tempfile::TempDir {
    let src = golden(name);
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "logits.safetensors", "greedy.json"] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    let mut out = std::collections::HashMap::new();
    for (k, v) in candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap() {
        match k.split_once(stacked) {
            Some((head, tail)) => hf(head, tail, v, &mut out),
            None => {
                out.insert(k, v);
            }
        }
    }
    candle_core::safetensors::save(&out, tmp.path().join("model.safetensors")).unwrap();
    tmp
}

/// One tensor per expert, `{head}.experts.{e}.{proj}.weight`.
fn per_expert(head: &str, proj: &str, v: &Tensor, out: &mut std::collections::HashMap<String, Tensor>) {
    for e in 0..v.dim(0).unwrap() {
        out.insert(format!("{head}.experts.{e}.{proj}.weight"), v.get(e).unwrap());
    }
}

#[test]
fn tiny_mixtral_per_expert_hf_layout_loads_the_same() {
    let dir = hf_layout("tiny_mixtral", ".switch_mlp.", |head, tail, v, out| {
        let hf = match tail {
            "gate_proj.weight" => "w1",
            "down_proj.weight" => "w2",
            "up_proj.weight" => "w3",
            other => panic!("unexpected {other}"),
        };
        per_expert(head, hf, &v, out);
    });
    check_folder("tiny_mixtral", dir.path(), 1e-4);
}

/// Qwen3-MoE's per-expert Hugging Face weights load as mlx's stacked ones, and `wick convert -q`
/// of them writes what mlx_lm wrote from the stacked ones.
#[test]
fn tiny_qwen3_moe_per_expert_hf_layout_loads_and_converts_the_same() {
    let dir = hf_layout("tiny_qwen3_moe", ".switch_mlp.", |head, tail, v, out| {
        per_expert(head, tail.strip_suffix(".weight").unwrap(), &v, out);
    });
    check_folder("tiny_qwen3_moe", dir.path(), 1e-4);
    let out = dir.path().join("q4");
    let st = wick()
        .args(["convert", "--hf-path", dir.path().to_str().unwrap(), "--mlx-path", out.to_str().unwrap()])
        .args(["-q", "--q-bits", "4", "--q-group-size", "32"])
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let read = |p: std::path::PathBuf| {
        let t = candle_core::safetensors::load(p, &Device::Cpu).unwrap();
        let mut v: Vec<(String, Vec<u8>)> = t
            .into_iter()
            .map(|(k, t)| {
                let bytes = t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
                (k, bytes.iter().flat_map(|x| x.to_le_bytes()).collect())
            })
            .collect();
        v.sort();
        v
    };
    assert!(read(out.join("model.safetensors")) == read(golden("tiny_qwen3_moe").join("q4/model.safetensors")));
}

/// Granite MoE's fused Hugging Face expert tensors (`input_linear`: gate rows then up rows;
/// `output_linear`) load as mlx's stacked ones.
#[test]
fn tiny_granitemoe_fused_hf_layout_loads_the_same() {
    // the half seen first waits for the other
    let seen = std::sync::Mutex::new(std::collections::HashMap::<String, (String, Tensor)>::new());
    let dir = hf_layout("tiny_granitemoe", ".switch_mlp.", |head, tail, v, out| match tail {
        "gate_proj.weight" | "up_proj.weight" => {
            let Some((other, w)) = seen.lock().unwrap().remove(head) else {
                seen.lock().unwrap().insert(head.to_string(), (tail.to_string(), v));
                return;
            };
            let (g, u) = if other == "gate_proj.weight" { (w, v) } else { (v, w) };
            out.insert(format!("{head}.input_linear.weight"), Tensor::cat(&[g, u], 1).unwrap());
        }
        "down_proj.weight" => {
            out.insert(format!("{head}.output_linear.weight"), v);
        }
        other => panic!("unexpected {other}"),
    });
    check_folder("tiny_granitemoe", dir.path(), 1e-4);
}

/// `wick convert -q` of each tiny model writes the same tensors, byte for byte, as mlx_lm's
/// `quantize_model` made from the same float16 weights (stacked experts included), and the
/// same `quantization` block.
#[test]
fn convert_q_of_every_architecture_is_byte_identical_to_mlx_lm() {
    let mut names: Vec<String> = std::fs::read_dir(root().join("tests/golden"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        // model folders (adapter goldens such as tiny_llama3_lora hold no config.json)
        .filter(|n| n.starts_with("tiny_") && golden(n).join("config.json").is_file())
        .collect();
    names.sort();
    assert!(names.len() >= 11, "{names:?}");
    let tmp = tempfile::tempdir().unwrap();
    for name in names {
        let out = tmp.path().join(&name);
        let st = wick()
            .args(["convert", "--hf-path", golden(&name).to_str().unwrap(), "--mlx-path", out.to_str().unwrap()])
            .args(["-q", "--q-bits", "4", "--q-group-size", "32"])
            .output()
            .unwrap();
        assert!(st.status.success(), "{name}: {}", String::from_utf8_lossy(&st.stderr));
        let read = |p: std::path::PathBuf| {
            let data = std::fs::read(p).unwrap();
            let st = safetensors::SafeTensors::deserialize(&data).unwrap();
            let mut m: Vec<(String, Vec<usize>, Vec<u8>)> =
                st.tensors().into_iter().map(|(k, v)| (k, v.shape().to_vec(), v.data().to_vec())).collect();
            m.sort_by(|a, b| a.0.cmp(&b.0));
            m
        };
        let (ours, theirs) = (read(out.join("model.safetensors")), read(golden(&name).join("q4/model.safetensors")));
        let keys = |m: &[(String, Vec<usize>, Vec<u8>)]| m.iter().map(|t| t.0.clone()).collect::<Vec<_>>();
        assert_eq!(keys(&ours), keys(&theirs), "{name}: tensor names");
        for (a, b) in ours.iter().zip(&theirs) {
            assert!(a == b, "{name}: tensor {} differs from mlx_lm's", a.0);
        }
        let cfg = |p: std::path::PathBuf| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
        };
        assert_eq!(
            cfg(out.join("config.json"))["quantization"],
            cfg(golden(&name).join("q4/config.json"))["quantization"],
            "{name}: quantization block"
        );
    }
}

/// Which architectures' decode steps a CUDA graph may capture (`LanguageModel::graph_step`):
/// every one whose layers do all their work on the device. The MoE routers read their choices
/// on the host, so those models decode eagerly; gemma 4's own model body (dense too) offers no
/// graph step yet, nor does Ministral 3 (its query scale is computed from the position on the
/// host). (tests/cuda.rs replays each graphable one.)
#[test]
fn every_dense_architecture_offers_a_graph_step() {
    let table = [
        ("tiny_llama3", true),
        ("tiny_mistral", true),
        ("tiny_mistral_swa", true),
        ("tiny_qwen2", true),
        ("tiny_qwen3", true),
        ("tiny_phi", true),
        ("tiny_phi3", true),
        ("tiny_gemma2", true),
        ("tiny_gemma3", true),
        ("tiny_mixtral", true),
        ("tiny_qwen3_moe", true),
        ("tiny_qwen2_moe", true),
        ("tiny_olmoe", true),
        ("tiny_gpt_oss", false),
        ("tiny_glm4_moe", false),
        ("tiny_granitemoe", true),
        ("tiny_ernie4_5_moe", false),
        ("tiny_phimoe", false),
        ("tiny_llama4", false),
        ("tiny_gemma4_moe", false),
        ("tiny_gemma4", false),
        ("tiny_llama4_text", true),
        ("tiny_smollm3", true),
        ("tiny_granite", true),
        ("tiny_seed_oss", true),
        ("tiny_helium", true),
        ("tiny_internlm3", true),
        ("tiny_olmo2", true),
        ("tiny_olmo3", true),
        ("tiny_exaone4", true),
        ("tiny_glm4", true),
        ("tiny_cohere2", true),
        ("tiny_starcoder2", true),
        ("tiny_apertus", true),
        ("tiny_hunyuan_v1_dense", true),
        ("tiny_ministral3", false),
        ("tiny_mistral3", false),
        ("tiny_mistral3_llama", true),
        ("tiny_gemma3_vlm", true),
        ("tiny_lfm2", false),
    ];
    for (name, graphable) in table {
        let m = load_model(&golden(name), Some(DType::F32), &Device::Cpu).unwrap();
        assert_eq!(m.model.graph_step().is_some(), graphable, "{name} ({})", m.model_type);
    }
}

/// A model with sliding-window layers (rotating caches, which cannot be left-padded into one
/// batch): batch generation runs the prompts one after another through the same engine, and
/// each row is what the prompt gives alone.
#[test]
fn batch_generation_of_a_sliding_window_model_gives_each_prompt_its_own_output() {
    use std::collections::BTreeSet;
    use wick::engine::generate::{generate, GenerateOptions};
    let m = load_model(&golden("tiny_gemma3"), Some(DType::F32), &Device::Cpu).unwrap();
    let model = m.model.as_ref();
    let prompts: Vec<Vec<u32>> = vec![(1..40).collect(), (7..12).collect(), (3..30).rev().collect()];
    let opts = GenerateOptions { max_tokens: 12, prefill_step_size: 16, ..Default::default() };
    let no_eos = BTreeSet::new();
    let out = wick::engine::batch::batch_generate(model, &prompts, &opts, &no_eos, |_| {}).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let mut alone = vec![];
        generate(model, p, &opts, &no_eos, |t| {
            alone.push(t);
            Ok(true)
        })
        .unwrap();
        assert_eq!(out.tokens[i], alone, "row {i}");
        assert_eq!(out.tokens[i].len(), 12);
    }
}

/// The engine around a mixture-of-experts model (qwen3_moe): batch generation, a saved and
/// reloaded prompt cache, and speculative decoding with the 4-bit model as the draft each give
/// mlx_lm's greedy tokens.
#[test]
fn moe_model_through_batch_prompt_cache_and_speculative_decoding_gives_mlx_lms_tokens() {
    use std::collections::BTreeSet;
    use wick::engine::generate::GenerateOptions;
    let dir = golden("tiny_qwen3_moe");
    let (prompt, want) = golden_greedy(&dir);
    let m = load_model(&dir, Some(DType::F32), &Device::Cpu).unwrap();
    let model = m.model.as_ref();
    let opts = GenerateOptions { max_tokens: want.len(), ..Default::default() };
    let no_eos = BTreeSet::new();

    // the golden prompt in a left-padded batch with longer and shorter ones
    let prompts = vec![(1..30).collect::<Vec<u32>>(), prompt.clone(), vec![5, 9, 2]];
    let out = wick::engine::batch::batch_generate(model, &prompts, &opts, &no_eos, |_| {}).unwrap();
    assert_eq!(out.tokens[1], want, "batch row of the golden prompt");

    // a prompt cache of the first 5 tokens, saved, loaded and continued
    let (got, _) = continue_from_saved_cache(model, &prompt, 512, &opts);
    assert_eq!(got, want, "continued from a saved prompt cache");

    // speculative decoding, drafting with the 4-bit model
    let draft = load_model(&dir.join("q4"), Some(DType::F32), &Device::Cpu).unwrap();
    let mut got = vec![];
    wick::engine::speculative::speculative_generate(model, draft.model.as_ref(), &prompt, &opts, 3, &no_eos, |t, _| {
        got.push(t);
        Ok(true)
    })
    .unwrap();
    assert_eq!(got, want, "speculative decoding");
}

/// The first 5 prompt tokens prefilled (`step` at a time) into a cache saved as a prompt cache
/// file and loaded back, then the rest of the prompt and generation from it: the tokens, and
/// the loaded layers' cache classes.
fn continue_from_saved_cache(
    model: &dyn wick::models::LanguageModel,
    prompt: &[u32],
    step: usize,
    opts: &wick::engine::generate::GenerateOptions,
) -> (Vec<u32>, Vec<&'static str>) {
    use wick::engine::sample::Sampler;
    let mut cache = model.make_cache(None);
    wick::engine::generate::prefill(model, &prompt[..5], &mut cache, step).unwrap();
    let file = tempfile::tempdir().unwrap();
    let path = file.path().join("cache.safetensors");
    wick::engine::prompt_cache::save(&path, &cache, &Default::default()).unwrap();
    let loaded = wick::engine::prompt_cache::load(&path, DType::F32, &Device::Cpu).unwrap();
    let classes = loaded.cache.iter().map(|c| c.kind().class_name()).collect();
    let mut cache = loaded.cache;
    let mut sampler = Sampler::new(Default::default()).unwrap();
    let mut got = vec![];
    let no_eos = Default::default();
    wick::engine::generate::generate_with_cache(
        model,
        &prompt[5..],
        &mut cache,
        &mut sampler,
        opts,
        &no_eos,
        true,
        |t| {
            got.push(t);
            Ok(true)
        },
    )
    .unwrap();
    (got, classes)
}

/// Recurrent hybrids (LFM2's conv states, Qwen3-Next's conv and delta-rule states, in
/// ArraysCaches) through the engine: mlx_lm's greedy tokens with the prompt prefilled 7 tokens at
/// a time, continued from a prompt cache saved and reloaded (mlx_lm's ArraysCache entries), as
/// a row of a left-padded batch (padding masked out of the recurrences), and by speculative
/// decoding, whose rejected drafts roll the states back.
#[test]
fn recurrent_hybrid_through_prefill_chunks_prompt_cache_and_batch_gives_mlx_lms_tokens() {
    use std::collections::BTreeSet;
    use wick::engine::generate::{generate, GenerateOptions};
    for name in ["tiny_lfm2", "tiny_lfm2_idxs", "tiny_qwen3_next", "tiny_granitemoehybrid", "tiny_nemotron_h"] {
        let dir = golden(name);
        let (prompt, want) = golden_greedy(&dir);
        let m = load_model(&dir, Some(DType::F32), &Device::Cpu).unwrap();
        let model = m.model.as_ref();
        let no_eos = BTreeSet::new();
        let opts = GenerateOptions { max_tokens: want.len(), prefill_step_size: 7, ..Default::default() };
        let mut got = vec![];
        generate(model, &prompt, &opts, &no_eos, |t| {
            got.push(t);
            Ok(true)
        })
        .unwrap();
        assert_eq!(got, want, "{name}: prefill in steps of 7");

        let (got, classes) = continue_from_saved_cache(model, &prompt, 3, &opts);
        assert!(classes.contains(&"ArraysCache") && classes.contains(&"KVCache"), "{name}: {classes:?}");
        assert_eq!(got, want, "{name}: continued from a saved prompt cache");

        let prompts = vec![(1..30).collect::<Vec<u32>>(), prompt.clone(), vec![5, 9, 2]];
        let opts = GenerateOptions { max_tokens: want.len(), ..Default::default() };
        let out = wick::engine::batch::batch_generate(model, &prompts, &opts, &no_eos, |_| {}).unwrap();
        assert_eq!(out.tokens[1], want, "{name}: batch row of the golden prompt");

        // speculative decoding: rejected drafts roll the recurrent states back (drafting with
        // the 4-bit model, mostly accepted, and with another architecture, mostly rejected)
        for draft_dir in [dir.join("q4"), golden(if name == "tiny_lfm2" { "tiny_qwen3_next" } else { "tiny_lfm2" })] {
            let draft = load_model(&draft_dir, Some(DType::F32), &Device::Cpu).unwrap();
            let mut got = vec![];
            let stats = wick::engine::speculative::speculative_generate(
                model,
                draft.model.as_ref(),
                &prompt,
                &opts,
                3,
                &no_eos,
                |t, _| {
                    got.push(t);
                    Ok(true)
                },
            )
            .unwrap();
            assert_eq!(got, want, "{name}: speculative decoding drafting with {}", draft_dir.display());
            assert!(stats.drafted > stats.accepted || draft_dir.ends_with("q4"), "{name}: no draft rejected");
        }
    }
}

/// A recurrent hybrid's next chat turn through the server's scheduler: the first request's whole
/// sequence (prompt and reply) is kept, and the follow-up that continues it starts from that
/// state (`cached` = its length) instead of computing it again, giving the tokens a fresh
/// computation of the whole follow-up gives. A prompt that only shares part of an entry (whose
/// recurrent state cannot be cut) computes everything.
#[test]
fn recurrent_hybrid_next_turn_reuses_the_previous_turns_state_in_the_server() {
    use std::collections::BTreeSet;
    use wick::engine::generate::{generate, GenerateOptions};
    use wick::server::scheduler::{Event, Job, Scheduler, SchedulerConfig};
    let dir = golden("tiny_qwen3_next");
    let (prompt, want) = golden_greedy(&dir);
    let m = load_model(&dir, Some(DType::F32), &Device::Cpu).unwrap();
    let alone = |p: &[u32], n: usize| {
        let mut out = vec![];
        let opts = GenerateOptions { max_tokens: n, ..Default::default() };
        generate(m.model.as_ref(), p, &opts, &BTreeSet::new(), |t| {
            out.push(t);
            Ok(true)
        })
        .unwrap();
        out
    };
    let second: Vec<u32> = prompt.iter().chain(&want[..12]).chain(&[3, 14, 15]).copied().collect();
    let second_want = alone(&second, 10);
    let partial: Vec<u32> = prompt[..6].iter().chain(&[9, 9]).copied().collect();
    let partial_want = alone(&partial, 5);
    let cfg = SchedulerConfig {
        max_batch: 2,
        max_queue: 4,
        prefill_step_size: 5,
        prompt_cache_size: 4,
        eos_token_ids: BTreeSet::new(),
    };
    let (scheduler, worker) = Scheduler::new(m.model, cfg).unwrap();
    let worker = std::thread::spawn(move || worker.run());
    let ask = |p: &[u32], n: usize| -> (usize, Vec<u32>) {
        let (events, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let job = Job {
            prompt: p.to_vec(),
            max_tokens: n,
            sampler: Default::default(),
            processors: Default::default(),
            logprobs: None,
            events,
        };
        assert!(scheduler.submit(job).is_ok());
        let (mut cached, mut got) = (usize::MAX, vec![]);
        while let Some(e) = rx.blocking_recv() {
            match e {
                Event::Started { cached: c } => cached = c,
                Event::Token { id, finish, .. } => {
                    got.push(id);
                    if finish.is_some() {
                        break;
                    }
                }
                Event::Error(e) => panic!("{e}"),
            }
        }
        (cached, got)
    };
    let (cached, got) = ask(&prompt, 12);
    assert_eq!((cached, got.as_slice()), (0, &want[..12]));
    // the next turn: the first request's prompt and its 12 tokens, then new ones
    let (cached, got) = ask(&second, 10);
    assert_eq!(got, second_want, "the next turn from the kept state");
    assert!(cached >= prompt.len() + 11, "the next turn computed {cached} cached positions again");
    // a prompt sharing only the first 6 tokens: nothing reusable, all computed
    let (cached, got) = ask(&partial, 5);
    assert_eq!((cached, got), (0, partial_want));
    drop(scheduler);
    worker.join().unwrap();
}

/// The server's model loop with a mixture-of-experts model (gpt_oss: sinks, sliding layers,
/// so its requests run one after another; qwen3_moe, batched with a prefix cache): concurrent
/// greedy requests of the golden prompt, each continuing a shared prefix, give mlx_lm's tokens.
#[test]
fn moe_models_through_the_server_scheduler_give_mlx_lms_tokens() {
    use std::collections::BTreeSet;
    use wick::server::scheduler::{Event, Job, Scheduler, SchedulerConfig};
    for name in ["tiny_qwen3_moe", "tiny_gpt_oss", "tiny_lfm2", "tiny_qwen3_next"] {
        let dir = golden(name);
        let (prompt, want) = golden_greedy(&dir);
        let m = load_model(&dir, Some(DType::F32), &Device::Cpu).unwrap();
        let cfg = SchedulerConfig {
            max_batch: 4,
            max_queue: 8,
            prefill_step_size: 5,
            prompt_cache_size: 4,
            eos_token_ids: BTreeSet::new(),
        };
        let (scheduler, worker) = Scheduler::new(m.model, cfg).unwrap();
        let worker = std::thread::spawn(move || worker.run());
        let run = |n: usize| {
            let receivers: Vec<_> = (0..n)
                .map(|i| {
                    let (events, rx) = tokio::sync::mpsc::unbounded_channel();
                    let job = Job {
                        prompt: prompt.clone(),
                        max_tokens: want.len() - i,
                        sampler: Default::default(),
                        processors: Default::default(),
                        logprobs: None,
                        events,
                    };
                    assert!(scheduler.submit(job).is_ok());
                    rx
                })
                .collect();
            for (i, mut rx) in receivers.into_iter().enumerate() {
                let mut got = vec![];
                while let Some(e) = rx.blocking_recv() {
                    match e {
                        Event::Token { id, finish, .. } => {
                            got.push(id);
                            if finish.is_some() {
                                break;
                            }
                        }
                        Event::Error(e) => panic!("{name}: {e}"),
                        Event::Started { .. } => {}
                    }
                }
                assert_eq!(got, want[..want.len() - i], "{name}: request {i}");
            }
        };
        // twice: the second round starts from the prefixes the first left
        run(3);
        run(3);
        drop(scheduler);
        worker.join().unwrap();
    }
}

/// gpt-oss with its experts in mlx's mxfp4 mode (as the model ships; everything else float):
/// logits and greedy tokens as mlx_lm's.
#[test]
fn tiny_gpt_oss_mxfp4_experts_match_mlx_lm() {
    let dir = golden("tiny_gpt_oss").join("mxfp4");
    check_folder("tiny_gpt_oss", &dir, 1e-3);
    check_greedy(&dir);
}

/// `crate::quant::mxfp4::quantize` of the float16 expert weights writes what `mx.quantize(…,
/// mode="mxfp4")` wrote, byte for byte.
#[test]
fn mxfp4_quantization_is_bit_exact_with_mlx() {
    let f = candle_core::safetensors::load(golden("tiny_gpt_oss").join("model.safetensors"), &Device::Cpu).unwrap();
    let q =
        candle_core::safetensors::load(golden("tiny_gpt_oss").join("mxfp4/model.safetensors"), &Device::Cpu).unwrap();
    let mut n = 0;
    for (k, w) in &f {
        let Some(layer) = k.strip_suffix(".weight").filter(|l| l.contains(".experts.")) else { continue };
        let (packed, scales) = wick::quant::mxfp4::quantize_tensor(w).unwrap();
        let want_p: Vec<u32> = q[k].flatten_all().unwrap().to_vec1().unwrap();
        let want_s: Vec<u8> = q[&format!("{layer}.scales")].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(packed.flatten_all().unwrap().to_vec1::<u32>().unwrap(), want_p, "{k}");
        assert_eq!(scales.flatten_all().unwrap().to_vec1::<u8>().unwrap(), want_s, "{layer}.scales");
        n += 1;
    }
    assert_eq!(n, 12, "3 expert projections in each of 4 layers");
}

/// gpt-oss as OpenAI publishes it (experts as MXFP4 `*_blocks` bytes and `*_scales`, gate and
/// up rows interleaved in `gate_up_proj`, `quantization_config.quant_method = mxfp4`) loads as
/// mlx_lm's conversion of it: mlx_lm's mxfp4 golden, written back in that layout.
#[test]
fn tiny_gpt_oss_original_mxfp4_layout_loads_the_same() {
    let src = golden("tiny_gpt_oss").join("mxfp4");
    let tmp = tempfile::tempdir().unwrap();
    for f in ["logits.safetensors", "greedy.json"] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let c = cfg.as_object_mut().unwrap();
    c.remove("quantization");
    c.insert("quantization_config".into(), serde_json::json!({"quant_method": "mxfp4"}));
    std::fs::write(tmp.path().join("config.json"), serde_json::to_string(&cfg).unwrap()).unwrap();
    let t = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    // u32 words (…, w) as bytes (…, w/4, 16), little-endian
    let blocks = |w: &Tensor| -> Tensor {
        let mut dims = w.dims().to_vec();
        let words = dims.pop().unwrap();
        dims.extend([words / 4, 16]);
        let bytes: Vec<u8> =
            w.flatten_all().unwrap().to_vec1::<u32>().unwrap().iter().flat_map(|x| x.to_le_bytes()).collect();
        Tensor::from_vec(bytes, dims, &Device::Cpu).unwrap()
    };
    // gate and up interleaved along `axis`: gate row i at 2i, up row i at 2i + 1
    let interleave = |g: &Tensor, u: &Tensor, axis: usize| -> Tensor {
        let mut dims = g.dims().to_vec();
        dims[axis] *= 2;
        Tensor::stack(&[g, u], axis + 1).unwrap().reshape(dims).unwrap()
    };
    let mut out = std::collections::HashMap::new();
    for (k, v) in &t {
        if !k.contains(".experts.") {
            out.insert(k.clone(), v.clone());
        }
    }
    for l in 0..4 {
        let p = format!("model.layers.{l}.mlp.experts");
        let get = |n: &str| t[&format!("{p}.{n}")].clone();
        out.insert(
            format!("{p}.gate_up_proj_blocks"),
            blocks(&interleave(&get("gate_proj.weight"), &get("up_proj.weight"), 1)),
        );
        out.insert(format!("{p}.gate_up_proj_scales"), interleave(&get("gate_proj.scales"), &get("up_proj.scales"), 1));
        out.insert(format!("{p}.gate_up_proj_bias"), interleave(&get("gate_proj.bias"), &get("up_proj.bias"), 1));
        out.insert(format!("{p}.down_proj_blocks"), blocks(&get("down_proj.weight")));
        out.insert(format!("{p}.down_proj_scales"), get("down_proj.scales"));
        out.insert(format!("{p}.down_proj_bias"), get("down_proj.bias"));
    }
    candle_core::safetensors::save(&out, tmp.path().join("model.safetensors")).unwrap();
    check_folder("tiny_gpt_oss", tmp.path(), 1e-3);
    check_greedy(tmp.path());
}

/// Llama 4's Hugging Face expert tensors (`experts.gate_up_proj`, hidden × (gate | up) per
/// expert, and `experts.down_proj`, intermediate × hidden) load as mlx's stacked ones.
#[test]
fn tiny_llama4_fused_hf_layout_loads_the_same() {
    let seen = std::sync::Mutex::new(std::collections::HashMap::<String, (String, Tensor)>::new());
    let dir = hf_layout("tiny_llama4", ".experts.", |head, tail, v, out| match tail {
        "gate_proj.weight" | "up_proj.weight" => {
            let Some((other, w)) = seen.lock().unwrap().remove(head) else {
                seen.lock().unwrap().insert(head.to_string(), (tail.to_string(), v));
                return;
            };
            let (g, u) = if other == "gate_proj.weight" { (w, v) } else { (v, w) };
            let fused = Tensor::cat(&[g.transpose(1, 2).unwrap(), u.transpose(1, 2).unwrap()], 2).unwrap();
            out.insert(format!("{head}.experts.gate_up_proj"), fused.contiguous().unwrap());
        }
        "down_proj.weight" => {
            out.insert(format!("{head}.experts.down_proj"), v.transpose(1, 2).unwrap().contiguous().unwrap());
        }
        other => panic!("unexpected {other}"),
    });
    check_folder("tiny_llama4", dir.path(), 1e-4);
}

/// A mistral3 checkpoint in the newer Hugging Face layout (`model.language_model.…`, a
/// top-level `lm_head`, the vision tower and projector under `model.`) loads as the mlx layout
/// does: mlx_lm's logits.
#[test]
fn tiny_mistral3_transformers_v5_layout_with_vision_tower_loads_the_same() {
    let dir = hf_layout("tiny_mistral3", "language_model.", |_, tail, v, out| {
        let name = match tail.strip_prefix("model.") {
            Some(rest) => format!("model.language_model.{rest}"),
            None => tail.to_string(),
        };
        out.insert("model.vision_tower.patch_conv.weight".into(), v.zeros_like().unwrap());
        out.insert("model.multi_modal_projector.linear_1.weight".into(), v.zeros_like().unwrap());
        out.insert(name, v);
    });
    check_folder("tiny_mistral3", dir.path(), 1e-4);
}
