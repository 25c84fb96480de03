//! GGUF import: a llama.cpp GGUF file becomes an mlx-style model folder (config.json,
//! model.safetensors in f16/bf16/f32, tokenizer.json built from the GGUF's vocabulary and merges,
//! tokenizer_config.json with the chat template, generation_config.json).

use crate::io::output::AtomicFolder;
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value as GValue};
use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub struct GgufFile {
    path: PathBuf,
    content: Content,
}

fn meta_err(path: &Path, key: &str, what: &str) -> anyhow::Error {
    anyhow::anyhow!("{}: metadata key `{key}` {what}", path.display())
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let mut f = std::fs::File::open(path).with_context(|| format!("cannot open GGUF file {}", path.display()))?;
        let content = Content::read(&mut f)
            .map_err(|e| anyhow::anyhow!("{} is not a readable GGUF file: {e}", path.display()))?;
        Ok(Self { path: path.to_path_buf(), content })
    }

    fn get(&self, key: &str) -> Result<&GValue> {
        self.content.metadata.get(key).ok_or_else(|| meta_err(&self.path, key, "is missing"))
    }

    fn opt(&self, key: &str) -> Option<&GValue> {
        self.content.metadata.get(key)
    }

    fn usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key)?;
        v.to_u64()
            .map(|x| x as usize)
            .or_else(|_| v.to_u32().map(|x| x as usize))
            .or_else(|_| v.to_i32().map(|x| x as usize))
            .map_err(|_| meta_err(&self.path, key, "is not an integer"))
    }

    /// An f32 metadata value as the shortest decimal that reads back to it (1e-5, not 9.99e-6).
    fn float(&self, key: &str) -> Result<f64> {
        let v = self.get(key)?;
        let f = v.to_f32().map_err(|_| meta_err(&self.path, key, "is not a float"))?;
        Ok(format!("{f}").parse::<f64>()?)
    }

    fn string(&self, key: &str) -> Result<String> {
        Ok(self.get(key)?.to_string().map_err(|_| meta_err(&self.path, key, "is not a string"))?.clone())
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        self.get(key)?
            .to_vec()
            .map_err(|_| meta_err(&self.path, key, "is not an array"))?
            .iter()
            .map(|v| v.to_string().cloned().map_err(|_| meta_err(&self.path, key, "must hold strings")))
            .collect()
    }

    fn ints(&self, key: &str) -> Result<Vec<i64>> {
        self.get(key)?
            .to_vec()
            .map_err(|_| meta_err(&self.path, key, "is not an array"))?
            .iter()
            .map(|v| {
                v.to_i32()
                    .map(|x| x as i64)
                    .or_else(|_| v.to_u32().map(|x| x as i64))
                    .map_err(|_| meta_err(&self.path, key, "must hold integers"))
            })
            .collect()
    }
}

