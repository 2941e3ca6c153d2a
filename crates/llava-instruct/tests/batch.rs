//! The Batch API run against a scripted local Batch API: batches that complete, partially
//! fail, expire or return malformed output; retry batches; a SIGKILL while polling followed by
//! a rerun; and the offline export/import halves.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use llava_instruct::batch::state::BatchState;
use llava_instruct::batch::{BatchConfig, BatchLimits, custom_id, export_batch, import_batch};
use llava_instruct::output::FINAL_FILE;
use llava_instruct::source::load_generic_jsonl;
use llava_instruct::{ClientConfig, InstructType, PromptLibrary, RunConfig};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn client_cfg(base: &str) -> ClientConfig {
    let mut c = ClientConfig::new(base, "teacher");
    c.backoff_base = Duration::from_millis(10);
    c.backoff_max = Duration::from_millis(40);
    c.timeout = Duration::from_secs(5);
    c.max_retries = 2;
    c
}

fn batch_cfg(max_requests: usize) -> BatchConfig {
    BatchConfig {
        limits: BatchLimits {
            max_requests,
            max_bytes: 200 * 1000 * 1000,
        },
        retries: 2,
        completion_window: "24h".into(),
        poll_initial: Duration::from_millis(5),
        poll_max: Duration::from_millis(20),
    }
}

use common::{TEACHER_TYPES, outcome_counts};

fn ids_with(entries: &[llava_instruct::ImageEntry], marker: &str) -> BTreeSet<String> {
    entries
        .iter()
        .filter(|e| e.captions[0].contains(marker))
        .flat_map(|e| TEACHER_TYPES.map(|t| custom_id(&e.id, t)))
        .collect()
}

