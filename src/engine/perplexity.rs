//! Perplexity as mlx_lm.perplexity measures it: records tokenized as mlx_lm's datasets do
//! (`text`: encoded plus eos; `prompt`/`completion` and `messages`: the chat template), shuffled,
//! concatenated into rows of `sequence_length` tokens; every token after the first of a row is
//! scored with cross-entropy; perplexity = exp(mean loss), with the standard error of the mean
//! carried through the exponential (delta method).

use crate::models::LanguageModel;
use crate::tokenizer::{Message, Tokenizer};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, D};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::Path;

/// Token ids of every record of `path`: a `.txt` file is one text record; a `.jsonl` file (or a
/// folder's `train.jsonl`, mlx_lm's `train` split) holds one JSON object per line.
pub fn load_records(path: &Path, tok: &Tokenizer) -> Result<Vec<Vec<u32>>> {
    let file = if path.is_dir() { path.join("train.jsonl") } else { path.to_path_buf() };
    let what = file.display().to_string();
    let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read the data file {what}"))?;
    let eos = tok.eos_token_ids.iter().next().copied();
    let text_record = |s: &str| -> Result<Vec<u32>> {
        let mut ids = tok.encode(s, true)?;
        if let Some(e) = eos {
            if ids.last() != Some(&e) {
                ids.push(e);
            }
        }
        Ok(ids)
    };
    if !what.ends_with(".jsonl") {
        return Ok(vec![text_record(&text)?]);
    }
    let mut out = vec![];
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{what}, line {}", n + 1);
        let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("{}: not valid JSON", at()))?;
        let s = |k: &str| v.get(k).and_then(|x| x.as_str());
        let ids = if let (Some(p), Some(c)) = (s("prompt"), s("completion")) {
            let m = [Message::new("user", p), Message::new("assistant", c)];
            tok.encode(&tok.apply_chat_template(&m, false, &Default::default())?, false)?
        } else if let Some(msgs) = v.get("messages") {
            let msgs = msgs.as_array().with_context(|| format!("{}: `messages` must be a list", at()))?;
            let m = msgs
                .iter()
                .map(|m| match (m.get("role").and_then(|r| r.as_str()), m.get("content").and_then(|c| c.as_str())) {
                    (Some(r), Some(c)) => Ok(Message::new(r, c)),
                    _ => bail!("{}: each message needs string `role` and `content`", at()),
                })
                .collect::<Result<Vec<_>>>()?;
            tok.encode(&tok.apply_chat_template(&m, false, &Default::default())?, false)?
        } else if let Some(t) = s("text") {
            text_record(t)?
        } else {
            bail!("{}: expected a `text`, `prompt`/`completion` or `messages` record", at());
        };
        out.push(ids);
    }
    if out.is_empty() {
        bail!("{what} holds no records");
    }
    Ok(out)
}

/// Rows of `seq_len` tokens from the records in a seeded random order, as mlx_lm's `load_data`:
/// enough records for `num_samples` rows (all of them when `None`), the tail that does not
/// fill a row dropped.
pub fn make_rows(records: &[Vec<u32>], seq_len: usize, num_samples: Option<usize>, seed: u64) -> Result<Vec<Vec<u32>>> {
    if seq_len < 2 {
        bail!("--sequence-length must be at least 2");
    }
    let mut order: Vec<usize> = (0..records.len()).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let want = num_samples.map(|n| n * seq_len);
    let mut data = vec![];
    for i in order {
        if want.is_some_and(|w| data.len() >= w) {
            break;
        }
        data.extend_from_slice(&records[i]);
    }
    let mut rows: Vec<Vec<u32>> = data.chunks_exact(seq_len).map(<[u32]>::to_vec).collect();
    if let Some(n) = num_samples {
        rows.truncate(n);
    }
    if rows.is_empty() {
        bail!("the data holds {} tokens, fewer than one row of --sequence-length {seq_len}", data.len());
    }
    Ok(rows)
}

/// Perplexity, its standard error, and the number of tokens scored.
#[derive(Debug, Clone, Copy)]
pub struct Perplexity {
    pub ppl: f64,
    pub standard_error: f64,
    pub tokens: usize,
}

/// Scores `rows` in batches of `batch_size`; `on_batch(done, total)` after each batch.
pub fn eval_ppl(
    model: &dyn LanguageModel,
    rows: &[Vec<u32>],
    batch_size: usize,
    mut on_batch: impl FnMut(usize, usize),
) -> Result<Perplexity> {
    if batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let total = rows.len().div_ceil(batch_size);
    let mut losses: Vec<f64> = vec![];
    for (i, batch) in rows.chunks(batch_size).enumerate() {
        let inputs: Vec<Vec<u32>> = batch.iter().map(|r| r[..r.len() - 1].to_vec()).collect();
        let targets: Vec<Vec<u32>> = batch.iter().map(|r| r[1..].to_vec()).collect();
        crate::engine::generate::check_vocab(model, &batch.concat())?;
        let mut cache = model.make_cache(None);
        let logits = model.forward(&Tensor::new(inputs, model.device())?, &mut cache, false)?;
        let lp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
        let t = Tensor::new(targets, model.device())?.unsqueeze(D::Minus1)?;
        let picked = lp.gather(&t, D::Minus1)?.flatten_all()?.to_vec1::<f32>()?;
        losses.extend(picked.iter().map(|&x| -(x as f64)));
        on_batch(i + 1, total);
    }
    let n = losses.len() as f64;
    let mean = losses.iter().sum::<f64>() / n;
    let var = losses.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    let ppl = mean.exp();
    Ok(Perplexity { ppl, standard_error: ppl * var.sqrt() / n.sqrt(), tokens: losses.len() })
}
