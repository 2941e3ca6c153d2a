//! The offline teacher against the shapes world's ground truth.
//!
//! Requests are built exactly as `llava instruct` and `llava eval judge` build them (their
//! own public functions, not copies), the teacher answers from the text alone, and the test
//! compares what it says with the scenes it was never shown.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::time::Duration;

use llava_demo::teacher::claims::{self, Claim};
use llava_demo::teacher::knowledge::{Knowledge, SceneObject};
use llava_demo::teacher::{ServerConfig, TeacherServer, respond};
use llava_demo::words::NUMBER_WORDS;
use llava_demo::world::scene::{COLOURS, SHAPES};
use llava_demo::world::{Scene, WorldConfig, WorldPaths, sample_split, write_world};
use llava_instruct::client::Role;
use llava_instruct::context::format_context;
use llava_instruct::parse::{build_record, parse_qa};
use llava_instruct::pipeline::messages_for;
use llava_instruct::source::{BoxAnnotation, ImageEntry, coco_record_id};
use llava_instruct::{ChatClient, ChatRequest, ClientConfig, InstructType, PromptLibrary};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SCENES: usize = 300;

fn scenes() -> Vec<(Scene, Vec<String>)> {
    let cfg = WorldConfig {
        seed: 11,
        image_size: 64,
        train: SCENES,
        val: 0,
        test: 0,
    };
    sample_split(&cfg, "train")
}

/// The image as `llava instruct` loads it from the world's COCO files (checked against the
/// real loader in `entries_match_the_coco_loader`).
fn entry(s: &Scene, caps: &[String]) -> ImageEntry {
    ImageEntry {
        id: coco_record_id(s.id),
        image: s.file_name.clone(),
        width: f64::from(s.width),
        height: f64::from(s.height),
        captions: caps.to_vec(),
        boxes: s
            .objects
            .iter()
            .map(|o| BoxAnnotation {
                category: o.shape.clone(),
                bbox: o.bbox().map(f64::from),
            })
            .collect(),
    }
}

/// The ground truth in the teacher's terms, to check its statements with.
fn truth(s: &Scene) -> Knowledge {
    let (w, h) = (f64::from(s.width), f64::from(s.height));
    Knowledge {
        objects: s
            .objects
            .iter()
            .map(|o| {
                let [x, y, bw, bh] = o.bbox().map(f64::from);
                SceneObject {
                    colour: o.colour.clone(),
                    shape: o.shape.clone(),
                    size: Some(o.size),
                    bbox: Some([x / w, y / h, (x + bw) / w, (y + bh) / h]),
                }
            })
            .collect(),
        ordered: true,
        background: Some(s.background.clone()),
        ..Knowledge::default()
    }
}

/// The system text and last user message of a request, as the server reads them.
fn split(messages: &[llava_instruct::ChatMessage]) -> (String, String) {
    let system = messages
        .iter()
        .filter(|m| m.role == Role::System)
        .map(|m| m.content.clone())
        .collect::<Vec<_>>()
        .join("\n\n");
    let user = messages
        .iter()
        .rev()
        .find(|m| m.role == Role::User)
        .map(|m| m.content.clone())
        .unwrap_or_default();
    (system, user)
}

fn ask(entry: &ImageEntry, ty: InstructType, lib: &PromptLibrary) -> (String, String) {
    let messages = messages_for(entry, ty, lib).expect("teacher type");
    let (system, user) = split(&messages);
    let reply = respond(&system, &user);
    (user, reply)
}

#[test]
fn entries_match_the_coco_loader() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = WorldConfig {
        seed: 3,
        image_size: 64,
        train: 12,
        val: 1,
        test: 1,
    };
    let paths = WorldPaths::new(dir.path());
    write_world(&cfg, &paths).unwrap();
    let loaded = paths.coco("train").load().unwrap();
    let ours: Vec<ImageEntry> = sample_split(&cfg, "train")
        .iter()
        .map(|(s, c)| entry(s, c))
        .collect();
    assert_eq!(loaded.len(), ours.len());
    for (a, b) in loaded.iter().zip(&ours) {
        assert_eq!(format_context(a, true), format_context(b, true));
    }
}

