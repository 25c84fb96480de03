//! Mistral 3's multimodal checkpoints (`mistral3`, and `llava` as mlx_lm remaps it: Mistral
//! Small 3.x, Ministral 3, Mistral Small 4), text only: the text model (`ministral3`,
//! `mistral4`, or llama for any other `text_config.model_type`) under `language_model.`, the vision tower and projector dropped;
//! the text model is untied unless its config says otherwise. Reads like mlx_lm's
//! `models/mistral3.py`.

use super::decoder::DecoderModel;
use super::deepseek_v3::{self, Family};
use super::{llama, ministral3};
use crate::io::Weights;
use crate::nn::Loader;
use anyhow::{bail, Result};
use serde::Deserialize;

/// The text model's arguments.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "Wrapper")]
pub enum ModelArgs {
    Ministral3(ministral3::ModelArgs),
    Mistral4(deepseek_v3::ModelArgs),
    Llama(llama::ModelArgs),
}

#[derive(Deserialize)]
struct Wrapper {
    text_config: serde_json::Map<String, serde_json::Value>,
}

impl TryFrom<Wrapper> for ModelArgs {
    type Error = serde_json::Error;

    fn try_from(w: Wrapper) -> Result<Self, Self::Error> {
        let mut t = w.text_config;
        t.entry("tie_word_embeddings").or_insert(false.into());
        let kind = t.get("model_type").and_then(|v| v.as_str()).map(str::to_string);
        let t = serde_json::Value::Object(t);
        match kind.as_deref() {
            Some("ministral3") => Ok(Self::Ministral3(serde_json::from_value(t)?)),
            Some("mistral4") => Ok(Self::Mistral4(serde_json::from_value(t)?)),
            Some(_) => Ok(Self::Llama(serde_json::from_value(t)?)),
            None => Err(serde::de::Error::missing_field("text_config.model_type")),
        }
    }
}

impl ModelArgs {
    fn tied(&self) -> bool {
        match self {
            Self::Ministral3(a) => a.llama.tie_word_embeddings,
            Self::Mistral4(a) => a.tie_word_embeddings,
            Self::Llama(a) => a.tie_word_embeddings,
        }
    }
}

const PREFIX: &str = "language_model.";

/// Drops the vision tower and the projector and puts every text tensor under
/// `language_model.`, from either Hugging Face layout (`language_model.model.…`, or
/// `model.language_model.…` with a top-level `lm_head`); then what the text model's sanitize
/// drops (rotary frequencies; a tied model's head).
pub fn sanitize(args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    let fp8_reader = matches!(args, ModelArgs::Mistral4(_));
    if let Some(k) = weights.names().find(|k| k.ends_with("weight_scale_inv") && !fp8_reader) {
        bail!(
            "tensor `{k}` in {}: FP8 checkpoints are not supported; use the BF16 release or an mlx conversion",
            weights.dir.display()
        );
    }
    let tied = args.tied();
    weights.sanitize(|k| {
        if k.contains("vision_tower")
            || k.contains("multi_modal_projector")
            || k.contains("self_attn.rotary_emb.inv_freq")
        {
            return None;
        }
        let name = match k.strip_prefix("model.language_model.") {
            Some(rest) => format!("{PREFIX}model.{rest}"),
            None => format!("{PREFIX}{}", k.strip_prefix(PREFIX).unwrap_or(k)),
        };
        (!(tied && name == format!("{PREFIX}lm_head.weight"))).then_some(name)
    });
    match args {
        ModelArgs::Mistral4(a) => deepseek_v3::sanitize_prefixed(a, weights, Family::Mistral4, PREFIX),
        _ => Ok(()),
    }
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    match args {
        ModelArgs::Ministral3(a) => ministral3::load_with(a, ld, PREFIX),
        ModelArgs::Mistral4(a) => deepseek_v3::load_with(a, ld, PREFIX, Family::Mistral4),
        ModelArgs::Llama(a) => llama::load_with(a, ld, PREFIX),
    }
}
