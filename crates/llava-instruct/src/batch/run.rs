//! The Batch API run and its offline halves.
//!
//! Online (`llava instruct … --batch`), resumable at every step:
//! 1. the pairs left to do (as the live run computes them) that no unfinished batch of
//!    `batch/state.json` already holds are written as input files, split at the limits, and
//!    each file is recorded in the state before it is uploaded;
//! 2. each file is uploaded and its file id saved; then the state notes that a batch is being
//!    created, the batch is created, and its id is saved. A run killed between the create and
//!    the save finds its batch again by listing the batches for that input file;
//! 3. the unfinished batches are polled, with backoff, until each is `completed`, `expired`,
//!    `failed` or `cancelled`;
//! 4. output and error files are downloaded (kept beside the state) and every line goes through
//!    the same parser and filters as a live reply, into the same files;
//! 5. lines that failed, expired, are missing or malformed are sent again in a new batch holding
//!    only them, up to `retries` times; after that they are request failures, which the next run
//!    tries again (as in the live run).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::batch::api::Batch;
use crate::batch::input::{BatchLimits, custom_id, custom_ids, request_line, split_lines};
use crate::batch::results::{LineResult, parse_file};
use crate::batch::state::{BATCH_DIR, BatchEntry, BatchState};
use crate::client::{ChatClient, ClientError};
use crate::cost::BATCH_DISCOUNT;
use crate::error::InstructError;
use crate::output::{RejectStage, Sink};
use crate::pipeline::{
    Prepared, RunConfig, RunSummary, Settler, Tally, block_on, finish, prepare, reject, request_for,
};
use crate::prompts::PromptLibrary;
use crate::source::ImageEntry;
use crate::types::InstructType;

/// Settings of the Batch API run.
#[derive(Debug, Clone)]
pub struct BatchConfig {
    pub limits: BatchLimits,
    /// New batches for failed or expired lines, after the first.
    pub retries: u32,
    /// `24h`, the only window OpenAI offers.
    pub completion_window: String,
    /// First wait between status polls; it grows by half each poll up to `poll_max`.
    pub poll_initial: Duration,
    pub poll_max: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            limits: BatchLimits::default(),
            retries: 2,
            completion_window: "24h".into(),
            poll_initial: Duration::from_secs(10),
            poll_max: Duration::from_secs(300),
        }
    }
}

type Pair = (Arc<ImageEntry>, InstructType);

fn api_err(what: impl Into<String>) -> impl FnOnce(ClientError) -> InstructError {
    let what = what.into();
    move |source| InstructError::BatchApi { what, source }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), InstructError> {
    let mut f = std::fs::File::create(path).map_err(InstructError::io(path))?;
    f.write_all(bytes).map_err(InstructError::io(path))?;
    f.sync_all().map_err(InstructError::io(path))
}

/// Turns result lines into records and rejects; remembers the failures.
struct Importer {
    settler: Settler,
    /// Pairs without an outcome yet, by `custom_id`.
    pending: HashMap<String, Pair>,
    /// The last error reported for a pending pair.
    last_error: HashMap<String, String>,
}

impl Importer {
    fn import(
        &mut self,
        origin: &str,
        bytes: &[u8],
        tally: &mut Tally,
        sink: &mut Sink,
    ) -> Result<(), InstructError> {
        for item in parse_file(bytes) {
            match item {
                Err((line, e)) => {
                    tracing::warn!(file = origin, line, error = %e, "malformed result line; its request will be sent again");
                    tally.summary.malformed_lines += 1;
                }
                Ok((cid, LineResult::Reply(resp))) => match self.pending.remove(&cid) {
                    Some((entry, ty)) => {
                        self.last_error.remove(&cid);
                        tally.settle(sink, self.settler.reply(&entry, ty, resp))?;
                    }
                    None => {
                        tracing::debug!(custom_id = %cid, "result for a pair that is done or not selected; ignored")
                    }
                },
                Ok((cid, LineResult::Failed(msg))) => {
                    if self.pending.contains_key(&cid) {
                        self.last_error.insert(cid, msg);
                    }
                }
            }
        }
        Ok(())
    }

