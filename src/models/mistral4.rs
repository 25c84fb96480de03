//! Mistral Small 4 (`mistral4`, usually the text model inside a `mistral3` checkpoint):
//! DeepSeek-V3's latent attention and experts ([`super::deepseek_v3`]) with RoPE and yarn from
//! `rope_parameters`, queries scaled with their position (`1 + β · ln(1 + ⌊p / original⌋)`,
//! Llama 4's), a softmax router that is a (quantizable) linear layer over two-best-ranked
//! groups, experts in every layer from `first_k_dense_replace`, and an optionally tied head.
//! Hugging Face's fused expert tensors (`experts.gate_up_proj`, `experts.down_proj`) are split.
//! Reads like mlx_lm's `models/mistral4.py`.

use super::decoder::DecoderModel;
use super::deepseek_v3::{load_with, sanitize_family, Family};
use crate::io::Weights;
use crate::nn::Loader;
use anyhow::Result;

pub use super::deepseek_v3::ModelArgs;

pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    sanitize_family(args, weights, Family::Mistral4)
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    load_with(args, ld, "", Family::Mistral4)
}
