//! The prompt cache in the server: a conversation's next turn prefills only its new tokens and
//! still gets the reply a fresh request gets; the same text with another image reuses nothing
//! from the first image on.

mod common;

use common::*;
use llava_data::conversation::Message;
use llava_serve::ServeConfig;
use serde_json::{Value, json};

const MAX: usize = 8;
/// Longer than the tokens a cached prompt always runs again (`gemv::MAX_ROWS + 1`), so that a
/// repeated question reuses keys past its image.
const QUESTION: &str = "What is in the image? Name every shape and colour you see.";

fn ask(url: &str) -> Value {
    json!({"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": QUESTION}
    ]})
}

fn metrics(s: &TestServer) -> String {
    s.client
        .get(s.url("/metrics"))
        .send()
        .expect("metrics")
        .text()
        .expect("text")
}

#[test]
fn a_follow_up_turn_reuses_the_first_and_replies_as_a_fresh_request() {
    let p = load();
    let img = image_path("small_24x20.png");
    let s = TestServer::start(ServeConfig::default()).ready();

    let first: Value = s
        .chat(&greedy(json!([ask(&data_url(&img))]), MAX))
        .json()
        .expect("json");
    let reply = first["choices"][0]["message"]["content"]
        .as_str()
        .expect("reply")
        .to_string();
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);

    let follow_up = "And what colour is it?";
    let (fresh, prompt_tokens) = expected(
        &p,
        &[
            Message::user(QUESTION, 1),
            Message::assistant(reply.clone()),
            Message::user(follow_up, 0),
        ],
        std::slice::from_ref(&img),
        MAX,
    );
    let body = greedy(
        json!([
            ask(&data_url(&img)),
            {"role": "assistant", "content": reply},
            {"role": "user", "content": follow_up}
        ]),
        MAX,
    );
    let v: Value = s.chat(&body).json().expect("json");
    assert_eq!(v["choices"][0]["message"]["content"], fresh.text.as_str());
    assert_eq!(v["usage"]["prompt_tokens"], prompt_tokens);
    let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .expect("cached_tokens");
    // The first turn's prompt, image included, is not prefilled again.
    let first_prompt = first["usage"]["prompt_tokens"].as_u64().expect("tokens");
    assert!(
        cached >= first_prompt && cached < prompt_tokens as u64,
        "{cached} cached of {prompt_tokens}; the first turn's prompt was {first_prompt}"
    );

    let m = metrics(&s);
    assert_eq!(metric(&m, "llava_prompt_cache_hits_total"), 1);
    assert_eq!(metric(&m, "llava_prompt_cache_reused_tokens_total"), cached);
    // One entry per turn at most: the second turn's prompt holds the first reply as the
    // template re-tokenises it, which need not be the ids generated, so it may not extend it.
    assert!((1..=2).contains(&metric(&m, "llava_prompt_cache_entries")));

    // The same request again, streamed: everything but the last tokens is reused.
    let mut body = body;
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let events = sse_events(&s.chat(&body).text().expect("body"));
    let mut text = String::new();
    let mut usage = Value::Null;
    for e in &events[..events.len() - 1] {
        let c: Value = serde_json::from_str(e).expect("chunk");
        text.push_str(
            c["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or_default(),
        );
        if !c["usage"].is_null() {
            usage = c["usage"].clone();
        }
    }
    assert_eq!(text, fresh.text);
    assert!(usage["prompt_tokens_details"]["cached_tokens"].as_u64() > Some(cached));
}

#[test]
fn the_same_text_with_another_image_never_reuses_the_first_images_keys() {
    let p = load();
    let (a, b) = (
        image_path("shapes_64x48.png"),
        image_path("texture_45x45.png"),
    );
    let fresh = |img: &std::path::PathBuf| {
        expected(
            &p,
            &[Message::user(QUESTION, 1)],
            std::slice::from_ref(img),
            MAX,
        )
    };
    let ((with_a, _), (with_b, tokens)) = (fresh(&a), fresh(&b));
    assert_ne!(
        with_a.text, with_b.text,
        "the two pictures must give different replies for this test to tell them apart"
    );
    // Where the image's span begins: nothing from there on may be reused.
    let prompt = p.render(&[Message::user(QUESTION, 1)]).expect("render");
    let pixels = p.pixel_values(std::slice::from_ref(&b)).expect("image");
    let ids = p.encode(&prompt, pixels.as_ref()).expect("encode");
    let image_at = ids
        .iter()
        .position(|&id| id == p.model.config.image_token_index)
        .expect("an image span");

    let s = TestServer::start(ServeConfig::default()).ready();
    let reply = |img: &std::path::PathBuf| -> Value {
        s.chat(&greedy(json!([ask(&data_url(img))]), MAX))
            .json()
            .expect("json")
    };
    let first = reply(&a);
    assert_eq!(
        first["choices"][0]["message"]["content"],
        with_a.text.as_str()
    );
    let second = reply(&b);
    assert_eq!(
        second["choices"][0]["message"]["content"],
        with_b.text.as_str()
    );
    assert_eq!(second["usage"]["prompt_tokens"], tokens);
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .expect("cached_tokens");
    assert!(
        cached as usize <= image_at,
        "{cached} tokens reused, but the image begins at {image_at}"
    );
    // Both conversations are cached, and each image's own text comes back to it.
    assert_eq!(metric(&metrics(&s), "llava_prompt_cache_entries"), 2);
    let again = reply(&a);
    assert_eq!(
        again["choices"][0]["message"]["content"],
        with_a.text.as_str()
    );
    assert!(
        again["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .expect("cached") as usize
            > image_at,
        "the first image's own keys are reused for it"
    );
}

#[test]
fn no_prompt_cache_keeps_nothing() {
    let img = image_path("small_24x20.png");
    let s = TestServer::start(ServeConfig {
        prompt_cache: 0,
        ..ServeConfig::default()
    })
    .ready();
    for _ in 0..2 {
        let v: Value = s
            .chat(&greedy(json!([ask(&data_url(&img))]), MAX))
            .json()
            .expect("json");
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    }
    let m = metrics(&s);
    assert_eq!(metric(&m, "llava_prompt_cache_hits_total"), 0);
    assert_eq!(metric(&m, "llava_prompt_cache_entries"), 0);
}
