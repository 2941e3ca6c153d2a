//! The OpenAI protocol against a server on 127.0.0.1 over the tiny fixture: replies equal the
//! pipeline's own greedy generation (alone, streamed, and batched with others), usage, stream
//! framing, errors, auth, CORS, the queue's 429 and the loading 503.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::*;
use llava_data::conversation::Message;
use llava_serve::ServeConfig;
use serde_json::{Value, json};

const MAX: usize = 8;

fn image_question(url: &str, question: &str) -> Value {
    json!([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": question}
    ]}])
}

#[test]
fn greedy_reply_equals_the_pipeline_streamed_or_not() {
    let p = load();
    let img = image_path("small_24x20.png");
    let (out, prompt_tokens) = expected(
        &p,
        &[Message::user("What is in the image?", 1)],
        std::slice::from_ref(&img),
        MAX,
    );
    let s = TestServer::start(ServeConfig::default()).ready();
    let body = greedy(
        image_question(&data_url(&img), "What is in the image?"),
        MAX,
    );

    let r = s.chat(&body);
    assert_eq!(r.status(), 200);
    let v: Value = r.json().expect("json");
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().expect("id").starts_with("chatcmpl-"));
    assert_eq!(v["model"], "llava");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], out.text.as_str());
    assert_eq!(
        v["choices"][0]["finish_reason"],
        finish_reason(&p, &out, MAX)
    );
    assert_eq!(v["usage"]["prompt_tokens"], prompt_tokens);
    assert_eq!(v["usage"]["completion_tokens"], out.token_ids.len());
    assert_eq!(
        v["usage"]["total_tokens"],
        prompt_tokens + out.token_ids.len()
    );

    let mut body = body;
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = s.chat(&body);
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("text/event-stream")
    );
    let events = sse_events(&r.text().expect("body"));
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk json"))
        .collect();
    let id = chunks[0]["id"].clone();
    let mut text = String::new();
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(c["id"], id, "one id across the stream");
        assert_eq!(c["object"], "chat.completion.chunk");
        let last = i == chunks.len() - 1;
        if last {
            assert_eq!(c["choices"], json!([]), "the usage chunk has no choices");
            assert_eq!(c["usage"]["prompt_tokens"], prompt_tokens);
            assert_eq!(c["usage"]["completion_tokens"], out.token_ids.len());
            continue;
        }
        assert!(
            c["usage"].is_null() && c.get("usage").is_some(),
            "usage: null"
        );
        let delta = &c["choices"][0]["delta"];
        assert_eq!(
            delta.get("role").is_some(),
            i == 0,
            "the role only first: {c}"
        );
        text.push_str(delta["content"].as_str().unwrap_or_default());
        let finish = &c["choices"][0]["finish_reason"];
        if i == chunks.len() - 2 {
            assert_eq!(finish, finish_reason(&p, &out, MAX));
        } else {
            assert!(finish.is_null());
        }
    }
    assert_eq!(text, out.text);

    // Without include_usage there is no usage field at all.
    body["stream_options"] = json!(null);
    let events = sse_events(&s.chat(&body).text().expect("body"));
    let first: Value = serde_json::from_str(&events[0]).expect("json");
    assert!(first.get("usage").is_none());
}

#[test]
fn several_turns_and_images_render_as_the_pipeline_renders_them() {
    let p = load();
    let (a, b) = (image_path("small_24x20.png"), image_path("wide_96x28.png"));
    let messages = [
        Message::system("Answer briefly."),
        Message::user("What is this?", 1),
        Message::assistant("A shape."),
        Message::user("And this one?", 1),
    ];
    let (out, prompt_tokens) = expected(&p, &messages, &[a.clone(), b.clone()], MAX);
    let s = TestServer::start(ServeConfig::default()).ready();
    let body = greedy(
        json!([
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url(&a)}},
                {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": "A shape."},
            {"role": "user", "content": [
                {"type": "text", "text": "And this one?"},
                {"type": "image_url", "image_url": {"url": data_url(&b), "detail": "high"}}]}
        ]),
        MAX,
    );
    let v: Value = s.chat(&body).json().expect("json");
    assert_eq!(v["choices"][0]["message"]["content"], out.text.as_str());
    assert_eq!(v["usage"]["prompt_tokens"], prompt_tokens);
}

