//! Batched generation against transformers' left-padded `generate()`, on three fixture
//! checkpoints (`tools/make_batch_fixture.py`): LLaVA-1.5, a Mistral decoder whose sliding
//! window is shorter than the prompts, and LLaVA-NeXT with images of different tile counts.
//! Each batch has two prompts with an image and a text-only one between them, of different
//! lengths. Checked: the rendered prompts and ids, the first-step logits of every row (≤1e-4 in
//! f32), every row's greedy tokens (identical, stopping at EOS as each row does), and that each
//! row gives what the same prompt gives alone, greedy and sampled.

use std::path::{Path, PathBuf};

use llava_data::conversation::Message;
use llava_model::generation::{BatchPrompt, SamplingParams, prefill_batch};
use llava_model::image_inputs::ImageInputs;
use llava_model::pipeline::{Pipeline, PipelineOptions};
use llava_model::{Device, Tensor};
use serde_json::Value;

const TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models")
}

struct Row {
    input_ids: Vec<u32>,
    images: Option<ImageInputs>,
    greedy: Vec<u32>,
}

struct Case {
    pipeline: Pipeline,
    rows: Vec<Row>,
    first_logits: Tensor,
    max_new_tokens: usize,
}

/// Loads the case's checkpoint and renders, encodes and preprocesses each recorded prompt as
/// `llava generate` would, checking the ids against transformers'.
fn case(name: &str) -> Case {
    let dir = fixtures().join(name);
    let text =
        std::fs::read_to_string(dir.join("batch_generate.json")).expect("batch_generate.json");
    let expected: Value = serde_json::from_str(&text).expect("json");
    let tensors =
        candle_core::safetensors::load(dir.join("batch_generate.safetensors"), &Device::Cpu)
            .expect("tensors");
    let pipeline = Pipeline::load(&PipelineOptions::new(dir.join("model").to_string_lossy()))
        .expect("the fixture loads");
    let rows = expected["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            let images: Vec<PathBuf> = r["image"]
                .as_str()
                .map(|i| fixtures().join("images").join(i))
                .into_iter()
                .collect();
            let question = r["question"].as_str().expect("question");
            let prompt = pipeline
                .render(&[Message::user(question, images.len())])
                .expect("render");
            assert_eq!(
                prompt,
                r["prompt"].as_str().expect("prompt"),
                "{name}: prompt"
            );
            let images = pipeline.pixel_values(&images).expect("images");
            let input_ids = pipeline.encode(&prompt, images.as_ref()).expect("encode");
            let want: Vec<u32> = serde_json::from_value(r["input_ids"].clone()).expect("ids");
            assert_eq!(input_ids, want, "{name}: input ids of {question:?}");
            Row {
                input_ids,
                images,
                greedy: serde_json::from_value(r["greedy_tokens"].clone()).expect("tokens"),
            }
        })
        .collect();
    Case {
        pipeline,
        rows,
        first_logits: tensors["first_logits"].clone(),
        max_new_tokens: expected["max_new_tokens"].as_u64().expect("max_new_tokens") as usize,
    }
}

impl Case {
    fn prompts(&self) -> Vec<BatchPrompt<'_>> {
        self.rows
            .iter()
            .map(|r| BatchPrompt {
                input_ids: &r.input_ids,
                images: r.images.as_ref(),
            })
            .collect()
    }
}

fn check(name: &str) {
    let c = case(name);
    let prefilled = prefill_batch(&c.pipeline.model, &c.prompts()).expect("prefill");
    let d = (prefilled.logits.to_device(&Device::Cpu).expect("cpu") - &c.first_logits)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
        .expect("difference");
    eprintln!(
        "{name}: first-step logits of {} rows, max abs diff {d:e}",
        c.rows.len()
    );
    assert!(
        d <= TOL,
        "{name}: first-step logits differ by {d:e} > {TOL:e}"
    );

    let greedy = SamplingParams::default();
    let batch = c
        .pipeline
        .generate_batch(&c.prompts(), &greedy, c.max_new_tokens, &[])
        .expect("batch generation");
    assert_eq!(batch.len(), c.rows.len());
    for (i, (row, got)) in c.rows.iter().zip(&batch).enumerate() {
        assert_eq!(got.token_ids, row.greedy, "{name}: row {i}'s greedy tokens");
        let alone = c
            .pipeline
            .generate(
                &row.input_ids,
                row.images.as_ref(),
                &greedy,
                c.max_new_tokens,
                &[],
                |_| {},
            )
            .expect("alone");
        assert_eq!(
            got.text, alone.text,
            "{name}: row {i}'s text, batched and alone"
        );
    }
    assert_eq!(batch[0].stats.rows, c.rows.len());
    assert_eq!(
        batch[0].stats.generated,
        c.rows.iter().map(|r| r.greedy.len()).sum::<usize>()
    );
}

