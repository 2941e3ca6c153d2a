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

/// A second question about the fixture's image.
const FOLLOW_UP: &str = "How many animals are there?";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models")
}

fn pipeline() -> Pipeline {
    let mut opts = PipelineOptions::new(fixtures().join("llava15-default/model").to_string_lossy());
    opts.image_aspect_ratio = Some(ImageAspectRatio::Square);
    Pipeline::load(&opts).unwrap()
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
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("llava15-default/expected.json")).unwrap(),
    )
    .unwrap();
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
