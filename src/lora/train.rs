//! Training adapters (`wick lora`): mlx_lm's loss, batching, optimizers, learning-rate
//! schedules and training loop.

use crate::models::LanguageModel;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, D};

/// mlx_lm's `default_loss`: mean cross-entropy of predicting `batch[:, 1:]` from
/// `batch[:, :-1]`, over the target positions `t` (1-based) with `offset ≤ t ≤ length` of each
/// row's `(offset, length)`. Returns the loss (a scalar, f32) and the number of tokens in it.
pub fn loss(model: &dyn LanguageModel, batch: &Tensor, lengths: &[(usize, usize)]) -> Result<(Tensor, usize)> {
    let (b, t) = batch.dims2()?;
    if lengths.len() != b || t < 2 {
        bail!("loss: a batch of {b} rows of {t} tokens with {} lengths", lengths.len());
    }
    let inputs = batch.narrow(1, 0, t - 1)?;
    let targets = batch.narrow(1, 1, t - 1)?.contiguous()?;
    let mut cache = model.make_cache(None);
    let logits = model.forward(&inputs, &mut cache, false)?.to_dtype(DType::F32)?;
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let picked = logp.gather(&targets.unsqueeze(2)?, 2)?.squeeze(2)?; // (B, T-1)
    let mut mask = vec![0f32; b * (t - 1)];
    let mut ntoks = 0;
    for (row, &(offset, length)) in lengths.iter().enumerate() {
        for j in 0..t - 1 {
            let step = j + 1;
            if step >= offset && step <= length {
                mask[row * (t - 1) + j] = 1.0;
                ntoks += 1;
            }
        }
    }
    if ntoks == 0 {
        bail!("loss: the batch has no target tokens (every position is masked)");
    }
    let mask = Tensor::from_vec(mask, (b, t - 1), &Device::Cpu)?.to_device(batch.device())?;
    let ce = (picked * mask)?.sum_all()?.neg()?;
    Ok(((ce / ntoks as f64)?, ntoks))
}

use super::data::{self, Dataset, Features, NumpyRandom};
use super::optim::{self, Optimizer, Schedule};
use crate::io::output::write_file_atomic;
use crate::nn::lora::{AdapterConfig, Adapters, FineTuneType, LoraParameters, ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use anyhow::Context;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};

/// mlx_lm.lora's `CONFIG_DEFAULTS` (the model defaults to wick's default model, and data must
/// be a local folder).
pub fn defaults() -> Map<String, Value> {
    let v = json!({
        "train": false,
        "data": "data",
        "fine_tune_type": "lora",
        "optimizer": "adam",
        "optimizer_config": {"adam": {}, "adamw": {}, "sgd": {}},
        "seed": 0,
        "num_layers": 16,
        "batch_size": 4,
        "iters": 1000,
        "val_batches": 25,
        "learning_rate": 1e-5,
        "steps_per_report": 10,
        "steps_per_eval": 200,
        "resume_adapter_file": null,
        "adapter_path": "adapters",
        "save_every": 100,
        "test": false,
        "test_batches": 500,
        "max_seq_length": 2048,
        "grad_checkpoint": false,
        "grad_accumulation_steps": 1,
        "lr_schedule": null,
        "lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 20.0},
        "mask_prompt": false,
    });
    v.as_object().cloned().expect("an object")
}

/// Everything a training run needs, read from mlx_lm's keys (defaults < `--config` file <
/// command-line flags).
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub model: Option<String>,
    pub train: bool,
    pub data: PathBuf,
    pub fine_tune_type: FineTuneType,
    pub optimizer: String,
    pub optimizer_config: Value,
    pub mask_prompt: bool,
    pub num_layers: i64,
    pub batch_size: usize,
    pub iters: usize,
    pub val_batches: i64,
    pub learning_rate: f64,
    pub steps_per_report: usize,
    pub steps_per_eval: usize,
    pub resume_adapter_file: Option<PathBuf>,
    pub adapter_path: PathBuf,
    pub save_every: usize,
    pub test: bool,
    pub test_batches: i64,
    pub max_seq_length: usize,
    pub grad_checkpoint: bool,
    pub grad_accumulation_steps: usize,
    pub seed: u64,
    pub lr_schedule: Option<Value>,
    pub lora: LoraParameters,
    pub features: Features,
    /// All keys, as written to adapter_config.json.
    pub raw: Map<String, Value>,
}

