//! The batch engine (mlx_lm's `BatchGenerator`): one loop that advances many sequences at once
//! over one left-padded batched KV cache. It serves batch generation ([`batch_generate`],
//! `wick bench -b`) and the server's scheduler alike.
//!
//! - **Joining.** Requests are [`BatchGenerator::insert`]ed at any time: their prompts are
//!   computed in chunks between decode steps (at most `prefill_step_size` tokens a step, oldest
//!   first, from a prefix cache when one is given), then they join the batch, into the slot of a
//!   request that left or as new rows. [`BatchGenerator::insert_batch`] computes several prompts
//!   at once instead: left-padded to one length and run as one batch.
//! - **Padding.** Every layer's cache records each row's padding, so attention never looks at it
//!   and RoPE gives each row its own positions: a row computes exactly what it would alone.
//! - **Leaving.** A row leaves when it ends (eos, its `max_tokens`) or is
//!   [`BatchGenerator::remove`]d. With `reuse_slots` its slot stays for a joining request (the
//!   batch's buffers stay, so a captured CUDA graph keeps being replayed) until at most half the
//!   slots hold requests; otherwise the batch shrinks at once.
//! - **Caches that cannot join.** Rows of a rotating cache (sliding-window layers, `max_kv_size`)
//!   cannot be padded, so such requests run one after another; quantized caches (`kv_quant`)
//!   can shrink but not take rows in, so requests join them only when the batch is empty.

use crate::cache::{CacheKind, KvCache};
use crate::engine::generate::{
    check_context, check_vocab, maybe_quantize, per_sec, FinishReason, GenerateOptions, KvQuant,
};
use crate::engine::sample::{log_softmax, LogitsProcessors, Sampler, SamplerConfig};
use crate::models::LanguageModel;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A request's id in its [`BatchGenerator`].
pub type Uid = u64;

/// A cache (one per layer) holding a prompt's first `n` tokens, and `n`.
pub type Prefix = (Vec<KvCache>, usize);

/// One sequence to generate.
pub struct Request {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    pub processors: LogitsProcessors,
    /// `Some(n)`: report each token's log-probability and the `n` most likely alternatives
    pub logprobs: Option<usize>,
    /// a cache (one per layer) already holding the prompt's first `n` tokens, `n` < the
    /// prompt's length (a prefix cache's hit)
    pub prefix: Option<Prefix>,
}

/// What a step tells about a request.
#[derive(Debug, Clone)]
pub enum Event {
    /// The prompt is computed; `cached` of its tokens came with the request's prefix.
    Started { cached: usize },
    /// A generated token; with `finish` it is the last one (an eos is reported too, marked
    /// [`FinishReason::Stop`]). `logprob` and `top` are there when the request asked for them.
    Token { id: u32, logprob: Option<f32>, top: Vec<(u32, f32)>, finish: Option<FinishReason> },
}

/// A request that left the batch: the tokens its cache held and, with `keep_caches`, that cache
/// (one single-row cache per layer).
pub struct Left {
    pub uid: Uid,
    pub fed: Vec<u32>,
    pub cache: Option<Vec<KvCache>>,
}

/// What one [`BatchGenerator::step`] did.
#[derive(Default)]
pub struct StepOutput {
    pub events: Vec<(Uid, Event)>,
    pub left: Vec<Left>,
}

/// Settings of a [`BatchGenerator`].
#[derive(Debug, Clone)]
pub struct BatchConfig {
    /// rows decoded together
    pub max_batch: usize,
    /// prompt tokens computed per step (and per chunk of a joint prefill)
    pub prefill_step_size: usize,
    pub eos_token_ids: BTreeSet<u32>,
    /// keep at most this many positions in each layer's cache (a rotating cache)
    pub max_kv_size: Option<usize>,
    /// quantize the caches (`--kv-bits`)
    pub kv_quant: Option<KvQuant>,
    /// keep a leaving row's slot for a joining request until half the slots are idle
    pub reuse_slots: bool,
    /// give back the caches of the rows that leave (for a prefix cache)
    pub keep_caches: bool,
    /// time the step's phases (see [`Profile`])
    pub profile: bool,
}

