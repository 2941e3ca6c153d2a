//! The one thread that owns the model. Requests arrive as [`Job`]s; each is rendered and
//! tokenised at once (so a prompt too long for the context is refused before the client waits),
//! then waits for a place among `max_running` sequences. Every step:
//!
//! 1. one waiting request at a time is prefilled on its own, a piece of at most
//!    `prefill_chunk` tokens per step (chunked prefill: its images go through the vision tower
//!    in its first step), and once whole its cache joins the running left-padded batch
//!    ([`llava_model::batch_decode::join`]). So a long prompt delays each step of the running
//!    streams by one piece, not by a whole prefill or the whole queue. What the prompt cache
//!    ([`PromptPool`]) holds of its beginning (an earlier turn, its images) is not prefilled
//!    again;
//! 2. every running sequence advances by one token in one forward pass
//!    ([`llava_model::batch_decode::decode_step`]), each with its own sampler and stop strings;
//! 3. sequences that finished, and those whose client has gone, leave the batch
//!    ([`KvCache::keep_rows`]); a finished one's row goes to the prompt cache
//!    ([`take_row`]) for the conversation's next turn.
//!
//! A greedy request thus gets the tokens it gets alone, as `llava generate` gives them.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use llava_data::conversation::Message;
use llava_data::image::ProcessedImage;
use llava_model::batch_decode::{decode_step, join, take_row};
use llava_model::generation::{
    CachedPrefill, ChunkedPrefill, Sampler, SamplingParams, start_prefill_with_cache,
};
use llava_model::image_inputs::ImageInputs;
use llava_model::language_model::KvCache;
use llava_model::pipeline::Pipeline;
use llava_model::prompt_cache::PromptCache;
use llava_model::reply_text::ReplyText;
use llava_model::{ModelError, Tensor};
use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::prompt_pool::PromptPool;
use crate::wire::{FinishReason, Usage};

/// One chat request, parsed and with its images preprocessed.
pub struct Job {
    pub messages: Vec<Message>,
    pub images: Vec<ProcessedImage>,
    pub sampling: SamplingParams,
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub events: UnboundedSender<Event>,
    /// The request's place among running and queued ones; freed when the job is dropped.
    pub permit: OwnedSemaphorePermit,
    pub received: Instant,
}

/// What the model thread tells a request's handler, in this order: `Accepted` or `Failed`;
/// then `Text`s; then `Done` or `Failed`.
#[derive(Debug)]
pub enum Event {
    Accepted {
        prompt_tokens: usize,
    },
    Text(String),
    /// `text` is the whole reply as [`ReplyText::finish`] decodes it at the end, which a
    /// non-streamed response returns (as `Pipeline::generate` does); it can differ from the
    /// streamed pieces where a token ended inside a UTF-8 character.
    Done {
        finish: FinishReason,
        usage: Usage,
        text: String,
    },
    Failed(ApiError),
}

/// A job whose prompt is tokenised and fits, waiting for a place in the batch.
struct Prepared {
    job: Job,
    input_ids: Vec<u32>,
    images: Option<ImageInputs>,
    max_new: usize,
    stops: Vec<String>,
}

/// A request being prefilled, a piece per step, before it joins the batch.
struct Admission {
    p: Prepared,
    sampler: Sampler,
    /// The prompt's own keys and values, from the prompt cache's match on.
    prompt: PromptCache,
    prefill: ChunkedPrefill,
}

/// A sequence in the batch. Its row's cache holds everything but `pending`, its latest token.
struct Running<'p> {
    events: UnboundedSender<Event>,
    permit: OwnedSemaphorePermit,
    sampler: Sampler,
    reply: ReplyText<'p>,
    /// The prompt and its images, and every token generated: what the prompt cache keeps.
    input_ids: Vec<u32>,
    images: Option<ImageInputs>,
    tokens: Vec<u32>,
    prompt_tokens: usize,
    cached_tokens: usize,
    generated: usize,
    max_new: usize,
    pending: u32,
    last_token_at: Instant,
}

