//! The decode step as a CUDA graph: the step of one sequence or of a (left-padded) batch
//! (embedding, every layer, the head) is captured once and replayed at every position, so the host issues one graph launch and four
//! small copies instead of ~20 kernel launches per layer.
//!
//! What changes from step to step lives on the device, written before each replay: the tokens,
//! the position (the cache writes and decode attention read it there, [`DevicePos`]), each
//! row's first key (its left padding; decode attention reads it there too) and the RoPE tables
//! of each row's position. Everything else has fixed addresses: the cache buffers (a
//! graph is captured against them and captured again when they grow, every 256 positions, or
//! when another cache is passed), the weights, and the intermediates (the capture allocates and
//! frees them with stream-ordered allocation, so they become the graph's own memory). The
//! logits land in a buffer made before the capture.
//!
//! The first step on new cache buffers (a new sequence, or the cache grown) runs eagerly, on
//! the device inputs as a graph would, which fills candle's upload cache; the second step on
//! the same buffers is captured. So a step that may be the only one (a prompt's last token,
//! whose time is the time to the first token) does not wait for a capture (~2 ms for a
//! Llama-1B step: recording ~1 ms, instantiation ~1.2 ms).
//!
//! A greedy step (temperature 0) ends with the argmax of the logits (src/ops/argmax/argmax.cu): the
//! token becomes the next replay's input on the device and reaches the host through mapped
//! memory once the step's event has fired, so the host can queue the next step first.
//!
//! Steps that do not fit run eagerly: prompts, rotating or quantized caches, training, and
//! `WICK_CUDA_GRAPH=0`. A capture that fails (an op that synchronizes with the
//! host) turns graphs off for the model and the step runs eagerly.

use crate::backend::cuda::{upload_f32, HostRing, StepGraph};
use crate::backend::stats::{self, Counter};
use crate::cache::KvCache;
use crate::models::{GraphStep, LanguageModel, PendingTokens};
use crate::nn::{Rope, RopeTables};
use crate::ops::argmax::cuda::argmax_rows;
use crate::ops::attention::cuda::STEP_COUNTERS;
use crate::ops::attention::DevicePos;
use anyhow::Result;
use candle_core::cuda_backend::cudarc::driver::{sys, CudaEvent};
use candle_core::{DType, Device, Tensor, TensorId};
use std::sync::OnceLock;
use std::sync::{Arc, Mutex};

struct Captured {
    graph: StepGraph,
    on: Bound,
}

/// The step's inputs and the cache buffers and thread they are for.
struct Bound {
    /// the identities of the cache buffers the step writes and reads (never reused, so a
    /// match means the same buffers are still alive)
    buffers: Vec<(TensorId, TensorId)>,
    /// the step's thread: candle's cache of uploaded shape parameters, which a graph reads,
    /// is per thread
    thread: std::thread::ThreadId,
    inputs: Inputs,
}

impl Bound {
    /// Whether a step on `buffers` from this thread (greedy or not) is the one these are for.
    fn fits(&self, buffers: &[(TensorId, TensorId)], greedy: bool) -> bool {
        self.buffers == buffers
            && self.thread == std::thread::current().id()
            && matches!(self.inputs.output, Output::Greedy(_)) == greedy
    }
}

/// The buffers a captured step reads its inputs from and writes its output to.
struct Inputs {
    token: Tensor,
    pos: DevicePos,
    tables: Vec<RopeTables>,
    output: Output,
}

/// Where a captured step's result goes.
enum Output {
    /// the logits, copied into this buffer made before the capture
    Logits(Tensor),
    /// a greedy step's: the argmax of the logits goes into `token` (the next step's input)
    /// and into this ring, which the host reads
    Greedy(Arc<HostRing>),
}

