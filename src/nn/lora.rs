//! LoRA and DoRA adapters in mlx_lm's format: `adapter_config.json` (mlx_lm.lora's arguments)
//! and `adapters.safetensors` (`{layer}.lora_a` (in × rank), `{layer}.lora_b` (rank × out), and
//! for DoRA `{layer}.m` (out)). Loading wraps each adapted [`Linear`] in a [`LoraLinear`];
//! `fuse` folds adapters into a model folder. Full fine-tuning adapters hold whole weights and
//! are laid over the model's own.

use crate::io::Weights;
use crate::nn::Linear;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The adapter folder's config file.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// The adapter folder's weights file.
pub const ADAPTER_WEIGHTS: &str = "adapters.safetensors";

/// mlx_lm's `fine_tune_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FineTuneType {
    Lora,
    Dora,
    Full,
}

impl FineTuneType {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "lora" => Self::Lora,
            "dora" => Self::Dora,
            "full" => Self::Full,
            other => bail!("fine_tune_type `{other}` is not one of lora, dora, full"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Lora => "lora",
            Self::Dora => "dora",
            Self::Full => "full",
        }
    }
}

/// mlx_lm's `lora_parameters`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraParameters {
    pub rank: usize,
    pub scale: f64,
    pub dropout: f64,
    /// Layer paths inside a block (`self_attn.q_proj`) to adapt; `None`: every linear layer.
    pub keys: Option<Vec<String>>,
}

impl Default for LoraParameters {
    /// mlx_lm.lora's defaults.
    fn default() -> Self {
        Self { rank: 8, scale: 20.0, dropout: 0.0, keys: None }
    }
}

impl LoraParameters {
    /// Reads a `lora_parameters` object; `what` names it in errors.
    pub fn from_json(v: &Value, what: &str) -> Result<Self> {
        let o = v.as_object().with_context(|| format!("{what}: `lora_parameters` must be an object"))?;
        let num = |k: &str| -> Result<Option<f64>> {
            match o.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => {
                    x.as_f64().map(Some).with_context(|| format!("{what}: `lora_parameters.{k}` must be a number"))
                }
            }
        };
        let scale = match num("scale")? {
            Some(s) => s,
            None if o.contains_key("alpha") => bail!(
                "{what}: `lora_parameters` has `alpha` but no `scale` — mlx_lm's LoRA config uses `scale` (the factor on the low-rank update), not `alpha`"
            ),
            None => bail!("{what}: `lora_parameters` is missing `scale`"),
        };
        let rank = num("rank")?.with_context(|| format!("{what}: `lora_parameters` is missing `rank`"))?;
        if rank < 1.0 || rank.fract() != 0.0 {
            bail!("{what}: `lora_parameters.rank` must be a positive integer, got {rank}");
        }
        let dropout = num("dropout")?.unwrap_or(0.0);
        if !(0.0..1.0).contains(&dropout) {
            bail!("{what}: `lora_parameters.dropout` must be in [0, 1), got {dropout}");
        }
        let keys = match o.get("keys") {
            None | Some(Value::Null) => None,
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|k| k.as_str().map(String::from))
                    .collect::<Option<Vec<_>>>()
                    .with_context(|| format!("{what}: `lora_parameters.keys` must be a list of strings"))?,
            ),
            Some(_) => bail!("{what}: `lora_parameters.keys` must be a list of strings"),
        };
        Ok(Self { rank: rank as usize, scale, dropout, keys })
    }

    pub fn to_json(&self) -> Value {
        let mut o = serde_json::json!({"rank": self.rank, "scale": self.scale, "dropout": self.dropout});
        if let Some(k) = &self.keys {
            o["keys"] = serde_json::json!(k);
        }
        o
    }
}

/// What an adapter folder's `adapter_config.json` says about the adapters.
#[derive(Debug, Clone)]
pub struct AdapterConfig {
    pub fine_tune_type: FineTuneType,
    /// Blocks adapted, counted from the last (-1: all).
    pub num_layers: i64,
    pub lora: LoraParameters,
    /// The whole file (mlx_lm writes all its training arguments there).
    pub raw: Value,
}

