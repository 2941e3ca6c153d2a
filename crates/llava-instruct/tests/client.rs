//! The chat client against the scripted local server.

mod common;

use std::time::{Duration, Instant};

use llava_instruct::{ChatClient, ChatMessage, ChatRequest, ClientConfig, ClientError};

fn cfg(base: String) -> ClientConfig {
    let mut c = ClientConfig::new(base, "teacher-model");
    c.backoff_base = Duration::from_millis(10);
    c.backoff_max = Duration::from_millis(50);
    c.timeout = Duration::from_millis(500);
    c.max_retries = 3;
    c.concurrency = 8;
    c
}

fn req(context: &str) -> ChatRequest {
    ChatRequest {
        messages: vec![
            ChatMessage::system("Write one question"),
            ChatMessage::user(context),
        ],
        temperature: Some(0.3),
        max_tokens: Some(77),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_429_after_retry_after() {
    let s = common::start(Duration::ZERO).await;
    let c = ChatClient::new(cfg(s.base())).unwrap();
    let r = c.chat(&req("a dog mk429")).await.unwrap();
    assert_eq!(r.attempts, 2);
    let hits = s.state.hits_for("mk429");
    assert_eq!(hits.len(), 2);
    let gap = hits[1].at - hits[0].at;
    assert!(
        gap >= Duration::from_secs(1),
        "Retry-After: 1 not honoured, retried after {gap:?}"
    );
    assert!(gap < Duration::from_secs(3), "{gap:?}");
    assert_eq!(c.retries_made(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_5xx_dropped_connections_and_timeouts() {
    let s = common::start(Duration::ZERO).await;
    let c = ChatClient::new(cfg(s.base())).unwrap();
    let r = c.chat(&req("cat mk500")).await.unwrap();
    assert_eq!(r.attempts, 3);
    assert_eq!((r.usage.prompt_tokens, r.usage.completion_tokens), (10, 5));
    assert!(
        r.content
            .starts_with("Question: Why is this happening?\nAnswer: Because cat mk500 "),
        "{}",
        r.content
    );

    let r = c.chat(&req("cat mkdrop")).await.unwrap();
    assert_eq!(r.attempts, 2, "a dropped connection is retried");

    let t = Instant::now();
    let r = c.chat(&req("cat mkslow")).await.unwrap();
    assert_eq!(r.attempts, 2, "a timed-out attempt is retried");
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "the 3 s reply was not cut at the timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gives_up_after_max_retries_and_fails_fast_on_401() {
    let s = common::start(Duration::ZERO).await;
    let mut conf = cfg(s.base());
    conf.max_retries = 2;
    let c = ChatClient::new(conf).unwrap();
    match c.chat(&req("x mk503always")).await {
        Err(ClientError::Exhausted { attempts, last }) => {
            assert_eq!(attempts, 3);
            assert!(matches!(*last, ClientError::Status { status: 503, .. }));
        }
        other => panic!("expected exhaustion, got {other:?}"),
    }
    assert_eq!(s.state.hits_for("mk503always").len(), 3);

    match c.chat(&req("x mk401")).await {
        Err(ClientError::Status { status: 401, .. }) => {}
        other => panic!("expected a 401, got {other:?}"),
    }
    assert_eq!(
        s.state.hits_for("mk401").len(),
        1,
        "401 must not be retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused_is_retried_then_reported() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut conf = cfg(format!("http://127.0.0.1:{port}/v1"));
    conf.max_retries = 2;
    let c = ChatClient::new(conf).unwrap();
    match c.chat(&req("x")).await {
        Err(ClientError::Exhausted { attempts: 3, last }) => {
            assert!(matches!(*last, ClientError::Connect(_)), "{last:?}");
        }
        other => panic!("expected exhaustion on connect errors, got {other:?}"),
    }
    assert_eq!(c.attempts_made(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_model_parameters_and_bearer_key() {
    let s = common::start(Duration::ZERO).await;
    let mut conf = cfg(s.base());
    conf.api_key = Some("sk-test".into());
    let c = ChatClient::new(conf).unwrap();
    c.chat(&req("hello")).await.unwrap();
    let h = &s.state.hits()[0];
    assert_eq!(h.auth.as_deref(), Some("Bearer sk-test"));
    assert_eq!(h.body["model"], "teacher-model");
    assert_eq!(h.body["max_tokens"], 77);
    assert!((h.body["temperature"].as_f64().unwrap() - 0.3).abs() < 1e-6);
    assert_eq!(h.body["messages"][0]["role"], "system");
    assert_eq!(h.body["messages"][1]["content"], "hello");
    assert_eq!(
        h.body,
        llava_instruct::client::request_json("teacher-model", &req("hello"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limit_holds() {
    let s = common::start(Duration::from_millis(50)).await;
    let mut conf = cfg(s.base());
    conf.concurrency = 4;
    let c = ChatClient::new(conf).unwrap();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..32 {
        let c = c.clone();
        set.spawn(async move { c.chat(&req(&format!("image {i}"))).await });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap().unwrap();
    }
    let max = s
        .state
        .max_in_flight
        .load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        max, 4,
        "at most 4 in flight, and the limit is actually used"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpm_limit_spaces_request_starts() {
    let s = common::start(Duration::ZERO).await;
    let mut conf = cfg(s.base());
    conf.requests_per_minute = Some(600); // one every 100 ms
    let c = ChatClient::new(conf).unwrap();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..6 {
        let c = c.clone();
        set.spawn(async move { c.chat(&req(&format!("rpm {i}"))).await });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap().unwrap();
    }
    let mut at: Vec<Instant> = s.state.hits().iter().map(|h| h.at).collect();
    at.sort();
    for w in at.windows(2) {
        assert!(
            w[1] - w[0] >= Duration::from_millis(80),
            "requests {:?} apart",
            w[1] - w[0]
        );
    }
    assert!(at[5] - at[0] >= Duration::from_millis(450));
}
