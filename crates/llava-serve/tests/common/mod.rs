//! A server on 127.0.0.1 over the tiny committed fixture, and the pipeline it must agree with.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::header;
use axum::response::{IntoResponse, Redirect};
use axum::routing::get;

use base64::Engine;
use llava_data::conversation::Message;
use llava_model::generation::SamplingParams;
use llava_model::pipeline::{Generation, Pipeline, PipelineOptions};
use llava_serve::{ServeConfig, Server};
use serde_json::{Value, json};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn model_dir() -> PathBuf {
    fixtures().join("models/llava15-default/model")
}

pub fn image_path(name: &str) -> PathBuf {
    fixtures().join("models/images").join(name)
}

pub fn load() -> Pipeline {
    Pipeline::load(&PipelineOptions::new(model_dir().to_string_lossy())).expect("fixture loads")
}

pub fn data_url(path: &Path) -> String {
    let bytes = std::fs::read(path).expect("image");
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("png");
    let mime = if ext == "jpg" { "jpeg" } else { ext };
    format!(
        "data:image/{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

pub struct TestServer {
    pub server: Server,
    pub base: String,
    pub client: reqwest::blocking::Client,
}

impl TestServer {
    pub fn start(config: ServeConfig) -> Self {
        Self::start_with(config, Box::new(|| Ok::<_, String>(load())))
    }

    /// Without EOS: every reply runs to its max_tokens or the context's end.
    pub fn start_without_eos(config: ServeConfig) -> Self {
        Self::start_with(
            config,
            Box::new(|| {
                let mut p = load();
                p.eos_token_ids.clear();
                Ok::<_, String>(p)
            }),
        )
    }

    pub fn start_with(config: ServeConfig, loader: llava_serve::Loader) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let server = Server::start(config, listener, loader, false).expect("server starts");
        let base = format!("http://{}", server.addr());
        let client = reqwest::blocking::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("client");
        Self {
            server,
            base,
            client,
        }
    }

    /// Waits for `/health` to say 200.
    pub fn ready(self) -> Self {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(r) = self.client.get(self.url("/health")).send()
                && r.status() == 200
            {
                return self;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the server did not become ready");
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn chat(&self, body: &Value) -> reqwest::blocking::Response {
        self.client
            .post(self.url("/v1/chat/completions"))
            .json(body)
            .send()
            .expect("request")
    }
}

/// The body of a greedy request with the fixture's model name.
pub fn greedy(messages: Value, max_tokens: usize) -> Value {
    json!({"model": "llava", "messages": messages, "temperature": 0, "max_tokens": max_tokens})
}

/// What the pipeline itself generates, greedily, for `messages` and image files.
pub fn expected(
    p: &Pipeline,
    messages: &[Message],
    images: &[PathBuf],
    max: usize,
) -> (Generation, usize) {
    let prompt = p.render(messages).expect("render");
    let pixels = p.pixel_values(images).expect("images");
    let ids = p.encode(&prompt, pixels.as_ref()).expect("encode");
    let out = p
        .generate(
            &ids,
            pixels.as_ref(),
            &SamplingParams::default(),
            max,
            &[],
            |_| {},
        )
        .expect("generate");
    (out, ids.len())
}

/// The finish reason OpenAI would give `out` after at most `max` tokens.
pub fn finish_reason(p: &Pipeline, out: &Generation, max: usize) -> &'static str {
    let ended_by_eos = out
        .token_ids
        .last()
        .is_some_and(|id| p.eos_token_ids.contains(id));
    if out.token_ids.len() >= max && !ended_by_eos {
        "length"
    } else {
        "stop"
    }
}

/// The `data:` payloads of an event stream, `[DONE]` included; panics on other framing.
pub fn sse_events(text: &str) -> Vec<String> {
    assert!(
        text.ends_with("\n\n"),
        "events end with a blank line: {text:?}"
    );
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {e:?}"))
                .to_string()
        })
        .collect()
}

/// Asserts an OpenAI error body with this status and param, and returns its message.
pub fn assert_error(r: reqwest::blocking::Response, status: u16, param: Option<&str>) -> String {
    assert_eq!(r.status(), status, "status");
    assert_eq!(
        r.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    let body: Value = r.json().expect("json error body");
    let error = &body["error"];
    for key in ["message", "type", "param", "code"] {
        assert!(error.get(key).is_some(), "error.{key} in {body}");
    }
    assert_eq!(error["param"].as_str(), param, "param of {body}");
    error["message"].as_str().expect("message").to_string()
}

/// An image server on 127.0.0.1: `/img.png`; `/to-localhost`, a redirect to it by the name
/// `localhost`; `/to-allowed`, a redirect to it by the same address; `/loop`, a redirect to
/// itself; and `/slow`, which answers after two seconds and counts its requests.
pub struct ImageServer {
    pub addr: SocketAddr,
    pub slow_hits: Arc<AtomicUsize>,
}

impl ImageServer {
    pub fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let png = std::fs::read(image_path("small_24x20.png")).expect("image");
        let slow_png = png.clone();
        let slow_hits = Arc::new(AtomicUsize::new(0));
        let hits = slow_hits.clone();
        let port = addr.port();
        let app =
            Router::new()
                .route(
                    "/img.png",
                    get(move || async move {
                        ([(header::CONTENT_TYPE, "image/png")], png).into_response()
                    }),
                )
                .route(
                    "/slow",
                    get(move || async move {
                        hits.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_secs(2)).await;
                        ([(header::CONTENT_TYPE, "image/png")], slow_png).into_response()
                    }),
                )
                .route(
                    "/to-localhost",
                    get(move || async move {
                        Redirect::temporary(&format!("http://localhost:{port}/img.png"))
                    }),
                )
                .route(
                    "/to-allowed",
                    get(|| async { Redirect::temporary("/img.png") }),
                )
                .route("/loop", get(|| async { Redirect::temporary("/loop") }));
        // Detached: it ends with the test process.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let _ = axum::serve(listener, app).await;
            });
        });
        Self { addr, slow_hits }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn hits(&self) -> usize {
        self.slow_hits.load(Ordering::SeqCst)
    }
}

/// A metric without labels from `/metrics` text.
pub fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in {text}"))
}
