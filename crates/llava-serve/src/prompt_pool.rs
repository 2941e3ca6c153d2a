//! The server's prompt cache: the keys and values of recent conversations, so that a new turn
//! prefills only its new tokens (as llama.cpp's server keeps each slot's prompt). Each entry is
//! a [`PromptCache`], which matches on token ids *and* image pixels: the same text with another
//! picture reuses nothing from the first picture's span on.
//!
//! At most `capacity` entries are kept, the least recently used going first; an entry that a
//! later one extends (the same conversation, a turn further) is dropped at once.

use llava_model::Llava;
use llava_model::ModelError;
use llava_model::generation::reusable_tokens;
use llava_model::image_inputs::ImageInputs;
use llava_model::prompt_cache::PromptCache;

pub struct PromptPool {
    capacity: usize,
    /// Oldest use first.
    entries: Vec<PromptCache>,
}

impl PromptPool {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: Vec::new(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry that shares the longest beginning with this prompt, or an empty cache. The
    /// entry stays in the pool (its tensors are shared, not copied), so that other
    /// conversations that begin the same way can use it too.
    pub fn lookup(
        &mut self,
        model: &Llava,
        input_ids: &[u32],
        images: Option<&ImageInputs>,
    ) -> Result<PromptCache, ModelError> {
        let mut best = (0, None);
        for (i, entry) in self.entries.iter().enumerate() {
            let n = reusable_tokens(model, entry, input_ids, images)?;
            if n > best.0 {
                best = (n, Some(i));
            }
        }
        Ok(match best.1 {
            Some(i) => {
                let entry = self.entries.remove(i);
                self.entries.push(entry.clone());
                entry
            }
            None => PromptCache::new(),
        })
    }

    /// Keeps `entry` as the most recently used, dropping those it extends and then the least
    /// recently used beyond the capacity.
    pub fn store(&mut self, entry: PromptCache) -> Result<(), ModelError> {
        if self.capacity == 0 || entry.is_empty() {
            return Ok(());
        }
        let mut kept = Vec::with_capacity(self.entries.len() + 1);
        for old in self.entries.drain(..) {
            if !entry.extends(&old)? {
                kept.push(old);
            }
        }
        kept.push(entry);
        let excess = kept.len().saturating_sub(self.capacity);
        kept.drain(..excess);
        self.entries = kept;
        Ok(())
    }
}