/// Requests that arrive together are decoded in one batch, joining and leaving it at
/// different steps; each gets what it gets alone.
#[test]
fn batched_requests_get_their_unbatched_replies() {
    let text = batched_requests_against_unbatched(ServeConfig::default());
    // The default chunk (256) takes these prompts whole: one piece per request.
    assert_eq!(metric(&text, "llava_prefill_chunks_total"), 4, "{text}");
}

/// The same with prompts prefilled in pieces of the smallest size between decoding steps
/// (chunked prefill): the replies do not change.
#[test]
fn chunked_prefill_changes_no_reply() {
    let text = batched_requests_against_unbatched(ServeConfig {
        prefill_chunk: 1,
        ..ServeConfig::default()
    });
    assert!(
        metric(&text, "llava_prefill_chunks_total") > 4,
        "some prompt was split:\n{text}"
    );
}

/// Runs the four requests of [`batched_requests_get_their_unbatched_replies`] together against a
/// server with `config`; returns its `/metrics` text.
fn batched_requests_against_unbatched(config: ServeConfig) -> String {
    let p = load();
    let img = image_path("tall_40x60.png");
    let cases: Vec<(Value, String)> = [
        ("Describe it.", true, 12),
        ("Hi", false, 5),
        ("What colour is the large shape on the left?", true, 9),
        ("Tell me a story about a cat.", false, 16),
    ]
    .into_iter()
    .map(|(q, with_image, max)| {
        let (messages, images, body) = if with_image {
            (
                vec![Message::user(q, 1)],
                vec![img.clone()],
                greedy(image_question(&data_url(&img), q), max),
            )
        } else {
            (
                vec![Message::user(q, 0)],
                vec![],
                greedy(json!([{"role": "user", "content": q}]), max),
            )
        };
        (body, expected(&p, &messages, &images, max).0.text)
    })
    .collect();
    let s = TestServer::start(config).ready();
    std::thread::scope(|scope| {
        let handles: Vec<_> = cases
            .iter()
            .map(|(body, want)| {
                let s = &s;
                scope.spawn(move || {
                    let v: Value = s.chat(body).json().expect("json");
                    assert_eq!(
                        v["choices"][0]["message"]["content"],
                        want.as_str(),
                        "{}",
                        body["messages"]
                    );
                })
            })
            .collect();
        for h in handles {
            h.join().expect("request thread");
        }
    });
    let metrics = s.client.get(s.url("/metrics")).send().expect("metrics");
    let text = metrics.text().expect("text");
    assert!(
        text.contains("llava_requests_total{status=\"200\"} 4"),
        "{text}"
    );
    assert!(
        text.contains("llava_time_to_first_token_seconds_count 4"),
        "{text}"
    );
    assert!(text.contains("# TYPE llava_generation_tokens_total counter"));
    assert!(
        metric(&text, "llava_decode_rows_total") > metric(&text, "llava_decode_steps_total"),
        "some step decoded several requests together:\n{text}"
    );
    text
}

