//! A SentencePiece `tokenizer.model` (with no tokenizer.json), converted, tokenises as
//! transformers does: `tools/make_sentencepiece_fixture.py` recorded transformers' ids and
//! decoded text for each `tokenizer_config.json` variant.

use std::path::{Path, PathBuf};

use llava_data::tokenizer::Tokenizer;
use serde_json::Value;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizers/sentencepiece")
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixture().join("expected.json")).expect("expected.json");
    serde_json::from_str(&text).expect("json")
}

fn ids(v: &Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).expect("ids")
}

#[test]
fn converted_sentencepiece_model_matches_transformers() {
    let expected = expected();
    let strings: Vec<String> =
        serde_json::from_value(expected["strings"].clone()).expect("strings");
    let variants = expected["variants"].as_object().expect("variants");
    assert_eq!(variants.len(), 3);
    for (name, want) in variants {
        let dir = fixture().join("variants").join(name);
        assert!(
            !dir.join("tokenizer.json").exists(),
            "{name}: converted, not read"
        );
        let tok = Tokenizer::from_dir(&dir).expect("converts");
        for (i, s) in strings.iter().enumerate() {
            assert_eq!(
                tok.encode(s, true).expect("encodes"),
                ids(&want["ids"][i]),
                "{name}: {s:?} with BOS"
            );
            let plain = ids(&want["ids_without_special"][i]);
            assert_eq!(
                tok.encode(s, false).expect("encodes"),
                plain,
                "{name}: {s:?}"
            );
            assert_eq!(
                tok.decode(&plain, true).expect("decodes"),
                want["decoded"][i].as_str().expect("text"),
                "{name}: decoding {s:?}"
            );
        }
        assert_eq!(tok.bos_token.as_deref(), Some("<s>"));
        assert_eq!(tok.eos_token_id, Some(2), "{name}");
    }
}

/// A tokenizer.json, where there is one, is read rather than converted.
#[test]
fn tokenizer_json_comes_first() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = fixture().join("variants/legacy-false");
    for f in ["tokenizer.model", "tokenizer_config.json"] {
        std::fs::copy(dir.join(f), tmp.path().join(f)).expect("copy");
    }
    std::fs::write(tmp.path().join("tokenizer.json"), "{not json").expect("write");
    let e = Tokenizer::from_dir(tmp.path())
        .err()
        .expect("the broken tokenizer.json is read");
    assert!(e.to_string().contains("tokenizer.json"), "{e}");
}

#[test]
fn a_file_that_is_not_a_sentencepiece_model_is_named() {
    let tmp = tempfile::tempdir().expect("tmp");
    std::fs::write(tmp.path().join("tokenizer.model"), b"\xff\xff\xff garbage").expect("write");
    let e = Tokenizer::from_dir(tmp.path()).err().expect("refused");
    let msg = e.to_string();
    assert!(
        msg.contains("tokenizer.model") && msg.contains("not a SentencePiece model"),
        "{msg}"
    );
}

#[test]
fn neither_tokenizer_file_is_a_clear_error() {
    let tmp = tempfile::tempdir().expect("tmp");
    let e = Tokenizer::from_dir(tmp.path()).err().expect("refused");
    let msg = e.to_string();
    assert!(
        msg.contains("tokenizer.json") && msg.contains("tokenizer.model"),
        "{msg}"
    );
}

/// A v0 release's `added_tokens.json` (`<im_patch>`, `<im_start>`, `<im_end>`), which the
/// original LLaVA's transformers 4.x read; transformers 5 ignores the file.
#[test]
fn added_tokens_json_extends_the_vocabulary() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = fixture().join("variants/legacy-false");
    for f in ["tokenizer.model", "tokenizer_config.json"] {
        std::fs::copy(dir.join(f), tmp.path().join(f)).expect("copy");
    }
    std::fs::write(
        tmp.path().join("added_tokens.json"),
        r#"{"<im_patch>": 400, "<im_start>": 401, "<im_end>": 402}"#,
    )
    .expect("write");
    let tok = Tokenizer::from_dir(tmp.path()).expect("converts");
    for (token, id) in [("<im_patch>", 400), ("<im_start>", 401), ("<im_end>", 402)] {
        assert_eq!(tok.token_to_id(token), Some(id), "{token}");
    }
    let plain = Tokenizer::from_dir(&dir).expect("converts");
    let question = plain.encode("\nWhat", false).expect("encodes");
    let ids = tok
        .encode("<im_start><im_end>\nWhat", false)
        .expect("encodes");
    assert_eq!(ids[..2], [401, 402]);
    // `legacy` false: only the very start gets a `▁`, not the text after an added token (as
    // transformers does after `<image>` in the fixture's added-image-token variant).
    assert_eq!(plain.id_to_token(question[0]).as_deref(), Some("▁"));
    assert_eq!(ids[2..], question[1..]);

    // Ids that leave a gap after the vocabulary cannot be numbered by the tokenizers crate.
    std::fs::write(
        tmp.path().join("added_tokens.json"),
        r#"{"<im_patch>": 401}"#,
    )
    .expect("write");
    let e = Tokenizer::from_dir(tmp.path()).err().expect("refused");
    assert!(
        e.to_string().contains("<im_patch>") && e.to_string().contains("401"),
        "{e}"
    );
}
