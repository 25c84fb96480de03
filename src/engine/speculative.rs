//! Speculative decoding as mlx_lm's `speculative_generate_step`: a small draft model proposes
//! `num_draft` tokens one at a time, the main model scores them all in one forward pass, and
//! the tokens the main model would have picked itself are kept up to the first disagreement,
//! followed by the main model's own token there. Both caches are then trimmed back to what was
//! accepted. With the greedy sampler the output is exactly the main model's greedy output.

use crate::cache::{trim_all, KvCache};
use crate::engine::generate::{
    check_context, check_vocab, maybe_quantize, prefill_all_but_last, FinishReason, GenerateOptions, GenerationStats,
    KvQuant,
};
use crate::engine::sample::Sampler;
use crate::models::LanguageModel;
use anyhow::{bail, Result};
use candle_core::Tensor;
use std::collections::BTreeSet;
use std::time::Instant;

/// mlx_lm.generate's default `--num-draft-tokens`.
pub const DEFAULT_NUM_DRAFT_TOKENS: usize = 3;

/// Statistics of a speculative generation: mlx_lm's plus the draft's acceptance.
#[derive(Debug, Clone)]
pub struct SpeculativeStats {
    pub generation: GenerationStats,
    /// generated tokens that came from the draft model
    pub accepted: usize,
    /// draft tokens proposed
    pub drafted: usize,
}

impl SpeculativeStats {
    /// Share of the proposed draft tokens the main model accepted.
    pub fn acceptance_rate(&self) -> f64 {
        if self.drafted == 0 {
            0.0
        } else {
            self.accepted as f64 / self.drafted as f64
        }
    }
}

/// What rewinding a cache takes after a forward pass: KV caches are trimmed; the state of
/// recurrent layers (`ArraysCache`) cannot be, so it is kept from before the pass, and the
/// tokens that stay are run again from it.
struct Rewind {
    /// the caches before the pass, where some layer is recurrent (its arrays are replaced by a
    /// pass, never written in place, so these clones keep the old state)
    before: Option<Vec<KvCache>>,
}

impl Rewind {
    fn new(cache: &[KvCache]) -> Self {
        Self { before: cache.iter().any(KvCache::is_arrays).then(|| cache.to_vec()) }
    }

    /// Forgets the newest `n` of the tokens `fed` since [`Rewind::new`].
    fn rewind(
        &self,
        model: &dyn LanguageModel,
        cache: &mut [KvCache],
        fed: &[u32],
        n: usize,
        quant: Option<&KvQuant>,
    ) -> Result<()> {
        match &self.before {
            Some(before) if n > 0 => {
                // back to before the pass, then the tokens that stay once more
                trim_all(cache, fed.len());
                for (c, b) in cache.iter_mut().zip(before) {
                    if c.is_arrays() {
                        *c = b.clone();
                    }
                }
                let keep = &fed[..fed.len() - n];
                if !keep.is_empty() {
                    let ids = Tensor::new(keep, model.device())?.unsqueeze(0)?;
                    model.forward(&ids, cache, true)?;
                    maybe_quantize(quant, cache)?;
                }
            }
            _ => trim_all(cache, n),
        }
        Ok(())
    }
}

