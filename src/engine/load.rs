//! Loading a model for the engine: the architecture's model (`crate::models`), with its decode
//! step replayed from a CUDA graph on CUDA.

use crate::models::LoadedModel;
use crate::nn::lora::Adapters;
use anyhow::Result;
use candle_core::{DType, Device};
use std::path::Path;

/// Loads the model of `dir` in `dtype` (or the dtype its weights are stored in) on `device`.
pub fn load_model(dir: &Path, dtype: Option<DType>, device: &Device) -> Result<LoadedModel> {
    load_model_with(dir, dtype, device, None)
}

/// [`load_model`] with the LoRA / DoRA / full fine-tuning adapters of the folder `adapter_path`
/// (mlx_lm's `--adapter-path`).
pub fn load_model_with(
    dir: &Path,
    dtype: Option<DType>,
    device: &Device,
    adapter_path: Option<&Path>,
) -> Result<LoadedModel> {
    let adapters = adapter_path.map(Adapters::open).transpose()?;
    load_model_adapted(dir, dtype, device, adapters.as_ref())
}

/// [`load_model`] with `adapters` (read from a folder, or trainable ones for `wick lora`).
pub fn load_model_adapted(
    dir: &Path,
    dtype: Option<DType>,
    device: &Device,
    adapters: Option<&Adapters>,
) -> Result<LoadedModel> {
    #[allow(unused_mut)]
    let mut loaded = crate::models::load_model_adapted(dir, dtype, device, adapters)?;
    #[cfg(feature = "cuda")]
    {
        loaded.model = super::cuda_graph::Graphed::wrap(loaded.model);
    }
    Ok(loaded)
}
