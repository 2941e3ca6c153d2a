//! The LLaVA-Bench judge: a text-only LLM compares the reference answer (Assistant 1) with
//! the model's answer (Assistant 2) for each question, given a textual description of the
//! image, and gives both a 1–10 score on the first line of its reply.
//!
//! Runs are resumable (question ids already in the reviews file are skipped; each review is
//! one flushed line) and concurrent (as many requests in flight as the client allows, with
//! its retry/backoff on 429/5xx). A reply whose scores cannot be read is asked again, up to
//! `parse_retries` times, then recorded as `[-1, -1]`.
//!
//! A `[-1, -1]` review counts as done on a rerun, unless [`JudgeConfig::rejudge_failed`] is
//! set: then those questions are asked again and the new review is **appended** (the file is
//! never rewritten, so an interrupted rerun loses at most the line being written). The reader,
//! [`read_reviews`], lets a later review of an id replace a failed one, so the file reads as
//! one review per question, the newest for each question that had failed. A question whose
//! rejudging fails again gets a second `[-1, -1]` line and stays failed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use llava_instruct::context::format_context;
use llava_instruct::source::{BoxAnnotation, ImageEntry};
use llava_instruct::{ChatClient, ChatMessage, ChatRequest, ClientConfig, ClientError};
use serde::Deserialize;

use crate::error::EvalError;
use crate::jsonl::{Answer, Question, QuestionId, read_answers, read_jsonl, read_questions};
use crate::review::{FAILED, Review, ReviewSink, read_reviews};
use crate::score::parse_scores;

/// One object of a COCO-style context.
#[derive(Debug, Clone, Deserialize)]
pub struct Instance {
    pub category: String,
    /// `[x1, y1, x2, y2]` in 0..1 (the LLaVA-Bench layout), or `[x, y, w, h]` in pixels when
    /// the context line gives `width` and `height` (the COCO layout).
    pub bbox: [f64; 4],
}

/// One context line: COCO-style `{image, captions, instances}` or in-the-wild
/// `{image, caption}`.
#[derive(Debug, Clone, Deserialize)]
pub struct ContextLine {
    pub image: String,
    #[serde(default)]
    pub captions: Option<Vec<String>>,
    #[serde(default)]
    pub instances: Option<Vec<Instance>>,
    #[serde(default)]
    pub caption: Option<String>,
    #[serde(default)]
    pub width: Option<f64>,
    #[serde(default)]
    pub height: Option<f64>,
}

impl ContextLine {
    /// The description the judge sees. COCO-style lines go through the instruction-data
    /// formatting (captions, then `category: [x1, y1, x2, y2]` boxes), so the judge reads the
    /// same symbolic representation the teacher wrote the data from.
    pub fn describe(&self) -> Option<String> {
        if self.captions.is_some() || self.instances.is_some() {
            let (width, height, boxes) = match (self.width, self.height) {
                (Some(w), Some(h)) if w > 0.0 && h > 0.0 => (
                    w,
                    h,
                    self.instances
                        .iter()
                        .flatten()
                        .map(|i| BoxAnnotation {
                            category: i.category.clone(),
                            bbox: i.bbox,
                        })
                        .collect(),
                ),
                // Normalised corners: a 1×1 image with [x, y, w, h] boxes gives them back.
                _ => (
                    1.0,
                    1.0,
                    self.instances
                        .iter()
                        .flatten()
                        .map(|i| {
                            let [x1, y1, x2, y2] = i.bbox;
                            BoxAnnotation {
                                category: i.category.clone(),
                                bbox: [x1, y1, x2 - x1, y2 - y1],
                            }
                        })
                        .collect(),
                ),
            };
            let entry = ImageEntry {
                id: self.image.clone(),
                image: self.image.clone(),
                width,
                height,
                captions: self.captions.clone().unwrap_or_default(),
                boxes,
            };
            let text = format_context(&entry, true);
            return (!text.trim().is_empty()).then_some(text);
        }
        let c = self.caption.as_deref()?.trim();
        (!c.is_empty()).then(|| c.to_string())
    }
}

