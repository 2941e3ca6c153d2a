//! Training LLaVA-NeXT against PyTorch (`tools/make_next_train_fixture.py`): two records about
//! images of different tilings go through the trainer's own data path (`TrainDataset`: each
//! image's positions from its size, the batch's images as `ImageInputs`) and loss
//! (`batch_loss`). The batch equals transformers', the loss agrees to 1e-5 and the gradients of
//! the projector, `image_newline` and the decoder to 1e-4 of their largest value.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use llava_data::conversation::ConvTemplate;
use llava_data::record::LlavaRecord;
use llava_data::sample::SampleOptions;
use llava_data::tokenizer::Tokenizer;
use llava_model::pipeline::image_processor;
use llava_model::{Checkpoint, DType, Device, Llava, Tensor};
use llava_train::data::{DataStats, TrainDataset};
use llava_train::trainer::{Stage, batch_loss};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn read(f: &str) -> Value {
    let text = std::fs::read_to_string(fixtures().join("train-next").join(f)).expect(f);
    serde_json::from_str(&text).expect("json")
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .and_then(|t| t.flatten_all()?.max(0)?.to_scalar::<f32>())
        .expect("max")
}

/// The fixture's records over the llava-next checkpoint, cut at `max_length`.
fn dataset(batch_json: &Value, max_length: usize, strict: bool) -> (Checkpoint, TrainDataset) {
    let dir = fixtures().join("models/llava-next/model");
    let checkpoint = Checkpoint::open(&dir.to_string_lossy(), None).expect("checkpoint");
    let tokenizer = Tokenizer::from_dir(&checkpoint.dir).expect("tokenizer");
    let records: Vec<LlavaRecord> =
        serde_json::from_value(batch_json["records"].clone()).expect("records");
    let data = TrainDataset {
        records,
        image_folder: Some(fixtures().join("models/images")),
        image_processor: image_processor(&checkpoint, None).expect("processor"),
        sample: SampleOptions {
            template: ConvTemplate::LlavaV1,
            image_tokens: checkpoint.image_tokens(&tokenizer).expect("image tokens"),
            image_seq_len: checkpoint.config.image_seq_len(),
            max_length,
            keep_image_position: false,
        },
        model_config: checkpoint.config.clone(),
        pad_id: tokenizer.token_to_id("<pad>").expect("pad"),
        tokenizer,
        strict,
    };
    (checkpoint, data)
}

#[test]
fn llava_next_batch_loss_and_gradients_match_pytorch() {
    let batch_json = read("batch.json");
    let expected = read("expected.json");
    let tensors = candle_core::safetensors::load(
        fixtures().join("train-next/expected.safetensors"),
        &Device::Cpu,
    )
    .expect("tensors");

    let (checkpoint, data) = dataset(&batch_json, 2048, true);
    let mut stats = DataStats::default();
    let items: Vec<_> = (0..data.records.len())
        .map(|i| data.item(i, &mut stats).expect("item").expect("usable"))
        .collect();
    let batch = data.collate(&items, &Device::Cpu).expect("collate");

    // The same ids and labels as transformers' processor gives: each image's count from its size.
    let ids: Vec<Vec<u32>> = serde_json::from_value(batch_json["input_ids"].clone()).expect("ids");
    let labels: Vec<Vec<i64>> =
        serde_json::from_value(batch_json["labels"].clone()).expect("labels");
    assert_eq!(batch.input_ids, ids);
    assert_eq!(batch.labels, labels);
    let images = batch.images.as_ref().expect("images");
    let sizes: Vec<(u32, u32)> =
        serde_json::from_value::<Vec<[u32; 2]>>(expected["image_sizes"].clone())
            .expect("sizes")
            .into_iter()
            .map(|[h, w]| (h, w))
            .collect();
    assert_eq!(images.image_sizes, sizes);

    let mut weights = checkpoint
        .weights(DType::F32, &Device::Cpu)
        .expect("weights");
    weights.set_trainable(|n| Stage::Finetune.trains(n, false));
    let model = Llava::load(&checkpoint.config, &weights).expect("model");
    let vars: HashMap<String, candle_core::Var> = weights.take_vars().into_iter().collect();
    assert!(
        vars.contains_key("image_newline"),
        "image_newline trains in stage 2"
    );

    let (loss, n) = batch_loss(&model, &batch, false).expect("loss");
    assert_eq!(n as u64, expected["supervised_tokens"].as_u64().expect("n"));
    let ours = loss.to_scalar::<f32>().expect("scalar") as f64;
    let theirs = expected["loss"].as_f64().expect("loss");
    let rel = (ours - theirs).abs() / theirs.abs();
    eprintln!("loss {ours} vs {theirs}: rel {rel:e}");
    assert!(rel <= 1e-5, "loss {ours} vs {theirs} (rel {rel:e})");

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
        let rel = max_abs(&(got - want).expect("diff")) / scale;
        eprintln!("grad {name}: max diff / max |grad| = {rel:e}");
        assert!(rel <= 1e-4, "{name}: {rel:e}");
    }
}

/// Stage 1 trains the projector alone: LLaVA-NeXT's row separator waits for stage 2, as in its
/// own trainer.
#[test]
fn image_newline_trains_in_stage_two_only() {
    assert!(!Stage::Pretrain.trains("image_newline", false));
    assert!(Stage::Finetune.trains("image_newline", false));
}

/// A `--max-length` that cuts through an image's positions would leave features with nowhere
/// to go: such a record is skipped (or, strict, refused), naming the cause.
#[test]
fn a_cut_through_an_image_skips_the_record() {
    let batch_json = read("batch.json");
    // The first record's image takes positions 36..149 or so; 100 cuts through it.
    let (_, data) = dataset(&batch_json, 100, false);
    let mut stats = DataStats::default();
    assert!(data.item(0, &mut stats).expect("item").is_none());
    assert_eq!(stats.skipped, 1);
    let (_, strict) = dataset(&batch_json, 100, true);
    let e = match strict.item(0, &mut DataStats::default()) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a strict run refuses it"),
    };
    assert!(e.contains("cuts through its image"), "{e}");
}
