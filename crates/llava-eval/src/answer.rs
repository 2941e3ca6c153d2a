//! Answering benchmark questions with a loaded checkpoint.
//!
//! Each question goes through exactly the calls `llava generate` makes (one user message with
//! the image, [`Pipeline::render`], [`Pipeline::encode`], [`Pipeline::pixel_values`],
//! [`Pipeline::generate`]), so an answer here is the text `llava generate` prints for the same
//! question and settings. One difference in how: the questions share a [`PromptCache`], so
//! the next question about the same image runs neither the vision tower nor the prompt's shared
//! beginning again (LLaVA-Bench asks two to five questions per image). On the CPU this changes
//! no bit of the logits ([`llava_model::prompt_cache`]). Runs resume: ids already in the
//! answers file are skipped, and each answer is one flushed line.

use std::path::{Path, PathBuf};

use llava_data::conversation::Message;
use llava_model::generation::SamplingParams;
use llava_model::pipeline::{Generation, Pipeline};
use llava_model::prompt_cache::PromptCache;

use crate::append::{AppendSink, read_appendable};
use crate::error::EvalError;
use crate::jsonl::{Answer, Question, read_questions};

/// Settings of an answering run.
#[derive(Debug, Clone)]
pub struct AnswerConfig {
    pub questions: PathBuf,
    /// Where question `image` paths are resolved.
    pub image_folder: PathBuf,
    pub out: PathBuf,
    /// Written as `model_id` (e.g. the checkpoint's folder name).
    pub model_id: String,
    pub sampling: SamplingParams,
    pub max_new_tokens: usize,
    pub stop: Vec<String>,
    /// Answer at most this many new questions.
    pub limit: Option<usize>,
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AnswerReport {
    pub questions: usize,
    pub already_done: usize,
    pub answered: usize,
    /// Skipped: the image file does not exist.
    pub missing_image: usize,
    /// Skipped: the image could not be read or the model refused the input (logged).
    pub failed: usize,
    /// Prompt tokens (image included) shared with the question before, and so not run again.
    pub reused_tokens: usize,
}

impl AnswerReport {
    pub fn describe(&self) -> String {
        let mut s = format!(
            "{} questions: {} answered now, {} already done",
            self.questions, self.answered, self.already_done
        );
        if self.missing_image > 0 {
            s.push_str(&format!(
                "; {} skipped: image not found",
                self.missing_image
            ));
        }
        if self.failed > 0 {
            s.push_str(&format!("; {} failed (see the log)", self.failed));
        }
        if self.reused_tokens > 0 {
            s.push_str(&format!(
                "; {} prompt tokens shared with the question before were not run again",
                self.reused_tokens
            ));
        }
        s
    }
}

/// The prompt text and image list of a question, as `llava generate --prompt … --image …`
/// would get them. A literal `<image>` in the text is removed: the template places the image.
pub fn question_input(q: &Question, image_folder: &Path) -> (String, Vec<PathBuf>) {
    let text = q.text.replace("<image>", "").trim().to_string();
    let images = if q.image.trim().is_empty() {
        Vec::new()
    } else {
        vec![image_folder.join(&q.image)]
    };
    (text, images)
}

/// Answers one question the way `llava generate` does, going on from what `cache` holds of
/// the prompt; returns the rendered prompt and the generation.
pub fn answer_one(
    pipeline: &Pipeline,
    cache: &mut PromptCache,
    text: &str,
    images: &[PathBuf],
    sampling: &SamplingParams,
    max_new_tokens: usize,
    stop: &[String],
) -> Result<(String, Generation), llava_model::ModelError> {
    let prompt = pipeline.render(&[Message::user(text, images.len())])?;
    let pixel_values = pipeline.pixel_values(images)?;
    let input_ids = pipeline.encode(&prompt, pixel_values.as_ref())?;
    let out = pipeline.generate_with_cache(
        cache,
        &input_ids,
        pixel_values.as_ref(),
        sampling,
        max_new_tokens,
        stop,
        |_| {},
    )?;
    Ok((prompt, out))
}

/// Answers every question not yet in `cfg.out`. `progress(done, total)` is called after each
/// question that needed work.
pub fn answer_questions(
    pipeline: &Pipeline,
    cfg: &AnswerConfig,
    progress: impl FnMut(usize, usize),
) -> Result<AnswerReport, EvalError> {
    let questions = read_questions(&cfg.questions)?;
    answer_question_list(pipeline, &questions, cfg, progress)
}

/// [`answer_questions`] over questions already in memory (e.g. multiple-choice prompts built
/// by [`crate::mc::McQuestion::to_question`]); `cfg.questions` is not read.
pub fn answer_question_list(
    pipeline: &Pipeline,
    questions: &[Question],
    cfg: &AnswerConfig,
    mut progress: impl FnMut(usize, usize),
) -> Result<AnswerReport, EvalError> {
    let existing = read_appendable(&cfg.out, "an answer", |a: &Answer| a.question_id.clone())?;
    let done: std::collections::HashSet<_> = existing
        .records
        .iter()
        .map(|a| a.question_id.clone())
        .collect();
    let mut report = AnswerReport {
        questions: questions.len(),
        ..Default::default()
    };
    let mut todo: Vec<&Question> = Vec::new();
    for q in questions {
        if done.contains(&q.question_id) {
            report.already_done += 1;
        } else {
            todo.push(q);
        }
    }
    if let Some(n) = cfg.limit {
        todo.truncate(n);
    }
    let mut sink = AppendSink::open(&cfg.out, &existing)?;
    let total = todo.len();
    let mut cache = PromptCache::new();
    for (i, q) in todo.into_iter().enumerate() {
        let (text, images) = question_input(q, &cfg.image_folder);
        if let Some(missing) = images.iter().find(|p| !p.is_file()) {
            tracing::warn!(id = %q.question_id, image = %missing.display(), "image not found, skipped");
            report.missing_image += 1;
            progress(i + 1, total);
            continue;
        }
        match answer_one(
            pipeline,
            &mut cache,
            &text,
            &images,
            &cfg.sampling,
            cfg.max_new_tokens,
            &cfg.stop,
        ) {
            Ok((_prompt, answer)) => {
                report.reused_tokens += answer.stats.cached_tokens;
                let line = Answer {
                    question_id: q.question_id.clone(),
                    // The question as asked, as the original answer files store it.
                    prompt: text,
                    text: answer.text,
                    answer_id: Some(format!("{}:{}", cfg.model_id, q.question_id)),
                    model_id: Some(cfg.model_id.clone()),
                    metadata: serde_json::json!({
                        "temperature": cfg.sampling.temperature,
                        "top_p": cfg.sampling.top_p,
                        "top_k": cfg.sampling.top_k,
                        "seed": cfg.sampling.seed,
                        "max_new_tokens": cfg.max_new_tokens,
                    }),
                };
                sink.write(&line)?;
                report.answered += 1;
            }
            Err(e) => {
                tracing::warn!(id = %q.question_id, error = %e, "question failed, skipped");
                report.failed += 1;
            }
        }
        progress(i + 1, total);
    }
    Ok(report)
}
