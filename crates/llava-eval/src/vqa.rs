//! Short-answer VQA prompting (LLaVA-1.5's VQAv2/GQA style) and exact-match scoring after
//! normalisation, so that "Two." and "2" or "the dog" and "dog" count as the same answer.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

use crate::error::EvalError;
use crate::jsonl::{Answer, Question, QuestionId, read_question_file};
use crate::mc::McSummary;
use crate::tally::answered;

/// The instruction LLaVA-1.5 appends to short-answer questions.
pub const VQA_SUFFIX: &str = "Answer the question using a single word or phrase.";

/// The question with the short-answer instruction on its own line.
pub fn vqa_prompt(question: &str) -> String {
    format!("{}\n{VQA_SUFFIX}", question.trim())
}

const NUMBERS: [&str; 11] = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
];

/// Lower case, punctuation to spaces (a decimal point between digits is kept), articles
/// dropped, number words as digits, whitespace collapsed.
pub fn normalize_answer(s: &str) -> String {
    let lower = s.trim().to_lowercase();
    let chars: Vec<char> = lower.chars().collect();
    let mut cleaned = String::with_capacity(lower.len());
    for (i, &c) in chars.iter().enumerate() {
        let decimal_point = c == '.'
            && i > 0
            && chars[i - 1].is_ascii_digit()
            && chars.get(i + 1).is_some_and(|n| n.is_ascii_digit());
        if c.is_alphanumeric() || c.is_whitespace() || decimal_point {
            cleaned.push(c);
        } else if c == '\'' {
            // "dog's" → "dogs", as the VQA evaluation does
        } else {
            cleaned.push(' ');
        }
    }
    cleaned
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .map(|w| match NUMBERS.iter().position(|n| *n == w) {
            Some(d) => d.to_string(),
            None => w.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether the prediction equals any reference answer after [`normalize_answer`].
pub fn exact_match(prediction: &str, references: &[String]) -> bool {
    let p = normalize_answer(prediction);
    !p.is_empty() && references.iter().any(|r| normalize_answer(r) == p)
}

/// Reference answers: one string, or a list (VQAv2 has ten per question).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum References {
    One(String),
    Many(Vec<String>),
}

/// One short-answer question. `text` and `answer` are accepted for `question` and `answers`.
#[derive(Debug, Clone, Deserialize)]
pub struct VqaQuestion {
    pub question_id: QuestionId,
    #[serde(alias = "text")]
    pub question: String,
    #[serde(alias = "answer")]
    pub answers: References,
    #[serde(default, alias = "question_type")]
    pub category: Option<String>,
    #[serde(default)]
    pub image: Option<String>,
}

impl VqaQuestion {
    pub fn references(&self) -> Vec<String> {
        match &self.answers {
            References::One(a) => vec![a.clone()],
            References::Many(v) => v.clone(),
        }
    }

    /// The question for `eval answer`, with the short-answer instruction.
    pub fn to_question(&self) -> Question {
        Question {
            question_id: self.question_id.clone(),
            image: self.image.clone().unwrap_or_default(),
            text: vqa_prompt(&self.question),
            category: self.category.clone().unwrap_or_default(),
        }
    }
}

/// Reads a short-answer file. Duplicate ids and questions without a reference answer are
/// errors naming the line.
pub fn read_vqa_questions(path: &Path) -> Result<Vec<VqaQuestion>, EvalError> {
    read_question_file(
        path,
        |q: &VqaQuestion| &q.question_id,
        |q| {
            if q.references()
                .iter()
                .all(|r| normalize_answer(r).is_empty())
            {
                return Err("no reference answer".into());
            }
            Ok(())
        },
    )
}

/// Exact-match accuracy overall and per category. Questions without an answer are not
/// scored; their number is returned alongside.
pub fn score_vqa(
    questions: &[VqaQuestion],
    answers: &HashMap<QuestionId, Answer>,
) -> (McSummary, usize) {
    let (pairs, missing) = answered(questions, answers, |q| &q.question_id);
    let mut summary = McSummary::default();
    for (q, a) in pairs {
        let parsed = !normalize_answer(&a.text).is_empty();
        let correct = exact_match(&a.text, &q.references());
        summary.record(q.category.as_deref(), |s| s.record(correct, parsed));
    }
    (summary, missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_and_scoring() {
        let dir = std::env::temp_dir().join(format!("llava-vqa-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("vqa.jsonl");
        std::fs::write(
            &path,
            concat!(
                r#"{"question_id": 1, "text": "How many cats?", "answer": "two", "category": "count"}"#,
                "\n",
                r#"{"question_id": 2, "question": "What colour?", "answers": ["red", "dark red"], "category": "colour"}"#,
                "\n",
                r#"{"question_id": 3, "question": "Which side?", "answers": ["left"], "category": "colour"}"#,
                "\n"
            ),
        )
        .expect("write");
        let qs = read_vqa_questions(&path).expect("reads");
        assert_eq!(
            qs[0].to_question().text,
            "How many cats?\nAnswer the question using a single word or phrase."
        );
        let answer = crate::jsonl::test_answer;
        let answers: HashMap<_, _> = [answer(1, "2"), answer(2, "Dark red."), answer(3, "")]
            .into_iter()
            .collect();
        let (s, missing) = score_vqa(&qs, &answers);
        assert_eq!(missing, 0);
        assert_eq!(
            (s.overall.correct, s.overall.total, s.overall.unparsed),
            (2, 3, 1)
        );
        assert_eq!(s.categories["colour"].accuracy, Some(50.0));
        assert_eq!(s.categories["count"].accuracy, Some(100.0));

        std::fs::write(&path, r#"{"question_id": 1, "text": "Q", "answers": [""]}"#)
            .expect("write");
        let e = read_vqa_questions(&path)
            .expect_err("no reference")
            .to_string();
        assert!(e.contains("no reference answer"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn prompt_has_the_suffix_line() {
        assert_eq!(
            vqa_prompt(" What colour is the bus? "),
            "What colour is the bus?\nAnswer the question using a single word or phrase."
        );
    }

    #[test]
    fn normalisation() {
        assert_eq!(normalize_answer("Two."), "2");
        assert_eq!(normalize_answer("  The Red  Bus! "), "red bus");
        assert_eq!(normalize_answer("3.5"), "3.5");
        assert_eq!(normalize_answer("dog's"), "dogs");
        assert_eq!(normalize_answer("yes, it is"), "yes it is");
        assert_eq!(normalize_answer("..."), "");
    }

    #[test]
    fn matching() {
        let refs = vec!["2".to_string(), "two dogs".to_string()];
        assert!(exact_match("Two", &refs));
        assert!(exact_match("two dogs.", &refs));
        assert!(!exact_match("three", &refs));
        assert!(!exact_match("", &["".to_string()]));
        assert!(exact_match("A cat", &["cat".to_string()]));
    }
}
