//! Five AdamW steps on the fixture batch, stage 1 (projector only) and stage 2 (projector +
//! language model), against the per-step losses PyTorch recorded (`tools/make_train_fixtures.py`).

use std::path::{Path, PathBuf};

use llava_model::language_model::KvCache;
use llava_model::loss::causal_lm_loss;
use llava_model::nn::Mode;
use llava_model::{Checkpoint, DType, Device, Llava, Tensor};
use llava_train::optim::{AdamW, AdamWConfig};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn read(f: &str) -> Value {
    let text = std::fs::read_to_string(fixtures().join("train").join(f)).expect(f);
    serde_json::from_str(&text).expect("json")
}

fn run(trainable: &'static [&'static str], steps: usize) -> Vec<f64> {
    let batch = read("batch.json");
    let ids: Vec<Vec<u32>> = serde_json::from_value(batch["input_ids"].clone()).expect("ids");
    let labels: Vec<Vec<i64>> = serde_json::from_value(batch["labels"].clone()).expect("labels");
    let mask: Vec<Vec<u8>> = serde_json::from_value(batch["attention_mask"].clone()).expect("mask");
    let mask = Tensor::new(mask, &Device::Cpu).expect("mask");
    let tensors =
        candle_core::safetensors::load(fixtures().join("train/expected.safetensors"), &Device::Cpu)
            .expect("tensors");
    let pixels = &tensors["pixel_values"];

    let checkpoint = Checkpoint::open(
        &fixtures()
            .join("models/llava15-default/model")
            .to_string_lossy(),
        None,
    )
    .expect("checkpoint");
    let mut weights = checkpoint
        .weights(DType::F32, &Device::Cpu)
        .expect("weights");
    weights.set_trainable(|n| trainable.iter().any(|t| n.starts_with(t)));
    let model = Llava::load(&checkpoint.config, &weights).expect("model");
    let config = AdamWConfig {
        lr: 1e-3,
        ..Default::default()
    };
    let mut opt = AdamW::new(weights.take_vars(), config).expect("optimizer");
    let mut losses = Vec::new();
    for _ in 0..steps {
        let hidden = model
            .forward(
                &ids,
                Some(pixels),
                Some(&mask),
                &mut KvCache::new(),
                Mode::Train,
            )
            .expect("forward");
        let logits = model.language_model.logits(&hidden).expect("logits");
        let (loss, _) = causal_lm_loss(&logits, &labels).expect("loss");
        losses.push(loss.to_scalar::<f32>().expect("scalar") as f64);
        let grads = loss.backward().expect("backward");
        opt.step(&grads, config.lr, 1.0).expect("step");
    }
    losses
}

fn check(stage: &str, ours: &[f64]) {
    let expected = read("expected.json");
    let theirs: Vec<f64> =
        serde_json::from_value(expected[format!("{stage}_losses")].clone()).expect("losses");
    assert_eq!(ours.len(), theirs.len());
    for (step, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        let rel = (a - b).abs() / b.abs();
        eprintln!(
            "{stage} step {}: {a:.6} vs {b:.6} (rel {rel:.1e})",
            step + 1
        );
        let tol = if step == 0 { 1e-5 } else { 1e-3 };
        assert!(rel <= tol, "{stage} step {}: {a} vs {b}", step + 1);
    }
}

#[test]
fn stage1_projector_only_matches_pytorch() {
    check("stage1", &run(&["multi_modal_projector."], 5));
}

#[test]
fn stage2_projector_and_language_model_match_pytorch() {
    check(
        "stage2",
        &run(
            &["multi_modal_projector.", "language_model.", "lm_head."],
            5,
        ),
    );
}