impl TrainConfig {
    /// Reads the merged keys; `what` names where they came from in errors.
    pub fn from_map(raw: Map<String, Value>, what: &str) -> Result<Self> {
        let get = |k: &str| raw.get(k).filter(|v| !v.is_null());
        let boolean = |k: &str| -> Result<bool> {
            match get(k) {
                None => Ok(false),
                Some(v) => v.as_bool().with_context(|| format!("{what}: `{k}` must be true or false")),
            }
        };
        let count = |k: &str, min: i64| -> Result<i64> {
            let v = get(k).with_context(|| format!("{what}: missing `{k}`"))?;
            let n = v.as_i64().with_context(|| format!("{what}: `{k}` must be an integer, got {v}"))?;
            if n < min {
                bail!("{what}: `{k}` must be at least {min}, got {n}");
            }
            Ok(n)
        };
        let string = |k: &str| -> Result<Option<String>> {
            match get(k) {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(v) => bail!("{what}: `{k}` must be a string, got {v}"),
            }
        };
        let learning_rate = get("learning_rate")
            .and_then(|v| v.as_f64())
            .with_context(|| format!("{what}: `learning_rate` must be a number"))?;
        let fine_tune_type = FineTuneType::parse(&string("fine_tune_type")?.unwrap_or_else(|| "lora".into()))
            .with_context(|| what.to_string())?;
        let lora = LoraParameters::from_json(get("lora_parameters").unwrap_or(&json!({})), what)?;
        let features = Features {
            text: string("text_feature")?.unwrap_or_else(|| "text".into()),
            prompt: string("prompt_feature")?.unwrap_or_else(|| "prompt".into()),
            completion: string("completion_feature")?.unwrap_or_else(|| "completion".into()),
            chat: string("chat_feature")?.unwrap_or_else(|| "messages".into()),
        };
        Ok(Self {
            model: string("model")?,
            train: boolean("train")?,
            data: PathBuf::from(string("data")?.unwrap_or_else(|| "data".into())),
            fine_tune_type,
            optimizer: string("optimizer")?.unwrap_or_else(|| "adam".into()),
            optimizer_config: get("optimizer_config").cloned().unwrap_or(json!({})),
            mask_prompt: boolean("mask_prompt")?,
            num_layers: count("num_layers", -1)?,
            batch_size: count("batch_size", 1)? as usize,
            iters: count("iters", 0)? as usize,
            val_batches: count("val_batches", -1)?,
            learning_rate,
            steps_per_report: count("steps_per_report", 1)? as usize,
            steps_per_eval: count("steps_per_eval", 1)? as usize,
            resume_adapter_file: string("resume_adapter_file")?.map(PathBuf::from),
            adapter_path: PathBuf::from(string("adapter_path")?.unwrap_or_else(|| "adapters".into())),
            save_every: count("save_every", 1)? as usize,
            test: boolean("test")?,
            test_batches: count("test_batches", -1)?,
            max_seq_length: count("max_seq_length", 2)? as usize,
            grad_checkpoint: boolean("grad_checkpoint")?,
            grad_accumulation_steps: count("grad_accumulation_steps", 1)? as usize,
            seed: count("seed", 0)? as u64,
            lr_schedule: get("lr_schedule").cloned(),
            lora,
            features,
            raw,
        })
    }

    fn adapter_config(&self) -> AdapterConfig {
        AdapterConfig {
            fine_tune_type: self.fine_tune_type,
            num_layers: self.num_layers,
            lora: self.lora.clone(),
            raw: Value::Object(self.raw.clone()),
        }
    }
}

/// One reported training interval (mlx_lm's `on_train_loss_report`).
#[derive(Debug, Clone)]
pub struct TrainReport {
    pub iteration: usize,
    pub train_loss: f64,
    pub learning_rate: f64,
    pub iterations_per_second: f64,
    pub tokens_per_second: f64,
    pub trained_tokens: usize,
    pub peak_memory_gb: f64,
}