#[test]
fn knowledge_equals_ground_truth() {
    let lib = PromptLibrary::builtin().unwrap();
    let mut backgrounds = 0;
    for (s, caps) in scenes() {
        let e = entry(&s, &caps);
        for ty in [InstructType::Conversation, InstructType::Detail] {
            let messages = messages_for(&e, ty, &lib).unwrap();
            let (_, user) = split(&messages);
            let k = Knowledge::from_context(&user);
            let names: Vec<String> = k.objects.iter().map(SceneObject::name).collect();
            let want: Vec<String> = s.objects.iter().map(|o| o.name()).collect();
            assert_eq!(names, want, "{user}");
            assert!(k.ordered, "{user}");
            assert_eq!(k.count(), s.objects.len());
            for (got, o) in k.objects.iter().zip(&s.objects) {
                if let Some(size) = got.size {
                    assert_eq!(size, o.size, "{user}");
                }
            }
            if let Some(bg) = &k.background {
                assert_eq!(*bg, s.background, "{user}");
            }
            assert!(k.conflicts().is_empty(), "{:?}\n{user}", k.conflicts());
            if ty == InstructType::Detail {
                assert!(k.all_boxed(), "{user}");
                let t = truth(&s);
                for (got, want) in k.objects.iter().zip(&t.objects) {
                    assert_eq!(got.size, want.size, "size from the box: {user}");
                    let (a, b) = (got.centre().unwrap(), want.centre().unwrap());
                    assert!(
                        (a.0 - b.0).abs() < 0.01 && (a.1 - b.1).abs() < 0.01,
                        "{user}"
                    );
                }
            } else {
                assert!(!k.has_boxes);
            }
        }
        backgrounds += usize::from(
            Knowledge::from_context(&caps.join("\n"))
                .background
                .is_some(),
        );
    }
    // The background is said in most, not all, caption sets.
    assert!(backgrounds > SCENES / 2, "{backgrounds}");
}

#[test]
fn knowledge_does_not_depend_on_box_order() {
    let lib = PromptLibrary::builtin().unwrap();
    for (s, caps) in scenes().into_iter().take(60) {
        let mut e = entry(&s, &caps);
        e.boxes.reverse();
        let (_, user) = split(&messages_for(&e, InstructType::Complex, &lib).unwrap());
        let k = Knowledge::from_context(&user);
        let t = truth(&s);
        for (got, want) in k.objects.iter().zip(&t.objects) {
            let (a, b) = (got.centre().unwrap(), want.centre().unwrap());
            assert!(
                (a.0 - b.0).abs() < 0.01 && (a.1 - b.1).abs() < 0.01,
                "{user}"
            );
        }
    }
}

/// Every checkable statement of `text` holds in the scene; returns how many were checked.
fn all_true(text: &str, s: &Scene, what: &str) -> usize {
    let t = truth(s);
    let mut n = 0;
    for c in claims::extract(text) {
        let ok = c.check(&t);
        assert_ne!(
            ok,
            Some(false),
            "{what}: false claim `{}` in:\n{text}",
            c.describe()
        );
        n += usize::from(ok.is_some());
    }
    n
}

/// The `colour shape` asked about in a question, if any.
fn asked_object(q: &str) -> Option<(String, String)> {
    let lower = q.to_lowercase();
    for (c, _) in COLOURS {
        for s in SHAPES {
            if lower.contains(&format!("{c} {s}")) {
                return Some((c.to_string(), s.to_string()));
            }
        }
    }
    None
}

