//! The benchmark file formats (MISSION §4) and strict, line-numbered JSONL reading.
//!
//! - Questions: `{question_id, image, text, category}`.
//! - Answers: `{question_id, prompt, text, answer_id, model_id, metadata}` (only
//!   `question_id` and `text` are needed to judge).
//!
//! Question ids are numbers in the released benchmarks and strings in some ports; both are
//! kept as written so that output files round-trip.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::BufRead;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::EvalError;

/// A question id, as written in the file (number or string).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(untagged)]
pub enum QuestionId {
    Int(i64),
    Str(String),
}

impl fmt::Display for QuestionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QuestionId::Int(i) => write!(f, "{i}"),
            QuestionId::Str(s) => f.write_str(s),
        }
    }
}

/// One benchmark question.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Question {
    pub question_id: QuestionId,
    #[serde(default)]
    pub image: String,
    pub text: String,
    #[serde(default)]
    pub category: String,
}

/// One answer line; fields other than the id and the text are optional when reading.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub question_id: QuestionId,
    #[serde(default)]
    pub prompt: String,
    pub text: String,
    #[serde(default)]
    pub answer_id: Option<String>,
    #[serde(default)]
    pub model_id: Option<String>,
    #[serde(default)]
    pub metadata: serde_json::Value,
}

/// Reads every non-blank line of a JSONL file as `T`; a bad line is an error naming it.
/// An empty file (no records) is an error too: it is always a mistake for an input.
pub fn read_jsonl<T: DeserializeOwned>(path: &Path) -> Result<Vec<(usize, T)>, EvalError> {
    let f = std::fs::File::open(path).map_err(EvalError::io(path))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(EvalError::io(path))?;
        if line.trim().is_empty() {
            continue;
        }
        let v = serde_json::from_str(&line).map_err(|e| EvalError::BadLine {
            path: path.to_path_buf(),
            line: i + 1,
            message: e.to_string(),
        })?;
        out.push((i + 1, v));
    }
    if out.is_empty() {
        return Err(EvalError::BadFile {
            path: path.to_path_buf(),
            message: "the file holds no records".into(),
        });
    }
    Ok(out)
}

/// Questions in file order; a repeated id is an error naming its line.
pub fn read_questions(path: &Path) -> Result<Vec<Question>, EvalError> {
    read_question_file(path, |q: &Question| &q.question_id, |_| Ok(()))
}

/// Any benchmark's question file in file order: each line must pass `check` (whose message
/// says what is wrong) and carry a `question_id` not seen before. Errors name the line.
pub fn read_question_file<T: DeserializeOwned>(
    path: &Path,
    id: impl Fn(&T) -> &QuestionId,
    check: impl Fn(&T) -> Result<(), String>,
) -> Result<Vec<T>, EvalError> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (line, q) in read_jsonl::<T>(path)? {
        let bad = |message: String| EvalError::BadLine {
            path: path.to_path_buf(),
            line,
            message,
        };
        check(&q).map_err(bad)?;
        if !seen.insert(id(&q).clone()) {
            return Err(bad(format!("duplicate question_id {}", id(&q))));
        }
        out.push(q);
    }
    Ok(out)
}

/// Answers by question id; a repeated id is an error naming its line.
pub fn read_answers(path: &Path) -> Result<HashMap<QuestionId, Answer>, EvalError> {
    let mut out = HashMap::new();
    for (line, a) in read_jsonl::<Answer>(path)? {
        let id = a.question_id.clone();
        if out.insert(id.clone(), a).is_some() {
            return Err(EvalError::BadLine {
                path: path.to_path_buf(),
                line,
                message: format!("duplicate answer for question_id {id}"),
            });
        }
    }
    Ok(out)
}

/// An answer keyed by its id, as the scorers look answers up: for their tests.
#[cfg(test)]
pub(crate) fn test_answer(id: impl Into<serde_json::Value>, text: &str) -> (QuestionId, Answer) {
    let a: Answer =
        serde_json::from_value(serde_json::json!({"question_id": id.into(), "text": text}))
            .expect("answer");
    (a.question_id.clone(), a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_as_written() {
        let q: Question = serde_json::from_str(
            r#"{"question_id": 7, "image": "a.jpg", "text": "t", "category": "conv"}"#,
        )
        .unwrap();
        assert_eq!(q.question_id, QuestionId::Int(7));
        assert!(
            serde_json::to_string(&q)
                .unwrap()
                .contains(r#""question_id":7"#)
        );
        let q: Question = serde_json::from_str(r#"{"question_id": "x7", "text": "t"}"#).unwrap();
        assert_eq!(q.question_id.to_string(), "x7");
    }

    #[test]
    fn bad_inputs_have_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("q.jsonl");
        assert!(matches!(read_questions(&p), Err(EvalError::Io { .. })));
        std::fs::write(&p, "\n  \n").unwrap();
        let e = read_questions(&p).unwrap_err().to_string();
        assert!(e.contains("no records"), "{e}");
        std::fs::write(
            &p,
            "{\"question_id\": 1, \"text\": \"a\"}\n\n{\"question_id\": 1, \"text\": \"b\"}\n",
        )
        .unwrap();
        let e = read_questions(&p).unwrap_err().to_string();
        assert!(
            e.contains("line 3") && e.contains("duplicate question_id 1"),
            "{e}"
        );
        std::fs::write(&p, "{\"question_id\": 1}\n").unwrap();
        let e = read_questions(&p).unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("text"), "{e}");
        std::fs::write(
            &p,
            "{\"question_id\": 1, \"text\": \"a\"}\n{\"question_id\": 1, \"text\": \"b\"}\n",
        )
        .unwrap();
        let e = read_answers(&p).unwrap_err().to_string();
        assert!(
            e.contains("line 2") && e.contains("duplicate answer"),
            "{e}"
        );
    }
}
