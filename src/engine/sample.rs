//! Samplers with mlx_lm's semantics and order: temperature 0 is argmax; otherwise top-p, then
//! min-p, then XTC, then top-k filter the log-probabilities, and a token is drawn from
//! `softmax(logp / temp)`. Logits processors (logit bias, repetition, presence and frequency
//! penalties) change the logits before, from the tokens seen so far, as mlx_lm's
//! `make_logits_processors`.

use anyhow::{bail, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampling settings, named as mlx_lm's `make_sampler` arguments.
#[derive(Debug, Clone)]
pub struct SamplerConfig {
    pub temp: f32,
    pub top_p: f32,
    pub min_p: f32,
    pub min_tokens_to_keep: usize,
    pub top_k: usize,
    /// XTC ("exclude top choices"): with this probability per token, every token more likely
    /// than `xtc_threshold` except the least likely of them is removed
    pub xtc_probability: f32,
    pub xtc_threshold: f32,
    /// tokens XTC never removes (mlx_lm.generate: "\n" and the eos tokens)
    pub xtc_special_tokens: Vec<u32>,
    pub seed: Option<u64>,
}

impl SamplerConfig {
    /// Temperature 0: the sampler takes the argmax, whatever the filters say.
    pub fn is_greedy(&self) -> bool {
        self.temp == 0.0
    }
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            temp: 0.0,
            top_p: 1.0,
            min_p: 0.0,
            min_tokens_to_keep: 1,
            top_k: 0,
            xtc_probability: 0.0,
            xtc_threshold: 0.1,
            xtc_special_tokens: vec![],
            seed: None,
        }
    }
}

pub struct Sampler {
    cfg: SamplerConfig,
    rng: StdRng,
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Result<Self> {
        if cfg.temp < 0.0 || !cfg.temp.is_finite() {
            bail!("--temp must be a finite number ≥ 0, got {}", cfg.temp);
        }
        if !(0.0..=1.0).contains(&cfg.min_p) {
            bail!("--min-p has to be a float in the [0, 1] interval, but is {}", cfg.min_p);
        }
        if !(0.0..=1.0).contains(&cfg.top_p) {
            bail!("--top-p has to be a float in the [0, 1] interval, but is {}", cfg.top_p);
        }
        if !(0.0..=0.5).contains(&cfg.xtc_threshold) {
            bail!("--xtc-threshold has to be a float in the [0, 0.5] interval, but is {}", cfg.xtc_threshold);
        }
        if !(0.0..=1.0).contains(&cfg.xtc_probability) {
            bail!("--xtc-probability has to be a float in the [0, 1] interval, but is {}", cfg.xtc_probability);
        }
        if cfg.min_tokens_to_keep < 1 {
            bail!("--min-tokens-to-keep has to be a positive integer, but is {}", cfg.min_tokens_to_keep);
        }
        let rng = match cfg.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Ok(Self { cfg, rng })
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    /// Filters `logprobs` (log-softmax of the logits) in mlx_lm's order; removed entries become −∞.
    pub fn filter(&mut self, logprobs: &mut [f32]) -> Result<()> {
        let c = &self.cfg;
        if 0.0 < c.top_p && c.top_p < 1.0 {
            apply_top_p(logprobs, c.top_p);
        }
        if c.min_p != 0.0 {
            apply_min_p(logprobs, c.min_p, c.min_tokens_to_keep);
        }
        if c.xtc_probability > 0.0 && self.rng.random::<f32>() <= c.xtc_probability {
            apply_xtc(logprobs, c.xtc_threshold, &c.xtc_special_tokens);
        }
        if c.top_k > 0 {
            if c.top_k >= logprobs.len() {
                bail!("`top_k` has to be an integer in the (0, {}) interval, but is {}", logprobs.len(), c.top_k);
            }
            apply_top_k(logprobs, c.top_k);
        }
        Ok(())
    }

    /// Picks the next token from raw logits.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if self.cfg.is_greedy() {
            return Ok(argmax(logits));
        }
        let mut lp = log_softmax(logits);
        self.filter(&mut lp)?;
        let inv_t = 1.0 / self.cfg.temp;
        let max = lp.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f64> = lp.iter().map(|&x| (((x - max) * inv_t) as f64).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut u = self.rng.random::<f64>() * total;
        for (i, w) in weights.iter().enumerate() {
            if *w > 0.0 {
                if u < *w {
                    return Ok(i as u32);
                }
                u -= w;
            }
        }
        Ok(argmax(&lp))
    }
}

/// Index of the largest value (the first one on ties, as mlx's argmax).
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    let mut bv = f32::NEG_INFINITY;
    for (i, &x) in xs.iter().enumerate() {
        if x > bv {
            bv = x;
            best = i;
        }
    }
    best as u32
}

/// `x − logsumexp(x)`.
pub fn log_softmax(xs: &[f32]) -> Vec<f32> {
    let max = xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = xs.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let lse = max + sum.ln() as f32;
    xs.iter().map(|&x| x - lse).collect()
}

