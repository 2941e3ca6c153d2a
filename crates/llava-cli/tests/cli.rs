//! The CLI end to end on the tiny fixture checkpoint: JSON output, chat over stdin, hub-cache
//! resolution, reduced-precision compute, and `llava init` checkpoints.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

mod common;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models")
}

fn llava() -> Command {
    Command::new(env!("CARGO_BIN_EXE_llava"))
}

fn expected(case: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join(case).join("expected.json"))
        .expect("expected.json");
    serde_json::from_str(&text).expect("json")
}

fn generate_json(model: &str, max_new_tokens: usize, extra: &[&str]) -> serde_json::Value {
    let image = fixtures().join("images/shapes_64x48.png");
    json_of(
        llava()
            .args(["generate", "--model", model, "--image"])
            .arg(&image)
            .args([
                "--prompt",
                "What shapes can you see in the image?",
                "--json",
                "--max-new-tokens",
            ])
            .arg(max_new_tokens.to_string())
            .args(extra),
    )
}

/// Runs a `--json` command that must succeed, with every weight it loads used, and parses its
/// one JSON object.
fn json_of(command: &mut Command) -> serde_json::Value {
    let out = command.output().expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("not used by the model"), "{stderr}");
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

/// Asserts that a command exited 0, showing its stderr if not.
fn succeeded(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `llava chat` on the tiny fixture checkpoint with `args`, fed `script` on stdin.
fn chat(args: &[&str], script: &[u8]) -> std::process::Output {
    let mut child = llava()
        .args(["chat", "--model"])
        .arg(fixtures().join("llava15-default/model"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawns");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(script)
        .expect("write");
    child.wait_with_output().expect("waits")
}

#[test]
fn generate_json_reports_transformers_greedy_tokens() {
    let model = fixtures().join("llava15-default/model");
    let json = generate_json(&model.to_string_lossy(), 20, &[]);
    let want = expected("llava15-default");
    // The fixture never produces EOS in its first 20 tokens, so all 20 are generated.
    assert_eq!(json["token_ids"], want["greedy_tokens"]);
    assert_eq!(
        json["prompt_tokens"].as_u64(),
        want["input_ids"].as_array().map(|a| a.len() as u64)
    );
    for key in ["vision_ms", "prefill_ms", "decode_tok_s"] {
        assert!(
            json["timings"][key].as_f64().is_some_and(|v| v >= 0.0),
            "timings.{key}"
        );
    }
    assert!(json["text"].is_string());
}

/// transformers' `generate` stops at the ids in `generation_config.json` (Llama 3 chat models
/// list `<|eot_id|>` there): here the fourth greedy token, which then ends the reply and, as in
/// transformers, is the last of its ids.
#[test]
fn generation_config_eos_ids_stop_generation() {
    let tmp = tempfile::tempdir().expect("tmp");
    common::copy_dir(&fixtures().join("llava15-default/model"), tmp.path());
    let greedy: Vec<u64> =
        serde_json::from_value(expected("llava15-default")["greedy_tokens"].clone()).expect("ids");
    // The first occurrence must be the fourth token, or the stop would come earlier.
    assert_eq!(greedy.iter().position(|&t| t == greedy[3]), Some(3));
    let write = |eos: serde_json::Value| {
        let config =
            serde_json::json!({"bos_token_id": 1, "eos_token_id": eos, "pad_token_id": 601});
        std::fs::write(
            tmp.path().join("generation_config.json"),
            config.to_string(),
        )
        .expect("write");
    };
    let model = tmp.path().to_string_lossy().to_string();
    write(serde_json::json!([greedy[3], 2]));
    let json = generate_json(&model, 20, &[]);
    assert_eq!(json["token_ids"], serde_json::json!(greedy[..4]));
    // A single id, as LLaMA 2 checkpoints write it.
    write(serde_json::json!(greedy[3]));
    assert_eq!(
        generate_json(&model, 20, &[])["token_ids"],
        serde_json::json!(greedy[..4])
    );
    // `--ignore-eos` still runs on.
    assert_eq!(
        generate_json(&model, 20, &["--ignore-eos"])["token_ids"],
        serde_json::json!(greedy)
    );
}

#[test]
fn hub_id_resolves_from_the_local_cache() {
    let cache = tempfile::tempdir().expect("tmp");
    let snapshot = cache
        .path()
        .join("models--tiny-org--tiny-llava/snapshots/0123abcd");
    common::copy_dir(&fixtures().join("llava15-default/model"), &snapshot);
    std::fs::create_dir_all(cache.path().join("models--tiny-org--tiny-llava/refs")).expect("mkdir");
    std::fs::write(
        cache.path().join("models--tiny-org--tiny-llava/refs/main"),
        "0123abcd",
    )
    .expect("ref");
    let image = fixtures().join("images/shapes_64x48.png");
    let json = json_of(
        llava()
            .env("HF_HUB_CACHE", cache.path())
            .args(["generate", "--model", "tiny-org/tiny-llava", "--image"])
            .arg(&image)
            .args([
                "--prompt",
                "What shapes can you see in the image?",
                "--max-new-tokens",
                "20",
                "--json",
            ]),
    );
    assert_eq!(
        json["token_ids"],
        expected("llava15-default")["greedy_tokens"]
    );
}

/// The original LLaVA's flags (`--model-path`, `--image-file`, `--query`, and `run_llava.py`'s
/// `--max_new_tokens`, `--top_p`) with an image URL:
/// the same greedy tokens as transformers gives for the file.
#[test]
fn image_url_and_the_original_flag_names() {
    let png = std::fs::read(fixtures().join("images/shapes_64x48.png")).expect("png");
    let url = format!("{}/shapes.png", common::serve("200 OK", png));
    let json = json_of(
        llava()
            .args(["generate", "--model-path"])
            .arg(fixtures().join("llava15-default/model"))
            .args(["--image-file", &url])
            .args(["--query", "What shapes can you see in the image?"])
            .args(["--max_new_tokens", "20", "--top_p", "1.0", "--json"]),
    );
    assert_eq!(
        json["token_ids"],
        expected("llava15-default")["greedy_tokens"]
    );
}

/// A LLaVA-NeXT checkpoint (llava-hf's 1.6 layout, `tools/make_next_fixture.py`) with three
/// images of three shapes, each tiled by its own grid: transformers' greedy tokens.
#[test]
fn llava_next_with_three_images_matches_transformers() {
    let want = expected("llava-next");
    let mut command = llava();
    command
        .args(["generate", "--model"])
        .arg(fixtures().join("llava-next/model"));
    for image in want["images"].as_array().expect("images") {
        command.arg("--image").arg(
            fixtures()
                .join("images")
                .join(image["image"].as_str().expect("name")),
        );
    }
    let json = json_of(command.args([
        "--prompt",
        want["multi"]["question"].as_str().expect("question"),
        "--max-new-tokens",
        "20",
        "--ignore-eos",
        "--json",
    ]));
    assert_eq!(json["token_ids"], want["multi"]["greedy_tokens"]);
    assert_eq!(
        json["prompt_tokens"].as_u64(),
        want["multi"]["input_ids"]
            .as_array()
            .map(|a| a.len() as u64)
    );
}

/// The original layout's LLaVA-1.6 (`tools/make_next_original_fixture.py`) with its CLIP tower
/// beside it and two images: the original's greedy tokens.
#[test]
fn original_layout_llava_1_6_matches_the_original() {
    let case = fixtures().join("llava-next-original");
    let want = expected("llava-next-original");
    let mut command = llava();
    command
        .args(["generate", "--model"])
        .arg(case.join("model"))
        .arg("--vision-tower")
        .arg(case.join("clip"));
    for image in want["images"].as_array().expect("images") {
        command.arg("--image").arg(
            fixtures()
                .join("images")
                .join(image.as_str().expect("name")),
        );
    }
    let json = json_of(command.args([
        "--prompt",
        want["question"].as_str().expect("question"),
        "--max-new-tokens",
        "20",
        "--ignore-eos",
        "--json",
    ]));
    assert_eq!(json["token_ids"], want["greedy_tokens"]);
}

/// With no chat template, an original LLaVA-1.6 release gets the template the original's CLI
/// picks for it: `mistral_instruct` for the Mistral decoder (the 34B's ChatML tokenizer gets
/// `chatml_direct` the same way), `llava_v1` otherwise.
#[test]
fn original_llava_1_6_releases_get_their_templates() {
    let case = fixtures().join("llava-next-original");
    let tmp = tempfile::tempdir().expect("tmp");
    common::copy_dir(&case.join("model"), tmp.path());
    let prompt_of = |model: &Path| {
        let out = llava()
            .env("RUST_LOG", "info")
            .args(["generate", "--model"])
            .arg(model)
            .arg("--vision-tower")
            .arg(case.join("clip"))
            .arg("--image")
            .arg(fixtures().join("images/small_24x20.png"))
            .args(["--prompt", "Q", "--max-new-tokens", "1"])
            .output()
            .expect("runs");
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{stderr}");
        stderr
    };
    assert!(prompt_of(&case.join("model")).contains("named template llava_v1"));
    let config = tmp.path().join("config.json");
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &config,
        text.replace("\"llava_llama\"", "\"llava_mistral\""),
    )
    .expect("write");
    let log = prompt_of(tmp.path());
    assert!(log.contains("named template mistral_instruct"), "{log}");
    assert!(
        log.contains(r#"prompt: "[INST] <image>\nQ [/INST]""#),
        "{log}"
    );
}

/// A release over `--model-base` stops at the ids of the base's `generation_config.json`, the
/// file the original reads when it loads the model from the base.
#[test]
fn a_release_stops_at_its_bases_generation_config_ids() {
    let case = fixtures().join("original-lora");
    let want = expected("original-lora");
    let greedy: Vec<u64> = serde_json::from_value(want["greedy_tokens"].clone()).expect("ids");
    // The first occurrence must be the fourth token, or the stop would come earlier.
    assert_eq!(greedy.iter().position(|&t| t == greedy[3]), Some(3));
    let tmp = tempfile::tempdir().expect("tmp");
    common::copy_dir(&case.join("base"), tmp.path());
    std::fs::write(
        tmp.path().join("generation_config.json"),
        serde_json::json!({"bos_token_id": 1, "eos_token_id": [greedy[3], 2]}).to_string(),
    )
    .expect("write");
    let json = json_of(
        llava()
            .args(["generate", "--model"])
            .arg(case.join("lora"))
            .arg("--model-base")
            .arg(tmp.path())
            .arg("--vision-tower")
            .arg(fixtures().join("original-layout/clip"))
            .arg("--image")
            .arg(fixtures().join("images/shapes_64x48.png"))
            .args(["--prompt", want["question"].as_str().expect("question")])
            .args(["--max-new-tokens", "20", "--json"]),
    );
    assert_eq!(json["token_ids"], serde_json::json!(greedy[..4]));
}

/// `generate` over `--model-base`, for the two kinds of release the original publishes that way
/// (`tools/make_lora_fixture.py`): LoRA adapters (as `.bin` or `.safetensors`) give the merged
/// model's greedy tokens; the same projector as a stage-1 `mm_projector.bin`, with no adapters,
/// gives the base model's.
#[test]
fn releases_over_a_model_base_match_transformers() {
    let case = fixtures().join("original-lora");
    let want = expected("original-lora");
    let run = |release: &Path| {
        json_of(
            llava()
                .args(["generate", "--model"])
                .arg(release)
                .arg("--model-base")
                .arg(case.join("base"))
                .arg("--vision-tower")
                .arg(fixtures().join("original-layout/clip"))
                .arg("--image")
                .arg(fixtures().join("images/shapes_64x48.png"))
                .args(["--prompt", want["question"].as_str().expect("question")])
                .args(["--max-new-tokens", "20", "--ignore-eos", "--json"]),
        )["token_ids"]
            .clone()
    };
    assert_eq!(run(&case.join("lora")), want["greedy_tokens"]);
    assert_eq!(
        run(&case.join("projector-only")),
        want["greedy_tokens_without_adapters"]
    );

    // Newer peft saves the adapters as adapter_model.safetensors.
    let tmp = tempfile::tempdir().expect("tmp");
    for f in [
        "config.json",
        "adapter_config.json",
        "non_lora_trainables.bin",
    ] {
        std::fs::copy(case.join("lora").join(f), tmp.path().join(f)).expect("copy");
    }
    let adapters = candle_core::pickle::read_all(case.join("lora/adapter_model.bin"))
        .expect("bin")
        .into_iter()
        .collect::<std::collections::HashMap<_, _>>();
    candle_core::safetensors::save(&adapters, tmp.path().join("adapter_model.safetensors"))
        .expect("save");
    assert_eq!(run(tmp.path()), want["greedy_tokens"]);
}

/// `llava merge-lora` writes one original-layout checkpoint from a LoRA release and its base;
/// it then loads on its own and gives the merged model's greedy tokens.
#[test]
fn merge_lora_writes_a_checkpoint_that_needs_no_base() {
    let case = fixtures().join("original-lora");
    let clip = fixtures().join("original-layout/clip");
    let tmp = tempfile::tempdir().expect("tmp");
    let merged = tmp.path().join("merged");
    let merge = |release: &Path| {
        llava()
            .args(["merge-lora", "--model"])
            .arg(release)
            .arg("--model-base")
            .arg(case.join("base"))
            .arg("--vision-tower")
            .arg(&clip)
            .arg("--save-model-path")
            .arg(&merged)
            .output()
            .expect("runs")
    };
    let out = merge(&case.join("lora"));
    succeeded(&out);
    assert!(!merged.join("adapter_config.json").exists());
    let want = expected("original-lora");
    let json = json_of(
        llava()
            .args(["generate", "--model"])
            .arg(&merged)
            .arg("--vision-tower")
            .arg(&clip)
            .arg("--image")
            .arg(fixtures().join("images/shapes_64x48.png"))
            .args(["--prompt", want["question"].as_str().expect("question")])
            .args(["--max-new-tokens", "20", "--ignore-eos", "--json"]),
    );
    assert_eq!(json["token_ids"], want["greedy_tokens"]);
    // The merged checkpoint is not written over, and a release without adapters is refused.
    let again = merge(&case.join("lora"));
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    std::fs::remove_dir_all(&merged).expect("rm");
    let nothing = merge(&case.join("projector-only"));
    assert_eq!(nothing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&nothing.stderr).contains("nothing to merge"));
    assert!(!merged.exists());
}

#[test]
fn reduced_precision_runs_and_mostly_agrees() {
    let model = fixtures().join("llava15-default/model");
    let want = expected("llava15-default")["greedy_tokens"].clone();
    for dtype in ["bf16", "f16"] {
        let json = generate_json(&model.to_string_lossy(), 20, &["--dtype", dtype]);
        let got = json["token_ids"].as_array().expect("ids");
        // Rounding may flip a close greedy choice later on, but the start must agree.
        assert_eq!(got[..2], want.as_array().expect("ids")[..2], "{dtype}");
    }
}

/// `--vision-dtype bf16` under the f32 decoder keeps every greedy choice on this fixture
/// (`tests/quantized.rs` measures the logits); a dtype it does not know is named in the error.
#[test]
fn a_bf16_vision_tower_keeps_the_tokens() {
    let model = fixtures().join("llava15-default/model");
    let want = expected("llava15-default")["greedy_tokens"].clone();
    let json = generate_json(&model.to_string_lossy(), 20, &["--vision-dtype", "bf16"]);
    assert_eq!(json["token_ids"], want);
    let out = llava()
        .args(["generate", "--model"])
        .arg(&model)
        .args(["--prompt", "Hi", "--vision-dtype", "int4"])
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--vision-dtype int4: choose f32, bf16 or f16"),
        "{stderr}"
    );
}

/// The original's `--load-8bit` / `--load-4bit` (and their underscore spellings): 8 bits keep
/// every greedy choice of transformers' f32 run on this fixture, 4 bits its first three
/// (`crates/llava-model/tests/quantized.rs` measures the logits).
#[test]
fn eight_and_four_bit_decoders_run() {
    let model = fixtures().join("llava15-default/model");
    let want = expected("llava15-default")["greedy_tokens"].clone();
    let want = want.as_array().expect("ids");
    for (flag, agree) in [("--load-8bit", 20), ("--load_8bit", 20), ("--load-4bit", 3)] {
        let json = generate_json(&model.to_string_lossy(), 20, &[flag]);
        let got = json["token_ids"].as_array().expect("ids");
        assert_eq!(got.len(), 20, "{flag}");
        assert_eq!(got[..agree], want[..agree], "{flag}");
    }
    let out = llava()
        .args(["generate", "--model"])
        .arg(&model)
        .args(["--prompt", "Hi", "--load-8bit", "--load-4bit"])
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cannot be used with"), "{stderr}");
}

/// `/image` without a path, an unknown command and a line that is not UTF-8 are reported or
/// tolerated; none ends the chat.
#[test]
fn chat_survives_a_bare_image_command_unknown_commands_and_a_non_utf8_line() {
    let out = chat(
        &["--max-new-tokens", "2"],
        b"/image\nhi \xff there\n/clear\n/help\nand again?\n/images with a slash?\n/exit\n",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("/image needs a path"), "{stderr}");
    // A lone unknown `/word` is refused, not answered; a message may begin with a slash.
    assert!(stderr.contains("unknown command /clear"), "{stderr}");
    assert!(stderr.contains("/reset to start over"), "/help: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 3, "three replies: {stdout:?}");
}

#[test]
fn chat_keeps_history_and_switches_images() {
    let image = fixtures().join("images/shapes_64x48.png");
    let other = fixtures().join("images/tall_40x60.png");
    let script = format!(
        "What shapes can you see in the image?\nAnd the colours?\n/image {}\nWhat is here?\n/image /no/such/file.png\nStill there?\n/exit\n",
        other.display()
    );
    let out = chat(
        &[
            "--image",
            &image.to_string_lossy(),
            "--max-new-tokens",
            "4",
            "--timings",
        ],
        script.as_bytes(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().count(),
        4,
        "one reply line per question: {stdout:?}"
    );
    assert!(
        stderr.contains("tall_40x60.png"),
        "image switch acknowledged: {stderr}"
    );
    assert!(
        stderr.contains("file.png"),
        "bad image reported, chat continues: {stderr}"
    );
    // --timings: a follow-up reuses the conversation so far and skips the vision tower; a new
    // image starts from nothing.
    let reused: Vec<usize> = stderr
        .lines()
        .filter_map(|l| {
            l.split(" reused;")
                .next()?
                .rsplit(", ")
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(reused.len(), 4, "a timings line per reply: {stderr}");
    assert_eq!(reused[0], 0, "{stderr}");
    assert!(reused[1] > 25, "the first prompt, image included: {stderr}");
    assert_eq!(reused[2], 0, "a new image starts over: {stderr}");
    assert!(reused[3] > 25, "{stderr}");
}

/// `/image URL` in a chat gives the same reply as `/image PATH` for the same picture.
#[test]
fn chat_takes_an_image_url() {
    let path = fixtures().join("images/tall_40x60.png");
    let url = format!(
        "{}/tall.png",
        common::serve("200 OK", std::fs::read(&path).expect("png"))
    );
    let chat_about = |image: &str| {
        let script = format!("/image {image}\nWhat is in the picture?\n/exit\n");
        let out = chat(&["--max-new-tokens", "6"], script.as_bytes());
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{stderr}");
        assert!(stderr.contains(&format!("(image: {image})")), "{stderr}");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let from_file = chat_about(&path.to_string_lossy());
    assert!(!from_file.trim().is_empty(), "a reply");
    assert_eq!(chat_about(&url), from_file);
}

#[test]
fn init_writes_a_loadable_checkpoint() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("test");
    let out = llava()
        .args(["init", "--shape", "test", "--out"])
        .arg(&dir)
        .output()
        .expect("runs");
    succeeded(&out);
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "preprocessor_config.json",
        "chat_template.jinja",
    ] {
        assert!(dir.join(f).is_file(), "{f}");
    }
    let json = generate_json(&dir.to_string_lossy(), 3, &[]);
    // Random weights may pick EOS early; at least one token and at most three come out.
    let n = json["token_ids"].as_array().map(Vec::len).unwrap_or(0);
    assert!((1..=3).contains(&n), "{json}");
    let bad = llava()
        .args(["init", "--shape", "nope", "--out"])
        .arg(&dir)
        .output()
        .expect("runs");
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("tiny-1b"));
    // A second init over the written checkpoint is refused and leaves it loadable.
    let again = llava()
        .args(["init", "--shape", "test", "--seed", "1", "--out"])
        .arg(&dir)
        .output()
        .expect("runs");
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("not an empty directory"));
    assert_eq!(
        generate_json(&dir.to_string_lossy(), 3, &[])["token_ids"],
        json["token_ids"]
    );
}

#[test]
fn data_preview_shows_the_mask() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data.jsonl");
    std::fs::write(
        &data,
        concat!(
            r#"{"id": 1, "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}"#,
            "\n",
            r#"{"id": "b", "image": "x.jpg", "conversations": [{"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": "A red ball."}]}"#,
            "\n"
        ),
    )
    .expect("write");
    let model = fixtures().join("llava15-default/model");
    let out = llava()
        .args(["data", "preview", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .args(["--index", "1", "--json"])
        .output()
        .expect("runs");
    succeeded(&out);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let ids: Vec<i64> = serde_json::from_value(json["input_ids"].clone()).expect("ids");
    let labels: Vec<i64> = serde_json::from_value(json["labels"].clone()).expect("labels");
    assert_eq!(ids.len(), labels.len());
    assert_eq!(
        ids.iter().filter(|&&t| t == 600).count(),
        25,
        "image tokens as in the model's input ids"
    );
    let supervised: Vec<i64> = labels.iter().copied().filter(|&l| l != -100).collect();
    assert!(
        !supervised.is_empty() && supervised.last() == Some(&2),
        "answer ends with </s>: {supervised:?}"
    );

    let out = llava()
        .args(["data", "preview", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("«</s>»") && text.contains("USER: Hi"),
        "{text}"
    );
    let out = llava()
        .args(["data", "preview", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .args(["--index", "9"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("holds 2 records"));
    // Piped, the mask is marked «…»; --color always colours it (green) anyway.
    assert!(!text.contains('\x1b'), "{text}");
    let out = llava()
        .args(["--color", "always", "data", "preview", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .output()
        .expect("runs");
    succeeded(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("\x1b[32m"));

    // A malformed record is named when asked for, and does not stop the preview of the others.
    let good = std::fs::read_to_string(&data).expect("read");
    let (first, second) = good.split_once('\n').expect("two lines");
    std::fs::write(
        &data,
        format!("{first}\n{{\"id\": \"bad\", \"conversations\": null}}\n{second}"),
    )
    .expect("write");
    let preview = |index: &str| {
        llava()
            .args(["data", "preview", "--json", "--model"])
            .arg(&model)
            .arg("--data")
            .arg(&data)
            .args(["--index", index])
            .output()
            .expect("runs")
    };
    let out = preview("1");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("record bad: not a LLaVA record (line 2)"),
        "{stderr}"
    );
    succeeded(&preview("2"));

    // LLaVA-NeXT: the image's positions follow its size (113 for this one, as the processor
    // counts them), so the preview reads it; an image it cannot read is named.
    std::fs::write(
        &data,
        r#"{"id": 3, "image": "shapes_64x48.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Shapes."}]}"#,
    )
    .expect("write");
    let next = |folder: &Path| {
        llava()
            .args(["data", "preview", "--json", "--model"])
            .arg(fixtures().join("llava-next/model"))
            .arg("--data")
            .arg(&data)
            .arg("--image-folder")
            .arg(folder)
            .output()
            .expect("runs")
    };
    let out = next(&fixtures().join("images"));
    succeeded(&out);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let ids: Vec<i64> = serde_json::from_value(json["input_ids"].clone()).expect("ids");
    assert_eq!(ids.iter().filter(|&&t| t == 600).count(), 113);
    let out = next(tmp.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("shapes_64x48.png"));
}

/// LLaVA-1.5's short-answer instruction, which `eval vqa`, `pope` and `mme` add.
const SHORT_ANSWER: &str = "Answer the question using a single word or phrase.";

/// What `llava generate` answers on the tiny fixture about shapes_64x48.png, asked `question`
/// with the short-answer instruction (6 tokens at most).
fn short_answer(question: &str) -> String {
    let out = llava()
        .args(["generate", "--json", "--max-new-tokens", "6", "--model"])
        .arg(fixtures().join("llava15-default/model"))
        .arg("--image")
        .arg(fixtures().join("images/shapes_64x48.png"))
        .args(["--prompt", &format!("{question}\n{SHORT_ANSWER}")])
        .output()
        .expect("runs");
    succeeded(&out);
    let generated: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    generated["text"].as_str().expect("text").to_string()
}

fn write_jsonl(path: &Path, lines: &[serde_json::Value]) {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(path, text).expect("write");
}

/// `llava eval SUB --json` on the tiny fixture (6 tokens an answer): its printed summary.
fn eval_json(sub: &str, questions: &Path, answers: &Path, extra: &[&str]) -> serde_json::Value {
    let out = llava()
        .args(["eval", sub, "--json", "--max-new-tokens", "6"])
        .args(extra)
        .arg("--model")
        .arg(fixtures().join("llava15-default/model"))
        .arg("--questions")
        .arg(questions)
        .arg("--image-folder")
        .arg(fixtures().join("images"))
        .arg("--out")
        .arg(answers)
        .output()
        .expect("runs");
    succeeded(&out);
    serde_json::from_slice(&out.stdout).expect("json summary")
}

/// `llava eval SUB --json` scoring `answers` against `questions` without a model.
fn score_json(sub: &str, questions: &Path, answers: &Path) -> serde_json::Value {
    let out = llava()
        .args(["eval", sub, "--json", "--questions"])
        .arg(questions)
        .arg("--answers")
        .arg(answers)
        .output()
        .expect("runs");
    succeeded(&out);
    serde_json::from_slice(&out.stdout).expect("json")
}

#[test]
fn eval_vqa_answers_in_a_batch_as_generate_does_and_scores_exact_match() {
    let tmp = tempfile::tempdir().expect("tmp");
    // The reference of question 1 is whatever `llava generate` answers; question 2's is wrong.
    let reference = short_answer("What is it?");
    let questions = tmp.path().join("vqa.jsonl");
    write_jsonl(
        &questions,
        &[
            serde_json::json!({"question_id": 1, "image": "shapes_64x48.png", "text": "What is it?",
                               "answer": reference, "category": "what"}),
            serde_json::json!({"question_id": 2, "image": "shapes_64x48.png", "text": "What is it?",
                               "answers": ["zebra"], "category": "what"}),
        ],
    );
    // Both questions in one batch: the batched answer is `llava generate`'s.
    let answers = tmp.path().join("answers.jsonl");
    let summary = eval_json("vqa", &questions, &answers, &["--batch-size", "2"]);
    assert_eq!(summary["overall"]["total"], 2);
    assert_eq!(summary["overall"]["correct"], 1);
    assert_eq!(summary["categories"]["what"]["accuracy"], 50.0);
}

/// `eval pope` (and `pope-score`, `mme-score` on its answers): the model's replies read as yes
/// or no, scored against labels; one label here agrees with what `llava generate` answers and
/// one does not.
#[test]
fn eval_pope_and_mme_read_replies_as_yes_or_no_and_score_them() {
    let tmp = tempfile::tempdir().expect("tmp");
    let suffix = SHORT_ANSWER;
    let question = "Is there a circle in the image?";
    let reply = short_answer(question);
    let said_yes = llava_eval::pope::says_yes(&reply);
    let (agree, disagree) = if said_yes {
        ("yes", "no")
    } else {
        ("no", "yes")
    };
    let questions = tmp.path().join("pope.jsonl");
    // The question file carries the suffix, as LLaVA's does; the other line lacks it.
    write_jsonl(
        &questions,
        &[
            serde_json::json!({"question_id": 1, "image": "shapes_64x48.png",
                               "text": format!("{question}\n{suffix}"), "label": agree, "category": "random"}),
            serde_json::json!({"question_id": 2, "image": "shapes_64x48.png", "text": question,
                               "label": disagree, "category": "random"}),
        ],
    );
    let answers = tmp.path().join("answers.jsonl");
    let summary = eval_json("pope", &questions, &answers, &[]);
    assert_eq!(summary["overall"]["accuracy"], 50.0);
    let yes_ratio = if said_yes { 100.0 } else { 0.0 };
    assert_eq!(summary["categories"]["random"]["yes_ratio"], yes_ratio);
    // The answers were asked with the suffix once, as `llava generate` was.
    let written = std::fs::read_to_string(&answers).expect("answers");
    for line in written.lines() {
        let a: serde_json::Value = serde_json::from_str(line).expect("answer");
        assert_eq!(a["text"], reply.as_str(), "{line}");
        assert_eq!(
            a["prompt"]
                .as_str()
                .expect("prompt")
                .matches(suffix)
                .count(),
            1
        );
    }
    // pope-score reads the same files to the same table.
    let out = llava()
        .args(["eval", "pope-score", "--questions"])
        .arg(&questions)
        .arg("--answers")
        .arg(&answers)
        .output()
        .expect("runs");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && table.contains("random") && table.contains("50.00"),
        "{table}"
    );

    // The same answers as MME's two questions about one image: one label agrees with the reply
    // as MME reads it (if it reads it at all), so acc is 50 or 0 and acc+ 0.
    let read = llava_eval::mme::read_reply(&reply);
    let labels = match read {
        Some(true) | None => ("yes", "no"),
        Some(false) => ("no", "yes"),
    };
    let mme = tmp.path().join("mme.jsonl");
    write_jsonl(
        &mme,
        &[
            serde_json::json!({"question_id": 1, "image": "shapes_64x48.png", "text": question,
                               "label": labels.0, "category": "existence"}),
            serde_json::json!({"question_id": 2, "image": "shapes_64x48.png", "text": question,
                               "label": labels.1, "category": "existence"}),
        ],
    );
    let scores = score_json("mme-score", &mme, &answers);
    let acc = if read.is_some() { 50.0 } else { 0.0 };
    assert_eq!(scores["subtasks"]["existence"]["acc"], acc);
    assert_eq!(scores["subtasks"]["existence"]["acc_plus"], 0.0);
    assert_eq!(scores["perception"], acc);
}

/// MMBench: its TSV becomes rotated multiple-choice lines and image files, `eval mc` answers
/// them, and `mmbench-score` counts a question only when all its rotations are right.
#[test]
fn mmbench_tsv_to_circular_accuracy() {
    use base64::Engine;
    let tmp = tempfile::tempdir().expect("tmp");
    let png = std::fs::read(fixtures().join("images/shapes_64x48.png")).expect("image");
    let b64 = base64::engine::general_purpose::STANDARD.encode(png);
    let tsv = tmp.path().join("mmbench.tsv");
    std::fs::write(
        &tsv,
        format!(
            "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\n\
             10\tWhich shape is red?\tnan\tcircle\tsquare\tnan\tnan\tA\tattribute\t{b64}\n\
             11\tHow many shapes?\tLook closely.\tone\ttwo\tthree\tnan\tB\tcount\t10\n"
        ),
    )
    .expect("write");
    let (questions, images) = (tmp.path().join("mmbench.jsonl"), tmp.path().join("images"));
    let out = llava()
        .args(["eval", "mmbench-prompts", "--tsv"])
        .arg(&tsv)
        .arg("--image-dir")
        .arg(&images)
        .arg("--out")
        .arg(&questions)
        .output()
        .expect("runs");
    succeeded(&out);
    let lines = std::fs::read_to_string(&questions).expect("questions");
    assert_eq!(lines.lines().count(), 2 + 3, "a line per rotation");
    assert!(images.join("10.png").is_file() && images.join("11.png").is_file());

    let answers = tmp.path().join("answers.jsonl");
    let out = llava()
        .args(["eval", "mc", "--max-new-tokens", "3", "--model"])
        .arg(fixtures().join("llava15-default/model"))
        .arg("--questions")
        .arg(&questions)
        .arg("--image-folder")
        .arg(&images)
        .arg("--out")
        .arg(&answers)
        .output()
        .expect("runs");
    succeeded(&out);
    let summary = score_json("mmbench-score", &questions, &answers);
    assert_eq!(
        summary["overall"]["total"], 2,
        "two questions, not five lines"
    );
    // The same verdict worked out here from the replies: every rotation right.
    let replies: std::collections::HashMap<String, String> = std::fs::read_to_string(&answers)
        .expect("answers")
        .lines()
        .map(|l| {
            let a: serde_json::Value = serde_json::from_str(l).expect("answer");
            (
                a["question_id"].to_string().trim_matches('"').to_string(),
                a["text"].as_str().expect("text").to_string(),
            )
        })
        .collect();
    let mut right = std::collections::BTreeMap::<String, bool>::new();
    for line in lines.lines() {
        let q: serde_json::Value = serde_json::from_str(line).expect("line");
        let id = q["question_id"].as_str().expect("id");
        let n = q["options"].as_array().expect("options").len();
        let picked = llava_eval::mc::parse_choice(&replies[id], n);
        let ok = picked == Some(q["answer"].as_u64().expect("key") as usize);
        let index = id.split('-').next().expect("index").to_string();
        *right.entry(index).or_insert(true) &= ok;
    }
    let correct = right.values().filter(|&&r| r).count();
    assert_eq!(summary["overall"]["correct"], correct);
}
