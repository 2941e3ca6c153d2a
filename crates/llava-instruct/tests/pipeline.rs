//! End-to-end runs of the generator against the scripted local server, including a real
//! SIGKILL of a child process mid-run followed by a resume.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use llava_instruct::output::{FINAL_FILE, REJECTS_FILE};
use llava_instruct::source::load_generic_jsonl;
use llava_instruct::{
    ClientConfig, InstructError, InstructType, PromptLibrary, RunConfig, run_blocking,
};

fn client_cfg(base: String, concurrency: usize) -> ClientConfig {
    let mut c = ClientConfig::new(base, "teacher");
    c.backoff_base = Duration::from_millis(10);
    c.backoff_max = Duration::from_millis(40);
    c.timeout = Duration::from_millis(700);
    c.max_retries = 3;
    c.concurrency = concurrency;
    c
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

use common::{TEACHER_TYPES, outcome_counts};

#[test]
fn every_pair_ends_in_the_dataset_or_in_rejects() {
    let rt = runtime();
    let server = rt.block_on(common::start(Duration::ZERO));
    let dir = tempfile::tempdir().unwrap();
    let ann = dir.path().join("ann.jsonl");
    let entries = common::marked_scenes(
        &ann,
        &[
            "mk429",
            "mk500",
            "mkdrop",
            "mkslow",
            "mkbad",
            "mkleak",
            "mk503always",
        ],
        5,
    );
    let out = dir.path().join("out");
    let mut cfg = RunConfig::new(TEACHER_TYPES.to_vec(), &out);
    cfg.price = Some("1,2".parse().unwrap());
    let s = run_blocking(
        entries.clone(),
        PromptLibrary::builtin().unwrap(),
        Some(client_cfg(server.base(), 8)),
        &cfg,
    )
    .unwrap();

    assert_eq!(s.pairs, 36);
    assert_eq!(s.written_total(), 27, "{s:?}");
    assert_eq!(s.rejected_total(), 6, "{s:?}");
    assert_eq!(s.rejected.get("leak"), Some(&3), "{s:?}");
    assert_eq!(
        s.rejected.get("no_turns"),
        Some(&2),
        "mkbad fails conversation and complex"
    );
    assert_eq!(
        s.rejected.get("too_short"),
        Some(&1),
        "detail parses mkbad's one-line prose, and the length filter turns it down"
    );
    assert_eq!(
        s.failed, 3,
        "mk503always exhausts its retries for all three types"
    );
    // 429, dropped and slow: one retry each; 500: two; 503 always: three (max), for 3 types.
    assert_eq!(s.retries, 3 * (1 + 1 + 1 + 2 + 3));
    assert_eq!(s.requests, 36 + s.retries);
    assert_eq!(
        (s.prompt_tokens, s.completion_tokens),
        (33 * 10, 33 * 5),
        "usage of every answered request"
    );
    let cost = s.cost.unwrap();
    assert!((cost - (0.33 + 0.33)).abs() < 1e-9, "{cost}");

    let mk429 = server.state.hits_for("mk429");
    let mut by_type: BTreeMap<String, Vec<Instant>> = BTreeMap::new();
    for h in &mk429 {
        let sys = h.body["messages"][0]["content"]
            .as_str()
            .unwrap()
            .to_string();
        by_type.entry(sys).or_default().push(h.at);
    }
    assert_eq!(by_type.len(), 3);
    for times in by_type.values() {
        assert_eq!(times.len(), 2);
        assert!(
            times[1] - times[0] >= Duration::from_secs(1),
            "Retry-After ignored"
        );
    }

    // every pair exactly once in the dataset, or exactly once in the final rejects, or failed
    let (records, final_rejects, failures) = outcome_counts(&out);
    for e in &entries {
        for ty in TEACHER_TYPES {
            let key = (ty.name().to_string(), e.id.clone());
            let n = records.get(&key).copied().unwrap_or(0)
                + final_rejects.get(&key).copied().unwrap_or(0);
            if e.captions[0].contains("mk503always") {
                assert_eq!(n, 0);
                assert_eq!(failures.get(&key), Some(&1));
            } else {
                assert_eq!(n, 1, "{key:?}");
            }
        }
    }
    // rejects keep the raw reply and reason
    let rejects = common::read_jsonl_strict(&out.join(REJECTS_FILE));
    let leak = rejects.iter().find(|r| r["tag"] == "leak").unwrap();
    assert!(leak["raw"].as_str().unwrap().contains("captions"));
    assert!(leak["reason"].as_str().unwrap().contains("caption"));

    // the final JSON holds exactly the dataset records, each with one <image> in the first turn
    let all: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(out.join(FINAL_FILE)).unwrap()).unwrap();
    assert_eq!(all.len(), 27);
    for r in &all {
        let conv = r["conversations"].as_array().unwrap();
        assert_eq!(conv[0]["from"], "human");
        let text: String = conv.iter().map(|t| t["value"].as_str().unwrap()).collect();
        assert_eq!(text.matches("<image>").count(), 1);
        assert!(conv[0]["value"].as_str().unwrap().contains("<image>"));
        assert!(r["image"].as_str().unwrap().starts_with("images/"));
    }

    // Rerun: finished pairs are skipped; only the failed ones are asked again.
    let hits_before = server.state.hits().len();
    let s2 = run_blocking(
        entries,
        PromptLibrary::builtin().unwrap(),
        Some(client_cfg(server.base(), 8)),
        &cfg,
    )
    .unwrap();
    assert_eq!(s2.already_done, 33);
    assert_eq!(s2.written_total(), 0);
    assert_eq!(s2.failed, 3);
    let new_hits = &server.state.hits()[hits_before..];
    assert_eq!(new_hits.len(), 3 * 4);
    assert!(new_hits.iter().all(|h| h.key.contains("mk503always")));
    let (records2, final2, _) = outcome_counts(&out);
    assert_eq!(records2, records);
    assert_eq!(final2, final_rejects);
}