impl Inputs {
    /// The buffers of a step; `greedy`: its tokens' ring (else the logits' buffer is made).
    fn new(device: &Device, shape: &StepShape, rows: usize, greedy: Option<Arc<HostRing>>) -> Result<Self> {
        let tables = shape.ropes.iter().map(|r| r.position_tables(rows, shape.dtype, device));
        Ok(Self {
            token: Tensor::zeros((rows, 1), DType::U32, device)?,
            pos: DevicePos {
                pos: Tensor::zeros(1, DType::U32, device)?,
                starts: Tensor::zeros(rows, DType::U32, device)?,
                done: Tensor::zeros(STEP_COUNTERS, DType::U32, device)?,
            },
            tables: tables.collect::<Result<Vec<_>>>()?,
            output: match greedy {
                Some(ring) => Output::Greedy(ring),
                None => Output::Logits(Tensor::zeros((rows, 1, shape.vocab), DType::F32, device)?),
            },
        })
    }

    /// This step's tokens (`None`: the previous greedy step left them there), position, rows'
    /// first keys and RoPE tables, copied in before the step runs (in stream order: after the
    /// steps still running). `offset`: the cache index the step writes; `starts`: the rows'
    /// left padding.
    fn write(&self, tokens: Option<&Tensor>, offset: usize, starts: &[usize], ropes: &[Rope]) -> Result<()> {
        if let Some(tokens) = tokens {
            self.token.slice_set(&tokens.to_dtype(DType::U32)?, 0, 0)?;
        }
        upload_f32(&self.pos.pos, &[offset as f32])?;
        upload_f32(&self.pos.starts, &starts.iter().map(|&s| s as f32).collect::<Vec<_>>())?;
        let positions: Vec<usize> = starts.iter().map(|&s| offset.saturating_sub(s)).collect();
        for (t, r) in self.tables.iter().zip(ropes) {
            t.write_positions(r, &positions, offset + 1)?;
        }
        Ok(())
    }

    /// The step on these buffers, eagerly (or into the capture under way); with `pick`, a
    /// greedy step's argmax too (never in the eager run before a capture: it overwrites the
    /// step's own token input, which the replay then reads).
    fn run(
        &self,
        cache: &mut [KvCache],
        run: &impl Fn(&Tensor, &mut [KvCache], &[RopeTables]) -> Result<Tensor>,
        pick: bool,
    ) -> Result<()> {
        // everything the step allocates is freed within it (in stream order, after the argmax
        // reads the logits), but for the logits copied into the buffer made beforehand
        let out = run(&self.token, cache, &self.tables)?;
        match &self.output {
            Output::Logits(buf) => Ok(buf.slice_set(&out, 2, 0)?),
            Output::Greedy(ring) if pick => Ok(argmax_rows(&out.contiguous()?, &self.token, ring, &self.pos.pos)?),
            Output::Greedy(_) => Ok(()),
        }
    }
}

// The graph handle is only touched under the [`DecodeGraph`] mutex (CUDA graphs must not be
// used from two threads at once; one at a time is fine).
unsafe impl Send for Captured {}

#[derive(Default)]
struct State {
    captured: Option<Captured>,
    /// the last step on buffers without a graph: run eagerly on its inputs, which the next
    /// step on the same buffers is captured on
    primed: Option<Bound>,
    /// a capture failed: this model's steps run eagerly
    disabled: bool,
    /// greedy steps' tokens for the host, kept across captures of the same batch size
    ring: Option<Arc<HostRing>>,
}

/// Slots of a greedy ring: the host reads a step's tokens while at most one later step runs.
const RING_SLOTS: usize = 4;

/// The tokens a greedy decode step picks on the device, read on the host once it has run.
pub struct GreedyTokens {
    done: CudaEvent,
    ring: Arc<HostRing>,
    pos: usize,
}

impl PendingTokens for GreedyTokens {
    fn wait(self: Box<Self>) -> Result<Vec<u32>> {
        self.done.synchronize().map_err(|e| anyhow::anyhow!("waiting for a greedy decode step: {e:?}"))?;
        Ok(self.ring.read(self.pos))
    }
}

/// What a replayed step leaves: its logits, or (greedy) its tokens on the way.
pub enum Replayed {
    Logits(Tensor),
    Tokens(GreedyTokens),
}

/// A model's decode-step graph (one per model; see the module docs).
#[derive(Default)]
pub struct DecodeGraph {
    state: Mutex<State>,
}