impl AdapterConfig {
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(ADAPTER_CONFIG);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!("cannot read {} (an adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})", path.display())
        })?;
        let raw: Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
        let what = path.display().to_string();
        if !raw.is_object() {
            bail!("{what}: expected a JSON object");
        }
        let fine_tune_type = match raw.get("fine_tune_type") {
            None | Some(Value::Null) => FineTuneType::Lora,
            Some(Value::String(s)) => FineTuneType::parse(s).with_context(|| what.clone())?,
            Some(_) => bail!("{what}: `fine_tune_type` must be a string"),
        };
        let num_layers = match raw.get("num_layers") {
            Some(v) => v.as_i64().with_context(|| format!("{what}: `num_layers` must be an integer"))?,
            None if fine_tune_type == FineTuneType::Full => -1,
            None => bail!("{what}: missing `num_layers`"),
        };
        let lora = match raw.get("lora_parameters") {
            Some(v) => LoraParameters::from_json(v, &what)?,
            None if fine_tune_type == FineTuneType::Full => LoraParameters::default(),
            None => bail!("{what}: missing `lora_parameters`"),
        };
        Ok(Self { fine_tune_type, num_layers, lora, raw })
    }
}

/// Adapters for a model being built: read from an adapter folder (inference, fuse), or created
/// trainable for `wick lora` (fresh, or resumed from an adapter file). Each layer the model
/// builds asks [`Adapters::wrap`]; [`Adapters::finish`] then reports any tensor of the file that
/// no layer took, as mlx_lm's `load_adapters` does.
pub struct Adapters {
    /// The folder (or, when training, where adapters will be written).
    pub dir: PathBuf,
    pub config: AdapterConfig,
    /// The adapter tensors to load (the folder's file, or the file training resumes from).
    weights: Option<Weights>,
    used: Mutex<BTreeSet<String>>,
    train: Option<TrainInit>,
}

/// What creating trainable adapters needs.
struct TrainInit {
    /// Blocks in the model (the adapted ones are the last `num_layers`).
    total_layers: usize,
    rng: Mutex<rand::rngs::StdRng>,
    vars: Mutex<Vec<(String, candle_core::Var)>>,
}

impl TrainInit {
    /// A new LoRA `A` of `shape`: uniform in ±1/√`in_dim` (mlx_lm's initialisation), f32.
    fn uniform(&self, in_dim: usize, shape: &[usize], device: &Device) -> Result<Tensor> {
        use rand::Rng;
        let bound = 1.0 / (in_dim as f32).sqrt();
        let mut rng = self.rng.lock().unwrap();
        let v: Vec<f32> = (0..shape.iter().product()).map(|_| rng.random_range(-bound..bound)).collect();
        Ok(Tensor::from_vec(v, shape, device)?)
    }

    /// `t` as a trainable tensor named `name` (registered for the optimizer and the file).
    fn var(&self, name: String, t: Tensor) -> Result<Tensor> {
        let v = candle_core::Var::from_tensor(&t)?;
        let t = v.as_tensor().clone();
        self.vars.lock().unwrap().push((name, v));
        Ok(t)
    }
}

