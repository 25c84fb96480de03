//! Tokenizer: Hugging Face `tokenizer.json` (through the `tokenizers` crate) plus
//! `tokenizer_config.json` (special tokens, chat template) and eos ids, as mlx_lm's
//! `TokenizerWrapper` sees them.

mod chat_template;
mod detokenizer;

pub use chat_template::{ChatTemplate, Message};
pub use detokenizer::{DetokenizerState, StreamingDetokenizer};

use anyhow::{Context, Result};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// every token that ends generation: `eos_token` plus generation_config.json's ids
    pub eos_token_ids: BTreeSet<u32>,
    pub chat_template: Option<ChatTemplate>,
    /// special tokens by name (bos_token, eos_token, pad_token, unk_token) for templates
    pub special_tokens: Vec<(String, String)>,
}

/// A token in tokenizer_config.json: a string or an AddedToken object with `content`.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads the tokenizer files of a model folder.
    pub fn load(dir: &Path) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        if !tj.is_file() {
            anyhow::bail!("model folder {} has no tokenizer.json", dir.display());
        }
        let inner =
            tokenizers::Tokenizer::from_file(&tj).map_err(|e| anyhow::anyhow!("cannot load {}: {e}", tj.display()))?;
        let tc_path = dir.join("tokenizer_config.json");
        let tc: Value = if tc_path.is_file() {
            serde_json::from_str(&std::fs::read_to_string(&tc_path)?)
                .with_context(|| format!("{} is not valid JSON", tc_path.display()))?
        } else {
            Value::Object(Default::default())
        };
        let mut special_tokens = vec![];
        for name in ["bos_token", "eos_token", "pad_token", "unk_token"] {
            if let Some(t) = token_text(tc.get(name)) {
                special_tokens.push((name.to_string(), t));
            }
        }
        let bos_token = token_text(tc.get("bos_token"));
        let eos_token = token_text(tc.get("eos_token"));
        let mut eos_token_ids = BTreeSet::new();
        if let Some(e) = &eos_token {
            if let Some(id) = inner.token_to_id(e) {
                eos_token_ids.insert(id);
            }
        }
        eos_token_ids.extend(crate::io::generation_eos_ids(dir)?);
        let jinja = dir.join("chat_template.jinja");
        let template_src = if jinja.is_file() {
            Some(std::fs::read_to_string(&jinja)?)
        } else {
            match tc.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                // a list of named templates: use "default"
                Some(Value::Array(a)) => a
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .or_else(|| a.first())
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                    .map(String::from),
                _ => None,
            }
        };
        let chat_template = match template_src {
            Some(s) => Some(ChatTemplate::new(&s).with_context(|| format!("chat template of {}", dir.display()))?),
            None => None,
        };
        Ok(Self { inner, bos_token, eos_token, eos_token_ids, chat_template, special_tokens })
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor (BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| anyhow::anyhow!("tokenizer: {e}"))
    }

    pub fn token_to_id(&self, t: &str) -> Option<u32> {
        self.inner.token_to_id(t)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders `messages` with the chat template, as transformers' `apply_chat_template(...,
    /// tokenize=False)`; `extra` holds `--chat-template-config` keys.
    pub fn apply_chat_template<M: serde::Serialize>(
        &self,
        messages: &[M],
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, Value>,
    ) -> Result<String> {
        let t = self.chat_template.as_ref().context("this tokenizer has no chat template")?;
        t.render(messages, add_generation_prompt, &self.special_tokens, extra)
    }

    /// Renders `messages` so that the last message stays open for the model to continue, as
    /// transformers' `continue_final_message=True`: a marker is appended to the last message's
    /// content, the chat is rendered without a generation prompt and cut at the marker (then
    /// trailing whitespace is dropped too if the template trimmed the marker's space).
    pub fn apply_chat_template_continue(
        &self,
        messages: &[Message],
        extra: &serde_json::Map<String, Value>,
    ) -> Result<String> {
        const TAG: &str = "CONTINUE_FINAL_MESSAGE_TAG ";
        let mut messages = messages.to_vec();
        let last = messages.last_mut().context("no messages to render")?;
        last.content.push_str(TAG);
        let text = self.apply_chat_template(&messages, false, extra)?;
        let at = text
            .rfind(TAG.trim())
            .context("continue_final_message: the chat template does not keep the final message's text")?;
        Ok(if text[at..].starts_with(TAG) { text[..at].to_string() } else { text[..at].trim_end().to_string() })
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    pub fn streaming_detokenizer(&self) -> StreamingDetokenizer<'_> {
        StreamingDetokenizer::new(&self.inner)
    }
}
