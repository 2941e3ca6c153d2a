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

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: line {line}: not a LLaVA record: {source}")]
    Line {
        path: std::path::PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: not a JSON array of LLaVA records: {source}")]
    Array {
        path: std::path::PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0}: holds no records")]
    Empty(std::path::PathBuf),
}

impl LlavaRecord {
    /// The id as text (datasets use both numbers and strings).
    pub fn id_string(&self) -> String {
        match &self.id {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    }

    /// Where the record's image is: its `image` under `image_folder` (`--image-folder`), or
    /// as written when there is no folder. `None` for a text-only record.
    pub fn image_path(&self, image_folder: Option<&std::path::Path>) -> Option<std::path::PathBuf> {
        let image = self.image.as_deref()?;
        Some(match image_folder {
            Some(folder) => folder.join(image),
            None => image.into(),
        })
    }
}

/// Reads a LLaVA dataset: a JSON array (the released `llava_instruct_*.json` files) or JSONL
/// (one record per line, blank lines ignored). Errors name the file and the line.
pub fn read_dataset(path: &std::path::Path) -> Result<Vec<LlavaRecord>, DatasetError> {
    let text = std::fs::read_to_string(path).map_err(|source| DatasetError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let records = if text.trim_start().starts_with('[') {
        serde_json::from_str(&text).map_err(|source| DatasetError::Array {
            path: path.to_path_buf(),
            source,
        })?
    } else {
        let mut records = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let record = serde_json::from_str(line).map_err(|source| DatasetError::Line {
                path: path.to_path_buf(),
                line: i + 1,
                source,
            })?;
            records.push(record);
        }
        records
    };
    if records.is_empty() {
        return Err(DatasetError::Empty(path.to_path_buf()));
    }
    Ok(records)
}