impl BatchConfig {
    pub fn new(max_batch: usize, prefill_step_size: usize, eos_token_ids: BTreeSet<u32>) -> Self {
        Self {
            max_batch,
            prefill_step_size,
            eos_token_ids,
            max_kv_size: None,
            kv_quant: None,
            reuse_slots: false,
            keep_caches: false,
            profile: false,
        }
    }
}

/// What a request keeps from joining to leaving.
struct Spec {
    uid: Uid,
    prompt: Vec<u32>,
    max_tokens: usize,
    processors: LogitsProcessors,
    logprobs: Option<usize>,
    sampler: Sampler,
}

/// A request whose prompt is being computed.
struct Joining {
    spec: Spec,
    cache: Vec<KvCache>,
    /// prompt tokens in `cache`
    done: usize,
    cached: usize,
}

/// A request in the decode batch.
struct Row {
    spec: Spec,
    /// tokens in the cache: the prompt and the generated tokens fed so far
    fed: Vec<u32>,
    /// the token the next step feeds
    next: u32,
    generated: usize,
}

/// See the module's documentation.
pub struct BatchGenerator<'m> {
    model: &'m dyn LanguageModel,
    cfg: BatchConfig,
    /// requests may join a running batch (plain caches)
    joinable: bool,
    /// prompts may be left-padded into one batch (no rotating caches)
    paddable: bool,
    next_uid: Uid,
    pending: Vec<Joining>,
    /// the batch's slots: slot `i` is row `i` of every layer's cache; `None`, a request that
    /// left (the slot runs a throwaway step until a joining request takes it over, or the batch
    /// is compacted)
    rows: Vec<Option<Row>>,
    /// the batch's cache, one per layer
    cache: Vec<KvCache>,
    /// events of insertions, reported by the next step
    outbox: Vec<(Uid, Event)>,
    profile: Option<Profile>,
}

impl<'m> BatchGenerator<'m> {
    pub fn new(model: &'m dyn LanguageModel, cfg: BatchConfig) -> Result<Self> {
        if cfg.max_batch == 0 {
            bail!("the batch size (--max-concurrency, -b) must be at least 1");
        }
        if cfg.prefill_step_size == 0 {
            bail!("--prefill-step-size must be at least 1");
        }
        let probe = model.make_cache(cfg.max_kv_size);
        let joinable = cfg.kv_quant.is_none() && probe.iter().all(KvCache::is_batchable);
        let paddable = !probe.iter().any(|c| matches!(c.kind(), CacheKind::Rotating { .. }));
        let profile = cfg.profile.then(Profile::new);
        Ok(Self {
            model,
            cfg,
            joinable,
            paddable,
            next_uid: 0,
            pending: vec![],
            rows: vec![],
            cache: vec![],
            outbox: vec![],
            profile,
        })
    }

    /// Whether requests join a running batch and leaving rows can give their caches back
    /// (plain caches); otherwise requests run one batch after another.
    pub fn can_join(&self) -> bool {
        self.joinable
    }

    /// Requests in the decode batch.
    pub fn live(&self) -> usize {
        self.rows.iter().filter(|r| r.is_some()).count()
    }

    /// Requests inserted and not yet in the batch.
    pub fn waiting(&self) -> usize {
        self.pending.len()
    }

    pub fn is_idle(&self) -> bool {
        self.pending.is_empty() && self.rows.is_empty()
    }

    /// Whether another request can be inserted without waiting behind a full batch.
    pub fn has_room(&self) -> bool {
        self.pending.len() + self.live() < if self.joinable { self.cfg.max_batch } else { 1 }
    }

    /// The profile of the steps, when `profile` is on.
    pub fn profile(&mut self) -> Option<&mut Profile> {
        self.profile.as_mut()
    }

