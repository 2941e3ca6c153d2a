//! A scripted OpenAI Batch API on 127.0.0.1 (port 0): `POST /v1/files` (multipart, purpose
//! `batch`), `GET /v1/files/{id}/content`, `POST /v1/batches`, `GET /v1/batches/{id}` and
//! `GET /v1/batches`.
//!
//! A batch stays `in_progress` while `hold` is set, and otherwise completes at its
//! `polls_to_finish`-th poll. Each request line is answered by markers in its query context,
//! counting how often that `custom_id` was processed before:
//! - `mkbfail`: the first time, an error-file line with status 500;
//! - `mkbexpire`: the first time, a `batch_expired` error line, and the batch ends `expired`;
//! - `mkbmalformed`: the first time, a torn output line;
//! - `mkbmissing`: the first time, no line at all;
//! - `mkbalways`: always a 500 error line;
//! - `mkbinvalid`: the whole batch fails validation (status `failed`, no files);
//! - `mkbrefuse`: a refusal ("I'm sorry, but as an AI I cannot see images.");
//! - anything else: [`super::good_reply`], usage 10 + 5 tokens.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::Router;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

#[derive(Debug, Clone)]
pub struct ServerBatch {
    pub id: String,
    pub input_file_id: String,
    pub status: String,
    pub polls: usize,
    pub custom_ids: Vec<String>,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub completed: usize,
    pub failed: usize,
}

impl ServerBatch {
    fn json(&self) -> Value {
        json!({
            "id": self.id, "object": "batch", "endpoint": "/v1/chat/completions",
            "input_file_id": self.input_file_id, "completion_window": "24h",
            "status": self.status, "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "request_counts": {"total": self.custom_ids.len(), "completed": self.completed, "failed": self.failed},
        })
    }
}

#[derive(Default)]
pub struct BatchServerState {
    pub hold: AtomicBool,
    pub polls_to_finish: usize,
    pub files: Mutex<HashMap<String, Vec<u8>>>,
    pub batches: Mutex<Vec<ServerBatch>>,
    pub seen: Mutex<HashMap<String, usize>>,
    pub uploads: AtomicUsize,
    pub polls: AtomicUsize,
    next: AtomicUsize,
}

impl BatchServerState {
    pub fn batches(&self) -> Vec<ServerBatch> {
        self.batches.lock().unwrap().clone()
    }
    fn new_id(&self, prefix: &str) -> String {
        format!("{prefix}-{}", self.next.fetch_add(1, Ordering::SeqCst))
    }
}

pub struct BatchServer {
    pub addr: SocketAddr,
    pub state: Arc<BatchServerState>,
}

impl BatchServer {
    pub fn base(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

fn bad(msg: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": {"message": msg}})),
    )
        .into_response()
}

fn completion(content: &str) -> Value {
    json!({
        "id": "chatcmpl-b", "object": "chat.completion", "model": "teacher",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    })
}

/// What processing an input file gives: output lines, error lines, whether any line expired,
/// and the counts of completed and failed requests.
pub struct Processed {
    pub output: String,
    pub errors: String,
    pub expired: bool,
    pub completed: usize,
    pub failed: usize,
}

/// Answers every request line of an input file, as the markers say.
pub fn process_input(input: &[u8], seen: &mut HashMap<String, usize>) -> Processed {
    let mut p = Processed {
        output: String::new(),
        errors: String::new(),
        expired: false,
        completed: 0,
        failed: 0,
    };
    for line in input.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let v: Value = serde_json::from_slice(line).unwrap();
        let cid = v["custom_id"].as_str().unwrap().to_string();
        let messages = v["body"]["messages"].as_array().unwrap();
        let system = messages[0]["content"].as_str().unwrap();
        let key = messages.last().unwrap()["content"].as_str().unwrap();
        let n = {
            let c = seen.entry(cid.clone()).or_insert(0);
            *c += 1;
            *c
        };
        let error_line = |status: u16| {
            json!({"id": "batch_req_e", "custom_id": cid,
                "response": {"status_code": status, "request_id": "r", "body": {"error": {"message": "server error", "type": "server_error"}}},
                "error": null})
        };
        if key.contains("mkbalways") || (key.contains("mkbfail") && n == 1) {
            p.errors.push_str(&format!("{}\n", error_line(500)));
            p.failed += 1;
        } else if key.contains("mkbexpire") && n == 1 {
            let l = json!({"id": "batch_req_x", "custom_id": cid, "response": null,
                "error": {"code": "batch_expired", "message": "This request could not be executed before the completion window expired."}});
            p.errors.push_str(&format!("{l}\n"));
            p.expired = true;
        } else if key.contains("mkbmissing") && n == 1 {
        } else if key.contains("mkbmalformed") && n == 1 {
            p.output.push_str(&format!(
                "{{\"id\": \"batch_req_m\", \"custom_id\": \"{cid}\", \"resp\n"
            ));
            p.completed += 1;
        } else {
            let content = if key.contains("mkbrefuse") {
                if system.contains("Write a conversation") || system.contains("Write one question")
                {
                    "Question: What is shown?\nAnswer: I'm sorry, but as an AI I cannot see images."
                        .to_string()
                } else {
                    "I'm sorry, but as an AI I cannot see images.".to_string()
                }
            } else {
                super::good_reply(system, key)
            };
            let l = json!({"id": "batch_req_o", "custom_id": cid,
                "response": {"status_code": 200, "request_id": "r", "body": completion(&content)},
                "error": null});
            p.output.push_str(&format!("{l}\n"));
            p.completed += 1;
        }
    }
    p
}