    /// Records `cid` as a request failure (retried by the next run).
    fn give_up(
        &mut self,
        cid: &str,
        tally: &mut Tally,
        sink: &mut Sink,
    ) -> Result<(), InstructError> {
        let Some((entry, ty)) = self.pending.remove(cid) else {
            return Ok(());
        };
        let why = self
            .last_error
            .remove(cid)
            .unwrap_or_else(|| "no result line for this request".into());
        let r = reject(&entry, ty, RejectStage::Request, "request", why, None);
        tally.settle(sink, crate::pipeline::Outcome::Failed(r))?;
        Ok(())
    }
}

/// A run prepared for batch work: the pairs left for the teacher by `custom_id`, in order.
struct Begun {
    tally: Tally,
    sink: Sink,
    start: std::time::Instant,
    order: Vec<String>,
    imp: Importer,
}

fn begin(
    entries: Vec<ImageEntry>,
    lib: Arc<PromptLibrary>,
    cfg: &RunConfig,
) -> Result<Begun, InstructError> {
    let Prepared {
        tally,
        sink,
        teacher_todo,
        start,
    } = prepare(entries, &lib, cfg)?;
    let order: Vec<String> = teacher_todo
        .iter()
        .map(|(e, t)| custom_id(&e.id, *t))
        .collect();
    let pending = order.iter().cloned().zip(teacher_todo).collect();
    let imp = Importer {
        settler: Settler {
            lib,
            filters: Arc::new(cfg.filters.clone()),
            seed: cfg.seed,
        },
        pending,
        last_error: HashMap::new(),
    };
    Ok(Begun {
        tally,
        sink,
        start,
        order,
        imp,
    })
}

/// Request lines for `ids`, split into files at `limits`. Pairs with no prompt set are
/// settled as input rejects instead.
#[allow(clippy::too_many_arguments)]
fn input_files(
    ids: &[String],
    imp: &mut Importer,
    model: &str,
    cfg: &RunConfig,
    limits: BatchLimits,
    tally: &mut Tally,
    sink: &mut Sink,
) -> Result<Vec<Vec<u8>>, InstructError> {
    let mut lines = Vec::with_capacity(ids.len());
    for cid in ids {
        let Some((entry, ty)) = imp.pending.get(cid).cloned() else {
            continue;
        };
        match request_for(
            &entry,
            ty,
            &imp.settler.lib,
            cfg.temperature,
            cfg.max_tokens,
        ) {
            Some(req) => lines.push(request_line(cid, model, &req)),
            None => {
                imp.pending.remove(cid);
                let r = reject(
                    &entry,
                    ty,
                    RejectStage::Input,
                    "no_prompt",
                    "no prompt set for this type".into(),
                    None,
                );
                tally.settle(
                    sink,
                    crate::pipeline::Outcome::Reject(r, Default::default()),
                )?;
            }
        }
    }
    Ok(split_lines(lines, limits)?
        .into_iter()
        .map(|f| f.concat())
        .collect())
}

