//! LLaVA-NeXT (`llava_next`, anyres) against transformers, on the tiny checkpoint that
//! `tools/make_next_fixture.py` makes: each image's tiles, its token count, the packed image
//! features, the prompt ids, the last logits (≤1e-4 in f32) and 20 greedy tokens, for a prompt
//! with three images of different shapes and for a prompt with one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use llava_data::conversation::Message;
use llava_model::generation::{Sampler, SamplingParams, generate};
use llava_model::image_inputs::ImageInputs;
use llava_model::language_model::KvCache;
use llava_model::nn::Mode;
use llava_model::pipeline::{Pipeline, PipelineOptions};
use llava_model::prompt_cache::PromptCache;
use llava_model::{Device, Tensor};
use serde_json::Value;

const TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models")
}

struct Case {
    expected: Value,
    tensors: HashMap<String, Tensor>,
    pipeline: Pipeline,
}

fn case() -> Case {
    let dir = fixtures().join("llava-next");
    let text = std::fs::read_to_string(dir.join("expected.json")).expect("expected.json");
    let tensors = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu)
        .expect("tensors");
    let opts = PipelineOptions::new(dir.join("model").to_string_lossy());
    Case {
        expected: serde_json::from_str(&text).expect("json"),
        tensors,
        pipeline: Pipeline::load(&opts).expect("the llava_next fixture loads"),
    }
}

impl Case {
    fn images(&self) -> Vec<&Value> {
        self.expected["images"]
            .as_array()
            .expect("images")
            .iter()
            .collect()
    }

    fn image_paths(&self, n: usize) -> Vec<PathBuf> {
        self.images()
            .iter()
            .take(n)
            .map(|i| {
                fixtures()
                    .join("images")
                    .join(i["image"].as_str().expect("name"))
            })
            .collect()
    }

