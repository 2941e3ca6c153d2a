//! Judge reviews (`{question_id, category, content, tuple: [s1, s2]}`, `[-1, -1]` when the
//! scores could not be read) and their summary, the paper's relative score:
//! mean(model) / mean(reference) × 100 over the parsed reviews, per category and overall.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::append::{AppendSink, Appendable, read_appendable};
use crate::error::EvalError;
use crate::jsonl::QuestionId;

/// The tuple recorded when no scores could be read from the judge.
pub const FAILED: [f64; 2] = [-1.0, -1.0];

/// One judged question. `tuple` is `[reference score, model score]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Review {
    pub question_id: QuestionId,
    pub category: String,
    /// The judge's full reply (the last one when it was asked again).
    pub content: String,
    pub tuple: [f64; 2],
}

impl Review {
    /// Whether the judge's scores were read (not the `[-1, -1]` marker).
    pub fn parsed(&self) -> bool {
        self.tuple.iter().all(|v| v.is_finite() && *v >= 0.0)
    }
}

/// What [`read_reviews`] found.
pub type ReviewFile = Appendable<Review>;

/// Reads a reviews file (see [`read_appendable`]: missing is empty, a torn last line is
/// tolerated) and keeps one review per question id:
///
/// - a failed review (`[-1, -1]`) is **superseded** by a later review of the same id, which
///   takes its place (its position in `records`). This is how `llava eval judge
///   --rejudge-failed` replaces a failure while the file stays append-only: the new review is
///   appended, and the last word on a failed question counts;
/// - any other later review of an id is a duplicate: counted in `duplicates` and ignored (the
///   first parsed review of an id is final, so concurrent or repeated runs cannot change a
///   score).
///
/// A file where every id appears once reads as before.
pub fn read_reviews(path: &Path) -> Result<ReviewFile, EvalError> {
    // Read every line without dropping repeats (a unique key per record), then merge by id.
    let line = std::cell::Cell::new(0i64);
    let raw = read_appendable(path, "a review", |_: &Review| {
        line.set(line.get() + 1);
        QuestionId::Int(line.get())
    })?;
    let mut records: Vec<Review> = Vec::with_capacity(raw.records.len());
    let mut at: HashMap<QuestionId, usize> = HashMap::new();
    let mut duplicates = 0;
    for r in raw.records {
        match at.get(&r.question_id) {
            None => {
                at.insert(r.question_id.clone(), records.len());
                records.push(r);
            }
            Some(&i) if !records[i].parsed() => records[i] = r,
            Some(_) => duplicates += 1,
        }
    }
    Ok(ReviewFile {
        records,
        duplicates,
        ..raw
    })
}

/// The reviews file opened for appending.
pub type ReviewSink = AppendSink;

/// Scores of one category (or of all reviews).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CategoryScore {
    /// Reviews counted.
    pub count: usize,
    /// Reviews whose scores were read.
    pub parsed: usize,
    /// Reviews recorded as `[-1, -1]`.
    pub failed: usize,
    /// Mean score of the reference answers (Assistant 1) over the parsed reviews.
    pub reference_mean: Option<f64>,
    /// Mean score of the model answers (Assistant 2) over the parsed reviews.
    pub model_mean: Option<f64>,
    /// `model_mean / reference_mean × 100`.
    pub relative: Option<f64>,
}

/// Per-category and overall scores.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub categories: BTreeMap<String, CategoryScore>,
    pub overall: CategoryScore,
}

#[derive(Default)]
struct Acc {
    count: usize,
    parsed: usize,
    sum: [f64; 2],
}

impl Acc {
    fn add(&mut self, r: &Review) {
        self.count += 1;
        if r.parsed() {
            self.parsed += 1;
            self.sum[0] += r.tuple[0];
            self.sum[1] += r.tuple[1];
        }
    }