/// What the step needs from the model: its RoPEs, activation dtype and vocabulary size.
pub struct StepShape<'a> {
    pub ropes: &'a [Rope],
    pub dtype: DType,
    pub vocab: usize,
}

/// Whether decode steps go through graphs: `WICK_CUDA_GRAPH=0` turns them off (with the
/// `testing` feature, [`set_enabled`] overrides that on the calling thread).
fn enabled() -> bool {
    #[cfg(feature = "testing")]
    if let Some(on) = ON_THIS_THREAD.get() {
        return on;
    }
    static ENV: OnceLock<bool> = OnceLock::new();
    *ENV.get_or_init(|| std::env::var("WICK_CUDA_GRAPH").map(|v| v != "0").unwrap_or(true))
}

#[cfg(feature = "testing")]
thread_local! {
    static ON_THIS_THREAD: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Turns decode-step graphs on or off for the steps this thread runs.
#[cfg(feature = "testing")]
pub fn set_enabled(on: bool) {
    ON_THIS_THREAD.set(Some(on));
}

impl DecodeGraph {
    /// Runs one decode step of `rows` rows through the graph, capturing it first when needed:
    /// `tokens` (rows, 1), or with `None` those the previous greedy step picked on the device;
    /// `run` is the model's eager forward pass with given RoPE tables (what is captured). It
    /// leaves the logits, or with `greedy` each row's argmax of them, picked on the device:
    /// they become the next greedy step's input and the host reads them through
    /// [`crate::models::PendingTokens::wait`]; nothing waits for a greedy step, so the host may
    /// queue the next one first. `None`: this step does not fit a graph (nothing ran); run it
    /// eagerly.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &self,
        device: &Device,
        tokens: Option<&Tensor>,
        rows: usize,
        cache: &mut [KvCache],
        shape: StepShape,
        run: impl Fn(&Tensor, &mut [KvCache], &[RopeTables]) -> Result<Tensor>,
        greedy: bool,
    ) -> Result<Option<Replayed>> {
        if tokens.is_some_and(|t| t.dims() != [rows, 1]) || !device.is_cuda() || cache.is_empty() || !enabled() {
            return Ok(None);
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.disabled {
            return Ok(None);
        }
        let offset = cache[0].offset();
        let padding = cache[0].left_padding().cloned();
        let starts = padding.as_deref().map_or_else(|| vec![0; rows], |p| p.to_vec());
        let mut buffers = Vec::with_capacity(cache.len());
        for c in cache.iter_mut() {
            match c.graph_buffers()? {
                Some((k, v)) if c.offset() == offset && c.left_padding() == padding.as_ref() && k.dim(0)? == rows => {
                    buffers.push((k.id(), v.id()))
                }
                _ => return Ok(None),
            }
        }
        let replay = state.captured.as_ref().is_some_and(|c| c.on.fits(&buffers, greedy));
        if replay {
            state.primed = None;
            let c = state.captured.as_ref().expect("checked above");
            c.on.inputs.write(tokens, offset, &starts, shape.ropes)?;
        } else if let Some(p) = state.primed.take_if(|p| p.fits(&buffers, greedy)) {
            // the second step on these buffers: captured on the first one's inputs (candle's
            // uploads are cached already)
            p.inputs.write(tokens, offset, &starts, shape.ropes)?;
            let previous = state.captured.take().map(|c| c.graph);
            match capture(device, cache, &p.inputs, &run, previous) {
                Ok(graph) => {
                    stats::count(Counter::GraphCaptures);
                    // the graph replaced (or updated) may still run: CUDA frees a graph in
                    // flight once it has finished, and its buffers go back in stream order
                    state.captured = Some(Captured { graph, on: p });
                }
                Err(e) => {
                    state.disabled = true;
                    if std::env::var_os("WICK_CUDA_GRAPH_DEBUG").is_some() {
                        eprintln!("wick: CUDA graph capture failed, decoding without graphs: {e:#}");
                    }
                    // the step (not run) runs eagerly; a greedy one on the token read back
                    return Ok(None);
                }
            }
        } else {
            // The first step on these buffers (a new sequence, or the cache grown) runs eagerly
            // as a graph would (inputs on the device, uploads cached), so that the host does
            // not spend a capture on a step that may be the only one (a prompt's last token,
            // then the time to its first token). A greedy step's input may be the last step's
            // output, still being computed.
            let previous = state
                .primed
                .take()
                .map(|p| p.inputs.token)
                .or_else(|| state.captured.as_ref().map(|c| c.on.inputs.token.clone()));
            let tokens = match (tokens, &previous) {
                (Some(t), _) => t,
                (None, Some(t)) if t.dim(0)? == rows => t,
                _ => anyhow::bail!("a greedy decode step without its tokens: the previous step did not leave them"),
            };
            let ring = match &state.ring {
                Some(r) if greedy && r.rows() == rows => Some(r.clone()),
                _ if greedy => Some(Arc::new(HostRing::new(device.as_cuda_device()?, rows, RING_SLOTS)?)),
                _ => None,
            };
            let inputs = Inputs::new(device, &shape, rows, ring.clone())?;
            inputs.write(Some(tokens), offset, &starts, shape.ropes)?;
            drop(previous);
            if ring.is_some() {
                state.ring = ring;
            }
            let out = eager_step(device, cache, &inputs, &run, offset)?;
            state.primed = Some(Bound { buffers, thread: std::thread::current().id(), inputs });
            return Ok(Some(out));
        }
        let c = state.captured.as_ref().expect("captured above");
        c.graph.launch().map_err(|e| anyhow::anyhow!("replaying the decode step's CUDA graph: {e:?}"))?;
        stats::count(Counter::GraphReplays);
        for cache in cache.iter_mut() {
            cache.advance();
        }
        Ok(Some(finished(device, &c.on.inputs, offset)?))
    }
}

/// What a step on `inputs` that wrote position `offset` leaves (once queued).
fn finished(device: &Device, inputs: &Inputs, offset: usize) -> Result<Replayed> {
    Ok(match &inputs.output {
        Output::Greedy(ring) => {
            let done = device.as_cuda_device()?.cuda_stream().record_event(None);
            let done = done.map_err(|e| anyhow::anyhow!("recording a greedy decode step: {e:?}"))?;
            Replayed::Tokens(GreedyTokens { done, ring: ring.clone(), pos: offset })
        }
        // a copy: the next replay overwrites the graph's buffer
        Output::Logits(buf) => Replayed::Logits(buf.copy()?),
    })
}

/// One decode step on `inputs` (holding its values), run eagerly as a captured one would run
/// (the position on the device, candle's uploads cached for a capture of the next step).
fn eager_step(
    device: &Device,
    cache: &mut [KvCache],
    inputs: &Inputs,
    run: &impl Fn(&Tensor, &mut [KvCache], &[RopeTables]) -> Result<Tensor>,
    offset: usize,
) -> Result<Replayed> {
    let _uploads = device.as_cuda_device()?.enable_cuda_graph_htod_cache();
    at_device_pos(cache, &inputs.pos, |cache| inputs.run(cache, run, true))?;
    for c in cache.iter_mut() {
        c.advance();
    }
    stats::count(Counter::GraphEagerSteps);
    finished(device, inputs, offset)
}

/// `f` on caches that write at the device position `pos` (and attention that reads it there).
fn at_device_pos<R>(cache: &mut [KvCache], pos: &DevicePos, f: impl FnOnce(&mut [KvCache]) -> Result<R>) -> Result<R> {
    for c in cache.iter_mut() {
        c.set_graph_pos(Some(pos.clone()));
    }
    let r = f(cache);
    for c in cache.iter_mut() {
        c.set_graph_pos(None);
    }
    r
}

/// Captures one decode step on `inputs` (already holding this step's values) against the
/// caches' current buffers, after an eager step on them (see [`eager_step`]) filled candle's
/// upload cache: the capture only reuses those uploads (and fails on anything new).
/// `previous`: the model's last graph, updated to the new capture where it fits.
fn capture(
    device: &Device,
    cache: &mut [KvCache],
    inputs: &Inputs,
    run: &impl Fn(&Tensor, &mut [KvCache], &[RopeTables]) -> Result<Tensor>,
    previous: Option<StepGraph>,
) -> Result<StepGraph> {
    let cuda = device.as_cuda_device()?;
    let stream = cuda.cuda_stream();
    // candle uploads some kernels' shape and stride parameters from the host; a captured copy
    // would read host memory gone by the replay. Its upload cache (per thread) keeps them on
    // the device.
    let _uploads = cuda.enable_cuda_graph_htod_cache();
    let debug = std::env::var_os("WICK_CUDA_GRAPH_DEBUG").is_some();
    let start = std::time::Instant::now();
    let ran = at_device_pos(cache, &inputs.pos, |cache| {
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let ran = inputs.run(cache, run, true);
        let recorded = start.elapsed();
        let graph = StepGraph::end_capture(&stream, debug, previous);
        if debug {
            let (r, t) = (recorded.as_micros(), (start.elapsed() - recorded).as_micros());
            eprintln!("wick: decode step capture: recording {r} µs, rebuild + instantiate or update {t} µs");
        }
        ran?;
        let graph = graph.map_err(|e| anyhow::anyhow!("instantiating the decode step's CUDA graph: {e:?}"))?;
        graph.ok_or_else(|| anyhow::anyhow!("the decode step's capture produced no graph"))
    });
    // errors recorded while a failed capture was invalid (frees of its allocations) must not
    // surface in later eager work
    if ran.is_err() {
        let _ = stream.context().check_err();
    }
    ran
}

/// A model whose decode steps are replayed from a CUDA graph where they fit ([`DecodeGraph`]),
/// and run as the model runs them elsewhere.
pub struct Graphed {
    model: Box<dyn LanguageModel>,
    graph: DecodeGraph,
}

impl Graphed {
    /// `model` with a graph of its decode step, when it is on CUDA and its step may be captured
    /// ([`LanguageModel::graph_step`]); else `model` as it is.
    pub fn wrap(model: Box<dyn LanguageModel>) -> Box<dyn LanguageModel> {
        if model.device().is_cuda() && model.graph_step().is_some() {
            Box::new(Graphed { model, graph: DecodeGraph::default() })
        } else {
            model
        }
    }

    /// One decode step of `rows` rows through the graph ([`DecodeGraph::step`]).
    fn replay(
        &self,
        tokens: Option<&Tensor>,
        rows: usize,
        cache: &mut [KvCache],
        greedy: bool,
    ) -> Result<Option<Replayed>> {
        let Some(step) = self.model.graph_step() else { return Ok(None) };
        let shape = StepShape { ropes: step.ropes(), dtype: self.model.dtype(), vocab: self.model.vocab_size() };
        let run = |t: &Tensor, c: &mut [KvCache], tables: &[RopeTables]| step.step(t, c, tables, greedy);
        self.graph.step(self.model.device(), tokens, rows, cache, shape, run, greedy)
    }
}

impl LanguageModel for Graphed {
    fn forward(&self, tokens: &Tensor, cache: &mut [KvCache], last_only: bool) -> Result<Tensor> {
        if last_only {
            if let Some(Replayed::Logits(logits)) = self.replay(Some(tokens), tokens.dim(0)?, cache, false)? {
                return Ok(logits);
            }
        }
        self.model.forward(tokens, cache, last_only)
    }

    fn greedy_step(
        &self,
        tokens: Option<&Tensor>,
        rows: usize,
        cache: &mut [KvCache],
    ) -> Result<Option<Box<dyn PendingTokens>>> {
        if let Some(Replayed::Tokens(picked)) = self.replay(tokens, rows, cache, true)? {
            return Ok(Some(Box::new(picked)));
        }
        self.model.greedy_step(tokens, rows, cache)
    }

    fn graph_step(&self) -> Option<&dyn GraphStep> {
        self.model.graph_step()
    }

    fn make_cache(&self, max_kv_size: Option<usize>) -> Vec<KvCache> {
        self.model.make_cache(max_kv_size)
    }

    fn max_context(&self) -> Option<usize> {
        self.model.max_context()
    }

    fn vocab_size(&self) -> usize {
        self.model.vocab_size()
    }

    fn dtype(&self) -> DType {
        self.model.dtype()
    }

    fn device(&self) -> &Device {
        self.model.device()
    }
}