/// Descriptions by image name; a repeated image or a line with nothing to describe is an
/// error naming its line.
pub fn read_contexts(path: &Path) -> Result<HashMap<String, String>, EvalError> {
    let mut out = HashMap::new();
    for (line, c) in read_jsonl::<ContextLine>(path)? {
        let bad = |message: String| EvalError::BadLine {
            path: path.to_path_buf(),
            line,
            message,
        };
        let text = c.describe().ok_or_else(|| {
            bad("no captions, instances or caption to describe the image with".into())
        })?;
        if out.insert(c.image.clone(), text).is_some() {
            return Err(bad(format!("duplicate context for image `{}`", c.image)));
        }
    }
    Ok(out)
}

/// The kind of question, which sets what the judge is told to look for.
fn category_rule(category: &str) -> &'static str {
    let c = category.to_ascii_lowercase();
    if c.starts_with("conv") {
        "The question is one turn of a conversation about the image. A good answer is \
         correct, answers what was asked directly, and sounds natural."
    } else if c.contains("detail") {
        "The question asks for a detailed description of the image. A good answer covers \
         the important content of the image completely and correctly, and invents nothing \
         that the description does not support."
    } else if c.contains("complex") || c.contains("reason") {
        "The question needs reasoning beyond what is directly visible. A good answer \
         reasons soundly and stays grounded in what the image shows."
    } else {
        "A good answer is correct, relevant to the question and grounded in the image."
    }
}

/// What the judge is told before the case (its role).
pub const JUDGE_SYSTEM: &str = "You review answers to questions about an image. You cannot \
see the image; a written description of it (captions, and sometimes object names with \
bounding boxes as [x1, y1, x2, y2] fractions of the image size) stands in for it. You are fair \
and consistent, and you judge content, not style or length.";

/// The messages for one question: the description, the question, both answers and the rule.
pub fn judge_messages(
    context: &str,
    question: &str,
    reference: &str,
    answer: &str,
    category: &str,
) -> Vec<ChatMessage> {
    let user = format!(
        "Image description:\n{context}\n\n\
         Question:\n{question}\n\n\
         --- Assistant 1's answer ---\n{reference}\n--- end of Assistant 1's answer ---\n\n\
         --- Assistant 2's answer ---\n{answer}\n--- end of Assistant 2's answer ---\n\n\
         {rule}\n\n\
         Give each answer a score from 1 (worst) to 10 (best) for its helpfulness, \
         relevance, accuracy and level of detail taken together. Write the two scores alone \
         on the first line, Assistant 1's first, separated by a space (for example: 7 9). \
         From the second line on, explain the scores briefly. Do not let the order of the \
         answers or their length sway you.",
        context = context.trim(),
        question = question.trim(),
        reference = reference.trim(),
        answer = answer.trim(),
        rule = category_rule(category),
    );
    vec![ChatMessage::system(JUDGE_SYSTEM), ChatMessage::user(user)]
}