#[test]
fn batches_complete_fail_expire_and_only_failed_lines_are_retried() {
    let rt = runtime();
    let server = rt.block_on(common::batch::start(2));
    let dir = tempfile::tempdir().unwrap();
    let ann = dir.path().join("ann.jsonl");
    let entries = common::marked_scenes(
        &ann,
        &[
            "mkbfail",
            "mkbexpire",
            "mkbmalformed",
            "mkbmissing",
            "mkbrefuse",
            "mkbalways",
        ],
        4,
    );
    let out = dir.path().join("out");
    let mut cfg = RunConfig::new(TEACHER_TYPES.to_vec(), &out);
    cfg.price = Some("1,2".parse().unwrap());
    let s = rt
        .block_on(llava_instruct::batch::run_batch(
            entries.clone(),
            std::sync::Arc::new(PromptLibrary::builtin().unwrap()),
            llava_instruct::ChatClient::new(client_cfg(&server.base())).unwrap(),
            &cfg,
            &batch_cfg(12),
        ))
        .unwrap();

    // 30 pairs: 4 plain + fail, expire, malformed, missing succeed (the last four on retry),
    // refuse is rejected by the refusal filter, always-failing gives up after two retries.
    assert_eq!(s.pairs, 30);
    assert_eq!(s.written_total(), 24, "{s:?}");
    assert_eq!(s.rejected.get("refusal"), Some(&3), "{s:?}");
    assert_eq!(s.rejected_total(), 3, "{s:?}");
    assert_eq!(s.failed, 3, "{s:?}");
    assert_eq!(
        s.malformed_lines, 3,
        "mkbmalformed's torn line, once per type"
    );
    assert_eq!((s.prompt_tokens, s.completion_tokens), (27 * 10, 27 * 5));
    let cost = s.cost.unwrap();
    assert!(
        (cost - 0.5 * (0.27 * 1.0 + 0.135 * 2.0)).abs() < 1e-9,
        "half the live price: {cost}"
    );

    // Round 0: 30 lines split at 12 per file; round 1 holds exactly the 15 failed lines (12+3);
    // round 2 only the always-failing ones.
    let batches = server.state.batches();
    let sizes: Vec<usize> = batches.iter().map(|b| b.custom_ids.len()).collect();
    assert_eq!(sizes, [12, 12, 6, 12, 3, 3]);
    assert_eq!(s.batches_created, 6);
    assert!(batches.iter().any(|b| b.status == "expired"));
    let round = |r: std::ops::Range<usize>| -> BTreeSet<String> {
        batches[r]
            .iter()
            .flat_map(|b| b.custom_ids.clone())
            .collect()
    };
    let all: BTreeSet<String> = entries
        .iter()
        .flat_map(|e| TEACHER_TYPES.map(|t| custom_id(&e.id, t)))
        .collect();
    assert_eq!(round(0..3), all);
    let mut failed0 = BTreeSet::new();
    for m in [
        "mkbfail",
        "mkbexpire",
        "mkbmalformed",
        "mkbmissing",
        "mkbalways",
    ] {
        failed0.extend(ids_with(&entries, m));
    }
    assert_eq!(
        round(3..5),
        failed0,
        "the retry batch holds only the failed lines"
    );
    assert_eq!(round(5..6), ids_with(&entries, "mkbalways"));

    // every pair exactly once in the dataset or the final rejects; always-failing ones are
    // request failures, retried by the next run
    let (records, rejects, failures) = outcome_counts(&out);
    for e in &entries {
        for ty in TEACHER_TYPES {
            let key = (ty.name().to_string(), e.id.clone());
            let n = records.get(&key).unwrap_or(&0) + rejects.get(&key).unwrap_or(&0);
            if e.captions[0].contains("mkbalways") {
                assert_eq!((n, failures.get(&key)), (0, Some(&1)), "{key:?}");
            } else {
                assert_eq!(n, 1, "{key:?}");
            }
        }
    }
    let merged: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(out.join(FINAL_FILE)).unwrap()).unwrap();
    assert_eq!(merged.len(), 24);
    let state = BatchState::load(&out).unwrap();
    assert_eq!(state.batches.len(), 6);
    assert!(state.batches.iter().all(|b| b.imported));
    assert_eq!(
        state.batches.iter().map(|b| b.round).collect::<Vec<_>>(),
        [0, 0, 0, 1, 1, 2]
    );

    // A rerun sends only the request failures, in one new batch.
    let s2 = rt
        .block_on(llava_instruct::batch::run_batch(
            entries,
            std::sync::Arc::new(PromptLibrary::builtin().unwrap()),
            llava_instruct::ChatClient::new(client_cfg(&server.base())).unwrap(),
            &cfg,
            &batch_cfg(12),
        ))
        .unwrap();
    assert_eq!(s2.already_done, 27);
    assert_eq!(s2.failed, 3);
    let after = server.state.batches();
    assert_eq!(after.len(), 9, "three rounds of the three failing lines");
    assert!(after[6..].iter().all(|b| b.custom_ids.len() == 3));
}

#[test]
fn a_batch_that_fails_validation_is_retried_then_left_as_request_failures() {
    let rt = runtime();
    let server = rt.block_on(common::batch::start(1));
    let dir = tempfile::tempdir().unwrap();
    let entries = common::marked_scenes(&dir.path().join("ann.jsonl"), &["mkbinvalid"], 1);
    let out = dir.path().join("out");
    let mut cfg = RunConfig::new(vec![InstructType::Detail], &out);
    cfg.price = Some("1".parse().unwrap());
    let mut bcfg = batch_cfg(100);
    bcfg.retries = 1;
    let s = rt
        .block_on(llava_instruct::batch::run_batch(
            entries,
            std::sync::Arc::new(PromptLibrary::builtin().unwrap()),
            llava_instruct::ChatClient::new(client_cfg(&server.base())).unwrap(),
            &cfg,
            &bcfg,
        ))
        .unwrap();
    let batches = server.state.batches();
    assert_eq!(batches.len(), 2, "the first batch and one retry");
    assert!(
        batches
            .iter()
            .all(|b| b.status == "failed" && b.custom_ids.len() == 2)
    );
    assert_eq!((s.written_total(), s.failed), (0, 2));
    let (records, rejects, failures) = outcome_counts(&out);
    assert!(records.is_empty() && rejects.is_empty());
    assert_eq!(failures.len(), 2);
    let lines = common::read_jsonl_strict(&out.join(llava_instruct::output::REJECTS_FILE));
    assert!(
        lines
            .iter()
            .all(|r| r["reason"].as_str().unwrap().contains("mkbinvalid")),
        "the batch's errors are the reason"
    );
}

