//! Bad input gives a one-line message naming the file or field, a non-zero exit, and no panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;

use common::copy_dir;

fn fixture_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/llava15-default/model")
}

fn image() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models/images/shapes_64x48.png")
}

/// A scratch copy of the tiny fixture checkpoint that a test may break.
fn scratch_model(tmp: &tempfile::TempDir) -> PathBuf {
    scratch_copy(tmp, &fixture_model())
}

/// A scratch copy of the checkpoint directory `from`, as `tmp/model`.
fn scratch_copy(tmp: &tempfile::TempDir, from: &Path) -> PathBuf {
    copy_dir(from, &tmp.path().join("model"))
}

fn llava(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_llava"))
        .args(args)
        .output()
        .expect("runs")
}

fn generate(model: &Path, image: &Path, prompt: &str) -> Output {
    generate_with(model, image, prompt, &[])
}

/// [`generate`] with `extra` flags after the usual ones.
fn generate_with(model: &Path, image: &Path, prompt: &str, extra: &[&str]) -> Output {
    let (model, image) = (model.to_string_lossy(), image.to_string_lossy());
    let mut args = vec![
        "generate",
        "--model",
        &model,
        "--image",
        &image,
        "--prompt",
        prompt,
        "--max-new-tokens",
        "2",
    ];
    args.extend_from_slice(extra);
    llava(&args)
}

/// Fails cleanly (exit 1, no panic) with a message containing every `needles`.
fn assert_clean_failure(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit code; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    for n in needles {
        assert!(stderr.contains(n), "stderr should mention {n:?}: {stderr}");
    }
}

#[test]
fn fixture_generates() {
    let out = generate(&fixture_model(), &image(), "What is this?");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An image URL that answers 404, answers with something that is not an image, or does not
/// answer: each is named, with the URL.
#[test]
fn image_url_that_fails() {
    let missing = format!(
        "{}/gone.png",
        common::serve("404 Not Found", b"no".to_vec())
    );
    assert_clean_failure(
        &llava_image_url(&missing),
        &[missing.as_str(), "404 Not Found"],
    );
    let html = format!(
        "{}/page",
        common::serve("200 OK", b"<html></html>".to_vec())
    );
    assert_clean_failure(&llava_image_url(&html), &[html.as_str()]);
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let refused = format!("http://127.0.0.1:{port}/a.png");
    assert_clean_failure(
        &llava_image_url(&refused),
        &["cannot download", refused.as_str()],
    );
}

fn llava_image_url(url: &str) -> Output {
    llava(&[
        "generate",
        "--model",
        &fixture_model().to_string_lossy(),
        "--image",
        url,
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "2",
    ])
}

fn lora_release(tmp: &tempfile::TempDir) -> PathBuf {
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models/original-lora/lora"),
        &tmp.path().join("lora"),
    )
}

fn generate_over_base(release: &Path, base: &Path) -> Output {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models");
    llava(&[
        "generate",
        "--model",
        &release.to_string_lossy(),
        "--model-base",
        &base.to_string_lossy(),
        "--vision-tower",
        &fixtures.join("original-layout/clip").to_string_lossy(),
        "--image",
        &image().to_string_lossy(),
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "2",
    ])
}

/// A LoRA release is not a whole model: without `--model-base`, or with parts missing or of a
/// kind that cannot be merged as `scale·B·A`, it is named, never half-loaded.
#[test]
fn lora_release_that_cannot_load() {
    let base = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models/original-lora/base");
    let tmp = tempfile::tempdir().expect("tmp");
    let lora = lora_release(&tmp);
    let clip = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models/original-layout/clip");
    let alone = |release: &Path| {
        llava(&[
            "generate",
            "--model",
            &release.to_string_lossy(),
            "--vision-tower",
            &clip.to_string_lossy(),
            "--image",
            &image().to_string_lossy(),
            "--prompt",
            "Hi",
        ])
    };
    assert_clean_failure(&alone(&lora), &["LoRA release", "--model-base"]);
    let projector_only = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models/original-lora/projector-only");
    assert_clean_failure(
        &alone(&projector_only),
        &["projector-only release", "--model-base"],
    );
    assert_clean_failure(
        &generate_over_base(&lora, Path::new("/no/such/vicuna")),
        &["--model-base /no/such/vicuna"],
    );
    assert_clean_failure(
        &generate_over_base(&lora, &fixture_model()),
        &["--model-base is an HF-layout LLaVA checkpoint"],
    );
    // --model-base over a complete HF checkpoint.
    assert_clean_failure(
        &generate_over_base(&fixture_model(), &base),
        &["--model-base", "HF-layout"],
    );
    // DoRA adapters are not plain LoRA.
    edit_json(&lora.join("adapter_config.json"), |c| {
        c["use_dora"] = serde_json::json!(true)
    });
    assert_clean_failure(
        &generate_over_base(&lora, &base),
        &["adapter_config.json", "use_dora"],
    );
    edit_json(&lora.join("adapter_config.json"), |c| {
        c["use_dora"] = serde_json::json!(false)
    });
    std::fs::remove_file(lora.join("non_lora_trainables.bin")).expect("rm");
    assert_clean_failure(
        &generate_over_base(&lora, &base),
        &["non_lora_trainables.bin"],
    );
}

