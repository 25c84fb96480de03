//! Architectures, one file each (like mlx_lm's `models/`), discovered by config.json's `model_type`.

pub mod llama;

use crate::cache::KvCache;
use crate::load::{ConfigFile, Weights};
use crate::nn::Loader;
use crate::quant::QuantSpec;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// What generation needs from a model.
pub trait LanguageModel: Send {
    /// Logits (B, L, vocab) in f32 for `tokens` (B, L), appending to `cache`.
    /// With `last_only`, only the last position's logits are computed (B, 1, vocab).
    fn forward(&self, tokens: &Tensor, cache: &mut [KvCache], last_only: bool) -> Result<Tensor>;
    /// One empty cache per layer.
    fn make_cache(&self) -> Vec<KvCache>;
    /// The longest context the model was trained for, when the config says.
    fn max_context(&self) -> Option<usize>;
    fn vocab_size(&self) -> usize;
    /// The activation dtype (f32 on the CPU, the weights' dtype elsewhere).
    fn dtype(&self) -> DType;
    fn device(&self) -> &Device;
}

/// `model_type`s wick runs, and the file that implements each (mlx_lm's remapping included).
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["llama", "mistral"];

/// A loaded model with its config.
pub struct LoadedModel {
    pub model: Box<dyn LanguageModel>,
    pub config: ConfigFile,
    pub model_type: String,
}

/// Loads the model of `dir` in `dtype` (or the dtype its weights are stored in) on `device`.
pub fn load_model(dir: &Path, dtype: Option<DType>, device: &Device) -> Result<LoadedModel> {
    crate::device::init_threads();
    if !dir.is_dir() {
        bail!("model folder {} does not exist", dir.display());
    }
    let config = ConfigFile::read(dir)?;
    let model_type = config.model_type()?.to_string();
    if !SUPPORTED_MODEL_TYPES.contains(&model_type.as_str()) {
        bail!(
            "{}: model_type `{model_type}` is not supported; supported model types: {}",
            config.path.display(),
            SUPPORTED_MODEL_TYPES.join(", ")
        );
    }
    let quant = QuantSpec::from_config(&config.value, &config.path.display().to_string())?;
    let mut weights = Weights::open(dir)?;
    let dtype = match dtype {
        Some(d) => d,
        None => weights.dominant_float_dtype(),
    };
    let model: Box<dyn LanguageModel> = match model_type.as_str() {
        "llama" | "mistral" => {
            let args: llama::ModelArgs = config.parse()?;
            llama::sanitize(&args, &mut weights);
            if let Some(q) = &quant {
                let known = |p: &str| weights.contains(&format!("{p}.weight"));
                q.check_layers_exist(&known, &config.path.display().to_string())?;
            }
            let act_dtype = if device.is_cpu() { DType::F32 } else { dtype };
            let ld = Loader { weights: &weights, dtype, act_dtype, device: device.clone(), quant: quant.as_ref() };
            Box::new(llama::Model::load(args, &ld)?)
        }
        _ => unreachable!("checked against SUPPORTED_MODEL_TYPES"),
    };
    Ok(LoadedModel { model, config, model_type })
}
