//! Dynamic NTK and YaRN rope scaling against transformers (`tools/make_rope_fixture.py`):
//! llava15-default's weights under configs whose prompts, or whose decoding, go past the
//! trained context. Every step's logits agree to 1e-4 and the greedy tokens are identical.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use llava_data::image::ImageAspectRatio;
use llava_model::generation::SamplingParams;
use llava_model::image_inputs::ImageInputs;
use llava_model::language_model::KvCache;
use llava_model::nn::Mode;
use llava_model::pipeline::{Pipeline, PipelineOptions};
use llava_model::prompt_cache::PromptCache;
use serde_json::Value;

const TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models")
}

struct Fixture {
    expected: Value,
    tensors: HashMap<String, Tensor>,
}

fn fixture() -> Fixture {
    let dir = fixtures().join("rope-scaling");
    let text = std::fs::read_to_string(dir.join("expected.json")).expect("expected.json");
    Fixture {
        expected: serde_json::from_str(&text).expect("valid json"),
        tensors: candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu)
            .expect("tensors"),
    }
}

/// llava15-default's checkpoint with the case's config.json, in a directory of the test's
/// own (`test`), since tests run in parallel.
fn pipeline(f: &Fixture, case: &str, test: &str) -> Pipeline {
    let source = fixtures().join("llava15-default/model");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("rope-{case}-{test}"));
    std::fs::create_dir_all(&dir).expect("checkpoint dir");
    for entry in std::fs::read_dir(&source).expect("source checkpoint") {
        let path = entry.expect("entry").path();
        let name = path.file_name().expect("file name");
        if name != "config.json" {
            std::fs::copy(&path, dir.join(name)).expect("copy");
        }
    }
    let config = &f.expected["cases"][case]["config"];
    std::fs::write(dir.join("config.json"), config.to_string()).expect("config.json");
    let mut opts = PipelineOptions::new(dir.to_string_lossy());
    opts.image_aspect_ratio = Some(ImageAspectRatio::Square);
    Pipeline::load(&opts).expect("pipeline loads")
}

fn image(f: &Fixture, p: &Pipeline) -> ImageInputs {
    let name = f.expected["image"].as_str().expect("image");
    p.pixel_values(&[fixtures().join("images").join(name)])
        .expect("pixels")
        .expect("one image")
}

fn ids(v: &Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).expect("ids")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
        .expect("difference")
}

/// Prefill, then one token at a time through the cache, feeding transformers' greedy tokens:
/// each step's logits against its recorded ones; then our own greedy generation.
fn check_case(case: &str) {
    let f = fixture();
    let p = pipeline(&f, case, "parity");
    let images = image(&f, &p);
    let pixels = images.all_tiles().expect("pixel values");
    for prompt in ["short", "long"] {
        let want = &f.expected["cases"][case]["prompts"][prompt];
        let prompt_ids = ids(&want["input_ids"]);
        let tokens = ids(&want["greedy_tokens"]);
        let step_logits = &f.tensors[&format!("{case}.{prompt}.step_logits")];
        let rendered = p
            .render(&[llava_data::conversation::Message::user(
                want["question"].as_str().expect("question"),
                1,
            )])
            .expect("render");
        assert_eq!(rendered, want["prompt"].as_str().expect("prompt"));
        assert_eq!(
            p.encode(&rendered, Some(&images)).expect("encode"),
            prompt_ids
        );

        let mut kv = KvCache::new();
        let mut hidden = p
            .model
            .forward(
                std::slice::from_ref(&prompt_ids),
                Some(&pixels),
                None,
                &mut kv,
                Mode::Infer,
            )
            .expect("prefill");
        let mut worst = 0f32;
        for (step, &token) in tokens.iter().enumerate() {
            let last = hidden
                .narrow(1, hidden.dim(1).expect("seq") - 1, 1)
                .expect("last");
            let logits = p
                .model
                .language_model
                .logits(&last)
                .and_then(|l| Ok(l.flatten_all()?))
                .expect("logits");
            let d = max_abs_diff(&logits, &step_logits.get(step).expect("step"));
            assert!(
                d <= TOL,
                "{case}/{prompt}: step {step} (sequence {}) logits differ by {d:e}",
                kv.seq_len()
            );
            worst = worst.max(d);
            let embeds = p.model.language_model.embed(&[vec![token]]).expect("embed");
            hidden = p
                .model
                .language_model
                .forward(&embeds, None, &mut kv, Mode::Infer)
                .expect("decode");
        }
        eprintln!(
            "{case}/{prompt}: {} prompt tokens, {} steps, logits within {worst:e}",
            prompt_ids.len(),
            tokens.len()
        );
        let ours = p
            .generate(
                &prompt_ids,
                Some(&images),
                &SamplingParams::default(),
                tokens.len(),
                &[],
                |_| {},
            )
            .expect("generates");
        assert_eq!(ours.token_ids, tokens, "{case}/{prompt}: greedy tokens");
    }
}

/// The short prompt's frequencies change at every step once decoding crosses the context; the
/// long prompt starts past it.
#[test]
fn dynamic_ntk_rope_matches_transformers() {
    check_case("dynamic");
}

#[test]
fn yarn_rope_matches_transformers() {
    check_case("yarn");
}

/// The attention factor from `mscale` / `mscale_all_dim`, other ramp ends, no rounding of them.
#[test]
fn yarn_rope_with_mscale_and_no_truncation_matches_transformers() {
    check_case("yarn-mscale");
}

/// With dynamic NTK a kept beginning is reused only while every key in it, and the prompt
/// reusing it, stay within the trained context: past it, transformers' fresh run rotates the
/// whole prompt by frequencies for its own length.
#[test]
fn dynamic_rope_reuses_a_cached_beginning_only_within_the_trained_context() {
    let f = fixture();
    let p = pipeline(&f, "dynamic", "cache");
    let images = image(&f, &p);
    let prompt = |key: &str| ids(&f.expected["cases"]["dynamic"]["prompts"][key]["input_ids"]);
    let want = |key: &str| ids(&f.expected["cases"]["dynamic"]["prompts"][key]["greedy_tokens"]);
    let (short, long) = (prompt("short"), prompt("long"));
    let shared = short.iter().zip(&long).take_while(|(a, b)| a == b).count();
    assert!(shared > 10, "the prompts share {shared} tokens");
    let context = p.model.config.text_config.max_position_embeddings;
    let mut cache = PromptCache::new();
    let run = |cache: &mut PromptCache, ids: &[u32], n: usize| {
        p.generate_with_cache(
            cache,
            ids,
            Some(&images),
            &SamplingParams::default(),
            n,
            &[],
            |_| {},
        )
        .expect("generates")
    };
    // Within the context: the second run reuses all but the last few tokens.
    let n = 4;
    assert!(short.len() + n <= context);
    let first = run(&mut cache, &short, n);
    let again = run(&mut cache, &short, n);
    assert_eq!(first.token_ids, again.token_ids);
    assert!(
        again.stats.cached_tokens > 0,
        "nothing reused within the context"
    );
    // The long prompt is past the context: nothing is reused, and it answers as transformers.
    let long_run = run(&mut cache, &long, want("long").len());
    assert_eq!(long_run.stats.cached_tokens, 0);
    assert_eq!(long_run.token_ids, want("long"));
    // The cache now holds keys past the context: the short prompt starts over too.
    let short_run = run(&mut cache, &short, want("short").len());
    assert_eq!(short_run.stats.cached_tokens, 0);
    assert_eq!(short_run.token_ids, want("short"));
}