#[test]
fn refused_key_stops_the_run_without_marking_pairs() {
    let rt = runtime();
    let server = rt.block_on(common::start(Duration::ZERO));
    let dir = tempfile::tempdir().unwrap();
    let ann = dir.path().join("ann.jsonl");
    let captions: Vec<String> = (0..20).map(|i| format!("Scene {i} mk401")).collect();
    common::write_annotations(&ann, &captions);
    let entries = load_generic_jsonl(&ann).unwrap();
    let out = dir.path().join("out");
    let mut cfg = RunConfig::new(vec![InstructType::Detail], &out);
    // Two pairs pending at a time: with all 20 spawned at once, a loaded machine could send
    // every request before the first 401 was joined, and the count below raced.
    cfg.max_pending = 2;
    let err = run_blocking(
        entries,
        PromptLibrary::builtin().unwrap(),
        Some(client_cfg(server.base(), 2)),
        &cfg,
    )
    .unwrap_err();
    assert!(matches!(err, InstructError::Teacher(_)), "{err}");
    assert!(
        server.state.hits().len() <= 2,
        "the run stops at the first refusal instead of trying every pair"
    );
    let (records, final_rejects, failures) = outcome_counts(&out);
    assert!(records.is_empty() && final_rejects.is_empty() && failures.is_empty());
    assert!(!out.join(FINAL_FILE).exists());
}

const CHILD_ENV: &str = "LLAVA_INSTRUCT_KILL_TEST_CHILD";

fn kill_test_run(base: &str, ann: &Path, out: &Path) -> llava_instruct::RunSummary {
    let entries = load_generic_jsonl(ann).unwrap();
    let mut cfg = RunConfig::new(TEACHER_TYPES.to_vec(), out);
    cfg.seed = 7;
    cfg.max_pending = 16;
    run_blocking(
        entries,
        PromptLibrary::builtin().unwrap(),
        Some(client_cfg(base.to_string(), 8)),
        &cfg,
    )
    .unwrap()
}