/// Uploads and creates what an entry lacks, saving the state after each step.
async fn submit(
    client: &ChatClient,
    state: &mut BatchState,
    i: usize,
    out_dir: &Path,
    bcfg: &BatchConfig,
    summary: &mut RunSummary,
) -> Result<(), InstructError> {
    let dir = out_dir.join(BATCH_DIR);
    if state.batches[i].input_file_id.is_none() {
        let name = state.batches[i].input.clone();
        let path = dir.join(&name);
        let bytes = std::fs::read(&path).map_err(InstructError::io(&path))?;
        let id = client
            .upload_batch_file(&name, &bytes)
            .await
            .map_err(api_err(format!("uploading {}", path.display())))?;
        state.batches[i].input_file_id = Some(id);
        state.save(out_dir)?;
    }
    if state.batches[i].batch_id.is_some() {
        return Ok(());
    }
    let file_id = state.batches[i].input_file_id.clone().unwrap_or_default();
    let existing = if state.batches[i].status.as_deref() == Some("creating") {
        // An earlier run may have created it and died before saving the id.
        client
            .find_batch_for_file(&file_id)
            .await
            .map_err(api_err("listing batches"))?
    } else {
        None
    };
    let batch = match existing {
        Some(b) => {
            tracing::info!(batch = %b.id, file = %file_id, "found the batch an interrupted run created");
            b
        }
        None => {
            state.batches[i].status = Some("creating".into());
            state.save(out_dir)?;
            let b = client
                .create_batch(&file_id, &bcfg.completion_window)
                .await
                .map_err(api_err(format!("creating a batch for {file_id}")))?;
            summary.batches_created += 1;
            b
        }
    };
    state.batches[i].batch_id = Some(batch.id.clone());
    state.batches[i].status = Some(batch.status.clone());
    state.save(out_dir)?;
    tracing::info!(batch = %batch.id, requests = state.batches[i].requests, "batch submitted");
    Ok(())
}

