//! A GGUF vocabulary as Hugging Face tokenizer files: `tokenizer.json` (byte-level BPE for
//! `tokenizer.ggml.model = gpt2`, SentencePiece BPE with byte fallback for `llama`) and
//! `tokenizer_config.json` (special tokens, chat template).

use super::GgufFile;
use anyhow::{bail, Result};
use serde_json::{json, Map, Value};
use std::collections::HashMap;

/// llama.cpp's token types (`tokenizer.ggml.token_type`; 5 unused and 6 byte are plain vocabulary).
const NORMAL: i64 = 1;
const UNKNOWN: i64 = 2;
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// The `tokenizer.ggml.pre` values the import knows.
pub const PRE_TOKENIZERS: &str =
    "default, gpt-2, gpt2, olmo, smollm, starcoder, refact, llama3, llama-v3, llama-bpe, qwen2, tekken";

/// GPT-2's split, Llama 3's and Qwen 2's (digits one at a time), Mistral's Tekken.
const LLAMA3_SPLIT: &str = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
const QWEN2_SPLIT: &str = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
const TEKKEN_SPLIT: &str = "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

/// The normalizer and pre-tokenizer a `tokenizer.ggml.pre` value stands for, in tokenizer.json form.
fn pre_tokenizer(pre: &str, g: &GgufFile) -> Result<(Value, Value)> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
            byte_level(false)
        ]})
    };
    Ok(match pre {
        "default" | "gpt-2" | "gpt2" | "olmo" => (Value::Null, byte_level(true)),
        // SmolLM / StarCoder: every digit on its own, then GPT-2's split
        "smollm" | "starcoder" | "refact" => (
            Value::Null,
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(true)
            ]}),
        ),
        "llama3" | "llama-v3" | "llama-bpe" => (Value::Null, split(LLAMA3_SPLIT)),
        "qwen2" => (json!({"type": "NFC"}), split(QWEN2_SPLIT)),
        "tekken" => (Value::Null, split(TEKKEN_SPLIT)),
        other => {
            bail!("{}: tokenizer.ggml.pre = `{other}` is not supported (supported: {PRE_TOKENIZERS})", g.path.display())
        }
    })
}

/// The special-token ids the file names.
pub struct Specials {
    pub bos: Option<usize>,
    pub eos: Option<usize>,
    /// end of turn, where it differs from eos (generation stops at both)
    pub eot: Option<usize>,
}

impl Specials {
    fn read(g: &GgufFile, n_tokens: usize) -> Result<Self> {
        let id = |key: &str| -> Result<Option<usize>> {
            if g.opt(key).is_none() {
                return Ok(None);
            }
            let i = g.usize(key)?;
            if i >= n_tokens {
                bail!("{}: {key} = {i} is outside the vocabulary of {n_tokens} tokens", g.path.display());
            }
            Ok(Some(i))
        };
        let eos = id("tokenizer.ggml.eos_token_id")?;
        let eot = id("tokenizer.ggml.eot_token_id")?.filter(|&e| Some(e) != eos);
        Ok(Self { bos: id("tokenizer.ggml.bos_token_id")?, eos, eot })
    }
}

