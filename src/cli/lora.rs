//! `wick lora`: mlx_lm.lora's flags and YAML `--config` — train LoRA / DoRA adapters on a
//! folder of jsonl data, report as mlx_lm does, checkpoint, test.

use crate::lora::train::{self, TrainConfig};
use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Map, Value};

#[derive(Args, Debug)]
pub struct LoraArgs {
    /// Model folder, .gguf file or repo id (default: the default model)
    #[arg(long)]
    pub model: Option<String>,
    /// Branch, tag or commit of a repo id given to --model
    #[arg(long)]
    pub revision: Option<String>,
    /// cpu, cuda, cuda:N, metal or auto
    #[arg(long)]
    pub device: Option<String>,
    /// Do training
    #[arg(long)]
    pub train: bool,
    /// Folder with train.jsonl, valid.jsonl and/or test.jsonl
    #[arg(long)]
    pub data: Option<String>,
    /// Type of fine-tuning: lora or dora (full is not supported yet)
    #[arg(long, value_parser = ["lora", "dora", "full"])]
    pub fine_tune_type: Option<String>,
    /// Optimizer: adam, adamw or sgd
    #[arg(long, value_parser = ["adam", "adamw", "muon", "sgd", "adafactor"])]
    pub optimizer: Option<String>,
    /// Mask the prompt in the loss when training
    #[arg(long)]
    pub mask_prompt: bool,
    /// Number of layers to fine-tune, counted from the last (-1: all)
    #[arg(long, allow_hyphen_values = true)]
    pub num_layers: Option<i64>,
    /// Minibatch size
    #[arg(long)]
    pub batch_size: Option<i64>,
    /// Iterations to train for
    #[arg(long)]
    pub iters: Option<i64>,
    /// Number of validation batches, -1 uses the entire validation set
    #[arg(long, allow_hyphen_values = true)]
    pub val_batches: Option<i64>,
    /// Learning rate
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// Number of training steps between loss reporting
    #[arg(long)]
    pub steps_per_report: Option<i64>,
    /// Number of training steps between validations
    #[arg(long)]
    pub steps_per_eval: Option<i64>,
    /// Number of steps to accumulate before each optimizer update
    #[arg(long)]
    pub grad_accumulation_steps: Option<i64>,
    /// Adapter weights to start training from
    #[arg(long)]
    pub resume_adapter_file: Option<String>,
    /// Where to save the adapter weights and config
    #[arg(long)]
    pub adapter_path: Option<String>,
    /// Save the adapters every N iterations
    #[arg(long)]
    pub save_every: Option<i64>,
    /// Evaluate on the test set after training
    #[arg(long)]
    pub test: bool,
    /// Number of test set batches, -1 uses the entire test set
    #[arg(long, allow_hyphen_values = true)]
    pub test_batches: Option<i64>,
    /// Maximum sequence length
    #[arg(long)]
    pub max_seq_length: Option<i64>,
    /// A YAML configuration file with the training options
    #[arg(long, short = 'c')]
    pub config: Option<std::path::PathBuf>,
    /// Use gradient checkpointing to reduce memory use
    #[arg(long)]
    pub grad_checkpoint: bool,
    /// Accepted for mlx_lm compatibility (mlx's allocator cache; nothing to clear in wick)
    #[arg(long)]
    pub clear_cache_threshold: Option<String>,
    /// Report to a service (wandb, swanlab): not supported by wick
    #[arg(long)]
    pub report_to: Option<String>,
    /// Project name for --report-to
    #[arg(long)]
    pub project_name: Option<String>,
    /// The PRNG seed
    #[arg(long)]
    pub seed: Option<i64>,
    /// Accepted for mlx_lm compatibility; wick runs no remote code
    #[arg(long)]
    pub trust_remote_code: bool,
}

