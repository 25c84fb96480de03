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

/// The golden token ids of tiny model `name` (`inputs.json`).
fn golden_ids(name: &str) -> Vec<u32> {
    let inputs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden(name).join("inputs.json")).unwrap()).unwrap();
    inputs["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

/// wick's logits of `ids` from the model folder `dir` (f32, one forward pass), and their largest
/// difference from the logits mlx_lm computes from the same files (tests/mlx_oracle.py).
fn logits_against_mlx_lm(dir: &std::path::Path, ids: &[u32]) -> (Vec<f32>, f32) {
    let want: Vec<Vec<f32>> = mlx_oracle("logits", dir, std::path::Path::new("-"), ids, 0);
    let m = load_model(dir, Some(DType::F32), &Device::Cpu).unwrap();
    let mut cache = m.model.make_cache(None);
    let x = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let got: Vec<f32> = m.model.forward(&x, &mut cache, false).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let d = max_abs_diff(&got, &want.concat());
    (got, d)
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

/// Multi-head latent attention: the latent cache, prompt chunks through the expanded keys, decode
/// steps absorbed into latent space; DeepSeek-V3 routing (sigmoid + correction bias, group limit,
/// renormalized top-k, shared experts); held out: one q_proj, biases, plain RoPE, top-1 every
/// second layer, `kimi_k2` remapped.
#[test]
fn tiny_deepseek_v3_latent_attention_grouped_routing_match_mlx_lm() {
    check("tiny_deepseek_v3");
    check("tiny_deepseek_v3_b");
}

/// DeepSeek-V2: the latents expanded by `kv_b_proj` into a per-head cache, softmax routing with
/// `group_limited_greedy` (held out: plain top-k, one q_proj, factor-1 yarn, biases).
#[test]
fn tiny_deepseek_v2_expanded_latents_softmax_routing_match_mlx_lm() {
    check("tiny_deepseek_v2");
    check("tiny_deepseek_v2_b");
}

/// The other MLA families: Kimi K2.5's wrapper, GLM-4.7-Flash (latent norms at rms_norm_eps,
/// base 1e6), Mistral Small 4 bare and inside mistral3 (softmax router as a quantizable linear
/// layer, position-scaled queries, tied head, non-traditional RoPE).
#[test]
fn tiny_kimi_glm_lite_mistral4_latent_attention_match_mlx_lm() {
    check("tiny_kimi_k25");
    check("tiny_glm4_moe_lite");
    check("tiny_mistral4");
    check("tiny_mistral3_mistral4");
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

/// A latent-attention golden model in Hugging Face's layout: `kv_b_proj` whole (each head's key
/// rows, then its value rows; mlx_lm's sanitize splits it into `embed_q` / `unembed_out`), the
/// experts one by one (`fused`: Mistral 4's `experts.gate_up_proj` / `experts.down_proj`), and
/// the `junk` tensors the sanitize drops.
fn mla_hf_layout(name: &str, fused: bool, junk: &[&str]) -> tempfile::TempDir {
    let src = golden(name);
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "logits.safetensors", "greedy.json"] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    let mut w = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut out = std::collections::HashMap::new();
    let names: Vec<String> = w.keys().cloned().collect();
    for k in names {
        let Some(v) = w.remove(&k) else { continue };
        if let Some(p) = k.strip_suffix(".embed_q.weight") {
            let (h, r, _) = v.dims3().unwrap();
            let wv = w.remove(&format!("{p}.unembed_out.weight")).unwrap();
            let kv_b = Tensor::cat(&[&v.transpose(1, 2).unwrap(), &wv], 1).unwrap();
            let rows = kv_b.dim(1).unwrap();
            out.insert(format!("{p}.kv_b_proj.weight"), kv_b.reshape((h * rows, r)).unwrap());
        } else if let Some(p) = k.strip_suffix(".unembed_out.weight") {
            let wk = w.remove(&format!("{p}.embed_q.weight")).unwrap();
            let (h, r, _) = wk.dims3().unwrap();
            let kv_b = Tensor::cat(&[&wk.transpose(1, 2).unwrap(), &v], 1).unwrap();
            let rows = kv_b.dim(1).unwrap();
            out.insert(format!("{p}.kv_b_proj.weight"), kv_b.reshape((h * rows, r)).unwrap());
        } else if let Some((head, tail)) = k.split_once(".switch_mlp.") {
            let proj = tail.strip_suffix(".weight").unwrap();
            match (fused, proj) {
                (false, _) => per_expert(head, proj, &v, &mut out),
                (true, "down_proj") => {
                    out.insert(format!("{head}.experts.down_proj"), v);
                }
                (true, _) => {
                    let other = if proj == "gate_proj" { "up_proj" } else { "gate_proj" };
                    let Some(o) = w.remove(&format!("{head}.switch_mlp.{other}.weight")) else { continue };
                    let (g, u) = if proj == "gate_proj" { (v, o) } else { (o, v) };
                    out.insert(format!("{head}.experts.gate_up_proj"), Tensor::cat(&[g, u], 1).unwrap());
                }
            }
        } else {
            out.insert(k, v);
        }
    }
    for j in junk {
        out.insert(j.to_string(), Tensor::zeros(4, DType::F16, &Device::Cpu).unwrap());
    }
    candle_core::safetensors::save(&out, tmp.path().join("model.safetensors")).unwrap();
    tmp
}

/// Hugging Face's layout of each latent-attention family (whole `kv_b_proj`, experts one by one
/// or fused, multi-token-prediction layers, rotary frequencies, FP8 activation scales, a vision
/// tower) loads as mlx_lm's sanitize leaves it: the same logits.
#[test]
fn latent_attention_hf_layouts_load_the_same() {
    let cases: [(&str, bool, &[&str]); 5] = [
        (
            "tiny_deepseek_v3",
            false,
            &["model.layers.61.mlp.gate.weight", "model.layers.0.self_attn.rotary_emb.inv_freq"],
        ),
        ("tiny_glm4_moe_lite", false, &["model.layers.3.eh_proj.weight", "model.layers.3.self_attn.kv_b_proj.weight"]),
        ("tiny_mistral4", true, &["model.layers.0.self_attn.q_a_proj.activation_scale"]),
        ("tiny_kimi_k25", false, &["vision_tower.patch_embed.weight", "mm_projector.proj.0.weight"]),
        ("tiny_mistral3_mistral4", true, &["vision_tower.patch_conv.weight", "multi_modal_projector.norm.weight"]),
    ];
    for (name, fused, junk) in cases {
        let dir = mla_hf_layout(name, fused, junk);
        check_folder(name, dir.path(), 1e-4);
    }
}

/// Stores the tensors `names` of the checkpoint in `dir` as FP8 (e4m3) with inverse scales
/// `{name}_scale_inv` (per 128 × 128 block of a matrix when `blocks`, else one per leading slice:
/// a scalar for a matrix, one per expert), as DeepSeek and Mistral publish them, and marks
/// config.json's `quantization_config` as FP8.
fn to_fp8(dir: &std::path::Path, names: &[(&str, bool)]) {
    let path = dir.join("model.safetensors");
    let mut w = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    for &(name, blocks) in names {
        let t = w.remove(name).unwrap_or_else(|| panic!("{name}")).to_dtype(DType::F32).unwrap();
        let scale = if blocks {
            let (r, c) = t.dims2().unwrap();
            let (br, bc) = (r.div_ceil(128), c.div_ceil(128));
            let mut s = vec![0f32; br * bc];
            let v: Vec<Vec<f32>> = t.to_vec2().unwrap();
            for (i, row) in v.iter().enumerate() {
                for (j, x) in row.iter().enumerate() {
                    let k = (i / 128) * bc + j / 128;
                    s[k] = s[k].max(x.abs() / 448.0);
                }
            }
            Tensor::from_vec(s, (br, bc), &Device::Cpu).unwrap()
        } else {
            let lead = if t.rank() == 3 { t.dim(0).unwrap() } else { 1 };
            let m = t.abs().unwrap().reshape((lead, ())).unwrap().max(1).unwrap();
            let m = (m / 448.0).unwrap();
            if t.rank() == 3 {
                m.reshape((lead, 1, 1)).unwrap()
            } else {
                m.reshape(()).unwrap()
            }
        };
        let full = if blocks {
            let (r, c) = t.dims2().unwrap();
            let (br, bc) = scale.dims2().unwrap();
            let e = scale.reshape((br, 1, bc, 1)).unwrap().broadcast_as((br, 128, bc, 128)).unwrap();
            e.reshape((br * 128, bc * 128)).unwrap().narrow(0, 0, r).unwrap().narrow(1, 0, c).unwrap()
        } else {
            scale.broadcast_as(t.shape()).unwrap()
        };
        let q = t.div(&full).unwrap().to_dtype(DType::F8E4M3).unwrap();
        w.insert(name.to_string(), q);
        w.insert(format!("{name}_scale_inv"), scale);
    }
    candle_core::safetensors::save(&w, &path).unwrap();
    let cfg_path = dir.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["quantization_config"] = serde_json::json!({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]});
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
}

/// FP8 checkpoints (DeepSeek-V3's 128 × 128 block scales; Mistral 4's scalar and per-expert ones
/// on fused experts) load with the logits mlx_lm computes from the same files.
#[test]
fn latent_attention_fp8_checkpoints_load_as_mlx_lm_loads_them() {
    let ids = golden_ids("tiny_deepseek_v3");
    type Case<'a> = (&'a str, bool, &'a [(&'a str, bool)]);
    let cases: [Case; 2] = [
        (
            "tiny_deepseek_v3",
            false,
            &[
                ("model.layers.0.self_attn.q_b_proj.weight", true),
                ("model.layers.1.self_attn.kv_b_proj.weight", true),
                ("model.layers.2.mlp.experts.3.down_proj.weight", true),
                ("model.layers.0.mlp.up_proj.weight", true),
            ],
        ),
        (
            "tiny_mistral4",
            true,
            &[
                ("model.layers.0.self_attn.o_proj.weight", false),
                ("model.layers.1.mlp.experts.gate_up_proj", false),
                ("model.layers.2.self_attn.kv_b_proj.weight", true),
            ],
        ),
    ];
    for (name, fused, fp8) in cases {
        let dir = mla_hf_layout(name, fused, &[]);
        to_fp8(dir.path(), fp8);
        let (got, d) = logits_against_mlx_lm(dir.path(), &ids);
        assert!(d < 1e-4, "{name}: FP8 checkpoint logits differ from mlx_lm's by {d}");
        // and they are not the float model's (the FP8 rounding shows)
        let gold = load_f32(&golden(name).join("logits.safetensors"));
        assert!(max_abs_diff(&got, &gold["full"].1) > 1e-4, "{name}: no FP8 rounding visible");
    }
}

