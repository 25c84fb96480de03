//! A chat that keeps its KV cache between turns, as mlx_lm.chat does: each turn renders only
//! the new message with the chat template (plus the system prompt), appends it to the cache, and
//! generates; the history is never processed again. `reset` starts over.

use crate::cache::KvCache;
use crate::engine::generate::{generate_with_cache, GenerateOptions, GenerationStats};
use crate::engine::sample::Sampler;
use crate::models::LanguageModel;
use crate::tokenizer::{Message, Tokenizer};
use anyhow::{bail, Result};

pub struct ChatSession<'a> {
    model: &'a dyn LanguageModel,
    tok: &'a Tokenizer,
    opts: GenerateOptions,
    system_prompt: Option<String>,
    cache: Vec<KvCache>,
    sampler: Sampler,
}

impl<'a> ChatSession<'a> {
    pub fn new(
        model: &'a dyn LanguageModel,
        tok: &'a Tokenizer,
        opts: GenerateOptions,
        system_prompt: Option<String>,
    ) -> Result<Self> {
        if !tok.has_chat_template() {
            bail!("this model's tokenizer has no chat template (tokenizer_config.json `chat_template` or chat_template.jinja); use `wick generate --ignore-chat-template`");
        }
        let sampler = Sampler::new(opts.sampler.clone())?;
        let cache = opts.new_cache(model)?;
        Ok(Self { model, tok, opts, system_prompt, cache, sampler })
    }

    /// Positions in the cache so far.
    pub fn context_len(&self) -> usize {
        self.cache.first().map(|c| c.offset()).unwrap_or(0)
    }

    /// Forgets the conversation (a fresh cache).
    pub fn reset(&mut self) {
        self.cache = self.model.make_cache(self.opts.max_kv_size);
    }

    /// The tokens one user message adds: the system prompt (if any) and the message, rendered
    /// with the generation prompt and encoded without added special tokens.
    pub fn turn_ids(&self, query: &str) -> Result<Vec<u32>> {
        let mut messages = vec![];
        if let Some(s) = &self.system_prompt {
            messages.push(Message::new("system", s));
        }
        messages.push(Message::new("user", query));
        let text = self.tok.apply_chat_template(&messages, true, &Default::default())?;
        self.tok.encode(&text, false)
    }

    /// Answers `query`, calling `on_token` with each generated token (not the eos).
    pub fn turn(&mut self, query: &str, on_token: impl FnMut(u32) -> Result<bool>) -> Result<GenerationStats> {
        let ids = self.turn_ids(query)?;
        if self.opts.max_kv_size.is_none() {
            if let Some(ctx) = self.model.max_context() {
                let need = self.context_len() + ids.len();
                if need > ctx {
                    bail!("the conversation would take {need} positions, more than the model's context of {ctx}: reset it (r) or pass --max-kv-size");
                }
            }
        }
        let eos = &self.tok.eos_token_ids;
        generate_with_cache(self.model, &ids, &mut self.cache, &mut self.sampler, &self.opts, eos, true, on_token)
    }
}