    /// Checks `req` and makes it a [`Spec`] under a new uid; gives back its prefix cache.
    fn accept(&mut self, req: Request) -> Result<(Spec, Option<Prefix>)> {
        let Request { prompt, max_tokens, sampler, processors, logprobs, prefix } = req;
        if prompt.is_empty() {
            bail!("the prompt is empty");
        }
        check_context(self.model, prompt.len())?;
        check_vocab(self.model, &prompt)?;
        processors.validate(self.model.vocab_size())?;
        if let Some((_, n)) = &prefix {
            if *n >= prompt.len() {
                bail!("a prefix cache holds {n} of the prompt's {} tokens: at least one must be left", prompt.len());
            }
        }
        let sampler = Sampler::new(sampler)?;
        self.next_uid += 1;
        Ok((Spec { uid: self.next_uid, prompt, max_tokens, processors, logprobs, sampler }, prefix))
    }

    /// Queues a request: its prompt is computed in the coming steps, then it joins the batch.
    pub fn insert(&mut self, req: Request) -> Result<Uid> {
        let (spec, prefix) = self.accept(req)?;
        let uid = spec.uid;
        let (cache, done) = match prefix {
            Some(p) => p,
            None => (self.model.make_cache(self.cfg.max_kv_size), 0),
        };
        self.pending.push(Joining { spec, cache, done, cached: done });
        Ok(uid)
    }

    /// Computes the prompts of `reqs` now, left-padded into one batch, and adds them to the
    /// batch as new rows (in order). Requests whose caches cannot be padded are queued as by
    /// [`BatchGenerator::insert`]. Prefix caches are ignored here.
    pub fn insert_batch(&mut self, reqs: Vec<Request>) -> Result<Vec<Uid>> {
        if !self.paddable || !(self.rows.is_empty() || self.joinable) {
            return reqs.into_iter().map(|r| self.insert(r)).collect();
        }
        let mut specs = Vec::with_capacity(reqs.len());
        for r in reqs {
            specs.push(self.accept(r)?.0);
        }
        let longest = specs.iter().map(|s| s.prompt.len()).max().unwrap_or(0);
        let mut cache = self.model.make_cache(self.cfg.max_kv_size);
        let padding: Arc<[usize]> = specs.iter().map(|s| longest - s.prompt.len()).collect();
        for c in cache.iter_mut() {
            c.set_left_padding(padding.clone());
        }
        // padding positions hold any valid token; they are never attended to
        let padded: Vec<Vec<u32>> = specs
            .iter()
            .map(|s| {
                std::iter::repeat_n(s.prompt[0], longest - s.prompt.len()).chain(s.prompt.iter().copied()).collect()
            })
            .collect();
        let mut done = 0;
        while longest - done > 1 {
            let n = self.cfg.prefill_step_size.min(longest - 1 - done);
            let chunk: Vec<Vec<u32>> = padded.iter().map(|r| r[done..done + n].to_vec()).collect();
            self.model.forward(&Tensor::new(chunk, self.model.device())?, &mut cache, true)?;
            maybe_quantize(self.cfg.kv_quant.as_ref(), &mut cache)?;
            done += n;
            if let Some(p) = self.profile.as_mut() {
                p.prefill_tokens += n * specs.len();
            }
        }
        let uids = specs.iter().map(|s| s.uid).collect();
        let rows = specs.into_iter().map(|spec| {
            let n = spec.prompt.len();
            self.outbox.push((spec.uid, Event::Started { cached: 0 }));
            Row { fed: spec.prompt[..n - 1].to_vec(), next: spec.prompt[n - 1], generated: 0, spec }
        });
        let rows: Vec<Row> = rows.collect();
        self.add_rows(rows, vec![cache])?;
        Ok(uids)
    }

    /// Appends `rows` to the batch, their caches `caches` (one batch per entry, in order).
    fn add_rows(&mut self, rows: Vec<Row>, mut caches: Vec<Vec<KvCache>>) -> Result<()> {
        self.rows.extend(rows.into_iter().map(Some));
        if caches.is_empty() {
            return Ok(());
        }
        if caches.len() == 1 && self.cache.is_empty() {
            self.cache = caches.pop().expect("one cache");
            return Ok(());
        }
        // per layer: the batch's cache (when there is a batch), then each joiner's
        let layers = caches[0].len();
        let mut merged = Vec::with_capacity(layers);
        for l in 0..layers {
            let parts: Vec<KvCache> =
                self.cache.get(l).into_iter().chain(caches.iter().map(|c| &c[l])).cloned().collect();
            merged.push(KvCache::merge(&parts)?);
        }
        self.cache = merged;
        Ok(())
    }