/// tokenizer.json and tokenizer_config.json for the file's vocabulary, and its special tokens.
pub fn build(g: &GgufFile) -> Result<(Value, Value, Specials)> {
    let model = g.string("tokenizer.ggml.model")?;
    let spm = match model.as_str() {
        "gpt2" => false,
        "llama" => true,
        other => bail!(
            "{}: tokenizer.ggml.model = `{other}` is not supported (supported: gpt2 (byte-level BPE), llama (SentencePiece))",
            g.path.display()
        ),
    };
    let tokens = g.strings("tokenizer.ggml.tokens")?;
    let sp = Specials::read(g, tokens.len())?;
    let types = if g.opt("tokenizer.ggml.token_type").is_some() {
        g.ints("tokenizer.ggml.token_type")?
    } else {
        vec![NORMAL; tokens.len()]
    };
    if types.len() != tokens.len() {
        bail!(
            "{}: tokenizer.ggml.token_type has {} entries for {} tokens",
            g.path.display(),
            types.len(),
            tokens.len()
        );
    }
    // llama.cpp's defaults: SentencePiece vocabularies add BOS and a leading space
    let add_bos = g.opt("tokenizer.ggml.add_bos_token").map(|v| v.to_bool().unwrap_or(false)).unwrap_or(spm);
    let add_space = g.opt("tokenizer.ggml.add_space_prefix").map(|v| v.to_bool().unwrap_or(true)).unwrap_or(true);
    let unk =
        g.opt("tokenizer.ggml.unknown_token_id").map(|_| g.usize("tokenizer.ggml.unknown_token_id")).transpose()?;

    // CONTROL and UNKNOWN tokens are special added tokens; USER_DEFINED are added, not special.
    let added: Vec<Value> = types
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == CONTROL || t == UNKNOWN || t == USER_DEFINED)
        .map(|(i, &t)| {
            json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": t == USER_DEFINED, "special": t != USER_DEFINED})
        })
        .collect();
    let post = match (add_bos, sp.bos) {
        (true, Some(b)) => json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": tokens[b], "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": tokens[b], "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": tokens[b], "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {tokens[b].clone(): {"id": tokens[b], "ids": [b], "tokens": [tokens[b]]}}
        }),
        _ if spm => Value::Null,
        _ => json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true}),
    };
    let mut vocab = Map::new();
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.clone(), json!(i));
    }
    let tj = if spm {
        let scores = g.floats("tokenizer.ggml.scores")?;
        if scores.len() != tokens.len() {
            bail!(
                "{}: tokenizer.ggml.scores has {} entries for {} tokens",
                g.path.display(),
                scores.len(),
                tokens.len()
            );
        }
        let merges = spm_merges(&tokens, &types, &scores);
        let mut normalizers = vec![];
        if add_space {
            normalizers.push(json!({"type": "Prepend", "prepend": "▁"}));
        }
        normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}));
        let mut decoders = vec![
            json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if add_space {
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": added,
            "normalizer": {"type": "Sequence", "normalizers": normalizers},
            "pre_tokenizer": null,
            "post_processor": post,
            "decoder": {"type": "Sequence", "decoders": decoders},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": unk.map(|u| tokens[u].clone()),
                "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
                "byte_fallback": true, "ignore_merges": false, "vocab": vocab, "merges": merges
            }
        })
    } else {
        let merges = g.strings("tokenizer.ggml.merges")?;
        let pre =
            if g.opt("tokenizer.ggml.pre").is_some() { g.string("tokenizer.ggml.pre")? } else { "default".into() };
        let (normalizer, pre_tokenizer) = pre_tokenizer(&pre, g)?;
        json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges
            }
        })
    };

    let mut tc = Map::new();
    tc.insert("add_bos_token".into(), json!(add_bos));
    tc.insert("add_eos_token".into(), json!(false));
    tc.insert("clean_up_tokenization_spaces".into(), json!(false));
    if let Some(b) = sp.bos {
        tc.insert("bos_token".into(), json!(tokens[b]));
    }
    if let Some(e) = sp.eos {
        tc.insert("eos_token".into(), json!(tokens[e]));
    }
    if let Some(u) = unk.and_then(|u| tokens.get(u)) {
        tc.insert("unk_token".into(), json!(u));
    }
    if let Some(p) = g.opt("tokenizer.ggml.padding_token_id").and_then(|v| v.to_u32().ok()) {
        if let Some(t) = tokens.get(p as usize) {
            tc.insert("pad_token".into(), json!(t));
        }
    }
    if g.opt("tokenizer.chat_template").is_some() {
        tc.insert("chat_template".into(), json!(g.string("tokenizer.chat_template")?));
    }
    tc.insert("tokenizer_class".into(), json!(if spm { "LlamaTokenizerFast" } else { "PreTrainedTokenizerFast" }));
    Ok((tj, Value::Object(tc), sp))
}

/// BPE merges of a SentencePiece vocabulary as Hugging Face's converters derive them: every
/// split of a piece into two pieces of the vocabulary is a merge, ranked by the merged piece's
/// score (highest first; ties by vocabulary order, then by the parts' ids). Added tokens
/// (control, user-defined, unknown), byte and unused tokens take part in no merge.
fn spm_merges(tokens: &[String], types: &[i64], scores: &[f32]) -> Vec<Value> {
    let mergeable = |t: i64| t == NORMAL;
    let ids: HashMap<&str, usize> =
        tokens.iter().enumerate().filter(|(i, _)| mergeable(types[*i])).map(|(i, t)| (t.as_str(), i)).collect();
    let mut merges: Vec<(f32, usize, usize, usize)> = vec![];
    for (id, piece) in tokens.iter().enumerate() {
        if !mergeable(types[id]) {
            continue;
        }
        for (cut, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(cut);
            if let (Some(&li), Some(&ri)) = (ids.get(l), ids.get(r)) {
                merges.push((scores[id], id, li, ri));
            }
        }
    }
    // stable: within one score, vocabulary order of the merged piece, then the parts' ids
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)).then(a.3.cmp(&b.3)));
    merges.into_iter().map(|(_, _, l, r)| json!([tokens[l], tokens[r]])).collect()
}
