//! Training data in mlx_lm's formats: a folder with `train.jsonl`, `valid.jsonl`,
//! `test.jsonl`, each line one record of `{"text"}`, `{"prompt", "completion"}` or
//! `{"messages"[, "tools"]}` (the format is read off the first record, as mlx_lm does), turned
//! into `(tokens, offset)` pairs: the offset is where the loss starts (after the prompt when
//! `mask_prompt`). Then mlx_lm's batching: rows sorted by length, cut into batches, padded to
//! one plus a multiple of 32 (at most `max_seq_length`).

use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::path::Path;

/// Which keys a record's fields are read from (mlx_lm's `*_feature` settings).
#[derive(Debug, Clone)]
pub struct Features {
    pub text: String,
    pub prompt: String,
    pub completion: String,
    pub chat: String,
}

impl Default for Features {
    fn default() -> Self {
        Self { text: "text".into(), prompt: "prompt".into(), completion: "completion".into(), chat: "messages".into() }
    }
}

/// A split read and tokenized: per record its tokens and where the loss starts.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    pub rows: Vec<(Vec<u32>, usize)>,
    /// Per record its number of fields: the key mlx_lm's batching sorts by (see
    /// [`batch_indices`]).
    pub fields: Vec<usize>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Text,
    Completions,
    Chat,
}

/// Reads `{dir}/{split}.jsonl` if it exists.
pub fn load_split(
    dir: &Path,
    split: &str,
    tok: &Tokenizer,
    features: &Features,
    mask_prompt: bool,
) -> Result<Option<Dataset>> {
    let path = dir.join(format!("{split}.jsonl"));
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut records = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a valid JSON line", path.display(), i + 1))?;
        let Value::Object(o) = v else {
            bail!("{}:{}: expected a JSON object", path.display(), i + 1);
        };
        records.push((i + 1, o));
    }
    let Some((_, first)) = records.first() else {
        bail!("{} has no records", path.display());
    };
    let format = if first.contains_key(&features.prompt) && first.contains_key(&features.completion) {
        Format::Completions
    } else if first.contains_key(&features.chat) {
        Format::Chat
    } else if first.contains_key(&features.text) {
        Format::Text
    } else {
        bail!(
            "{}:1: unsupported data format: expected `{}`, `{}` + `{}`, or `{}` (a list of messages)",
            path.display(),
            features.text,
            features.prompt,
            features.completion,
            features.chat
        );
    };
    if format == Format::Text && mask_prompt {
        bail!("--mask-prompt: prompt masking is not supported for text data ({})", path.display());
    }
    let eos = tok
        .special_tokens
        .iter()
        .find(|(k, _)| k == "eos_token")
        .and_then(|(_, t)| tok.token_to_id(t))
        .or_else(|| tok.eos_token_ids.iter().next().copied());
    let mut rows = Vec::with_capacity(records.len());
    for (line, o) in &records {
        let at = || format!("{}:{line}", path.display());
        let field = |k: &str| -> Result<&str> {
            o.get(k).and_then(|v| v.as_str()).with_context(|| format!("{}: missing string field `{k}`", at()))
        };
        let row = match format {
            Format::Text => {
                let mut ids = tok.encode(field(&features.text)?, true).with_context(at)?;
                if let Some(e) = eos {
                    if ids.last() != Some(&e) {
                        ids.push(e);
                    }
                }
                (ids, 0)
            }
            Format::Completions => {
                let messages = vec![
                    serde_json::json!({"role": "user", "content": field(&features.prompt)?}),
                    serde_json::json!({"role": "assistant", "content": field(&features.completion)?}),
                ];
                chat_row(tok, &messages, o.get("tools"), mask_prompt, true).with_context(at)?
            }
            Format::Chat => {
                let messages = o
                    .get(&features.chat)
                    .and_then(|v| v.as_array())
                    .with_context(|| format!("{}: `{}` must be a list of messages", at(), features.chat))?;
                for (j, m) in messages.iter().enumerate() {
                    if m.get("role").and_then(|r| r.as_str()).is_none() {
                        bail!("{}: message {} has no string `role`", at(), j + 1);
                    }
                }
                if messages.is_empty() {
                    bail!("{}: `{}` is empty", at(), features.chat);
                }
                let last_assistant =
                    messages.last().and_then(|m| m.get("role")).and_then(|r| r.as_str()) == Some("assistant");
                chat_row(tok, messages, o.get("tools"), mask_prompt, last_assistant).with_context(at)?
            }
        };
        rows.push(row);
    }
    let fields = records.iter().map(|(_, o)| o.len()).collect();
    Ok(Some(Dataset { rows, fields }))
}

