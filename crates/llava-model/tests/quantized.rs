//! `--load-8bit` / `--load-4bit` on the tiny LLaVA-1.5 fixture: how far the quantized decoder's
//! logits are from transformers' f32 ones, and the greedy tokens that 8 bits keep. The same for
//! the vision tower alone in bf16 (`--vision-dtype bf16`). There is no
//! quantized reference to be token-exact with (the original's bitsandbytes formats differ and
//! run on GPUs only), so these are bounds, set from the measured errors with room to spare.

use std::path::{Path, PathBuf};

use llava_model::language_model::KvCache;
use llava_model::nn::Mode;
use llava_model::pipeline::{Pipeline, PipelineOptions};
use llava_model::quantized::Quantize;
use llava_model::{DType, Device, Tensor};
use serde_json::Value;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/llava15-default")
}

struct Run {
    /// max |logit - transformers' f32 logit| at the prompt's last position, over the spread of
    /// transformers' logits (max - min).
    logit_error: f32,
    /// The same with `lm_head` kept f32 (the embedding rows and the projections quantized).
    dense_head_error: f32,
    greedy: Vec<u32>,
}

fn run(quantize: Option<Quantize>) -> Run {
    run_with(quantize, None)
}

fn run_with(quantize: Option<Quantize>, vision_dtype: Option<DType>) -> Run {
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture().join("expected.json")).expect("expected.json"),
    )
    .expect("json");
    let tensors =
        candle_core::safetensors::load(fixture().join("expected.safetensors"), &Device::Cpu)
            .expect("tensors");
    let mut opts = PipelineOptions::new(fixture().join("model").to_string_lossy());
    opts.quantize = quantize;
    opts.vision_dtype = vision_dtype;
    let p = Pipeline::load(&opts).expect("loads");
    let image = fixture()
        .join("../images")
        .join(expected["image"].as_str().expect("image"));
    let images = p.pixel_values(&[image]).expect("image");
    let ids: Vec<u32> = serde_json::from_value(expected["input_ids"].clone()).expect("ids");
    let pixels = images.as_ref().map(|i| i.all_tiles().expect("tiles"));
    let hidden = p
        .model
        .forward(
            std::slice::from_ref(&ids),
            pixels.as_ref(),
            None,
            &mut KvCache::new(),
            Mode::Infer,
        )
        .expect("forward");
    let last = hidden.narrow(1, ids.len() - 1, 1).expect("last");
    let logits = p
        .model
        .language_model
        .logits(&last)
        .and_then(|l| Ok(l.flatten_all()?))
        .expect("logits");
    let dense = Pipeline::load(&PipelineOptions::new(
        fixture().join("model").to_string_lossy(),
    ))
    .expect("loads");
    let dense_head_logits = dense
        .model
        .language_model
        .logits(&last)
        .and_then(|l| Ok(l.flatten_all()?))
        .expect("logits");
    let want: &Tensor = &tensors["last_logits"];
    let spread = (want.max(0).and_then(|m| m.to_scalar::<f32>()).expect("max")
        - want.min(0).and_then(|m| m.to_scalar::<f32>()).expect("min"))
    .abs();
    let error = |logits: Tensor| {
        (logits - want)
            .and_then(|d| d.abs()?.max(0)?.to_scalar::<f32>())
            .expect("difference")
            / spread
    };
    let logit_error = error(logits);
    let dense_head_error = error(dense_head_logits);
    let greedy = p
        .generate(&ids, images.as_ref(), &Default::default(), 20, &[], |_| {})
        .expect("generate")
        .token_ids;
    Run {
        logit_error,
        dense_head_error,
        greedy,
    }
}

#[test]
fn quantized_decoders_stay_near_f32() {
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture().join("expected.json")).expect("expected.json"),
    )
    .expect("json");
    let hf: Vec<u32> = serde_json::from_value(expected["greedy_tokens"].clone()).expect("tokens");
    let f32_run = run(None);
    let q8 = run(Some(Quantize::Bits8));
    let q4 = run(Some(Quantize::Bits4));
    eprintln!(
        "last logits vs transformers f32, max error / spread: f32 {:e}, 8-bit {:e}, 4-bit {:e}",
        f32_run.logit_error, q8.logit_error, q4.logit_error
    );
    eprintln!(
        "the same with lm_head f32: 8-bit {:e}, 4-bit {:e}",
        q8.dense_head_error, q4.dense_head_error
    );
    let agree = |r: &Run| r.greedy.iter().zip(&hf).take_while(|(a, b)| a == b).count();
    eprintln!(
        "greedy tokens agreeing with transformers: 8-bit {}, 4-bit {}",
        agree(&q8),
        agree(&q4)
    );
    assert_eq!(f32_run.greedy, hf);
    assert!(
        q8.logit_error < 0.03,
        "8-bit logits off by {}",
        q8.logit_error
    );
    assert!(
        q4.logit_error < 0.3,
        "4-bit logits off by {}",
        q4.logit_error
    );
    // Each is quantized, and 4 bits lose more than 8.
    assert!(f32_run.logit_error < 1e-4 && q8.logit_error > 1e-4 && q4.logit_error > q8.logit_error);
    assert_eq!(
        q8.greedy, hf,
        "8 bits keep every greedy choice (margins >= 0.1)"
    );
}

/// `--vision-dtype bf16` under an f32 decoder: the tower's products and activations in bf16,
/// the features cast back to f32 for the projector.
#[test]
fn a_bf16_tower_stays_near_f32() {
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture().join("expected.json")).expect("expected.json"),
    )
    .expect("json");
    let hf: Vec<u32> = serde_json::from_value(expected["greedy_tokens"].clone()).expect("tokens");
    let f32_run = run(None);
    let tower = run_with(None, Some(DType::BF16));
    let agree = tower
        .greedy
        .iter()
        .zip(&hf)
        .take_while(|(a, b)| a == b)
        .count();
    eprintln!(
        "last logits vs transformers f32, max error / spread: f32 {:e}, bf16 tower {:e}; greedy tokens agreeing: {agree}",
        f32_run.logit_error, tower.logit_error
    );
    // The tower is in bf16 (the logits moved), not far off, and every greedy choice is kept.
    assert!(tower.logit_error > f32_run.logit_error && tower.logit_error < 0.01);
    assert_eq!(tower.greedy, hf);
}