#[test]
fn missing_model_directory() {
    let out = generate(Path::new("/nonexistent/llava"), &image(), "Hi");
    assert_clean_failure(&out, &["/nonexistent/llava"]);
}

#[test]
fn hub_id_not_in_cache() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = Command::new(env!("CARGO_BIN_EXE_llava"))
        .env("HF_HUB_CACHE", tmp.path())
        .args([
            "generate",
            "--model",
            "llava-hf/llava-1.5-7b-hf",
            "--prompt",
            "Hi",
        ])
        .output()
        .expect("runs");
    assert_clean_failure(&out, &["llava-hf/llava-1.5-7b-hf", "cache"]);
}

#[test]
fn missing_config() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = scratch_model(&tmp);
    std::fs::remove_file(dir.join("config.json")).expect("rm");
    assert_clean_failure(&generate(&dir, &image(), "Hi"), &["config.json"]);
}

#[test]
fn malformed_config() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = scratch_model(&tmp);
    std::fs::write(dir.join("config.json"), "{\"vision_config\": ").expect("write");
    assert_clean_failure(&generate(&dir, &image(), "Hi"), &["config.json", "JSON"]);
}

/// Valid JSON with a value of the wrong type: the message names the field's path.
#[test]
fn config_field_of_the_wrong_type() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = scratch_model(&tmp);
    edit_json(&dir.join("config.json"), |config| {
        config["text_config"]["hidden_size"] = serde_json::json!("64");
    });
    assert_clean_failure(
        &generate(&dir, &image(), "Hi"),
        &["config.json", "field `text_config.hidden_size`"],
    );
}

/// `generation_config.json` holds the stop ids; a broken one is named, not skipped.
#[test]
fn generation_config_stop_ids_of_the_wrong_type() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = scratch_model(&tmp);
    edit_json(&dir.join("generation_config.json"), |config| {
        config["eos_token_id"] = serde_json::json!("</s>");
    });
    assert_clean_failure(
        &generate(&dir, &image(), "Hi"),
        &["generation_config.json", "field `eos_token_id`"],
    );
}

#[test]
fn unsupported_config_value() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = scratch_model(&tmp);
    let text = std::fs::read_to_string(dir.join("config.json")).expect("read");
    let text = text.replace("\"rope_type\": \"default\"", "\"rope_type\": \"longrope\"");
    std::fs::write(dir.join("config.json"), text).expect("write");
    assert_clean_failure(
        &generate(&dir, &image(), "Hi"),
        &["config.json", "longrope"],
    );
}

/// A tokenizer.json cut off inside its decoder: the tokenizers crate itself panics on that
/// (it `expect`s the decoder to parse), so it must be caught before.
#[test]
fn truncated_tokenizer_json() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = scratch_model(&tmp);
    let text = std::fs::read_to_string(dir.join("tokenizer.json")).expect("read");
    let decoder = text
        .find("\"decoder\"")
        .expect("the fixture's tokenizer has a decoder");
    std::fs::write(dir.join("tokenizer.json"), &text[..decoder + 20]).expect("write");
    assert_clean_failure(
        &generate(&dir, &image(), "Hi"),
        &["tokenizer.json", "not valid JSON"],
    );
}