/// mlx_lm/HF name of a GGUF tensor, or `None` for tensors the model does not use.
fn hf_name(gguf: &str) -> Option<String> {
    let top = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(t.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (idx, name) = rest.split_once('.')?;
    let mapped = match name {
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "attn_q.bias" => "self_attn.q_proj.bias",
        "attn_k.bias" => "self_attn.k_proj.bias",
        "attn_v.bias" => "self_attn.v_proj.bias",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        _ => return None,
    };
    Some(format!("model.layers.{idx}.{mapped}"))
}

/// Undoes llama.cpp's row permutation of Q/K projections (its converter interleaves the two
/// rotary halves of each head): rows (heads, 2, half) ← (heads, half, 2).
pub fn unpermute_qk(w: &Tensor, n_heads: usize) -> Result<Tensor> {
    let shape = w.dims().to_vec();
    let rows = shape[0];
    let mut split = vec![n_heads, rows / n_heads / 2, 2];
    split.extend_from_slice(&shape[1..]);
    Ok(w.reshape(split)?.transpose(1, 2)?.contiguous()?.reshape(shape)?)
}

/// Imports `gguf` into an mlx-style folder at `out` with weights in `dtype`.
pub fn import(gguf: &Path, out: &Path, dtype: DType, force: bool) -> Result<PathBuf> {
    let g = GgufFile::open(gguf)?;
    let arch = g.string("general.architecture")?;
    if arch != "llama" {
        bail!("{}: GGUF architecture `{arch}` cannot be imported yet (supported: llama)", gguf.display());
    }
    let folder = AtomicFolder::create(out, force, "--mlx-path")?;
    let p = |k: &str| format!("{arch}.{k}");
    let hidden = g.usize(&p("embedding_length"))?;
    let heads = g.usize(&p("attention.head_count"))?;
    let kv_heads = g
        .opt(&p("attention.head_count_kv"))
        .map(|_| g.usize(&p("attention.head_count_kv")))
        .transpose()?
        .unwrap_or(heads);
    let tokens = g.strings("tokenizer.ggml.tokens")?;
    let tied = !g.content.tensor_infos.contains_key("output.weight");

    // Tensors.
    let mut names: Vec<&String> = g.content.tensor_infos.keys().collect();
    names.sort();
    let bar = ProgressBar::new(names.len() as u64);
    bar.set_style(ProgressStyle::with_template("importing {bar:40} {pos}/{len} tensors {msg}")?);
    let mut file = std::fs::File::open(gguf)?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for name in names {
        bar.set_message(name.clone());
        let Some(hf) = hf_name(name) else {
            bar.inc(1);
            continue;
        };
        let q = g
            .content
            .tensor(&mut file, name, &Device::Cpu)
            .map_err(|e| anyhow::anyhow!("{}: tensor {name}: {e}", gguf.display()))?;
        let mut t = q.dequantize(&Device::Cpu).map_err(|e| {
            anyhow::anyhow!("{}: cannot dequantize tensor {name} ({:?}): {e}", gguf.display(), q.dtype())
        })?;
        if name.ends_with("attn_q.weight") || name.ends_with("attn_q.bias") {
            t = unpermute_qk(&t, heads)?;
        } else if name.ends_with("attn_k.weight") || name.ends_with("attn_k.bias") {
            t = unpermute_qk(&t, kv_heads)?;
        }
        tensors.insert(hf, t.to_dtype(dtype)?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    candle_core::safetensors::save(&tensors, folder.path("model.safetensors"))?;

    // config.json
    let layers = g.usize(&p("block_count"))?;
    let mut cfg = Map::new();
    cfg.insert("architectures".into(), json!(["LlamaForCausalLM"]));
    cfg.insert("model_type".into(), json!("llama"));
    cfg.insert("hidden_size".into(), json!(hidden));
    cfg.insert("intermediate_size".into(), json!(g.usize(&p("feed_forward_length"))?));
    cfg.insert("num_hidden_layers".into(), json!(layers));
    cfg.insert("num_attention_heads".into(), json!(heads));
    cfg.insert("num_key_value_heads".into(), json!(kv_heads));
    if let Some(d) = g.opt(&p("rope.dimension_count")).map(|_| g.usize(&p("rope.dimension_count"))).transpose()? {
        if d != hidden / heads {
            cfg.insert("head_dim".into(), json!(d));
        }
    }
    cfg.insert("rms_norm_eps".into(), json!(g.float(&p("attention.layer_norm_rms_epsilon"))?));
    cfg.insert(
        "rope_theta".into(),
        json!(if g.opt(&p("rope.freq_base")).is_some() { g.float(&p("rope.freq_base"))? } else { 10000.0 }),
    );
    if g.opt(&p("context_length")).is_some() {
        cfg.insert("max_position_embeddings".into(), json!(g.usize(&p("context_length"))?));
    }
    cfg.insert("vocab_size".into(), json!(tokens.len()));
    cfg.insert("tie_word_embeddings".into(), json!(tied));
    cfg.insert("hidden_act".into(), json!("silu"));
    cfg.insert("torch_dtype".into(), json!(crate::backend::device::dtype_name(dtype)));
    let bos = g.opt("tokenizer.ggml.bos_token_id").map(|_| g.usize("tokenizer.ggml.bos_token_id")).transpose()?;
    let eos = g.opt("tokenizer.ggml.eos_token_id").map(|_| g.usize("tokenizer.ggml.eos_token_id")).transpose()?;
    if let Some(b) = bos {
        cfg.insert("bos_token_id".into(), json!(b));
    }
    if let Some(e) = eos {
        cfg.insert("eos_token_id".into(), json!(e));
    }
    folder.write_json("config.json", &Value::Object(cfg))?;

    // Tokenizer.
    let (tokenizer_json, tokenizer_config) = build_tokenizer(&g, &tokens, bos, eos)?;
    folder.write_json("tokenizer.json", &tokenizer_json)?;
    folder.write_json("tokenizer_config.json", &tokenizer_config)?;
    let mut gen = Map::new();
    if let Some(b) = bos {
        gen.insert("bos_token_id".into(), json!(b));
    }
    if let Some(e) = eos {
        gen.insert("eos_token_id".into(), json!(e));
    }
    folder.write_json("generation_config.json", &Value::Object(gen))?;
    folder.commit()
}

/// The pre-tokenizer llama.cpp's `tokenizer.ggml.pre` names, in tokenizer.json form.
fn pre_tokenizer(pre: &str, path: &Path) -> Result<Value> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    Ok(match pre {
        "default" | "gpt-2" | "gpt2" => byte_level(true),
        // SmolLM / StarCoder: every digit on its own, then GPT-2's split.
        "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            byte_level(true)
        ]}),
        "llama3" | "llama-v3" | "llama-bpe" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}, "behavior": "Isolated", "invert": false},
            byte_level(false)
        ]}),
        other => bail!("{}: tokenizer.ggml.pre = `{other}` is not supported yet (supported: default, gpt-2, smollm, starcoder, refact, llama3, llama-bpe)", path.display()),
    })
}

