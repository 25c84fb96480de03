//! GLM-4.7-Flash (`glm4_moe_lite`): DeepSeek-V3's model ([`super::deepseek_v3`]) with the
//! q / kv latent norms at `rms_norm_eps`, RoPE base 1e6 unless `rope_theta` says otherwise,
//! and every layer from `num_hidden_layers` on (the multi-token-prediction layers) dropped.
//! Reads like mlx_lm's `models/glm4_moe_lite.py`.

use super::decoder::DecoderModel;
use super::deepseek_v3::{load_with, sanitize_family, Family};
use crate::io::Weights;
use crate::nn::Loader;
use anyhow::Result;

pub use super::deepseek_v3::ModelArgs;

pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    sanitize_family(args, weights, Family::Glm4MoeLite)
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    load_with(args, ld, "", Family::Glm4MoeLite)
}
