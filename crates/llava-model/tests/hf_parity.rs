//! Parity with HF transformers on tiny random-weight checkpoints made by
//! `tools/make_model_fixtures.py`: prompt text, token ids, pixel values, image features,
//! logits (≤1e-4 in f32) and 20 greedy tokens (identical).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use llava_data::conversation::Message;
use llava_data::image::ImageAspectRatio;
use llava_data::tokenizer::ImageTokens;
use llava_model::generation::{Sampler, SamplingParams, generate};
use llava_model::image_inputs::ImageInputs;
use llava_model::language_model::KvCache;
use llava_model::nn::Mode;
use llava_model::pipeline::{Pipeline, PipelineOptions};
use llava_model::{Device, Tensor};
use serde_json::Value;

const TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models")
}

/// The CPU, or with `LLAVA_TEST_CUDA=N` (a `--features cuda` build) GPU `N`: the same checks
/// then hold the CUDA kernels to transformers (`tools/cuda_check.sh`).
/// Opened once, so that every test and fixture tensor shares one CUDA context.
fn device() -> Device {
    static DEVICE: OnceLock<Device> = OnceLock::new();
    DEVICE
        .get_or_init(|| match std::env::var("LLAVA_TEST_CUDA") {
            Ok(n) => Device::new_cuda(n.parse().expect("LLAVA_TEST_CUDA is a GPU ordinal"))
                .expect("the CUDA device opens"),
            Err(_) => Device::Cpu,
        })
        .clone()
}

/// Options for the checkpoint at `model`, on the test device.
fn options(model: &Path) -> PipelineOptions {
    let mut opts = PipelineOptions::new(model.to_string_lossy());
    opts.device = device();
    opts
}

struct Case {
    dir: PathBuf,
    expected: Value,
    tensors: HashMap<String, Tensor>,
}

fn case(name: &str) -> Case {
    let dir = fixtures().join(name);
    let text = std::fs::read_to_string(dir.join("expected.json")).expect("expected.json");
    let expected: Value = serde_json::from_str(&text).expect("valid json");
    let tensors = candle_core::safetensors::load(dir.join("expected.safetensors"), &device())
        .expect("tensors");
    Case {
        dir,
        expected,
        tensors,
    }
}

impl Case {
    fn ids(&self, key: &str) -> Vec<u32> {
        serde_json::from_value::<Vec<u32>>(self.expected[key].clone()).expect(key)
    }
    fn str(&self, key: &str) -> &str {
        self.expected[key].as_str().expect(key)
    }
    fn aspect(&self) -> ImageAspectRatio {
        match self.str("image_aspect_ratio") {
            "pad" => ImageAspectRatio::Pad,
            _ => ImageAspectRatio::Square,
        }
    }
    fn image(&self) -> PathBuf {
        fixtures().join("images").join(self.str("image"))
    }
    fn pipeline(&self) -> Pipeline {
        let mut opts = options(&self.dir.join("model"));
        opts.image_aspect_ratio = Some(self.aspect());
        // The original layout names a hub CLIP (`mm_vision_tower`); the fixture ships it beside.
        if self.dir.join("clip").is_dir() {
            opts.vision_tower = Some(self.dir.join("clip"));
        }
        Pipeline::load(&opts).expect("pipeline loads")
    }
}

impl Case {
    /// The original's ids with the -200 marker expanded to our sentinel, once per image position.
    fn original_ids(&self, p: &Pipeline) -> Vec<u32> {
        let marked: Vec<i64> =
            serde_json::from_value(self.expected["input_ids"].clone()).expect("ids");
        let n = self.expected["num_image_tokens"].as_u64().expect("n") as usize;
        let sentinel = p.model.config.image_token_index;
        marked
            .iter()
            .flat_map(|&i| {
                if i == -200 {
                    vec![sentinel; n]
                } else {
                    vec![i as u32]
                }
            })
            .collect()
    }
}