fn build_tokenizer(g: &GgufFile, tokens: &[String], bos: Option<usize>, eos: Option<usize>) -> Result<(Value, Value)> {
    let model = g.string("tokenizer.ggml.model")?;
    if model != "gpt2" {
        bail!(
            "{}: tokenizer.ggml.model = `{model}` cannot be imported yet (supported: gpt2 byte-level BPE)",
            g.path.display()
        );
    }
    let merges = g.strings("tokenizer.ggml.merges")?;
    let types = if g.opt("tokenizer.ggml.token_type").is_some() {
        g.ints("tokenizer.ggml.token_type")?
    } else {
        vec![1; tokens.len()]
    };
    let pre = if g.opt("tokenizer.ggml.pre").is_some() { g.string("tokenizer.ggml.pre")? } else { "default".into() };
    let add_bos = g.opt("tokenizer.ggml.add_bos_token").map(|v| v.to_bool().unwrap_or(false)).unwrap_or(false);

    let mut vocab = Map::new();
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.clone(), json!(i));
    }
    // CONTROL (3) tokens are special added tokens; USER_DEFINED (4) are added, not special.
    let added: Vec<Value> = types
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == 3 || t == 4)
        .map(|(i, &t)| {
            json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false, "rstrip": false, "normalized": t == 4, "special": t == 3})
        })
        .collect();
    let post = match (add_bos, bos) {
        (true, Some(b)) => json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": tokens[b], "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": tokens[b], "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": tokens[b], "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {tokens[b].clone(): {"id": tokens[b], "ids": [b], "tokens": [tokens[b]]}}
        }),
        _ => {
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
        }
    };
    let tj = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer(&pre, &g.path)?,
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges
        }
    });
    let mut tc = Map::new();
    tc.insert("add_bos_token".into(), json!(add_bos));
    tc.insert("add_eos_token".into(), json!(false));
    tc.insert("clean_up_tokenization_spaces".into(), json!(false));
    let tok_id = |key: &str| -> Option<String> {
        g.opt(key).and_then(|v| v.to_u32().ok()).and_then(|i| tokens.get(i as usize).cloned())
    };
    if let Some(b) = bos {
        tc.insert("bos_token".into(), json!(tokens[b]));
    }
    if let Some(e) = eos {
        tc.insert("eos_token".into(), json!(tokens[e]));
    }
    if let Some(u) = tok_id("tokenizer.ggml.unknown_token_id") {
        tc.insert("unk_token".into(), json!(u));
    }
    if let Some(pd) = tok_id("tokenizer.ggml.padding_token_id") {
        tc.insert("pad_token".into(), json!(pd));
    }
    if g.opt("tokenizer.chat_template").is_some() {
        tc.insert("chat_template".into(), json!(g.string("tokenizer.chat_template")?));
    }
    if g.opt("llama.context_length").is_some() {
        tc.insert("model_max_length".into(), json!(g.usize("llama.context_length")?));
    }
    tc.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    Ok((tj, Value::Object(tc)))
}
