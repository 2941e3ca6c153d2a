//! LoRA training against peft (`tools/make_lora_train_fixture.py`): from a saved peft adapter
//! whose `lora_B` and projector are not the init's, the step-1 loss of the fixture batch, the
//! gradients reaching `lora_A`, `lora_B` and the projector, and five AdamW steps with the
//! projector at its own learning rate; and the five steps in bf16 mixed precision against
//! peft under PyTorch's autocast.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Var;
use llava_model::language_model::KvCache;
use llava_model::lora::LoraTraining;
use llava_model::loss::causal_lm_loss;
use llava_model::nn::Mode;
use llava_model::weights::hf_llava_name;
use llava_model::{Checkpoint, DType, Device, Llava, Tensor};
use llava_train::optim::{AdamW, AdamWConfig};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn read(dir: &str, f: &str) -> Value {
    let text = std::fs::read_to_string(fixtures().join(dir).join(f)).expect(f);
    serde_json::from_str(&text).expect("json")
}

struct Setup {
    model: Llava,
    vars: Vec<(String, Var)>,
    ids: Vec<Vec<u32>>,
    labels: Vec<Vec<i64>>,
    mask: Tensor,
    pixels: Tensor,
}

/// The fixture model with the adapter's pairs and projector as the only trainables.
fn setup() -> Setup {
    setup_in(false)
}

/// As [`setup`]; with `bf16`, the frozen base and the activations in bf16 under f32 masters.
fn setup_in(bf16: bool) -> Setup {
    let batch = read("train", "batch.json");
    let mask: Vec<Vec<u8>> = serde_json::from_value(batch["attention_mask"].clone()).expect("mask");
    let tensors =
        candle_core::safetensors::load(fixtures().join("train/expected.safetensors"), &Device::Cpu)
            .expect("tensors");
    let model_dir = fixtures().join("models/llava15-default/model");
    let checkpoint = Checkpoint::open(&model_dir.to_string_lossy(), None).expect("checkpoint");
    let dtype = if bf16 { DType::BF16 } else { DType::F32 };
    let mut weights = checkpoint.weights(dtype, &Device::Cpu).expect("weights");
    if bf16 {
        weights.set_master_dtype(DType::F32);
    }
    weights.set_trainable(|n| n.starts_with("multi_modal_projector."));
    let lora = LoraTraining::from_adapter(&fixtures().join("lora-train/adapter")).expect("adapter");
    assert_eq!(lora.lora_dropout, 0.0);
    weights
        .set_lora_training(lora, hf_llava_name)
        .expect("lora");
    let model = Llava::load(&checkpoint.config, &weights).expect("model");
    Setup {
        model,
        vars: weights.take_vars(),
        ids: serde_json::from_value(batch["input_ids"].clone()).expect("ids"),
        labels: serde_json::from_value(batch["labels"].clone()).expect("labels"),
        mask: Tensor::new(mask, &Device::Cpu).expect("mask"),
        pixels: tensors["pixel_values"].clone(),
    }
}

fn loss(s: &Setup) -> Tensor {
    let hidden = s
        .model
        .forward(
            &s.ids,
            Some(&s.pixels),
            Some(&s.mask),
            &mut KvCache::new(),
            Mode::Train,
        )
        .expect("forward");
    let logits = s.model.language_model.logits(&hidden).expect("logits");
    causal_lm_loss(&logits, &s.labels).expect("loss").0
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .and_then(|a| a.flatten_all()?.max(0)?.to_scalar())
        .expect("max")
}

#[test]
fn lora_loss_and_gradients_match_peft() {
    let expected = read("lora-train", "expected.json");
    let s = setup();
    assert_eq!(
        s.vars.len() as u64,
        expected["trainable_tensors"].as_u64().expect("count"),
        "the pairs of every adapted layer and the projector, nothing else"
    );
    assert!(
        s.vars
            .iter()
            .all(|(n, _)| n.contains(".lora_") || n.starts_with("multi_modal_projector."))
    );
    let loss = loss(&s);
    let ours = loss.to_scalar::<f32>().expect("scalar") as f64;
    let theirs = expected["loss"].as_f64().expect("loss");
    let rel = (ours - theirs).abs() / theirs.abs();
    eprintln!("loss {ours} vs {theirs}: rel {rel:e}");
    assert!(rel <= 1e-5, "step-1 loss: {ours} vs {theirs} (rel {rel:e})");

    let want = candle_core::safetensors::load(
        fixtures().join("lora-train/expected.safetensors"),
        &Device::Cpu,
    )
    .expect("grads");
    let vars: HashMap<&str, &Var> = s.vars.iter().map(|(n, v)| (n.as_str(), v)).collect();
    let grads = loss.backward().expect("backward");
    for name in expected["grads"].as_array().expect("grads") {
        let name = name.as_str().expect("name");
        let got = grads
            .get(vars[name].as_tensor())
            .unwrap_or_else(|| panic!("no gradient reached {name}"));
        let want = &want[&format!("grad.{name}")];
        let scale = max_abs(want);
        assert!(scale > 0.0, "{name}: the reference gradient is not zero");
        let rel = max_abs(&(got - want).expect("diff")) / scale;
        eprintln!("grad {name}: max rel diff {rel:e}");
        assert!(rel <= 1e-4, "{name}: max diff / max |grad| = {rel:e}");
    }
}

#[test]
fn five_lora_steps_match_peft() {
    five_steps(
        "expected.json",
        false,
        |step| if step == 0 { 1e-5 } else { 1e-3 },
    );
}

/// `--bf16 --lora` against peft under autocast-bf16 over f32 parameters: 1e-2 relative.
#[test]
fn five_bf16_lora_steps_match_peft_under_autocast() {
    five_steps("bf16.json", true, |_| 1e-2);
}

/// Five steps from the saved adapter, their losses against `file`'s within `tol(step)`.
fn five_steps(file: &str, bf16: bool, tol: impl Fn(usize) -> f64) {
    let expected = read("lora-train", file);
    let opt = &expected["optimizer"];
    let lr = opt["lr"].as_f64().expect("lr");
    let projector_lr = opt["projector_lr"].as_f64().expect("projector lr");
    let s = setup_in(bf16);
    let config = AdamWConfig {
        lr,
        ..Default::default()
    };
    let mut optimizer = AdamW::new(s.vars.clone(), config).expect("optimizer");
    for p in &mut optimizer.params {
        if p.name.starts_with("multi_modal_projector.") {
            p.lr_scale = projector_lr / lr;
        }
    }
    let theirs: Vec<f64> = serde_json::from_value(expected["losses"].clone()).expect("losses");
    for (step, want) in theirs.iter().enumerate() {
        let loss = loss(&s);
        let ours = loss.to_scalar::<f32>().expect("scalar") as f64;
        let rel = (ours - want).abs() / want.abs();
        eprintln!(
            "{file} step {}: {ours:.6} vs {want:.6} (rel {rel:.1e})",
            step + 1
        );
        assert!(rel <= tol(step), "step {}: {ours} vs {want}", step + 1);
        let grads = loss.backward().expect("backward");
        optimizer.step(&grads, lr, 1.0).expect("step");
    }
}