const CHILD_ENV: &str = "LLAVA_INSTRUCT_BATCH_KILL_CHILD";

fn kill_run(base: &str, ann: &Path, out: &Path) -> llava_instruct::RunSummary {
    let entries = load_generic_jsonl(ann).unwrap();
    let mut cfg = RunConfig::new(TEACHER_TYPES.to_vec(), out);
    cfg.seed = 3;
    llava_instruct::batch::run_batch_blocking(
        entries,
        PromptLibrary::builtin().unwrap(),
        client_cfg(base),
        &cfg,
        &batch_cfg(8),
    )
    .unwrap()
}

/// The child side of `sigkill_while_polling_then_rerun_creates_no_second_batch`.
#[test]
#[ignore = "helper process, started by sigkill_while_polling_then_rerun_creates_no_second_batch"]
fn batch_kill_child() {
    let (base, ann, out) = common::child_spec(CHILD_ENV);
    kill_run(&base, &ann, &out);
}

#[test]
fn sigkill_while_polling_then_rerun_creates_no_second_batch() {
    let rt = runtime();
    let server = rt.block_on(common::batch::start(1));
    server.state.hold.store(true, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let ann = dir.path().join("ann.jsonl");
    let captions: Vec<String> = (0..10)
        .map(|i| match i {
            4 => format!("Scene {i} mkbfail"),
            _ => format!("Scene {i} is ordinary."),
        })
        .collect();
    common::write_annotations(&ann, &captions);
    let out = dir.path().join("out");

    let mut child = common::spawn_child(
        "batch_kill_child",
        CHILD_ENV,
        format!("{}\n{}\n{}", server.base(), ann.display(), out.display()),
    );
    // 30 requests at 8 per file: 4 batches. Wait until all are created and being polled.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let saved = BatchState::load(&out)
            .map(|s| s.batches.iter().filter(|b| b.batch_id.is_some()).count())
            .unwrap_or(0);
        if saved == 4 && server.state.polls.load(Ordering::SeqCst) >= 8 {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "the child ended early");
        assert!(Instant::now() < deadline, "the child made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    assert!(!child.wait().unwrap().success());
    let created = server.state.batches();
    assert_eq!(created.len(), 4);
    assert!(!out.join(FINAL_FILE).exists());

    // As if the child had died between creating the last batch and saving its id: the rerun
    // must find that batch by its input file instead of creating another.
    let mut state = BatchState::load(&out).unwrap();
    state.batches[3].batch_id = None;
    state.batches[3].status = Some("creating".into());
    state.save(&out).unwrap();

    server.state.hold.store(false, Ordering::SeqCst);
    let s = kill_run(&server.base(), &ann, &out);
    assert_eq!(s.batches_resumed, 4);
    let after = server.state.batches();
    // the only new batch is the retry of the mkbfail lines
    assert_eq!(after.len(), 5, "no second batch for the same requests");
    assert_eq!(s.batches_created, 1);
    assert_eq!(
        after[4].custom_ids.iter().collect::<BTreeSet<_>>(),
        TEACHER_TYPES
            .map(|t| custom_id("img0004", t))
            .iter()
            .collect::<BTreeSet<_>>()
    );
    assert_eq!(server.state.uploads.load(Ordering::SeqCst), 5);
    assert_eq!(s.written_total(), 30);
    let (records, rejects, failures) = outcome_counts(&out);
    assert!(rejects.is_empty() && failures.is_empty());
    assert_eq!(records.len(), 30);
    assert!(records.values().all(|&n| n == 1));
    let state = BatchState::load(&out).unwrap();
    assert_eq!(
        state.batches[3].batch_id.as_deref(),
        Some(created[3].id.as_str())
    );
}

#[test]
fn export_then_import_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    let ann = dir.path().join("ann.jsonl");
    let mut captions: Vec<String> = (0..5).map(|i| format!("Scene {i} is ordinary.")).collect();
    captions.push("Scene 5 mkbfail".into());
    captions.push("Scene 6 mkbmalformed".into());
    common::write_annotations(&ann, &captions);
    let entries = load_generic_jsonl(&ann).unwrap();
    let out = dir.path().join("out");
    let mut cfg = RunConfig::new(
        vec![
            InstructType::Detail,
            InstructType::Complex,
            InstructType::Brief,
        ],
        &out,
    );
    cfg.seed = 1;
    let lib = PromptLibrary::builtin().unwrap();
    let limits = BatchLimits {
        max_requests: 100,
        max_bytes: 12_000,
    };
    let (files, s) = export_batch(entries.clone(), &lib, "gpt-4o", &cfg, limits).unwrap();
    assert_eq!(
        s.written.get(&InstructType::Brief),
        Some(&7),
        "brief needs no teacher"
    );
    assert_eq!(s.unanswered, 14);
    assert!(files.len() > 1, "split at the byte limit");
    let mut lines = 0;
    let mut seen = HashMap::new();
    let mut results = Vec::new();
    for (k, f) in files.iter().enumerate() {
        let bytes = std::fs::read(f).unwrap();
        assert!(bytes.len() <= 12_000);
        for l in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let v: serde_json::Value = serde_json::from_slice(l).unwrap();
            assert_eq!(v["body"]["model"], "gpt-4o");
            lines += 1;
        }
        let p = common::batch::process_input(&bytes, &mut seen);
        let o = dir.path().join(format!("out-{k}.jsonl"));
        let e = dir.path().join(format!("err-{k}.jsonl"));
        std::fs::write(&o, p.output).unwrap();
        std::fs::write(&e, p.errors).unwrap();
        results.extend([o, e]);
    }
    assert_eq!(lines, 14);

    let s = import_batch(entries.clone(), &lib, &cfg, &results).unwrap();
    assert_eq!(s.written_total(), 10, "{s:?}");
    assert_eq!(s.failed, 2, "mkbfail's two error lines");
    assert_eq!(s.unanswered, 2, "mkbmalformed's torn lines answer nothing");
    assert_eq!(s.malformed_lines, 2);

    // Export again: only what is left, and importing the same files twice adds nothing.
    let (files2, s2) = export_batch(entries.clone(), &lib, "gpt-4o", &cfg, limits).unwrap();
    assert_eq!(s2.unanswered, 4);
    assert!(
        !files.iter().skip(files2.len()).any(|f| f.exists()),
        "the earlier, larger export is replaced"
    );
    let again = import_batch(entries.clone(), &lib, &cfg, &results).unwrap();
    assert_eq!(again.written_total(), 0);
    let mut outs = Vec::new();
    let mut lines2 = 0;
    for (k, f) in files2.iter().enumerate() {
        let bytes = std::fs::read(f).unwrap();
        lines2 += bytes.iter().filter(|&&b| b == b'\n').count();
        let p = common::batch::process_input(&bytes, &mut seen);
        let o = dir.path().join(format!("out2-{k}.jsonl"));
        std::fs::write(&o, p.output).unwrap();
        outs.push(o);
    }
    assert_eq!(lines2, 4, "only what is left");
    let s3 = import_batch(entries, &lib, &cfg, &outs).unwrap();
    assert_eq!(s3.written_total(), 4);
    assert_eq!(s3.unanswered, 0);
    let (records, rejects, failures) = outcome_counts(&out);
    assert_eq!(records.len(), 21);
    assert!(records.values().all(|&n| n == 1));
    assert!(rejects.is_empty());
    assert_eq!(
        failures.len(),
        2,
        "the earlier request failures stay in the log"
    );
}