/// The case's image, preprocessed by the pipeline.
fn one_image(c: &Case, p: &Pipeline) -> Option<ImageInputs> {
    p.pixel_values(&[c.image()]).expect("pixels")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a: Vec<f32> = a.flatten_all().and_then(|t| t.to_vec1()).expect("a");
    let b: Vec<f32> = b.flatten_all().and_then(|t| t.to_vec1()).expect("b");
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn assert_close(name: &str, got: &Tensor, want: &Tensor) {
    let d = max_abs_diff(got, want);
    eprintln!("{name}: max abs diff {d:e}");
    assert!(d <= TOL, "{name}: max abs diff {d:e} > {TOL:e}");
}

fn greedy(p: &Pipeline, ids: &[u32], pixels: Option<&Tensor>, n: usize) -> Vec<u32> {
    let mut sampler = Sampler::new(SamplingParams::default()).expect("sampler");
    // EOS is not special here, as in the fixture's manual greedy loop.
    let images = pixels.map(|t| ImageInputs::from_tensor(t).expect("images"));
    let (tokens, _) = generate(&p.model, ids, images.as_ref(), &mut sampler, n, &[], |_| {
        std::ops::ControlFlow::Continue(())
    })
    .expect("generates");
    tokens
}

/// Logits at the last prompt position (`[vocab]`), from a full forward pass without a cache.
fn last_logits(p: &Pipeline, ids: &[u32], pixels: Option<&Tensor>) -> Tensor {
    let hidden = p
        .model
        .forward(
            &[ids.to_vec()],
            pixels,
            None,
            &mut KvCache::new(),
            Mode::Infer,
        )
        .expect("forward");
    let last = hidden.narrow(1, ids.len() - 1, 1).expect("last position");
    p.model
        .language_model
        .logits(&last)
        .expect("logits")
        .flatten_all()
        .expect("flatten")
}

/// Prompt → ids → pixels → features → logits → greedy tokens for one HF-layout case.
fn check_hf_case(name: &str) {
    let c = case(name);
    let p = c.pipeline();
    let prompt = p
        .render(&[Message::user(c.str("question"), 1)])
        .expect("renders");
    assert_eq!(prompt, c.str("prompt"), "{name}: chat template");
    let images = p
        .pixel_values(&[c.image()])
        .expect("pixels")
        .expect("one image");
    let ids = p.encode(&prompt, Some(&images)).expect("encodes");
    assert_eq!(ids, c.ids("input_ids"), "{name}: input ids");
    let pixels = images.all_tiles().expect("pixel values");
    assert_close(
        &format!("{name}: pixel_values"),
        &pixels,
        &c.tensors["pixel_values"],
    );
    // Features from the recorded pixels isolate the model from preprocessing.
    let features = p
        .model
        .get_image_features(&c.tensors["pixel_values"], Mode::Infer)
        .expect("features");
    assert_close(
        &format!("{name}: image_features"),
        &features.squeeze(0).expect("squeeze"),
        &c.tensors["image_features"],
    );

    let mut cache = KvCache::new();
    let hidden = p
        .model
        .forward(
            std::slice::from_ref(&ids),
            Some(&pixels),
            None,
            &mut cache,
            Mode::Infer,
        )
        .expect("forward");
    let logits = p
        .model
        .language_model
        .logits(&hidden)
        .expect("logits")
        .squeeze(0)
        .expect("squeeze");
    let last = logits.get(ids.len() - 1).expect("last");
    assert_close(
        &format!("{name}: last_logits"),
        &last,
        &c.tensors["last_logits"],
    );
    if let Some(all) = c.tensors.get("prompt_logits") {
        assert_close(&format!("{name}: prompt_logits"), &logits, all);
    }
    assert_eq!(
        greedy(&p, &ids, Some(&pixels), 20),
        c.ids("greedy_tokens"),
        "{name}: greedy tokens"
    );
}

#[test]
fn llava15_default_matches_transformers() {
    check_hf_case("llava15-default");
}

#[test]
fn llava15_full_gqa_sharded_pad_matches_transformers() {
    check_hf_case("llava15-full-gqa-sharded");
}

#[test]
fn llava15_legacy_names_bf16_weights_match_transformers() {
    check_hf_case("llava15-legacy-bf16");
}

/// BakLLaVA's decoder: Mistral's layers with a sliding attention window, here 16 positions
/// against a 38-token prompt, so the window cuts the prefill and every decoded token.
#[test]
fn mistral_sliding_window_matches_transformers() {
    check_hf_case("mistral-sliding-window");
    // The prompt's last 8 tokens run over the cached rest, as a chat's follow-up does: the
    // window is then counted from positions past the cache.
    let c = case("mistral-sliding-window");
    let p = c.pipeline();
    let ids = c.ids("input_ids");
    let split = ids.len() - 8;
    let mut cache = KvCache::new();
    let pixels = &c.tensors["pixel_values"];
    let forward = |ids: &[u32], pixels: Option<&Tensor>, cache: &mut KvCache| {
        p.model
            .forward(&[ids.to_vec()], pixels, None, cache, Mode::Infer)
            .expect("forward")
    };
    forward(&ids[..split], Some(pixels), &mut cache);
    let hidden = forward(&ids[split..], None, &mut cache);
    let last = p
        .model
        .language_model
        .logits(&hidden.narrow(1, 7, 1).expect("last"))
        .expect("logits")
        .flatten_all()
        .expect("flatten");
    assert_close("mistral split prompt", &last, &c.tensors["last_logits"]);
}

/// Llama 3.1/3.2's rope scaling (all three frequency bands), tied embeddings with no
/// `lm_head` in the file, and a single KV head.
#[test]
fn llama3_rope_tied_embeddings_match_transformers() {
    check_hf_case("llama3-rope-tied");
}

/// The window in the three-product attention that training (and the GPU) runs, where the
/// inference kernel is not used: every prompt position's logits.
#[test]
fn mistral_sliding_window_in_train_mode_matches_transformers() {
    let c = case("mistral-sliding-window");
    let p = c.pipeline();
    let ids = c.ids("input_ids");
    let hidden = p
        .model
        .forward(
            std::slice::from_ref(&ids),
            Some(&c.tensors["pixel_values"]),
            None,
            &mut KvCache::new(),
            Mode::Train,
        )
        .expect("train mode");
    let logits = p.model.language_model.logits(&hidden).expect("logits");
    assert_close(
        "mistral train-mode prompt_logits",
        &logits.squeeze(0).expect("squeeze"),
        &c.tensors["prompt_logits"],
    );
}

#[test]
fn padded_batch_matches_transformers() {
    let c = case("llava15-default");
    let p = c.pipeline();
    let rows: Vec<Vec<u32>> =
        serde_json::from_value(c.expected["batch_input_ids"].clone()).expect("ids");
    let mask: Vec<Vec<u8>> =
        serde_json::from_value(c.expected["batch_attention_mask"].clone()).expect("mask");
    let pixels = p
        .pixel_values(&[c.image(), c.image()])
        .expect("pixels")
        .expect("images")
        .all_tiles()
        .expect("pixel values");
    let mask = Tensor::new(mask, &device()).expect("mask tensor");
    let mut cache = KvCache::new();
    let hidden = p
        .model
        .forward(&rows, Some(&pixels), Some(&mask), &mut cache, Mode::Infer)
        .expect("forward");
    let last = hidden.narrow(1, rows[0].len() - 1, 1).expect("last");
    let logits = p
        .model
        .language_model
        .logits(&last)
        .expect("logits")
        .squeeze(1)
        .expect("squeeze");
    assert_close(
        "batch_last_logits",
        &logits,
        &c.tensors["batch_last_logits"],
    );
}

#[test]
fn text_only_prompt_matches_transformers() {
    let c = case("llava15-default");
    let p = c.pipeline();
    let prompt = p
        .render(&[Message::user(c.str("text_only_question"), 0)])
        .expect("renders");
    assert_eq!(prompt, c.str("text_only_prompt"));
    let ids = p.encode(&prompt, None).expect("encodes");
    assert_eq!(ids, c.ids("text_only_input_ids"));
    assert_close(
        "text_only_last_logits",
        &last_logits(&p, &ids, None),
        &c.tensors["text_only_last_logits"],
    );
    assert_eq!(greedy(&p, &ids, None, 20), c.ids("text_only_greedy_tokens"));
}

#[test]
fn original_layout_matches_transformers() {
    check_original_layout("model", "clip");
}

/// The same checkpoint as PyTorch `.bin` files, the format the original releases ship in: the
/// model in two shards with `pytorch_model.bin.index.json`, the CLIP tower as one
/// `pytorch_model.bin` (`tools/make_bin_fixtures.py`).
#[test]
fn original_layout_from_pytorch_bin_files_matches_transformers() {
    check_original_layout("model-bin", "clip-bin");
}

fn check_original_layout(model: &str, clip: &str) {
    let c = case("original-layout");
    let mut opts = options(&c.dir.join(model));
    opts.vision_tower = Some(c.dir.join(clip));
    check_original_case(&c, opts);
}

/// An original-layout case end to end: the llava_v1 prompt, its chunk-wise tokenisation around
/// `<image>`, then [`check_image_run`].
fn check_original_case(c: &Case, mut opts: PipelineOptions) {
    opts.image_aspect_ratio = Some(c.aspect());
    let p = Pipeline::load(&opts).expect("pipeline loads");
    let prompt = p
        .render(&[Message::user(c.str("question"), 1)])
        .expect("renders");
    assert_eq!(prompt, c.str("prompt"), "llava_v1 prompt");
    let ids = p
        .encode(&prompt, one_image(c, &p).as_ref())
        .expect("encodes");
    assert_eq!(
        ids,
        c.original_ids(&p),
        "chunk-wise tokenisation around <image>"
    );
    check_image_run(c, &p, &ids);
}

/// A LoRA release (`tools/make_lora_fixture.py`) over `--model-base`: the base LLaMA's weights
/// and tokenizer, the projector from `non_lora_trainables.bin`, and peft adapters merged as
/// `merge_and_unload` merges them, against transformers on the merged model.
#[test]
fn original_lora_release_over_its_base_matches_the_merged_model() {
    let c = case("original-lora");
    let mut opts = options(&c.dir.join("lora"));
    opts.model_base = Some(c.dir.join("base").to_string_lossy().into());
    opts.vision_tower = Some(fixtures().join(c.str("clip_dir")));
    check_original_case(&c, opts);
}

/// Pixels, last-position logits and 20 greedy tokens of an original-layout case, from `ids`;
/// returns the pixels.
fn check_image_run(c: &Case, p: &Pipeline, ids: &[u32]) -> Tensor {
    let pixels = one_image(c, p)
        .expect("image")
        .all_tiles()
        .expect("pixel values");
    assert_close("pixel_values", &pixels, &c.tensors["pixel_values"]);
    assert_close(
        "last_logits",
        &last_logits(p, ids, Some(&pixels)),
        &c.tensors["last_logits"],
    );
    assert_eq!(greedy(p, ids, Some(&pixels), 20), c.ids("greedy_tokens"));
    pixels
}

/// A LLaVA v0 release (`mm_use_im_start_end`, `tools/make_v0_fixture.py`): the image sits
/// between `<im_start>` and `<im_end>`, the projector is the default single `linear`, and the
/// image is resized and cropped (no `image_aspect_ratio`).
#[test]
fn original_v0_with_im_start_end_matches_the_original() {
    let c = case("original-v0");
    let mut opts = options(&c.dir.join("model"));
    opts.vision_tower = Some(c.dir.join(c.str("clip_dir")));
    opts.template = Some(c.str("conv_template").into());
    let p = Pipeline::load(&opts).expect("pipeline loads");
    assert_eq!(p.model.config.projector().depth, 1, "v0's linear projector");
    let prompt = p
        .render(&[Message::user(c.str("question"), 1)])
        .expect("renders");
    // The original writes the start/end tokens into the question; we add them when tokenising.
    assert_eq!(
        prompt.replace("<image>", "<im_start><image><im_end>"),
        c.str("prompt"),
        "llava_v0 prompt"
    );
    let ids = p
        .encode(&prompt, one_image(&c, &p).as_ref())
        .expect("encodes");
    assert_eq!(
        ids,
        c.original_ids(&p),
        "<im_start>, image positions, <im_end>"
    );
    let pixels = check_image_run(&c, &p, &ids);

    // Without the two tokens the logits are not the original's: the check above can fail.
    let bare = p
        .tokenizer
        .encode_prompt(
            &prompt,
            ImageTokens::Split {
                id: p.model.config.image_token_index,
                im_start_end: false,
            },
            &[p.model.config.image_seq_len()],
        )
        .expect("encodes");
    let start = p.tokenizer.token_to_id("<im_start>").expect("<im_start>");
    assert!(ids.contains(&start) && !bare.contains(&start));
    let d = max_abs_diff(
        &last_logits(&p, &bare, Some(&pixels)),
        &c.tensors["last_logits"],
    );
    assert!(d > 1e-2, "the start/end tokens change the logits ({d:e})");
}

#[test]
fn kv_cache_decoding_matches_full_recompute() {
    let c = case("llava15-full-gqa-sharded");
    let p = c.pipeline();
    let ids = c.ids("input_ids");
    let pixels = one_image(&c, &p).map(|i| i.all_tiles().expect("pixel values"));
    let tokens = greedy(&p, &ids, pixels.as_ref(), 5);
    // Recompute the whole sequence without a cache: the logits at each generated position
    // must pick the same tokens.
    let mut all = ids.clone();
    all.extend(&tokens[..4]);
    let mut cache = KvCache::new();
    let hidden = p
        .model
        .forward(
            &[all.clone()],
            pixels.as_ref(),
            None,
            &mut cache,
            Mode::Infer,
        )
        .expect("forward");
    let logits = p
        .model
        .language_model
        .logits(&hidden)
        .expect("logits")
        .squeeze(0)
        .expect("s");
    for (k, &t) in tokens.iter().enumerate() {
        let row: Vec<f32> = logits
            .get(ids.len() - 1 + k)
            .and_then(|r| r.to_vec1())
            .expect("row");
        assert_eq!(llava_model::generation::argmax(&row), t, "step {k}");
    }
    let train = p
        .model
        .forward(
            &[all],
            pixels.as_ref(),
            None,
            &mut KvCache::new(),
            Mode::Train,
        )
        .expect("train mode");
    assert_close("train-mode forward", &train, &hidden);
}
