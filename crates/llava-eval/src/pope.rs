//! POPE, the object-hallucination benchmark LLaVA-1.5 reports: "Is there a {object} in the
//! image?" with a yes/no label, in three splits (`random`, `popular`, `adversarial`) that pick
//! the absent objects ever more cunningly. A reply counts as "no" when its first sentence has
//! the word no or not, else as "yes", as the benchmark's own scoring reads free-form replies;
//! "yes" is the positive class of precision, recall and F1.

use std::collections::HashMap;

use serde::Serialize;

use crate::jsonl::{Answer, QuestionId};
use crate::tally::{ByCategory, answered};
use crate::yes_no::YesNoQuestion;

/// Whether a reply says yes, as POPE's own scoring reads it so that figures compare: only the
/// text before the first full stop counts, commas dropped; the word "no", "No" or "not"
/// there (words split at spaces) makes it a no, anything else a yes.
pub fn says_yes(reply: &str) -> bool {
    let first = reply
        .trim()
        .split('.')
        .next()
        .unwrap_or("")
        .replace(',', "");
    !first.split(' ').any(|w| matches!(w, "no" | "No" | "not"))
}

/// Counts and rates of one split, in percent; a rate with an empty denominator is `None`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PopeMetrics {
    pub true_pos: usize,
    pub false_pos: usize,
    pub true_neg: usize,
    pub false_neg: usize,
    pub accuracy: Option<f64>,
    pub precision: Option<f64>,
    pub recall: Option<f64>,
    pub f1: Option<f64>,
    /// How often the model said yes: a well-calibrated model says it about half the time.
    pub yes_ratio: Option<f64>,
}

impl PopeMetrics {
    fn record(&mut self, label_yes: bool, said_yes: bool) {
        match (label_yes, said_yes) {
            (true, true) => self.true_pos += 1,
            (false, true) => self.false_pos += 1,
            (false, false) => self.true_neg += 1,
            (true, false) => self.false_neg += 1,
        }
    }

    fn finish(&mut self) {
        let pct = |num: usize, den: usize| (den > 0).then(|| num as f64 / den as f64 * 100.0);
        let total = self.true_pos + self.false_pos + self.true_neg + self.false_neg;
        self.accuracy = pct(self.true_pos + self.true_neg, total);
        self.precision = pct(self.true_pos, self.true_pos + self.false_pos);
        self.recall = pct(self.true_pos, self.true_pos + self.false_neg);
        self.f1 = match (self.precision, self.recall) {
            (Some(p), Some(r)) if p + r > 0.0 => Some(2.0 * p * r / (p + r)),
            _ => None,
        };
        self.yes_ratio = pct(self.true_pos + self.false_pos, total);
    }
}

/// Metrics overall and per split (`category`).
pub type PopeSummary = ByCategory<PopeMetrics>;

/// Scores the answers; questions without an answer are not scored, and their number is
/// returned alongside.
pub fn score_pope(
    questions: &[YesNoQuestion],
    answers: &HashMap<QuestionId, Answer>,
) -> (PopeSummary, usize) {
    let (pairs, missing) = answered(questions, answers, |q| &q.question_id);
    let mut summary = PopeSummary::default();
    for (q, a) in pairs {
        let said = says_yes(&a.text);
        summary.record(q.category.as_deref(), |m| m.record(q.is_yes(), said));
    }
    summary.for_each(PopeMetrics::finish);
    (summary, missing)
}

/// One row per split and an overall row, as the paper's POPE table lists them.
pub fn format_pope_summary(s: &PopeSummary) -> String {
    let cell = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    let mut out = format!(
        "{:<14} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}\n",
        "split", "accuracy", "precision", "recall", "f1", "yes %", "total"
    );
    let rows = s
        .categories
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .chain([("overall", &s.overall)]);
    for (name, m) in rows {
        let total = m.true_pos + m.false_pos + m.true_neg + m.false_neg;
        out.push_str(&format!(
            "{:<14} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}\n",
            name,
            cell(m.accuracy),
            cell(m.precision),
            cell(m.recall),
            cell(m.f1),
            cell(m.yes_ratio),
            total
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_read_from_their_first_sentence() {
        assert!(says_yes("Yes"));
        assert!(says_yes("Yes, there is a dog in the image."));
        assert!(!says_yes("No"));
        assert!(!says_yes("No, there is no dog."));
        assert!(!says_yes("There is not a dog in the image."));
        assert!(!says_yes("no,"));
        // Only the first sentence counts, and "no" must be a word.
        assert!(says_yes("Yes. There is no cat, though."));
        assert!(says_yes("There is a notebook."));
        assert!(says_yes(""));
        // The benchmark's words only: "NO" and "Not" are not among them.
        assert!(says_yes("NO"));
        assert!(says_yes("Not at all"));
    }

    #[test]
    fn metrics_by_hand() {
        let q = |id: i64, label: &str, cat: &str| -> YesNoQuestion {
            serde_json::from_value(serde_json::json!({
                "question_id": id, "image": "x.jpg", "text": "Is there a dog in the image?",
                "label": label, "category": cat}))
            .expect("question")
        };
        let questions = [
            q(1, "yes", "random"),
            q(2, "yes", "random"),
            q(3, "no", "random"),
            q(4, "no", "adversarial"),
            q(5, "no", "adversarial"),
            q(6, "yes", "adversarial"),
        ];
        let answer = crate::jsonl::test_answer;
        // TP 1, FN 2 (ids 2, 6), TN 1 (id 3), FP 2 (ids 4, 5).
        let answers: HashMap<_, _> = [
            answer(1, "Yes"),
            answer(2, "No."),
            answer(3, "no"),
            answer(4, "Yes, there is."),
            answer(5, "yes"),
            answer(6, "There is not."),
        ]
        .into_iter()
        .collect();
        let (s, missing) = score_pope(&questions, &answers);
        assert_eq!(missing, 0);
        let o = &s.overall;
        assert_eq!(
            (o.true_pos, o.false_pos, o.true_neg, o.false_neg),
            (1, 2, 1, 2)
        );
        let close = |a: Option<f64>, b: f64| assert!((a.expect("rate") - b).abs() < 1e-9, "{a:?}");
        close(o.accuracy, 2.0 / 6.0 * 100.0);
        close(o.precision, 1.0 / 3.0 * 100.0);
        close(o.recall, 1.0 / 3.0 * 100.0);
        close(o.f1, 1.0 / 3.0 * 100.0);
        close(o.yes_ratio, 50.0);
        let random = &s.categories["random"];
        close(random.accuracy, 2.0 / 3.0 * 100.0);
        close(random.precision, 100.0);
        close(random.recall, 50.0);
        // No true positive in a split: precision and recall are 0, and F1 is undefined.
        let adversarial = &s.categories["adversarial"];
        close(adversarial.precision, 0.0);
        assert_eq!(adversarial.f1, None);
        let table = format_pope_summary(&s);
        assert!(
            table.contains("adversarial") && table.contains("overall"),
            "{table}"
        );
    }
}