/// What a run produced: the reports, validation losses `(iteration, loss)` and the test loss.
#[derive(Debug, Clone, Default)]
pub struct TrainOutcome {
    pub reports: Vec<TrainReport>,
    pub val_losses: Vec<(usize, f64)>,
    pub test_loss: Option<f64>,
}

/// Batches over a dataset in mlx_lm's order: a fresh permutation of the batches from the shared
/// generator each time an epoch starts (drawn when the epoch's first batch is asked for).
struct BatchIter<'a> {
    data: &'a Dataset,
    batches: Vec<Vec<usize>>,
    order: Vec<usize>,
    pos: usize,
    looping: bool,
    max_seq_length: usize,
}

impl<'a> BatchIter<'a> {
    fn new(data: &'a Dataset, batch_size: usize, max_seq_length: usize, looping: bool, what: &str) -> Result<Self> {
        let batches = data::batch_indices(data, batch_size, what)?;
        Ok(Self { data, batches, order: vec![], pos: usize::MAX, looping, max_seq_length })
    }

    fn next(&mut self, rng: &mut NumpyRandom) -> Option<data::Batch> {
        if self.pos >= self.order.len() {
            if self.pos != usize::MAX && !self.looping {
                return None;
            }
            self.order = rng.permutation(self.batches.len());
            self.pos = 0;
        }
        let b = &self.batches[self.order[self.pos]];
        self.pos += 1;
        Some(data::make_batch(self.data, b, self.max_seq_length))
    }
}

fn batch_tensor(b: &data::Batch, device: &Device) -> Result<Tensor> {
    let rows = b.lengths.len();
    Ok(Tensor::from_vec(b.tokens.clone(), (rows, b.width), device)?)
}

/// mlx_lm's `evaluate`: the token-weighted mean loss over `num_batches` batches (-1: all).
fn evaluate(
    model: &dyn LanguageModel,
    data: &Dataset,
    cfg: &TrainConfig,
    num_batches: i64,
    rng: &mut NumpyRandom,
    what: &str,
) -> Result<f64> {
    let mut it = BatchIter::new(data, cfg.batch_size, cfg.max_seq_length, false, what)?;
    let (mut total, mut ntoks) = (0f64, 0usize);
    let mut done = 0i64;
    while num_batches < 0 || done < num_batches {
        let Some(b) = it.next(rng) else { break };
        let (l, n) = loss(model, &batch_tensor(&b, model.device())?, &b.lengths)?;
        total += l.to_dtype(DType::F64)?.to_scalar::<f64>()? * n as f64;
        ntoks += n;
        done += 1;
    }
    if ntoks == 0 {
        bail!("{what}: no batches to evaluate");
    }
    Ok(total / ntoks as f64)
}

/// Writes the trainable tensors to `path` atomically (temporary file, then rename).
pub fn save_adapters(vars: &[(String, candle_core::Var)], path: &Path) -> Result<()> {
    let map: std::collections::HashMap<String, Tensor> =
        vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().detach())).collect();
    write_file_atomic(path, |tmp| Ok(candle_core::safetensors::save(&map, tmp)?))
}

/// Sums of parameters as mlx_lm counts them (a quantized weight as its unpacked size).
fn total_parameters(dir: &Path) -> Result<usize> {
    let w = crate::io::Weights::open(dir)?;
    let cfg = crate::io::ConfigFile::read(dir)?;
    let bits = crate::quant::QuantSpec::from_config(&cfg.value, "config.json")?.map(|q| q.default.bits);
    let mut n = 0;
    for name in w.names() {
        let count: usize = w.shape(name)?.iter().product();
        if name.ends_with(".scales") || name.ends_with(".biases") {
            continue;
        }
        n += match (w.dtype(name)?, bits) {
            (DType::U32, Some(b)) => count * 32 / b,
            _ => count,
        };
    }
    Ok(n)
}

