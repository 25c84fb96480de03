//! The scheduler: one thread owns the model and serves every live request by continuous
//! batching through the engine's [`BatchGenerator`]. Requests join between decode steps (their
//! prompt computed in chunks first, starting from the longest shared prefix the [`PrefixCache`]
//! holds), every decode step advances all of them at once, and a request leaves as soon as it
//! ends (eos, its max_tokens, or its client gone: the receiver of its events is dropped). A
//! model whose cache cannot be batched (sliding-window layers) serves requests one after another
//! through the same loop.

use super::prefix_cache::PrefixCache;
use crate::engine::batch::{self, BatchConfig, BatchGenerator, Left, Request, Uid};
pub use crate::engine::generate::FinishReason as Finish;
use crate::engine::sample::{LogitsProcessors, SamplerConfig};
use crate::models::LanguageModel;
use anyhow::{bail, Result};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use tokio::sync::mpsc::UnboundedSender;

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

impl From<batch::Event> for Event {
    fn from(e: batch::Event) -> Self {
        match e {
            batch::Event::Started { cached } => Self::Started { cached },
            batch::Event::Token { id, logprob, top, finish } => Self::Token { id, logprob, top, finish },
        }
    }
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
        let worker = Worker { model, cfg, rx, alive: alive.clone() };
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

/// The scheduler's loop; see [`Scheduler::new`].
pub struct Worker {
    model: Box<dyn LanguageModel>,
    cfg: SchedulerConfig,
    rx: mpsc::Receiver<Queued>,
    alive: Arc<AtomicBool>,
}

fn send(job: &Job, ev: Event) -> bool {
    job.events.send(ev).is_ok()
}

/// The loop's state: the engine, the prefix cache and the jobs of the engine's requests.
struct Serving<'m> {
    gen: BatchGenerator<'m>,
    prefix: PrefixCache,
    jobs: HashMap<Uid, Queued>,
}

impl Worker {
    /// Serves jobs until every [`Scheduler`] handle is gone.
    pub fn run(self) {
        let Worker { model, cfg, rx, alive } = self;
        let mut bc = BatchConfig::new(cfg.max_batch, cfg.prefill_step_size, cfg.eos_token_ids.clone());
        bc.reuse_slots = true;
        bc.keep_caches = cfg.prompt_cache_size > 0;
        // `WICK_SERVER_PROFILE=1`: where the loop's time goes, logged every few seconds
        bc.profile = std::env::var("WICK_SERVER_PROFILE").is_ok_and(|v| v != "0");
        // (the settings were checked by `Scheduler::new`)
        if let Ok(gen) = BatchGenerator::new(model.as_ref(), bc) {
            let prefix = PrefixCache::new(if gen.can_join() { cfg.prompt_cache_size } else { 0 });
            Serving { gen, prefix, jobs: HashMap::new() }.serve(&rx);
        }
        alive.store(false, Ordering::SeqCst);
    }
}

impl Serving<'_> {
    fn serve(&mut self, rx: &mpsc::Receiver<Queued>) {
        loop {
            // take new requests while there is room; wait for one when idle
            while self.gen.has_room() {
                let q = if self.gen.is_idle() {
                    self.log_profile(true);
                    let Ok(q) = rx.recv() else { return };
                    if let Some(p) = self.gen.profile() {
                        // idle time is not the loop's
                        p.restart();
                    }
                    q
                } else {
                    match rx.try_recv() {
                        Ok(q) => q,
                        Err(_) => break,
                    }
                };
                self.admit(q);
            }
            // requests whose clients are gone leave before the next step
            let gone: Vec<Uid> = self.jobs.iter().filter(|(_, q)| q.job.events.is_closed()).map(|(&u, _)| u).collect();
            for uid in gone {
                self.remove(uid);
            }
            if self.gen.is_idle() {
                continue;
            }
            let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.gen.step()));
            let failure = match step {
                Ok(Ok(out)) => {
                    for (uid, ev) in out.events {
                        let last = matches!(ev, batch::Event::Token { finish: Some(_), .. });
                        let open = self.jobs.get(&uid).is_some_and(|q| send(&q.job, ev.into()));
                        if last {
                            self.jobs.remove(&uid);
                        } else if !open {
                            self.remove(uid);
                        }
                    }
                    for left in out.left {
                        self.keep(left);
                    }
                    None
                }
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
                for uid in self.gen.clear() {
                    if let Some(q) = self.jobs.remove(&uid) {
                        send(&q.job, Event::Error(msg.clone()));
                    }
                }
            }
            self.log_profile(false);
        }
    }

    fn log_profile(&mut self, now: bool) {
        if let Some(line) = self.gen.profile().and_then(|p| p.report_if_due(now)) {
            super::log_line(line);
        }
    }

    /// Hands a request to the engine, from the longest prefix cached.
    fn admit(&mut self, q: Queued) {
        if q.job.events.is_closed() {
            return;
        }
        let inserted = self.prefix.fetch(&q.job.prompt).and_then(|prefix| {
            let job = &q.job;
            self.gen.insert(Request {
                prompt: job.prompt.clone(),
                max_tokens: job.max_tokens,
                sampler: job.sampler.clone(),
                processors: job.processors.clone(),
                logprobs: job.logprobs,
                prefix,
            })
        });
        match inserted {
            Ok(uid) => {
                self.jobs.insert(uid, q);
            }
            Err(e) => {
                send(&q.job, Event::Error(format!("{e:#}")));
            }
        }
    }

    /// Takes a request out of the engine (its client is gone).
    fn remove(&mut self, uid: Uid) {
        self.jobs.remove(&uid);
        // (when the engine cannot give the row's cache back, the prefix is not kept)
        if let Ok(Some(left)) = self.gen.remove(uid) {
            self.keep(left);
        }
    }

    /// Keeps a leaving request's cache as a prefix for later requests.
    fn keep(&mut self, left: Left) {
        self.jobs.remove(&left.uid);
        if let Some(cache) = left.cache {
            self.prefix.insert(left.fed, cache);
        }
    }
}
