//! Answering benchmark questions with a loaded checkpoint.
//!
//! Each question goes through exactly the calls `llava generate` makes (one user message with
//! the image, [`Pipeline::render`], [`Pipeline::encode`], [`Pipeline::pixel_values`],
//! [`Pipeline::generate`]), so an answer here is the text `llava generate` prints for the same
//! question and settings. One difference in how: the questions share a [`PromptCache`], so
//! the next question about the same image runs neither the vision tower nor the prompt's shared
//! beginning again (LLaVA-Bench asks two to five questions per image). On the CPU this changes
//! no bit of the logits ([`llava_model::prompt_cache`]).
//!
//! With `batch_size` N > 1, N questions are generated together instead
//! ([`Pipeline::generate_batch`]), without the cache: each answer is the one asked alone, up to
//! rounding. A batch that fails (one prompt too long for the context) is asked again one
//! question at a time, so that only the bad question fails.
//!
//! Runs resume: ids already in the answers file are skipped, and each answer is one flushed
//! line, written as soon as its batch ends.

use std::path::{Path, PathBuf};

use llava_data::conversation::Message;
use llava_model::generation::{BatchPrompt, SamplingParams};
use llava_model::image_inputs::ImageInputs;
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
    /// Questions generated together ([`Pipeline::generate_batch`]); 1 answers one at a time,
    /// sharing a [`PromptCache`] between questions instead.
    pub batch_size: usize,
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

/// A question's prompt as `llava generate` builds it: rendered, its images preprocessed, and
/// encoded.
pub struct PreparedQuestion {
    pub prompt: String,
    pub input_ids: Vec<u32>,
    pub images: Option<ImageInputs>,
}

pub fn prepare_question(
    pipeline: &Pipeline,
    text: &str,
    images: &[PathBuf],
) -> Result<PreparedQuestion, llava_model::ModelError> {
    let prompt = pipeline.render(&[Message::user(text, images.len())])?;
    let images = pipeline.pixel_values(images)?;
    let input_ids = pipeline.encode(&prompt, images.as_ref())?;
    Ok(PreparedQuestion {
        prompt,
        input_ids,
        images,
    })
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
    let q = prepare_question(pipeline, text, images)?;
    let out = pipeline.generate_with_cache(
        cache,
        &q.input_ids,
        q.images.as_ref(),
        sampling,
        max_new_tokens,
        stop,
        |_| {},
    )?;
    Ok((q.prompt, out))
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
    let mut done = 0;
    for chunk in todo.chunks(cfg.batch_size.max(1)) {
        // The questions of this chunk that can be asked, prepared.
        let mut ready = Vec::new();
        for q in chunk {
            let (text, images) = question_input(q, &cfg.image_folder);
            if let Some(missing) = images.iter().find(|p| !p.is_file()) {
                tracing::warn!(id = %q.question_id, image = %missing.display(), "image not found, skipped");
                report.missing_image += 1;
                continue;
            }
            if chunk.len() == 1 {
                ready.push((q, text, images, None));
                continue;
            }
            match prepare_question(pipeline, &text, &images) {
                Ok(prepared) => ready.push((q, text, images, Some(prepared))),
                Err(e) => {
                    tracing::warn!(id = %q.question_id, error = %e, "question failed, skipped");
                    report.failed += 1;
                }
            }
        }
        let prepared: Vec<BatchPrompt> = ready
            .iter()
            .filter_map(|(_, _, _, p)| p.as_ref())
            .map(|p| BatchPrompt {
                input_ids: &p.input_ids,
                images: p.images.as_ref(),
            })
            .collect();
        let batch = match prepared.len() {
            0 => None,
            _ => match pipeline.generate_batch(
                &prepared,
                &cfg.sampling,
                cfg.max_new_tokens,
                &cfg.stop,
            ) {
                Ok(answers) => Some(answers),
                Err(e) => {
                    // Asked one by one, a question the model refuses fails alone.
                    tracing::warn!(error = %e, "a batch failed; answering its questions one by one");
                    None
                }
            },
        };
        let mut batch = batch.map(Vec::into_iter);
        for (q, text, images, _) in ready {
            let answer = match batch.as_mut().and_then(Iterator::next) {
                Some(answer) => Ok(answer),
                None => answer_one(
                    pipeline,
                    &mut cache,
                    &text,
                    &images,
                    &cfg.sampling,
                    cfg.max_new_tokens,
                    &cfg.stop,
                )
                .map(|(_prompt, answer)| answer),
            };
            match answer {
                Ok(answer) => {
                    let st = &answer.stats;
                    tracing::info!(
                        id = %q.question_id,
                        rows = st.rows.max(1),
                        vision_ms = st.vision_ms as u64,
                        prefill_ms = st.prefill_ms as u64,
                        decode_ms = st.decode_ms as u64,
                        "answered"
                    );
                    report.reused_tokens += answer.stats.cached_tokens;
                    sink.write(&answer_line(q, text, answer.text, cfg))?;
                    report.answered += 1;
                }
                Err(e) => {
                    tracing::warn!(id = %q.question_id, error = %e, "question failed, skipped");
                    report.failed += 1;
                }
            }
        }
        done += chunk.len();
        progress(done, total);
    }
    Ok(report)
}

/// The answers-file line for question `q`.
fn answer_line(q: &Question, prompt: String, text: String, cfg: &AnswerConfig) -> Answer {
    Answer {
        question_id: q.question_id.clone(),
        // The question as asked, as the original answer files store it.
        prompt,
        text,
        answer_id: Some(format!("{}:{}", cfg.model_id, q.question_id)),
        model_id: Some(cfg.model_id.clone()),
        metadata: serde_json::json!({
            "temperature": cfg.sampling.temperature,
            "top_p": cfg.sampling.top_p,
            "top_k": cfg.sampling.top_k,
            "seed": cfg.sampling.seed,
            "max_new_tokens": cfg.max_new_tokens,
        }),
    }
}