    /// Takes a request out (waiting or in the batch).
    pub fn remove(&mut self, uid: Uid) -> Result<Option<Left>> {
        if let Some(i) = self.pending.iter().position(|p| p.spec.uid == uid) {
            let p = self.pending.remove(i);
            return Ok(Some(Left { uid, fed: p.spec.prompt[..p.done].to_vec(), cache: None }));
        }
        let Some(i) = self.rows.iter().position(|r| r.as_ref().is_some_and(|r| r.spec.uid == uid)) else {
            return Ok(None);
        };
        Ok(self.leave(&[i])?.pop())
    }

    /// Drops every request (after a failure: the batch's state is unknown) and gives their ids.
    pub fn clear(&mut self) -> Vec<Uid> {
        let uids = self.pending.drain(..).map(|p| p.spec.uid);
        let uids = uids.chain(self.rows.drain(..).flatten().map(|r| r.spec.uid)).collect();
        self.cache.clear();
        self.outbox.clear();
        uids
    }

    /// One round: prompt chunks of the waiting requests, oldest first, up to `prefill_step_size`
    /// tokens in all (a long prompt takes several rounds, so the batch keeps decoding between
    /// its chunks); the requests whose prompts are done join the batch together; then a decode
    /// step of the batch.
    pub fn step(&mut self) -> Result<StepOutput> {
        let mut out = StepOutput { events: std::mem::take(&mut self.outbox), left: vec![] };
        let mut mark = Instant::now();
        let mut budget = self.cfg.prefill_step_size;
        let mut ready = 0;
        // a request that cannot join a running batch waits for it to end
        let may_join = |g: &Self, i: usize| g.joinable || (g.rows.is_empty() && i == 0);
        for i in 0..self.pending.len() {
            if !may_join(self, i) {
                break;
            }
            let p = &mut self.pending[i];
            let prompt = &p.spec.prompt;
            let left = prompt.len() - 1 - p.done;
            if left > 0 {
                if budget == 0 {
                    break;
                }
                let n = budget.min(left);
                let input = Tensor::new(&prompt[p.done..p.done + n], self.model.device())?.unsqueeze(0)?;
                self.model.forward(&input, &mut p.cache, true)?;
                maybe_quantize(self.cfg.kv_quant.as_ref(), &mut p.cache)?;
                p.done += n;
                budget -= n;
                if let Some(prof) = self.profile.as_mut() {
                    prof.prefill_tokens += n;
                }
            }
            if p.done < prompt.len() - 1 {
                break;
            }
            ready += 1;
        }
        let device = self.model.device().clone();
        lap(&mut self.profile, &device, &mut mark, 0);
        let joining: Vec<Joining> = self.pending.drain(..ready).collect();
        for j in &joining {
            out.events.push((j.spec.uid, Event::Started { cached: j.cached }));
        }
        self.join(joining)?;
        lap(&mut self.profile, &device, &mut mark, 1);
        if !self.rows.is_empty() {
            self.decode(&mut mark, &mut out)?;
        }
        if let Some(p) = self.profile.as_mut() {
            p.steps += 1;
        }
        Ok(out)
    }

    /// Moves requests whose prompts are computed (but their last tokens) into the batch: each
    /// into the slot of a request that left when its positions fit before the batch's offset
    /// (copied into that row in place), the others as new rows (the caches merged in one copy).
    fn join(&mut self, joining: Vec<Joining>) -> Result<()> {
        let (mut rows, mut caches) = (vec![], vec![]);
        for Joining { spec, cache, done, .. } in joining {
            let row = Row { fed: spec.prompt[..done].to_vec(), next: spec.prompt[done], generated: 0, spec };
            let free = self.rows.iter().position(Option::is_none);
            if let Some(slot) = free.filter(|_| self.cache.first().is_some_and(|c| c.offset() >= done)) {
                for (b, c) in self.cache.iter_mut().zip(&cache) {
                    b.write_row(slot, c)?;
                }
                self.rows[slot] = Some(row);
                if let Some(p) = self.profile.as_mut() {
                    p.reused += 1;
                }
                continue;
            }
            rows.push(row);
            caches.push(cache);
            if let Some(p) = self.profile.as_mut() {
                p.appended += 1;
            }
        }
        self.add_rows(rows, caches)
    }

