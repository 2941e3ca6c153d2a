//! The judge against a scripted OpenAI-compatible server on 127.0.0.1 (port 0).
//!
//! The reply is chosen by a marker in the model answer (inside the user message):
//! - `mkgood`: "8 7" and prose;
//! - `mkprose`: scores labelled on later lines after an opening sentence;
//! - `mkreversed`: "Assistant 2: 4" before "Assistant 1: 8";
//! - `mkgarbage`: never any scores;
//! - `mkflaky`: no scores the first time, "6 5" after;
//! - `mkslow`: no scores the first two times, "9 3" after;
//! - `mk429`: 429 the first time, "7 7" after;
//! - `mk503`: always 503;
//! - `mk401`: always 401.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use llava_eval::judge::{JudgeConfig, run};
use llava_eval::{EvalError, QuestionId, read_reviews, summarize};
use llava_instruct::ClientConfig;

#[derive(Default)]
struct Server {
    delay: Duration,
    attempts: Mutex<HashMap<String, usize>>,
    hits: Mutex<Vec<String>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

impl Server {
    fn hits_for(&self, marker: &str) -> usize {
        self.hits
            .lock()
            .unwrap()
            .iter()
            .filter(|h| h.contains(marker))
            .count()
    }
    fn total_hits(&self) -> usize {
        self.hits.lock().unwrap().len()
    }
}

fn completion(content: &str) -> Response {
    let v = serde_json::json!({
        "id": "x", "object": "chat.completion", "model": "judge",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5}
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

async fn handle(State(s): State<Arc<Server>>, body: Bytes) -> Response {
    let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    s.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let user = v["messages"][1]["content"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let attempt = {
        let mut a = s.attempts.lock().unwrap();
        let n = a.entry(user.clone()).or_insert(0);
        *n += 1;
        *n
    };
    s.hits.lock().unwrap().push(user.clone());
    tokio::time::sleep(s.delay).await;
    s.in_flight.fetch_sub(1, Ordering::SeqCst);
    let has = |m: &str| user.contains(m);
    if has("mk401") {
        return (StatusCode::UNAUTHORIZED, "bad key").into_response();
    }
    if has("mk503") {
        return (StatusCode::SERVICE_UNAVAILABLE, "busy").into_response();
    }
    if has("mk429") && attempt == 1 {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after-ms", "20")],
            "slow down",
        )
            .into_response();
    }
    let reply = if has("mkgood") {
        "8 7\nAssistant 1 is more complete; Assistant 2 misses 2 objects.".to_string()
    } else if has("mkprose") {
        "Having compared both answers carefully, here is my verdict.\nAssistant 1: 9\nAssistant 2: 6.5\nAssistant 1 names 3 more objects.".to_string()
    } else if has("mkreversed") {
        "Assistant 2: 4\nAssistant 1: 8\nThe second answer is vague.".to_string()
    } else if has("mkflaky") && attempt == 1 {
        "Both answers are reasonable.".to_string()
    } else if has("mkflaky") {
        "6 5\nClose call.".to_string()
    } else if has("mkslow") && attempt <= 2 {
        "Let me think about it.".to_string()
    } else if has("mkslow") {
        "9 3\nFinally.".to_string()
    } else if has("mk429") {
        "7 7".to_string()
    } else {
        "I would rather not grade these.".to_string()
    };
    completion(&reply)
}

async fn start(delay: Duration) -> (String, Arc<Server>) {
    let state = Arc::new(Server {
        delay,
        ..Default::default()
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(handle))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/v1"), state)
}

fn write_lines(path: &Path, lines: &[serde_json::Value]) {
    let mut s = String::new();
    for l in lines {
        s.push_str(&l.to_string());
        s.push('\n');
    }
    std::fs::write(path, s).unwrap();
}

/// Writes a benchmark: question i has model answer `markers[i]` (None: no answer), image
/// `img{i}.jpg`, category conv/detail/complex in turn. Image `nocontext.jpg` has no context.
fn bench(dir: &Path, markers: &[Option<&str>], base: &str) -> JudgeConfig {
    let cats = ["conv", "detail", "complex"];
    let mut q = Vec::new();
    let mut refs = Vec::new();
    let mut ans = Vec::new();
    let mut ctx = Vec::new();
    for (i, m) in markers.iter().enumerate() {
        let id = i as i64 + 1;
        q.push(
            serde_json::json!({"question_id": id, "image": format!("img{id}.jpg"),
            "text": format!("What is in picture {id}?"), "category": cats[i % 3]}),
        );
        refs.push(
            serde_json::json!({"question_id": id, "text": format!("Reference answer {id}.")}),
        );
        if let Some(m) = m {
            ans.push(serde_json::json!({"question_id": id, "prompt": "p", "text": format!("Model answer {id} {m}"),
                "answer_id": format!("a{id}"), "model_id": "tiny", "metadata": {}}));
        }
        ctx.push(serde_json::json!({"image": format!("img{id}.jpg"), "captions": [format!("Caption of picture {id}.")],
            "instances": [{"category": "dog", "bbox": [0.1, 0.2, 0.5, 0.6]}]}));
    }
    // One more question whose image has no context.
    let extra = markers.len() as i64 + 1;
    q.push(serde_json::json!({"question_id": extra, "image": "nocontext.jpg", "text": "Q?", "category": "conv"}));
    refs.push(serde_json::json!({"question_id": extra, "text": "R"}));
    ans.push(serde_json::json!({"question_id": extra, "text": "A mkgood"}));
    write_lines(&dir.join("questions.jsonl"), &q);
    write_lines(&dir.join("ref.jsonl"), &refs);
    write_lines(&dir.join("answers.jsonl"), &ans);
    write_lines(&dir.join("context.jsonl"), &ctx);
    let mut client = ClientConfig::new(base, "judge-model");
    client.concurrency = 4;
    client.max_retries = 3;
    client.backoff_base = Duration::from_millis(10);
    client.backoff_max = Duration::from_millis(50);
    client.timeout = Duration::from_secs(10);
    JudgeConfig {
        questions: dir.join("questions.jsonl"),
        context: dir.join("context.jsonl"),
        reference: dir.join("ref.jsonl"),
        answers: dir.join("answers.jsonl"),
        out: dir.join("reviews.jsonl"),
        client,
        temperature: 0.2,
        max_tokens: 256,
        parse_retries: 2,
        limit: None,
        rejudge_failed: false,
    }
}

fn tuples(path: &Path) -> HashMap<QuestionId, [f64; 2]> {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.ends_with('\n'), "torn last line in {text}");
    for l in text.lines() {
        serde_json::from_str::<serde_json::Value>(l).unwrap();
    }
    read_reviews(path)
        .unwrap()
        .records
        .into_iter()
        .map(|r| (r.question_id, r.tuple))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn judges_every_reply_shape_resumes_and_summarises() {
    let (base, server) = start(Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let markers = [
        Some("mkgood"),
        Some("mkprose"),
        Some("mkreversed"),
        Some("mkgarbage"),
        Some("mkflaky"),
        Some("mk429"),
        None,
    ];
    let cfg = bench(dir.path(), &markers, &base);
    let report = run(&cfg).await.unwrap();
    assert_eq!(report.questions, 8);
    assert_eq!(report.scored, 5);
    assert_eq!(report.unparsable, 1);
    assert_eq!(report.missing_answer, 1);
    assert_eq!(report.missing_context, 1);
    assert_eq!(report.already_done, 0);
    // garbage: 2 repeats; flaky: 1 repeat.
    assert_eq!(report.parse_retries, 3);
    assert_eq!(server.hits_for("mkgarbage"), 3);
    assert_eq!(server.hits_for("mkflaky"), 2);
    assert_eq!(server.hits_for("mk429"), 2);
    assert_eq!(server.hits_for("mkgood"), 1);
    // The judge saw the context formatted by the instruction-data code.
    let hits = server.hits.lock().unwrap().clone();
    let good = hits.iter().find(|h| h.contains("mkgood")).unwrap();
    assert!(
        good.contains("Caption of picture 1.\ndog: [0.1, 0.2, 0.5, 0.6]"),
        "{good}"
    );
    assert!(good.contains("Reference answer 1.") && good.contains("What is in picture 1?"));

    let t = tuples(&cfg.out);
    assert_eq!(t.len(), 6);
    assert_eq!(t[&QuestionId::Int(1)], [8.0, 7.0]);
    assert_eq!(t[&QuestionId::Int(2)], [9.0, 6.5]);
    assert_eq!(t[&QuestionId::Int(3)], [8.0, 4.0]);
    assert_eq!(t[&QuestionId::Int(4)], [-1.0, -1.0]);
    assert_eq!(t[&QuestionId::Int(5)], [6.0, 5.0]);
    assert_eq!(t[&QuestionId::Int(6)], [7.0, 7.0]);

    // Summary by hand. conv: q1 [8,7], q4 failed → 7/8 = 87.5.
    // detail: q2 [9,6.5], q5 [6,5] → 11.5/15 = 76.67. complex: q3 [8,4], q6 [7,7] → 11/15.
    // overall: reference 38, model 29.5 over 5 → 77.63.
    let s = summarize(&read_reviews(&cfg.out).unwrap().records);
    assert_eq!(s.categories["conv"].relative, Some(87.5));
    assert_eq!(s.categories["conv"].failed, 1);
    assert!((s.categories["detail"].relative.unwrap() - 1150.0 / 15.0).abs() < 1e-9);
    assert!((s.categories["complex"].relative.unwrap() - 1100.0 / 15.0).abs() < 1e-9);
    assert!((s.overall.relative.unwrap() - 2950.0 / 38.0).abs() < 1e-9);
    assert!((s.overall.reference_mean.unwrap() - 7.6).abs() < 1e-12);
    assert!((s.overall.model_mean.unwrap() - 5.9).abs() < 1e-12);

    // A rerun asks nothing again.
    let before = server.total_hits();
    let again = run(&cfg).await.unwrap();
    assert_eq!(server.total_hits(), before);
    assert_eq!(again.already_done, 6);
    assert_eq!(again.scored + again.unparsable, 0);
    assert_eq!(tuples(&cfg.out).len(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_after_a_torn_line() {
    let (base, server) = start(Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = bench(dir.path(), &[Some("mkgood"), Some("mkreversed")], &base);
    std::fs::write(
        &cfg.out,
        "{\"question_id\":1,\"category\":\"conv\",\"content\":\"earlier\",\"tuple\":[3.0,2.0]}\n{\"question_id\":2,\"categ",
    )
    .unwrap();
    let report = run(&cfg).await.unwrap();
    assert_eq!(report.already_done, 1);
    assert_eq!(report.scored, 1);
    assert_eq!(server.hits_for("mkgood"), 0);
    assert_eq!(server.hits_for("mkreversed"), 1);
    let t = tuples(&cfg.out);
    assert_eq!(t[&QuestionId::Int(1)], [3.0, 2.0]);
    assert_eq!(t[&QuestionId::Int(2)], [8.0, 4.0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_failures_skip_or_stop() {
    let (base, server) = start(Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    // 503 forever: counted, not written, retried by a rerun.
    let cfg = bench(dir.path(), &[Some("mkgood"), Some("mk503")], &base);
    let report = run(&cfg).await.unwrap();
    assert_eq!(report.scored, 1);
    assert_eq!(report.request_failures, 1);
    assert_eq!(server.hits_for("mk503"), 4); // 1 + 3 client retries
    assert_eq!(tuples(&cfg.out).len(), 1);
    let again = run(&cfg).await.unwrap();
    assert_eq!(again.request_failures, 1);
    assert_eq!(server.hits_for("mk503"), 8);

    // 401: the run stops with a clear error, and what was judged is kept.
    let dir = tempfile::tempdir().unwrap();
    let cfg = bench(dir.path(), &[Some("mk401")], &base);
    let err = run(&cfg).await.unwrap_err();
    assert!(matches!(err, EvalError::Judge(_)), "{err}");
    assert!(err.to_string().contains("401"), "{err}");
    assert_eq!(server.hits_for("mk401"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_run_concurrently_within_the_limit() {
    let (base, server) = start(Duration::from_millis(150)).await;
    let dir = tempfile::tempdir().unwrap();
    let markers = vec![Some("mkgood"); 10];
    let cfg = bench(dir.path(), &markers, &base);
    let t0 = std::time::Instant::now();
    let report = run(&cfg).await.unwrap();
    assert_eq!(report.scored, 10);
    let max = server.max_in_flight.load(Ordering::SeqCst);
    assert!((2..=4).contains(&max), "max in flight {max}");
    // 10 requests of 150 ms, 4 at a time: well under the 1.5 s a serial run takes.
    assert!(
        t0.elapsed() < Duration::from_millis(1300),
        "{:?}",
        t0.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_are_clear_errors() {
    let (base, _server) = start(Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = bench(dir.path(), &[Some("mkgood")], &base);
    cfg.answers = dir.path().join("missing.jsonl");
    let e = run(&cfg).await.unwrap_err().to_string();
    assert!(e.contains("missing.jsonl"), "{e}");
    std::fs::write(dir.path().join("empty.jsonl"), "").unwrap();
    cfg.answers = dir.path().join("empty.jsonl");
    let e = run(&cfg).await.unwrap_err().to_string();
    assert!(e.contains("no records"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejudge_failed_asks_failures_again_and_appends() {
    let (base, server) = start(Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let markers = [
        Some("mkgood"),
        Some("mkflaky"),
        Some("mkgarbage"),
        Some("mkslow"),
    ];
    let mut cfg = bench(dir.path(), &markers, &base);
    // No second chance within a run: the flaky and slow replies are recorded as failures.
    cfg.parse_retries = 0;
    let report = run(&cfg).await.unwrap();
    assert_eq!((report.scored, report.unparsable), (1, 3));
    let t = tuples(&cfg.out);
    assert_eq!(t[&QuestionId::Int(2)], [-1.0, -1.0]);
    assert_eq!(t[&QuestionId::Int(4)], [-1.0, -1.0]);
    let lines = |p: &Path| std::fs::read_to_string(p).unwrap().lines().count();
    assert_eq!(lines(&cfg.out), 4);
    // Reviews are written as they finish; remember that order.
    let ids = |p: &Path| -> Vec<QuestionId> {
        read_reviews(p)
            .unwrap()
            .records
            .into_iter()
            .map(|r| r.question_id)
            .collect()
    };
    let first_order = ids(&cfg.out);

    // Without the flag, failures count as done: nothing is asked, nothing written.
    let before = server.total_hits();
    let again = run(&cfg).await.unwrap();
    assert_eq!(server.total_hits(), before);
    assert_eq!(
        (again.already_done, again.failed_kept, again.rejudged),
        (4, 3, 0)
    );
    assert!(
        again.describe().contains("--rejudge-failed"),
        "{}",
        again.describe()
    );
    assert_eq!(lines(&cfg.out), 4);

    // With it, exactly the three failures are asked again; the good one is not.
    cfg.rejudge_failed = true;
    let re = run(&cfg).await.unwrap();
    assert_eq!(re.rejudged, 3);
    assert_eq!(re.already_done, 1);
    assert_eq!((re.scored, re.unparsable), (1, 2));
    assert_eq!(server.hits_for("mkgood"), 1);
    assert_eq!(server.hits_for("mkflaky"), 2);
    assert_eq!(server.hits_for("mkgarbage"), 2);
    assert_eq!(server.hits_for("mkslow"), 2);
    // Appended, never rewritten: the old failed lines are still there, the reader takes the
    // newer review.
    assert_eq!(lines(&cfg.out), 7);
    let t = tuples(&cfg.out);
    assert_eq!(t.len(), 4);
    assert_eq!(t[&QuestionId::Int(1)], [8.0, 7.0]);
    assert_eq!(t[&QuestionId::Int(2)], [6.0, 5.0]);
    assert_eq!(t[&QuestionId::Int(3)], [-1.0, -1.0]);
    assert_eq!(t[&QuestionId::Int(4)], [-1.0, -1.0]);
    let file = read_reviews(&cfg.out).unwrap();
    assert_eq!(file.duplicates, 0);
    let s = summarize(&file.records);
    assert_eq!((s.overall.parsed, s.overall.failed), (2, 2));

    // Once more: slow now answers, garbage fails a third time, the rest is left alone.
    let third = run(&cfg).await.unwrap();
    assert_eq!((third.rejudged, third.scored, third.unparsable), (2, 1, 1));
    assert_eq!(server.hits_for("mkflaky"), 2);
    assert_eq!(server.hits_for("mkslow"), 3);
    let t = tuples(&cfg.out);
    assert_eq!(t[&QuestionId::Int(4)], [9.0, 3.0]);
    assert_eq!(t[&QuestionId::Int(3)], [-1.0, -1.0]);
    assert_eq!(lines(&cfg.out), 9);
    // A new review takes the place of the failure it replaces.
    assert_eq!(ids(&cfg.out), first_order);
    let file = read_reviews(&cfg.out).unwrap();
    let q4 = file
        .records
        .iter()
        .find(|r| r.question_id == QuestionId::Int(4));
    assert_eq!(q4.unwrap().category, "conv");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejudge_failed_with_limit_and_endpoint_failure_keeps_the_failure() {
    let (base, server) = start(Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = bench(dir.path(), &[Some("mk503"), Some("mkgarbage")], &base);
    // A failure recorded by an earlier run for question 1, whose endpoint now keeps failing.
    std::fs::write(
        &cfg.out,
        "{\"question_id\":1,\"category\":\"conv\",\"content\":\"?\",\"tuple\":[-1.0,-1.0]}\n",
    )
    .unwrap();
    cfg.rejudge_failed = true;
    cfg.limit = Some(1);
    let report = run(&cfg).await.unwrap();
    // The limit counts rejudged questions like new ones.
    assert_eq!(report.rejudged, 1);
    assert_eq!(report.request_failures, 1);
    assert_eq!(server.hits_for("mkgarbage"), 0);
    // Nothing was written for question 1: its failed review stands.
    let t = tuples(&cfg.out);
    assert_eq!(t.len(), 1);
    assert_eq!(t[&QuestionId::Int(1)], [-1.0, -1.0]);
}
