//! Throughput benchmark of the generation pipeline (not a test; run by hand):
//!
//! ```text
//! cargo run --release -p llava-instruct --example bench_throughput -- [REQUESTS] [CONCURRENCY] [DELAY_MS]
//! ```
//!
//! Defaults: 3840 requests, concurrency 64, a local OpenAI-compatible server that answers every
//! request after a fixed 200 ms. The server runs in a child process (this same binary with
//! `serve`), so the CPU time measured here is the pipeline's alone: context formatting,
//! request building, HTTP, reply parsing, record writing and flushing, progress accounting.
//!
//! Reports throughput against the concurrency-bound ideal (concurrency / delay) and the
//! client's CPU time per request (user + system, from /proc/self/stat).

use std::io::{BufRead, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::routing::post;
use llava_instruct::source::{BoxAnnotation, ImageEntry};
use llava_instruct::{ClientConfig, InstructType, PromptLibrary, RunConfig, run_blocking};

fn reply_for(system: &str) -> &'static str {
    if system.contains("Write a conversation") {
        "Question: What is in the picture?\nAnswer: A dog lying on a couch.\n\nQuestion: What is the dog doing?\nAnswer: It is resting with its head on a cushion."
    } else if system.contains("Write one question") {
        "Question: Why might the dog be resting here?\nAnswer: The couch is soft and warm, and dogs like to rest near where their owners sit, so it is a comfortable and familiar place for a nap."
    } else {
        "A brown dog lies stretched out on a blue couch in a bright living room, its head resting on a cushion near the armrest."
    }
}

async fn serve(delay: Duration) {
    let app = Router::new().route(
        "/v1/chat/completions",
        post(move |body: Bytes| async move {
            tokio::time::sleep(delay).await;
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let system = v["messages"][0]["content"].as_str().unwrap_or("");
            let out = serde_json::json!({
                "id": "bench", "object": "chat.completion", "model": "bench",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply_for(system)}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 900, "completion_tokens": 120, "total_tokens": 1020}
            });
            ([(axum::http::header::CONTENT_TYPE, "application/json")], out.to_string())
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let port = listener.local_addr().expect("local addr").port();
    println!("{port}");
    std::io::stdout().flush().ok();
    // Stop when the parent closes our stdin.
    tokio::spawn(async {
        let _ = tokio::task::spawn_blocking(|| {
            let mut s = String::new();
            let _ = std::io::stdin().read_line(&mut s);
        })
        .await;
        std::process::exit(0);
    });
    axum::serve(listener, app).await.expect("serve");
}

fn cpu_seconds() -> f64 {
    // utime and stime are fields 14 and 15, in clock ticks (100 Hz on Linux).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // after ")" the first field is field 3 (state), so field 14 is index 11
    (ticks(11) + ticks(12)) / 100.0
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("serve") {
        let delay = Duration::from_millis(args.get(2).and_then(|v| v.parse().ok()).unwrap_or(200));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(serve(delay));
        return;
    }
    let requests: usize = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(3840);
    let concurrency: usize = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(64);
    let delay_ms: u64 = args.get(3).and_then(|v| v.parse().ok()).unwrap_or(200);

    let mut server = Command::new(std::env::current_exe().expect("own path"))
        .args(["serve", &delay_ms.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the server");
    let mut line = String::new();
    std::io::BufReader::new(server.stdout.take().expect("server stdout"))
        .read_line(&mut line)
        .expect("port");
    let port: u16 = line.trim().parse().expect("server port");

    let types = vec![
        InstructType::Conversation,
        InstructType::Detail,
        InstructType::Complex,
    ];
    let images = requests.div_ceil(types.len());
    let entries: Vec<ImageEntry> = (0..images)
        .map(|i| ImageEntry {
            id: format!("{i:012}"),
            image: format!("{i:012}.jpg"),
            width: 640.0,
            height: 480.0,
            captions: (0..5)
                .map(|k| format!("Caption {k} of image {i}: a dog lying on a blue couch."))
                .collect(),
            boxes: (0..8)
                .map(|k| BoxAnnotation {
                    category: "dog".into(),
                    bbox: [10.0 * k as f64, 20.0, 100.0 + k as f64, 200.0],
                })
                .collect(),
        })
        .collect();
    let pairs = images * types.len();
    let dir = std::env::temp_dir().join(format!("llava-instruct-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut cfg = RunConfig::new(types, &dir);
    cfg.max_pending = concurrency * 2;
    let mut client = ClientConfig::new(format!("http://127.0.0.1:{port}/v1"), "bench");
    client.concurrency = concurrency;
    client.timeout = Duration::from_secs(30);

    let lib = PromptLibrary::builtin().expect("prompts");
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let summary = run_blocking(entries, lib, Some(client), &cfg).expect("run");
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    drop(server.stdin.take());
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);

    assert_eq!(
        summary.written_total(),
        pairs,
        "every request must produce a record: {summary:?}"
    );
    let throughput = pairs as f64 / wall;
    let ideal = concurrency as f64 / (delay_ms as f64 / 1000.0);
    println!("requests            {pairs}");
    println!("concurrency         {concurrency}");
    println!("server delay        {delay_ms} ms");
    println!("wall time           {wall:.3} s");
    println!("throughput          {throughput:.1} req/s");
    println!("ideal               {ideal:.1} req/s");
    println!("efficiency          {:.1} %", 100.0 * throughput / ideal);
    println!(
        "client CPU          {cpu:.2} s  ({:.3} ms per request)",
        1000.0 * cpu / pairs as f64
    );
}
