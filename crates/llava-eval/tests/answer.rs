//! `answer_questions` on the tiny llava-hf fixture checkpoint: one answer per question, the
//! same text as the `llava generate` calls, the greedy tokens transformers computed, resume,
//! and counted skips for missing images.

use std::path::{Path, PathBuf};

use llava_data::image::ImageAspectRatio;
use llava_eval::QuestionId;
use llava_eval::answer::{AnswerConfig, answer_one, answer_questions};
use llava_eval::jsonl::read_answers;
use llava_model::generation::SamplingParams;
use llava_model::pipeline::{Pipeline, PipelineOptions};
use llava_model::prompt_cache::PromptCache;

/// A second question about the fixture's image, longer than the tokens a cached prompt always
/// runs again (`gemv::MAX_ROWS + 1`), so that its image span can come from the cache.
const FOLLOW_UP: &str = "How many animals are there, and what colour is each of them?";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models")
}

fn pipeline() -> Pipeline {
    let mut opts = PipelineOptions::new(fixtures().join("llava15-default/model").to_string_lossy());
    opts.image_aspect_ratio = Some(ImageAspectRatio::Square);
    Pipeline::load(&opts).unwrap()
}

/// What `tools/make_model_fixtures.py` recorded for the fixture.
fn expected() -> serde_json::Value {
    let path = fixtures().join("llava15-default/expected.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn greedy() -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        top_p: 1.0,
        top_k: 0,
        seed: 0,
    }
}