    /// Feeds every row's next token, samples each row's following one, lets finished rows go.
    fn decode(&mut self, mark: &mut Instant, out: &mut StepOutput) -> Result<()> {
        let device = self.model.device().clone();
        self.compact_before_growing()?;
        let (slots, live) = (self.rows.len(), self.live());
        if let Some(p) = self.profile.as_mut() {
            p.decodes += 1;
            p.rows += slots;
            p.idle_rows += slots - live;
        }
        // a left request's slot feeds any token: its row's output is not read
        let input: Vec<Vec<u32>> = self.rows.iter().map(|r| vec![r.as_ref().map_or(0, |r| r.next)]).collect();
        let input = Tensor::new(input, &device)?;
        // every request greedy, without processors or log-probabilities: the model picks the
        // tokens on the device where it can, and no logits come back
        let greedy = self.cfg.kv_quant.is_none()
            && self.rows.iter().flatten().all(|r| {
                r.spec.sampler.config().is_greedy() && r.spec.processors.is_empty() && r.spec.logprobs.is_none()
            });
        let picked_on_device =
            if greedy { self.model.greedy_step(Some(&input), slots, &mut self.cache)? } else { None };
        let picked: Vec<Option<Result<Picked>>> = if let Some(p) = picked_on_device {
            lap(&mut self.profile, &device, mark, 2);
            let ids = p.wait()?;
            lap(&mut self.profile, &device, mark, 3);
            let rows = self.rows.iter_mut().zip(ids);
            rows.map(|(slot, id)| {
                let row = slot.as_mut()?;
                row.fed.push(row.next);
                Some(Ok((id, None, vec![])))
            })
            .collect()
        } else {
            let logits = self.model.forward(&input, &mut self.cache, true)?;
            maybe_quantize(self.cfg.kv_quant.as_ref(), &mut self.cache)?;
            lap(&mut self.profile, &device, mark, 2);
            let mut logits = logits.squeeze(1)?.to_vec2::<f32>()?;
            lap(&mut self.profile, &device, mark, 3);
            // each row's processors and sampler on its logits, the rows in parallel
            self.rows
                .par_iter_mut()
                .zip(logits.par_iter_mut())
                .map(|(slot, l)| {
                    let row = slot.as_mut()?;
                    row.fed.push(row.next);
                    let spec = &mut row.spec;
                    spec.processors.apply(&row.fed, l);
                    Some(match spec.logprobs {
                        Some(n) => {
                            let lp = log_softmax(l);
                            spec.sampler.sample(l).map(|id| (id, Some(lp[id as usize]), top_n(&lp, n)))
                        }
                        None => spec.sampler.sample(l).map(|id| (id, None, vec![])),
                    })
                })
                .collect()
        };
        let mut leaving = vec![];
        for (i, (slot, p)) in self.rows.iter_mut().zip(picked).enumerate() {
            let (Some(row), Some(p)) = (slot, p) else { continue };
            let (id, logprob, top) = p?;
            row.generated += 1;
            let finish = if self.cfg.eos_token_ids.contains(&id) {
                Some(FinishReason::Stop)
            } else if row.generated >= row.spec.max_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            out.events.push((row.spec.uid, Event::Token { id, logprob, top, finish }));
            if finish.is_none() {
                row.next = id;
            } else {
                leaving.push(i);
            }
        }
        lap(&mut self.profile, &device, mark, 4);
        if !leaving.is_empty() {
            out.left.extend(self.leave(&leaving)?);
            lap(&mut self.profile, &device, mark, 5);
        }
        Ok(())
    }

