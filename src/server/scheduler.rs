//! The scheduler: one thread owns the model and serves every live request by continuous
//! batching. Requests join between decode steps (their prompt computed in chunks first,
//! starting from the longest shared prefix the [`PrefixCache`] holds), every decode step
//! advances all of them at once over one left-padded batched KV cache, and a request leaves as
//! soon as it ends (eos, its max_tokens, or its client gone: the receiver of its events is
//! dropped). A model whose cache cannot be batched (sliding-window layers) serves requests one
//! after another through the same loop.

use super::prefix_cache::PrefixCache;
use crate::cache::KvCache;
use crate::engine::sample::{log_softmax, LogitsProcessors, Sampler, SamplerConfig};
use crate::models::LanguageModel;
use anyhow::{bail, Result};
use candle_core::Tensor;
use rayon::prelude::*;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// Why a request's generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// an eos token
    Stop,
    /// max_tokens, or the model's context
    Length,
}

/// What the scheduler tells a request's handler.
#[derive(Debug, Clone)]
pub enum Event {
    /// The prompt is computed; `cached` of its tokens came from the prefix cache.
    Started { cached: usize },
    /// A generated token; with `finish` it is the last one (an eos is sent too, marked
    /// [`Finish::Stop`]). `logprob` and `top` are there when the request asked for them.
    Token { id: u32, logprob: Option<f32>, top: Vec<(u32, f32)>, finish: Option<Finish> },
    /// The request failed in the model.
    Error(String),
}

/// One generation request.
pub struct Job {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    pub processors: LogitsProcessors,
    /// `Some(n)`: report each token's log-probability and the `n` most likely alternatives
    pub logprobs: Option<usize>,
    pub events: UnboundedSender<Event>,
}

/// Counts a job as in flight until it is dropped.
struct Ticket(Arc<AtomicUsize>);

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Queued {
    job: Job,
    _ticket: Ticket,
}

/// Why a job was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// as many requests as the server takes are running or waiting
    Full,
    /// the scheduler thread has ended
    Stopped,
}

/// Submits jobs to the scheduler thread; cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    tx: mpsc::Sender<Queued>,
    in_flight: Arc<AtomicUsize>,
    limit: usize,
    alive: Arc<AtomicBool>,
}

/// Settings of the scheduler.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// requests decoded together (`--max-concurrency`)
    pub max_batch: usize,
    /// requests waiting beyond those (`--max-queue`)
    pub max_queue: usize,
    pub prefill_step_size: usize,
    /// prefix caches kept (`--prompt-cache-size`)
    pub prompt_cache_size: usize,
    pub eos_token_ids: BTreeSet<u32>,
}

impl Scheduler {
    /// The scheduler's handle and its worker, which owns `model`; [`Worker::run`] serves the
    /// handle's jobs on the calling thread until every handle is dropped. On the CPU, run it on
    /// one of rayon's threads (as the `wick` binary runs its commands), so that it never waits
    /// for a core the kernels' threads hold.
    pub fn new(model: Box<dyn LanguageModel>, cfg: SchedulerConfig) -> Result<(Self, Worker)> {
        if cfg.max_batch == 0 {
            bail!("--max-concurrency must be at least 1");
        }
        if cfg.prefill_step_size == 0 {
            bail!("--prefill-step-size must be at least 1");
        }
        let (tx, rx) = mpsc::channel();
        let alive = Arc::new(AtomicBool::new(true));
        let limit = cfg.max_batch + cfg.max_queue;
        let worker = Worker::new(model, cfg, rx, alive.clone());
        Ok((Self { tx, in_flight: Arc::new(AtomicUsize::new(0)), limit, alive }, worker))
    }

    /// [`Scheduler::new`] with the worker on a thread of its own.
    pub fn start(model: Box<dyn LanguageModel>, cfg: SchedulerConfig) -> Result<Self> {
        let (handle, worker) = Self::new(model, cfg)?;
        std::thread::Builder::new().name("wick-scheduler".into()).spawn(move || worker.run())?;
        Ok(handle)
    }

    /// Queues `job`, or refuses it when the server is full or stopped.
    pub fn submit(&self, job: Job) -> std::result::Result<(), Refused> {
        if !self.is_alive() {
            return Err(Refused::Stopped);
        }
        if self.in_flight.fetch_add(1, Ordering::SeqCst) >= self.limit {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(Refused::Full);
        }
        let ticket = Ticket(self.in_flight.clone());
        self.tx.send(Queued { job, _ticket: ticket }).map_err(|_| Refused::Stopped)
    }

    /// Requests running or waiting.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }
}

/// A request whose prompt is being computed.
struct Joining {
    q: Queued,
    cache: Vec<KvCache>,
    /// prompt tokens in `cache`
    done: usize,
    cached: usize,
}

/// A request in the decode batch.
struct Row {
    q: Queued,
    sampler: Sampler,
    /// tokens in the cache: the prompt and the generated tokens fed so far
    fed: Vec<u32>,
    /// the token the next step feeds
    next: u32,
    generated: usize,
}