#[test]
fn conversations_parse_and_are_true() {
    let lib = PromptLibrary::builtin().unwrap();
    let mut questions = HashSet::new();
    let mut checked = 0;
    let mut counted = 0;
    let mut yes_no = [0usize; 2];
    for (s, caps) in scenes() {
        let e = entry(&s, &caps);
        let (_, reply) = ask(&e, InstructType::Conversation, &lib);
        let mut rng = StdRng::seed_from_u64(s.id);
        let rec = build_record(InstructType::Conversation, &e, &reply, &lib, &mut rng);
        assert!(rec.is_ok(), "{rec:?}\n{reply}");
        let pairs = parse_qa(&reply).unwrap();
        assert!((3..=5).contains(&pairs.len()), "{reply}");
        for (q, a) in &pairs {
            questions.insert(q.clone());
            checked += all_true(a, &s, "conversation");
            if q.starts_with("How many") || q.starts_with("Can you count") {
                let n = s.objects.len();
                let said = format!("{} shape", NUMBER_WORDS[n]);
                assert!(a.contains(&said), "count {n}: {a}");
                counted += 1;
            }
            if (q.starts_with("Is there") || q.starts_with("Can you see") || q.starts_with("Does"))
                && let Some((c, sh)) = asked_object(q)
            {
                let there = s.objects.iter().any(|o| o.colour == c && o.shape == sh);
                assert_eq!(a.starts_with("Yes"), there, "{q} {a}");
                assert_eq!(a.starts_with("No"), !there, "{q} {a}");
                yes_no[usize::from(there)] += 1;
            }
        }
    }
    assert!(
        checked > 2 * SCENES,
        "too few checkable statements: {checked}"
    );
    assert!(counted > SCENES / 5, "{counted}");
    assert!(yes_no[0] > 30 && yes_no[1] > 30, "{yes_no:?}");
    assert!(
        questions.len() > 100,
        "varied questions: {}",
        questions.len()
    );
}

#[test]
fn details_parse_and_are_true() {
    let lib = PromptLibrary::builtin().unwrap();
    let mut checked = 0;
    let mut relations = 0;
    for (s, caps) in scenes() {
        let e = entry(&s, &caps);
        let (_, reply) = ask(&e, InstructType::Detail, &lib);
        let mut rng = StdRng::seed_from_u64(s.id);
        assert!(
            build_record(InstructType::Detail, &e, &reply, &lib, &mut rng).is_ok(),
            "{reply}"
        );
        assert!(!reply.contains('\n'), "one paragraph: {reply}");
        checked += all_true(&reply, &s, "detail");
        relations += claims::extract(&reply)
            .iter()
            .filter(|c| matches!(c, Claim::Extreme { .. }))
            .count();
        // every object, left to right, and the count
        let mut from = 0;
        for o in &s.objects {
            let at = reply[from..].find(&o.name());
            assert!(
                at.is_some(),
                "{} missing or out of order: {reply}",
                o.name()
            );
            from += at.unwrap_or(0) + 1;
        }
        let n = s.objects.len();
        if n > 1 {
            assert!(reply.contains(&format!("{} ", NUMBER_WORDS[n])), "{reply}");
        }
        // where things sit comes from the boxes, in words
        let placed = ["upper", "lower", "halfway down", "in the middle", "centre"];
        assert!(placed.iter().any(|p| reply.contains(p)), "{reply}");
    }
    assert!(checked > 2 * SCENES, "{checked}");
    assert!(relations > SCENES / 2, "{relations}");
}