#[test]
fn truncated_safetensors() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = scratch_model(&tmp);
    let bytes = std::fs::read(dir.join("model.safetensors")).expect("read");
    std::fs::write(dir.join("model.safetensors"), &bytes[..bytes.len() / 2]).expect("write");
    assert_clean_failure(
        &generate(&dir, &image(), "Hi"),
        &["model.safetensors", "truncated or corrupt"],
    );
}

#[test]
fn truncated_pytorch_bin_shard() {
    let tmp = tempfile::tempdir().expect("tmp");
    let fixture = original_layout();
    let dir = scratch_copy(&tmp, &fixture.join("model-bin"));
    let shard = dir.join("pytorch_model-00002-of-00002.bin");
    let bytes = std::fs::read(&shard).expect("read");
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).expect("write");
    let out = llava(&[
        "generate",
        "--model",
        &dir.to_string_lossy(),
        "--vision-tower",
        &fixture.join("clip-bin").to_string_lossy(),
        "--image",
        &image().to_string_lossy(),
        "--prompt",
        "Hi",
    ]);
    assert_clean_failure(
        &out,
        &[
            "pytorch_model-00002-of-00002.bin",
            "not a readable PyTorch checkpoint",
        ],
    );
}

#[test]
fn garbage_safetensors() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = scratch_model(&tmp);
    std::fs::write(
        dir.join("model.safetensors"),
        b"this is not a safetensors file",
    )
    .expect("write");
    assert_clean_failure(&generate(&dir, &image(), "Hi"), &["model.safetensors"]);
}

/// Rewrites a scratch JSON file through `edit`.
fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json");
    edit(&mut json);
    std::fs::write(path, json.to_string()).expect("write");
}

/// Rewrites a scratch `model.safetensors`: `edit` gets its header (JSON) and data bytes.
fn edit_safetensors(dir: &Path, edit: impl FnOnce(&mut serde_json::Value, &mut Vec<u8>)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).expect("read");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).expect("header");
    let mut data = bytes[8 + n..].to_vec();
    edit(&mut header, &mut data);
    let header = serde_json::to_vec(&header).expect("json");
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header);
    out.extend(data);
    std::fs::write(&path, out).expect("write");
}

/// Two tensors pointing at the same bytes would load the wrong numbers without an error.
#[test]
fn safetensors_header_with_shared_bytes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = scratch_model(&tmp);
    edit_safetensors(&dir, |header, _| {
        let lm_head = header["language_model.lm_head.weight"]["data_offsets"].clone();
        header["language_model.model.embed_tokens.weight"]["data_offsets"] = lm_head;
    });
    assert_clean_failure(
        &generate(&dir, &image(), "Hi"),
        &["model.safetensors", "the header is damaged"],
    );
}

/// NaN weights made greedy decoding answer token 0 as if nothing were wrong.
#[test]
fn nan_weights_are_reported() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = scratch_model(&tmp);
    edit_safetensors(&dir, |header, data| {
        let span = &header["language_model.model.layers.0.input_layernorm.weight"]["data_offsets"];
        let (begin, end) = (
            span[0].as_u64().expect("begin"),
            span[1].as_u64().expect("end"),
        );
        for value in data[begin as usize..end as usize].chunks_exact_mut(4) {
            value.copy_from_slice(&f32::NAN.to_le_bytes());
        }
    });
    assert_clean_failure(&generate(&dir, &image(), "Hi"), &["NaN logits"]);
}

/// A tokenizer that disagrees with the config's vocabulary must not be embedded silently.
#[test]
fn token_id_outside_the_vocabulary() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = scratch_model(&tmp);
    edit_json(&dir.join("tokenizer.json"), |tok| {
        tok["post_processor"]["special_tokens"]["<s>"]["ids"] = serde_json::json!([5000]);
    });
    assert_clean_failure(
        &generate(&dir, &image(), "Hi"),
        &["token id 5000", "vocab_size"],
    );
}

/// A processor whose crop the tower cannot take is named when the checkpoint loads.
#[test]
fn crop_size_that_the_tower_cannot_take() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = scratch_model(&tmp);
    edit_json(&dir.join("processor_config.json"), |processor| {
        processor["image_processor"]["crop_size"] = serde_json::json!({"height": 60, "width": 60});
    });
    assert_clean_failure(
        &generate(&dir, &image(), "Hi"),
        &["processor_config.json", "crop_size", "60x60"],
    );
}

