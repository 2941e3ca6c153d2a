//! Multiple-choice evaluation (ScienceQA-style): the prompt, the answer letter read from a
//! reply, and accuracy overall and per category.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::EvalError;
use crate::jsonl::{Answer, Question, QuestionId, read_question_file};
use crate::tally::{ByCategory, answered};

/// The instruction LLaVA appends to multiple-choice prompts.
pub const MC_SUFFIX: &str = "Answer with the option's letter from the given choices directly.";

/// The letter of option `i` (0 → `A`), for up to 26 options.
pub fn option_letter(i: usize) -> Option<char> {
    (i < 26).then(|| char::from(b'A' + i as u8))
}

/// The prompt: an optional `Context:` line, the question, the options as `A. …` lines,
/// and [`MC_SUFFIX`]. Options past the 26th cannot be lettered and are left out.
pub fn mc_prompt(question: &str, options: &[String], context: Option<&str>) -> String {
    let mut s = String::new();
    if let Some(c) = context.map(str::trim).filter(|c| !c.is_empty()) {
        s.push_str("Context: ");
        s.push_str(c);
        s.push('\n');
    }
    s.push_str(question.trim());
    s.push('\n');
    for (i, o) in options.iter().enumerate() {
        if let Some(l) = option_letter(i) {
            s.push_str(&format!("{l}. {}\n", o.trim()));
        }
    }
    s.push_str(MC_SUFFIX);
    s
}

fn in_range(c: char, n_options: usize) -> Option<usize> {
    let i = (c.to_ascii_uppercase() as usize).checked_sub('A' as usize)?;
    (c.is_ascii_alphabetic() && i < n_options).then_some(i)
}

/// The chosen option's index (0 = `A`) in a reply, for a question with `n_options` options.
///
/// Accepted: a bare letter in either case (`B`, `b`), with punctuation (`B.`, `(B)`, `B)`,
/// `B: Paris`), and "the answer is B". A reply that merely starts with a capital word such as
/// "A dog…" is not read as option A.
pub fn parse_choice(reply: &str, n_options: usize) -> Option<usize> {
    let s = reply
        .trim()
        .trim_matches(|c: char| c == '*' || c == '"' || c == '\'');
    let first = s.split_whitespace().next()?;
    let core = first.trim_matches(|c: char| matches!(c, '(' | ')' | '.' | ':' | ',' | '['));
    let punctuated = core.len() < first.len();
    let alone = s.split_whitespace().nth(1).is_none();
    if core.chars().count() == 1
        && (alone || punctuated)
        && let Some(c) = core.chars().next()
        && let Some(i) = in_range(c, n_options)
    {
        return Some(i);
    }
    let lower = s.to_ascii_lowercase();
    for pat in ["answer is", "answer:", "option"] {
        let mut from = 0;
        while let Some(p) = lower[from..].find(pat) {
            let rest = &s[from + p + pat.len()..];
            from += p + pat.len();
            let rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == '(' || c == ':');
            let mut chars = rest.chars();
            if let Some(c) = chars.next()
                && !chars.next().is_some_and(|d| d.is_ascii_alphanumeric())
                && let Some(i) = in_range(c, n_options)
            {
                return Some(i);
            }
        }
    }
    None
}

/// Accuracy of one group.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Accuracy {
    pub total: usize,
    pub correct: usize,
    /// Replies from which no option could be read (counted as wrong).
    pub unparsed: usize,
    /// `correct / total × 100`, `None` for an empty group.
    pub accuracy: Option<f64>,
}

impl Accuracy {
    fn add(&mut self, predicted: Option<usize>, answer: usize) {
        self.record(predicted == Some(answer), predicted.is_some());
    }

    /// Counts one scored item; an unparsed reply is wrong.
    pub(crate) fn record(&mut self, correct: bool, parsed: bool) {
        self.total += 1;
        if correct {
            self.correct += 1;
        }
        if !parsed {
            self.unparsed += 1;
        }
        self.accuracy = Some(self.correct as f64 / self.total as f64 * 100.0);
    }
}

/// Overall and per-category accuracy.
pub type McSummary = ByCategory<Accuracy>;

/// One scored item: its category (e.g. ScienceQA's subject), the parsed prediction and the
/// index of the right option.
#[derive(Debug, Clone, PartialEq)]
pub struct McResult {
    pub category: String,
    pub predicted: Option<usize>,
    pub answer: usize,
}

/// Accuracy of `results`, overall and per category (empty categories are not listed).
pub fn mc_accuracy(results: &[McResult]) -> McSummary {
    let mut s = McSummary::default();
    for r in results {
        s.record(Some(&r.category), |a| a.add(r.predicted, r.answer));
    }
    s
}

