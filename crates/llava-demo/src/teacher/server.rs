//! The teacher as an OpenAI-compatible HTTP server.
//!
//! Routes: `POST /v1/chat/completions` (the chat-completion response shape, with
//! `finish_reason: "stop"` and word counts standing in for token usage) and `GET /v1/models`.
//! A body that is not JSON, or has no usable `messages`, gets a 400 with an OpenAI-style
//! `{"error": {...}}` body; unknown paths get a 404 in the same shape.
//!
//! The server runs on a thread of its own with its own runtime, so a synchronous caller
//! (`llava demo`, which then runs `llava instruct`'s blocking pipeline) can start it,
//! point a client at [`TeacherServer::api_base`], and stop it, without sharing a runtime.
//!
//! `fail_every: Some(n)` refuses every n-th request with 429 and `Retry-After` (plus
//! `retry-after-ms`, so the retry is quick), to show the client's retry path.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::error::{DemoError, Result};

/// The model name reported when the request names none.
pub const DEFAULT_MODEL: &str = "llava-teacher";

/// Where and how to serve.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub host: String,
    /// 0 picks a free port.
    pub port: u16,
    /// Refuse every n-th request with 429 (n ≥ 1).
    pub fail_every: Option<u64>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: "127.0.0.1".into(),
            port: 0,
            fail_every: None,
        }
    }
}

/// Request counters, readable while the server runs.
#[derive(Debug, Default)]
pub struct Stats {
    /// Every request to the chat route, refused ones included.
    pub requests: AtomicU64,
    /// Answered with a reply.
    pub answered: AtomicU64,
    /// Refused with 429 by `fail_every`.
    pub refused: AtomicU64,
    /// Refused with 400.
    pub bad: AtomicU64,
}

struct AppState {
    fail_every: Option<u64>,
    stats: Arc<Stats>,
}

/// A running teacher. Dropping it stops the server too.
#[derive(Debug)]
pub struct TeacherServer {
    addr: SocketAddr,
    stats: Arc<Stats>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::result::Result<(), String>>>,
}

impl TeacherServer {
    /// Binds `host:port` and serves in the background until [`TeacherServer::stop`].
    pub fn start(config: &ServerConfig) -> Result<TeacherServer> {
        if config.fail_every == Some(0) {
            return Err(DemoError::Bad("--fail-every must be at least 1".into()));
        }
        let listener =
            std::net::TcpListener::bind((config.host.as_str(), config.port)).map_err(|e| {
                DemoError::Bad(format!(
                    "cannot listen on {}:{}: {e}",
                    config.host, config.port
                ))
            })?;
        let local = |e: std::io::Error| DemoError::Bad(format!("teacher server socket: {e}"));
        listener.set_nonblocking(true).map_err(local)?;
        let addr = listener.local_addr().map_err(local)?;
        let stats = Arc::new(Stats::default());
        let state = Arc::new(AppState {
            fail_every: config.fail_every,
            stats: stats.clone(),
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("llava-teacher".into())
            .spawn(move || serve(listener, state, stopped))
            .map_err(|e| DemoError::Bad(format!("cannot start the teacher thread: {e}")))?;
        Ok(TeacherServer {
            addr,
            stats,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The API base to give a client, e.g. `http://127.0.0.1:8000/v1` (a wildcard bind is
    /// reached through the loopback address).
    pub fn api_base(&self) -> String {
        let mut addr = self.addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(if addr.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            });
        }
        format!("http://{addr}/v1")
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Stops serving and waits for the server thread.
    pub fn stop(mut self) -> Result<()> {
        self.shutdown()
    }

    /// Serves until Ctrl-C, then stops (for `llava teacher serve`).
    pub fn wait_for_ctrl_c(self) -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| DemoError::Bad(format!("cannot start a runtime: {e}")))?;
        rt.block_on(tokio::signal::ctrl_c())
            .map_err(|e| DemoError::Bad(format!("cannot wait for Ctrl-C: {e}")))?;
        self.stop()
    }

    fn shutdown(&mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.thread.take().map(std::thread::JoinHandle::join) {
            Some(Ok(Err(e))) => Err(DemoError::Bad(format!("teacher server: {e}"))),
            Some(Err(_)) => Err(DemoError::Bad("the teacher server thread panicked".into())),
            _ => Ok(()),
        }
    }
}

impl Drop for TeacherServer {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// The server thread: its own small runtime, serving until `stopped` fires.
fn serve(
    listener: std::net::TcpListener,
    state: Arc<AppState>,
    stopped: oneshot::Receiver<()>,
) -> std::result::Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("llava-teacher-worker")
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
        axum::serve(listener, router(state))
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
            .map_err(|e| e.to_string())
    })
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .fallback(not_found)
        .with_state(state)
}

/// An OpenAI-style error response.
fn error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    let body = json!({
        "error": {"message": message.into(), "type": kind, "param": null, "code": null}
    });
    (status, axum::Json(body)).into_response()
}

