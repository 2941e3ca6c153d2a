//! `llava eval judge` and `llava eval summarize` end to end, with `llava teacher serve` as the
//! judge: a small shapes world written as COCO, questions with known answers, model answers
//! right for half the images and wrong for the other half, a judge endpoint that refuses every
//! third request with 429, a resumed rerun, `--rejudge-failed`, and the summary recomputed by
//! hand from the reviews file.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use llava_demo::words::article;
use llava_demo::world::scene::{COLOURS, SHAPES};
use llava_demo::world::{self, Scene, WorldConfig, WorldPaths};
use serde_json::{Value, json};

const TEST_SCENES: usize = 12;

fn llava() -> Command {
    Command::new(env!("CARGO_BIN_EXE_llava"))
}

/// `llava teacher serve`, killed when dropped (also when the test panics).
struct TeacherProcess {
    child: Child,
    api_base: String,
}

impl TeacherProcess {
    fn start(fail_every: u32) -> TeacherProcess {
        let mut child = llava()
            .args(["teacher", "serve", "--port", "0", "--fail-every"])
            .arg(fail_every.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("llava teacher serve starts");
        let stderr = child.stderr.take().expect("piped stderr");
        // From here on the guard owns the child: a panic below still kills it.
        let mut guard = TeacherProcess {
            child,
            api_base: String::new(),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        // Read the announcement, then keep draining stderr so the server never blocks on it.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("--api-base ").nth(1)
                    && let Some(tx) = tx.take()
                {
                    let base = rest.split_whitespace().next().unwrap_or("").to_string();
                    let _ = tx.send(base);
                }
            }
        });
        guard.api_base = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the teacher announces its --api-base on stderr");
        assert!(
            guard.api_base.starts_with("http://127.0.0.1:") && guard.api_base.ends_with("/v1"),
            "{}",
            guard.api_base
        );
        guard
    }
}

impl Drop for TeacherProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_jsonl(path: &Path, lines: &[Value]) {
    let mut s = String::new();
    for l in lines {
        s.push_str(&l.to_string());
        s.push('\n');
    }
    std::fs::write(path, s).unwrap();
}

/// A colour and shape that is not in the scene.
fn absent(scene: &Scene) -> String {
    COLOURS
        .iter()
        .flat_map(|(c, _)| SHAPES.iter().map(move |s| format!("{c} {s}")))
        .find(|name| scene.objects.iter().all(|o| o.name() != *name))
        .expect("a scene never holds every colour and shape")
}

fn count_answer(n: usize) -> String {
    if n == 1 {
        "There is 1 shape in the image.".into()
    } else {
        format!("There are {n} shapes in the image.")
    }
}