/// The scheduler's loop and state; see [`Scheduler::new`].
pub struct Worker {
    model: Box<dyn LanguageModel>,
    cfg: SchedulerConfig,
    rx: mpsc::Receiver<Queued>,
    alive: Arc<AtomicBool>,
    batchable: bool,
    prefix: PrefixCache,
    pending: Vec<Joining>,
    /// the batch's slots: slot `i` is row `i` of every layer's cache; `None`, a request that
    /// left (the slot runs a throwaway step until a joining request takes it over, or the batch
    /// is compacted)
    rows: Vec<Option<Row>>,
    /// the batch's cache, one per layer
    cache: Vec<KvCache>,
    /// `WICK_SERVER_PROFILE=1`: where the loop's time goes, logged every few seconds
    profile: Option<Profile>,
}

/// Time the scheduler spends per phase (`WICK_SERVER_PROFILE=1`); the device is synchronized
/// after each phase, so each figure includes that phase's GPU work. Logged as one structured
/// line every 5 s of serving and when the scheduler goes idle.
struct Profile {
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
    /// sampling and sending, letting finished rows go
    phases: [Duration; 6],
}

const PHASES: [&str; 6] = ["prefill", "join", "forward", "readback", "sample", "leave"];

impl Profile {
    fn from_env() -> Option<Self> {
        std::env::var("WICK_SERVER_PROFILE").is_ok_and(|v| v != "0").then(Self::new)
    }

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

    /// Logs the figures since the last line, if 5 s have passed (or `now`), and starts anew.
    fn log_if_due(&mut self, now: bool) {
        let wall = self.since.elapsed();
        if (wall < Duration::from_secs(5) && !now) || self.steps == 0 {
            return;
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
        super::log_line(v);
        *self = Self::new();
    }
}

/// Adds the time since `*mark` to phase `i` of the profile (after synchronizing the device) and
/// moves the mark; does nothing when profiling is off.
fn lap(profile: &mut Option<Profile>, device: &candle_core::Device, mark: &mut Instant, i: usize) {
    if let Some(p) = profile {
        let _ = device.synchronize();
        let now = Instant::now();
        p.phases[i] += now - *mark;
        *mark = now;
    }
}

fn send(job: &Job, ev: Event) -> bool {
    job.events.send(ev).is_ok()
}

impl Worker {
    fn new(
        model: Box<dyn LanguageModel>,
        cfg: SchedulerConfig,
        rx: mpsc::Receiver<Queued>,
        alive: Arc<AtomicBool>,
    ) -> Self {
        let batchable = model.make_cache(None).iter().all(KvCache::is_batchable);
        let prefix = PrefixCache::new(if batchable { cfg.prompt_cache_size } else { 0 });
        let profile = Profile::from_env();
        Self { model, cfg, rx, alive, batchable, prefix, pending: vec![], rows: vec![], cache: vec![], profile }
    }

    /// Serves jobs until every [`Scheduler`] handle is gone.
    pub fn run(mut self) {
        self.serve();
        self.alive.store(false, Ordering::SeqCst);
    }

    /// Requests in the batch.
    fn live(&self) -> usize {
        self.rows.iter().filter(|r| r.is_some()).count()
    }

    fn capacity(&self) -> usize {
        if self.batchable {
            self.cfg.max_batch
        } else {
            1
        }
    }

