//! MME, the yes/no perception and cognition benchmark LLaVA-1.5 reports (1510.7 perception
//! for the 13B): every image has two questions, one whose answer is yes and one no. A subtask
//! scores `acc + acc+`: the percentage of questions answered right, plus the percentage of
//! images whose questions are all answered right (at most 200). Perception sums ten subtasks,
//! cognition four.
//!
//! A reply is read as the benchmark's scoring reads it: exactly "yes" or "no" (any case), else
//! a "yes" or "no" within its first four characters, else neither, which counts as wrong.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::jsonl::{Answer, QuestionId};
use crate::tally::answered;
use crate::yes_no::YesNoQuestion;

/// The perception subtasks, by the names of MME's folders.
pub const PERCEPTION: [&str; 10] = [
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
];
/// The cognition subtasks.
pub const COGNITION: [&str; 4] = [
    "commonsense_reasoning",
    "numerical_calculation",
    "text_translation",
    "code_reasoning",
];

/// `Some(true)` for yes, `Some(false)` for no, `None` for a reply that is neither.
pub fn read_reply(reply: &str) -> Option<bool> {
    let reply = reply.trim().to_lowercase();
    match reply.as_str() {
        "yes" => return Some(true),
        "no" => return Some(false),
        _ => {}
    }
    let start: String = reply.chars().take(4).collect();
    if start.contains("yes") {
        Some(true)
    } else if start.contains("no") {
        Some(false)
    } else {
        None
    }
}

/// One subtask's result, in percent.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MmeSubtask {
    pub questions: usize,
    pub images: usize,
    /// Replies that were neither yes nor no (counted wrong).
    pub unreadable: usize,
    pub acc: f64,
    pub acc_plus: f64,
    pub score: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MmeSummary {
    pub subtasks: BTreeMap<String, MmeSubtask>,
    /// The sums over the perception and cognition subtasks present.
    pub perception: f64,
    pub cognition: f64,
}

/// Scores the answers per subtask (`category`); questions without an answer are not scored,
/// and their number is returned alongside.
pub fn score_mme(
    questions: &[YesNoQuestion],
    answers: &HashMap<QuestionId, Answer>,
) -> (MmeSummary, usize) {
    // subtask → image → whether each of its questions was answered right.
    let mut results: BTreeMap<String, BTreeMap<String, Vec<bool>>> = BTreeMap::new();
    let mut unreadable: HashMap<String, usize> = HashMap::new();
    let (pairs, missing) = answered(questions, answers, |q| &q.question_id);
    for (q, a) in pairs {
        let subtask = q.category.clone().unwrap_or_default().trim().to_string();
        let reply = read_reply(&a.text);
        if reply.is_none() {
            *unreadable.entry(subtask.clone()).or_default() += 1;
        }
        let image = q.image.clone().unwrap_or_default();
        results
            .entry(subtask)
            .or_default()
            .entry(image)
            .or_default()
            .push(reply == Some(q.is_yes()));
    }
    let mut summary = MmeSummary::default();
    for (name, images) in results {
        let questions: usize = images.values().map(Vec::len).sum();
        let right = images.values().flatten().filter(|&&r| r).count();
        let all_right = images.values().filter(|r| r.iter().all(|&r| r)).count();
        let acc = right as f64 / questions as f64 * 100.0;
        let acc_plus = all_right as f64 / images.len() as f64 * 100.0;
        let sub = MmeSubtask {
            questions,
            images: images.len(),
            unreadable: unreadable.get(&name).copied().unwrap_or(0),
            acc,
            acc_plus,
            score: acc + acc_plus,
        };
        if PERCEPTION.contains(&name.as_str()) {
            summary.perception += sub.score;
        } else if COGNITION.contains(&name.as_str()) {
            summary.cognition += sub.score;
        }
        summary.subtasks.insert(name, sub);
    }
    (summary, missing)
}

/// One row per subtask, then the perception and cognition totals.
pub fn format_mme_summary(s: &MmeSummary) -> String {
    let mut out = format!(
        "{:<24} {:>8} {:>8} {:>8} {:>9} {:>10}\n",
        "subtask", "acc", "acc+", "score", "questions", "unreadable"
    );
    for (name, t) in &s.subtasks {
        out.push_str(&format!(
            "{:<24} {:>8.2} {:>8.2} {:>8.2} {:>9} {:>10}\n",
            name, t.acc, t.acc_plus, t.score, t.questions, t.unreadable
        ));
    }
    out.push_str(&format!(
        "perception {:.2}, cognition {:.2}\n",
        s.perception, s.cognition
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_read_as_the_benchmark_reads_them() {
        assert_eq!(read_reply("Yes"), Some(true));
        assert_eq!(read_reply(" no\n"), Some(false));
        assert_eq!(read_reply("Yes, it is."), Some(true));
        assert_eq!(read_reply("No, there is none."), Some(false));
        // Only the first four characters are searched.
        assert_eq!(read_reply("There is no dog."), None);
        assert_eq!(read_reply("not really"), Some(false));
        assert_eq!(read_reply(""), None);
    }

    #[test]
    fn scores_by_hand() {
        let q = |id: &str, image: &str, label: &str, cat: &str| -> YesNoQuestion {
            serde_json::from_value(serde_json::json!({
                "question_id": id, "image": image, "text": "Is it?", "label": label,
                "category": cat}))
            .expect("question")
        };
        let questions = [
            q("e1y", "e1.jpg", "yes", "existence"),
            q("e1n", "e1.jpg", "no", "existence"),
            q("e2y", "e2.jpg", "yes", "existence"),
            q("e2n", "e2.jpg", "no", "existence"),
            q("c1y", "c1.jpg", "yes", "code_reasoning"),
            q("c1n", "c1.jpg", "no", "code_reasoning"),
        ];
        let answer = crate::jsonl::test_answer;
        // Existence: image 1 both right; image 2 one right and one unreadable.
        let answers: HashMap<_, _> = [
            answer("e1y", "Yes"),
            answer("e1n", "No"),
            answer("e2y", "yes"),
            answer("e2n", "Maybe"),
            answer("c1y", "No"),
            answer("c1n", "No"),
        ]
        .into_iter()
        .collect();
        let (s, missing) = score_mme(&questions, &answers);
        assert_eq!(missing, 0);
        let e = &s.subtasks["existence"];
        assert_eq!((e.questions, e.images, e.unreadable), (4, 2, 1));
        assert_eq!((e.acc, e.acc_plus, e.score), (75.0, 50.0, 125.0));
        let c = &s.subtasks["code_reasoning"];
        assert_eq!((c.acc, c.acc_plus, c.score), (50.0, 0.0, 50.0));
        assert_eq!((s.perception, s.cognition), (125.0, 50.0));
        let table = format_mme_summary(&s);
        assert!(
            table.contains("perception 125.00, cognition 50.00"),
            "{table}"
        );
    }
}