async fn upload(State(s): State<Arc<BatchServerState>>, mut mp: Multipart) -> Response {
    let mut purpose = None;
    let mut file = None;
    while let Ok(Some(field)) = mp.next_field().await {
        match field.name() {
            Some("purpose") => purpose = field.text().await.ok(),
            Some("file") => file = field.bytes().await.ok().map(|b| b.to_vec()),
            _ => {}
        }
    }
    if purpose.as_deref() != Some("batch") {
        return bad("purpose must be batch");
    }
    let Some(bytes) = file else {
        return bad("no file");
    };
    let id = s.new_id("file");
    let len = bytes.len();
    s.files.lock().unwrap().insert(id.clone(), bytes);
    s.uploads.fetch_add(1, Ordering::SeqCst);
    Json(json!({"id": id, "object": "file", "bytes": len, "purpose": "batch"})).into_response()
}

async fn content(State(s): State<Arc<BatchServerState>>, Path(id): Path<String>) -> Response {
    match s.files.lock().unwrap().get(&id) {
        Some(b) => b.clone().into_response(),
        None => (StatusCode::NOT_FOUND, "no such file").into_response(),
    }
}

async fn create(State(s): State<Arc<BatchServerState>>, Json(v): Json<Value>) -> Response {
    if v["endpoint"] != "/v1/chat/completions" || v["completion_window"] != "24h" {
        return bad("bad endpoint or window");
    }
    let Some(file_id) = v["input_file_id"].as_str() else {
        return bad("no input_file_id");
    };
    let Some(bytes) = s.files.lock().unwrap().get(file_id).cloned() else {
        return bad("no such file");
    };
    let mut custom_ids = Vec::new();
    for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let Ok(l) = serde_json::from_slice::<Value>(line) else {
            return bad("input line is not JSON");
        };
        if l["method"] != "POST" || l["url"] != "/v1/chat/completions" {
            return bad("bad method or url");
        }
        let cid = l["custom_id"].as_str().unwrap_or("").to_string();
        if cid.is_empty() || custom_ids.contains(&cid) {
            return bad("custom_id missing or repeated");
        }
        custom_ids.push(cid);
    }
    let b = ServerBatch {
        id: s.new_id("batch"),
        input_file_id: file_id.to_string(),
        status: "validating".into(),
        polls: 0,
        custom_ids,
        output_file_id: None,
        error_file_id: None,
        completed: 0,
        failed: 0,
    };
    let out = b.json();
    s.batches.lock().unwrap().push(b);
    Json(out).into_response()
}

async fn retrieve(State(s): State<Arc<BatchServerState>>, Path(id): Path<String>) -> Response {
    s.polls.fetch_add(1, Ordering::SeqCst);
    let mut batches = s.batches.lock().unwrap();
    let Some(b) = batches.iter_mut().find(|b| b.id == id) else {
        return (StatusCode::NOT_FOUND, "no such batch").into_response();
    };
    if b.status == "validating" {
        b.status = "in_progress".into();
    }
    if !s.hold.load(Ordering::SeqCst) && b.status == "in_progress" {
        b.polls += 1;
        let input = s.files.lock().unwrap()[&b.input_file_id].clone();
        if String::from_utf8_lossy(&input).contains("mkbinvalid") {
            // validation failed: no output, no error file, the batch's `errors` say why
            b.status = "failed".into();
            return Json(json!({
                "id": b.id, "object": "batch", "input_file_id": b.input_file_id,
                "status": "failed", "output_file_id": null, "error_file_id": null,
                "errors": {"object": "list", "data": [{"code": "invalid_request", "message": "mkbinvalid"}]},
            }))
            .into_response();
        }
        if b.polls >= s.polls_to_finish {
            let p = process_input(&input, &mut s.seen.lock().unwrap());
            let mut files = s.files.lock().unwrap();
            if !p.output.is_empty() {
                let fid = s.new_id("file");
                files.insert(fid.clone(), p.output.into_bytes());
                b.output_file_id = Some(fid);
            }
            if !p.errors.is_empty() {
                let fid = s.new_id("file");
                files.insert(fid.clone(), p.errors.into_bytes());
                b.error_file_id = Some(fid);
            }
            b.completed = p.completed;
            b.failed = p.failed;
            b.status = if p.expired { "expired" } else { "completed" }.into();
        }
    }
    Json(b.json()).into_response()
}

async fn list(
    State(s): State<Arc<BatchServerState>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let limit: usize = q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(20);
    let batches = s.batches.lock().unwrap();
    // newest first, after the `after` id
    let mut all: Vec<&ServerBatch> = batches.iter().rev().collect();
    if let Some(a) = q.get("after")
        && let Some(pos) = all.iter().position(|b| &b.id == a)
    {
        all.drain(..=pos);
    }
    let page: Vec<Value> = all.iter().take(limit).map(|b| b.json()).collect();
    let has_more = all.len() > limit;
    let last = page.last().map(|b| b["id"].clone());
    Json(json!({"object": "list", "data": page, "has_more": has_more, "last_id": last}))
        .into_response()
}

/// Starts the server on the current tokio runtime.
pub async fn start(polls_to_finish: usize) -> BatchServer {
    let state = Arc::new(BatchServerState {
        polls_to_finish,
        ..Default::default()
    });
    let app = Router::new()
        .route("/v1/files", post(upload))
        .route("/v1/files/{id}/content", get(content))
        .route("/v1/batches", post(create).get(list))
        .route("/v1/batches/{id}", get(retrieve))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    BatchServer { addr, state }
}