    /// Lets the rows in `leaving` go: their slots stay in the batch for joining requests (with
    /// `reuse_slots`) until at most half the slots hold requests (then the batch is compacted) or
    /// none does (then it is dropped).
    fn leave(&mut self, leaving: &[usize]) -> Result<Vec<Left>> {
        let mut left = Vec::with_capacity(leaving.len());
        let joinable = self.joinable;
        for &i in leaving {
            let row = self.rows[i].take().expect("a leaving row is in the batch");
            let cache = if self.cfg.keep_caches && joinable {
                Some(self.cache.iter().map(|c| c.extract_row(i)).collect::<Result<Vec<_>>>()?)
            } else {
                None
            };
            left.push(Left { uid: row.spec.uid, fed: row.fed, cache });
            if joinable {
                for c in self.cache.iter_mut() {
                    c.retire_row(i);
                }
            }
        }
        let live = self.live();
        if live == 0 {
            self.rows.clear();
            self.cache.clear();
        } else if !(joinable && self.cfg.reuse_slots) || 2 * live <= self.rows.len() {
            self.compact()?;
        }
        Ok(left)
    }

    /// Drops the slots of requests that left, and the cache positions no request sees.
    fn compact(&mut self) -> Result<()> {
        let keep: Vec<usize> = (0..self.rows.len()).filter(|&i| self.rows[i].is_some()).collect();
        for c in self.cache.iter_mut() {
            if keep.len() < self.rows.len() {
                c.select_rows(&keep)?;
            }
            c.drop_common_padding()?;
        }
        self.rows.retain(Option::is_some);
        Ok(())
    }

    /// When the next step would grow the batch's cache (new buffers anyway), compacts it first:
    /// the cache keeps no more than its requests' positions (and room for the next 256).
    fn compact_before_growing(&mut self) -> Result<()> {
        if self.joinable && self.cache.first().is_some_and(KvCache::is_full) {
            self.compact()?;
        }
        Ok(())
    }
}

/// A sampled token, its log-probability and the most likely alternatives (when asked for).
type Picked = (u32, Option<f32>, Vec<(u32, f32)>);

/// The `n` largest entries of `lp` with their indices, largest first.
fn top_n(lp: &[f32], n: usize) -> Vec<(u32, f32)> {
    if n == 0 {
        return vec![];
    }
    let mut idx: Vec<u32> = (0..lp.len() as u32).collect();
    let n = n.min(idx.len());
    let by = |a: &u32, b: &u32| lp[*b as usize].total_cmp(&lp[*a as usize]);
    idx.select_nth_unstable_by(n - 1, by);
    idx.truncate(n);
    idx.sort_by(by);
    idx.into_iter().map(|i| (i, lp[i as usize])).collect()
}

/// Time a [`BatchGenerator`] spends per phase of its steps (`profile` on); the device is
/// synchronized after each phase, so each figure includes that phase's GPU work.
pub struct Profile {
    since: Instant,
    steps: usize,
    decodes: usize,
    rows: usize,
    /// slots of the decode steps whose requests had left
    idle_rows: usize,
    /// requests that joined the batch in a left request's slot, and in a new one
    reused: usize,
    appended: usize,
    prefill_tokens: usize,
    /// prompt chunks, joining the batch, the decode forward, reading the logits back,
    /// sampling, letting finished rows go
    phases: [Duration; 6],
}

const PHASES: [&str; 6] = ["prefill", "join", "forward", "readback", "sample", "leave"];

impl Profile {
    fn new() -> Self {
        Self {
            since: Instant::now(),
            steps: 0,
            decodes: 0,
            rows: 0,
            idle_rows: 0,
            reused: 0,
            appended: 0,
            prefill_tokens: 0,
            phases: Default::default(),
        }
    }

    /// Starts the clock anew (time spent idle is not the steps').
    pub fn restart(&mut self) {
        self.since = Instant::now();
    }