/// The right option: its index (0-based, as ScienceQA stores it) or its letter.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum AnswerKey {
    Index(usize),
    Letter(String),
}

/// One multiple-choice question (ScienceQA-style). `text`/`choices`/`hint`/`subject` are
/// accepted as the ScienceQA names of `question`/`options`/`context`/`category`.
#[derive(Debug, Clone, Deserialize)]
pub struct McQuestion {
    pub question_id: QuestionId,
    #[serde(alias = "text")]
    pub question: String,
    #[serde(alias = "choices")]
    pub options: Vec<String>,
    pub answer: AnswerKey,
    #[serde(default, alias = "hint")]
    pub context: Option<String>,
    #[serde(default, alias = "subject")]
    pub category: Option<String>,
    #[serde(default)]
    pub image: Option<String>,
}

impl McQuestion {
    /// The right option's index, if the key names an existing option.
    pub fn answer_index(&self) -> Option<usize> {
        let i = match &self.answer {
            AnswerKey::Index(i) => *i,
            AnswerKey::Letter(l) => {
                let mut c = l.trim().chars();
                let first = c.next()?;
                if c.next().is_some() {
                    return None;
                }
                in_range(first, 26)?
            }
        };
        (i < self.options.len()).then_some(i)
    }

    /// The question as a benchmark question for `eval answer`, its prompt built by
    /// [`mc_prompt`].
    pub fn to_question(&self) -> Question {
        Question {
            question_id: self.question_id.clone(),
            image: self.image.clone().unwrap_or_default(),
            text: mc_prompt(&self.question, &self.options, self.context.as_deref()),
            category: self.category.clone().unwrap_or_default(),
        }
    }
}

/// Reads a multiple-choice file. Duplicate ids, no options, more than 26 options, or an
/// answer key that names no option are errors naming the line.
pub fn read_mc_questions(path: &Path) -> Result<Vec<McQuestion>, EvalError> {
    read_question_file(
        path,
        |q: &McQuestion| &q.question_id,
        |q| {
            if q.options.is_empty() || q.options.len() > 26 {
                return Err(format!(
                    "a question needs 1 to 26 options, found {}",
                    q.options.len()
                ));
            }
            if q.answer_index().is_none() {
                return Err(format!("the answer {:?} names no option", q.answer));
            }
            Ok(())
        },
    )
}

/// Scores answers against the key. Questions without an answer are not scored; their
/// number is returned alongside the summary.
pub fn score_answers(
    questions: &[McQuestion],
    answers: &HashMap<QuestionId, Answer>,
) -> (McSummary, usize) {
    let (pairs, mut missing) = answered(questions, answers, |q| &q.question_id);
    let mut results = Vec::new();
    for (q, a) in pairs {
        let Some(answer) = q.answer_index() else {
            missing += 1;
            continue;
        };
        results.push(McResult {
            category: q.category.clone().unwrap_or_default(),
            predicted: parse_choice(&a.text, q.options.len()),
            answer,
        });
    }
    (mc_accuracy(&results), missing)
}

