//! Yes/no benchmark questions (POPE, MME): the file format, and the prompt LLaVA-1.5 asks
//! them with.

use std::path::Path;

use serde::Deserialize;

use crate::error::EvalError;
use crate::jsonl::{Question, QuestionId, read_question_file};
use crate::vqa::VQA_SUFFIX;

/// One yes/no question: `{question_id, image, text, label: "yes"|"no", category?}`, as POPE's
/// annotation files and LLaVA's POPE and MME question files write it (`question` and `answer`
/// are accepted too). `category` is POPE's split or MME's subtask.
#[derive(Debug, Clone, Deserialize)]
pub struct YesNoQuestion {
    pub question_id: QuestionId,
    #[serde(alias = "question")]
    pub text: String,
    #[serde(alias = "answer")]
    pub label: String,
    #[serde(default)]
    pub category: Option<String>,
    #[serde(default)]
    pub image: Option<String>,
}

impl YesNoQuestion {
    /// The question for `eval answer`: LLaVA-1.5 asks it with the short-answer instruction,
    /// which its question files already carry; it is added where missing.
    pub fn to_question(&self) -> Question {
        let text = self.text.trim();
        let text = if text.ends_with(VQA_SUFFIX) {
            text.to_string()
        } else {
            crate::vqa::vqa_prompt(text)
        };
        Question {
            question_id: self.question_id.clone(),
            image: self.image.clone().unwrap_or_default(),
            text,
            category: self.category.clone().unwrap_or_default(),
        }
    }

    pub fn is_yes(&self) -> bool {
        self.label.trim().eq_ignore_ascii_case("yes")
    }
}

/// Reads a yes/no question file. A label other than yes/no and a repeated id are errors naming the line.
pub fn read_yes_no_questions(path: &Path) -> Result<Vec<YesNoQuestion>, EvalError> {
    read_question_file(
        path,
        |q: &YesNoQuestion| &q.question_id,
        |q| {
            let label = q.label.trim().to_ascii_lowercase();
            if label != "yes" && label != "no" {
                return Err(format!("label {:?} is neither yes nor no", q.label));
            }
            Ok(())
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_suffix_is_added_once() {
        let q: YesNoQuestion = serde_json::from_value(serde_json::json!({
            "question_id": "a", "image": "x.jpg", "label": "no",
            "text": format!("Is there a cat in the image?\n{VQA_SUFFIX}")}))
        .expect("question");
        assert_eq!(q.to_question().text.matches(VQA_SUFFIX).count(), 1);
        let q: YesNoQuestion = serde_json::from_value(serde_json::json!({
            "question_id": "b", "image": "x.jpg", "label": "yes",
            "question": "Is there a cat in the image?"}))
        .expect("question");
        assert_eq!(
            q.to_question().text,
            format!("Is there a cat in the image?\n{VQA_SUFFIX}")
        );
    }

    #[test]
    fn bad_labels_and_duplicates_name_the_line() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("pope.jsonl");
        std::fs::write(
            &path,
            "{\"question_id\": 1, \"text\": \"Is there a cat?\", \"label\": \"yes\"}\n{\"question_id\": 2, \"text\": \"Is there a dog?\", \"label\": \"maybe\"}\n",
        )
        .expect("write");
        let e = read_yes_no_questions(&path)
            .expect_err("bad label")
            .to_string();
        assert!(e.contains(":2") || e.contains("line 2"), "{e}");
        assert!(e.contains("maybe"), "{e}");
        std::fs::write(
            &path,
            "{\"question_id\": 1, \"text\": \"Is there a cat?\", \"label\": \"yes\"}\n{\"question_id\": 1, \"text\": \"Is there a dog?\", \"label\": \"no\"}\n",
        )
        .expect("write");
        let e = read_yes_no_questions(&path)
            .expect_err("duplicate")
            .to_string();
        assert!(e.contains("duplicate question_id 1"), "{e}");
    }
}