async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "unknown path; this server has POST /v1/chat/completions and GET /v1/models",
    )
}

async fn models() -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{"id": DEFAULT_MODEL, "object": "model", "created": 0, "owned_by": "llava-demo"}]
    }))
    .into_response()
}

/// The text of a message's `content`: a string, or the text parts of a list of parts.
fn content_text(content: &Value) -> Option<String> {
    match content {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => Some(
            parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("\n"),
        ),
        Value::Null => Some(String::new()),
        _ => None,
    }
}

/// The system text and the last user message of a request body.
fn read_request(body: &Value) -> std::result::Result<(String, String), String> {
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .ok_or("`messages` must be an array of messages")?;
    let mut system = Vec::new();
    let mut user = None;
    for (i, m) in messages.iter().enumerate() {
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or(format!("messages[{i}] has no `role`"))?;
        let text = content_text(m.get("content").unwrap_or(&Value::Null)).ok_or(format!(
            "messages[{i}].content must be a string or a list of parts"
        ))?;
        match role {
            "system" | "developer" => system.push(text),
            "user" => user = Some(text),
            _ => {}
        }
    }
    let user = user.ok_or("the request has no user message")?;
    Ok((system.join("\n\n"), user))
}

fn words(s: &str) -> u64 {
    s.split_whitespace().count() as u64
}

async fn chat(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let stats = &state.stats;
    let n = stats.requests.fetch_add(1, Ordering::Relaxed) + 1;
    if let Some(k) = state.fail_every
        && n % k == 0
    {
        stats.refused.fetch_add(1, Ordering::Relaxed);
        let mut r = error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!("simulated rate limit: every {k}th request is refused; retry shortly"),
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        r.headers_mut()
            .insert("retry-after-ms", HeaderValue::from_static("50"));
        return r;
    }
    let parsed: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            stats.bad.fetch_add(1, Ordering::Relaxed);
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("the body is not valid JSON: {e}"),
            );
        }
    };
    let (system, user) = match read_request(&parsed) {
        Ok(x) => x,
        Err(m) => {
            stats.bad.fetch_add(1, Ordering::Relaxed);
            return error(StatusCode::BAD_REQUEST, "invalid_request_error", m);
        }
    };
    let model = parsed
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or(DEFAULT_MODEL)
        .to_string();
    let reply = super::respond(&system, &user);
    stats.answered.fetch_add(1, Ordering::Relaxed);
    let prompt_tokens: u64 = parsed
        .get("messages")
        .and_then(Value::as_array)
        .map(|ms| {
            ms.iter()
                .filter_map(|m| m.get("content").and_then(content_text))
                .map(|t| words(&t))
                .sum()
        })
        .unwrap_or(0);
    let completion_tokens = words(&reply);
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    axum::Json(json!({
        "id": format!("chatcmpl-teacher-{n}"),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": reply},
            "finish_reason": "stop"
        }],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens
        }
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_reading() {
        let body = json!({"messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "old"},
            {"role": "assistant", "content": "A"},
            {"role": "user", "content": [{"type": "text", "text": "new"}, {"type": "image_url"}]}
        ]});
        assert_eq!(read_request(&body), Ok(("S".into(), "new".into())));
        assert!(read_request(&json!({})).is_err());
        assert!(read_request(&json!({"messages": [{"content": "x"}]})).is_err());
        assert!(read_request(&json!({"messages": [{"role": "user", "content": 3}]})).is_err());
        assert!(read_request(&json!({"messages": [{"role": "system", "content": "x"}]})).is_err());
    }

    #[test]
    fn zero_fail_every_is_refused() {
        let cfg = ServerConfig {
            fail_every: Some(0),
            ..ServerConfig::default()
        };
        assert!(TeacherServer::start(&cfg).is_err());
    }
}