#[test]
fn complex_replies_parse_and_reason_correctly() {
    let lib = PromptLibrary::builtin().unwrap();
    let mut kinds = HashSet::new();
    for (s, caps) in scenes() {
        let e = entry(&s, &caps);
        let (_, reply) = ask(&e, InstructType::Complex, &lib);
        let mut rng = StdRng::seed_from_u64(s.id);
        assert!(
            build_record(InstructType::Complex, &e, &reply, &lib, &mut rng).is_ok(),
            "{reply}"
        );
        let pairs = parse_qa(&reply).unwrap();
        assert_eq!(pairs.len(), 1, "{reply}");
        let (q, a) = &pairs[0];
        all_true(a, &s, "complex");
        let t = truth(&s);
        if q.contains("would be left") || q.contains("would remain") {
            let shape = SHAPES.iter().find(|sh| q.contains(*sh)).unwrap();
            let left = s.objects.iter().filter(|o| o.shape != *shape).count();
            let first = a.split('.').next().unwrap().to_lowercase();
            let want = if left == 0 {
                "none".to_string()
            } else {
                NUMBER_WORDS[left].to_string()
            };
            assert!(first.starts_with(&want), "{left} left: {q} {a}");
            kinds.insert("remove");
        } else if q.contains("most often") || q.contains("most common") {
            let colour = a.split(' ').next().unwrap().to_lowercase();
            let n = |c: &str| s.objects.iter().filter(|o| o.colour == c).count();
            assert!(
                COLOURS
                    .iter()
                    .all(|(c, _)| *c == colour || n(c) < n(&colour)),
                "{q} {a}"
            );
            kinds.insert("colour");
        } else if q.contains("highest") || q.contains("lowest") {
            let y = |o: &SceneObject| o.centre().unwrap().1;
            let best = if q.contains("highest") {
                t.objects.iter().min_by(|a, b| y(a).total_cmp(&y(b)))
            } else {
                t.objects.iter().max_by(|a, b| y(a).total_cmp(&y(b)))
            };
            assert!(
                a.starts_with(&format!("The {}", best.unwrap().name())),
                "{q} {a}"
            );
            kinds.insert("height");
        } else if q.contains("between") {
            let names: Vec<String> = s.objects.iter().map(|o| o.name()).collect();
            let pos = |n: &String| q.find(n.as_str());
            let ends: Vec<usize> = (0..names.len())
                .filter(|i| pos(&names[*i]).is_some())
                .collect();
            assert_eq!(ends.len(), 2, "{q}");
            let first = a.split(" between").next().unwrap();
            for (i, name) in names.iter().enumerate() {
                let inside = i > ends[0] && i < ends[1];
                assert_eq!(first.contains(name.as_str()), inside, "{name}: {q} {a}");
            }
            kinds.insert("between");
        } else if q.contains("most space") {
            let area = |o: &SceneObject| o.area().unwrap();
            let best = t.objects.iter().max_by(|a, b| area(a).total_cmp(&area(b)));
            assert!(
                a.starts_with(&format!("The {}", best.unwrap().name())),
                "{q} {a}"
            );
            kinds.insert("size");
        } else if q.contains("closest") {
            kinds.insert("closest");
        } else if q.contains("missing") || q.contains("at least one") {
            for sh in SHAPES {
                let there = s.objects.iter().any(|o| o.shape == sh);
                let first = a.split('.').take(2).collect::<String>();
                if !there {
                    assert!(first.contains(&format!("{sh}s")), "{sh}: {q} {a}");
                }
            }
            kinds.insert("missing");
        }
    }
    assert!(kinds.len() >= 6, "{kinds:?}");
}

/// Contexts a real teacher might be sent that the world never writes: lines dropped, words
/// shuffled, junk added. The replies may know less, but they must still parse.
#[test]
fn scrambled_contexts_still_get_well_formed_replies() {
    use rand::seq::SliceRandom;
    let lib = PromptLibrary::builtin().unwrap();
    let mut rng = StdRng::seed_from_u64(99);
    for (s, caps) in scenes().into_iter().take(100) {
        let mut e = entry(&s, &caps);
        let mut words: Vec<String> = caps.join(" ").split(' ').map(String::from).collect();
        words.shuffle(&mut rng);
        e.captions = vec![
            words.join(" "),
            caps[0].clone(),
            "[0.1, 0.2] on a caption background".into(),
        ];
        e.captions.truncate(rng.random_range(1..=3));
        if rng.random_bool(0.3) {
            e.boxes.pop();
        }
        for ty in InstructType::TEACHER {
            let (user, reply) = ask(&e, ty, &lib);
            let mut r = StdRng::seed_from_u64(1);
            let rec = build_record(ty, &e, &reply, &lib, &mut r);
            assert!(rec.is_ok(), "{rec:?}\n{user}\n---\n{reply}");
        }
    }
}

