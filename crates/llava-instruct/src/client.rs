//! A client for any OpenAI-compatible `/v1/chat/completions` endpoint (OpenAI, vLLM,
//! llama.cpp server, our own server).
//!
//! One client serves the whole project: the instruction-data teacher here and the LLM judge
//! of the evaluation crate. It enforces, per [`ChatClient`]:
//!
//! - a **concurrency limit**: at most `concurrency` HTTP requests in flight (a request that is
//!   waiting out a backoff does not hold a slot);
//! - a **requests-per-minute limit**: request starts are spaced at least `60 / rpm` seconds apart;
//! - a **per-request timeout** covering connect, send and the whole body;
//! - **retries** on 408/409/429, 5xx, timeouts, connection errors and bodies cut short, with
//!   exponential backoff and full jitter. A `Retry-After` (seconds or HTTP date) or
//!   `retry-after-ms` header sets a floor on the wait. Other 4xx answers fail at once.
//!
//! Replies return the first choice's content, its finish reason, the token usage and how many
//! attempts it took.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, Semaphore};

/// Errors of one chat request.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid client configuration: {0}")]
    Config(String),
    #[error("HTTP {status}: {body}")]
    Status {
        status: u16,
        body: String,
        retry_after: Option<Duration>,
    },
    #[error("request timed out after {0:?}")]
    Timeout(Duration),
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("reading the reply failed: {0}")]
    Body(String),
    #[error("the reply is not a chat completion: {0}")]
    Decode(String),
    #[error("the reply has no choices or no message content")]
    NoContent,
    #[error("gave up after {attempts} attempts; last error: {last}")]
    Exhausted {
        attempts: u32,
        last: Box<ClientError>,
    },
}

impl ClientError {
    /// Whether a new attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Status { status, .. } => {
                matches!(status, 408 | 409 | 429) || *status >= 500
            }
            ClientError::Timeout(_) | ClientError::Connect(_) | ClientError::Body(_) => true,
            ClientError::Config(_)
            | ClientError::Decode(_)
            | ClientError::NoContent
            | ClientError::Exhausted { .. } => false,
        }
    }
}

/// The role of a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

impl ChatMessage {
    pub fn system(content: impl Into<String>) -> Self {
        Self {
            role: Role::System,
            content: content.into(),
        }
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: Role::User,
            content: content.into(),
        }
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self {
            role: Role::Assistant,
            content: content.into(),
        }
    }
}

/// What to ask. The model name comes from the client's configuration.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    pub temperature: Option<f32>,
    pub max_tokens: Option<u32>,
}

/// Token counts reported by the server (zero when it reports none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }
}

/// A successful reply.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatResponse {
    pub content: String,
    pub finish_reason: Option<String>,
    pub usage: Usage,
    /// 1 when the first attempt succeeded.
    pub attempts: u32,
}

/// Client settings. [`ClientConfig::new`] gives the defaults. `Debug` hides the API key.
#[derive(Clone)]
pub struct ClientConfig {
    /// Base URL up to and including the version, e.g. `https://api.openai.com/v1` or
    /// `http://127.0.0.1:8000/v1`; `/chat/completions` is appended. A base that already ends in
    /// `/chat/completions` is used as is.
    pub api_base: String,
    /// Sent as `Authorization: Bearer …` when set.
    pub api_key: Option<String>,
    pub model: String,
    /// Maximum HTTP requests in flight.
    pub concurrency: usize,
    /// Maximum request starts per minute, if any.
    pub requests_per_minute: Option<u32>,
    /// Timeout of one attempt, connect to last body byte.
    pub timeout: Duration,
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// Backoff before retry k (0-based) is drawn from `0..=min(backoff_max, backoff_base * 2^k)`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Upper bound on a server-requested `Retry-After`.
    pub retry_after_max: Duration,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("api_base", &self.api_base)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("model", &self.model)
            .field("concurrency", &self.concurrency)
            .field("requests_per_minute", &self.requests_per_minute)
            .field("timeout", &self.timeout)
            .field("max_retries", &self.max_retries)
            .field("backoff_base", &self.backoff_base)
            .field("backoff_max", &self.backoff_max)
            .field("retry_after_max", &self.retry_after_max)
            .finish()
    }
}

