//! Corrupted checkpoints must fail with an error, never a panic or an abort. Every value of
//! every JSON file of two fixture checkpoints is replaced in turn by hostile values, as is
//! every value of a safetensors header, and their tokenizer.json and chat template are cut at
//! many points; each variant is loaded and, where it loads, asked for two tokens. (A wider run
//! of this, with random byte edits and the test images, found the four crashes that
//! `config.rs`, `image/config.rs`, `tokenizer.rs` and `safetensors_file.rs` now refuse: a zero
//! patch size in LLaVA-NeXT, a 1e9 px resize, a tokenizer cut inside its decoder, and a tensor
//! shape whose size overflows.)

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use llava_data::conversation::Message;
use llava_model::pipeline::{Pipeline, PipelineOptions};
use serde_json::{Value, json};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("dir");
    for entry in std::fs::read_dir(from).expect("fixture dir") {
        let path = entry.expect("entry").path();
        if path.is_file() {
            std::fs::copy(&path, to.join(path.file_name().expect("name"))).expect("copy");
        }
    }
}

/// Loads `dir` and generates two tokens about an image: `Err(panic message)` if anything
/// panicked, else whether it worked.
fn load_and_generate(dir: &Path) -> Result<bool, String> {
    let run = || -> llava_model::Result<()> {
        let p = Pipeline::load(&PipelineOptions::new(dir.to_string_lossy()))?;
        let images = p.pixel_values(&[fixtures().join("images/shapes_64x48.png")])?;
        let ids = p.encode(&p.render(&[Message::user("Hi", 1)])?, images.as_ref())?;
        p.generate(&ids, images.as_ref(), &Default::default(), 2, &[], |_| {})?;
        Ok(())
    };
    catch_unwind(AssertUnwindSafe(run))
        .map(|r| r.is_ok())
        .map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        })
}

/// JSON pointers to every leaf of `v`.
fn leaves(v: &Value, path: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => m
            .iter()
            .for_each(|(k, x)| leaves(x, format!("{path}/{k}"), out)),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .for_each(|(i, x)| leaves(x, format!("{path}/{i}"), out)),
        _ => out.push(path),
    }
}

/// A copy of the fixture `case` for the test `test` alone (tests run in parallel).
fn scratch(case: &str, test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("corrupt-{case}-{test}"));
    let _ = std::fs::remove_dir_all(&dir);
    copy_dir(&fixtures().join(case).join("model"), &dir);
    dir
}

fn check_json_values(case: &str) {
    let dir = scratch(case, "json");
    let hostile = [
        json!(0),
        json!(-1),
        json!(1_000_000_000u64),
        json!(0.5),
        Value::Null,
        json!("x"),
        json!([]),
    ];
    let mut crashes = Vec::new();
    let mut variants = 0;
    for name in [
        "config.json",
        "processor_config.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        let file = dir.join(name);
        let original = std::fs::read_to_string(&file).expect("fixture file");
        let json: Value = serde_json::from_str(&original).expect("fixture json");
        let mut paths = Vec::new();
        leaves(&json, String::new(), &mut paths);
        for path in &paths {
            for value in &hostile {
                let mut edited = json.clone();
                *edited.pointer_mut(path).expect("leaf") = value.clone();
                std::fs::write(&file, edited.to_string()).expect("write");
                variants += 1;
                if let Err(panic) = load_and_generate(&dir) {
                    crashes.push(format!("{name} {path} = {value}: {panic}"));
                }
            }
        }
        std::fs::write(&file, &original).expect("restore");
    }
    eprintln!(
        "{case}: {variants} edited values, {} crashes",
        crashes.len()
    );
    assert!(crashes.is_empty(), "{crashes:#?}");
}

/// Every leaf value of the checkpoint's JSON files, replaced in turn.
#[test]
fn hostile_json_values_give_errors_in_llava15() {
    check_json_values("llava15-default");
}

#[test]
fn hostile_json_values_give_errors_in_llava_next() {
    check_json_values("llava-next");
}

/// tokenizer.json and the chat template cut at 40 points each.
#[test]
fn truncated_tokenizer_and_template_give_errors() {
    let dir = scratch("llava15-default", "cut");
    let mut crashes = Vec::new();
    for name in ["tokenizer.json", "chat_template.jinja"] {
        let file = dir.join(name);
        let original = std::fs::read(&file).expect("fixture file");
        for i in 1..40 {
            let cut = original.len() * i / 40;
            std::fs::write(&file, &original[..cut]).expect("write");
            if let Err(panic) = load_and_generate(&dir) {
                crashes.push(format!("{name} cut at {cut}: {panic}"));
            }
        }
        std::fs::write(&file, &original).expect("restore");
    }
    assert!(crashes.is_empty(), "{crashes:#?}");
    assert_eq!(
        load_and_generate(&dir),
        Ok(true),
        "the restored fixture works"
    );
}

/// Each value of the safetensors header (shapes, dtypes, offsets) replaced in turn, the file
/// rewritten with the new header.
#[test]
fn hostile_safetensors_header_values_give_errors() {
    let dir = scratch("llava15-default", "header");
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).expect("fixture weights");
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + header_len]).expect("header");
    let data = &bytes[8 + header_len..];
    let mut paths = Vec::new();
    // Tensor names hold dots, not slashes, so they are JSON pointer segments as they are.
    leaves(&header, String::new(), &mut paths);
    let hostile = [
        json!(0),
        json!(-1),
        json!(1u64 << 40),
        json!(u64::MAX),
        json!("I64"),
        json!(null),
    ];
    let mut crashes = Vec::new();
    for path in paths.iter().step_by(3) {
        for value in &hostile {
            let mut edited = header.clone();
            *edited.pointer_mut(path).expect("leaf") = value.clone();
            let text = edited.to_string();
            let mut out = (text.len() as u64).to_le_bytes().to_vec();
            out.extend(text.as_bytes());
            out.extend(data);
            std::fs::write(&file, &out).expect("write");
            if let Err(panic) = load_and_generate(&dir) {
                crashes.push(format!("{path} = {value}: {panic}"));
            }
        }
    }
    std::fs::write(&file, &bytes).expect("restore");
    assert!(crashes.is_empty(), "{crashes:#?}");
}