/// Runs until every sender of `jobs` is gone.
pub fn run(
    pipeline: &Pipeline,
    mut jobs: UnboundedReceiver<Job>,
    max_running: usize,
    prompt_cache: usize,
    prefill_chunk: usize,
    metrics: Arc<Metrics>,
) {
    // 0: each prompt whole in one step.
    let prefill_chunk = if prefill_chunk == 0 {
        usize::MAX
    } else {
        prefill_chunk
    };
    let mut pool = PromptPool::new(prompt_cache);
    let mut waiting: VecDeque<Prepared> = VecDeque::new();
    let mut admitting: Option<Admission> = None;
    let mut running: Vec<Running> = Vec::new();
    let mut cache = KvCache::new();
    loop {
        publish(&metrics, waiting.len(), running.len());
        if running.is_empty() && waiting.is_empty() && admitting.is_none() {
            match jobs.blocking_recv() {
                Some(job) => waiting.extend(prepare(pipeline, job)),
                None => return,
            }
        }
        while let Ok(job) = jobs.try_recv() {
            waiting.extend(prepare(pipeline, job));
        }
        waiting.retain(|p| !p.job.events.is_closed());

        if admitting.is_none()
            && running.len() < max_running
            && let Some(next) = waiting.pop_front()
        {
            admitting = begin(pipeline, next, &mut pool);
        }
        // A client gone while its prompt is prefilled frees its place at once.
        admitting = admitting.filter(|a| !a.p.job.events.is_closed());
        if let Some(mut a) = admitting.take() {
            metrics.prefill_chunks.fetch_add(1, Ordering::Relaxed);
            match a
                .prefill
                .advance(&pipeline.model, &mut a.prompt, prefill_chunk)
            {
                Ok(None) => admitting = Some(a),
                Ok(Some(done)) => admit(
                    pipeline,
                    a,
                    done,
                    &mut running,
                    &mut cache,
                    &mut pool,
                    &metrics,
                ),
                Err(e) => fail(&a.p.job.events, e),
            }
        }
        publish(&metrics, waiting.len(), running.len());
        if running.is_empty() {
            continue;
        }
        let next: Vec<u32> = running.iter().map(|s| s.pending).collect();
        metrics.decode_steps.fetch_add(1, Ordering::Relaxed);
        metrics
            .decode_rows
            .fetch_add(next.len() as u64, Ordering::Relaxed);
        let outcome = decode_step(&pipeline.model, &mut cache, &next).map(|logits| {
            running
                .iter_mut()
                .enumerate()
                .map(|(row, seq)| step(seq, &logits, row, pipeline, &metrics))
                .collect::<Vec<_>>()
        });
        let outcomes = match outcome {
            Ok(o) => o,
            Err(e) => {
                // A failed forward pass may have left the cache half-written: every running
                // sequence fails, and the next ones start from an empty batch.
                let error = ApiError::internal(format!("decoding failed: {e}"));
                for seq in running.drain(..) {
                    let _ = seq.events.send(Event::Failed(error.clone()));
                }
                cache = KvCache::new();
                continue;
            }
        };
        leave(&mut running, &mut cache, &mut pool, outcomes, &metrics);
    }
}

/// The queue-depth and running-sequence gauges.
fn publish(metrics: &Metrics, waiting: usize, running: usize) {
    metrics.waiting.store(waiting as u64, Ordering::Relaxed);
    metrics.running.store(running as u64, Ordering::Relaxed);
}

/// Renders, tokenises and checks a job against the context; tells its handler either way.
fn prepare(pipeline: &Pipeline, job: Job) -> Option<Prepared> {
    let prepared = (|| -> Result<(Vec<u32>, Option<ImageInputs>, usize), ApiError> {
        let prompt = pipeline
            .render(&job.messages)
            .map_err(|e| ApiError::invalid_param("messages", e.to_string()))?;
        let images = pipeline
            .image_inputs(&job.images)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let input_ids = pipeline
            .encode(&prompt, images.as_ref())
            .map_err(|e| ApiError::invalid_param("messages", e.to_string()))?;
        // What the context leaves after the prompt (an error if nothing).
        let room = pipeline
            .max_new_tokens(input_ids.len(), usize::MAX)
            .map_err(|e| ApiError::invalid_param("messages", e.to_string()))?;
        let max_new = match job.max_tokens {
            Some(n) if n > room => {
                return Err(ApiError::invalid_param(
                    "max_tokens",
                    format!(
                        "the prompt is {} tokens and max_tokens is {n}, but the model's context is {} tokens",
                        input_ids.len(),
                        input_ids.len() + room
                    ),
                ));
            }
            Some(n) => n,
            None => room,
        };
        Ok((input_ids, images, max_new))
    })();
    match prepared {
        Ok((input_ids, images, max_new)) => {
            let _ = job.events.send(Event::Accepted {
                prompt_tokens: input_ids.len(),
            });
            let stops = pipeline.stop_strings(&job.stop);
            Some(Prepared {
                job,
                input_ids,
                images,
                max_new,
                stops,
            })
        }
        Err(e) => {
            let _ = job.events.send(Event::Failed(e));
            None
        }
    }
}

