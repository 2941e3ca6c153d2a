//! A scripted OpenAI-compatible test server on 127.0.0.1 (port 0), and helpers.
//!
//! The behaviour of a request is chosen by markers in its last user message (the query
//! context, which holds the image's captions):
//! - `mk429`: the first attempt gets 429 with `Retry-After: 1`;
//! - `mk500`: the first two attempts get 500;
//! - `mk503always`: every attempt gets 503;
//! - `mkdrop`: the first attempt's connection is dropped mid-response;
//! - `mkslow`: the first attempt answers after 3 s (past the client's timeout);
//! - `mkbad`: a reply with no question/answer turns;
//! - `mkleak`: a reply that mentions the captions;
//! - `mk401`: every attempt gets 401;
//! - anything else: a well-formed reply for the type (taken from the system message).
//!
//! Attempts are counted per (system message, query context).
//! Every answer takes at least `delay` and reports usage 10 prompt + 5 completion tokens.

#![allow(dead_code)]

pub mod batch;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;

#[derive(Debug, Clone)]
pub struct Hit {
    pub key: String,
    pub attempt: usize,
    pub at: Instant,
    pub auth: Option<String>,
    pub body: serde_json::Value,
}

#[derive(Default)]
pub struct ServerState {
    pub delay: Duration,
    pub in_flight: AtomicUsize,
    pub max_in_flight: AtomicUsize,
    pub attempts: Mutex<HashMap<String, usize>>,
    pub hits: Mutex<Vec<Hit>>,
}

impl ServerState {
    pub fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }
    pub fn hits_for(&self, marker: &str) -> Vec<Hit> {
        self.hits()
            .into_iter()
            .filter(|h| h.key.contains(marker))
            .collect()
    }
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub state: Arc<ServerState>,
}

impl TestServer {
    pub fn base(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

struct Gauge<'a>(&'a ServerState);
impl<'a> Gauge<'a> {
    fn enter(s: &'a ServerState) -> Self {
        let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        s.max_in_flight.fetch_max(now, Ordering::SeqCst);
        Gauge(s)
    }
}
impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

fn completion(content: &str, finish: &str) -> Response {
    let v = serde_json::json!({
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "model": "test",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

pub fn good_reply(system: &str, key: &str) -> String {
    // Tie the reply to the context so that records differ per image; long enough for the
    // default length filters (real replies are sentences and paragraphs).
    let first = key.lines().next().unwrap_or("").trim();
    if system.contains("Write a conversation") {
        format!(
            "Question: What is shown?\nAnswer: {first} The scene is clear and well lit.\n===\nQuestion: Is it outdoors?\nAnswer: It seems so, judging by the daylight and the open space."
        )
    } else if system.contains("Write one question") {
        format!(
            "Question: Why is this happening?\nAnswer: Because {first} It is an everyday situation, and the people and objects in it are arranged the way one would expect."
        )
    } else {
        format!(
            "The picture shows this: {first} The scene is well lit and clearly composed, with the main subject in the middle of the frame and a calm, ordinary background behind it."
        )
    }
}

async fn handle(State(s): State<Arc<ServerState>>, headers: HeaderMap, body: Bytes) -> Response {
    let _g = Gauge::enter(&s);
    let v: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(_) => return (StatusCode::BAD_REQUEST, "bad json").into_response(),
    };
    let messages = v["messages"].as_array().cloned().unwrap_or_default();
    let system = messages
        .first()
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .to_string();
    let key = messages
        .last()
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .to_string();
    let attempt = {
        let mut a = s.attempts.lock().unwrap();
        let n = a.entry(format!("{system}\u{0}{key}")).or_insert(0);
        *n += 1;
        *n
    };
    s.hits.lock().unwrap().push(Hit {
        key: key.clone(),
        attempt,
        at: Instant::now(),
        auth: headers
            .get(header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .map(String::from),
        body: v.clone(),
    });
    if !s.delay.is_zero() {
        tokio::time::sleep(s.delay).await;
    }
    if key.contains("mk401") {
        return (
            StatusCode::UNAUTHORIZED,
            "{\"error\":{\"message\":\"bad key\"}}",
        )
            .into_response();
    }
    if key.contains("mk503always") {
        return (StatusCode::SERVICE_UNAVAILABLE, "overloaded").into_response();
    }
    if key.contains("mk429") && attempt == 1 {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, "1")],
            "slow down",
        )
            .into_response();
    }
    if key.contains("mk500") && attempt <= 2 {
        return (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response();
    }
    if key.contains("mkdrop") && attempt == 1 {
        let stream = futures_util::stream::iter(vec![
            Ok::<Bytes, std::io::Error>(Bytes::from_static(b"{\"choices\": [")),
            Err(std::io::Error::other(
                "connection dropped by the test server",
            )),
        ]);
        return Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from_stream(stream))
            .unwrap();
    }
    if key.contains("mkslow") && attempt == 1 {
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    if key.contains("mkbad") {
        return completion("I am not sure what to say about this picture.", "stop");
    }
    if key.contains("mkleak") {
        return completion(
            "Question: What is it?\nAnswer: The captions say it is a dog.",
            "stop",
        );
    }
    completion(&good_reply(&system, &key), "stop")
}

/// Starts the server on the current tokio runtime.
pub async fn start(delay: Duration) -> TestServer {
    let state = Arc::new(ServerState {
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
    TestServer { addr, state }
}

/// Writes a generic JSONL annotation file with one image per caption string.
pub fn write_annotations(path: &std::path::Path, captions: &[String]) {
    let mut s = String::new();
    for (i, c) in captions.iter().enumerate() {
        let line = serde_json::json!({
            "id": format!("img{i:04}"),
            "image": format!("images/img{i:04}.jpg"),
            "width": 640, "height": 480,
            "captions": [c, format!("Second view of image {i}.")],
            "boxes": [{"category": "dog", "bbox": [10.0, 20.0, 100.0, 200.0]}]
        });
        s.push_str(&line.to_string());
        s.push('\n');
    }
    std::fs::write(path, s).unwrap();
}

/// Reads a JSONL file strictly: every byte must belong to a whole, valid line.
pub fn read_jsonl_strict(path: &std::path::Path) -> Vec<serde_json::Value> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(_) => return Vec::new(),
    };
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "{} ends with a torn line",
        path.display()
    );
    text.lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}: bad line {l}: {e}", path.display()))
        })
        .collect()
}

