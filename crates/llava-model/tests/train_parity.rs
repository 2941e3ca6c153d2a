//! Training parity with PyTorch (`tools/make_train_fixtures.py`): the loss of a padded batch of
//! two llava_v1 samples and the gradients reaching the projector and the language model.
//! Gradients must reach the projector: with candle's fused (backward-less) kernels on the
//! training path they would silently be zero.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use llava_model::language_model::KvCache;
use llava_model::loss::causal_lm_loss;
use llava_model::nn::Mode;
use llava_model::{Checkpoint, DType, Device, Llava, Tensor};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

struct Batch {
    input_ids: Vec<Vec<u32>>,
    labels: Vec<Vec<i64>>,
    mask: Tensor,
}

fn load() -> (Value, HashMap<String, Tensor>, Batch) {
    let dir = fixtures().join("train");
    let read = |f: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join(f)).expect(f)).expect("json")
    };
    let batch = read("batch.json");
    let mask: Vec<Vec<u8>> = serde_json::from_value(batch["attention_mask"].clone()).expect("mask");
    let batch = Batch {
        input_ids: serde_json::from_value(batch["input_ids"].clone()).expect("ids"),
        labels: serde_json::from_value(batch["labels"].clone()).expect("labels"),
        mask: Tensor::new(mask, &Device::Cpu).expect("mask"),
    };
    let tensors = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu)
        .expect("tensors");
    (read("expected.json"), tensors, batch)
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .and_then(|a| a.flatten_all())
        .and_then(|a| a.max(0))
        .and_then(|m| m.to_scalar())
        .expect("max")
}

/// The fixture model, with the weights that `select` picks loaded as trainable `Var`s.
fn model_with_trainable(
    select: impl Fn(&str) -> bool + 'static,
) -> (Llava, Vec<(String, candle_core::Var)>) {
    let dir = fixtures().join("models/llava15-default/model");
    let checkpoint = Checkpoint::open(&dir.to_string_lossy(), None).expect("checkpoint");
    let mut weights = checkpoint
        .weights(DType::F32, &Device::Cpu)
        .expect("weights");
    weights.set_trainable(select);
    let model = Llava::load(&checkpoint.config, &weights).expect("model");
    (model, weights.take_vars())
}

/// Final hidden states of the fixture batch.
fn batch_hidden(
    model: &Llava,
    tensors: &HashMap<String, Tensor>,
    batch: &Batch,
    mode: Mode,
) -> Tensor {
    model
        .forward(
            &batch.input_ids,
            Some(&tensors["pixel_values"]),
            Some(&batch.mask),
            &mut KvCache::new(),
            mode,
        )
        .expect("forward")
}

#[test]
fn loss_and_gradients_match_pytorch() {
    let (expected, tensors, batch) = load();
    let (model, vars) = model_with_trainable(|n| {
        n.starts_with("multi_modal_projector.") || n.starts_with("language_model.")
    });
    let vars: HashMap<String, candle_core::Var> = vars.into_iter().collect();
    assert!(
        !vars.keys().any(|n| n.starts_with("vision_tower.")),
        "the vision tower stays frozen"
    );

    let hidden = batch_hidden(&model, &tensors, &batch, Mode::Train);
    let logits = model.language_model.logits(&hidden).expect("logits");
    let (loss, n) = causal_lm_loss(&logits, &batch.labels).expect("loss");
    assert_eq!(n as u64, expected["supervised_tokens"].as_u64().expect("n"));
    let ours = loss.to_scalar::<f32>().expect("scalar") as f64;
    let theirs = expected["loss"].as_f64().expect("loss");
    let rel = (ours - theirs).abs() / theirs.abs();
    eprintln!("loss {ours} vs {theirs}: rel {rel:e}");
    assert!(rel <= 1e-5, "step-1 loss: {ours} vs {theirs} (rel {rel:e})");

    let grads = loss.backward().expect("backward");
    for name in expected["grads"].as_array().expect("grads") {
        let name = name.as_str().expect("name");
        let var = vars
            .get(name)
            .unwrap_or_else(|| panic!("{name} is trainable"));
        let got = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient reached {name}"));
        let want = &tensors[&format!("grad.{name}")];
        let scale = max_abs(want);
        assert!(scale > 0.0, "{name}: the reference gradient is not zero");
        let rel = max_abs(&(got - want).expect("diff")) / scale;
        eprintln!("grad {name}: max rel diff {rel:e}");
        assert!(
            rel <= 1e-4,
            "{name}: gradient max diff / max |grad| = {rel:e}"
        );
    }
}

#[test]
fn loss_rejects_unusable_labels() {
    let logits = Tensor::zeros((1, 3, 5), DType::F32, &Device::Cpu).expect("zeros");
    assert!(
        causal_lm_loss(&logits, &[vec![-100, -100, -100]]).is_err(),
        "nothing supervised"
    );
    assert!(
        causal_lm_loss(&logits, &[vec![0, 9, 1]]).is_err(),
        "label outside the vocabulary"
    );
    assert!(
        causal_lm_loss(&logits, &[vec![0, 1]]).is_err(),
        "wrong length"
    );
    let (loss, n) = causal_lm_loss(&logits, &[vec![-100, 2, 4]]).expect("loss");
    assert_eq!(n, 2);
    let uniform = (5f32).ln();
    assert!(
        (loss.to_scalar::<f32>().expect("scalar") - uniform).abs() < 1e-6,
        "uniform logits give ln(vocab)"
    );
}