#[test]
fn same_request_same_reply() {
    let lib = PromptLibrary::builtin().unwrap();
    let (s, caps) = &scenes()[0];
    let e = entry(s, caps);
    for ty in InstructType::TEACHER {
        assert_eq!(ask(&e, ty, &lib).1, ask(&e, ty, &lib).1);
    }
}

/// A correct and a wrong answer about a scene.
fn answers(s: &Scene) -> (String, String) {
    let n = s.objects.len();
    let list: Vec<String> = s
        .objects
        .iter()
        .map(|o| format!("a {}", o.name()))
        .collect();
    let right = format!(
        "There are {} shapes. From left to right: {}.",
        NUMBER_WORDS[n],
        list.join(", ")
    );
    let absent = COLOURS
        .iter()
        .flat_map(|(c, _)| SHAPES.iter().map(move |sh| format!("{c} {sh}")))
        .find(|name| s.objects.iter().all(|o| o.name() != *name))
        .unwrap();
    let mut wrong = format!(
        "There are {} shapes, including a {absent}.",
        NUMBER_WORDS[n % 5 + 1]
    );
    if let [a, .., b] = s.objects.as_slice() {
        wrong.push_str(&format!(
            " The {} is to the left of the {}.",
            b.name(),
            a.name()
        ));
    }
    (right, wrong)
}

#[test]
fn judge_prefers_the_correct_answer_and_parses() {
    for (s, caps) in scenes().into_iter().take(80) {
        let e = entry(&s, &caps);
        let context = format_context(&e, true);
        let (right, wrong) = answers(&s);
        let m = llava_eval::judge::judge_messages(
            &context,
            "What is in the picture?",
            &right,
            &wrong,
            "conv",
        );
        let (system, user) = split(&m);
        let reply = respond(&system, &user);
        let [a, b] = llava_eval::parse_scores(&reply).expect("scores on the first line");
        assert_eq!(a, 10.0, "{reply}");
        assert!(
            b <= 5.0,
            "most of the wrong answer's statements are false: {reply}"
        );
        // order does not matter
        let m = llava_eval::judge::judge_messages(&context, "Q", &wrong, &right, "detail");
        let (system, user) = split(&m);
        let [a, b] = llava_eval::parse_scores(&respond(&system, &user)).unwrap();
        assert!(a < b);
    }
    // an answer with nothing to check gets the middling score
    let (s, caps) = &scenes()[0];
    let context = format_context(&entry(s, caps), true);
    let m =
        llava_eval::judge::judge_messages(&context, "Q", "It is pretty.", "I like it.", "complex");
    let (system, user) = split(&m);
    assert_eq!(
        llava_eval::parse_scores(&respond(&system, &user)),
        Some([5.0, 5.0])
    );
}

#[test]
fn judge_rates_teacher_references_fully() {
    let lib = PromptLibrary::builtin().unwrap();
    for (s, caps) in scenes().into_iter().take(60) {
        let e = entry(&s, &caps);
        let (_, detail) = ask(&e, InstructType::Detail, &lib);
        let (_, wrong) = answers(&s);
        let m = llava_eval::judge::judge_messages(
            &format_context(&e, true),
            "Describe it.",
            &detail,
            &wrong,
            "detail",
        );
        let (system, user) = split(&m);
        let reply = respond(&system, &user);
        let [a, b] = llava_eval::parse_scores(&reply).unwrap();
        assert_eq!(a, 10.0, "{reply}");
        assert!(b < a, "{reply}");
    }
}