/// The (API base, annotations, output folder) a parent passed to its child in `env`.
pub fn child_spec(env: &str) -> (String, std::path::PathBuf, std::path::PathBuf) {
    let spec = std::env::var(env).expect("run only as a child of the kill test");
    let parts: Vec<&str> = spec.split('\n').collect();
    (parts[0].to_string(), parts[1].into(), parts[2].into())
}

/// Starts this test binary again, running only the ignored helper test `name`, with `spec` in
/// the environment variable `env` (the child side of the SIGKILL tests). Output is discarded.
pub fn spawn_child(name: &str, env: &str, spec: String) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            name,
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(env, spec)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// The three types that need the teacher.
pub const TEACHER_TYPES: [llava_instruct::InstructType; 3] = [
    llava_instruct::InstructType::Conversation,
    llava_instruct::InstructType::Detail,
    llava_instruct::InstructType::Complex,
];

/// (type, id) → number of lines, for records, final rejects and request failures.
pub type Counts = std::collections::BTreeMap<(String, String), usize>;

/// What an output folder holds per (type, id): records, final rejects, request failures.
pub fn outcome_counts(out: &std::path::Path) -> (Counts, Counts, Counts) {
    use llava_instruct::InstructType;
    let mut records = Counts::new();
    for ty in InstructType::ALL {
        for r in read_jsonl_strict(&out.join(ty.file_name())) {
            let id = r["id"].as_str().unwrap().to_string();
            *records.entry((ty.name().to_string(), id)).or_default() += 1;
        }
    }
    let mut final_rejects = Counts::new();
    let mut request_failures = Counts::new();
    for r in read_jsonl_strict(&out.join(llava_instruct::output::REJECTS_FILE)) {
        let key = (
            r["type"].as_str().unwrap().to_string(),
            r["id"].as_str().unwrap().to_string(),
        );
        if r["stage"] == "request" {
            *request_failures.entry(key).or_default() += 1;
        } else {
            *final_rejects.entry(key).or_default() += 1;
        }
    }
    (records, final_rejects, request_failures)
}

/// Writes an annotation file of one image per marker (`A scene marked MARKER.`) followed by
/// `plain` unmarked images, and loads it.
pub fn marked_scenes(
    path: &std::path::Path,
    markers: &[&str],
    plain: usize,
) -> Vec<llava_instruct::ImageEntry> {
    let mut captions: Vec<String> = markers
        .iter()
        .map(|m| format!("A scene marked {m}."))
        .collect();
    captions.extend((0..plain).map(|i| format!("A plain scene number {i}.")));
    write_annotations(path, &captions);
    llava_instruct::source::load_generic_jsonl(path).unwrap()
}