/// A model error for a request whose prompt and images were checked when they arrived: what
/// failed is the model.
fn fail(events: &UnboundedSender<Event>, e: ModelError) {
    let _ = events.send(Event::Failed(ApiError::internal(e.to_string())));
}

/// Starts a request's prefill after what the prompt cache holds of it (its new images go
/// through the vision tower here); `None` if that failed, the client told.
fn begin(pipeline: &Pipeline, p: Prepared, pool: &mut PromptPool) -> Option<Admission> {
    let sampler = match Sampler::new(p.job.sampling.clone()) {
        Ok(s) => s,
        Err(e) => {
            fail(&p.job.events, e);
            return None;
        }
    };
    // A cache that cannot be compared is only a missed saving.
    let mut prompt = pool
        .lookup(&pipeline.model, &p.input_ids, p.images.as_ref())
        .unwrap_or_default();
    match start_prefill_with_cache(
        &pipeline.model,
        &mut prompt,
        &p.input_ids,
        p.images.as_ref(),
    ) {
        Ok(prefill) => Some(Admission {
            p,
            sampler,
            prompt,
            prefill,
        }),
        Err(e) => {
            fail(&p.job.events, e);
            None
        }
    }
}

/// A prefilled request's first token, and its cache joined to the batch unless that token
/// already ends it.
fn admit<'p>(
    pipeline: &'p Pipeline,
    a: Admission,
    prefilled: CachedPrefill,
    running: &mut Vec<Running<'p>>,
    cache: &mut KvCache,
    pool: &mut PromptPool,
    metrics: &Metrics,
) {
    let Admission {
        p,
        mut sampler,
        mut prompt,
        ..
    } = a;
    let first = match sampler.sample(&prefilled.logits) {
        Ok(id) => id,
        Err(e) => return fail(&p.job.events, e),
    };
    metrics
        .prompt_tokens
        .fetch_add(p.input_ids.len() as u64, Ordering::Relaxed);
    if prefilled.cached_tokens > 0 {
        metrics.prompt_cache_hits.fetch_add(1, Ordering::Relaxed);
        metrics
            .prompt_cache_reused_tokens
            .fetch_add(prefilled.cached_tokens as u64, Ordering::Relaxed);
    }
    metrics
        .time_to_first_token
        .observe(p.job.received.elapsed());
    let mut seq = Running {
        events: p.job.events,
        permit: p.job.permit,
        sampler,
        reply: ReplyText::new(&pipeline.tokenizer, p.stops),
        prompt_tokens: p.input_ids.len(),
        input_ids: p.input_ids,
        images: p.images,
        tokens: Vec::new(),
        cached_tokens: prefilled.cached_tokens,
        generated: 0,
        max_new: p.max_new,
        pending: first,
        last_token_at: Instant::now(),
    };
    let kv = prompt.take_kv();
    match emit(&mut seq, first, &pipeline.eos_token_ids, metrics) {
        Some(finish) => {
            keep(pool, &seq, kv, metrics);
            finish_seq(seq, Some(finish));
        }
        None => match join(cache, kv) {
            Ok(()) => running.push(seq),
            Err(e) => {
                let _ = seq
                    .events
                    .send(Event::Failed(ApiError::internal(e.to_string())));
            }
        },
    }
}