/// Settings of a judge run.
#[derive(Debug, Clone)]
pub struct JudgeConfig {
    pub questions: PathBuf,
    pub context: PathBuf,
    pub reference: PathBuf,
    pub answers: PathBuf,
    pub out: PathBuf,
    pub client: ClientConfig,
    pub temperature: f32,
    pub max_tokens: u32,
    /// New requests after a reply whose scores cannot be read.
    pub parse_retries: u32,
    /// Judge at most this many new questions (for trying a setup cheaply).
    pub limit: Option<usize>,
    /// Ask again the questions whose review in `out` is `[-1, -1]` (see the module docs: the
    /// new review is appended and replaces the failed one when the file is read). Without it
    /// a failed review counts as done.
    pub rejudge_failed: bool,
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JudgeReport {
    /// Questions in the file.
    pub questions: usize,
    /// Already in the reviews file, skipped (failed reviews included, unless rejudged).
    pub already_done: usize,
    /// Failed (`[-1, -1]`) reviews in the file asked again (`rejudge_failed`); their
    /// outcomes are counted in `scored`, `unparsable` or `request_failures`.
    pub rejudged: usize,
    /// Failed reviews left in the file as they are (without `rejudge_failed`).
    pub failed_kept: usize,
    /// Newly written reviews with scores.
    pub scored: usize,
    /// Newly written `[-1, -1]` reviews (no readable scores after every retry).
    pub unparsable: usize,
    /// Extra requests made because a reply had no readable scores.
    pub parse_retries: usize,
    /// Questions skipped: no context for their image.
    pub missing_context: usize,
    /// Questions skipped: no reference answer.
    pub missing_reference: usize,
    /// Questions skipped: no model answer.
    pub missing_answer: usize,
    /// Questions not judged because the endpoint kept failing (a rerun retries them).
    pub request_failures: usize,
}

impl JudgeReport {
    /// A one-paragraph account for the terminal.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "{} questions: {} judged now ({} without readable scores), {} already done",
            self.questions,
            self.scored + self.unparsable,
            self.unparsable,
            self.already_done
        );
        if self.rejudged > 0 {
            s.push_str(&format!("; {} earlier failures asked again", self.rejudged));
        }
        if self.failed_kept > 0 {
            s.push_str(&format!(
                "; {} earlier reviews without readable scores kept (--rejudge-failed asks again)",
                self.failed_kept
            ));
        }
        for (n, what) in [
            (self.missing_context, "without a context for their image"),
            (self.missing_reference, "without a reference answer"),
            (self.missing_answer, "without a model answer"),
            (
                self.request_failures,
                "failed at the endpoint (rerun to retry)",
            ),
        ] {
            if n > 0 {
                s.push_str(&format!("; {n} skipped {what}"));
            }
        }
        if self.parse_retries > 0 {
            s.push_str(&format!(
                "; {} requests repeated for unreadable scores",
                self.parse_retries
            ));
        }
        s
    }
}

struct Job {
    id: QuestionId,
    category: String,
    messages: Vec<ChatMessage>,
    /// The question has a failed review in the file (asked again by `rejudge_failed`).
    again: bool,
}

enum Outcome {
    Done { review: Review, retries: usize },
    Failed { id: QuestionId, error: ClientError },
}

async fn judge_one(
    client: ChatClient,
    job: Job,
    temperature: f32,
    max_tokens: u32,
    parse_retries: u32,
) -> Outcome {
    let req = ChatRequest {
        messages: job.messages,
        temperature: Some(temperature),
        max_tokens: Some(max_tokens),
    };
    let mut last = String::new();
    for attempt in 0..=parse_retries {
        match client.chat(&req).await {
            Ok(r) => {
                if let Some(t) = parse_scores(&r.content) {
                    return Outcome::Done {
                        review: Review {
                            question_id: job.id,
                            category: job.category,
                            content: r.content,
                            tuple: t,
                        },
                        retries: attempt as usize,
                    };
                }
                tracing::debug!(id = %job.id, attempt, "judge reply without readable scores");
                last = r.content;
            }
            Err(error) => return Outcome::Failed { id: job.id, error },
        }
    }
    Outcome::Done {
        review: Review {
            question_id: job.id,
            category: job.category,
            content: last,
            tuple: FAILED,
        },
        retries: parse_retries as usize,
    }
}