#[test]
fn bad_requests_get_openai_errors() {
    let s = TestServer::start(ServeConfig {
        max_body_bytes: 64 << 10,
        ..ServeConfig::default()
    })
    .ready();
    let hi = json!([{"role": "user", "content": "hi"}]);
    let with = |key: &str, value: Value| {
        let mut body = greedy(hi.clone(), 4);
        body[key] = value;
        s.chat(&body)
    };
    assert_error(with("n", json!(2)), 400, Some("n"));
    assert_error(
        with(
            "tools",
            json!([{"type": "function", "function": {"name": "f"}}]),
        ),
        400,
        Some("tools"),
    );
    assert_error(with("logit_bias", json!({"1": 5})), 400, Some("logit_bias"));
    assert_error(with("top_p", json!(1.5)), 400, Some("top_p"));
    assert_error(with("max_tokens", json!(100_000)), 400, Some("max_tokens"));
    assert_error(with("model", json!("gpt-4o")), 404, Some("model"));
    let not_json = s
        .client
        .post(s.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body("{\"messages\": [")
        .send()
        .expect("send");
    assert_error(not_json, 400, None);
    let image = |url: &str| greedy(image_question(url, "?"), 4);
    assert_error(
        s.chat(&image("data:image/png;base64,bm90IGFuIGltYWdl")),
        400,
        Some("messages[0].content[0].image_url.url"),
    );
    assert_error(
        s.chat(&image("http://example.com/a.png")),
        400,
        Some("messages[0].content[0].image_url.url"),
    );
    assert_error(
        s.chat(&image("/etc/passwd")),
        400,
        Some("messages[0].content[0].image_url.url"),
    );
    let mut big = greedy(hi.clone(), 4);
    big["messages"][0]["content"] = json!("x".repeat(100 << 10));
    assert_error(s.chat(&big), 413, None);
    let r = s.client.get(s.url("/v1/nothing")).send().expect("send");
    assert_error(r, 404, None);
    // Nothing above was a 5xx, and the server still answers.
    let v: Value = s.chat(&greedy(hi, 2)).json().expect("json");
    assert_eq!(
        v["usage"]["completion_tokens"].as_u64().map(|n| n <= 2),
        Some(true)
    );
}

#[test]
fn a_decompression_bomb_costs_nothing() {
    let s = TestServer::start(ServeConfig::default()).ready();
    let url = format!(
        "data:image/png;base64,{}",
        base64_encode(&bomb_png(100_000, 100_000))
    );
    let message = assert_error(
        s.chat(&greedy(image_question(&url, "?"), 4)),
        400,
        Some("messages[0].content[0].image_url.url"),
    );
    assert!(message.contains("100000x100000"), "{message}");
}

/// A PNG of a few dozen bytes whose header claims `w`x`h` pixels: decoding it would allocate
/// for all of them before finding the data short, so the cap must act on the header alone.
fn bomb_png(w: u32, h: u32) -> Vec<u8> {
    fn chunk(png: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
        png.extend((data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend(data);
        png.extend(&body);
        let mut crc = !0u32;
        for &b in &body {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        png.extend((!crc).to_be_bytes());
    }
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([1, 0, 0, 0, 0]);
    chunk(&mut png, b"IHDR", &ihdr);
    chunk(
        &mut png,
        b"IDAT",
        &[
            0x78, 0xda, 0xed, 0xc1, 0x01, 0x0d, 0x00, 0x00, 0x00, 0xc2, 0xa0,
        ],
    );
    chunk(&mut png, b"IEND", &[]);
    png
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[test]
fn api_keys_guard_v1_and_metrics() {
    let s = TestServer::start(ServeConfig {
        api_keys: vec!["sk-test".into()],
        ..ServeConfig::default()
    })
    .ready();
    for path in ["/v1/models", "/metrics"] {
        assert_error(s.client.get(s.url(path)).send().expect("send"), 401, None);
        let wrong = s
            .client
            .get(s.url(path))
            .bearer_auth("sk-tesT")
            .send()
            .expect("send");
        assert_error(wrong, 401, None);
        let right = s
            .client
            .get(s.url(path))
            .bearer_auth("sk-test")
            .send()
            .expect("send");
        assert_eq!(right.status(), 200, "{path}");
    }
    assert_error(
        s.chat(&greedy(json!([{"role": "user", "content": "hi"}]), 2)),
        401,
        None,
    );
    let v: Value = s
        .client
        .get(s.url("/v1/models"))
        .bearer_auth("sk-test")
        .send()
        .expect("send")
        .json()
        .expect("json");
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "llava");
    assert_eq!(v["data"][0]["object"], "model");
}

#[test]
fn cors_is_off_unless_an_origin_is_named() {
    let preflight = |s: &TestServer| {
        s.client
            .request(reqwest::Method::OPTIONS, s.url("/v1/chat/completions"))
            .header("origin", "http://page.example")
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type",
            )
            .send()
            .expect("send")
    };
    let off = TestServer::start(ServeConfig::default()).ready();
    let r = preflight(&off);
    assert!(r.headers().get("access-control-allow-origin").is_none());
    let on = TestServer::start(ServeConfig {
        cors_origins: vec!["http://page.example".into()],
        api_keys: vec!["k".into()],
        ..ServeConfig::default()
    })
    .ready();
    let r = preflight(&on);
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "http://page.example"
    );
    let other = on
        .client
        .get(on.url("/v1/models"))
        .header("origin", "http://elsewhere.example")
        .bearer_auth("k")
        .send()
        .expect("send");
    assert!(other.headers().get("access-control-allow-origin").is_none());
}

/// A request holds its place from the moment it is accepted, while its images download: a
/// slow image keeps the only place taken, so the next request gets a 429.
#[test]
fn a_full_server_says_429_with_retry_after() {
    let images = ImageServer::start();
    let s = TestServer::start(ServeConfig {
        max_running: 1,
        max_queue: 0,
        media: llava_serve::MediaPolicy {
            allow_remote_images: true,
            allowed_media_domains: vec!["127.0.0.1".into()],
            ..ServeConfig::default().media
        },
        ..ServeConfig::default()
    })
    .ready();
    let hi = greedy(json!([{"role": "user", "content": "hi"}]), 2);
    std::thread::scope(|scope| {
        let slow = scope.spawn(|| {
            s.chat(&greedy(image_question(&images.url("/slow"), "?"), 2))
                .status()
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while images.hits() == 0 {
            assert!(
                Instant::now() < deadline,
                "the slow image was never fetched"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let r = s.chat(&hi);
        assert_eq!(r.headers()["retry-after"], "1");
        assert_error(r, 429, None);
        assert_eq!(slow.join().expect("slow request"), 200);
    });
    assert_eq!(s.chat(&hi).status(), 200, "the place is free again");
}

/// A client that goes away mid-stream frees its sequence at the next step: it stops long
/// before the context's end, where it would stop without EOS.
#[test]
fn a_disconnected_stream_stops_generating() {
    let s = TestServer::start_without_eos(ServeConfig {
        max_running: 1,
        max_queue: 0,
        ..ServeConfig::default()
    })
    .ready();
    let long = json!({"model": "llava", "messages": [{"role": "user", "content": "Count."}],
        "temperature": 0, "stream": true})
    .to_string();
    // A plain socket, closed by this thread as soon as the stream is seen decoding: through an
    // HTTP client the close goes by way of its runtime's thread, and the fixture's tiny model
    // could finish all its tokens first.
    let addr = s.url("").trim_start_matches("http://").to_string();
    let mut socket = std::net::TcpStream::connect(&addr).expect("connect");
    write!(
        socket,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{long}",
        long.len()
    )
    .expect("send the request");
    // The status line, then the role chunk and two pieces of text: the sequence is decoding.
    let mut reader = std::io::BufReader::new(socket.try_clone().expect("socket"));
    let mut status = String::new();
    std::io::BufRead::read_line(&mut reader, &mut status).expect("read");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let mut events = 0;
    while events < 3 {
        let mut line = String::new();
        let n = std::io::BufRead::read_line(&mut reader, &mut line).expect("read");
        assert!(n > 0, "the stream ended early");
        events += usize::from(line.starts_with("data: "));
    }
    socket
        .shutdown(std::net::Shutdown::Both)
        .expect("close the socket");
    drop((reader, socket));
    let metric = |name: &str| -> u64 {
        let text = s
            .client
            .get(s.url("/metrics"))
            .send()
            .and_then(|r| r.text())
            .expect("metrics");
        metric(&text, name)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric("llava_running_sequences") != 0 {
        assert!(Instant::now() < deadline, "the sequence never left");
        std::thread::sleep(Duration::from_millis(10));
    }
    let generated = metric("llava_generation_tokens_total");
    let prompt = metric("llava_prompt_tokens_total");
    assert!(
        generated + prompt < 256 - 16,
        "{generated} tokens generated after a {prompt}-token prompt: it ran to the context's end"
    );
    assert_eq!(
        s.chat(&greedy(json!([{"role": "user", "content": "hi"}]), 2))
            .status(),
        200
    );
}

#[test]
fn health_is_503_while_the_model_loads() {
    let (release, wait) = std::sync::mpsc::channel::<()>();
    let s = TestServer::start_with(
        ServeConfig::default(),
        Box::new(move || {
            let _ = wait.recv();
            Ok::<_, String>(load())
        }),
    );
    let r = s.client.get(s.url("/health")).send().expect("send");
    assert_eq!(r.headers()["retry-after"], "5");
    assert_error(r, 503, None);
    assert_error(
        s.chat(&greedy(json!([{"role": "user", "content": "hi"}]), 2)),
        503,
        None,
    );
    release.send(()).expect("release");
    let s = s.ready();
    assert_eq!(
        s.chat(&greedy(json!([{"role": "user", "content": "hi"}]), 2))
            .status(),
        200
    );
}

#[test]
fn the_chat_page_is_served_whole_without_auth() {
    let s = TestServer::start(ServeConfig {
        api_keys: vec!["k".into()],
        ..ServeConfig::default()
    })
    .ready();
    let r = s.client.get(s.url("/")).send().expect("send");
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("text/html")
    );
    let html = r.text().expect("text");
    assert!(html.contains("/v1/chat/completions") && html.contains("</html>"));
    // Offline: no script, style or image from another origin.
    for outside in ["src=\"http", "href=\"http", "url(http", "import "] {
        assert!(!html.contains(outside), "{outside}");
    }
}