/// Stores the (out × in) matrices `names` of the checkpoint in `dir` as compressed-tensors'
/// symmetric int4 (`weight_packed` i32 words, element j of a word in bits 4j.., offset by 8;
/// `weight_scale` per 32 inputs; `weight_shape`), as Kimi K2.5 ships its experts, and marks
/// config.json's `quantization_config` so.
fn to_compressed_int4(dir: &std::path::Path, names: &[&str]) {
    let path = dir.join("model.safetensors");
    let mut w = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    for name in names {
        let t = w.remove(*name).unwrap_or_else(|| panic!("{name}")).to_dtype(DType::F32).unwrap();
        let (rows, cols) = t.dims2().unwrap();
        let v: Vec<Vec<f32>> = t.to_vec2().unwrap();
        let (mut words, mut scales) = (vec![0i32; rows * cols / 8], vec![0f32; rows * cols / 32]);
        for (r, row) in v.iter().enumerate() {
            for g in 0..cols / 32 {
                let group = &row[g * 32..(g + 1) * 32];
                let s = half::bf16::from_f32(group.iter().fold(0f32, |m, x| m.max(x.abs())) / 7.0).to_f32();
                scales[r * cols / 32 + g] = s;
                for (j, x) in group.iter().enumerate() {
                    let q = ((x / s).round().clamp(-8.0, 7.0) as i32 + 8) as u32;
                    let c = g * 32 + j;
                    words[r * cols / 8 + c / 8] |= (q << (4 * (c % 8))) as i32;
                }
            }
        }
        let base = name.strip_suffix("weight").unwrap();
        let dev = &Device::Cpu;
        w.insert(format!("{base}weight_packed"), Tensor::from_vec(words, (rows, cols / 8), dev).unwrap());
        let scales = Tensor::from_vec(scales, (rows, cols / 32), dev).unwrap().to_dtype(DType::BF16).unwrap();
        w.insert(format!("{base}weight_scale"), scales);
        w.insert(format!("{base}weight_shape"), Tensor::new(&[rows as i32, cols as i32], dev).unwrap());
    }
    candle_core::safetensors::save(&w, &path).unwrap();
    let cfg_path = dir.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["quantization_config"] = serde_json::json!({"quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {"group_0": {"weights": {"num_bits": 4, "group_size": 32, "symmetric": true}}}});
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
}

/// A compressed-tensors int4 checkpoint (Kimi K2.5's experts, the rest float) loads with the
/// logits mlx_lm computes from the same files.
#[test]
fn latent_attention_compressed_int4_experts_load_as_mlx_lm_loads_them() {
    let ids = golden_ids("tiny_kimi_k25");
    let dir = mla_hf_layout("tiny_kimi_k25", false, &[]);
    let experts: Vec<String> = (1..3)
        .flat_map(|l| {
            (0..8).flat_map(move |e| {
                ["gate_proj", "up_proj", "down_proj"]
                    .map(|p| format!("language_model.model.layers.{l}.mlp.experts.{e}.{p}.weight"))
            })
        })
        .collect();
    to_compressed_int4(dir.path(), &experts.iter().map(String::as_str).collect::<Vec<_>>());
    let (got, d) = logits_against_mlx_lm(dir.path(), &ids);
    assert!(d < 1e-4, "compressed int4 checkpoint logits differ from mlx_lm's by {d}");
    let gold = load_f32(&golden("tiny_kimi_k25").join("logits.safetensors"));
    assert!(max_abs_diff(&got, &gold["full"].1) > 1e-3, "no int4 rounding visible");
}

/// An older MLX conversion of a latent-attention model: `kv_b_proj` quantized whole (4-bit,
/// group 32, by mx.quantize's rule) instead of `embed_q` / `unembed_out`. It loads as mlx_lm's
/// sanitize leaves it (dequantized, split, quantized again along the new axes): the logits mlx_lm
/// computes from the same files.
#[test]
fn latent_attention_old_mlx_conversion_with_a_quantized_kv_b_proj_loads_as_mlx_lm_loads_it() {
    let name = "tiny_deepseek_v3";
    let ids = golden_ids(name);
    let float = candle_core::safetensors::load(golden(name).join("model.safetensors"), &Device::Cpu).unwrap();
    let mut q4 = candle_core::safetensors::load(golden(name).join("q4/model.safetensors"), &Device::Cpu).unwrap();
    let params = wick::quant::QuantParams::new(4, 32, "test").unwrap();
    for l in 0..3 {
        let p = format!("model.layers.{l}.self_attn");
        let wk = &float[&format!("{p}.embed_q.weight")];
        let (h, r, _) = wk.dims3().unwrap();
        let kv_b = Tensor::cat(&[&wk.transpose(1, 2).unwrap(), &float[&format!("{p}.unembed_out.weight")]], 1).unwrap();
        let rows = kv_b.dim(1).unwrap();
        let (w, sc, b) = wick::quant::quantize_tensor(&kv_b.reshape((h * rows, r)).unwrap(), params).unwrap();
        for (n, t) in [("weight", w), ("scales", sc), ("biases", b)] {
            q4.remove(&format!("{p}.embed_q.{n}"));
            q4.remove(&format!("{p}.unembed_out.{n}"));
            q4.insert(format!("{p}.kv_b_proj.{n}"), t);
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    // a per-layer entry for it, as mixed recipes write (v_b_proj layers get more bits)
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden(name).join("q4/config.json")).unwrap()).unwrap();
    cfg["quantization"]["model.layers.0.self_attn.kv_b_proj"] = serde_json::json!({"group_size": 32, "bits": 4});
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    candle_core::safetensors::save(&q4, tmp.path().join("model.safetensors")).unwrap();
    let (_, d) = logits_against_mlx_lm(tmp.path(), &ids);
    assert!(d < 1e-4, "old MLX conversion's logits differ from mlx_lm's by {d}");
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
        // latent attention's decode step has no CUDA-graph kernel yet
        ("tiny_deepseek_v3", false),
        ("tiny_deepseek_v2", false),
        ("tiny_mistral4", false),
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
    let mut cache = model.make_cache(None);
    wick::engine::generate::prefill(model, &prompt[..5], &mut cache, step).unwrap();
    let file = tempfile::tempdir().unwrap();
    let path = file.path().join("cache.safetensors");
    wick::engine::prompt_cache::save(&path, &cache, &Default::default()).unwrap();
    let loaded = wick::engine::prompt_cache::load(&path, DType::F32, &Device::Cpu).unwrap();
    let classes = loaded.cache.iter().map(|c| c.kind().class_name()).collect();
    let mut cache = loaded.cache;
    (continue_cache(model, &prompt[5..], &mut cache, opts), classes)
}

/// Greedy tokens after `rest` from `cache` (a prompt cache's continuation).
fn continue_cache(
    model: &dyn wick::models::LanguageModel,
    rest: &[u32],
    cache: &mut [wick::cache::KvCache],
    opts: &wick::engine::generate::GenerateOptions,
) -> Vec<u32> {
    let mut sampler = wick::engine::sample::Sampler::new(Default::default()).unwrap();
    let mut got = vec![];
    let no_eos = Default::default();
    wick::engine::generate::generate_with_cache(model, rest, cache, &mut sampler, opts, &no_eos, true, |t| {
        got.push(t);
        Ok(true)
    })
    .unwrap();
    got
}

/// Greedy tokens of `model` after `prompt` through `generate`.
fn greedy_tokens(
    model: &dyn wick::models::LanguageModel,
    prompt: &[u32],
    opts: &wick::engine::generate::GenerateOptions,
) -> Vec<u32> {
    let mut got = vec![];
    wick::engine::generate::generate(model, prompt, opts, &Default::default(), |t| {
        got.push(t);
        Ok(true)
    })
    .unwrap();
    got
}

/// The golden prompt as the middle row of a left-padded batch with a longer and a shorter one:
/// that row's tokens.
fn batch_row_tokens(model: &dyn wick::models::LanguageModel, prompt: &[u32], n: usize) -> Vec<u32> {
    let prompts = vec![(1..30).collect::<Vec<u32>>(), prompt.to_vec(), vec![5, 9, 2]];
    let opts = wick::engine::generate::GenerateOptions { max_tokens: n, ..Default::default() };
    let out = wick::engine::batch::batch_generate(model, &prompts, &opts, &Default::default(), |_| {}).unwrap();
    out.tokens[1].clone()
}

/// Speculative decoding's tokens (3 drafted at a time by `draft`) and whether a draft was
/// rejected.
fn speculative_tokens(
    model: &dyn wick::models::LanguageModel,
    draft: &dyn wick::models::LanguageModel,
    prompt: &[u32],
    n: usize,
) -> (Vec<u32>, bool) {
    let opts = wick::engine::generate::GenerateOptions { max_tokens: n, ..Default::default() };
    let mut got = vec![];
    let stats =
        wick::engine::speculative::speculative_generate(model, draft, prompt, &opts, 3, &Default::default(), |t, _| {
            got.push(t);
            Ok(true)
        })
        .unwrap();
    (got, stats.drafted > stats.accepted)
}

/// Golden `name` (f32) through the engine's first two forms, each giving mlx_lm's greedy tokens:
/// the prompt prefilled 7 tokens at a time, and continued from a prompt cache of its first 5
/// tokens saved and reloaded. Gives the folder, the prompt, the tokens, the model and the
/// reloaded cache's layer classes.
fn prefill_and_saved_cache_give_mlx_lms_tokens(
    name: &str,
) -> (std::path::PathBuf, Vec<u32>, Vec<u32>, wick::models::LoadedModel, Vec<&'static str>) {
    use wick::engine::generate::GenerateOptions;
    let dir = golden(name);
    let (prompt, want) = golden_greedy(&dir);
    let m = load_model(&dir, Some(DType::F32), &Device::Cpu).unwrap();
    let opts = GenerateOptions { max_tokens: want.len(), prefill_step_size: 7, ..Default::default() };
    assert_eq!(greedy_tokens(m.model.as_ref(), &prompt, &opts), want, "{name}: prefill in steps of 7");
    let (got, classes) = continue_from_saved_cache(m.model.as_ref(), &prompt, 3, &opts);
    assert_eq!(got, want, "{name}: continued from a saved prompt cache");
    (dir, prompt, want, m, classes)
}

/// Recurrent hybrids (LFM2's conv states, Qwen3-Next's conv and delta-rule states, in
/// ArraysCaches) through the engine: mlx_lm's greedy tokens with the prompt prefilled 7 tokens at
/// a time, continued from a prompt cache saved and reloaded (mlx_lm's ArraysCache entries), as
/// a row of a left-padded batch (padding masked out of the recurrences), and by speculative
/// decoding, whose rejected drafts roll the states back.
#[test]
fn recurrent_hybrid_through_prefill_chunks_prompt_cache_and_batch_gives_mlx_lms_tokens() {
    for name in ["tiny_lfm2", "tiny_lfm2_idxs", "tiny_qwen3_next", "tiny_granitemoehybrid", "tiny_nemotron_h"] {
        let (dir, prompt, want, m, classes) = prefill_and_saved_cache_give_mlx_lms_tokens(name);
        let model = m.model.as_ref();
        assert!(classes.contains(&"ArraysCache") && classes.contains(&"KVCache"), "{name}: {classes:?}");

        assert_eq!(batch_row_tokens(model, &prompt, want.len()), want, "{name}: batch row of the golden prompt");

        // speculative decoding: rejected drafts roll the recurrent states back (drafting with
        // the 4-bit model, mostly accepted, and with another architecture, mostly rejected)
        for draft_dir in [dir.join("q4"), golden(if name == "tiny_lfm2" { "tiny_qwen3_next" } else { "tiny_lfm2" })] {
            let draft = load_model(&draft_dir, Some(DType::F32), &Device::Cpu).unwrap();
            let (got, rejected) = speculative_tokens(model, draft.model.as_ref(), &prompt, want.len());
            assert_eq!(got, want, "{name}: speculative decoding drafting with {}", draft_dir.display());
            assert!(rejected || draft_dir.ends_with("q4"), "{name}: no draft rejected");
        }
    }
}

/// mlx_lm run by tests/mlx_oracle.py: `save` prefills `ids` into `model`'s cache and writes it to
/// `file`; `continue` loads `file` and gives the `n` greedy tokens after `ids`; `logits` gives the
/// logits of `ids` (flattened).
fn mlx_oracle<T: serde::de::DeserializeOwned + Default>(
    mode: &str,
    model: &std::path::Path,
    file: &std::path::Path,
    ids: &[u32],
    n: usize,
) -> T {
    let ids: Vec<String> = ids.iter().map(|t| t.to_string()).collect();
    let py = std::process::Command::new("python3")
        .arg(root().join("tests/mlx_oracle.py"))
        .args([mode, model.to_str().unwrap(), file.to_str().unwrap(), &ids.join(",")])
        .arg(n.to_string())
        .output()
        .expect("python3 with mlx and mlx-lm (tests/requirements.txt)");
    assert!(py.status.success(), "mlx_lm failed: {}", String::from_utf8_lossy(&py.stderr));
    if mode == "save" {
        return T::default();
    }
    serde_json::from_slice(&py.stdout).unwrap()
}

/// Latent-attention models (the latent cache of deepseek_v3 and mistral4, deepseek_v2's expanded
/// one) through the engine, each giving mlx_lm's greedy tokens: prefill 7 tokens at a time
/// (prompt chunks expand the cached latents), a prompt cache saved and reloaded, a cache written
/// by mlx_lm continued by wick and one written by wick continued by mlx_lm, a row of a
/// left-padded batch (absorbed decode with padding masked), speculative decoding with the 4-bit
/// model as the draft; with a cache rotating at 16 positions, mlx_lm's tokens with its rotating
/// cache. A quantized latent cache (`--kv-bits 8`, which mlx_lm cannot run for these models)
/// keeps the first greedy tokens.
#[test]
fn latent_attention_through_prompt_caches_both_ways_batch_and_speculative_gives_mlx_lms_tokens() {
    use wick::engine::generate::{GenerateOptions, KvQuant};
    for name in ["tiny_deepseek_v3", "tiny_mistral4", "tiny_deepseek_v2"] {
        let (dir, prompt, want, m, classes) = prefill_and_saved_cache_give_mlx_lms_tokens(name);
        let model = m.model.as_ref();
        assert!(classes.iter().all(|c| *c == "KVCache"), "{name}: {classes:?}");
        let opts = GenerateOptions { max_tokens: want.len(), ..Default::default() };

        // mlx_lm's cache file continued by wick, and wick's continued by mlx_lm
        let tmp = tempfile::tempdir().unwrap();
        let theirs = tmp.path().join("theirs.safetensors");
        mlx_oracle::<Vec<u32>>("save", &dir, &theirs, &prompt[..5], 0);
        let mut cache = wick::engine::prompt_cache::load(&theirs, DType::F32, &Device::Cpu).unwrap().cache;
        let got = continue_cache(model, &prompt[5..], &mut cache, &opts);
        assert_eq!(got, want, "{name}: mlx_lm's prompt cache continued by wick");
        let ours = tmp.path().join("ours.safetensors");
        let mut cache = model.make_cache(None);
        wick::engine::generate::prefill(model, &prompt[..5], &mut cache, 512).unwrap();
        wick::engine::prompt_cache::save(&ours, &cache, &Default::default()).unwrap();
        assert_eq!(
            mlx_oracle::<Vec<u32>>("continue", &dir, &ours, &prompt[5..], want.len()),
            want,
            "{name}: wick's prompt cache continued by mlx_lm"
        );

        assert_eq!(batch_row_tokens(model, &prompt, want.len()), want, "{name}: batch row of the golden prompt");
        let draft = load_model(&dir.join("q4"), Some(DType::F32), &Device::Cpu).unwrap();
        let (got, _) = speculative_tokens(model, draft.model.as_ref(), &prompt, want.len());
        assert_eq!(got, want, "{name}: speculative decoding");
    }
    // a cache rotating at 16 positions (--max-kv-size), as mlx_lm's RotatingKVCache
    for name in ["tiny_deepseek_v3", "tiny_deepseek_v2"] {
        let dir = golden(name);
        let (prompt, want) = golden_greedy(&dir);
        let m = load_model(&dir, Some(DType::F32), &Device::Cpu).unwrap();
        let opts = GenerateOptions { max_tokens: want.len(), max_kv_size: Some(16), ..Default::default() };
        let theirs: Vec<u32> = mlx_oracle("greedy", &dir, std::path::Path::new("16"), &prompt, want.len());
        assert_eq!(greedy_tokens(m.model.as_ref(), &prompt, &opts), theirs, "{name}: --max-kv-size 16");
        assert_ne!(theirs, want, "{name}: the rotation changes nothing");
    }
    // the quantized cache (RoPE keys of 32, so that groups of 32 fit)
    for name in ["tiny_deepseek_v3_b", "tiny_deepseek_v2_b"] {
        let dir = golden(name);
        let (prompt, want) = golden_greedy(&dir);
        let m = load_model(&dir, Some(DType::F32), &Device::Cpu).unwrap();
        let params = wick::quant::QuantParams::new(8, 32, "test").unwrap();
        let kv_quant = Some(KvQuant { params, start: 0 });
        let opts = GenerateOptions { max_tokens: want.len(), kv_quant, ..Default::default() };
        assert_eq!(greedy_tokens(m.model.as_ref(), &prompt, &opts)[..8], want[..8], "{name}: 8-bit latent cache");
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
/// so its requests run one after another; qwen3_moe and the latent-attention deepseek_v3 and
/// mistral4, batched with a prefix cache of latents; recurrent hybrids): concurrent
/// greedy requests of the golden prompt, each continuing a shared prefix, give mlx_lm's tokens.
#[test]
fn moe_models_through_the_server_scheduler_give_mlx_lms_tokens() {
    use std::collections::BTreeSet;
    use wick::server::scheduler::{Event, Job, Scheduler, SchedulerConfig};
    for name in ["tiny_qwen3_moe", "tiny_gpt_oss", "tiny_lfm2", "tiny_qwen3_next", "tiny_deepseek_v3", "tiny_mistral4"]
    {
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

/// A model quantized by mlx_lm's `quantize_model` in a float mode (`folder`: the mode, or
/// `nvfp4_global` with one global scale per expert): logits and greedy tokens as mlx_lm's; and,
/// without a global scale (which mlx_lm.convert never writes), `wick convert -q --q-mode` of the
/// float16 model writes mlx_lm's tensors and quantization block byte for byte.
fn check_mode_folder(name: &str, folder: &str) {
    let dir = golden(name).join(folder);
    check_folder(name, &dir, 1e-3);
    check_greedy(&dir);
    if folder.ends_with("_global") {
        return;
    }
    let mode = wick::quant::Mode::parse(folder).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let params = wick::quant::QuantParams::with_mode(mode, None, None, "test").unwrap();
    let opts = wick::convert::ConvertOptions {
        quantize: Some(wick::convert::QuantizeOptions { params, recipe: None }),
        ..Default::default()
    };
    let out = wick::convert::convert(&golden(name), &tmp.path().join("out"), &opts).unwrap();
    let want = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let got = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<_> = want.keys().collect();
    names.sort();
    let mut got_names: Vec<_> = got.keys().collect();
    got_names.sort();
    assert_eq!(got_names, names, "{name} {folder}: tensor names");
    for k in names {
        let (a, b) = (&got[k], &want[k]);
        assert_eq!((a.dtype(), a.dims()), (b.dtype(), b.dims()), "{name} {folder}: {k}");
        let bytes = |t: &Tensor| t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
        let same = match a.dtype() {
            DType::U32 => {
                a.flatten_all().unwrap().to_vec1::<u32>().unwrap() == b.flatten_all().unwrap().to_vec1::<u32>().unwrap()
            }
            _ => bytes(a).iter().zip(bytes(b)).all(|(x, y)| x.to_bits() == y.to_bits()),
        };
        assert!(same, "{name} {folder}: `{k}` differs from mlx_lm's");
    }
    let cfg = |d: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap()
    };
    assert_eq!(cfg(&out)["quantization"], cfg(&dir)["quantization"], "{name} {folder}: quantization block");
}

/// `wick convert -d` of a folder in each float mode: every quantized layer comes out dense in
/// bfloat16 (mx.dequantize's dtype for u8 scales), exactly the mode's values, so the model's
/// logits are still mlx_lm's for the quantized folder; no scales or quantization block remain.
#[test]
fn float_mode_folders_dequantize_to_the_same_model() {
    for f in ["mxfp4", "nvfp4", "mxfp8"] {
        let src = golden("tiny_qwen3").join(f);
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("dense");
        let opts = wick::convert::ConvertOptions { dequantize: true, ..Default::default() };
        wick::convert::convert(&src, &out, &opts).unwrap();
        let w = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
        assert!(w.keys().all(|k| !k.ends_with(".scales")), "{f}: scales left behind");
        assert_eq!(w["model.layers.0.self_attn.q_proj.weight"].dtype(), DType::BF16, "{f}");
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        assert!(cfg.get("quantization").is_none(), "{f}: quantization block left behind");
        for name in ["logits.safetensors", "greedy.json"] {
            std::fs::copy(src.join(name), out.join(name)).unwrap();
        }
        check_folder("tiny_qwen3", &out, 1e-3);
        check_greedy(&out);
    }
}

/// Qwen3 (dense, tied embeddings: the embedding quantized too) in mxfp4, nvfp4 and mxfp8.
#[test]
fn tiny_qwen3_in_float_modes_matches_mlx_lm() {
    for f in ["mxfp4", "nvfp4", "mxfp8"] {
        check_mode_folder("tiny_qwen3", f);
    }
}

/// Qwen3-MoE in the float modes: the experts through the gathered matmul, the router at mlx_lm's
/// affine 8 bits beside them; nvfp4 with per-expert global scales, which mlx runs on the GPU only.
#[test]
fn tiny_qwen3_moe_in_float_modes_matches_mlx_lm() {
    for f in ["mxfp4", "nvfp4", "mxfp8", "nvfp4_global"] {
        check_mode_folder("tiny_qwen3_moe", f);
    }
}

/// gpt-oss wholly in nvfp4 and mxfp8 (attention with sinks, biases, the router at affine 8 bits).
#[test]
fn tiny_gpt_oss_in_float_modes_matches_mlx_lm() {
    for f in ["nvfp4", "mxfp8"] {
        check_mode_folder("tiny_gpt_oss", f);
    }
}

/// DeepSeek-V3 in mxfp4: the latent attention's per-head `embed_q` / `unembed_out` in the mode.
#[test]
fn tiny_deepseek_v3_in_mxfp4_matches_mlx_lm() {
    check_mode_folder("tiny_deepseek_v3", "mxfp4");
}

/// `quant::fp::quantize_tensor` of the float16 expert weights writes what `mx.quantize(…,
/// mode="mxfp4")` wrote, byte for byte.
#[test]
fn mxfp4_quantization_is_bit_exact_with_mlx() {
    let f = candle_core::safetensors::load(golden("tiny_gpt_oss").join("model.safetensors"), &Device::Cpu).unwrap();
    let q =
        candle_core::safetensors::load(golden("tiny_gpt_oss").join("mxfp4/model.safetensors"), &Device::Cpu).unwrap();
    let mut n = 0;
    for (k, w) in &f {
        let Some(layer) = k.strip_suffix(".weight").filter(|l| l.contains(".experts.")) else { continue };
        let (packed, scales) = wick::quant::fp::quantize_tensor(w, wick::quant::Mode::Mxfp4, None).unwrap();
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