/// The accuracy table: one row per category and an overall row.
pub fn format_mc_summary(s: &McSummary) -> String {
    let width = s
        .categories
        .keys()
        .map(|k| k.chars().count())
        .chain([8])
        .max()
        .unwrap_or(8);
    let mut out = format!(
        "{:<width$}  {:>8}  {:>7}  {:>5}  {:>8}\n",
        "category", "accuracy", "correct", "total", "unparsed"
    );
    let mut row = |name: &str, a: &Accuracy| {
        let acc = a.accuracy.map_or("-".to_string(), |v| format!("{v:.2}"));
        out.push_str(&format!(
            "{:<width$}  {:>8}  {:>7}  {:>5}  {:>8}\n",
            name, acc, a.correct, a.total, a.unparsed
        ));
    };
    for (k, a) in &s.categories {
        row(k, a);
    }
    row("overall", &s.overall);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_layout() {
        let opts = vec!["Paris".to_string(), " London ".to_string()];
        assert_eq!(
            mc_prompt("Which is the capital of France?", &opts, Some("Europe.")),
            "Context: Europe.\nWhich is the capital of France?\nA. Paris\nB. London\n\
             Answer with the option's letter from the given choices directly."
        );
        assert_eq!(
            mc_prompt("Q?", &opts, Some("  ")),
            "Q?\nA. Paris\nB. London\nAnswer with the option's letter from the given choices directly."
        );
        assert_eq!(option_letter(25), Some('Z'));
        assert_eq!(option_letter(26), None);
    }

    #[test]
    fn letter_shapes() {
        for r in [
            "B",
            "B.",
            "b",
            "b.",
            "(B)",
            "B)",
            " B \n",
            "The answer is B.",
            "the answer is (b)",
            "B. London",
            "Answer: B",
            "**B**",
            "I think the answer is B because...",
        ] {
            assert_eq!(parse_choice(r, 4), Some(1), "{r:?}");
        }
        assert_eq!(parse_choice("A", 4), Some(0));
        assert_eq!(parse_choice("D", 4), Some(3));
    }

    #[test]
    fn non_answers_are_none() {
        for r in [
            "",
            "A dog is running.",
            "E",
            "e.",
            "I am not sure.",
            "The answer is Bob.",
            "Both",
            "42",
        ] {
            assert_eq!(parse_choice(r, 4), None, "{r:?}");
        }
    }

    #[test]
    fn accuracy_by_hand() {
        let r = |c: &str, p: Option<usize>, a: usize| McResult {
            category: c.into(),
            predicted: p,
            answer: a,
        };
        let s = mc_accuracy(&[
            r("natural science", Some(1), 1),
            r("natural science", Some(0), 1),
            r("natural science", None, 2),
            r("social science", Some(3), 3),
        ]);
        assert_eq!(s.overall.total, 4);
        assert_eq!(s.overall.correct, 2);
        assert_eq!(s.overall.unparsed, 1);
        assert_eq!(s.overall.accuracy, Some(50.0));
        let ns = &s.categories["natural science"];
        assert_eq!((ns.total, ns.correct), (3, 1));
        assert!((ns.accuracy.unwrap() - 33.333_333).abs() < 1e-4);
        assert_eq!(s.categories["social science"].accuracy, Some(100.0));
        assert_eq!(mc_accuracy(&[]).overall.accuracy, None);
    }

    #[test]
    fn key_file_and_scoring() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sqa.jsonl");
        std::fs::write(
            &p,
            concat!(
                r#"{"question_id": "q1", "question": "Capital of France?", "choices": ["Paris", "Rome"], "answer": 0, "subject": "social science", "hint": "Europe."}"#,
                "\n",
                r#"{"question_id": "q2", "text": "Which is a mammal?", "options": ["Frog", "Cat", "Fish"], "answer": "B", "category": "natural science"}"#,
                "\n",
                r#"{"question_id": "q3", "question": "2+2?", "options": ["3", "4"], "answer": 1, "category": "natural science"}"#,
                "\n",
                r#"{"question_id": "q4", "question": "Unanswered?", "options": ["x", "y"], "answer": "a"}"#,
                "\n"
            ),
        )
        .unwrap();
        let qs = read_mc_questions(&p).unwrap();
        assert_eq!(qs.len(), 4);
        assert_eq!(qs[1].answer_index(), Some(1));
        assert_eq!(qs[3].answer_index(), Some(0));
        let q = qs[0].to_question();
        assert_eq!(q.category, "social science");
        assert!(
            q.text
                .starts_with("Context: Europe.\nCapital of France?\nA. Paris\nB. Rome\n")
        );
        let ans = |id: &str, t: &str| {
            (
                QuestionId::Str(id.into()),
                Answer {
                    question_id: QuestionId::Str(id.into()),
                    prompt: String::new(),
                    text: t.into(),
                    answer_id: None,
                    model_id: None,
                    metadata: serde_json::Value::Null,
                },
            )
        };
        let answers: HashMap<_, _> = [
            ans("q1", "a"),
            ans("q2", "The answer is B."),
            ans("q3", "I don't know"),
        ]
        .into_iter()
        .collect();
        let (s, missing) = score_answers(&qs, &answers);
        assert_eq!(missing, 1);
        assert_eq!(
            (s.overall.total, s.overall.correct, s.overall.unparsed),
            (3, 2, 1)
        );
        assert!((s.overall.accuracy.unwrap() - 200.0 / 3.0).abs() < 1e-9);
        assert_eq!(s.categories["natural science"].accuracy, Some(50.0));
        assert_eq!(s.categories["social science"].accuracy, Some(100.0));
        let table = format_mc_summary(&s);
        assert!(
            table.contains("66.67") && table.contains("overall"),
            "{table}"
        );

        // A key naming no option, and no options, are errors with the line.
        std::fs::write(
            &p,
            r#"{"question_id": 1, "question": "q", "options": ["a"], "answer": "C"}"#,
        )
        .unwrap();
        let e = read_mc_questions(&p).unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("names no option"), "{e}");
        std::fs::write(
            &p,
            r#"{"question_id": 1, "question": "q", "options": [], "answer": 0}"#,
        )
        .unwrap();
        let e = read_mc_questions(&p).unwrap_err().to_string();
        assert!(e.contains("1 to 26 options"), "{e}");
    }
}
