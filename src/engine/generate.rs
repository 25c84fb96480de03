//! The generation loop: chunked prefill, then one token at a time, with mlx_lm's statistics;
//! the KV cache optionally quantized from `--quantized-kv-start` on (mlx_lm's
//! `maybe_quantize_kv_cache`). Speculative decoding is in [`crate::engine::speculative`], batches in
//! [`crate::engine::batch`].

use crate::cache::{trim_all, CacheKind, KvCache};
use crate::engine::sample::{LogitsProcessors, Sampler, SamplerConfig};
use crate::models::{LanguageModel, PendingTokens};
use crate::quant::QuantParams;
use anyhow::{bail, Result};
use candle_core::Tensor;
use std::collections::BTreeSet;
use std::time::Instant;

/// mlx_lm's default `--quantized-kv-start`.
pub const DEFAULT_QUANTIZED_KV_START: usize = 5000;

/// KV-cache quantization (`--kv-bits`, `--kv-group-size`, `--quantized-kv-start`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvQuant {
    pub params: QuantParams,
    /// quantize a layer's cache once it holds this many positions
    pub start: usize,
}

impl KvQuant {
    /// From the flags: `None` without `--kv-bits`.
    pub fn from_flags(bits: Option<usize>, group_size: usize, start: usize) -> Result<Option<Self>> {
        bits.map(|b| Ok(Self { params: QuantParams::new(b, group_size, "--kv-bits/--kv-group-size")?, start }))
            .transpose()
    }

    /// Quantizes each standard cache that has reached `start` positions.
    pub fn apply(&self, cache: &mut [KvCache]) -> Result<()> {
        for c in cache.iter_mut() {
            if c.kind() == CacheKind::Standard && c.offset() >= self.start {
                c.quantize(self.params)?;
            }
        }
        Ok(())
    }
}

/// [`KvQuant::apply`] when quantization is on.
pub fn maybe_quantize(quant: Option<&KvQuant>, cache: &mut [KvCache]) -> Result<()> {
    quant.map_or(Ok(()), |q| q.apply(cache))
}

/// Options of one generation, named as mlx_lm's `generate_step` arguments.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub prefill_step_size: usize,
    pub sampler: SamplerConfig,
    /// keep at most this many positions in each layer's cache (`--max-kv-size`)
    pub max_kv_size: Option<usize>,
    pub processors: LogitsProcessors,
    /// quantize the KV cache (`--kv-bits`)
    pub kv_quant: Option<KvQuant>,
}

impl GenerateOptions {
    /// Whether a model may pick the tokens of `sampler` on its device
    /// ([`LanguageModel::greedy_step`]): greedy, no logits processors, no quantized cache.
    pub fn picks_on_device(&self, sampler: &SamplerConfig) -> bool {
        sampler.is_greedy() && self.processors.is_empty() && self.kv_quant.is_none()
    }

    /// An empty cache for `model`, rotating at `max_kv_size` when it is set (and valid).
    pub fn new_cache(&self, model: &dyn LanguageModel) -> Result<Vec<KvCache>> {
        if let Some(m) = self.max_kv_size {
            if m <= crate::cache::MAX_KV_KEEP {
                bail!(
                    "--max-kv-size {m}: must be more than the {} positions the cache always keeps",
                    crate::cache::MAX_KV_KEEP
                );
            }
        }
        let cache = model.make_cache(self.max_kv_size);
        self.check_cache(&cache)?;
        Ok(cache)
    }

    /// Checks that `cache` can take these options (a rotating cache cannot be quantized, as in
    /// mlx_lm, whose `RotatingKVCache.to_quantized` is not implemented).
    pub fn check_cache(&self, cache: &[KvCache]) -> Result<()> {
        if self.kv_quant.is_some() && cache.iter().any(|c| matches!(c.kind(), CacheKind::Rotating { .. })) {
            bail!(
                "--kv-bits cannot be combined with a rotating KV cache (--max-kv-size, or this model's \
                 sliding-window layers): mlx_lm cannot quantize those either"
            );
        }
        Ok(())
    }
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            prefill_step_size: 2048,
            sampler: SamplerConfig::default(),
            max_kv_size: None,
            processors: LogitsProcessors::default(),
            kv_quant: None,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

/// mlx_lm's closing statistics.
#[derive(Debug, Clone)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub prompt_tps: f64,
    pub generation_tokens: usize,
    pub generation_tps: f64,
    pub peak_memory_gb: f64,
    pub finish_reason: FinishReason,
}