#[test]
fn answers_match_generate_and_resume() {
    let expected = expected();
    let question = expected["question"].as_str().unwrap();
    let image = expected["image"].as_str().unwrap();
    let p = pipeline();

    // The generate path on its own reproduces transformers' greedy tokens for this question.
    let prompt = p
        .render(&[llava_data::conversation::Message::user(question, 1)])
        .unwrap();
    assert_eq!(prompt, expected["prompt"].as_str().unwrap());
    let pixels = p
        .pixel_values(&[fixtures().join("images").join(image)])
        .unwrap();
    let ids = p.encode(&prompt, pixels.as_ref()).unwrap();
    let direct = p
        .generate(&ids, pixels.as_ref(), &greedy(), 20, &[], |_| {})
        .unwrap();
    let hf: Vec<u32> = serde_json::from_value(expected["generate_tokens"].clone()).unwrap();
    assert_eq!(direct.token_ids, hf);

    let dir = tempfile::tempdir().unwrap();
    let qpath = dir.path().join("q.jsonl");
    let lines = [
        serde_json::json!({"question_id": 1, "image": image, "text": question, "category": "conv"}),
        serde_json::json!({"question_id": 2, "image": "missing.png", "text": question, "category": "conv"}),
        serde_json::json!({"question_id": 3, "image": "", "text": "Write a short sentence about a red ball.", "category": "detail"}),
        serde_json::json!({"question_id": 4, "image": image, "text": format!("<image>\n{question}"), "category": "conv"}),
        // The same image again: its prompt's beginning, image included, comes from the cache.
        serde_json::json!({"question_id": 5, "image": image, "text": FOLLOW_UP, "category": "conv"}),
    ];
    std::fs::write(
        &qpath,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
    let cfg = AnswerConfig {
        questions: qpath,
        image_folder: fixtures().join("images"),
        out: dir.path().join("answers.jsonl"),
        model_id: "tiny".into(),
        sampling: greedy(),
        max_new_tokens: 20,
        stop: Vec::new(),
        limit: None,
        batch_size: 1,
    };
    let mut calls = Vec::new();
    let report = answer_questions(&p, &cfg, |d, t| calls.push((d, t))).unwrap();
    assert_eq!(report.questions, 5);
    assert_eq!(report.answered, 4);
    assert_eq!(report.missing_image, 1);
    assert_eq!(report.failed, 0);
    assert_eq!(calls.last(), Some(&(5, 5)));
    // Only question 5 can reuse more than the template's first few tokens: question 4's opening
    // and its image span (25 tokens, kept only whole).
    assert!(report.reused_tokens > 25, "{report:?}");

    let answers = read_answers(&cfg.out).unwrap();
    assert_eq!(answers.len(), 4);
    let a1 = &answers[&QuestionId::Int(1)];
    assert_eq!(a1.text, direct.text);
    assert_eq!(a1.prompt, question);
    assert_eq!(a1.model_id.as_deref(), Some("tiny"));
    // A literal <image> in the question gives the same answer as none.
    assert_eq!(answers[&QuestionId::Int(4)].text, direct.text);
    // Text-only: same as the generate calls without an image.
    let fresh = |text: &str, images: &[PathBuf]| {
        let (_, out) = answer_one(
            &p,
            &mut PromptCache::new(),
            text,
            images,
            &greedy(),
            20,
            &[],
        )
        .unwrap();
        assert_eq!(out.stats.cached_tokens, 0);
        out.text
    };
    assert_eq!(
        answers[&QuestionId::Int(3)].text,
        fresh("Write a short sentence about a red ball.", &[])
    );
    // The cached answer is the one a fresh run gives.
    let image_path = fixtures().join("images").join(image);
    assert_eq!(
        answers[&QuestionId::Int(5)].text,
        fresh(FOLLOW_UP, &[image_path])
    );

    // Resume: nothing new is answered; the missing image is tried again and still skipped.
    let again = answer_questions(&p, &cfg, |_, _| {}).unwrap();
    assert_eq!(again.already_done, 4);
    assert_eq!(again.answered, 0);
    assert_eq!(again.missing_image, 1);
    assert_eq!(read_answers(&cfg.out).unwrap().len(), 4);
}

/// With `batch_size` 3 the questions are generated three at a time, and every answer is the
/// one they get one at a time. A question whose image cannot be read fails alone; a prompt
/// longer than the context fails its batch, whose other questions are then answered one by one.
#[test]
fn batched_answers_match_one_at_a_time() {
    let expected = expected();
    let question = expected["question"].as_str().unwrap();
    let image = expected["image"].as_str().unwrap();
    let p = pipeline();
    let dir = tempfile::tempdir().unwrap();
    let qpath = dir.path().join("q.jsonl");
    let too_long = "tell me more about it ".repeat(80);
    let lines = [
        serde_json::json!({"question_id": 1, "image": image, "text": question}),
        serde_json::json!({"question_id": 2, "image": "missing.png", "text": question}),
        serde_json::json!({"question_id": 3, "image": "", "text": "Write a short sentence about a red ball."}),
        serde_json::json!({"question_id": 4, "image": "../../images/not_an_image.png", "text": question}),
        serde_json::json!({"question_id": 5, "image": image, "text": FOLLOW_UP}),
        serde_json::json!({"question_id": 6, "image": "", "text": "What is a kite?"}),
        serde_json::json!({"question_id": 7, "image": image, "text": too_long}),
        serde_json::json!({"question_id": 8, "image": image, "text": "Is it a photo?"}),
    ];
    std::fs::write(
        &qpath,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
    let cfg = |name: &str, batch_size: usize| AnswerConfig {
        questions: qpath.clone(),
        image_folder: fixtures().join("images"),
        out: dir.path().join(name),
        model_id: "tiny".into(),
        sampling: greedy(),
        max_new_tokens: 12,
        stop: Vec::new(),
        limit: None,
        batch_size,
    };
    let one = cfg("one.jsonl", 1);
    let three = cfg("three.jsonl", 3);
    let a = answer_questions(&p, &one, |_, _| {}).unwrap();
    let mut calls = Vec::new();
    let b = answer_questions(&p, &three, |d, t| calls.push((d, t))).unwrap();
    for r in [&a, &b] {
        assert_eq!((r.answered, r.missing_image, r.failed), (5, 1, 2), "{r:?}");
    }
    assert_eq!(calls, [(3, 8), (6, 8), (8, 8)], "progress after each batch");
    let (a, b) = (
        read_answers(&one.out).unwrap(),
        read_answers(&three.out).unwrap(),
    );
    assert_eq!(a.len(), 5);
    for id in [1, 3, 5, 6, 8] {
        let id = QuestionId::Int(id);
        assert!(!a[&id].text.is_empty(), "{id:?}");
        assert_eq!(
            a[&id].text, b[&id].text,
            "question {id:?}, batched and alone"
        );
    }

    // Resume after the batched run: the failed questions are tried again and nothing doubles.
    let again = answer_questions(&p, &three, |_, _| {}).unwrap();
    assert_eq!(
        (again.already_done, again.answered, again.failed),
        (5, 0, 2)
    );
    assert_eq!(read_answers(&three.out).unwrap().len(), 5);
}
