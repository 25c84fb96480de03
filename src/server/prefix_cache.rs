//! Prompt-prefix reuse across requests (mlx_lm.server's `LRUPromptCache`): when a request ends,
//! the KV cache of the tokens it fed is kept under those tokens; a later request whose prompt
//! shares a prefix with an entry starts from a copy of that entry, cut to the shared part, and
//! computes only the rest. A chat's next turn shares the whole previous turn.

use crate::cache::KvCache;
use anyhow::Result;
use std::collections::VecDeque;

struct Entry {
    tokens: Vec<u32>,
    cache: Vec<KvCache>,
}

/// At most `capacity` caches, the least recently used dropped first.
pub struct PrefixCache {
    entries: VecDeque<Entry>,
    capacity: usize,
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PrefixCache {
    pub fn new(capacity: usize) -> Self {
        Self { entries: VecDeque::new(), capacity }
    }

    /// Whether entries are kept at all (a capacity of 0, or a model whose cache cannot give
    /// rows back, keeps none).
    pub fn is_enabled(&self) -> bool {
        self.capacity > 0
    }

    /// Keeps `cache` (one row per layer, holding exactly `tokens`). An entry whose tokens are a
    /// prefix of `tokens` is replaced: the new one serves every prompt the old one did.
    pub fn insert(&mut self, tokens: Vec<u32>, cache: Vec<KvCache>) {
        if self.capacity == 0 || tokens.is_empty() {
            return;
        }
        self.entries.retain(|e| common_prefix(&e.tokens, &tokens) < e.tokens.len());
        self.entries.push_back(Entry { tokens, cache });
        while self.entries.len() > self.capacity {
            self.entries.pop_front();
        }
    }

    /// A cache of its own holding the longest prefix of `prompt` found here, cut so that at
    /// least the last prompt token is left to compute (its logits start generation); `None`
    /// when nothing is shared. An entry with recurrent layers (whose state cannot be cut) serves
    /// only prompts that continue its whole sequence: a chat's next turn.
    pub fn fetch(&mut self, prompt: &[u32]) -> Result<Option<(Vec<KvCache>, usize)>> {
        let limit = prompt.len().saturating_sub(1);
        let best = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, common_prefix(&e.tokens, prompt).min(limit)))
            .filter(|&(i, n)| {
                let e = &self.entries[i];
                n == e.tokens.len() || !e.cache.iter().any(KvCache::is_arrays)
            })
            .max_by_key(|&(i, n)| (n, i));
        let Some((i, n)) = best.filter(|&(_, n)| n > 0) else { return Ok(None) };
        let entry = self.entries.remove(i).expect("index from the scan");
        let mut cache = entry.cache.iter().map(|c| c.extract_row(0)).collect::<Result<Vec<_>>>()?;
        for c in cache.iter_mut() {
            c.trim(entry.tokens.len() - n);
        }
        self.entries.push_back(entry);
        Ok(Some((cache, n)))
    }
}
