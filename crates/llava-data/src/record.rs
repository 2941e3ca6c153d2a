//! The LLaVA dataset format: `{"id", "image"?, "conversations": [{"from", "value"}]}`.
//!
//! This is the one definition used by the data generator (writer), the trainer (reader) and
//! the evaluators, so the format cannot drift between them.

use serde::{Deserialize, Serialize};

/// The placeholder that marks where the image goes in a human turn.
pub const IMAGE_PLACEHOLDER: &str = "<image>";

/// One training sample. A record without `image` is a text-only sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlavaRecord {
    /// Original datasets use both strings and numbers for ids; keep whatever was there.
    pub id: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    pub conversations: Vec<Turn>,
}

/// One message. `from` is `"human"` or `"gpt"` in LLaVA files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Turn {
    pub from: String,
    pub value: String,
}

impl Turn {
    pub fn human(value: impl Into<String>) -> Self {
        Self {
            from: "human".into(),
            value: value.into(),
        }
    }
    pub fn gpt(value: impl Into<String>) -> Self {
        Self {
            from: "gpt".into(),
            value: value.into(),
        }
    }
}