/// The child side of `sigkill_mid_run_then_resume_loses_and_duplicates_nothing`.
#[test]
#[ignore = "helper process, started by sigkill_mid_run_then_resume_loses_and_duplicates_nothing"]
fn kill_test_child() {
    let (base, ann, out) = common::child_spec(CHILD_ENV);
    kill_test_run(&base, &ann, &out);
}

fn lines_written(out: &Path) -> usize {
    let mut n = 0;
    for name in [
        "conversation.jsonl",
        "detail.jsonl",
        "complex.jsonl",
        REJECTS_FILE,
    ] {
        if let Ok(t) = std::fs::read_to_string(out.join(name)) {
            n += t.matches('\n').count();
        }
    }
    n
}

#[test]
fn sigkill_mid_run_then_resume_loses_and_duplicates_nothing() {
    let rt = runtime();
    let server = rt.block_on(common::start(Duration::from_millis(40)));
    let dir = tempfile::tempdir().unwrap();
    let ann = dir.path().join("ann.jsonl");
    let captions: Vec<String> = (0..60)
        .map(|i| match i % 10 {
            3 => format!("Scene {i} mkbad"),
            5 => format!("Scene {i} mk500"),
            _ => format!("Scene {i} is ordinary."),
        })
        .collect();
    common::write_annotations(&ann, &captions);
    let total = 60 * 3;
    let out = dir.path().join("out");

    let mut child = common::spawn_child(
        "kill_test_child",
        CHILD_ENV,
        format!("{}\n{}\n{}", server.base(), ann.display(), out.display()),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while lines_written(&out) < 40 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the child finished before it could be killed"
        );
        assert!(Instant::now() < deadline, "the child made no progress");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success());
    let written_at_kill = lines_written(&out);
    assert!(written_at_kill < total, "killed mid-run");
    assert!(
        !out.join(FINAL_FILE).exists(),
        "the final file is only written at the end"
    );
    let requested_at_kill: BTreeSet<(String, String)> = server
        .state
        .hits()
        .iter()
        .map(|h| {
            (
                h.body["messages"][0]["content"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                h.key.clone(),
            )
        })
        .collect();

    // A write torn by a crash leaves an unterminated tail; the resume must cut it.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(out.join("detail.jsonl"))
            .unwrap();
        f.write_all(b"{\"id\":\"img0059\",\"image\":\"images/img00")
            .unwrap();
    }

    let s = kill_test_run(&server.base(), &ann, &out);
    assert_eq!(
        s.already_done, written_at_kill,
        "resume skips exactly what was written"
    );
    assert_eq!(
        s.already_done + s.written_total() + s.rejected_total(),
        total
    );
    assert_eq!(s.failed, 0);
    assert!(
        requested_at_kill.len() > written_at_kill,
        "some pairs were in flight when the child died"
    );

    let (records, final_rejects, failures) = outcome_counts(&out);
    assert!(failures.is_empty());
    let entries = load_generic_jsonl(&ann).unwrap();
    for e in &entries {
        for ty in TEACHER_TYPES {
            let key = (ty.name().to_string(), e.id.clone());
            let n = records.get(&key).copied().unwrap_or(0)
                + final_rejects.get(&key).copied().unwrap_or(0);
            assert_eq!(n, 1, "{key:?} must be done exactly once");
        }
    }

    // The interrupted-and-resumed result equals an uninterrupted run with the same seed.
    let clean = dir.path().join("clean");
    let sc = kill_test_run(&server.base(), &ann, &clean);
    assert_eq!(sc.written_total() + sc.rejected_total(), total);
    let a = std::fs::read(out.join(FINAL_FILE)).unwrap();
    let b = std::fs::read(clean.join(FINAL_FILE)).unwrap();
    assert!(a == b, "resumed and clean runs differ");
    let rejected_ids =
        |o: &Path| -> BTreeSet<(String, String)> { outcome_counts(o).1.into_keys().collect() };
    assert_eq!(rejected_ids(&out), rejected_ids(&clean));
}