/// Polls the `active` batches until all are terminal, with backoff and a progress bar.
async fn poll(
    client: &ChatClient,
    state: &mut BatchState,
    active: &[usize],
    out_dir: &Path,
    bcfg: &BatchConfig,
    progress: bool,
) -> Result<BTreeMap<usize, Batch>, InstructError> {
    let total: usize = active.iter().map(|&i| state.batches[i].requests).sum();
    let bar = ProgressBar::with_draw_target(
        Some(total as u64),
        if progress {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    if let Ok(style) = ProgressStyle::with_template(
        "{elapsed_precise} batches [{wide_bar}] {pos}/{len} requests  {msg}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    let mut done: BTreeMap<usize, Batch> = BTreeMap::new();
    let mut delay = bcfg.poll_initial;
    loop {
        let mut finished = 0u64;
        let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
        for &i in active {
            let b = match done.get(&i) {
                Some(b) => b.clone(),
                None => {
                    let id = state.batches[i].batch_id.clone().unwrap_or_default();
                    let b = client
                        .get_batch(&id)
                        .await
                        .map_err(api_err(format!("polling batch {id}")))?;
                    if state.batches[i].status.as_deref() != Some(b.status.as_str()) {
                        state.batches[i].status = Some(b.status.clone());
                        state.save(out_dir)?;
                    }
                    if b.is_terminal() {
                        done.insert(i, b.clone());
                    }
                    b
                }
            };
            let c = b.request_counts.unwrap_or_default();
            finished += if b.is_terminal() {
                state.batches[i].requests as u64
            } else {
                c.completed + c.failed
            };
            *statuses.entry(b.status).or_default() += 1;
        }
        bar.set_position(finished);
        let msg: Vec<String> = statuses.iter().map(|(s, n)| format!("{s} {n}")).collect();
        bar.set_message(msg.join(", "));
        if done.len() == active.len() {
            bar.finish_and_clear();
            return Ok(done);
        }
        tokio::time::sleep(delay).await;
        delay = delay.mul_f64(1.5).min(bcfg.poll_max.max(bcfg.poll_initial));
    }
}

/// Downloads a terminal batch's files (kept beside the state) and imports them.
async fn collect(
    client: &ChatClient,
    batch: &Batch,
    dir: &Path,
    imp: &mut Importer,
    tally: &mut Tally,
    sink: &mut Sink,
) -> Result<(), InstructError> {
    for (kind, file) in [
        ("output", &batch.output_file_id),
        ("errors", &batch.error_file_id),
    ] {
        let Some(file_id) = file else { continue };
        let bytes = client
            .file_content(file_id)
            .await
            .map_err(api_err(format!("downloading {kind} file {file_id}")))?;
        let path = dir.join(format!("{}-{kind}.jsonl", batch.id));
        write_synced(&path, &bytes)?;
        imp.import(&path.display().to_string(), &bytes, tally, sink)?;
    }
    Ok(())
}

/// The summary's cost at the Batch API's price (half the live price).
fn batch_priced(mut s: RunSummary) -> Result<RunSummary, InstructError> {
    s.cost = s.cost.map(|c| c * BATCH_DISCOUNT);
    Ok(s)
}

/// The Batch API run. Same inputs and outputs as [`crate::pipeline::run`].
pub async fn run_batch(
    entries: Vec<ImageEntry>,
    lib: Arc<PromptLibrary>,
    client: ChatClient,
    cfg: &RunConfig,
    bcfg: &BatchConfig,
) -> Result<RunSummary, InstructError> {
    let Begun {
        mut tally,
        mut sink,
        start,
        order,
        mut imp,
    } = begin(entries, lib, cfg)?;
    // The pair bar would fight the polling bar; the summary tells the pair counts.
    tally.bar.set_draw_target(ProgressDrawTarget::hidden());
    let dir = cfg.out_dir.join(BATCH_DIR);
    std::fs::create_dir_all(&dir).map_err(InstructError::io(&dir))?;
    let mut state = BatchState::load(&cfg.out_dir)?;
    let (attempts0, retries0) = (client.attempts_made(), client.retries_made());
    let model = client.config().model.clone();

    // Pairs an unfinished batch already holds are not sent again.
    let mut held: HashSet<String> = HashSet::new();
    for e in state.batches.iter().filter(|e| !e.imported) {
        let path = dir.join(&e.input);
        let bytes = std::fs::read(&path).map_err(InstructError::io(&path))?;
        held.extend(custom_ids(&bytes));
        tally.summary.batches_resumed += 1;
    }
    let mut fresh: Vec<String> = order.into_iter().filter(|c| !held.contains(c)).collect();
    let mut retry_queue: Vec<String> = Vec::new();
    let mut retry_round = 0u32;

    loop {
        let active: Vec<usize> = (0..state.batches.len())
            .filter(|&i| !state.batches[i].imported)
            .collect();
        if active.is_empty() {
            let (ids, round) = if !retry_queue.is_empty() {
                (std::mem::take(&mut retry_queue), retry_round)
            } else if !fresh.is_empty() {
                (std::mem::take(&mut fresh), 0)
            } else {
                break;
            };
            let files = input_files(
                &ids,
                &mut imp,
                &model,
                cfg,
                bcfg.limits,
                &mut tally,
                &mut sink,
            )?;
            for bytes in files {
                let name = state.next_input_name(round);
                write_synced(&dir.join(&name), &bytes)?;
                state.batches.push(BatchEntry {
                    input: name,
                    round,
                    requests: bytes.iter().filter(|&&b| b == b'\n').count(),
                    input_file_id: None,
                    batch_id: None,
                    status: None,
                    imported: false,
                });
                state.save(&cfg.out_dir)?;
            }
            continue;
        }
        for &i in &active {
            submit(
                &client,
                &mut state,
                i,
                &cfg.out_dir,
                bcfg,
                &mut tally.summary,
            )
            .await?;
        }
        let finished = poll(
            &client,
            &mut state,
            &active,
            &cfg.out_dir,
            bcfg,
            cfg.progress,
        )
        .await?;
        for (i, batch) in finished {
            collect(&client, &batch, &dir, &mut imp, &mut tally, &mut sink).await?;
            let input = dir.join(&state.batches[i].input);
            let ids = custom_ids(&std::fs::read(&input).map_err(InstructError::io(&input))?);
            let round = state.batches[i].round;
            let unsettled: Vec<String> = ids
                .into_iter()
                .filter(|c| imp.pending.contains_key(c))
                .collect();
            for cid in &unsettled {
                if batch.status == "failed" && !imp.last_error.contains_key(cid) {
                    let why = format!(
                        "batch {} failed: {}",
                        batch.id,
                        batch.errors.clone().unwrap_or_default()
                    );
                    imp.last_error.insert(cid.clone(), why);
                }
                if round < bcfg.retries {
                    retry_queue.push(cid.clone());
                    retry_round = round + 1;
                } else {
                    imp.give_up(cid, &mut tally, &mut sink)?;
                }
            }
            state.batches[i].imported = true;
            state.save(&cfg.out_dir)?;
        }
    }
    tally.summary.requests = client.attempts_made() - attempts0;
    tally.summary.retries = client.retries_made() - retries0;
    batch_priced(finish(tally, sink, cfg, start)?)
}

/// [`run_batch`] on a fresh multi-threaded runtime, for synchronous callers such as the CLI.
pub fn run_batch_blocking(
    entries: Vec<ImageEntry>,
    lib: PromptLibrary,
    client_cfg: crate::client::ClientConfig,
    cfg: &RunConfig,
    bcfg: &BatchConfig,
) -> Result<RunSummary, InstructError> {
    block_on(async {
        let client = ChatClient::new(client_cfg)?;
        run_batch(entries, Arc::new(lib), client, cfg, bcfg).await
    })
}

/// The name prefix of files written by [`export_batch`].
pub const EXPORT_PREFIX: &str = "export-";

/// Offline half one: writes the Batch input files of every pair left to do into
/// `<out>/batch/export-NNNN.jsonl` (earlier exports are replaced), for submitting by hand or
/// with `vllm run-batch`. Pairs that need no teacher are settled as in a run.
pub fn export_batch(
    entries: Vec<ImageEntry>,
    lib: &PromptLibrary,
    model: &str,
    cfg: &RunConfig,
    limits: BatchLimits,
) -> Result<(Vec<PathBuf>, RunSummary), InstructError> {
    let Begun {
        mut tally,
        mut sink,
        start,
        order,
        mut imp,
    } = begin(entries, Arc::new(lib.clone()), cfg)?;
    let dir = cfg.out_dir.join(BATCH_DIR);
    std::fs::create_dir_all(&dir).map_err(InstructError::io(&dir))?;
    for e in std::fs::read_dir(&dir)
        .map_err(InstructError::io(&dir))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(EXPORT_PREFIX) && name.ends_with(".jsonl") {
            std::fs::remove_file(e.path()).map_err(InstructError::io(e.path()))?;
        }
    }
    let files = input_files(&order, &mut imp, model, cfg, limits, &mut tally, &mut sink)?;
    let mut paths = Vec::with_capacity(files.len());
    for (k, bytes) in files.iter().enumerate() {
        let path = dir.join(format!("{EXPORT_PREFIX}{k:04}.jsonl"));
        write_synced(&path, bytes)?;
        paths.push(path);
    }
    tally.summary.unanswered = imp.pending.len();
    Ok((paths, finish(tally, sink, cfg, start)?))
}

/// Offline half two: reads Batch output and error files (from OpenAI or `vllm run-batch`) into
/// the output folder. Pairs with an error line become request failures (a later export sends
/// them again); pairs with no line stay to do (`unanswered`). The cost estimate is at the
/// Batch API's price.
pub fn import_batch(
    entries: Vec<ImageEntry>,
    lib: &PromptLibrary,
    cfg: &RunConfig,
    files: &[PathBuf],
) -> Result<RunSummary, InstructError> {
    let Begun {
        mut tally,
        mut sink,
        start,
        mut imp,
        ..
    } = begin(entries, Arc::new(lib.clone()), cfg)?;
    for path in files {
        let bytes = std::fs::read(path).map_err(InstructError::io(path))?;
        imp.import(&path.display().to_string(), &bytes, &mut tally, &mut sink)?;
    }
    let failed: Vec<String> = imp.last_error.keys().cloned().collect();
    for cid in failed {
        imp.give_up(&cid, &mut tally, &mut sink)?;
    }
    tally.summary.unanswered = imp.pending.len();
    batch_priced(finish(tally, sink, cfg, start)?)
}