/// A YAML document as JSON (mapping keys as strings; YAML 1.1 float forms like `1e-5` read as
/// numbers, as mlx_lm's loader reads them).
pub fn yaml_to_json(y: &yaml_rust2::Yaml) -> Result<Value> {
    use yaml_rust2::Yaml;
    Ok(match y {
        Yaml::Real(s) => json!(s.parse::<f64>().with_context(|| format!("not a number: {s}"))?),
        Yaml::Integer(i) => json!(i),
        Yaml::String(s) => match s.parse::<f64>() {
            Ok(f) if s.contains(['e', 'E']) && !s.chars().any(|c| c.is_alphabetic() && c != 'e' && c != 'E') => {
                json!(f)
            }
            _ => json!(s),
        },
        Yaml::Boolean(b) => json!(b),
        Yaml::Array(a) => Value::Array(a.iter().map(yaml_to_json).collect::<Result<_>>()?),
        Yaml::Hash(h) => {
            let mut m = Map::new();
            for (k, v) in h {
                let key = match k {
                    Yaml::String(s) => s.clone(),
                    Yaml::Integer(i) => i.to_string(),
                    other => bail!("unsupported mapping key {other:?}"),
                };
                m.insert(key, yaml_to_json(v)?);
            }
            Value::Object(m)
        }
        Yaml::Null => Value::Null,
        other => bail!("unsupported YAML value {other:?}"),
    })
}

fn read_config(path: &std::path::Path) -> Result<Map<String, Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("--config: cannot read {}", path.display()))?;
    let docs = yaml_rust2::YamlLoader::load_from_str(&text)
        .map_err(|e| anyhow::anyhow!("--config {}: invalid YAML: {e}", path.display()))?;
    match docs.first().map(yaml_to_json).transpose().with_context(|| format!("--config {}", path.display()))? {
        Some(Value::Object(m)) => Ok(m),
        None | Some(Value::Null) => Ok(Map::new()),
        Some(_) => bail!("--config {}: expected a mapping of options", path.display()),
    }
}

/// mlx_lm's precedence: a flag given on the command line, else the config file's key, else
/// the default.
pub fn merged(a: &LoraArgs) -> Result<Map<String, Value>> {
    let mut m = train::defaults();
    if let Some(p) = &a.config {
        eprintln!("Loading configuration file {}", p.display());
        for (k, v) in read_config(p)? {
            m.insert(k, v);
        }
    }
    let mut set = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            m.insert(k.to_string(), v);
        }
    };
    set("model", a.model.clone().map(Value::from));
    set("data", a.data.clone().map(Value::from));
    set("fine_tune_type", a.fine_tune_type.clone().map(Value::from));
    set("optimizer", a.optimizer.clone().map(Value::from));
    set("num_layers", a.num_layers.map(Value::from));
    set("batch_size", a.batch_size.map(Value::from));
    set("iters", a.iters.map(Value::from));
    set("val_batches", a.val_batches.map(Value::from));
    set("learning_rate", a.learning_rate.map(Value::from));
    set("steps_per_report", a.steps_per_report.map(Value::from));
    set("steps_per_eval", a.steps_per_eval.map(Value::from));
    set("grad_accumulation_steps", a.grad_accumulation_steps.map(Value::from));
    set("resume_adapter_file", a.resume_adapter_file.clone().map(Value::from));
    set("adapter_path", a.adapter_path.clone().map(Value::from));
    set("save_every", a.save_every.map(Value::from));
    set("test_batches", a.test_batches.map(Value::from));
    set("max_seq_length", a.max_seq_length.map(Value::from));
    set("seed", a.seed.map(Value::from));
    // store_true flags: only a given flag overrides the file
    for (k, on) in
        [("train", a.train), ("test", a.test), ("mask_prompt", a.mask_prompt), ("grad_checkpoint", a.grad_checkpoint)]
    {
        if on {
            m.insert(k.into(), json!(true));
        }
    }
    Ok(m)
}

pub fn run(a: LoraArgs) -> Result<i32> {
    if a.report_to.is_some() {
        bail!("--report-to: wick does not report to external services; the loss curve is written to --adapter-path/loss.svg");
    }
    let cfg = TrainConfig::from_map(merged(&a)?, "training options")?;
    let device = crate::backend::device::select_device(a.device.as_deref())?;
    let src = crate::hub::ModelSource::resolve(cfg.model.as_deref(), a.revision.as_deref(), None)?;
    crate::backend::device::init_threads();
    train::run(&cfg, &src.dir, &device, &mut |s| eprintln!("{s}"))?;
    Ok(0)
}