/// A config smaller than its weights runs a truncated model; transformers warns about the
/// unused weights, and so does llava.
#[test]
fn weights_the_config_does_not_use_are_reported() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = scratch_model(&tmp);
    edit_json(&dir.join("config.json"), |config| {
        config["text_config"]["num_hidden_layers"] = serde_json::json!(2);
    });
    let out = generate(&dir, &image(), "Hi");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("not used by the model") && stderr.contains("language_model.layers.2."),
        "{stderr}"
    );
    // The unchanged checkpoint uses every weight it has (CLIP's post-layernorm aside).
    let out = generate(&fixture_model(), &image(), "Hi");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("not used"));
}

#[test]
fn empty_stop_string_and_infinite_temperature() {
    let model = fixture_model();
    let run = |flag: &str, value: &str| {
        llava(&[
            "generate",
            "--model",
            &model.to_string_lossy(),
            "--image",
            &image().to_string_lossy(),
            "--prompt",
            "Hi",
            flag,
            value,
        ])
    };
    let out = run("--stop", "");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("stop string cannot be empty"), "{stderr}");
    assert_clean_failure(
        &run("--temperature", "inf"),
        &["temperature must be finite"],
    );
}

#[test]
fn missing_shard_named_by_index() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models/llava15-full-gqa-sharded/model");
    let dir = scratch_copy(&tmp, &src);
    std::fs::remove_file(dir.join("model-00002-of-00005.safetensors")).expect("rm");
    assert_clean_failure(
        &generate(&dir, &image(), "Hi"),
        &[
            "model.safetensors.index.json",
            "model-00002-of-00005.safetensors",
        ],
    );
}

/// An index entry pointing at the wrong shard is the index's fault, and is named as such.
#[test]
fn index_maps_a_tensor_to_the_wrong_shard() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models/llava15-full-gqa-sharded/model");
    let dir = scratch_copy(&tmp, &src);
    let name = "model.language_model.layers.0.mlp.up_proj.weight";
    edit_json(&dir.join("model.safetensors.index.json"), |index| {
        assert!(
            index["weight_map"][name].is_string(),
            "the fixture stores {name}"
        );
        index["weight_map"][name] = serde_json::json!("model-00005-of-00005.safetensors");
    });
    assert_clean_failure(
        &generate(&dir, &image(), "Hi"),
        &[
            "model.safetensors.index.json",
            name,
            "model-00005-of-00005.safetensors",
            "does not hold it",
        ],
    );
}

#[test]
fn tensor_of_wrong_shape() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = scratch_model(&tmp);
    // The config now promises a wider MLP than the weights have.
    let text = std::fs::read_to_string(dir.join("config.json")).expect("read");
    let text = text.replace("\"intermediate_size\": 128", "\"intermediate_size\": 96");
    std::fs::write(dir.join("config.json"), text).expect("write");
    assert_clean_failure(&generate(&dir, &image(), "Hi"), &["mlp", "shape", "96"]);
}

#[test]
fn missing_tensor() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = scratch_model(&tmp);
    let text = std::fs::read_to_string(dir.join("config.json")).expect("read");
    let text = text.replace(
        "\"num_hidden_layers\": 3,\n    \"num_key_value_heads\"",
        "\"num_hidden_layers\": 4,\n    \"num_key_value_heads\"",
    );
    assert!(
        text.contains("\"num_hidden_layers\": 4"),
        "the edit applies to the text config"
    );
    std::fs::write(dir.join("config.json"), text).expect("write");
    assert_clean_failure(
        &generate(&dir, &image(), "Hi"),
        &["language_model.layers.3", "missing"],
    );
}

#[test]
fn unreadable_image() {
    let tmp = tempfile::tempdir().expect("tmp");
    let bad = tmp.path().join("broken.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\n not really").expect("write");
    assert_clean_failure(&generate(&fixture_model(), &bad, "Hi"), &["broken.png"]);
    let missing = tmp.path().join("missing.jpg");
    assert_clean_failure(
        &generate(&fixture_model(), &missing, "Hi"),
        &["missing.jpg"],
    );
}