impl ClientConfig {
    pub fn new(api_base: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            api_base: api_base.into(),
            api_key: None,
            model: model.into(),
            concurrency: 8,
            requests_per_minute: None,
            timeout: Duration::from_secs(120),
            max_retries: 6,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            retry_after_max: Duration::from_secs(300),
        }
    }

    /// Takes the key from `OPENAI_API_KEY` when it is set and not empty.
    pub fn with_env_api_key(mut self) -> Self {
        if let Ok(k) = std::env::var("OPENAI_API_KEY")
            && !k.trim().is_empty()
        {
            self.api_key = Some(k.trim().to_string());
        }
        self
    }
}

/// The JSON body sent to `/chat/completions` for `req` (exactly what [`ChatClient::chat`] sends).
pub fn request_json(model: &str, req: &ChatRequest) -> serde_json::Value {
    let body = WireRequest {
        model,
        messages: &req.messages,
        temperature: req.temperature,
        max_tokens: req.max_tokens,
    };
    // Through the bytes, so that f32 fields read back as they are written (0.3, not 0.300000011…).
    serde_json::to_vec(&body)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// Spaces request starts at least `interval` apart (no bursts), shared by all tasks.
#[derive(Debug)]
struct RateLimiter {
    interval: Duration,
    next: Mutex<Instant>,
}

impl RateLimiter {
    fn new(rpm: u32) -> Self {
        Self {
            interval: Duration::from_secs_f64(60.0 / f64::from(rpm.max(1))),
            next: Mutex::new(Instant::now()),
        }
    }

    async fn wait(&self) {
        let slot = {
            let mut next = self.next.lock().await;
            let now = Instant::now();
            let slot = (*next).max(now);
            *next = slot + self.interval;
            slot
        };
        tokio::time::sleep_until(slot.into()).await;
    }
}

/// Counters over the client's lifetime.
#[derive(Debug, Default)]
struct Counters {
    attempts: std::sync::atomic::AtomicU64,
    retries: std::sync::atomic::AtomicU64,
}

/// The chat client. Cheap to clone; clones share limits and counters.
#[derive(Debug, Clone)]
pub struct ChatClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    http: reqwest::Client,
    /// The API base (`…/v1`), for the Batch API's `/files` and `/batches`.
    base: String,
    url: String,
    cfg: ClientConfig,
    slots: Semaphore,
    limiter: Option<RateLimiter>,
    counters: Counters,
}

#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    messages: &'a [ChatMessage],
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
}