impl GenerationStats {
    /// Statistics from token counts and the seconds they took, with the process's peak memory.
    pub fn measured(
        prompt_tokens: usize,
        prompt_secs: f64,
        generation_tokens: usize,
        generation_secs: f64,
        finish_reason: FinishReason,
    ) -> Self {
        Self {
            prompt_tokens,
            prompt_tps: per_sec(prompt_tokens, prompt_secs),
            generation_tokens,
            generation_tps: per_sec(generation_tokens, generation_secs),
            peak_memory_gb: crate::backend::memory::peak_memory_gb(),
            finish_reason,
        }
    }
}

/// Tokens per second (0 for no tokens).
pub fn per_sec(tokens: usize, secs: f64) -> f64 {
    if tokens == 0 {
        0.0
    } else {
        tokens as f64 / secs.max(1e-9)
    }
}

/// Runs the model over `tokens` and returns the last position's logits as a host vector.
pub fn step_logits(model: &dyn LanguageModel, tokens: &[u32], cache: &mut [KvCache]) -> Result<Vec<f32>> {
    let input = Tensor::new(tokens, model.device())?.unsqueeze(0)?;
    let logits = model.forward(&input, cache, true)?;
    Ok(logits.flatten_all()?.to_vec1::<f32>()?)
}

/// Processes all but the last prompt token in chunks of `step` (filling `cache`), then the last
/// one; returns the logits after the whole prompt.
pub fn prefill(model: &dyn LanguageModel, prompt: &[u32], cache: &mut [KvCache], step: usize) -> Result<Vec<f32>> {
    prefill_quantized(model, prompt, cache, step, None)
}

/// Feeds all but the last prompt token in chunks of `step`, quantizing the cache after each
/// chunk as mlx_lm does; returns the last token, not yet fed.
pub fn prefill_all_but_last(
    model: &dyn LanguageModel,
    prompt: &[u32],
    cache: &mut [KvCache],
    step: usize,
    quant: Option<&KvQuant>,
) -> Result<u32> {
    if prompt.is_empty() {
        bail!("the prompt is empty: nothing to generate from");
    }
    if step == 0 {
        bail!("--prefill-step-size must be at least 1");
    }
    let mut rest = prompt;
    while rest.len() > 1 {
        let n = step.min(rest.len() - 1);
        let input = Tensor::new(&rest[..n], model.device())?.unsqueeze(0)?;
        // Only the cache matters here; compute just the last position's logits.
        model.forward(&input, cache, true)?;
        maybe_quantize(quant, cache)?;
        rest = &rest[n..];
    }
    Ok(rest[0])
}

/// [`prefill`] with KV-cache quantization after every model call.
pub fn prefill_quantized(
    model: &dyn LanguageModel,
    prompt: &[u32],
    cache: &mut [KvCache],
    step: usize,
    quant: Option<&KvQuant>,
) -> Result<Vec<f32>> {
    let last = prefill_all_but_last(model, prompt, cache, step, quant)?;
    let logits = step_logits(model, &[last], cache)?;
    maybe_quantize(quant, cache)?;
    Ok(logits)
}

/// Checks that every prompt token exists in the model's vocabulary.
pub fn check_vocab(model: &dyn LanguageModel, prompt: &[u32]) -> Result<()> {
    let v = model.vocab_size();
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= v) {
        bail!("prompt token id {bad} is outside the model's vocabulary of {v} tokens: the tokenizer does not match the model");
    }
    Ok(())
}

/// Checks that the prompt fits the model's context.
pub fn check_context(model: &dyn LanguageModel, prompt_len: usize) -> Result<()> {
    if let Some(ctx) = model.max_context() {
        if prompt_len > ctx {
            bail!(
                "the prompt has {prompt_len} tokens, more than the model's context of {ctx} tokens \
                 (max_position_embeddings in config.json); shorten the prompt"
            );
        }
    }
    Ok(())
}

/// Generates up to `max_tokens` tokens after `prompt`, calling `on_token` for each generated
/// token (eos tokens are not passed on); `on_token` returns `false` to stop early.
pub fn generate(
    model: &dyn LanguageModel,
    prompt: &[u32],
    opts: &GenerateOptions,
    eos_token_ids: &BTreeSet<u32>,
    on_token: impl FnMut(u32) -> Result<bool>,
) -> Result<GenerationStats> {
    check_context(model, prompt.len())?;
    let mut cache = opts.new_cache(model)?;
    let mut sampler = Sampler::new(opts.sampler.clone())?;
    generate_with_cache(model, prompt, &mut cache, &mut sampler, opts, eos_token_ids, false, on_token)
}

