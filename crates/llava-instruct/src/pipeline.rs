//! The resumable generation run.
//!
//! 1. The images are sharded (`--shard i/n`, by a stable hash of the record id) and limited
//!    (`--limit N`, the first N images of the shard in id order).
//! 2. The output folder is scanned: (image, type) pairs with a record, or with a final reject,
//!    are skipped. Torn last lines are cut off.
//! 3. `brief` pairs are made at once; teacher pairs are sent with at most `max_pending` tasks
//!    alive (the client itself enforces the HTTP concurrency and rate limits).
//! 4. Each outcome is appended to its file and flushed as it arrives, from one writer.
//! 5. At the end `llava_instruct.json` is rewritten atomically from all the type files.
//!
//! Every random choice of a pair comes from a generator seeded by (seed, type, id), so a
//! resumed or re-sharded run makes the same choices.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use llava_data::record::LlavaRecord;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::Serialize;
use tokio::task::JoinSet;

use crate::client::{ChatClient, ChatMessage, ChatRequest, ChatResponse, ClientError, Usage};
use crate::context::{box_lines, caption_lines, format_context};
use crate::error::InstructError;
use crate::filter::Filters;
use crate::output::{self, RejectRecord, RejectStage, Sink};
use crate::parse::{RejectReason, brief_record, build_record_filtered};
use crate::prompts::PromptLibrary;
use crate::source::ImageEntry;
use crate::types::{InstructType, Shard, pair_seed};

/// Prices per 1000 tokens, for the cost estimate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    pub prompt_per_1k: f64,
    pub completion_per_1k: f64,
}

impl FromStr for Price {
    type Err = InstructError;
    /// `P` (one price for all tokens) or `PROMPT,COMPLETION`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            InstructError::InvalidArgument(format!(
                "price must be `P` or `PROMPT,COMPLETION` per 1k tokens, got `{s}`"
            ))
        };
        let num = |t: &str| -> Result<f64, InstructError> {
            let v: f64 = t.trim().parse().map_err(|_| bad())?;
            if v.is_finite() && v >= 0.0 {
                Ok(v)
            } else {
                Err(bad())
            }
        };
        match s.split_once(',') {
            Some((p, c)) => Ok(Price {
                prompt_per_1k: num(p)?,
                completion_per_1k: num(c)?,
            }),
            None => {
                let v = num(s)?;
                Ok(Price {
                    prompt_per_1k: v,
                    completion_per_1k: v,
                })
            }
        }
    }
}

impl Price {
    pub fn cost(&self, u: &Usage) -> f64 {
        u.prompt_tokens as f64 / 1000.0 * self.prompt_per_1k
            + u.completion_tokens as f64 / 1000.0 * self.completion_per_1k
    }
}

/// Settings of a run (the teacher's own settings live in [`crate::client::ClientConfig`]).
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub types: Vec<InstructType>,
    pub out_dir: PathBuf,
    pub limit: Option<usize>,
    pub seed: u64,
    pub shard: Shard,
    pub temperature: Option<f32>,
    pub max_tokens: Option<u32>,
    /// Re-ask the teacher for pairs whose earlier reply was rejected by the parser.
    pub retry_rejects: bool,
    pub price: Option<Price>,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// Pairs being worked on at once (requests in flight plus those backing off).
    pub max_pending: usize,
    /// Per-type caps (per shard): type `t` is made for at most `N` of the selected images,
    /// a seeded pseudo-random subset chosen independently per type (the paper's 158K mix is
    /// 58K conversation + 23K detail + 77K complex).
    pub type_limits: BTreeMap<InstructType, usize>,
    /// Quality filters applied to every parsed reply.
    pub filters: Filters,
}