#[test]
fn llava15_batch_matches_transformers() {
    check("llava15-default");
}

#[test]
fn sliding_window_batch_matches_transformers() {
    check("mistral-sliding-window");
}

#[test]
fn llava_next_batch_matches_transformers() {
    check("llava-next");
}

/// Sampling draws from each row's own seeded sampler, so a row samples in a batch what it
/// samples alone; the rows finish at different steps (one by EOS, one by a stop string).
#[test]
fn sampled_rows_match_their_runs_alone() {
    let c = case("llava15-default");
    let params = SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        top_k: 50,
        seed: 11,
    };
    let run_alone = |r: &Row, stops: &[String]| {
        c.pipeline
            .generate(&r.input_ids, r.images.as_ref(), &params, 12, stops, |_| {})
            .expect("alone")
    };
    let unstopped: Vec<_> = c.rows.iter().map(|r| run_alone(r, &[])).collect();
    // A stop string that ends row 1 early: two characters from the middle of its reply.
    let stop: String = unstopped[1].text.chars().skip(2).take(2).collect();
    let stops = [stop.clone()];
    let batch = c
        .pipeline
        .generate_batch(&c.prompts(), &params, 12, &stops)
        .expect("batch");
    for (i, (got, row)) in batch.iter().zip(&c.rows).enumerate() {
        let want = run_alone(row, &stops);
        assert_eq!(
            got.token_ids, want.token_ids,
            "row {i}, sampled with seed 11"
        );
        assert_eq!(got.text, want.text, "row {i}'s text");
    }
    assert!(
        batch[1].token_ids.len() < unstopped[1].token_ids.len() && !batch[1].text.contains(&stop),
        "row 1 stops at {stop:?}: {:?}",
        batch[1].text
    );
}

/// Positions count from each row's first real token, so a short prompt beside one that nearly
/// fills the context generates as far as it would alone; only the long row is cut short.
#[test]
fn a_row_beside_a_prompt_near_the_context_generates_as_far_as_alone() {
    let c = case("llava15-default");
    let context = c.pipeline.model.config.text_config.max_position_embeddings;
    let short = &c.rows[0];
    // Text-only ids repeated to three positions short of the context.
    let long: Vec<u32> = c.rows[1]
        .input_ids
        .iter()
        .copied()
        .cycle()
        .take(context - 3)
        .collect();
    let prompts = [
        BatchPrompt {
            input_ids: &short.input_ids,
            images: short.images.as_ref(),
        },
        BatchPrompt {
            input_ids: &long,
            images: None,
        },
    ];
    let greedy = SamplingParams::default();
    let n = 12;
    let batch = c
        .pipeline
        .generate_batch(&prompts, &greedy, n, &[])
        .expect("batch");
    let alone = c
        .pipeline
        .generate(
            &short.input_ids,
            short.images.as_ref(),
            &greedy,
            n,
            &[],
            |_| {},
        )
        .expect("short alone");
    assert!(
        alone.token_ids.len() > 3,
        "the short row's reply ends early"
    );
    assert_eq!(batch[0].token_ids, alone.token_ids, "the short row");
    let long_alone = c
        .pipeline
        .generate(&long, None, &greedy, n, &[], |_| {})
        .expect("long alone");
    assert!(long_alone.token_ids.len() <= 3);
    assert_eq!(batch[1].token_ids, long_alone.token_ids, "the long row");
}