    /// The figures since the last report as one JSON object when 5 s have passed (or `now`),
    /// and starts anew; `None` when not due or nothing ran.
    pub fn report_if_due(&mut self, now: bool) -> Option<serde_json::Value> {
        let wall = self.since.elapsed();
        if (wall < Duration::from_secs(5) && !now) || self.steps == 0 {
            return None;
        }
        let ms = |d: Duration| (d.as_secs_f64() * 1e4).round() / 10.0;
        let mut v = serde_json::json!({
            "event": "scheduler_profile",
            "wall_ms": ms(wall),
            "steps": self.steps,
            "decode_steps": self.decodes,
            "mean_rows": (self.rows as f64 / self.decodes.max(1) as f64 * 100.0).round() / 100.0,
            "mean_idle_rows": (self.idle_rows as f64 / self.decodes.max(1) as f64 * 100.0).round() / 100.0,
            "joined_into_slots": self.reused,
            "joined_as_new_rows": self.appended,
            "prefill_tokens": self.prefill_tokens,
        });
        for (name, d) in PHASES.iter().zip(self.phases) {
            v[format!("{name}_ms")] = serde_json::json!(ms(d));
        }
        *self = Self::new();
        Some(v)
    }
}

/// Adds the time since `*mark` to phase `i` of the profile (after synchronizing the device) and
/// moves the mark; does nothing when profiling is off.
fn lap(profile: &mut Option<Profile>, device: &Device, mark: &mut Instant, i: usize) {
    if let Some(p) = profile {
        let _ = device.synchronize();
        let now = Instant::now();
        p.phases[i] += now - *mark;
        *mark = now;
    }
}

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

/// Generates for every prompt at once (mlx_lm's `batch_generate`); row `i` of the result is what
/// [`crate::engine::generate::generate`] gives for `prompts[i]` alone (with the greedy sampler,
/// token for token). Each row samples with its own sampler, seeded `seed + i` when a seed is
/// set. `on_step` is called after each decode step with the number of rows still running.
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
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        bail!("prompt {i} of the batch is empty");
    }
    // checks --max-kv-size
    opts.new_cache(model)?;
    let b = prompts.len();
    let mut cfg = BatchConfig::new(b, opts.prefill_step_size, eos_token_ids.clone());
    cfg.max_kv_size = opts.max_kv_size;
    cfg.kv_quant = opts.kv_quant;
    let mut gen = BatchGenerator::new(model, cfg)?;
    let reqs = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut sampler = opts.sampler.clone();
            sampler.seed = sampler.seed.map(|s| s.wrapping_add(i as u64));
            Request {
                prompt: p.clone(),
                max_tokens: opts.max_tokens,
                sampler,
                processors: opts.processors.clone(),
                logprobs: None,
                prefix: None,
            }
        })
        .collect();
    let tic = Instant::now();
    let uids = gen.insert_batch(reqs)?;
    let index = |uid: Uid| uids.iter().position(|&u| u == uid).expect("a request of this batch");
    let mut out: Vec<Vec<u32>> = vec![vec![]; b];
    let mut finish = vec![FinishReason::Length; b];
    let mut generated = 0usize;
    let (mut prompt_time, mut gen_tic) = (None, Instant::now());
    if opts.max_tokens == 0 {
        prompt_time = Some(tic.elapsed().as_secs_f64());
    }
    while opts.max_tokens > 0 && !gen.is_idle() {
        let step = gen.step()?;
        for (uid, ev) in step.events {
            let Event::Token { id, finish: f, .. } = ev else { continue };
            let i = index(uid);
            generated += 1;
            if let Some(f) = f {
                finish[i] = f;
            }
            if f != Some(FinishReason::Stop) {
                out[i].push(id);
            }
        }
        // the first step samples the prompts' first tokens: it is part of the prompt's time
        if prompt_time.is_none() && gen.waiting() == 0 {
            prompt_time = Some(tic.elapsed().as_secs_f64());
            gen_tic = Instant::now();
        }
        on_step(gen.live());
    }
    let prompt_time = prompt_time.unwrap_or_else(|| tic.elapsed().as_secs_f64());
    let gen_time = gen_tic.elapsed().as_secs_f64();
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