impl RunConfig {
    pub fn new(types: Vec<InstructType>, out_dir: impl Into<PathBuf>) -> Self {
        Self {
            types,
            out_dir: out_dir.into(),
            limit: None,
            seed: 0,
            shard: Shard::default(),
            temperature: Some(0.2),
            max_tokens: Some(1024),
            retry_rejects: false,
            price: None,
            progress: false,
            max_pending: 128,
            type_limits: BTreeMap::new(),
            filters: Filters::default(),
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunSummary {
    /// Images selected (after shard and limit).
    pub images: usize,
    /// (image, type) pairs selected.
    pub pairs: usize,
    /// Pairs skipped because an earlier run finished them.
    pub already_done: usize,
    /// Records written by this run, per type.
    pub written: BTreeMap<InstructType, usize>,
    /// Final rejects written by this run, per reason tag.
    pub rejected: BTreeMap<String, usize>,
    /// Pairs whose request failed after all retries (retried on the next run).
    pub failed: usize,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// HTTP attempts and retries made by the client during this run.
    pub requests: u64,
    pub retries: u64,
    pub cost: Option<f64>,
    pub elapsed_s: f64,
    /// Records in the final `llava_instruct.json` (all types, all runs).
    pub final_records: usize,
    /// Batch API runs: batches created by this run, and unfinished ones it picked up.
    pub batches_created: usize,
    pub batches_resumed: usize,
    /// Batch result lines that were not valid JSON result lines (their requests are resent).
    pub malformed_lines: usize,
    /// `import-batch`/`export-batch`: pairs still waiting for a result.
    pub unanswered: usize,
}

impl RunSummary {
    pub fn written_total(&self) -> usize {
        self.written.values().sum()
    }
    pub fn rejected_total(&self) -> usize {
        self.rejected.values().sum()
    }
    /// Whether every selected pair now has a record or a final reject.
    pub fn complete(&self) -> bool {
        self.failed == 0
    }
}

/// The images a run works on: those of the shard, the first `limit` of them (input is sorted).
pub fn select(entries: &[ImageEntry], shard: Shard, limit: Option<usize>) -> Vec<&ImageEntry> {
    entries
        .iter()
        .filter(|e| shard.contains(&e.id))
        .take(limit.unwrap_or(usize::MAX))
        .collect()
}

/// The (image index, type) pairs of a run, image by image in order. A type with a cap in
/// `type_limits` keeps only the images that come first in an order seeded by
/// (seed, type, id), so each type gets its own deterministic pseudo-random subset.
pub fn plan_pairs(
    selected: &[&ImageEntry],
    types: &[InstructType],
    type_limits: &BTreeMap<InstructType, usize>,
    seed: u64,
) -> Vec<(usize, InstructType)> {
    let mut chosen: BTreeMap<InstructType, std::collections::HashSet<usize>> = BTreeMap::new();
    for (&ty, &n) in type_limits {
        if n >= selected.len() {
            continue;
        }
        let mut order: Vec<usize> = (0..selected.len()).collect();
        order.sort_by_cached_key(|&i| (pair_seed(seed, &selected[i].id, ty), i));
        chosen.insert(ty, order.into_iter().take(n).collect());
    }
    let mut out = Vec::new();
    for i in 0..selected.len() {
        for &ty in types {
            if chosen.get(&ty).is_none_or(|set| set.contains(&i)) {
                out.push((i, ty));
            }
        }
    }
    out
}

/// The context text the teacher sees for a type.
pub fn context_for(entry: &ImageEntry, ty: InstructType) -> String {
    format_context(entry, ty.uses_boxes())
}

/// The exact messages sent for one pair (`None` for `brief`, which has no teacher).
pub fn messages_for(
    entry: &ImageEntry,
    ty: InstructType,
    lib: &PromptLibrary,
) -> Option<Vec<ChatMessage>> {
    lib.set(ty).map(|s| s.messages(&context_for(entry, ty)))
}

/// The `brief` record of an image, as a run with `seed` makes it.
pub fn brief_for(
    entry: &ImageEntry,
    lib: &PromptLibrary,
    seed: u64,
) -> Result<LlavaRecord, RejectReason> {
    let mut rng = StdRng::seed_from_u64(pair_seed(seed, &entry.id, InstructType::Brief));
    brief_record(entry, lib, &mut rng)
}

/// Whether the image has what the type needs.
pub(crate) fn input_check(entry: &ImageEntry, ty: InstructType) -> Result<(), RejectReason> {
    let has_captions = !caption_lines(&entry.captions).is_empty();
    let ok = match ty {
        InstructType::Conversation | InstructType::Brief => has_captions,
        InstructType::Detail | InstructType::Complex => {
            has_captions || !box_lines(entry).is_empty()
        }
    };
    if ok {
        Ok(())
    } else {
        Err(RejectReason::NoCaptions)
    }
}

pub(crate) fn reject(
    entry: &ImageEntry,
    ty: InstructType,
    stage: RejectStage,
    tag: &str,
    reason: String,
    raw: Option<String>,
) -> RejectRecord {
    RejectRecord {
        id: entry.id.clone(),
        image: entry.image.clone(),
        ty,
        stage,
        tag: tag.to_string(),
        reason,
        raw,
    }
}

/// The request of a teacher pair (`None` when the library has no prompt set for the type).
pub fn request_for(
    entry: &ImageEntry,
    ty: InstructType,
    lib: &PromptLibrary,
    temperature: Option<f32>,
    max_tokens: Option<u32>,
) -> Option<ChatRequest> {
    messages_for(entry, ty, lib).map(|messages| ChatRequest {
        messages,
        temperature,
        max_tokens,
    })
}

pub(crate) enum Outcome {
    Record(InstructType, LlavaRecord, Usage),
    Reject(RejectRecord, Usage),
    Failed(RejectRecord),
    Fatal(ClientError),
}

fn is_fatal(e: &ClientError) -> bool {
    matches!(e, ClientError::Config(_))
        || matches!(
            e,
            ClientError::Status {
                status: 401 | 403 | 404,
                ..
            }
        )
}

/// What the pipeline needs to turn a teacher reply into a record or a reject.
pub(crate) struct Settler {
    pub lib: Arc<PromptLibrary>,
    pub filters: Arc<Filters>,
    pub seed: u64,
}

impl Settler {
    /// A reply, whether from `/chat/completions` or a Batch output line, through the same
    /// truncation check, parser and quality filters.
    pub(crate) fn reply(
        &self,
        entry: &ImageEntry,
        ty: InstructType,
        resp: ChatResponse,
    ) -> Outcome {
        let parse_reject = |why: RejectReason, raw: String| {
            reject(
                entry,
                ty,
                RejectStage::Parse,
                why.tag(),
                why.to_string(),
                Some(raw),
            )
        };
        if resp.finish_reason.as_deref() == Some("length") {
            return Outcome::Reject(
                parse_reject(RejectReason::Truncated, resp.content),
                resp.usage,
            );
        }
        let mut rng = StdRng::seed_from_u64(pair_seed(self.seed, &entry.id, ty));
        match build_record_filtered(ty, entry, &resp.content, &self.lib, &self.filters, &mut rng) {
            Ok(rec) => Outcome::Record(ty, rec, resp.usage),
            Err(why) => Outcome::Reject(parse_reject(why, resp.content), resp.usage),
        }
    }
}

fn no_prompt(entry: &ImageEntry, ty: InstructType) -> Outcome {
    let r = reject(
        entry,
        ty,
        RejectStage::Input,
        "no_prompt",
        "no prompt set for this type".into(),
        None,
    );
    Outcome::Reject(r, Usage::default())
}

async fn teacher_pair(
    client: ChatClient,
    settler: Arc<Settler>,
    entry: Arc<ImageEntry>,
    ty: InstructType,
    temperature: Option<f32>,
    max_tokens: Option<u32>,
) -> Outcome {
    let Some(req) = request_for(&entry, ty, &settler.lib, temperature, max_tokens) else {
        return no_prompt(&entry, ty);
    };
    match client.chat(&req).await {
        Ok(resp) => settler.reply(&entry, ty, resp),
        Err(e) if is_fatal(&e) => Outcome::Fatal(e),
        Err(e) => Outcome::Failed(reject(
            &entry,
            ty,
            RejectStage::Request,
            "request",
            e.to_string(),
            None,
        )),
    }
}

/// Counts of a run, and its progress bar.
pub(crate) struct Tally {
    pub summary: RunSummary,
    pub bar: ProgressBar,
    price: Option<Price>,
}

impl Tally {
    fn usage(&mut self, u: &Usage) {
        self.summary.prompt_tokens += u.prompt_tokens;
        self.summary.completion_tokens += u.completion_tokens;
    }
    fn tick(&mut self) {
        let s = &self.summary;
        let tokens = s.prompt_tokens + s.completion_tokens;
        let mut msg = format!(
            "ok {}  rejected {}  failed {}  tokens {}",
            s.written_total(),
            s.rejected_total(),
            s.failed,
            tokens
        );
        if let Some(p) = self.price {
            let u = Usage {
                prompt_tokens: s.prompt_tokens,
                completion_tokens: s.completion_tokens,
            };
            msg.push_str(&format!("  ${:.2}", p.cost(&u)));
        }
        self.bar.set_message(msg);
        self.bar.inc(1);
    }

    /// Writes a settled outcome to the sink and counts it. `Fatal` is returned to the caller.
    pub(crate) fn settle(
        &mut self,
        sink: &mut Sink,
        outcome: Outcome,
    ) -> Result<Option<ClientError>, InstructError> {
        match outcome {
            Outcome::Record(ty, rec, usage) => {
                sink.write_record(ty, &rec)?;
                *self.summary.written.entry(ty).or_default() += 1;
                self.usage(&usage);
            }
            Outcome::Reject(r, usage) => {
                tracing::debug!(id = %r.id, type = %r.ty, reason = %r.reason, "reply rejected");
                sink.write_reject(&r)?;
                *self.summary.rejected.entry(r.tag.clone()).or_default() += 1;
                self.usage(&usage);
            }
            Outcome::Failed(r) => {
                tracing::warn!(id = %r.id, type = %r.ty, error = %r.reason, "request failed; will be retried by the next run");
                sink.write_reject(&r)?;
                self.summary.failed += 1;
            }
            Outcome::Fatal(e) => return Ok(Some(e)),
        }
        self.tick();
        Ok(None)
    }
}

/// A run up to the teacher: the output folder scanned, the pairs planned, inputs checked and
/// the `brief` records written. `teacher_todo` is what is left for the teacher.
pub(crate) struct Prepared {
    pub tally: Tally,
    pub sink: Sink,
    pub teacher_todo: Vec<(Arc<ImageEntry>, InstructType)>,
    pub start: Instant,
}

/// The pairs of a run that `existing` does not already hold (in plan order), and a summary
/// with the image, pair and already-done counts.
pub fn pairs_to_do(
    entries: &[ImageEntry],
    cfg: &RunConfig,
    existing: &output::Existing,
) -> (RunSummary, Vec<(Arc<ImageEntry>, InstructType)>) {
    let selected = select(entries, cfg.shard, cfg.limit);
    let planned = plan_pairs(&selected, &cfg.types, &cfg.type_limits, cfg.seed);
    let mut summary = RunSummary {
        images: selected.len(),
        pairs: planned.len(),
        ..Default::default()
    };
    let shared: Vec<Arc<ImageEntry>> = selected.iter().map(|e| Arc::new((*e).clone())).collect();
    let mut todo = Vec::new();
    for (i, ty) in planned {
        let e = &shared[i];
        let key = (ty, e.id.clone());
        if existing.records.contains(&key)
            || (!cfg.retry_rejects && existing.rejected.contains(&key))
        {
            summary.already_done += 1;
        } else {
            todo.push((e.clone(), ty));
        }
    }
    (summary, todo)
}

pub(crate) fn prepare(
    entries: Vec<ImageEntry>,
    lib: &PromptLibrary,
    cfg: &RunConfig,
) -> Result<Prepared, InstructError> {
    let start = Instant::now();
    if cfg.types.is_empty() {
        return Err(InstructError::InvalidArgument("no types requested".into()));
    }
    std::fs::create_dir_all(&cfg.out_dir).map_err(InstructError::io(&cfg.out_dir))?;
    let existing = output::scan(&cfg.out_dir)?;
    let (summary, todo) = pairs_to_do(&entries, cfg, &existing);
    drop(entries);
    tracing::info!(
        images = summary.images,
        pairs = summary.pairs,
        already_done = summary.already_done,
        to_do = todo.len(),
        "starting instruction generation"
    );

    let bar = ProgressBar::with_draw_target(
        Some(summary.pairs as u64),
        if cfg.progress {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    if let Ok(style) =
        ProgressStyle::with_template("{elapsed_precise} [{wide_bar}] {pos}/{len} ETA {eta}  {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_position(summary.already_done as u64);
    bar.reset_eta();
    let mut tally = Tally {
        summary,
        bar,
        price: cfg.price,
    };
    let mut sink = Sink::open(&cfg.out_dir, &cfg.types)?;

    // Input problems and the brief baseline are settled here; the rest goes to the teacher.
    let mut teacher_todo = Vec::with_capacity(todo.len());
    for (entry, ty) in todo {
        let settled = match input_check(&entry, ty) {
            Err(why) => Some(Err(why)),
            Ok(()) if ty == InstructType::Brief => Some(brief_for(&entry, lib, cfg.seed)),
            Ok(()) => None,
        };
        let outcome = match settled {
            None => {
                teacher_todo.push((entry, ty));
                continue;
            }
            Some(Ok(rec)) => Outcome::Record(ty, rec, Usage::default()),
            Some(Err(why)) => Outcome::Reject(
                reject(
                    &entry,
                    ty,
                    RejectStage::Input,
                    why.tag(),
                    why.to_string(),
                    None,
                ),
                Usage::default(),
            ),
        };
        tally.settle(&mut sink, outcome)?;
    }
    Ok(Prepared {
        tally,
        sink,
        teacher_todo,
        start,
    })
}

/// Ends a run: `llava_instruct.json` rewritten from the type files, cost and time filled in.
pub(crate) fn finish(
    tally: Tally,
    sink: Sink,
    cfg: &RunConfig,
    start: Instant,
) -> Result<RunSummary, InstructError> {
    drop(sink);
    tally.bar.finish_and_clear();
    let mut summary = tally.summary;
    summary.final_records = output::write_final(&cfg.out_dir)?;
    if let Some(p) = cfg.price {
        summary.cost = Some(p.cost(&Usage {
            prompt_tokens: summary.prompt_tokens,
            completion_tokens: summary.completion_tokens,
        }));
    }
    summary.elapsed_s = start.elapsed().as_secs_f64();
    Ok(summary)
}

/// Runs the generation. `client` is needed when a teacher type is requested.
pub async fn run(
    entries: Vec<ImageEntry>,
    lib: Arc<PromptLibrary>,
    client: Option<ChatClient>,
    cfg: &RunConfig,
) -> Result<RunSummary, InstructError> {
    let needs_teacher = cfg.types.iter().any(|t| t.needs_teacher());
    if needs_teacher && client.is_none() {
        return Err(InstructError::InvalidArgument(
            "the conversation, detail and complex types need a teacher endpoint (--api-base, --model)".into(),
        ));
    }
    let Prepared {
        mut tally,
        mut sink,
        teacher_todo,
        start,
    } = prepare(entries, &lib, cfg)?;

    let mut fatal: Option<ClientError> = None;
    if let Some(client) = &client {
        let (attempts0, retries0) = (client.attempts_made(), client.retries_made());
        let max_pending = cfg.max_pending.max(1);
        let settler = Arc::new(Settler {
            lib: lib.clone(),
            filters: Arc::new(cfg.filters.clone()),
            seed: cfg.seed,
        });
        let mut jobs = teacher_todo.into_iter();
        let mut set: JoinSet<Outcome> = JoinSet::new();
        loop {
            while fatal.is_none() && set.len() < max_pending {
                let Some((entry, ty)) = jobs.next() else {
                    break;
                };
                set.spawn(teacher_pair(
                    client.clone(),
                    settler.clone(),
                    entry,
                    ty,
                    cfg.temperature,
                    cfg.max_tokens,
                ));
            }
            let Some(joined) = set.join_next().await else {
                break;
            };
            match joined {
                Ok(outcome) => {
                    if let Some(e) = tally.settle(&mut sink, outcome)?
                        && fatal.is_none()
                    {
                        tracing::error!(error = %e, "the teacher refused the request; stopping");
                        fatal = Some(e);
                        // Pending pairs have written nothing; they are simply redone by the next run.
                        set.abort_all();
                    }
                }
                Err(join_err) if join_err.is_cancelled() => {}
                Err(join_err) => {
                    // Not expected (tasks do not panic); the pair has no output and is redone next run.
                    tracing::error!(error = %join_err, "a generation task died");
                    tally.summary.failed += 1;
                    tally.tick();
                }
            }
        }
        tally.summary.requests = client.attempts_made() - attempts0;
        tally.summary.retries = client.retries_made() - retries0;
    }
    if let Some(e) = fatal {
        drop(sink);
        tally.bar.finish_and_clear();
        return Err(InstructError::Teacher(e));
    }
    finish(tally, sink, cfg, start)
}

/// [`run`] on a fresh multi-threaded runtime, for synchronous callers such as the CLI.
pub fn run_blocking(
    entries: Vec<ImageEntry>,
    lib: PromptLibrary,
    client_cfg: Option<crate::client::ClientConfig>,
    cfg: &RunConfig,
) -> Result<RunSummary, InstructError> {
    block_on(async {
        // reqwest needs the runtime to exist when the client is built.
        let client = client_cfg.map(ChatClient::new).transpose()?;
        run(entries, Arc::new(lib), client, cfg).await
    })
}

/// Runs `fut` on a fresh multi-threaded runtime (the `*_blocking` entry points).
pub(crate) fn block_on<T>(
    fut: impl std::future::Future<Output = Result<T, InstructError>>,
) -> Result<T, InstructError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(InstructError::Runtime)?
        .block_on(fut)
}

/// A human-readable rendering of the summary.
pub fn format_summary(s: &RunSummary) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "images {}  pairs {}  already done {}  written {}  rejected {}  failed {}\n",
        s.images,
        s.pairs,
        s.already_done,
        s.written_total(),
        s.rejected_total(),
        s.failed
    ));
    if !s.written.is_empty() {
        let per: Vec<String> = s.written.iter().map(|(t, n)| format!("{t} {n}")).collect();
        out.push_str(&format!("written per type: {}\n", per.join(", ")));
    }
    if !s.rejected.is_empty() {
        let per: Vec<String> = s.rejected.iter().map(|(t, n)| format!("{t} {n}")).collect();
        out.push_str(&format!("rejects per reason: {}\n", per.join(", ")));
    }
    if s.batches_created + s.batches_resumed > 0 || s.malformed_lines > 0 {
        out.push_str(&format!(
            "batches created {}  resumed {}  malformed result lines {}\n",
            s.batches_created, s.batches_resumed, s.malformed_lines
        ));
    }
    if s.unanswered > 0 {
        out.push_str(&format!("{} pairs still wait for a result\n", s.unanswered));
    }
    out.push_str(&format!(
        "requests {}  retries {}  tokens {} prompt + {} completion",
        s.requests, s.retries, s.prompt_tokens, s.completion_tokens
    ));
    if let Some(c) = s.cost {
        out.push_str(&format!("  estimated cost {c:.4}"));
    }
    out.push_str(&format!(
        "\n{} records in {}  ({:.1} s)",
        s.final_records,
        output::FINAL_FILE,
        Duration::from_secs_f64(s.elapsed_s).as_secs_f64()
    ));
    if s.failed > 0 {
        out.push_str(&format!(
            "\n{} pairs failed; rerun the same command to retry them",
            s.failed
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn price_forms() {
        let p: Price = "0.5".parse().unwrap();
        assert_eq!(
            p,
            Price {
                prompt_per_1k: 0.5,
                completion_per_1k: 0.5
            }
        );
        let p: Price = "0.01, 0.03".parse().unwrap();
        let u = Usage {
            prompt_tokens: 2000,
            completion_tokens: 1000,
        };
        assert!((p.cost(&u) - 0.05).abs() < 1e-12);
        assert!("x".parse::<Price>().is_err());
        assert!("-1".parse::<Price>().is_err());
    }

    /// `n` images with ids `000000000000`… and no annotations.
    fn blank_entries(n: usize) -> Vec<ImageEntry> {
        (0..n)
            .map(|i| ImageEntry {
                id: format!("{i:012}"),
                image: format!("{i}.jpg"),
                width: 1.0,
                height: 1.0,
                captions: vec![],
                boxes: vec![],
            })
            .collect()
    }

    #[test]
    fn type_limits_pick_seeded_subsets() {
        let entries: Vec<ImageEntry> = blank_entries(50);
        let sel: Vec<&ImageEntry> = entries.iter().collect();
        let types = [
            InstructType::Conversation,
            InstructType::Detail,
            InstructType::Complex,
        ];
        let limits: BTreeMap<InstructType, usize> =
            [(InstructType::Detail, 10), (InstructType::Complex, 30)]
                .into_iter()
                .collect();
        let plan = plan_pairs(&sel, &types, &limits, 1);
        let of = |t| {
            plan.iter()
                .filter(|(_, ty)| *ty == t)
                .map(|(i, _)| *i)
                .collect::<Vec<_>>()
        };
        assert_eq!(of(InstructType::Conversation).len(), 50);
        let detail = of(InstructType::Detail);
        assert_eq!(detail.len(), 10);
        assert_eq!(of(InstructType::Complex).len(), 30);
        assert_ne!(
            detail,
            (0..10).collect::<Vec<_>>(),
            "a pseudo-random subset, not the first ten"
        );
        assert_eq!(plan, plan_pairs(&sel, &types, &limits, 1), "deterministic");
        assert_ne!(plan, plan_pairs(&sel, &types, &limits, 2), "seeded");
        // no caps: every image, every type, image-major order
        let all = plan_pairs(&sel, &types, &BTreeMap::new(), 1);
        assert_eq!(all.len(), 150);
        assert_eq!(all[0], (0, InstructType::Conversation));
        assert_eq!(all[1], (0, InstructType::Detail));
    }

    #[test]
    fn selection_shards_then_limits() {
        let entries: Vec<ImageEntry> = blank_entries(100);
        let all = select(&entries, Shard::default(), Some(10));
        assert_eq!(all.len(), 10);
        assert_eq!(all[0].id, "000000000000");
        let s: Shard = "1/4".parse().unwrap();
        let picked = select(&entries, s, Some(5));
        assert_eq!(picked.len(), 5);
        assert!(picked.iter().all(|e| s.contains(&e.id)));
    }
}
