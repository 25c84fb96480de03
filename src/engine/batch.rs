//! Batch generation (mlx_lm's `batch_generate`): prompts of different lengths are left-padded
//! to one length and run as one batch. Every layer's cache records each row's padding, so
//! attention never looks at padding and RoPE gives each row its own positions: a row computes
//! exactly what it would alone. Rows that finish (eos or their own `max_tokens`) leave the
//! batch, so the others do not pay for them.

use crate::cache::{CacheKind, KvCache};
use crate::engine::generate::{check_context, check_vocab, maybe_quantize, per_sec, FinishReason, GenerateOptions};
use crate::engine::sample::Sampler;
use crate::models::LanguageModel;
use anyhow::{bail, Result};
use candle_core::Tensor;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

/// The result of [`batch_generate`]: each prompt's generated tokens (eos excluded) and why it
/// stopped, with statistics over the whole batch.
#[derive(Debug, Clone)]
pub struct BatchOutput {
    pub tokens: Vec<Vec<u32>>,
    pub finish_reasons: Vec<FinishReason>,
    pub prompt_tokens: usize,
    pub prompt_tps: f64,
    pub generation_tokens: usize,
    pub generation_tps: f64,
    pub peak_memory_gb: f64,
}

/// What a step leaves each row to sample from: its last position's logits, or (greedy) the
/// token the model already picked on the device.
enum Picks {
    Logits(Vec<Vec<f32>>),
    Tokens(Vec<u32>),
}

/// One step of `tokens` (rows, L); `greedy`: the model may pick on the device (no logits to
/// copy back), where it can.
fn last_step(model: &dyn LanguageModel, tokens: &[Vec<u32>], cache: &mut [KvCache], greedy: bool) -> Result<Picks> {
    let input = Tensor::new(tokens.to_vec(), model.device())?;
    if greedy {
        if let Some(p) = model.greedy_step(Some(&input), tokens.len(), cache)? {
            return Ok(Picks::Tokens(p.wait()?));
        }
    }
    let logits = model.forward(&input, cache, true)?;
    Ok(Picks::Logits(logits.squeeze(1)?.to_vec2::<f32>()?))
}

/// Generates for every prompt at once; row `i` of the result is what [`crate::engine::generate::generate`]
/// gives for `prompts[i]` alone (with the greedy sampler, token for token). Each row samples
/// with its own sampler, seeded `seed + i` when a seed is set. `on_step` is called after each
/// decode step with the number of rows still running.
pub fn batch_generate(
    model: &dyn LanguageModel,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    eos_token_ids: &BTreeSet<u32>,
    mut on_step: impl FnMut(usize),
) -> Result<BatchOutput> {
    if prompts.is_empty() {
        bail!("batch generation needs at least one prompt");
    }
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            bail!("prompt {i} of the batch is empty");
        }
        check_context(model, p.len())?;
        check_vocab(model, p)?;
    }
    opts.processors.validate(model.vocab_size())?;
    if opts.prefill_step_size == 0 {
        bail!("--prefill-step-size must be at least 1");
    }
    let mut cache = opts.new_cache(model)?;
    if cache.iter().any(|c| matches!(c.kind(), CacheKind::Rotating { .. })) {
        bail!("batch generation does not support rotating caches yet (--max-kv-size, or sliding-window layers)");
    }
    let b = prompts.len();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let padding: Arc<[usize]> = prompts.iter().map(|p| longest - p.len()).collect();
    for c in cache.iter_mut() {
        c.set_left_padding(padding.clone());
    }
    // padding positions hold any valid token; they are never attended to
    let rows: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| std::iter::repeat_n(p[0], longest - p.len()).chain(p.iter().copied()).collect())
        .collect();
    let mut samplers = (0..b)
        .map(|i| {
            let mut cfg = opts.sampler.clone();
            cfg.seed = cfg.seed.map(|s| s.wrapping_add(i as u64));
            Sampler::new(cfg)
        })
        .collect::<Result<Vec<_>>>()?;
    let quant = opts.kv_quant.as_ref();
    let mut seen: Vec<Vec<u32>> = prompts.to_vec();

    let tic = Instant::now();
    let mut done = 0;
    while longest - done > 1 {
        let n = opts.prefill_step_size.min(longest - 1 - done);
        let chunk: Vec<Vec<u32>> = rows.iter().map(|r| r[done..done + n].to_vec()).collect();
        model.forward(&Tensor::new(chunk, model.device())?, &mut cache, true)?;
        maybe_quantize(quant, &mut cache)?;
        done += n;
    }
    // greedy rows take the device's picks
    let greedy = opts.picks_on_device(&opts.sampler);
    let last: Vec<Vec<u32>> = rows.iter().map(|r| vec![r[longest - 1]]).collect();
    let mut picks = last_step(model, &last, &mut cache, greedy)?;
    maybe_quantize(quant, &mut cache)?;
    let prompt_time = tic.elapsed().as_secs_f64();

    let tic = Instant::now();
    let mut out: Vec<Vec<u32>> = vec![vec![]; b];
    let mut finish = vec![FinishReason::Length; b];
    // batch row -> prompt index of the rows still running
    let mut active: Vec<usize> = if opts.max_tokens > 0 { (0..b).collect() } else { vec![] };
    let mut generated = 0usize;
    while !active.is_empty() {
        let mut next = Vec::with_capacity(active.len());
        let mut keep = Vec::with_capacity(active.len());
        for (row, &i) in active.iter().enumerate() {
            let t = match &mut picks {
                Picks::Tokens(t) => t[row],
                Picks::Logits(logits) => {
                    let l = &mut logits[row];
                    opts.processors.apply(&seen[i], l);
                    samplers[i].sample(l)?
                }
            };
            generated += 1;
            if eos_token_ids.contains(&t) {
                finish[i] = FinishReason::Stop;
                continue;
            }
            out[i].push(t);
            seen[i].push(t);
            if out[i].len() < opts.max_tokens {
                keep.push(row);
                next.push(vec![t]);
            }
        }
        if keep.len() < active.len() {
            // when every row is done the loop ends below: no cache rows to select
            if !keep.is_empty() {
                for c in cache.iter_mut() {
                    c.select_rows(&keep)?;
                }
            }
            active = keep.iter().map(|&r| active[r]).collect();
        }
        on_step(active.len());
        if active.is_empty() {
            break;
        }
        picks = last_step(model, &next, &mut cache, greedy)?;
        maybe_quantize(quant, &mut cache)?;
    }
    let gen_time = tic.elapsed().as_secs_f64();
    let prompt_tokens = prompts.iter().map(Vec::len).sum();
    Ok(BatchOutput {
        tokens: out,
        finish_reasons: finish,
        prompt_tokens,
        prompt_tps: per_sec(prompt_tokens, prompt_time),
        generation_tokens: generated,
        generation_tps: per_sec(generated, gen_time),
        peak_memory_gb: crate::backend::memory::peak_memory_gb(),
    })
}
