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
    /// A JSONL line that is not JSON at all: the file cannot be read past it.
    #[error("{path}: line {line}: not JSON: {source}")]
    Line {
        path: std::path::PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    /// A file that is not a JSON array (or JSONL) at all.
    #[error("{path}: not a JSON array of LLaVA records: {source}")]
    Array {
        path: std::path::PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A record that is JSON but not a LLaVA record, where the caller takes every record or none.
    #[error("{path}: {record}")]
    Record {
        path: std::path::PathBuf,
        #[source]
        record: MalformedRecord,
    },
    #[error("{0}: holds no records")]
    Empty(std::path::PathBuf),
}

/// One entry of a dataset file that is JSON but not a LLaVA record (`"conversations": null`, a
/// turn without `from`, …): the reader hands it back so the caller can skip it by id.
#[derive(Debug, thiserror::Error)]
#[error("record {id}: {}", self.reason())]
pub struct MalformedRecord {
    /// Its `id` as text, or `#N` (its position) when it has none.
    pub id: String,
    /// Its position among the file's records, from 0.
    pub index: usize,
    /// Its line, in a JSONL file.
    pub line: Option<usize>,
    #[source]
    pub source: serde_json::Error,
}

impl MalformedRecord {
    /// What is wrong and where, without the id (a warning names the id in its own field).
    pub fn reason(&self) -> String {
        let place = match self.line {
            Some(line) => format!("line {line}"),
            None => format!("#{} in the array", self.index),
        };
        format!("not a LLaVA record ({place}): {}", self.source)
    }
}

/// A record id as text: datasets use both strings and numbers.
fn id_text(id: &serde_json::Value) -> String {
    match id {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl LlavaRecord {
    /// The id as text (datasets use both numbers and strings).
    pub fn id_string(&self) -> String {
        id_text(&self.id)
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

/// One JSON value of a dataset file as a record, or why it is not one.
fn parse_record(
    value: serde_json::Value,
    index: usize,
    line: Option<usize>,
) -> Result<LlavaRecord, MalformedRecord> {
    let id = value.get("id").map_or_else(|| format!("#{index}"), id_text);
    serde_json::from_value(value).map_err(|source| MalformedRecord {
        id,
        index,
        line,
        source,
    })
}

/// Reads a JSON array one element at a time, so that a bad element costs only itself and the
/// whole file is never held as one `Value` tree.
struct RecordArray;

impl<'de> serde::de::Visitor<'de> for RecordArray {
    type Value = Vec<Result<LlavaRecord, MalformedRecord>>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON array of LLaVA records")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut entries = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(value) = seq.next_element::<serde_json::Value>()? {
            entries.push(parse_record(value, entries.len(), None));
        }
        Ok(entries)
    }
}

/// Reads a LLaVA dataset record by record: a JSON array (the released `llava_instruct_*.json`
/// files) or JSONL (one record per line, blank lines ignored). Each entry is a record or the
/// [`MalformedRecord`] that names why it is not one; a file that is not JSON (or a JSONL line
/// that is not) is an error for the whole file.
pub fn read_records(
    path: &std::path::Path,
) -> Result<Vec<Result<LlavaRecord, MalformedRecord>>, DatasetError> {
    use serde::Deserializer as _;
    let text = std::fs::read_to_string(path).map_err(|source| DatasetError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let entries = if text.trim_start().starts_with('[') {
        let mut de = serde_json::Deserializer::from_str(&text);
        de.deserialize_seq(RecordArray)
            .and_then(|entries| de.end().map(|()| entries))
            .map_err(|source| DatasetError::Array {
                path: path.to_path_buf(),
                source,
            })?
    } else {
        let mut entries = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let value = serde_json::from_str(line).map_err(|source| DatasetError::Line {
                path: path.to_path_buf(),
                line: i + 1,
                source,
            })?;
            entries.push(parse_record(value, entries.len(), Some(i + 1)));
        }
        entries
    };
    if entries.is_empty() {
        return Err(DatasetError::Empty(path.to_path_buf()));
    }
    Ok(entries)
}

/// Reads a LLaVA dataset whose every record must be good (files the project wrote itself):
/// the first malformed record is an error naming it.
pub fn read_dataset(path: &std::path::Path) -> Result<Vec<LlavaRecord>, DatasetError> {
    read_records(path)?
        .into_iter()
        .collect::<Result<_, _>>()
        .map_err(|record| DatasetError::Record {
            path: path.to_path_buf(),
            record,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("data.json");
        std::fs::write(&path, text).expect("write");
        (dir, path)
    }

    const GOOD: &str = r#"{"id": "a", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}"#;

    /// The issue's three malformed records among good ones: each comes back by id and place.
    fn assert_bad_records_named(entries: &[Result<LlavaRecord, MalformedRecord>], jsonl: bool) {
        assert_eq!(entries.len(), 5);
        assert_eq!(entries[0].as_ref().expect("good").id_string(), "a");
        assert_eq!(entries[4].as_ref().expect("good").id_string(), "a");
        let bad: Vec<&MalformedRecord> = entries.iter().filter_map(|e| e.as_ref().err()).collect();
        let ids: Vec<&str> = bad.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["null-conv", "7", "#3"]);
        assert_eq!(bad.iter().map(|m| m.index).collect::<Vec<_>>(), [1, 2, 3]);
        let reasons: Vec<String> = bad.iter().map(|m| m.reason()).collect();
        assert!(reasons[0].contains("invalid type: null"), "{reasons:?}");
        assert!(reasons[1].contains("invalid type: integer"), "{reasons:?}");
        assert!(reasons[2].contains("missing field `from`"), "{reasons:?}");
        if jsonl {
            assert!(reasons[0].contains("line 3"), "{reasons:?}");
        } else {
            assert!(reasons[0].contains("#1 in the array"), "{reasons:?}");
        }
        assert_eq!(bad[1].to_string(), format!("record 7: {}", bad[1].reason()));
    }

    const BAD: [&str; 3] = [
        r#"{"id": "null-conv", "image": "x.png", "conversations": null}"#,
        r#"{"id": 7, "conversations": 3}"#,
        r#"{"conversations": [{"value": "no role"}]}"#,
    ];

    #[test]
    fn an_array_is_read_record_by_record() {
        let text = format!("[{GOOD},\n{},\n{},\n{},\n{GOOD}]", BAD[0], BAD[1], BAD[2]);
        let (_dir, path) = write(&text);
        assert_bad_records_named(&read_records(&path).expect("reads"), false);
        // All-or-nothing readers get the first bad record as the error.
        let err = read_dataset(&path).expect_err("strict").to_string();
        assert!(
            err.contains("record null-conv: not a LLaVA record"),
            "{err}"
        );
    }

    #[test]
    fn jsonl_is_read_record_by_record() {
        let text = format!("{GOOD}\n\n{}\n{}\n{}\n{GOOD}\n", BAD[0], BAD[1], BAD[2]);
        let (_dir, path) = write(&text);
        assert_bad_records_named(&read_records(&path).expect("reads"), true);
    }

    #[test]
    fn a_file_that_is_not_json_is_an_error_for_the_whole_file() {
        let (_dir, path) = write(&format!("[{GOOD}, {{\"id\": oops}}]"));
        let err = read_records(&path).expect_err("not JSON").to_string();
        assert!(err.contains("not a JSON array of LLaVA records"), "{err}");
        let (_dir, path) = write("[1, 2] trailing");
        assert!(matches!(
            read_records(&path),
            Err(DatasetError::Array { .. })
        ));
        let (_dir, path) = write(&format!("{GOOD}\nnot json\n"));
        let err = read_records(&path).expect_err("not JSON").to_string();
        assert!(err.contains("line 2: not JSON"), "{err}");
        let (_dir, path) = write("[]");
        assert!(matches!(read_records(&path), Err(DatasetError::Empty(_))));
    }
}