    fn finish(&self) -> CategoryScore {
        let mean = |s: f64| (self.parsed > 0).then(|| s / self.parsed as f64);
        let reference_mean = mean(self.sum[0]);
        let model_mean = mean(self.sum[1]);
        let relative = match (reference_mean, model_mean) {
            (Some(r), Some(m)) if r > 0.0 => Some(m / r * 100.0),
            _ => None,
        };
        CategoryScore {
            count: self.count,
            parsed: self.parsed,
            failed: self.count - self.parsed,
            reference_mean,
            model_mean,
            relative,
        }
    }
}

/// The summary of `reviews`. Reviews without a category get a row named `(none)`.
pub fn summarize(reviews: &[Review]) -> Summary {
    let mut per: BTreeMap<String, Acc> = BTreeMap::new();
    let mut all = Acc::default();
    for r in reviews {
        let cat = if r.category.trim().is_empty() {
            "(none)".to_string()
        } else {
            r.category.trim().to_string()
        };
        per.entry(cat).or_default().add(r);
        all.add(r);
    }
    Summary {
        categories: per.into_iter().map(|(k, a)| (k, a.finish())).collect(),
        overall: all.finish(),
    }
}

/// The summary as a table, one row per category and an overall row, like the paper's.
pub fn format_summary(s: &Summary) -> String {
    let opt = |v: Option<f64>, d: usize| match v {
        Some(v) => format!("{v:.d$}"),
        None => "-".to_string(),
    };
    let width = s
        .categories
        .keys()
        .map(|k| k.chars().count())
        .chain([7])
        .max()
        .unwrap_or(7);
    let mut out = format!(
        "{:<width$}  {:>8}  {:>9}  {:>6}  {:>6}  {:>6}\n",
        "category", "relative", "reference", "model", "parsed", "failed"
    );
    let mut row = |name: &str, c: &CategoryScore| {
        out.push_str(&format!(
            "{:<width$}  {:>8}  {:>9}  {:>6}  {:>6}  {:>6}\n",
            name,
            opt(c.relative, 1),
            opt(c.reference_mean, 2),
            opt(c.model_mean, 2),
            c.parsed,
            c.failed
        ));
    };
    for (k, c) in &s.categories {
        row(k, c);
    }
    row("overall", &s.overall);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rv(id: i64, cat: &str, t: [f64; 2]) -> Review {
        Review {
            question_id: QuestionId::Int(id),
            category: cat.into(),
            content: format!("{} {}", t[0], t[1]),
            tuple: t,
        }
    }

    #[test]
    fn summary_arithmetic_by_hand() {
        let reviews = vec![
            rv(1, "conv", [8.0, 6.0]),
            rv(2, "conv", [10.0, 9.0]),
            rv(3, "conv", FAILED),
            rv(4, "detail", [5.0, 5.0]),
            rv(5, "complex", [8.0, 7.5]),
            rv(6, "complex", [6.0, 7.5]),
        ];
        let s = summarize(&reviews);
        let conv = &s.categories["conv"];
        // parsed: (8+10)/2 = 9 reference, (6+9)/2 = 7.5 model, 7.5/9 = 83.33…%
        assert_eq!((conv.count, conv.parsed, conv.failed), (3, 2, 1));
        assert_eq!(conv.reference_mean, Some(9.0));
        assert_eq!(conv.model_mean, Some(7.5));
        assert!((conv.relative.unwrap() - 83.333_333).abs() < 1e-4);
        assert_eq!(s.categories["detail"].relative, Some(100.0));
        // complex: 7 reference, 7.5 model → 107.14…%
        assert!((s.categories["complex"].relative.unwrap() - 107.142_857).abs() < 1e-4);
        // overall over the 5 parsed: reference 37/5 = 7.4, model 35/5 = 7.0 → 94.59…%
        let o = &s.overall;
        assert_eq!((o.count, o.parsed, o.failed), (6, 5, 1));
        assert!((o.reference_mean.unwrap() - 7.4).abs() < 1e-12);
        assert!((o.model_mean.unwrap() - 7.0).abs() < 1e-12);
        assert!((o.relative.unwrap() - 94.594_594).abs() < 1e-4);
        let table = format_summary(&s);
        assert!(table.contains("overall"), "{table}");
        assert!(table.contains("94.6"), "{table}");
        assert!(table.contains("83.3"), "{table}");
    }

    #[test]
    fn all_failed_or_empty_has_no_ratio() {
        let s = summarize(&[rv(1, "conv", FAILED)]);
        assert_eq!(s.overall.relative, None);
        assert_eq!(s.overall.failed, 1);
        let s = summarize(&[]);
        assert_eq!(s.overall.count, 0);
        assert!(s.categories.is_empty());
        assert!(format_summary(&s).contains("overall"));
        // A zero reference mean gives no ratio rather than infinity.
        let s = summarize(&[rv(1, "c", [0.0, 5.0])]);
        assert_eq!(s.overall.relative, None);
    }

    #[test]
    fn reading_tolerates_a_torn_tail_and_counts_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.jsonl");
        let a = serde_json::to_string(&rv(1, "conv", [8.0, 7.0])).unwrap();
        let b = serde_json::to_string(&rv(1, "conv", [1.0, 1.0])).unwrap();
        std::fs::write(&p, format!("{a}\n\n{b}\n{{\"question_id\": 2, \"cat")).unwrap();
        let f = read_reviews(&p).unwrap();
        assert_eq!(f.records.len(), 1);
        assert_eq!(f.records[0].tuple, [8.0, 7.0]);
        assert_eq!(f.duplicates, 1);
        assert!(f.torn_tail.is_some());
        // Appending cuts the torn line first.
        let mut sink = ReviewSink::open(&p, &f).unwrap();
        sink.write(&rv(2, "detail", [6.0, 6.0])).unwrap();
        let again = read_reviews(&p).unwrap();
        assert_eq!(again.records.len(), 2);
        assert!(again.torn_tail.is_none());
        assert!(std::fs::read_to_string(&p).unwrap().ends_with("}\n"));
        // A bad complete line is an error naming it.
        std::fs::write(&p, format!("{a}\nnot json\n")).unwrap();
        let e = read_reviews(&p).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
        // A missing file is empty.
        assert!(
            read_reviews(&dir.path().join("none"))
                .unwrap()
                .records
                .is_empty()
        );
    }

    #[test]
    fn a_later_review_supersedes_a_failed_one_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.jsonl");
        let lines = [
            rv(1, "conv", FAILED),
            rv(2, "conv", [8.0, 7.0]),
            rv(3, "detail", FAILED),
            rv(1, "conv", [6.0, 5.0]), // replaces the failure of 1, in its place
            rv(2, "conv", [1.0, 1.0]), // a duplicate: 2 was parsed
            rv(3, "detail", FAILED),   // still failed: the last failure is kept
            rv(1, "conv", [2.0, 2.0]), // a duplicate: 1 is parsed now
        ];
        let mut text = String::new();
        for (i, r) in lines.iter().enumerate() {
            let mut r = r.clone();
            r.content = format!("line {}", i + 1);
            text.push_str(&serde_json::to_string(&r).unwrap());
            text.push('\n');
        }
        std::fs::write(&p, text).unwrap();
        let f = read_reviews(&p).unwrap();
        let got: Vec<(QuestionId, [f64; 2], &str)> = f
            .records
            .iter()
            .map(|r| (r.question_id.clone(), r.tuple, r.content.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (QuestionId::Int(1), [6.0, 5.0], "line 4"),
                (QuestionId::Int(2), [8.0, 7.0], "line 2"),
                (QuestionId::Int(3), FAILED, "line 6"),
            ]
        );
        assert_eq!(f.duplicates, 2);
        let s = summarize(&f.records);
        assert_eq!((s.overall.parsed, s.overall.failed), (2, 1));
    }

    #[test]
    fn a_whole_last_line_without_newline_is_kept_and_completed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.jsonl");
        let a = serde_json::to_string(&rv(1, "conv", [8.0, 7.0])).unwrap();
        std::fs::write(&p, &a).unwrap();
        let f = read_reviews(&p).unwrap();
        assert_eq!(f.records.len(), 1);
        let mut sink = ReviewSink::open(&p, &f).unwrap();
        sink.write(&rv(2, "conv", [5.0, 4.0])).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert_eq!(read_reviews(&p).unwrap().records.len(), 2);
    }
}