/// [`generate`] continuing `cache` (a chat's history) with `sampler`. With `feed_last`, the
/// last drawn token (the eos too) also goes through the model, so the cache holds the whole
/// turn for the next one, as mlx_lm's `generate_step` leaves it.
#[allow(clippy::too_many_arguments)]
pub fn generate_with_cache(
    model: &dyn LanguageModel,
    prompt: &[u32],
    cache: &mut [KvCache],
    sampler: &mut Sampler,
    opts: &GenerateOptions,
    eos_token_ids: &BTreeSet<u32>,
    feed_last: bool,
    mut on_token: impl FnMut(u32) -> Result<bool>,
) -> Result<GenerationStats> {
    check_vocab(model, prompt)?;
    opts.processors.validate(model.vocab_size())?;
    // the tokens the processors see: this generation's prompt and output
    let seen: Vec<u32> = if opts.processors.is_empty() { vec![] } else { prompt.to_vec() };
    opts.check_cache(cache)?;
    let quant = opts.kv_quant.as_ref();
    // greedy decoding picks on the device where the model can: the host then queues each step
    // before reading the previous one's token
    let on_device = opts.picks_on_device(sampler.config());
    let mut feeder = Feeder { model, sampler, processors: &opts.processors, seen, quant, on_device };
    let tic = Instant::now();
    let last = prefill_all_but_last(model, prompt, cache, opts.prefill_step_size, quant)?;
    // the prompt's time ends with its first token
    let mut next = Next::Ready(feeder.feed(last, cache)?.token()?);
    let prompt_time = tic.elapsed().as_secs_f64();
    let tic = Instant::now();
    // As mlx_lm's stream_generate: every drawn token counts, the eos that stops generation too.
    let mut n = 0usize;
    let mut finish = FinishReason::Length;
    while n < opts.max_tokens {
        // the step feeding the coming token, queued before it is read, when it will be needed
        // (another token to draw, or this one to feed)
        let ahead = match next {
            Next::Branch(_) if n + 1 < opts.max_tokens || feed_last => model.greedy_step(None, 1, cache)?,
            _ => None,
        };
        let token = next.token()?;
        n += 1;
        let stop = if eos_token_ids.contains(&token) || !on_token(token)? {
            finish = FinishReason::Stop;
            true
        } else {
            n == opts.max_tokens
        };
        if stop {
            match (ahead, feed_last) {
                // the step queued ahead fed a token nobody wants
                (Some(_), false) => trim_all(cache, 1),
                // the cache takes the last token; nothing is drawn from it
                (None, true) => drop(feeder.step(token, cache)?),
                _ => {}
            }
            break;
        }
        if !opts.processors.is_empty() {
            feeder.seen.push(token);
        }
        next = match ahead {
            Some(p) => Next::Branch(p),
            None => feeder.feed(token, cache)?,
        };
    }
    Ok(GenerationStats::measured(prompt.len(), prompt_time, n, tic.elapsed().as_secs_f64(), finish))
}

/// Where the next token comes from: drawn on the host, or picked by a greedy step on the device.
enum Next {
    Ready(u32),
    Branch(Box<dyn PendingTokens>),
}

impl Next {
    /// The token (waiting for the device's step).
    fn token(self) -> Result<u32> {
        match self {
            Next::Ready(t) => Ok(t),
            Next::Branch(p) => Ok(p.wait()?[0]),
        }
    }
}

/// What feeding a token leaves: the greedy pick under way on the device, or the logits.
enum Fed {
    Picked(Box<dyn PendingTokens>),
    Logits(Vec<f32>),
}

/// Feeds one token at a time: a greedy step on the device while the model offers one, else
/// the logits to the host, its processors and sampler.
struct Feeder<'a> {
    model: &'a dyn LanguageModel,
    sampler: &'a mut Sampler,
    processors: &'a LogitsProcessors,
    /// the tokens the processors see: the prompt and the output so far
    seen: Vec<u32>,
    quant: Option<&'a KvQuant>,
    on_device: bool,
}

impl Feeder<'_> {
    /// Feeds `token`.
    fn step(&mut self, token: u32, cache: &mut [KvCache]) -> Result<Fed> {
        if self.on_device {
            let input = Tensor::new(&[token], self.model.device())?.unsqueeze(0)?;
            if let Some(p) = self.model.greedy_step(Some(&input), 1, cache)? {
                return Ok(Fed::Picked(p));
            }
            self.on_device = false;
        }
        let logits = step_logits(self.model, &[token], cache)?;
        maybe_quantize(self.quant, cache)?;
        Ok(Fed::Logits(logits))
    }

    /// Feeds `token` and says where the next one comes from.
    fn feed(&mut self, token: u32, cache: &mut [KvCache]) -> Result<Next> {
        Ok(match self.step(token, cache)? {
            Fed::Picked(p) => Next::Branch(p),
            Fed::Logits(mut logits) => {
                self.processors.apply(&self.seen, &mut logits);
                Next::Ready(self.sampler.sample(&logits)?)
            }
        })
    }
}
