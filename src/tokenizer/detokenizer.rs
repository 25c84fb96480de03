//! Streaming detokenizer: text is emitted as soon as it is final, never in the middle of a
//! multi-byte character (byte-level BPE and SentencePiece byte-fallback pieces decode to U+FFFD
//! until the character is complete), and SentencePiece's leading-space rule is respected by
//! decoding each new piece together with the tokens before it.

/// The detokenizer's state without the tokenizer, for owners that keep the tokenizer
/// elsewhere (the server's per-request tasks); [`StreamingDetokenizer`] pairs the two.
#[derive(Debug, Clone, Default)]
pub struct DetokenizerState {
    tokens: Vec<u32>,
    /// start of the window decoded for context
    prefix_offset: usize,
    /// tokens before this one have been emitted
    read_offset: usize,
    text: String,
}

fn decode(tok: &tokenizers::Tokenizer, ids: &[u32]) -> String {
    tok.decode(ids, false).unwrap_or_default()
}

impl DetokenizerState {
    /// Adds a token; returns the newly final text (possibly empty).
    pub fn add_token(&mut self, tok: &tokenizers::Tokenizer, id: u32) -> String {
        self.tokens.push(id);
        let prefix = decode(tok, &self.tokens[self.prefix_offset..self.read_offset]);
        let full = decode(tok, &self.tokens[self.prefix_offset..]);
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(&prefix) {
            let new = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.tokens.len();
            self.text.push_str(&new);
            new
        } else {
            String::new()
        }
    }

    /// Emits whatever is left (an incomplete character is emitted as U+FFFD, as Python does).
    pub fn finalize(&mut self, tok: &tokenizers::Tokenizer) -> String {
        if self.read_offset >= self.tokens.len() {
            return String::new();
        }
        let prefix = decode(tok, &self.tokens[self.prefix_offset..self.read_offset]);
        let full = decode(tok, &self.tokens[self.prefix_offset..]);
        let new = if full.starts_with(&prefix) { full[prefix.len()..].to_string() } else { full };
        self.prefix_offset = self.read_offset;
        self.read_offset = self.tokens.len();
        self.text.push_str(&new);
        new
    }

    /// All text emitted so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }
}

pub struct StreamingDetokenizer<'a> {
    tok: &'a tokenizers::Tokenizer,
    state: DetokenizerState,
}

impl<'a> StreamingDetokenizer<'a> {
    pub fn new(tok: &'a tokenizers::Tokenizer) -> Self {
        Self { tok, state: DetokenizerState::default() }
    }

    /// Adds a token; returns the newly final text (possibly empty).
    pub fn add_token(&mut self, id: u32) -> String {
        self.state.add_token(self.tok, id)
    }

    /// Emits whatever is left (an incomplete character is emitted as U+FFFD, as Python does).
    pub fn finalize(&mut self) -> String {
        self.state.finalize(self.tok)
    }

    /// All text emitted so far.
    pub fn text(&self) -> &str {
        self.state.text()
    }

    pub fn tokens(&self) -> &[u32] {
        self.state.tokens()
    }
}