/// Why `Mode::Train` exists: through candle's fused inference kernels the same loss leaves the
/// projector without a gradient.
#[test]
fn fused_inference_kernels_cut_the_gradient() {
    let (_, tensors, batch) = load();
    let (model, vars) = model_with_trainable(|n| n.starts_with("multi_modal_projector."));
    assert_eq!(vars.len(), 4, "two linears, weight and bias each");
    let grad_norm = |mode: Mode| -> f32 {
        let logits = model
            .language_model
            .logits(&batch_hidden(&model, &tensors, &batch, mode))
            .expect("logits");
        let grads = causal_lm_loss(&logits, &batch.labels)
            .expect("loss")
            .0
            .backward()
            .expect("backward");
        vars.iter()
            .filter_map(|(_, v)| grads.get(v.as_tensor()))
            .map(max_abs)
            .fold(0.0, f32::max)
    };
    assert!(
        grad_norm(Mode::Train) > 0.0,
        "the training path reaches the projector"
    );
    assert_eq!(grad_norm(Mode::Infer), 0.0, "the fused path does not");
}

#[test]
fn loss_from_hidden_equals_loss_from_logits() {
    let (_, tensors, batch) = load();
    let (model, _) = model_with_trainable(|_| false);
    let hidden = batch_hidden(&model, &tensors, &batch, Mode::Train);
    let logits = model.language_model.logits(&hidden).expect("logits");
    let (a, n) = causal_lm_loss(&logits, &batch.labels).expect("loss");
    let (b, m) = llava_model::loss::causal_lm_loss_from_hidden(
        &hidden,
        &model.language_model.lm_head,
        &batch.labels,
    )
    .expect("loss");
    assert_eq!(n, m);
    let (a, b) = (
        a.to_scalar::<f32>().expect("a"),
        b.to_scalar::<f32>().expect("b"),
    );
    assert!((a - b).abs() <= 1e-6 * a.abs(), "{a} vs {b}");
}

/// Loss and every trainable weight's gradient of the fixture batch, with the decoder's layers
/// checkpointed (recomputed in backward) or not. `text_only` drops the image, so that the
/// layers' input carries no graph when the embeddings are frozen.
fn loss_and_grads(
    select: fn(&str) -> bool,
    checkpointed: bool,
    text_only: bool,
) -> (f32, Vec<(String, Tensor)>) {
    let (_, tensors, batch) = load();
    let (mut model, vars) = model_with_trainable(select);
    if checkpointed {
        model
            .language_model
            .enable_gradient_checkpointing()
            .expect("checkpointing");
    }
    let hidden = if text_only {
        let image = model.config.image_token_index;
        let ids: Vec<Vec<u32>> = batch
            .input_ids
            .iter()
            .map(|row| {
                row.iter()
                    .map(|&t| if t == image { 1 } else { t })
                    .collect()
            })
            .collect();
        model
            .forward(
                &ids,
                None,
                Some(&batch.mask),
                &mut KvCache::new(),
                Mode::Train,
            )
            .expect("forward")
    } else {
        batch_hidden(&model, &tensors, &batch, Mode::Train)
    };
    let logits = model.language_model.logits(&hidden).expect("logits");
    let (loss, _) = causal_lm_loss(&logits, &batch.labels).expect("loss");
    let mut grads = loss.backward().expect("backward");
    model
        .language_model
        .add_recomputed_grads(&mut grads)
        .expect("recomputed grads");
    let grads = vars
        .iter()
        .map(|(name, var)| {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient reached {name}"));
            (name.clone(), g.clone())
        })
        .collect();
    (loss.to_scalar::<f32>().expect("loss"), grads)
}

fn assert_checkpointing_changes_nothing(select: fn(&str) -> bool, text_only: bool) {
    let (loss, grads) = loss_and_grads(select, false, text_only);
    let (loss_c, grads_c) = loss_and_grads(select, true, text_only);
    assert!(
        (loss - loss_c).abs() <= 1e-6 * loss.abs(),
        "loss {loss} vs {loss_c} checkpointed"
    );
    assert!(!grads.is_empty());
    for ((name, g), (_, gc)) in grads.iter().zip(&grads_c) {
        let scale = max_abs(g);
        assert!(scale > 0.0, "{name}: a zero gradient tests nothing");
        let rel = max_abs(&(g - gc).expect("diff")) / scale;
        assert!(
            rel <= 1e-6,
            "{name}: checkpointed gradient differs by {rel:e}"
        );
    }
}

#[test]
fn gradient_checkpointing_gives_the_same_loss_and_gradients() {
    // Stage 2: the projector and the whole language model.
    assert_checkpointing_changes_nothing(
        |n| n.starts_with("multi_modal_projector.") || n.starts_with("language_model."),
        false,
    );
    // Stage 1: the projector alone, under frozen (recomputed) layers.
    assert_checkpointing_changes_nothing(|n| n.starts_with("multi_modal_projector."), false);
}

#[test]
fn gradient_checkpointing_reaches_layers_whose_input_carries_no_graph() {
    // Frozen embeddings, no image: only the layers' own weights train (as LoRA does).
    assert_checkpointing_changes_nothing(|n| n.starts_with("language_model.layers."), true);
}