    fn ids(&self, prompt: &str, key: &str) -> Vec<u32> {
        serde_json::from_value(self.expected[prompt][key].clone()).expect("ids")
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
        .expect("difference")
}

fn assert_close(name: &str, got: &Tensor, want: &Tensor) {
    let d = max_abs_diff(got, want);
    eprintln!("{name}: max abs diff {d:e}");
    assert!(d <= TOL, "{name}: max abs diff {d:e} > {TOL:e}");
}

fn last_logits(p: &Pipeline, ids: &[u32], images: &ImageInputs) -> Tensor {
    let features = p
        .model
        .image_features(images, Mode::Infer)
        .expect("features");
    let embeds = p
        .model
        .embed(&[ids.to_vec()], Some(&features))
        .expect("embed");
    let hidden = p
        .model
        .language_model
        .forward(&embeds, None, &mut KvCache::new(), Mode::Infer)
        .expect("forward");
    let last = hidden.narrow(1, ids.len() - 1, 1).expect("last");
    p.model
        .language_model
        .logits(&last)
        .expect("logits")
        .flatten_all()
        .expect("flat")
}

fn greedy(p: &Pipeline, ids: &[u32], images: &ImageInputs) -> Vec<u32> {
    let mut sampler = Sampler::new(SamplingParams::default()).expect("sampler");
    generate(&p.model, ids, Some(images), &mut sampler, 20, &[], |_| {
        std::ops::ControlFlow::Continue(())
    })
    .expect("generates")
    .0
}

#[test]
fn tiles_and_token_counts_match_the_processor() {
    let c = case();
    let p = &c.pipeline;
    let paths = c.image_paths(3);
    for (i, (image, path)) in c.images().iter().zip(&paths).enumerate() {
        let processed = p.image_processor.process_path(path).expect("processes");
        let size: [u32; 2] = serde_json::from_value(image["image_size"].clone()).expect("size");
        assert_eq!(processed.image_size, (size[0], size[1]), "image {i}: size");
        let images = p.image_inputs(&[processed]).expect("inputs").expect("one");
        assert_close(
            &format!("image {i}: tiles"),
            &images.pixel_values[0],
            &c.tensors[&format!("pixel_values_{i}")],
        );
        assert_eq!(
            p.model.image_token_counts(&images).expect("counts"),
            vec![image["image_tokens"].as_u64().expect("count") as usize],
            "image {i}: token count"
        );
    }
}

/// The recorded prompt `key` ("multi" or "single", with its first `n_images` images): prompt
/// text, input ids, last logits and 20 greedy tokens against transformers. Returns the images.
fn check_prompt(c: &Case, key: &str, n_images: usize) -> ImageInputs {
    let p = &c.pipeline;
    let prompt = p
        .render(&[Message::user(
            c.expected[key]["question"].as_str().expect("q"),
            n_images,
        )])
        .expect("renders");
    assert_eq!(
        prompt,
        c.expected[key]["prompt"].as_str().expect("prompt"),
        "{key}: prompt"
    );
    let images = p
        .pixel_values(&c.image_paths(n_images))
        .expect("images")
        .expect("at least one");
    let ids = p.encode(&prompt, Some(&images)).expect("encodes");
    assert_eq!(ids, c.ids(key, "input_ids"), "{key}: input ids");
    assert_close(
        &format!("{key}: last_logits"),
        &last_logits(p, &ids, &images),
        &c.tensors[&format!("{key}_last_logits")],
    );
    assert_eq!(
        greedy(p, &ids, &images),
        c.ids(key, "greedy_tokens"),
        "{key}: greedy tokens"
    );
    images
}

#[test]
fn three_images_of_three_shapes_match_transformers() {
    let c = case();
    let images = check_prompt(&c, "multi", 3);
    // Features from the recorded tiles isolate the model from preprocessing.
    let recorded = ImageInputs {
        pixel_values: (0..3)
            .map(|i| c.tensors[&format!("pixel_values_{i}")].clone())
            .collect(),
        image_sizes: images.image_sizes.clone(),
    };
    let features = c
        .pipeline
        .model
        .image_features(&recorded, Mode::Infer)
        .expect("features");
    assert_close("image_features", &features, &c.tensors["image_features"]);
}

#[test]
fn one_image_matches_transformers() {
    check_prompt(&case(), "single", 1);
}

/// A chat's second turn keeps the first turn's images, whatever their lengths, and answers
/// as a fresh run of the whole conversation does.
#[test]
fn a_follow_up_turn_reuses_images_of_different_lengths() {
    let c = case();
    let p = &c.pipeline;
    let images = p
        .pixel_values(&c.image_paths(3))
        .expect("images")
        .expect("three");
    let mut cache = PromptCache::new();
    let params = SamplingParams::default();
    let mut history = vec![Message::user("What is shown in the image?", 3)];
    let ids = p
        .encode(&p.render(&history).expect("render"), Some(&images))
        .expect("encode");
    let first = p
        .generate_with_cache(&mut cache, &ids, Some(&images), &params, 8, &[], |_| {})
        .expect("first turn");
    history.push(Message::assistant(first.text.trim()));
    history.push(Message::user("And the colours?", 0));
    let ids2 = p
        .encode(&p.render(&history).expect("render"), Some(&images))
        .expect("encode");
    let cached = p
        .generate_with_cache(&mut cache, &ids2, Some(&images), &params, 8, &[], |_| {})
        .expect("second turn");
    assert!(
        cached.stats.cached_tokens >= ids.len(),
        "{} of the first prompt's {} tokens reused",
        cached.stats.cached_tokens,
        ids.len()
    );
    let fresh = p
        .generate(&ids2, Some(&images), &params, 8, &[], |_| {})
        .expect("fresh");
    assert_eq!(cached.token_ids, fresh.token_ids);
}

/// The original layout's LLaVA-1.6 (`tools/make_next_original_fixture.py`): `(width, height)`
/// grid pinpoints, `model.image_newline`, the CLIP tower beside it, llava_v1 and the chunk-wise
/// tokenisation around each `<image>`, against the original's computation.
#[test]
fn original_layout_llava_1_6_matches_the_original() {
    let dir = fixtures().join("llava-next-original");
    let text = std::fs::read_to_string(dir.join("expected.json")).expect("expected.json");
    let expected: Value = serde_json::from_str(&text).expect("json");
    let tensors = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu)
        .expect("tensors");
    let mut opts = PipelineOptions::new(dir.join("model").to_string_lossy());
    opts.vision_tower = Some(dir.join("clip"));
    let p = Pipeline::load(&opts).expect("the original-layout 1.6 fixture loads");
    let paths: Vec<PathBuf> = expected["images"]
        .as_array()
        .expect("images")
        .iter()
        .map(|n| fixtures().join("images").join(n.as_str().expect("name")))
        .collect();
    let prompt = p
        .render(&[Message::user(
            expected["question"].as_str().expect("q"),
            paths.len(),
        )])
        .expect("renders");
    assert_eq!(prompt, expected["prompt"].as_str().expect("prompt"));
    let images = p.pixel_values(&paths).expect("images").expect("two");
    let counts: Vec<usize> = serde_json::from_value(expected["image_tokens"].clone()).expect("n");
    assert_eq!(p.model.image_token_counts(&images).expect("counts"), counts);
    // The original's ids, with each -200 marker standing for its image's positions.
    let mut counts_left = counts.iter();
    let want: Vec<u32> = expected["input_ids"]
        .as_array()
        .expect("ids")
        .iter()
        .flat_map(|i| match i.as_i64().expect("id") {
            -200 => vec![p.model.config.image_token_index; *counts_left.next().expect("image")],
            id => vec![id as u32],
        })
        .collect();
    let ids = p.encode(&prompt, Some(&images)).expect("encodes");
    assert_eq!(ids, want, "chunk-wise tokenisation around each <image>");
    assert_close(
        "original 1.6: last_logits",
        &last_logits(&p, &ids, &images),
        &tensors["last_logits"],
    );
    let greedy_want: Vec<u32> =
        serde_json::from_value(expected["greedy_tokens"].clone()).expect("tokens");
    assert_eq!(greedy(&p, &ids, &images), greedy_want);
}