/// Looks up what each question needs, counting the questions that cannot be judged.
/// `done` maps the ids already reviewed to whether their review was parsed; a failed one is
/// queued again when `rejudge_failed`.
fn plan(
    questions: &[Question],
    contexts: &HashMap<String, String>,
    reference: &HashMap<QuestionId, Answer>,
    answers: &HashMap<QuestionId, Answer>,
    done: &HashMap<QuestionId, bool>,
    rejudge_failed: bool,
    report: &mut JudgeReport,
) -> Vec<Job> {
    let mut jobs = Vec::new();
    for q in questions {
        match done.get(&q.question_id) {
            Some(true) => {
                report.already_done += 1;
                continue;
            }
            Some(false) if !rejudge_failed => {
                report.already_done += 1;
                report.failed_kept += 1;
                continue;
            }
            Some(false) | None => {}
        }
        let Some(ctx) = contexts.get(&q.image) else {
            tracing::warn!(id = %q.question_id, image = %q.image, "no context for the image, skipped");
            report.missing_context += 1;
            continue;
        };
        let Some(r) = reference.get(&q.question_id) else {
            tracing::warn!(id = %q.question_id, "no reference answer, skipped");
            report.missing_reference += 1;
            continue;
        };
        let Some(a) = answers.get(&q.question_id) else {
            tracing::warn!(id = %q.question_id, "no model answer, skipped");
            report.missing_answer += 1;
            continue;
        };
        jobs.push(Job {
            id: q.question_id.clone(),
            category: q.category.clone(),
            messages: judge_messages(ctx, &q.text, &r.text, &a.text, &q.category),
            again: done.contains_key(&q.question_id),
        });
    }
    jobs
}

/// Judges every question not yet in `cfg.out`, appending one review per line.
///
/// An endpoint that refuses a request outright (401, 404, a malformed reply…) stops the run
/// with [`EvalError::Judge`]; one that keeps failing after the client's retries leaves that
/// question out (counted), so that a rerun tries it again.
pub async fn run(cfg: &JudgeConfig) -> Result<JudgeReport, EvalError> {
    let questions = read_questions(&cfg.questions)?;
    let contexts = read_contexts(&cfg.context)?;
    let reference = read_answers(&cfg.reference)?;
    let answers = read_answers(&cfg.answers)?;
    let existing = read_reviews(&cfg.out)?;
    if existing.duplicates > 0 {
        tracing::warn!(
            n = existing.duplicates,
            "the reviews file repeats some question ids; the first parsed review of each is kept"
        );
    }
    let done = existing
        .records
        .iter()
        .map(|r| (r.question_id.clone(), r.parsed()))
        .collect();
    let mut report = JudgeReport {
        questions: questions.len(),
        ..Default::default()
    };
    let mut jobs = plan(
        &questions,
        &contexts,
        &reference,
        &answers,
        &done,
        cfg.rejudge_failed,
        &mut report,
    );
    if let Some(n) = cfg.limit {
        jobs.truncate(n);
    }
    report.rejudged = jobs.iter().filter(|j| j.again).count();
    let client = ChatClient::new(cfg.client.clone())?;
    let mut sink = ReviewSink::open(&cfg.out, &existing)?;
    // Keep a few more tasks than request slots so the client is never starved.
    let window = cfg.client.concurrency.saturating_mul(2).max(1);
    let mut set = tokio::task::JoinSet::new();
    let mut jobs = jobs.into_iter();
    let mut fatal: Option<ClientError> = None;
    loop {
        while fatal.is_none() && set.len() < window {
            let Some(job) = jobs.next() else { break };
            set.spawn(judge_one(
                client.clone(),
                job,
                cfg.temperature,
                cfg.max_tokens,
                cfg.parse_retries,
            ));
        }
        let Some(joined) = set.join_next().await else {
            break;
        };
        let outcome = joined.map_err(|e| {
            EvalError::InvalidArgument(format!("a judge task failed unexpectedly: {e}"))
        })?;
        match outcome {
            Outcome::Done { review, retries } => {
                report.parse_retries += retries;
                if review.parsed() {
                    report.scored += 1;
                } else {
                    report.unparsable += 1;
                }
                sink.write(&review)?;
            }
            Outcome::Failed { id, error } => {
                if matches!(error, ClientError::Exhausted { .. }) {
                    tracing::warn!(%id, %error, "judge request failed; rerun to retry it");
                    report.request_failures += 1;
                } else if fatal.is_none() {
                    fatal = Some(error);
                }
            }
        }
    }
    if let Some(e) = fatal {
        return Err(EvalError::Judge(e));
    }
    Ok(report)
}