#[test]
fn prompt_longer_than_context() {
    // The fixture's context is 256 positions.
    let long = "red ".repeat(400);
    assert_clean_failure(
        &generate(&fixture_model(), &image(), &long),
        &["context", "max_position_embeddings"],
    );
}

#[test]
fn unknown_template_and_dtype() {
    let m = fixture_model();
    let out = llava(&[
        "generate",
        "--model",
        &m.to_string_lossy(),
        "--prompt",
        "Hi",
        "--template",
        "nope",
    ]);
    assert_clean_failure(&out, &["nope", "llava_v1"]);
    let out = llava(&[
        "generate",
        "--model",
        &m.to_string_lossy(),
        "--prompt",
        "Hi",
        "--dtype",
        "f8",
    ]);
    assert_clean_failure(&out, &["--dtype f8"]);
}

fn v0_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/original-v0/model")
}

/// The original-layout fixture, whose CLIP tower the v0 fixture shares.
fn original_layout() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/original-layout")
}

fn v0_clip() -> PathBuf {
    original_layout().join("clip")
}

/// A v0 config (`mm_use_im_start_end`) whose tokenizer lacks `<im_start>`/`<im_end>`.
#[test]
fn im_start_end_without_the_tokens() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = scratch_copy(&tmp, &v0_fixture());
    let base_tokenizer = original_layout().join("model/tokenizer.json");
    std::fs::copy(base_tokenizer, dir.join("tokenizer.json")).expect("copy");
    let out = llava(&[
        "generate",
        "--model",
        &dir.to_string_lossy(),
        "--vision-tower",
        &v0_clip().to_string_lossy(),
        "--image",
        &image().to_string_lossy(),
        "--prompt",
        "Hi",
    ]);
    assert_clean_failure(&out, &["config.json", "mm_use_im_start_end", "<im_start>"]);
}

/// The original trains the new tokens' input embeddings in stage 1 under
/// `mm_use_im_start_end`; our stage 1 would not, so it says so instead of training otherwise.
#[test]
fn stage_one_with_im_start_end_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = llava(&[
        "train",
        "--stage",
        "pretrain",
        "--model",
        &v0_fixture().to_string_lossy(),
        "--vision-tower",
        &v0_clip().to_string_lossy(),
        "--data",
        &tmp.path().join("data.json").to_string_lossy(),
        "--output",
        &tmp.path().join("out").to_string_lossy(),
    ]);
    assert_clean_failure(&out, &["stage 1", "mm_use_im_start_end", "not supported"]);
}

/// In the original layout the tower's fields live in the CLIP directory's config, and the
/// message names that file.
#[test]
fn original_layout_tower_config_is_the_one_named() {
    let tmp = tempfile::tempdir().expect("tmp");
    let model = scratch_copy(&tmp, &original_layout().join("model"));
    let clip = copy_dir(&original_layout().join("clip"), &tmp.path().join("clip"));
    edit_json(&clip.join("config.json"), |config| {
        config["patch_size"] = serde_json::json!(7);
    });
    let out = llava(&[
        "generate",
        "--model",
        &model.to_string_lossy(),
        "--vision-tower",
        &clip.to_string_lossy(),
        "--image",
        &image().to_string_lossy(),
        "--prompt",
        "Hi",
    ]);
    assert_clean_failure(&out, &["clip/config.json", "patch_size 7"]);
}

fn next_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/llava-next/model")
}