#[derive(Deserialize)]
struct WireResponse {
    #[serde(default)]
    choices: Vec<WireChoice>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct WireChoice {
    #[serde(default)]
    message: Option<WireMessage>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireMessage {
    #[serde(default)]
    content: Option<String>,
}

impl ChatClient {
    pub fn new(cfg: ClientConfig) -> Result<Self, ClientError> {
        if cfg.concurrency == 0 {
            return Err(ClientError::Config("concurrency must be at least 1".into()));
        }
        if cfg.requests_per_minute == Some(0) {
            return Err(ClientError::Config(
                "requests per minute must be at least 1".into(),
            ));
        }
        if cfg.model.trim().is_empty() {
            return Err(ClientError::Config("a model name is required".into()));
        }
        let base = cfg.api_base.trim().trim_end_matches('/');
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ClientError::Config(format!(
                "API base `{}` must start with http:// or https://",
                cfg.api_base
            )));
        }
        let url = if base.ends_with("/chat/completions") {
            base.to_string()
        } else {
            format!("{base}/chat/completions")
        };
        let base = url.trim_end_matches("/chat/completions").to_string();
        reqwest::Url::parse(&url)
            .map_err(|e| ClientError::Config(format!("bad API base `{}`: {e}", cfg.api_base)))?;
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(cfg.concurrency)
            .build()
            .map_err(|e| ClientError::Config(format!("cannot build the HTTP client: {e}")))?;
        let limiter = cfg.requests_per_minute.map(RateLimiter::new);
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                base,
                url,
                slots: Semaphore::new(cfg.concurrency),
                limiter,
                counters: Counters::default(),
                cfg,
            }),
        })
    }

    pub fn config(&self) -> &ClientConfig {
        &self.inner.cfg
    }

    /// The full endpoint URL requests go to.
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// HTTP attempts made so far, retries included.
    pub fn attempts_made(&self) -> u64 {
        self.inner
            .counters
            .attempts
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Retries made so far.
    pub fn retries_made(&self) -> u64 {
        self.inner
            .counters
            .retries
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sends a chat request, retrying per the configuration.
    pub async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ClientError> {
        let inner = &self.inner;
        let body = WireRequest {
            model: &inner.cfg.model,
            messages: &req.messages,
            temperature: req.temperature,
            max_tokens: req.max_tokens,
        };
        let body = serde_json::to_vec(&body)
            .map_err(|e| ClientError::Config(format!("cannot encode request: {e}")))?;
        let body = &body;
        let (mut r, attempts) = self
            .retrying("chat request", || async move {
                let rb = inner
                    .http
                    .post(&inner.url)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.clone());
                let bytes = self.send_once(rb, inner.cfg.timeout).await?;
                decode_completion(&bytes)
            })
            .await?;
        r.attempts = attempts;
        Ok(r)
    }

    /// Runs `attempt` under the client's concurrency and rate limits, retrying retryable
    /// errors with backoff; returns the result and the number of attempts it took. Every
    /// request of the project's one HTTP client goes through here.
    pub(crate) async fn retrying<T, F, Fut>(
        &self,
        what: &str,
        mut attempt_fn: F,
    ) -> Result<(T, u32), ClientError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let inner = &self.inner;
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let result = {
                // A closed semaphore cannot happen (we never close it); treat it as a config error.
                let _permit = inner
                    .slots
                    .acquire()
                    .await
                    .map_err(|_| ClientError::Config("client is shut down".into()))?;
                if let Some(l) = &inner.limiter {
                    l.wait().await;
                }
                inner
                    .counters
                    .attempts
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                attempt_fn().await
            };
            match result {
                Ok(r) => return Ok((r, attempt)),
                Err(e) if e.is_retryable() && attempt <= inner.cfg.max_retries => {
                    let delay = self.backoff(attempt - 1, &e);
                    tracing::debug!(attempt, ?delay, error = %e, "retrying {what}");
                    inner
                        .counters
                        .retries
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tokio::time::sleep(delay).await;
                }
                Err(e) if e.is_retryable() => {
                    return Err(ClientError::Exhausted {
                        attempts: attempt,
                        last: Box::new(e),
                    });
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A request to `path` under the API base (e.g. `/files`), not yet sent.
    pub(crate) fn api_request(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> reqwest::RequestBuilder {
        let inner = &self.inner;
        inner.http.request(method, format!("{}{path}", inner.base))
    }

    /// One attempt: adds the key and the timeout, sends, and returns the body of a 2xx answer
    /// (any other status is a [`ClientError::Status`] with the server's `Retry-After`).
    pub(crate) async fn send_once(
        &self,
        rb: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> Result<Vec<u8>, ClientError> {
        let mut rb = rb.timeout(timeout);
        if let Some(k) = &self.inner.cfg.api_key {
            rb = rb.bearer_auth(k);
        }
        let resp = rb.send().await.map_err(|e| classify(e, timeout))?;
        let status = resp.status();
        let retry_after = parse_retry_after(resp.headers(), SystemTime::now());
        let bytes = resp.bytes().await.map_err(|e| match classify(e, timeout) {
            ClientError::Connect(m) => ClientError::Body(m),
            other => other,
        })?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&bytes);
            let body: String = text.chars().take(500).collect();
            return Err(ClientError::Status {
                status: status.as_u16(),
                body,
                retry_after,
            });
        }
        Ok(bytes.to_vec())
    }

    fn backoff(&self, retry: u32, err: &ClientError) -> Duration {
        let cfg = &self.inner.cfg;
        let cap = cfg
            .backoff_base
            .saturating_mul(2u32.saturating_pow(retry.min(30)))
            .min(cfg.backoff_max);
        let jitter = if cap.is_zero() {
            Duration::ZERO
        } else {
            cap.mul_f64(rand::rng().random_range(0.0..=1.0))
        };
        match err {
            ClientError::Status {
                retry_after: Some(ra),
                ..
            } => {
                // Honour the server's floor, plus a little jitter so waiters do not stampede.
                let ra = (*ra).min(cfg.retry_after_max);
                ra + jitter.min(Duration::from_millis(250))
            }
            _ => jitter,
        }
    }
}

/// Reads a chat completion body (the body of a `/chat/completions` answer, or of a Batch API
/// output line): the first choice's content, its finish reason and the usage.
pub fn decode_completion(bytes: &[u8]) -> Result<ChatResponse, ClientError> {
    let wire: WireResponse =
        serde_json::from_slice(bytes).map_err(|e| ClientError::Decode(e.to_string()))?;
    completion_from_wire(wire)
}

/// [`decode_completion`] of an already parsed JSON value.
pub fn completion_from_value(v: serde_json::Value) -> Result<ChatResponse, ClientError> {
    let wire: WireResponse =
        serde_json::from_value(v).map_err(|e| ClientError::Decode(e.to_string()))?;
    completion_from_wire(wire)
}

fn completion_from_wire(wire: WireResponse) -> Result<ChatResponse, ClientError> {
    let usage = wire.usage.unwrap_or_default();
    let choice = wire
        .choices
        .into_iter()
        .next()
        .ok_or(ClientError::NoContent)?;
    let content = choice
        .message
        .and_then(|m| m.content)
        .ok_or(ClientError::NoContent)?;
    Ok(ChatResponse {
        content,
        finish_reason: choice.finish_reason,
        usage,
        attempts: 1,
    })
}

fn classify(e: reqwest::Error, timeout: Duration) -> ClientError {
    if e.is_timeout() {
        ClientError::Timeout(timeout)
    } else if e.is_builder() {
        ClientError::Config(e.to_string())
    } else if e.is_body() || e.is_decode() {
        ClientError::Body(full_chain(&e))
    } else {
        // connect errors, resets, incomplete messages: all worth another try
        ClientError::Connect(full_chain(&e))
    }
}

fn full_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Reads `retry-after-ms` (milliseconds) or `Retry-After` (delta seconds, possibly
/// fractional, or an HTTP date relative to `now`).
pub fn parse_retry_after(
    headers: &reqwest::header::HeaderMap,
    now: SystemTime,
) -> Option<Duration> {
    if let Some(ms) = headers.get("retry-after-ms").and_then(|v| v.to_str().ok())
        && let Ok(ms) = ms.trim().parse::<f64>()
        && ms.is_finite()
        && ms >= 0.0
    {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    let v = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = v.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Some(Duration::from_secs_f64(secs.min(86_400.0)));
        }
        return None;
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue};

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut h = HeaderMap::new();
        assert_eq!(parse_retry_after(&h, now), None);
        h.insert("retry-after", HeaderValue::from_static("3"));
        assert_eq!(parse_retry_after(&h, now), Some(Duration::from_secs(3)));
        h.insert("retry-after", HeaderValue::from_static("0.5"));
        assert_eq!(parse_retry_after(&h, now), Some(Duration::from_millis(500)));
        h.insert("retry-after", HeaderValue::from_static("-1"));
        assert_eq!(parse_retry_after(&h, now), None);
        h.insert("retry-after", HeaderValue::from_static("garbage"));
        assert_eq!(parse_retry_after(&h, now), None);
        let date = httpdate::fmt_http_date(now + Duration::from_secs(7));
        h.insert("retry-after", HeaderValue::from_str(&date).unwrap());
        assert_eq!(parse_retry_after(&h, now), Some(Duration::from_secs(7)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(7));
        h.insert("retry-after", HeaderValue::from_str(&past).unwrap());
        assert_eq!(parse_retry_after(&h, now), Some(Duration::ZERO));
        h.insert("retry-after-ms", HeaderValue::from_static("1500"));
        assert_eq!(
            parse_retry_after(&h, now),
            Some(Duration::from_millis(1500))
        );
    }

    #[test]
    fn retryable_classes() {
        let st = |s| ClientError::Status {
            status: s,
            body: String::new(),
            retry_after: None,
        };
        for s in [408, 409, 429, 500, 502, 503, 504] {
            assert!(st(s).is_retryable(), "{s}");
        }
        for s in [400, 401, 403, 404, 422] {
            assert!(!st(s).is_retryable(), "{s}");
        }
        assert!(ClientError::Timeout(Duration::from_secs(1)).is_retryable());
        assert!(ClientError::Connect("x".into()).is_retryable());
        assert!(!ClientError::Decode("x".into()).is_retryable());
    }

    #[test]
    fn debug_hides_the_key() {
        let mut cfg = ClientConfig::new("http://h", "m");
        cfg.api_key = Some("sk-secret".into());
        let c = ChatClient::new(cfg.clone()).unwrap();
        assert!(!format!("{cfg:?}").contains("sk-secret"));
        assert!(!format!("{c:?}").contains("sk-secret"));
        assert!(format!("{cfg:?}").contains("redacted"));
    }

    #[test]
    fn config_validation_and_url() {
        let c = ChatClient::new(ClientConfig::new("http://127.0.0.1:9/v1/", "m")).unwrap();
        assert_eq!(c.url(), "http://127.0.0.1:9/v1/chat/completions");
        let c = ChatClient::new(ClientConfig::new("http://h/v1/chat/completions", "m")).unwrap();
        assert_eq!(c.url(), "http://h/v1/chat/completions");
        assert!(ChatClient::new(ClientConfig::new("ftp://h", "m")).is_err());
        assert!(ChatClient::new(ClientConfig::new("http://h", " ")).is_err());
        let mut cfg = ClientConfig::new("http://h", "m");
        cfg.concurrency = 0;
        assert!(ChatClient::new(cfg).is_err());
    }

    #[test]
    fn backoff_grows_is_capped_and_honours_retry_after() {
        let mut cfg = ClientConfig::new("http://h", "m");
        cfg.backoff_base = Duration::from_millis(100);
        cfg.backoff_max = Duration::from_millis(400);
        let c = ChatClient::new(cfg).unwrap();
        let e = ClientError::Timeout(Duration::from_secs(1));
        for _ in 0..200 {
            assert!(c.backoff(0, &e) <= Duration::from_millis(100));
            assert!(c.backoff(1, &e) <= Duration::from_millis(200));
            assert!(c.backoff(10, &e) <= Duration::from_millis(400));
        }
        // jitter actually varies
        let draws: std::collections::HashSet<_> = (0..50).map(|_| c.backoff(3, &e)).collect();
        assert!(draws.len() > 10);
        let ra = ClientError::Status {
            status: 429,
            body: String::new(),
            retry_after: Some(Duration::from_secs(2)),
        };
        for _ in 0..50 {
            let d = c.backoff(0, &ra);
            assert!(
                d >= Duration::from_secs(2) && d <= Duration::from_millis(2250),
                "{d:?}"
            );
        }
    }
}
