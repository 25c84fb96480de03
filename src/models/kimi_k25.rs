//! Kimi K2.5 (`kimi_k25`), text only: DeepSeek-V3's model ([`super::deepseek_v3`]) built from
//! `text_config`, every tensor under `language_model.`; the vision tower and projector are
//! dropped. (Text-only Kimi K2 checkpoints say `kimi_k2` and load as deepseek_v3.) Reads like
//! mlx_lm's `models/kimi_k25.py`.

use super::decoder::DecoderModel;
use super::deepseek_v3::{self, Family};
use crate::io::Weights;
use crate::nn::Loader;
use anyhow::Result;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct ModelArgs {
    pub text_config: deepseek_v3::ModelArgs,
}

const PREFIX: &str = "language_model.";

/// Drops the vision tower and projector, then the text model's own sanitize under the prefix.
pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    const VISION: [&str; 4] = ["vision_tower.", "vision_model.", "multi_modal_projector.", "mm_projector."];
    weights.sanitize(|k| (!VISION.iter().any(|v| k.starts_with(v))).then(|| k.to_string()));
    deepseek_v3::sanitize_prefixed(&args.text_config, weights, Family::DeepseekV3, PREFIX)
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    deepseek_v3::load_with(&args.text_config, ld, PREFIX, Family::DeepseekV3)
}