/// What a LLaVA-NeXT checkpoint can get wrong, and what cannot be asked of one, each named.
#[test]
fn llava_next_checkpoint_that_cannot_run() {
    let tmp = tempfile::tempdir().expect("tmp");
    let fresh = |name: &str| copy_dir(&next_fixture(), &tmp.path().join(name));

    // The CLS position has no place on the grid, in transformers either.
    let full = fresh("full");
    edit_json(&full.join("config.json"), |c| {
        c["vision_feature_select_strategy"] = serde_json::json!("full");
    });
    assert_clean_failure(
        &generate(&full, &image(), "Hi"),
        &[
            "config.json",
            "vision_feature_select_strategy",
            "llava_next",
        ],
    );

    // The processor tiling for one grid and the model unpadding for another.
    let grids = fresh("grids");
    edit_json(&grids.join("processor_config.json"), |c| {
        c["image_processor"]["image_grid_pinpoints"] = serde_json::json!([[30, 60]]);
    });
    assert_clean_failure(
        &generate(&grids, &image(), "Hi"),
        &["processor_config.json", "image_grid_pinpoints"],
    );
    let off_grid = fresh("off-grid");
    edit_json(&off_grid.join("config.json"), |c| {
        c["image_grid_pinpoints"] = serde_json::json!([[30, 45]]);
    });
    assert_clean_failure(
        &generate(&off_grid, &image(), "Hi"),
        &["image_grid_pinpoints", "30x45"],
    );

    // No end-of-row vector in the weights.
    let newline = fresh("newline");
    edit_safetensors(&newline, |header, _| {
        let entry = header
            .as_object_mut()
            .expect("object")
            .remove("image_newline")
            .expect("image_newline");
        header["image_newline_renamed"] = entry;
    });
    assert_clean_failure(&generate(&newline, &image(), "Hi"), &["image_newline"]);

    // Pad-to-square is LLaVA-1.5's, and the prompt needs one <image> per image.
    let out = generate_with(
        &next_fixture(),
        &image(),
        "Hi",
        &["--image-aspect-ratio", "pad"],
    );
    assert_clean_failure(&out, &["--image-aspect-ratio pad", "LLaVA-NeXT"]);
    let out = generate_with(&next_fixture(), &image(), "<image><image>Hi", &["--raw"]);
    assert_clean_failure(&out, &["2 <image> placeholder(s) but 1 image(s)"]);

    // The original layout's LLaVA-1.6: only spatial_unpad merging, and pinpoints as pairs.
    let original = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models/llava-next-original");
    let clip = original.join("clip");
    let flat = copy_dir(&original.join("model"), &tmp.path().join("flat"));
    edit_json(&flat.join("config.json"), |c| {
        c["mm_patch_merge_type"] = serde_json::json!("flat");
    });
    let clip = clip.to_string_lossy();
    let run_original = |dir: &Path| generate_with(dir, &image(), "Hi", &["--vision-tower", &clip]);
    assert_clean_failure(
        &run_original(&flat),
        &["config.json", "mm_patch_merge_type `flat`", "spatial_unpad"],
    );
    let text_pinpoints = copy_dir(&original.join("model"), &tmp.path().join("text-pinpoints"));
    edit_json(&text_pinpoints.join("config.json"), |c| {
        c["image_grid_pinpoints"] = serde_json::json!("(1x1),...,(6x6)");
    });
    assert_clean_failure(
        &run_original(&text_pinpoints),
        &["config.json", "image_grid_pinpoints", "[width, height]"],
    );
}

#[test]
fn answering_with_a_batch_of_zero() {
    let tmp = tempfile::tempdir().expect("tmp");
    let questions = tmp.path().join("q.jsonl");
    std::fs::write(
        &questions,
        "{\"question_id\": 1, \"image\": \"\", \"text\": \"Hi\"}\n",
    )
    .expect("write");
    let out = llava(&[
        "eval",
        "answer",
        "--model",
        &fixture_model().to_string_lossy(),
        "--questions",
        &questions.to_string_lossy(),
        "--out",
        &tmp.path().join("a.jsonl").to_string_lossy(),
        "--batch-size",
        "0",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--batch-size") && stderr.contains("0"),
        "{stderr}"
    );
    assert!(!tmp.path().join("a.jsonl").exists(), "nothing is written");
}

/// `llava serve` refuses bad flags before listening, and exits with the loader's message when
/// the model cannot load (it listens first, so that /health can say 503 meanwhile).
#[test]
fn serve_that_cannot_start() {
    let model = fixture_model();
    let model = model.to_string_lossy();
    let serve = |extra: &[&str]| {
        let mut args = vec!["serve", "--port", "0"];
        args.extend_from_slice(extra);
        llava(&args)
    };
    assert_clean_failure(
        &serve(&["--model", &model, "--api-key-file", "/nonexistent/key"]),
        &["--api-key-file", "/nonexistent/key"],
    );
    assert_clean_failure(
        &serve(&[
            "--model",
            &model,
            "--allowed-local-media-path",
            "/nonexistent/dir",
        ]),
        &["--allowed-local-media-path", "not a directory"],
    );
    assert_clean_failure(
        &serve(&["--model", &model, "--max-running", "0"]),
        &["--max-running"],
    );
    assert_clean_failure(
        &serve(&["--model", "/nonexistent/model"]),
        &["loading the model failed", "/nonexistent/model"],
    );
}

fn lora_adapter() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/lora-train/adapter")
}

