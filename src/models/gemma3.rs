//! Gemma 3's multimodal checkpoints (`gemma3`: Gemma 3 4B / 12B / 27B), text only: the
//! `gemma3_text` model under `language_model.`, the vision tower and projector dropped. The
//! top-level `vocab_size` (the multimodal embedding's rows) replaces the text config's, whose
//! heads default to 8 and KV heads to 4. Reads like mlx_lm's `models/gemma3.py`.

use super::decoder::DecoderModel;
use super::gemma3_text;
use crate::io::Weights;
use crate::nn::Loader;
use anyhow::{bail, Result};
use serde::Deserialize;

/// The text model's arguments, filled in as mlx_lm's wrapper fills them.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "Wrapper")]
pub struct ModelArgs {
    pub text: gemma3_text::ModelArgs,
}

#[derive(Deserialize)]
struct Wrapper {
    text_config: serde_json::Map<String, serde_json::Value>,
    #[serde(default = "super::count::<262208>")]
    vocab_size: usize,
}

impl TryFrom<Wrapper> for ModelArgs {
    type Error = serde_json::Error;

    fn try_from(w: Wrapper) -> Result<Self, Self::Error> {
        let mut t = w.text_config;
        t.insert("vocab_size".into(), w.vocab_size.into());
        t.entry("num_attention_heads").or_insert(8.into());
        t.entry("num_key_value_heads").or_insert(4.into());
        Ok(Self { text: serde_json::from_value(t.into())? })
    }
}

const PREFIX: &str = "language_model.";

/// Drops the vision tower and the projector; every other tensor must be the text model's,
/// under `language_model.`.
pub fn sanitize(_args: &ModelArgs, weights: &mut Weights) -> Result<()> {
    let top = |k: &str| k.split('.').next().unwrap_or("").to_string();
    weights.sanitize(|k| (!matches!(top(k).as_str(), "vision_tower" | "multi_modal_projector")).then(|| k.to_string()));
    if let Some(k) = weights.names().find(|k| !k.starts_with(PREFIX)) {
        bail!(
            "tensor `{k}` in {}: a gemma3 checkpoint holds its text model under `{PREFIX}` (the layout Gemma 3 was published in)",
            weights.dir.display()
        );
    }
    Ok(())
}

pub fn load(args: &ModelArgs, ld: &Loader) -> Result<DecoderModel> {
    gemma3_text::load_with(&args.text, ld, PREFIX)
}