    fn serve(&mut self) {
        loop {
            // take new requests while there is room; wait for one when idle
            while self.pending.len() + self.live() < self.capacity() {
                let q = if self.pending.is_empty() && self.rows.is_empty() {
                    if let Some(p) = self.profile.as_mut() {
                        p.log_if_due(true);
                    }
                    let q = match self.rx.recv() {
                        Ok(q) => q,
                        Err(_) => return,
                    };
                    if let Some(p) = self.profile.as_mut() {
                        // idle time is not the loop's
                        p.since = Instant::now();
                    }
                    q
                } else {
                    match self.rx.try_recv() {
                        Ok(q) => q,
                        Err(_) => break,
                    }
                };
                self.admit(q);
            }
            let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step()));
            let failure = match step {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("{e:#}")),
                Err(p) => Some(
                    p.downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "the model panicked".into()),
                ),
            };
            if let Some(msg) = failure {
                // the batch's state is unknown now: fail its requests and start clean
                for r in self.rows.drain(..).flatten() {
                    send(&r.q.job, Event::Error(msg.clone()));
                }
                for p in self.pending.drain(..) {
                    send(&p.q.job, Event::Error(msg.clone()));
                }
                self.cache.clear();
            }
        }
    }

    /// Starts computing a request's prompt, from the longest prefix cached.
    fn admit(&mut self, q: Queued) {
        if q.job.events.is_closed() {
            return;
        }
        let found = match self.prefix.fetch(&q.job.prompt) {
            Ok(f) => f,
            Err(e) => {
                send(&q.job, Event::Error(format!("{e:#}")));
                return;
            }
        };
        let (cache, done) = found.unwrap_or_else(|| (self.model.make_cache(None), 0));
        self.pending.push(Joining { q, cache, done, cached: done });
    }

    /// One round: prompt chunks of the pending requests, oldest first, up to `prefill_step_size`
    /// tokens in all (a long prompt takes several rounds, so the batch keeps decoding between
    /// its chunks); the requests whose prompts are done join the batch together; then a decode
    /// step of the batch.
    fn step(&mut self) -> Result<()> {
        let mut mark = Instant::now();
        self.pending.retain(|p| !p.q.job.events.is_closed());
        let mut budget = self.cfg.prefill_step_size;
        let mut ready = 0;
        for p in self.pending.iter_mut() {
            let prompt = &p.q.job.prompt;
            let left = prompt.len() - 1 - p.done;
            if left > 0 {
                if budget == 0 {
                    break;
                }
                let n = budget.min(left);
                let input = Tensor::new(&prompt[p.done..p.done + n], self.model.device())?.unsqueeze(0)?;
                self.model.forward(&input, &mut p.cache, true)?;
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
        self.join(joining)?;
        lap(&mut self.profile, &device, &mut mark, 1);
        if !self.rows.is_empty() {
            self.decode(&mut mark)?;
        }
        if let Some(p) = self.profile.as_mut() {
            p.steps += 1;
            p.log_if_due(false);
        }
        Ok(())
    }

    /// Moves requests whose prompts are computed (but their last tokens) into the batch: each
    /// into the slot of a request that left when its positions fit before the batch's offset
    /// (copied into that row in place: the batch's buffers stay, so a captured CUDA graph of the
    /// step keeps being replayed), the others as new rows (the caches merged in one copy).
    fn join(&mut self, joining: Vec<Joining>) -> Result<()> {
        let mut caches = vec![];
        for Joining { q, cache, done, cached } in joining {
            if !send(&q.job, Event::Started { cached }) {
                continue;
            }
            let sampler = match Sampler::new(q.job.sampler.clone()) {
                Ok(s) => s,
                Err(e) => {
                    send(&q.job, Event::Error(format!("{e:#}")));
                    continue;
                }
            };
            let prompt = &q.job.prompt;
            let row = Row { fed: prompt[..done].to_vec(), next: prompt[done], generated: 0, sampler, q };
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
            self.rows.push(Some(row));
            caches.push(cache);
            if let Some(p) = self.profile.as_mut() {
                p.appended += 1;
            }
        }
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

    /// Feeds every row's next token, samples each row's following one, lets finished rows go.
    fn decode(&mut self, mark: &mut Instant) -> Result<()> {
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
        let greedy = self
            .rows
            .iter()
            .flatten()
            .all(|r| r.sampler.config().is_greedy() && r.q.job.processors.is_empty() && r.q.job.logprobs.is_none());
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
                    let job = &row.q.job;
                    job.processors.apply(&row.fed, l);
                    Some(match job.logprobs {
                        Some(n) => {
                            let lp = log_softmax(l);
                            row.sampler.sample(l).map(|id| (id, Some(lp[id as usize]), top_n(&lp, n)))
                        }
                        None => row.sampler.sample(l).map(|id| (id, None, vec![])),
                    })
                })
                .collect()
        };
        let mut leaving = vec![];
        for (i, (slot, p)) in self.rows.iter_mut().zip(picked).enumerate() {
            let (Some(row), Some(p)) = (slot, p) else { continue };
            let (id, logprob, top) = p?;
            let job = &row.q.job;
            row.generated += 1;
            let finish = if self.cfg.eos_token_ids.contains(&id) {
                Some(Finish::Stop)
            } else if row.generated >= job.max_tokens {
                Some(Finish::Length)
            } else {
                None
            };
            let open = send(job, Event::Token { id, logprob, top, finish });
            if finish.is_none() && open {
                row.next = id;
            } else {
                leaving.push(i);
            }
        }
        lap(&mut self.profile, &device, mark, 4);
        if !leaving.is_empty() {
            self.leave(&leaving)?;
            lap(&mut self.profile, &device, mark, 5);
        }
        Ok(())
    }

    /// Lets the rows in `leaving` go (their caches kept as prefixes): their slots stay in the
    /// batch for joining requests, until at most half the slots hold requests (then the batch
    /// is compacted) or none does (then it is dropped).
    fn leave(&mut self, leaving: &[usize]) -> Result<()> {
        // (copying a row out is skipped when nothing is kept: a rotating cache cannot give one)
        let keep_prefixes = self.prefix.is_enabled();
        for &i in leaving {
            let row = self.rows[i].take().expect("a leaving row is in the batch");
            if keep_prefixes {
                let cache = self.cache.iter().map(|c| c.extract_row(i)).collect::<Result<Vec<_>>>()?;
                self.prefix.insert(row.fed, cache);
            }
            if self.batchable {
                for c in self.cache.iter_mut() {
                    c.retire_row(i);
                }
            }
        }
        let live = self.live();
        if live == 0 {
            self.rows.clear();
            self.cache.clear();
        } else if !self.batchable || 2 * live <= self.rows.len() {
            self.compact()?;
        }
        Ok(())
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
        if self.batchable && self.cache.first().is_some_and(KvCache::is_full) {
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