/// A raw HTTP/1.1 exchange, to send what a well-behaved client never would.
fn raw(addr: std::net::SocketAddr, request: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn server_speaks_openai_and_rejects_bad_json() {
    let server = TeacherServer::start(&ServerConfig::default()).unwrap();
    let addr = server.addr();
    assert!(server.api_base().starts_with("http://127.0.0.1:"));
    let body = "{not json";
    let r = raw(
        addr,
        &format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    );
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert!(
        r.contains("\"invalid_request_error\"") && r.contains("\"error\""),
        "{r}"
    );
    let body = r#"{"messages": [{"role": "system", "content": "x"}]}"#;
    let r = raw(
        addr,
        &format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        ),
    );
    assert!(
        r.starts_with("HTTP/1.1 400") && r.contains("no user message"),
        "{r}"
    );
    let r = raw(
        addr,
        "GET /v1/models HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert!(
        r.starts_with("HTTP/1.1 200") && r.contains("llava-teacher"),
        "{r}"
    );
    let body = r#"{"model": "m", "messages": [{"role": "system", "content": "Write a conversation."},
                   {"role": "user", "content": "From left to right: a red circle and a blue star."}]}"#;
    let r = raw(
        addr,
        &format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        ),
    );
    let json: serde_json::Value =
        serde_json::from_str(r.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(json["object"], "chat.completion");
    assert_eq!(json["model"], "m");
    assert_eq!(json["choices"][0]["message"]["role"], "assistant");
    assert_eq!(json["choices"][0]["finish_reason"], "stop");
    assert!(
        json["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("Question:")
    );
    assert!(json["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    assert!(json["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(
        server
            .stats()
            .bad
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    server.stop().unwrap();
    assert!(std::net::TcpStream::connect(addr).is_err(), "stopped");
}

#[test]
fn round_trip_through_the_real_client_with_retries() {
    let server = TeacherServer::start(&ServerConfig {
        fail_every: Some(2),
        ..ServerConfig::default()
    })
    .unwrap();
    let lib = PromptLibrary::builtin().unwrap();
    let (s, caps) = &scenes()[1];
    let e = entry(s, caps);
    let mut cfg = ClientConfig::new(server.api_base(), "offline-teacher");
    cfg.backoff_base = Duration::from_millis(10);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let attempts: Vec<u32> = rt.block_on(async {
        let client = ChatClient::new(cfg).unwrap();
        let mut attempts = Vec::new();
        for ty in InstructType::TEACHER {
            let req = ChatRequest {
                messages: messages_for(&e, ty, &lib).unwrap(),
                temperature: Some(0.2),
                max_tokens: Some(1024),
            };
            let r = client.chat(&req).await.unwrap();
            assert_eq!(r.finish_reason.as_deref(), Some("stop"));
            assert_eq!(
                r.content,
                ask(&e, ty, &lib).1,
                "the server gives the library's reply"
            );
            let mut rng = StdRng::seed_from_u64(1);
            assert!(build_record(ty, &e, &r.content, &lib, &mut rng).is_ok());
            attempts.push(r.attempts);
        }
        attempts
    });
    // requests 1, 2 (refused), 3, 4 (refused), 5: the second and third chats retried once
    assert_eq!(attempts, vec![1, 2, 2]);
    assert_eq!(
        server
            .stats()
            .refused
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
}

#[test]
fn llava_instruct_runs_against_the_teacher() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = WorldConfig {
        seed: 5,
        image_size: 64,
        train: 10,
        val: 1,
        test: 1,
    };
    let paths = WorldPaths::new(dir.path().join("world"));
    write_world(&cfg, &paths).unwrap();
    let entries = paths.coco("train").load().unwrap();
    let server = TeacherServer::start(&ServerConfig {
        fail_every: Some(7),
        ..ServerConfig::default()
    })
    .unwrap();
    let mut client = ClientConfig::new(server.api_base(), "offline-teacher");
    client.backoff_base = Duration::from_millis(10);
    let run =
        llava_instruct::RunConfig::new(InstructType::TEACHER.to_vec(), dir.path().join("out"));
    let summary = llava_instruct::run_blocking(
        entries,
        PromptLibrary::builtin().unwrap(),
        Some(client),
        &run,
    )
    .unwrap();
    assert_eq!(summary.written_total(), 30, "{summary:?}");
    assert_eq!(summary.rejected_total(), 0, "{summary:?}");
    assert_eq!(summary.failed, 0);
    assert!(summary.retries >= 4, "{summary:?}");
    assert_eq!(summary.final_records, 30);
}