impl Adapters {
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("--adapter-path: the adapter folder {} does not exist", dir.display());
        }
        let config = AdapterConfig::read(dir)?;
        let file = dir.join(ADAPTER_WEIGHTS);
        if !file.is_file() {
            bail!("adapter folder {} has no {ADAPTER_WEIGHTS}", dir.display());
        }
        let weights = Some(Weights::open_file(&file)?);
        Ok(Self { dir: dir.to_path_buf(), config, weights, used: Mutex::new(BTreeSet::new()), train: None })
    }

    /// Trainable adapters for a model of `total_layers` blocks: A uniform in ±1/√in, B zero,
    /// DoRA's m the base rows' norms (mlx_lm's initialisation), or the tensors of `resume`.
    pub fn for_training(
        dir: &Path,
        config: AdapterConfig,
        total_layers: usize,
        resume: Option<&Path>,
        seed: u64,
    ) -> Result<Self> {
        let weights = match resume {
            Some(f) if !f.is_file() => bail!("--resume-adapter-file {} does not exist", f.display()),
            Some(f) => Some(Weights::open_file(f)?),
            None => None,
        };
        use rand::SeedableRng;
        let train = TrainInit {
            total_layers,
            rng: Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)),
            vars: Mutex::new(vec![]),
        };
        Ok(Self { dir: dir.to_path_buf(), config, weights, used: Mutex::new(BTreeSet::new()), train: Some(train) })
    }

    /// The adapters' weights (for full fine-tuning: whole model tensors).
    pub fn weights(&self) -> &Weights {
        self.weights.as_ref().expect("adapters read from a file")
    }

    /// The trainable tensors by name, in creation order (training mode).
    pub fn trainable(&self) -> Vec<(String, candle_core::Var)> {
        self.train.as_ref().map(|t| t.vars.lock().unwrap().clone()).unwrap_or_default()
    }

    fn file_name(&self) -> String {
        match &self.train {
            Some(_) => "--resume-adapter-file".to_string(),
            None => self.dir.join(ADAPTER_WEIGHTS).display().to_string(),
        }
    }

    fn take(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Option<Tensor>> {
        let Some(weights) = self.weights.as_ref().filter(|w| w.contains(name)) else {
            return Ok(None);
        };
        let stored = weights.shape(name)?;
        if stored != shape {
            bail!(
                "adapter tensor `{name}` in {} has shape {stored:?}, but the model's layer needs {shape:?} — the adapters were trained for a different model",
                self.file_name()
            );
        }
        self.used.lock().unwrap().insert(name.to_string());
        Ok(Some(weights.get(name, shape, dtype, device)?))
    }

    /// Whether these are adapters being trained (not read from a folder).
    pub fn is_training(&self) -> bool {
        self.train.is_some()
    }

    /// For a name inside one of the last `num_layers` of `total_layers` blocks
    /// (`…layers.{i}.{key}`), the key; `None` for any other name.
    fn trained_block_key(&self, name: &str, total_layers: usize) -> Option<String> {
        let parts: Vec<&str> = name.split('.').collect();
        let at = parts.windows(2).position(|w| w[0] == "layers" && w[1].parse::<usize>().is_ok())?;
        let index: usize = parts[at + 1].parse().ok()?;
        let n = self.config.num_layers;
        let first = if n < 0 { 0 } else { total_layers.saturating_sub(n as usize) };
        (index >= first).then(|| parts[at + 2..].join("."))
    }

    /// Whether training adapts the layer at `prefix`: a linear layer inside one of the last
    /// `num_layers` blocks, whose key is listed in `keys` when given.
    fn adapts(&self, prefix: &str, total_layers: usize) -> bool {
        let Some(key) = self.trained_block_key(prefix, total_layers) else {
            return false;
        };
        match &self.config.lora.keys {
            None => true,
            Some(keys) => keys.iter().any(|k| *k == key || *k == prefix),
        }
    }

    /// Fails when full fine-tuning would train the quantized layer at `prefix`: a quantized
    /// weight has no gradient (mlx_lm stops with "no gradient wrt the quantized weights").
    pub fn check_trainable_quantized(&self, prefix: &str) -> Result<()> {
        let Some(train) = &self.train else { return Ok(()) };
        if self.config.fine_tune_type == FineTuneType::Full
            && self.trained_block_key(prefix, train.total_layers).is_some()
        {
            bail!(
                "fine_tune_type full: layer `{prefix}` is quantized, and quantized weights cannot be trained — fine-tune a float model (`wick convert --dequantize`), or use lora / dora on the quantized one"
            );
        }
        Ok(())
    }

    /// Full fine-tuning being trained: the model tensor `name` as a trainable tensor in `dtype`
    /// when it belongs to one of the last `num_layers` blocks (mlx_lm unfreezes those blocks
    /// whole; quantized weights stay frozen, as mlx's `QuantizedLinear` keeps them), taken from
    /// the resume file when it has it, else from `model`. `None`: not a trained tensor.
    pub fn full_parameter(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
        model: &Weights,
    ) -> Result<Option<Tensor>> {
        let Some(train) = &self.train else { return Ok(None) };
        if self.config.fine_tune_type != FineTuneType::Full
            || self.trained_block_key(name, train.total_layers).is_none()
        {
            return Ok(None);
        }
        let t = match self.take(name, shape, dtype, device)? {
            Some(t) => t,
            None => model.get(name, shape, dtype, device)?,
        };
        Ok(Some(train.var(name.to_string(), t)?))
    }

    /// `base` wrapped with the adapter of the layer at `prefix` when there is one.
    pub fn wrap(
        &self,
        prefix: &str,
        base: Linear,
        in_dim: usize,
        out_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Linear> {
        if self.config.fine_tune_type == FineTuneType::Full {
            return Ok(base);
        }
        let r = self.config.lora.rank;
        let dora = self.config.fine_tune_type == FineTuneType::Dora;
        let (a_name, b_name, m_name) = (format!("{prefix}.lora_a"), format!("{prefix}.lora_b"), format!("{prefix}.m"));
        let Some(train) = &self.train else {
            let Some(a) = self.take(&a_name, &[in_dim, r], dtype, device)? else {
                return Ok(base);
            };
            let b = self
                .take(&b_name, &[r, out_dim], dtype, device)?
                .with_context(|| format!("adapters have `{a_name}` but no `{b_name}`"))?;
            let magnitude = match dora {
                true => Some(
                    self.take(&m_name, &[out_dim], DType::F32, device)?
                        .with_context(|| format!("DoRA adapters have no magnitude `{m_name}`"))?,
                ),
                false => None,
            };
            let mut l =
                LoraLinear { base, a, b, scale: self.config.lora.scale, dropout: 0.0, magnitude, dora_factor: None };
            l.freeze_dora_factor()?;
            return Ok(Linear::Lora(Box::new(l)));
        };
        if !self.adapts(prefix, train.total_layers) {
            return Ok(base);
        }
        // trainable: from the resume file, else mlx_lm's initialisation; kept in f32
        let a = match self.take(&a_name, &[in_dim, r], DType::F32, device)? {
            Some(a) => a,
            None => train.uniform(in_dim, &[in_dim, r], device)?,
        };
        let b = match self.take(&b_name, &[r, out_dim], DType::F32, device)? {
            Some(b) => b,
            None => Tensor::zeros((r, out_dim), DType::F32, device)?,
        };
        let magnitude = match dora {
            false => None,
            true => Some(match self.take(&m_name, &[out_dim], DType::F32, device)? {
                Some(m) => m,
                None => base.dense_weight(DType::F32)?.sqr()?.sum(D::Minus1)?.sqrt()?,
            }),
        };
        let a = train.var(a_name, a)?;
        let b = train.var(b_name, b)?;
        let magnitude = magnitude.map(|m| train.var(m_name, m)).transpose()?;
        let l = LoraLinear {
            base,
            a,
            b,
            scale: self.config.lora.scale,
            dropout: self.config.lora.dropout,
            magnitude,
            dora_factor: None,
        };
        Ok(Linear::Lora(Box::new(l)))
    }

    /// The adapter of the stacked experts' layer at `prefix` (`E` experts, `in_dim` → `out_dim`)
    /// when there is one: mlx_lm's `LoRASwitchLinear`, `{prefix}.lora_a` (E × rank × in) and
    /// `{prefix}.lora_b` (E × out × rank), or when training, new ones (A uniform in ±1/√in, B
    /// zero). mlx_lm has no DoRA for expert layers; full fine-tuning leaves them to the loader.
    pub fn switch_lora(
        &self,
        prefix: &str,
        experts: usize,
        in_dim: usize,
        out_dim: usize,
        device: &Device,
    ) -> Result<Option<SwitchLora>> {
        if self.config.fine_tune_type == FineTuneType::Full {
            return Ok(None);
        }
        let r = self.config.lora.rank;
        let (a_name, b_name) = (format!("{prefix}.lora_a"), format!("{prefix}.lora_b"));
        let (a_shape, b_shape) = ([experts, r, in_dim], [experts, out_dim, r]);
        let dora = self.config.fine_tune_type == FineTuneType::Dora;
        let lora = |a, b| SwitchLora { a, b, scale: self.config.lora.scale, dropout: self.config.lora.dropout };
        let Some(train) = &self.train else {
            let Some(a) = self.take(&a_name, &a_shape, DType::F32, device)? else {
                return Ok(None);
            };
            if dora {
                bail!("layer `{prefix}`: mlx_lm has no DoRA for expert (switch) layers");
            }
            let b = self
                .take(&b_name, &b_shape, DType::F32, device)?
                .with_context(|| format!("adapters have `{a_name}` but no `{b_name}`"))?;
            return Ok(Some(SwitchLora { dropout: 0.0, ..lora(a, b) }));
        };
        if !self.adapts(prefix, train.total_layers) {
            return Ok(None);
        }
        if dora {
            bail!("fine_tune_type dora: layer `{prefix}` is an expert (switch) layer, which mlx_lm cannot adapt with DoRA; use lora, or keys without the experts");
        }
        let a = match self.take(&a_name, &a_shape, DType::F32, device)? {
            Some(a) => a,
            None => train.uniform(in_dim, &a_shape, device)?,
        };
        let b = match self.take(&b_name, &b_shape, DType::F32, device)? {
            Some(b) => b,
            None => Tensor::zeros(b_shape.as_slice(), DType::F32, device)?,
        };
        Ok(Some(lora(train.var(a_name, a)?, train.var(b_name, b)?)))
    }

    /// Fails when a tensor of the adapter file was not taken by any layer, or (training) when
    /// no layer was adapted.
    pub fn finish(&self) -> Result<()> {
        if let Some(t) = &self.train {
            if t.vars.lock().unwrap().is_empty() {
                bail!(
                    "no layer of the model matches the adapter settings (num_layers {}, keys {:?})",
                    self.config.num_layers,
                    self.config.lora.keys
                );
            }
        }
        let Some(weights) = &self.weights else { return Ok(()) };
        let used = self.used.lock().unwrap();
        let left: Vec<&str> = weights.names().filter(|n| !used.contains(*n)).collect();
        if self.config.fine_tune_type != FineTuneType::Full && !left.is_empty() {
            let shown: Vec<&str> = left.iter().take(8).copied().collect();
            bail!(
                "{} holds {} tensor(s) that are not adapter parameters of this model's layers: {}{}",
                self.file_name(),
                left.len(),
                shown.join(", "),
                if left.len() > shown.len() { ", …" } else { "" }
            );
        }
        Ok(())
    }
}

/// A linear layer with a low-rank update, `y = base(x) + scale · (x A) B`, as mlx_lm's
/// `LoRALinear`; with a magnitude `m` it is mlx_lm's `DoRALinear`: the output (before the bias)
/// is rescaled per row by `m / ‖W + scale·(A B)ᵀ‖`, the norm not differentiated.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    pub base: Linear,
    /// (in, rank)
    pub a: Tensor,
    /// (rank, out)
    pub b: Tensor,
    pub scale: f64,
    /// Dropout on the update's input while training.
    pub dropout: f64,
    /// DoRA's magnitude (out), f32.
    pub magnitude: Option<Tensor>,
    /// DoRA's `m / ‖W'‖` computed once when the adapter is frozen (inference).
    pub dora_factor: Option<Tensor>,
}