/// [`run`] on a runtime of its own, for synchronous callers such as the CLI.
pub fn run_blocking(cfg: &JudgeConfig) -> Result<JudgeReport, EvalError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(EvalError::Runtime)?;
    rt.block_on(run(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coco_context_uses_the_instruction_data_format() {
        let c: ContextLine = serde_json::from_str(
            r#"{"image": "1.jpg", "captions": ["A man rides a horse.", "a man rides a horse"],
                "instances": [{"category": "person", "bbox": [0.3121, 0.08, 0.77, 0.9914]},
                              {"category": "horse", "bbox": [0.5, 0.5, 1.0, 1.0]}]}"#,
        )
        .unwrap();
        assert_eq!(
            c.describe().unwrap(),
            "A man rides a horse.\nperson: [0.312, 0.08, 0.77, 0.991]\nhorse: [0.5, 0.5, 1, 1]"
        );
        // Pixel boxes with the image size, as in COCO.
        let c: ContextLine = serde_json::from_str(
            r#"{"image": "1.jpg", "width": 640, "height": 480, "captions": ["A horse."],
                "instances": [{"category": "horse", "bbox": [320, 240, 320, 240]}]}"#,
        )
        .unwrap();
        assert_eq!(c.describe().unwrap(), "A horse.\nhorse: [0.5, 0.5, 1, 1]");
    }

    #[test]
    fn wild_context_and_empty_context() {
        let c: ContextLine =
            serde_json::from_str(r#"{"image": "w.jpg", "caption": "  A ramen bowl.  "}"#).unwrap();
        assert_eq!(c.describe().unwrap(), "A ramen bowl.");
        let c: ContextLine = serde_json::from_str(r#"{"image": "w.jpg"}"#).unwrap();
        assert_eq!(c.describe(), None);
        let c: ContextLine =
            serde_json::from_str(r#"{"image": "w.jpg", "captions": [" "]}"#).unwrap();
        assert_eq!(c.describe(), None);
    }

    #[test]
    fn prompt_holds_every_part_in_order() {
        let m = judge_messages(
            "CTX line",
            "What is it?",
            "REF answer",
            "MODEL answer",
            "conv",
        );
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].content, JUDGE_SYSTEM);
        let u = &m[1].content;
        let pos = |s: &str| u.find(s).unwrap_or_else(|| panic!("{s} missing from {u}"));
        assert!(pos("CTX line") < pos("What is it?"));
        assert!(pos("What is it?") < pos("Assistant 1's answer ---\nREF answer"));
        assert!(pos("REF answer") < pos("Assistant 2's answer ---\nMODEL answer"));
        assert!(u.contains("conversation"));
        assert!(u.contains("helpfulness, relevance, accuracy and level of detail"));
        assert!(u.contains("first line"));
        let d = judge_messages("c", "q", "r", "a", "detail");
        assert!(d[1].content.contains("detailed description"));
        let x = judge_messages("c", "q", "r", "a", "complex");
        assert!(x[1].content.contains("reasoning"));
    }

    #[test]
    fn contexts_file_errors_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.jsonl");
        std::fs::write(
            &p,
            "{\"image\": \"a.jpg\", \"caption\": \"x\"}\n{\"image\": \"a.jpg\", \"caption\": \"y\"}\n",
        )
        .unwrap();
        let e = read_contexts(&p).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("duplicate"), "{e}");
        std::fs::write(&p, "{\"image\": \"a.jpg\"}\n").unwrap();
        let e = read_contexts(&p).unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("describe"), "{e}");
    }
}