/// Generates up to `opts.max_tokens` tokens after `prompt` with `model`, drafting with `draft`.
/// `on_token(token, from_draft)` is called for each generated token (not for the eos) and
/// returns `false` to stop.
#[allow(clippy::too_many_arguments)]
pub fn speculative_generate(
    model: &dyn LanguageModel,
    draft: &dyn LanguageModel,
    prompt: &[u32],
    opts: &GenerateOptions,
    num_draft_tokens: usize,
    eos_token_ids: &BTreeSet<u32>,
    mut on_token: impl FnMut(u32, bool) -> Result<bool>,
) -> Result<SpeculativeStats> {
    if num_draft_tokens == 0 {
        bail!("--num-draft-tokens must be at least 1");
    }
    if draft.vocab_size() != model.vocab_size() {
        bail!(
            "the draft model's vocabulary ({} tokens) differs from the model's ({}): the draft model must use the same tokenizer",
            draft.vocab_size(),
            model.vocab_size()
        );
    }
    if opts.max_kv_size.is_some() {
        bail!("--max-kv-size cannot be combined with --draft-model: speculative decoding needs a cache it can trim");
    }
    check_context(model, prompt.len())?;
    check_vocab(model, prompt)?;
    opts.processors.validate(model.vocab_size())?;
    let mut cache = opts.new_cache(model)?;
    let mut draft_cache = opts.new_cache(draft)?;
    if cache.iter().chain(&draft_cache).any(|c| !c.is_trimmable() && !c.is_arrays()) {
        bail!("speculative decoding needs trimmable caches; this model uses rotating (sliding-window) caches");
    }
    let mut sampler = Sampler::new(opts.sampler.clone())?;
    let mut draft_sampler = Sampler::new(opts.sampler.clone())?;
    let quant = opts.kv_quant.as_ref();
    // the committed sequence the logits processors see
    let mut seen: Vec<u32> = prompt.to_vec();
    let pick = |sampler: &mut Sampler, logits: &mut Vec<f32>, context: &[u32]| {
        opts.processors.apply(context, logits);
        sampler.sample(logits)
    };

    let tic = Instant::now();
    let last = prefill_all_but_last(draft, prompt, &mut draft_cache, opts.prefill_step_size, quant)?;
    prefill_all_but_last(model, prompt, &mut cache, opts.prefill_step_size, quant)?;
    let mut y = vec![last];
    let mut draft_y = vec![last];
    let mut prompt_time = None;
    let gen_tic = Instant::now();
    let (mut ntoks, mut accepted, mut drafted) = (0usize, 0usize, 0usize);
    let mut finish = FinishReason::Length;
    'outer: while ntoks < opts.max_tokens {
        let num_draft = num_draft_tokens.min(opts.max_tokens - ntoks);
        // draft num_draft tokens, one at a time (pushed onto `seen` for the processors, then
        // taken off again)
        let base = seen.len();
        let draft_before = Rewind::new(&draft_cache);
        let mut fed = draft_y.clone();
        let mut input = draft_y.clone();
        for _ in 0..num_draft {
            let ids = Tensor::new(input.as_slice(), draft.device())?.unsqueeze(0)?;
            let mut logits = draft.forward(&ids, &mut draft_cache, true)?.flatten_all()?.to_vec1::<f32>()?;
            maybe_quantize(quant, &mut draft_cache)?;
            let t = pick(&mut draft_sampler, &mut logits, &seen)?;
            seen.push(t);
            input = vec![t];
            fed.push(t);
        }
        fed.pop(); // the last draft is not fed to the draft model yet
        let drafts = seen.split_off(base);
        drafted += num_draft;
        // verify: the main model over y and the drafts, one pass; its own pick at each
        // position, up to the first that differs from the draft
        let verify: Vec<u32> = y.iter().chain(&drafts).copied().collect();
        let ids = Tensor::new(verify.as_slice(), model.device())?.unsqueeze(0)?;
        let before = Rewind::new(&cache);
        let all = model.forward(&ids, &mut cache, false)?;
        maybe_quantize(quant, &mut cache)?;
        let l = all.dim(1)?;
        let rows = all.squeeze(0)?.narrow(0, l - (num_draft + 1), num_draft + 1)?.to_vec2::<f32>()?;
        let mut tokens = Vec::with_capacity(num_draft + 1);
        for (i, mut row) in rows.into_iter().enumerate() {
            let t = pick(&mut sampler, &mut row, &seen)?;
            tokens.push(t);
            if i == num_draft || t != drafts[i] {
                break;
            }
            seen.push(t);
        }
        seen.truncate(base);
        prompt_time.get_or_insert_with(|| tic.elapsed().as_secs_f64());
        // the accepted draft tokens, then the main model's own token
        let n = tokens.len() - 1;
        for (i, &t) in tokens.iter().enumerate() {
            let from_draft = i < n;
            ntoks += 1;
            accepted += from_draft as usize;
            seen.push(t);
            if eos_token_ids.contains(&t) || !on_token(t, from_draft)? {
                finish = FinishReason::Stop;
                break 'outer;
            }
            if ntoks == opts.max_tokens {
                break 'outer;
            }
        }
        // rewind both caches to the accepted tokens
        before.rewind(model, &mut cache, &verify, num_draft - n, quant)?;
        draft_before.rewind(draft, &mut draft_cache, &fed, (num_draft - n).saturating_sub(1), quant)?;
        y = vec![tokens[n]];
        // all drafts accepted: the draft model has not seen the last one yet
        draft_y = if n == num_draft { vec![drafts[num_draft - 1], tokens[n]] } else { vec![tokens[n]] };
    }
    let prompt_time = prompt_time.unwrap_or_else(|| tic.elapsed().as_secs_f64());
    let generation =
        GenerationStats::measured(prompt.len(), prompt_time, ntoks, gen_tic.elapsed().as_secs_f64(), finish);
    Ok(SpeculativeStats { generation, accepted, drafted })
}