impl LoraLinear {
    /// `scale · (A B)ᵀ` (out × in) in f32: the change the adapter makes to the weight.
    pub fn delta(&self) -> Result<Tensor> {
        let a = self.a.to_dtype(DType::F32)?;
        let b = self.b.to_dtype(DType::F32)?;
        // mlx_lm's order: the scale on B first
        Ok((b.t()? * self.scale)?.matmul(&a.t()?)?)
    }

    /// DoRA's per-row factor `m / ‖W + delta‖` (out), f32, detached.
    fn compute_dora_factor(&self, m: &Tensor) -> Result<Tensor> {
        let w = self.base.dense_weight(DType::F32)?;
        let adapted = (w + self.delta()?)?;
        let norm = adapted.sqr()?.sum(D::Minus1)?.sqrt()?.detach();
        Ok(m.to_dtype(DType::F32)?.div(&norm)?)
    }

    /// Fixes DoRA's factor for inference (the adapter does not change any more).
    pub fn freeze_dora_factor(&mut self) -> Result<()> {
        if let Some(m) = &self.magnitude {
            self.dora_factor = Some(self.compute_dora_factor(m)?);
        }
        Ok(())
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let xin =
            if self.dropout > 0.0 && training() { candle_nn::ops::dropout(x, self.dropout as f32)? } else { x.clone() };
        let a = self.a.to_dtype(x.dtype())?;
        let b = self.b.to_dtype(x.dtype())?;
        let z = (xin.broadcast_matmul(&a)?.broadcast_matmul(&b)? * self.scale)?;
        let Some(m) = &self.magnitude else {
            return Ok((self.base.forward(x)? + z)?);
        };
        let y = (self.base.forward_no_bias(x)? + z)?;
        let factor = match &self.dora_factor {
            Some(f) => f.clone(),
            None => self.compute_dora_factor(m)?,
        };
        let y = y.broadcast_mul(&factor.to_dtype(x.dtype())?)?;
        Ok(match self.base.bias() {
            Some(bias) => y.broadcast_add(bias)?,
            None => y,
        })
    }