/// Puts a finished sequence's keys and values (`kv`: its prompt and every generated token but
/// the last) in the prompt cache for its conversation's next turn. Before the sequence's reply
/// ends, so a client's next turn, and its reading of `/metrics`, finds it there.
fn keep(pool: &mut PromptPool, seq: &Running, kv: KvCache, metrics: &Metrics) {
    let fed = &seq.tokens[..seq.tokens.len().saturating_sub(1)];
    // Failing to keep a cache costs the next turn a full prefill, nothing more.
    if let Ok(entry) = PromptCache::from_kv(kv, &seq.input_ids, seq.images.as_ref(), fed) {
        let _ = pool.store(entry);
    }
    metrics
        .prompt_cache_entries
        .store(pool.len() as u64, Ordering::Relaxed);
}

/// Samples a row's next token and passes it on. `Some(None)`: the client is gone.
fn step(
    seq: &mut Running,
    logits: &Tensor,
    row: usize,
    pipeline: &Pipeline,
    metrics: &Metrics,
) -> Option<Option<FinishReason>> {
    if seq.events.is_closed() {
        return Some(None);
    }
    let id = match logits
        .get(row)
        .map_err(ModelError::from)
        .and_then(|l| seq.sampler.sample(&l))
    {
        Ok(id) => id,
        Err(e) => {
            let _ = seq
                .events
                .send(Event::Failed(ApiError::internal(e.to_string())));
            return Some(None);
        }
    };
    let now = Instant::now();
    metrics
        .time_per_output_token
        .observe(now - seq.last_token_at);
    seq.last_token_at = now;
    seq.pending = id;
    emit(seq, id, &pipeline.eos_token_ids, metrics).map(Some)
}

/// Streams a new token's text; says why the sequence ends if it does.
fn emit(seq: &mut Running, id: u32, eos: &[u32], metrics: &Metrics) -> Option<FinishReason> {
    seq.generated += 1;
    seq.tokens.push(id);
    metrics.generated_tokens.fetch_add(1, Ordering::Relaxed);
    let events = &seq.events;
    let flow = seq.reply.push(id, &mut |text| {
        let _ = events.send(Event::Text(text.to_string()));
    });
    if flow.is_break() || eos.contains(&id) {
        Some(FinishReason::Stop)
    } else if seq.generated >= seq.max_new {
        Some(FinishReason::Length)
    } else {
        None
    }
}

/// Sends a finished sequence's held-back text and its end; `None` for a client that is gone.
fn finish_seq(seq: Running, finish: Option<FinishReason>) {
    let Some(finish) = finish else {
        return;
    };
    let events = seq.events;
    let usage = Usage::new(seq.prompt_tokens, seq.generated).with_cached(seq.cached_tokens);
    // Freed before the client hears of the end, so that its next request finds the place.
    drop(seq.permit);
    match seq.reply.finish(&mut |text| {
        let _ = events.send(Event::Text(text.to_string()));
    }) {
        Ok(text) => {
            let _ = events.send(Event::Done {
                finish,
                usage,
                text,
            });
        }
        Err(e) => {
            let _ = events.send(Event::Failed(ApiError::internal(e.to_string())));
        }
    }
}

/// Ends the sequences whose step ended them and drops their rows from the batch.
fn leave(
    running: &mut Vec<Running>,
    cache: &mut KvCache,
    pool: &mut PromptPool,
    outcomes: Vec<Option<Option<FinishReason>>>,
    metrics: &Metrics,
) {
    if outcomes.iter().all(Option::is_none) {
        return;
    }
    let mut keep_rows = Vec::new();
    let mut kept = Vec::new();
    for (row, (seq, outcome)) in std::mem::take(running)
        .into_iter()
        .zip(outcomes)
        .enumerate()
    {
        match outcome {
            None => {
                keep_rows.push(row);
                kept.push(seq);
            }
            Some(finish) => {
                if finish.is_some()
                    && pool.capacity() > 0
                    && let Ok(kv) = take_row(cache, row)
                {
                    keep(pool, &seq, kv, metrics);
                }
                finish_seq(seq, finish)
            }
        }
    }
    if keep_rows.is_empty() {
        *cache = KvCache::new();
    } else if let Err(e) = cache.keep_rows(&keep_rows) {
        let error = ApiError::internal(format!("the batch cache failed: {e}"));
        for seq in kept {
            let _ = seq.events.send(Event::Failed(error.clone()));
        }
        *cache = KvCache::new();
        return;
    }
    *running = kept;
}