/// Keeps the smallest set of most likely tokens whose mass reaches `top_p` (mlx_lm's rule:
/// a token is dropped when the mass strictly above it already reaches `top_p`).
pub fn apply_top_p(lp: &mut [f32], top_p: f32) {
    let mut sorted: Vec<f32> = lp.to_vec();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let probs: Vec<f32> = sorted.iter().map(|x| x.exp()).collect();
    // mass strictly above index i (reverse exclusive cumsum)
    let mut above = vec![0f32; probs.len()];
    let mut acc = 0f32;
    for i in (0..probs.len()).rev() {
        above[i] = acc;
        acc += probs[i];
    }
    let total = above[0] + probs[0];
    let dropped = above.iter().filter(|&&m| m >= top_p * total).count();
    let threshold = sorted[dropped.min(sorted.len() - 1)];
    for x in lp.iter_mut() {
        if *x < threshold {
            *x = f32::NEG_INFINITY;
        }
    }
}

/// Drops tokens less likely than `min_p` × the most likely one, keeping at least `keep`.
pub fn apply_min_p(lp: &mut [f32], min_p: f32, keep: usize) {
    let top = lp.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let cutoff = top + min_p.ln();
    let mut protected = vec![false; lp.len()];
    if keep > 1 {
        let mut idx: Vec<usize> = (0..lp.len()).collect();
        idx.sort_by(|&a, &b| lp[b].partial_cmp(&lp[a]).unwrap_or(std::cmp::Ordering::Equal));
        for &i in idx.iter().take(keep) {
            protected[i] = true;
        }
    }
    for (i, x) in lp.iter_mut().enumerate() {
        if *x < cutoff && !protected[i] {
            *x = f32::NEG_INFINITY;
        }
    }
}

/// XTC's cut: of the tokens whose probability exceeds `threshold`, all but the least likely are
/// removed (none when fewer than two exceed it); `special` tokens are never removed.
pub fn apply_xtc(lp: &mut [f32], threshold: f32, special: &[u32]) {
    let max = lp.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = lp.iter().map(|&x| (x - max).exp()).sum();
    let probs: Vec<f32> = lp.iter().map(|&x| (x - max).exp() / sum).collect();
    let least = probs.iter().cloned().filter(|&p| p > threshold).fold(f32::INFINITY, f32::min);
    for (i, x) in lp.iter_mut().enumerate() {
        if probs[i] > least && !special.contains(&(i as u32)) {
            *x = f32::NEG_INFINITY;
        }
    }
}

/// mlx_lm's logits processors, applied in its order to the logits of each step given the tokens
/// of this generation so far (prompt included).
#[derive(Debug, Clone, Default)]
pub struct LogitsProcessors {
    /// added to the logits of these tokens
    pub logit_bias: Vec<(u32, f32)>,
    /// (penalty, context size): logits of recent tokens divided by it (multiplied when negative)
    pub repetition_penalty: Option<(f32, usize)>,
    /// (penalty, context size): subtracted once from each recent token's logit
    pub presence_penalty: Option<(f32, usize)>,
    /// (penalty, context size): subtracted once per occurrence among the recent tokens
    pub frequency_penalty: Option<(f32, usize)>,
}

impl LogitsProcessors {
    pub fn is_empty(&self) -> bool {
        self.logit_bias.is_empty()
            && self.repetition_penalty.is_none()
            && self.presence_penalty.is_none()
            && self.frequency_penalty.is_none()
    }

    /// Checks the values as mlx_lm does, and token ids against the vocabulary.
    pub fn validate(&self, vocab: usize) -> Result<()> {
        if let Some(&(t, _)) = self.logit_bias.iter().find(|(t, _)| *t as usize >= vocab) {
            bail!("logit_bias: token id {t} is outside the vocabulary of {vocab} tokens");
        }
        if let Some((p, _)) = self.repetition_penalty {
            if p < 0.0 || !p.is_finite() {
                bail!("repetition penalty must be a non-negative float, got {p}");
            }
        }
        Ok(())
    }

    pub fn apply(&self, tokens: &[u32], logits: &mut [f32]) {
        for &(t, b) in &self.logit_bias {
            logits[t as usize] += b;
        }
        let recent = |n: usize| &tokens[tokens.len().saturating_sub(n)..];
        if let Some((p, n)) = self.repetition_penalty.filter(|(p, _)| *p != 0.0) {
            let mut seen = std::collections::BTreeSet::new();
            for &t in recent(n) {
                if seen.insert(t) {
                    let x = &mut logits[t as usize];
                    *x = if *x < 0.0 { *x * p } else { *x / p };
                }
            }
        }
        if let Some((p, n)) = self.presence_penalty.filter(|(p, _)| *p != 0.0) {
            let seen: std::collections::BTreeSet<u32> = recent(n).iter().copied().collect();
            for t in seen {
                logits[t as usize] -= p;
            }
        }
        if let Some((p, n)) = self.frequency_penalty.filter(|(p, _)| *p != 0.0) {
            for &t in recent(n) {
                logits[t as usize] -= p;
            }
        }
    }
}

/// Keeps the `k` most likely tokens.
pub fn apply_top_k(lp: &mut [f32], k: usize) {
    let mut idx: Vec<usize> = (0..lp.len()).collect();
    idx.select_nth_unstable_by(k - 1, |&a, &b| lp[b].partial_cmp(&lp[a]).unwrap_or(std::cmp::Ordering::Equal));
    let mut keep = vec![false; lp.len()];
    for &i in &idx[..k] {
        keep[i] = true;
    }
    for (i, x) in lp.iter_mut().enumerate() {
        if !keep[i] {
            *x = f32::NEG_INFINITY;
        }
    }
}