/// The chat template's tokens for `messages`, and with `mask_prompt` the length of the prompt
/// (all messages but the last, with a generation prompt when the last is the assistant's).
fn chat_row(
    tok: &Tokenizer,
    messages: &[Value],
    tools: Option<&Value>,
    mask_prompt: bool,
    generation_prompt: bool,
) -> Result<(Vec<u32>, usize)> {
    let mut extra = Map::new();
    if let Some(t) = tools.filter(|t| !t.is_null()) {
        extra.insert("tools".into(), t.clone());
    }
    let text = tok.apply_chat_template(messages, false, &extra)?;
    let ids = tok.encode(&text, false)?;
    let offset = if mask_prompt {
        let prompt = tok.apply_chat_template(&messages[..messages.len() - 1], generation_prompt, &extra)?;
        tok.encode(&prompt, false)?.len()
    } else {
        0
    };
    Ok((ids, offset))
}

/// mlx_lm's `iterate_batches` layout: indices sorted (stably) by "length", cut into full
/// batches of `batch_size` (a last partial batch is dropped). mlx_lm 0.32 means to sort by token
/// count, but through its `CacheDataset` the length it reads is the raw record's — its number of
/// fields — so records keep their file order (those with `tools` after those without). wick
/// sorts the same way, so that its batches are mlx_lm's.
pub fn batch_indices(data: &Dataset, batch_size: usize, what: &str) -> Result<Vec<Vec<usize>>> {
    if data.len() < batch_size {
        bail!("{what} must have at least batch_size={batch_size} examples but only has {}", data.len());
    }
    let mut idx: Vec<usize> = (0..data.len()).collect();
    idx.sort_by_key(|&i| data.fields[i]);
    Ok(idx.chunks_exact(batch_size).map(|c| c.to_vec()).collect())
}

/// One padded batch: tokens (rows × width, zero-padded), per row `(offset, length)`, and
/// whether a row was cut to `max_seq_length`.
pub struct Batch {
    pub tokens: Vec<u32>,
    pub width: usize,
    pub lengths: Vec<(usize, usize)>,
    pub truncated: Option<usize>,
}

pub fn make_batch(data: &Dataset, rows: &[usize], max_seq_length: usize) -> Batch {
    let longest = rows.iter().map(|&i| data.rows[i].0.len()).max().unwrap_or(0);
    let pad_to = 32;
    let width = (1 + pad_to * longest.div_ceil(pad_to)).min(max_seq_length);
    let mut tokens = vec![0u32; rows.len() * width];
    let mut lengths = vec![];
    for (r, &i) in rows.iter().enumerate() {
        let (ids, offset) = &data.rows[i];
        let n = ids.len().min(max_seq_length);
        tokens[r * width..r * width + n].copy_from_slice(&ids[..n]);
        lengths.push((*offset, n));
    }
    Batch { tokens, width, lengths, truncated: (longest > max_seq_length).then_some(longest) }
}

/// numpy's legacy global generator (`np.random.seed(n)`, MT19937) and its `permutation`, so
/// batches come in mlx_lm's order for the same `--seed`.
pub struct NumpyRandom {
    mt: [u32; 624],
    i: usize,
}

impl NumpyRandom {
    pub fn new(seed: u32) -> Self {
        let mut mt = [0u32; 624];
        mt[0] = seed;
        for i in 1..624 {
            mt[i] = 1812433253u32.wrapping_mul(mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_add(i as u32);
        }
        Self { mt, i: 624 }
    }

    fn next_u32(&mut self) -> u32 {
        if self.i >= 624 {
            for k in 0..624 {
                let y = (self.mt[k] & 0x8000_0000) | (self.mt[(k + 1) % 624] & 0x7fff_ffff);
                self.mt[k] = self.mt[(k + 397) % 624] ^ (y >> 1) ^ if y & 1 == 1 { 0x9908_b0df } else { 0 };
            }
            self.i = 0;
        }
        let mut y = self.mt[self.i];
        self.i += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// `np.random.permutation(n)`: Fisher–Yates from the end, each index drawn by masked
    /// rejection as numpy's legacy `random_interval`.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut a: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let mut mask = i as u32;
            for s in [1, 2, 4, 8, 16] {
                mask |= mask >> s;
            }
            let j = loop {
                let v = self.next_u32() & mask;
                if v as usize <= i {
                    break v as usize;
                }
            };
            a.swap(i, j);
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_permutation_matches_numpy() {
        // np.random.seed(0); np.random.permutation(10) and then (5), from numpy 2.x
        let mut r = NumpyRandom::new(0);
        assert_eq!(r.permutation(10), vec![2, 8, 4, 9, 1, 6, 7, 3, 0, 5]);
        assert_eq!(r.permutation(5), vec![1, 0, 2, 3, 4]);
    }
}