/// "The A is to the left of the B." for each neighbouring pair, left to right (`swap`: each
/// pair the wrong way round).
fn order_answer(scene: &Scene, swap: bool) -> String {
    let names: Vec<String> = scene.objects.iter().map(|o| o.name()).collect();
    if let [only] = names.as_slice() {
        return format!("There is only {} {only}.", article(only));
    }
    names
        .windows(2)
        .map(|w| {
            let (a, b) = if swap { (&w[1], &w[0]) } else { (&w[0], &w[1]) };
            format!("The {a} is to the left of the {b}.")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The benchmark files, and for each question id whether the model's answer is right.
struct Bench {
    questions: PathBuf,
    context: PathBuf,
    reference: PathBuf,
    answers: PathBuf,
    right: HashMap<String, bool>,
}

fn write_bench(dir: &Path) -> Bench {
    let config = WorldConfig {
        seed: 11,
        image_size: 64,
        train: 0,
        val: 0,
        test: TEST_SCENES,
    };
    let paths = WorldPaths::new(dir.join("world"));
    world::write_world(&config, &paths).expect("the world is written");
    let scenes = world::read_scenes(&paths.scenes("test")).unwrap();
    assert_eq!(scenes.len(), TEST_SCENES);
    assert!(
        scenes.iter().any(|s| s.objects.len() >= 2),
        "some scene has two objects to order"
    );

    // The context, from the COCO files as any COCO-style benchmark would have it.
    let caps = llava_data::coco::read_captions(paths.captions("test")).unwrap();
    let inst = llava_data::coco::read_instances(paths.instances("test")).unwrap();
    let joined = llava_data::coco::join(Some(&caps), Some(&inst)).unwrap();
    assert_eq!(joined.len(), TEST_SCENES);
    let context: Vec<Value> = joined
        .iter()
        .map(|a| {
            let instances: Vec<Value> = a
                .objects
                .iter()
                .map(|o| json!({"category": o.category, "bbox": o.bbox}))
                .collect();
            json!({"image": a.image.file_name, "width": a.image.width,
                   "height": a.image.height, "captions": a.captions, "instances": instances})
        })
        .collect();

    let (mut questions, mut references, mut answers) = (Vec::new(), Vec::new(), Vec::new());
    let mut right = HashMap::new();
    for (i, scene) in scenes.iter().enumerate() {
        let good = i % 2 == 0;
        let n = scene.objects.len();
        // Wrong answers: a wrong count, and the order swapped or an object that is not there.
        let wrong_order = if n >= 2 && i % 4 == 1 {
            order_answer(scene, true)
        } else {
            let a = absent(scene);
            format!("There is only {} {a}.", article(&a))
        };
        let cases = [
            (
                "count",
                "conv",
                "How many shapes are in the image?",
                count_answer(n),
                count_answer(n + 1),
            ),
            (
                "order",
                "detail",
                "Which shapes are there, and how are they ordered from left to right?",
                order_answer(scene, false),
                wrong_order,
            ),
        ];
        for (kind, category, text, reference, wrong) in cases {
            let id = format!("{}_{kind}", scene.id);
            questions.push(json!({"question_id": id, "image": scene.file_name,
                                  "text": text, "category": category}));
            references.push(json!({"question_id": id, "text": reference, "model_id": "truth"}));
            let answer = if good { reference.clone() } else { wrong };
            answers.push(json!({"question_id": id, "prompt": text, "text": answer,
                                "answer_id": format!("a{id}"), "model_id": "tiny", "metadata": {}}));
            right.insert(id, good);
        }
    }
    let bench = Bench {
        questions: dir.join("questions.jsonl"),
        context: dir.join("context.jsonl"),
        reference: dir.join("reference.jsonl"),
        answers: dir.join("answers.jsonl"),
        right,
    };
    write_jsonl(&bench.questions, &questions);
    write_jsonl(&bench.context, &context);
    write_jsonl(&bench.reference, &references);
    write_jsonl(&bench.answers, &answers);
    bench
}

fn judge(bench: &Bench, api_base: &str, out: &Path, extra: &[&str]) -> Output {
    let out = llava()
        .args(["eval", "judge", "--questions"])
        .arg(&bench.questions)
        .arg("--context")
        .arg(&bench.context)
        .arg("--reference")
        .arg(&bench.reference)
        .arg("--answers")
        .arg(&bench.answers)
        .args(["--api-base", api_base, "--model", "teacher", "--out"])
        .arg(out)
        .args(["--concurrency", "4", "--timeout", "30"])
        .args(extra)
        // The client logs each retry at debug level.
        .env("RUST_LOG", "warn,llava_instruct=debug")
        .env_remove("OPENAI_API_KEY")
        .output()
        .expect("llava eval judge runs");
    assert!(
        out.status.success(),
        "judge failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn summarize_json(reviews: &Path) -> Value {
    let out = llava()
        .args(["eval", "summarize"])
        .arg(reviews)
        .arg("--json")
        .output()
        .expect("llava eval summarize runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

/// The reviews file's lines as JSON.
fn review_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.ends_with('\n'), "torn last line");
    text.lines()
        .map(|l| serde_json::from_str(l).expect("each line is a JSON review"))
        .collect()
}

fn tuple(r: &Value) -> [f64; 2] {
    let t = r["tuple"].as_array().expect("tuple");
    assert_eq!(t.len(), 2);
    [t[0].as_f64().unwrap(), t[1].as_f64().unwrap()]
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

fn close(json: &Value, want: f64, what: &str) {
    let got = json
        .as_f64()
        .unwrap_or_else(|| panic!("{what}: not a number: {json}"));
    assert!((got - want).abs() < 1e-9, "{what}: {got} != {want}");
}

/// Checks one summary row against the reviews it covers.
fn check_row(row: &Value, reviews: &[&Value], what: &str) {
    let parsed: Vec<[f64; 2]> = reviews
        .iter()
        .map(|r| tuple(r))
        .filter(|t| t[0] >= 0.0 && t[1] >= 0.0)
        .collect();
    assert_eq!(row["count"], reviews.len(), "{what}: count");
    assert_eq!(row["parsed"], parsed.len(), "{what}: parsed");
    assert_eq!(
        row["failed"],
        reviews.len() - parsed.len(),
        "{what}: failed"
    );
    let reference = mean(&parsed.iter().map(|t| t[0]).collect::<Vec<_>>());
    let model = mean(&parsed.iter().map(|t| t[1]).collect::<Vec<_>>());
    close(&row["reference_mean"], reference, what);
    close(&row["model_mean"], model, what);
    close(&row["relative"], model / reference * 100.0, what);
}

#[test]
fn judge_with_the_offline_teacher_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let bench = write_bench(dir.path());
    let teacher = TeacherProcess::start(3);
    let reviews = dir.path().join("reviews.jsonl");

    // 1. Judge everything, through the 429s.
    let first = judge(&bench, &teacher.api_base, &reviews, &[]);
    let stderr = String::from_utf8_lossy(&first.stderr);
    let n = bench.right.len();
    assert_eq!(n, 2 * TEST_SCENES);
    assert!(
        stderr.contains(&format!(
            "{n} questions: {n} judged now (0 without readable scores)"
        )),
        "{stderr}"
    );
    // Every third request was refused, yet every question was judged: the refusals were
    // retried, and the client says so.
    assert!(stderr.contains("retrying chat request"), "{stderr}");
    assert!(stderr.contains("HTTP 429"), "{stderr}");
    assert!(!stderr.contains("failed at the endpoint"), "{stderr}");

    // One review per question, every score read.
    let lines = review_lines(&reviews);
    assert_eq!(lines.len(), n);
    let ids: HashSet<String> = lines
        .iter()
        .map(|r| r["question_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, bench.right.keys().cloned().collect::<HashSet<_>>());
    for r in &lines {
        let t = tuple(r);
        assert!(
            t.iter().all(|v| (1.0..=10.0).contains(v)),
            "unparsed or out of range: {r}"
        );
    }

    // Right answers (the reference itself) score as the reference; wrong ones score lower.
    let (mut right, mut wrong) = (Vec::new(), Vec::new());
    for r in &lines {
        let t = tuple(r);
        if bench.right[r["question_id"].as_str().unwrap()] {
            assert_eq!(t[0], t[1], "a right answer scores as its reference: {r}");
            right.push(t[1]);
        } else {
            wrong.push(t[1]);
        }
    }
    assert_eq!((right.len(), wrong.len()), (n / 2, n / 2));
    assert!(
        mean(&right) > mean(&wrong) + 2.0,
        "right {right:?} vs wrong {wrong:?}"
    );
    // Each wrong answer (count, order or object) is caught: it scores below its reference.
    for r in &lines {
        if !bench.right[r["question_id"].as_str().unwrap()] {
            assert!(tuple(r)[1] < tuple(r)[0], "{r}");
        }
    }

    // 2. The summary, recomputed by hand from the file.
    let summary = summarize_json(&reviews);
    let mut by_category: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for r in &lines {
        by_category
            .entry(r["category"].as_str().unwrap().to_string())
            .or_default()
            .push(r);
    }
    assert_eq!(
        by_category.keys().collect::<Vec<_>>(),
        vec!["conv", "detail"]
    );
    let cats = summary["categories"].as_object().expect("categories");
    assert_eq!(cats.len(), by_category.len());
    for (cat, rs) in &by_category {
        check_row(&summary["categories"][cat], rs, cat);
    }
    check_row(
        &summary["overall"],
        &lines.iter().collect::<Vec<_>>(),
        "overall",
    );
    assert!(summary["overall"]["relative"].as_f64().unwrap() < 100.0);

    // 3. A rerun resumes: nothing new is asked or written.
    let before = std::fs::read(&reviews).unwrap();
    let again = judge(&bench, &teacher.api_base, &reviews, &[]);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stderr.contains(&format!(
            "{n} questions: 0 judged now (0 without readable scores), {n} already done"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("retrying chat request"), "{stderr}");
    assert_eq!(std::fs::read(&reviews).unwrap(), before);

    // 4. A review recorded as failed stays failed on a plain rerun and is asked again with
    //    --rejudge-failed; the new review is appended and wins.
    let mut text = String::from_utf8(before.clone()).unwrap();
    let first_line = text.lines().next().unwrap().to_string();
    let mut failed: Value = serde_json::from_str(&first_line).unwrap();
    let failed_id = failed["question_id"].as_str().unwrap().to_string();
    failed["tuple"] = json!([-1.0, -1.0]);
    failed["content"] = json!("no scores here");
    text = text.replacen(&first_line, &failed.to_string(), 1);
    std::fs::write(&reviews, &text).unwrap();
    assert_eq!(summarize_json(&reviews)["overall"]["failed"], 1);

    let plain = judge(&bench, &teacher.api_base, &reviews, &[]);
    let stderr = String::from_utf8_lossy(&plain.stderr);
    assert!(stderr.contains("0 judged now"), "{stderr}");
    assert!(stderr.contains("--rejudge-failed"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&reviews).unwrap(), text);

    let re = judge(&bench, &teacher.api_base, &reviews, &["--rejudge-failed"]);
    let stderr = String::from_utf8_lossy(&re.stderr);
    assert!(
        stderr.contains(&format!(
            "{n} questions: 1 judged now (0 without readable scores), {} already done",
            n - 1
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("1 earlier failures asked again"),
        "{stderr}"
    );
    let after = review_lines(&reviews);
    assert_eq!(after.len(), n + 1, "appended, not rewritten");
    assert_eq!(after[0]["tuple"], json!([-1.0, -1.0]));
    let last = after.last().unwrap();
    assert_eq!(last["question_id"].as_str().unwrap(), failed_id);
    assert_eq!(
        tuple(last),
        tuple(&serde_json::from_str(&first_line).unwrap())
    );
    // The file reads as before the failure: the same summary.
    assert_eq!(summarize_json(&reviews), summary);

    drop(teacher);
}
