//! The OpenAI chat-completions response objects, field for field as the official clients read
//! them: `chat.completion`, `chat.completion.chunk`, `usage` and `model`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// EOS or a stop string.
    Stop,
    /// `max_tokens`, or the end of the context.
    Length,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

/// OpenAI's breakdown of the prompt: `cached_tokens` came from the prompt cache
/// ([`crate::prompt_pool`]) instead of being prefilled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptTokensDetails::default(),
        }
    }

    pub fn with_cached(mut self, cached_tokens: usize) -> Self {
        self.prompt_tokens_details.cached_tokens = cached_tokens;
        self
    }
}

#[derive(Debug, Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    pub content: String,
    pub refusal: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Choice {
    pub index: u32,
    pub message: AssistantMessage,
    pub logprobs: Option<()>,
    pub finish_reason: FinishReason,
}

/// A whole reply (`stream: false`).
#[derive(Debug, Serialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<Choice>,
    pub usage: Usage,
    pub system_fingerprint: Option<String>,
}

impl ChatCompletion {
    pub fn new(head: &StreamHead, text: String, finish: FinishReason, usage: Usage) -> Self {
        Self {
            id: head.id.clone(),
            object: "chat.completion",
            created: head.created,
            model: head.model.clone(),
            choices: vec![Choice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant",
                    content: text,
                    refusal: None,
                },
                logprobs: None,
                finish_reason: finish,
            }],
            usage,
            system_fingerprint: None,
        }
    }
}

#[derive(Debug, Default, Serialize)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ChunkChoice {
    pub index: u32,
    pub delta: Delta,
    pub logprobs: Option<()>,
    pub finish_reason: Option<FinishReason>,
}

/// One event of a stream (`stream: true`).
#[derive(Debug, Serialize)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: Option<String>,
    pub choices: Vec<ChunkChoice>,
    /// With `include_usage`: `null` on every chunk but the last, which has no choices. Absent
    /// otherwise, as OpenAI sends it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

/// What every object of one response shares: one `id` across a stream's chunks.
#[derive(Debug, Clone)]
pub struct StreamHead {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub include_usage: bool,
}

impl StreamHead {
    pub fn new(model: &str, include_usage: bool) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        Self {
            id: format!("chatcmpl-{:x}{n:06x}", now.as_nanos()),
            created: now.as_secs(),
            model: model.to_string(),
            include_usage,
        }
    }

    pub fn chunk(&self, delta: Delta, finish: Option<FinishReason>) -> ChatCompletionChunk {
        self.with_choices(vec![ChunkChoice {
            index: 0,
            delta,
            logprobs: None,
            finish_reason: finish,
        }])
    }

    /// The last chunk with `include_usage`: no choices, the usage.
    pub fn usage_chunk(&self, usage: Usage) -> ChatCompletionChunk {
        let mut chunk = self.with_choices(Vec::new());
        chunk.usage = Some(Some(usage));
        chunk
    }

    fn with_choices(&self, choices: Vec<ChunkChoice>) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            system_fingerprint: None,
            choices,
            usage: self.include_usage.then_some(None),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Model {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
}

#[derive(Debug, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<Model>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_null_on_chunks_only_when_asked_for() {
        let with = StreamHead::new("m", true);
        let json = serde_json::to_value(with.chunk(Delta::default(), None)).expect("json");
        assert!(json["usage"].is_null() && json.get("usage").is_some());
        let without = StreamHead::new("m", false);
        let json = serde_json::to_value(without.chunk(Delta::default(), None)).expect("json");
        assert!(json.get("usage").is_none());
        let last = serde_json::to_value(with.usage_chunk(Usage::new(3, 4))).expect("json");
        assert_eq!(last["choices"], serde_json::json!([]));
        assert_eq!(last["usage"]["total_tokens"], 7);
    }

    #[test]
    fn ids_differ_between_responses() {
        assert_ne!(
            StreamHead::new("m", false).id,
            StreamHead::new("m", false).id
        );
    }
}