    /// The layer with the adapter folded into its weight, as mlx_lm's `fuse` computes it: the
    /// base weight in `store` (its dtype in the file; a quantized weight is dequantized in its
    /// scales' dtype, one in a float mode in bfloat16 as `mx.dequantize` gives it), plus the
    /// update cast to it; DoRA then rescales each row to `m`, which
    /// makes the result f32 as in mlx. A quantized base is re-quantized with its own bits and
    /// group size unless `dequantize`.
    pub fn fuse(&self, dequantize: bool, store: DType) -> Result<Linear> {
        let w = match &self.base {
            Linear::Quantized { weight, .. } => weight.dequantize_in(store)?,
            other => other.dense_weight(store)?,
        };
        let mut fused = (w + self.delta()?.to_dtype(store)?)?;
        if let Some(m) = &self.magnitude {
            let f = fused.to_dtype(DType::F32)?;
            // mlx's norm of a half-precision weight comes back in that precision
            let norm = f.sqr()?.sum(D::Minus1)?.sqrt()?.to_dtype(store)?.to_dtype(DType::F32)?;
            let s = m.to_dtype(DType::F32)?.div(&norm)?;
            fused = f.broadcast_mul(&s.unsqueeze(1)?)?;
        }
        let bias = self.base.bias().cloned();
        match &self.base {
            Linear::Quantized { weight, .. } if !dequantize => {
                let (packed, scales, biases) = crate::quant::quantize_tensor(&fused, weight.params)?;
                let q = crate::ops::qmatmul::QuantizedWeight { packed, scales, biases, ..weight.clone() };
                Ok(Linear::Quantized { weight: q, bias })
            }
            Linear::Fp { weight, .. } if !dequantize => {
                let (packed, scales) = crate::quant::fp::quantize_tensor(&fused, weight.mode, None)?;
                Ok(Linear::Fp { weight: crate::ops::qmatmul::FpWeight { packed, scales, ..weight.clone() }, bias })
            }
            _ => Ok(Linear::Dense { weight: fused, bias }),
        }
    }
}

/// The low-rank update of a stacked experts' layer (mlx_lm's `LoRASwitchLinear`): expert `e`'s
/// output gains `scale · (x A[e]ᵀ) B[e]ᵀ`.
#[derive(Debug, Clone)]
pub struct SwitchLora {
    /// (experts, rank, in), f32
    pub a: Tensor,
    /// (experts, out, rank), f32
    pub b: Tensor,
    pub scale: f64,
    /// Dropout on the update's input while training.
    pub dropout: f64,
}

impl SwitchLora {
    /// `scale · B[e] A[e]` (experts × out × in) in f32: the change to the stacked weights.
    pub fn delta(&self) -> Result<Tensor> {
        // mlx_lm's order: the scale on B first
        Ok((self.b.to_dtype(DType::F32)? * self.scale)?.matmul(&self.a.to_dtype(DType::F32)?)?)
    }
}

thread_local! {
    /// Per thread, like the training loop that sets it.
    static TRAINING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether adapters are being trained on this thread (dropout on); set by the training loop.
pub fn training() -> bool {
    TRAINING.with(|t| t.get())
}

/// Turns training mode (dropout) on or off for this thread.
pub fn set_training(on: bool) {
    TRAINING.with(|t| t.set(on))
}