/// What `llava train --lora` cannot do, and adapters it cannot read, each named before a weight
/// is loaded or a step taken.
#[test]
fn lora_training_that_cannot_run() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data.json");
    std::fs::write(&data, "[]").expect("data");
    let train = |extra: &[&str]| {
        let mut args = vec![
            "train".to_string(),
            "--model".into(),
            fixture_model().to_string_lossy().into(),
            "--data".into(),
            data.to_string_lossy().into(),
            "--output".into(),
            tmp.path().join("out").to_string_lossy().into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        llava(&args)
    };
    assert_clean_failure(
        &train(&["--stage", "pretrain", "--lora"]),
        &["--lora", "stage 1", "--stage finetune"],
    );
    assert_clean_failure(
        &train(&["--stage", "finetune", "--lora-r", "8"]),
        &["--lora-r", "add --lora"],
    );
    assert_clean_failure(
        &train(&["--stage", "finetune", "--lora", "--lora-dropout", "1"]),
        &["--lora-dropout 1", "[0, 1)"],
    );
    let adapter = lora_adapter().to_string_lossy().to_string();
    assert_clean_failure(
        &train(&[
            "--stage",
            "finetune",
            "--lora-from",
            &adapter,
            "--lora-r",
            "16",
        ]),
        &["--lora-r 16", "has r 4"],
    );
    let missing = tmp.path().join("nothing").to_string_lossy().to_string();
    assert_clean_failure(
        &train(&["--stage", "finetune", "--lora-from", &missing]),
        &["adapter_config.json"],
    );
    // An adapter over the original layout would have no base that transformers + peft load.
    let out = llava(&[
        "train",
        "--stage",
        "finetune",
        "--lora",
        "--model",
        &original_layout().join("model").to_string_lossy(),
        "--vision-tower",
        &original_layout().join("clip").to_string_lossy(),
        "--data",
        &data.to_string_lossy(),
        "--output",
        &tmp.path().join("out-original").to_string_lossy(),
    ]);
    assert_clean_failure(&out, &["--lora", "original layout"]);
    // A pair for a layer the base does not have would be dropped: refused by name.
    let deeper = copy_dir(&lora_adapter(), &tmp.path().join("deeper"));
    let file = deeper.join("adapter_model.safetensors");
    let mut tensors =
        candle_core::safetensors::load(&file, &candle_core::Device::Cpu).expect("load");
    let stored = "base_model.model.model.language_model.layers.0.mlp.up_proj";
    for m in ["lora_A", "lora_B"] {
        let t = tensors[&format!("{stored}.{m}.weight")].clone();
        tensors.insert(
            format!("base_model.model.model.language_model.layers.9.mlp.up_proj.{m}.weight"),
            t,
        );
    }
    candle_core::safetensors::save(&tensors, &file).expect("save");
    let deeper = deeper.to_string_lossy().to_string();
    assert_clean_failure(
        &train(&["--stage", "finetune", "--lora-from", &deeper]),
        &["layers.9.mlp.up_proj", "no weight for"],
    );
    // An adapter that saves another module whole is refused by name.
    let other = copy_dir(&lora_adapter(), &tmp.path().join("other"));
    edit_json(&other.join("adapter_config.json"), |c| {
        c["modules_to_save"] = serde_json::json!(["lm_head"]);
    });
    let other = other.to_string_lossy().to_string();
    assert_clean_failure(
        &train(&["--stage", "finetune", "--lora-from", &other]),
        &["modules_to_save `lm_head`"],
    );
}

/// An adapter over an HF-layout LLaVA is not a model by itself.
#[test]
fn an_adapter_without_its_base_is_named() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = copy_dir(&lora_adapter(), &tmp.path().join("adapter"));
    std::fs::copy(fixture_model().join("config.json"), dir.join("config.json")).expect("config");
    let out = generate(&dir, &image(), "Hi");
    assert_clean_failure(&out, &["LoRA adapter", "--model-base"]);
}