/// `wick lora`: train (and/or test) adapters as mlx_lm.lora does. `log` gets every report line.
pub fn run(cfg: &TrainConfig, model_dir: &Path, device: &Device, log: &mut dyn FnMut(&str)) -> Result<TrainOutcome> {
    if cfg.grad_checkpoint && cfg.lora.dropout > 0.0 {
        bail!("--grad-checkpoint with lora_parameters.dropout > 0 is not supported: the recomputed pass would draw another dropout mask");
    }
    if !cfg.data.is_dir() {
        bail!(
            "--data {}: no such folder (wick reads a local folder with train.jsonl / valid.jsonl / test.jsonl; Hugging Face datasets are not supported)",
            cfg.data.display()
        );
    }
    let tok = crate::tokenizer::Tokenizer::load(model_dir)?;
    let schedule = match &cfg.lr_schedule {
        Some(s) => Schedule::from_config(s)?,
        None => Schedule::Constant(cfg.learning_rate),
    };
    let name = cfg.optimizer.to_ascii_lowercase();
    let mut opt = Optimizer::new(&name, cfg.optimizer_config.get(&name), schedule)?;
    let config = crate::io::ConfigFile::read(model_dir)?;
    let total_layers = config
        .value
        .get("num_hidden_layers")
        .and_then(|v| v.as_u64())
        .context("config.json: missing `num_hidden_layers`")? as usize;
    let train_adapter_file = cfg.adapter_path.join(ADAPTER_WEIGHTS);
    // testing only: the trained adapters; training: fresh (or resumed) ones
    let resume = if cfg.train { cfg.resume_adapter_file.clone() } else { Some(train_adapter_file.clone()) };
    if let Some(r) = &resume {
        log(&format!("Loading fine-tuned weights from {}", r.display()));
    }
    let adapters =
        Adapters::for_training(&cfg.adapter_path, cfg.adapter_config(), total_layers, resume.as_deref(), cfg.seed)?;
    log("Loading pretrained model");
    let loaded = crate::engine::load_model_adapted(model_dir, None, device, Some(&adapters))?;
    let model = loaded.model.as_ref();
    let vars = adapters.trainable();
    let trainable: usize = vars.iter().map(|(_, v)| v.as_tensor().elem_count()).sum();
    // LoRA / DoRA tensors are added to the model; full fine-tuning trains the model's own
    let added = if cfg.fine_tune_type == FineTuneType::Full { 0 } else { trainable };
    let total = total_parameters(model_dir)? + added;
    log(&format!(
        "Trainable parameters: {:.3}% ({:.3}M/{:.3}M)",
        100.0 * trainable as f64 / total as f64,
        trainable as f64 / 1e6,
        total as f64 / 1e6
    ));

    log("Loading datasets");
    let feats = &cfg.features;
    let train_set = data::load_split(&cfg.data, "train", &tok, feats, cfg.mask_prompt)?;
    let valid_set = data::load_split(&cfg.data, "valid", &tok, feats, cfg.mask_prompt)?;
    let test_set = data::load_split(&cfg.data, "test", &tok, feats, cfg.mask_prompt)?;
    let mut rng = NumpyRandom::new(cfg.seed as u32);
    let mut out = TrainOutcome::default();

    if cfg.train {
        let train_set = train_set.with_context(|| format!("--train needs {}/train.jsonl", cfg.data.display()))?;
        let valid_set = valid_set.with_context(|| format!("--train needs {}/valid.jsonl", cfg.data.display()))?;
        std::fs::create_dir_all(&cfg.adapter_path)
            .with_context(|| format!("cannot create --adapter-path {}", cfg.adapter_path.display()))?;
        let text = serde_json::to_string_pretty(&Value::Object(cfg.raw.clone()))? + "\n";
        write_file_atomic(&cfg.adapter_path.join(ADAPTER_CONFIG), |tmp| Ok(std::fs::write(tmp, &text)?))?;
        log("Training");
        let plain: Vec<candle_core::Var> = vars.iter().map(|(_, v)| v.clone()).collect();
        crate::models::checkpoint::enable(if cfg.grad_checkpoint { &plain } else { &[] });
        let trained = train_loop(model, &vars, &mut opt, &train_set, &valid_set, cfg, &mut rng, &mut out, log);
        crate::models::checkpoint::enable(&[]);
        trained?;
        save_adapters(&vars, &train_adapter_file)?;
        log(&format!("Saved final weights to {}.", train_adapter_file.display()));
        write_loss_plot(&cfg.adapter_path.join("loss.svg"), &out)?;
    }
    if cfg.test {
        log("Testing");
        let test_set = test_set.with_context(|| format!("--test needs {}/test.jsonl", cfg.data.display()))?;
        let l = evaluate(model, &test_set, cfg, cfg.test_batches, &mut rng, "test.jsonl")?;
        log(&format!("Test loss {l:.3}, Test ppl {:.3}.", l.exp()));
        out.test_loss = Some(l);
    }
    if !cfg.train && !cfg.test {
        bail!("nothing to do: pass --train and/or --test");
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn train_loop(
    model: &dyn LanguageModel,
    vars: &[(String, candle_core::Var)],
    opt: &mut Optimizer,
    train_set: &Dataset,
    valid_set: &Dataset,
    cfg: &TrainConfig,
    rng: &mut NumpyRandom,
    out: &mut TrainOutcome,
    log: &mut dyn FnMut(&str),
) -> Result<()> {
    let bar = indicatif::ProgressBar::new(cfg.iters as u64);
    bar.set_style(indicatif::ProgressStyle::with_template("training {bar:40} {pos}/{len} it {msg}")?);
    let mut logln = |s: &str| bar.suspend(|| log(s));
    let mut batches = BatchIter::new(train_set, cfg.batch_size, cfg.max_seq_length, true, "train.jsonl")?;
    let (mut losses, mut n_tokens, mut steps, mut trained_tokens) = (0f64, 0usize, 0usize, 0usize);
    let mut train_time = 0f64;
    let mut accum: Option<Vec<Option<Tensor>>> = None;
    crate::nn::lora::set_training(true);
    let result = (|| -> Result<()> {
        for it in 1..=cfg.iters {
            let batch = batches.next(rng).expect("looping");
            if let Some(longest) = batch.truncated {
                logln(&format!(
                    "[WARNING] Some sequences are longer than {} tokens. The longest sentence {longest} will be truncated to {}. Consider pre-splitting your data to save memory.",
                    cfg.max_seq_length, cfg.max_seq_length
                ));
            }
            if it == 1 || it % cfg.steps_per_eval == 0 || it == cfg.iters {
                let tic = std::time::Instant::now();
                crate::nn::lora::set_training(false);
                let val = evaluate(model, valid_set, cfg, cfg.val_batches, rng, "valid.jsonl")?;
                crate::nn::lora::set_training(true);
                let secs = tic.elapsed().as_secs_f64();
                logln(&format!("Iter {it}: Val loss {val:.3}, Val took {secs:.3}s"));
                out.val_losses.push((it, val));
            }
            let tic = std::time::Instant::now();
            let x = batch_tensor(&batch, model.device())?;
            let (l, n) = loss(model, &x, &batch.lengths)?;
            let grads = gradients(vars, &l)?;
            let l = l.detach();
            let grads = match accum.take() {
                None => grads,
                Some(prev) => prev
                    .into_iter()
                    .zip(grads)
                    .map(|(a, b)| match (a, b) {
                        (Some(a), Some(b)) => Ok(Some((a + b)?)),
                        (a, b) => Ok(a.or(b)),
                    })
                    .collect::<Result<Vec<_>>>()?,
            };
            if it % cfg.grad_accumulation_steps == 0 {
                let k = cfg.grad_accumulation_steps as f64;
                let grads = if k > 1.0 {
                    grads.into_iter().map(|g| g.map(|g| g / k).transpose()).collect::<candle_core::Result<Vec<_>>>()?
                } else {
                    grads
                };
                opt.update(vars, &grads)?;
            } else {
                accum = Some(grads);
            }
            losses += l.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            n_tokens += n;
            steps += 1;
            train_time += tic.elapsed().as_secs_f64();
            bar.inc(1);
            if it % cfg.steps_per_report == 0 || it == cfg.iters {
                let train_loss = losses / steps as f64;
                trained_tokens += n_tokens;
                let r = TrainReport {
                    iteration: it,
                    train_loss,
                    learning_rate: opt.last_lr,
                    iterations_per_second: cfg.steps_per_report as f64 / train_time,
                    tokens_per_second: n_tokens as f64 / train_time,
                    trained_tokens,
                    peak_memory_gb: crate::backend::memory::peak_memory_gb(),
                };
                logln(&format!(
                    "Iter {it}: Train loss {:.3}, Learning Rate {}, It/sec {:.3}, Tokens/sec {:.3}, Trained Tokens {}, Peak mem {:.3} GB",
                    r.train_loss,
                    python_exp(r.learning_rate),
                    r.iterations_per_second,
                    r.tokens_per_second,
                    r.trained_tokens,
                    r.peak_memory_gb
                ));
                out.reports.push(r);
                (losses, n_tokens, steps, train_time) = (0.0, 0, 0, 0.0);
            }
            if it % cfg.save_every == 0 {
                let file = cfg.adapter_path.join(ADAPTER_WEIGHTS);
                save_adapters(vars, &file)?;
                let checkpoint = cfg.adapter_path.join(format!("{it:07}_adapters.safetensors"));
                save_adapters(vars, &checkpoint)?;
                logln(&format!("Iter {it}: Saved adapter weights to {} and {}.", file.display(), checkpoint.display()));
            }
        }
        Ok(())
    })();
    crate::nn::lora::set_training(false);
    bar.finish_and_clear();
    result
}

/// A loss-curve SVG: training loss per report and validation loss per evaluation.
pub fn write_loss_plot(path: &Path, out: &TrainOutcome) -> Result<()> {
    let train: Vec<(f64, f64)> = out.reports.iter().map(|r| (r.iteration as f64, r.train_loss)).collect();
    let val: Vec<(f64, f64)> = out.val_losses.iter().map(|(i, l)| (*i as f64, *l)).collect();
    let all: Vec<&(f64, f64)> = train.iter().chain(&val).collect();
    if all.is_empty() {
        return Ok(());
    }
    let (w, h, pad) = (640.0, 400.0, 50.0);
    let xmax = all.iter().map(|p| p.0).fold(1.0, f64::max);
    let ymin = all.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let ymax = all.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let span = (ymax - ymin).max(1e-9);
    let pt = |(x, y): &(f64, f64)| {
        format!("{:.1},{:.1}", pad + x / xmax * (w - 2.0 * pad), h - pad - (y - ymin) / span * (h - 2.0 * pad))
    };
    let line = |pts: &[(f64, f64)], color: &str| {
        let p: Vec<String> = pts.iter().map(pt).collect();
        format!(r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#, p.join(" "))
    };
    let svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<line x1="{pad}" y1="{b}" x2="{r}" y2="{b}" stroke="black"/><line x1="{pad}" y1="{pad}" x2="{pad}" y2="{b}" stroke="black"/>
<text x="{pad}" y="{t}">loss {ymax:.3}</text><text x="{pad}" y="{bl}">{ymin:.3}</text><text x="{r}" y="{bl}" text-anchor="end">iteration {xmax}</text>
{tl}
{vl}
<text x="{r}" y="{t}" text-anchor="end" fill="steelblue">train</text><text x="{r}" y="{t2}" text-anchor="end" fill="darkorange">validation</text>
</svg>
"#,
        b = h - pad,
        r = w - pad,
        t = pad - 10.0,
        t2 = pad + 5.0,
        bl = h - pad + 20.0,
        tl = line(&train, "steelblue"),
        vl = line(&val, "darkorange"),
    );
    write_file_atomic(path, |tmp| Ok(std::fs::write(tmp, &svg)?))
}

/// Python's `f"{x:.3e}"`: a signed exponent of at least two digits (`1.000e-05`).
fn python_exp(x: f64) -> String {
    let s = format!("{x:.3e}");
    match s.split_once('e') {
        Some((m, e)) => {
            let (sign, digits) = match e.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', e),
            };
            format!("{m}e{sign}{digits:0>2}")
        }
        None => s,
    }
}

/// The gradients of `loss` for `vars`: the backward pass's, plus what checkpointed layers
/// found in their inner passes.
pub fn gradients(vars: &[(String, candle_core::Var)], loss: &Tensor) -> Result<Vec<Option<Tensor>>> {
    let outer = optim::collect(vars, &loss.backward()?);
    outer
        .into_iter()
        .zip(vars)
        .map(|(g, (_, v))| {
            Ok(match (g, crate::models::checkpoint::take_grads(v)) {
                (Some(a), Some(b)) => Some((a + b)?),
                (a, b) => a.or(b),
            })
        })
        .collect()
}
