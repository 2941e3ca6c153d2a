//! A SentencePiece `tokenizer.model` made into the `tokenizer.json` that transformers builds
//! from it. The original LLaVA releases (`liuhaotian/*`) and their Vicuna bases ship only
//! `tokenizer.model`.
//!
//! Only BPE models are converted: LLaMA's, Vicuna's and Mistral's. The result is transformers'
//! `LlamaTokenizer` over the model's pieces: a BPE with byte fallback, whose merges come from
//! the vocabulary (a piece's splits into two pieces, ranked by the piece's id), `▁` for spaces
//! before the BPE, and the BOS/EOS that `tokenizer_config.json` asks for. transformers, not the
//! `sentencepiece` library, is the reference: they differ on text that starts with a space.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use prost::Message;
use serde_json::{Value, json};

use crate::tokenizer::{TokenizerError, config_token};

/// The parts of `sentencepiece_model.proto` that the conversion reads; prost skips the rest.
#[derive(Clone, PartialEq, Message)]
struct ModelProto {
    #[prost(message, repeated, tag = "1")]
    pieces: Vec<SentencePiece>,
    #[prost(message, optional, tag = "2")]
    trainer_spec: Option<TrainerSpec>,
}

#[derive(Clone, PartialEq, Message)]
struct SentencePiece {
    #[prost(string, optional, tag = "1")]
    piece: Option<String>,
    /// `Type`: 1 normal (the default), 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    #[prost(int32, optional, tag = "3")]
    kind: Option<i32>,
}

#[derive(Clone, PartialEq, Message)]
struct TrainerSpec {
    /// 1 unigram (the default), 2 BPE, 3 word, 4 char.
    #[prost(int32, optional, tag = "3")]
    model_type: Option<i32>,
}

const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const BPE: i32 = 2;

/// The `tokenizer.json` (as JSON) for the SentencePiece model at `path`, configured by the
/// checkpoint's `tokenizer_config.json` and legacy `added_tokens.json`, where present. The
/// latter holds a v0 release's `<im_patch>`, `<im_start>` and `<im_end>`: transformers 4.x,
/// which the original LLaVA ran on, read it; transformers 5 no longer does.
pub fn tokenizer_json(
    path: &Path,
    config: Option<&Value>,
    added_tokens_json: Option<&Value>,
) -> Result<Value, TokenizerError> {
    let err = |message: String| TokenizerError::Load {
        path: path.to_path_buf(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let model = ModelProto::decode(bytes.as_slice())
        .map_err(|e| err(format!("not a SentencePiece model: {e}")))?;
    let model_type = model
        .trainer_spec
        .as_ref()
        .and_then(|t| t.model_type)
        .unwrap_or(1);
    if model_type != BPE {
        let name = match model_type {
            1 => "Unigram",
            3 => "word",
            4 => "char",
            _ => "unknown",
        };
        return Err(err(format!(
            "is a {name} SentencePiece model; only BPE models (LLaMA, Vicuna, Mistral) are converted. Save a tokenizer.json with transformers' tokenizer.save_pretrained"
        )));
    }
    let mut vocab: HashMap<&str, u32> = HashMap::with_capacity(model.pieces.len());
    let mut pieces = Vec::with_capacity(model.pieces.len());
    for (id, p) in model.pieces.iter().enumerate() {
        let piece = p.piece.as_deref().unwrap_or_default();
        if vocab.insert(piece, id as u32).is_some() {
            return Err(err(format!("has the piece {piece:?} twice")));
        }
        pieces.push(piece);
    }

    let setting = |key: &str| config.and_then(|c| c.get(key));
    let flag = |key: &str, default: bool| setting(key).and_then(Value::as_bool).unwrap_or(default);
    let token = |key: &str, default: &str| -> Option<String> {
        config_token(config, key).unwrap_or_else(|| Some(default.to_string()))
    };

    // Added tokens, by id: the model's control (special) and user-defined pieces, the special
    // tokens the config names, then the config's and `added_tokens.json`'s own entries.
    let mut added: BTreeMap<u32, Value> = BTreeMap::new();
    let entry = |id: u32, content: &str, special: bool| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": special})
    };
    for (id, p) in model.pieces.iter().enumerate() {
        match p.kind {
            Some(CONTROL) => added.insert(id as u32, entry(id as u32, pieces[id], true)),
            Some(USER_DEFINED) => added.insert(id as u32, entry(id as u32, pieces[id], false)),
            _ => None,
        };
    }
    let unk = token("unk_token", "<unk>");
    let bos = token("bos_token", "<s>");
    let eos = token("eos_token", "</s>");
    for t in [&unk, &bos, &eos].into_iter().flatten() {
        if let Some(&id) = vocab.get(t.as_str()) {
            added.insert(id, entry(id, t, true));
        }
    }
    if let Some(Value::Object(decoder)) = setting("added_tokens_decoder") {
        for (id, t) in decoder {
            let id: u32 = id.parse().map_err(|_| {
                err(format!(
                    "tokenizer_config.json: added_tokens_decoder key {id:?} is not a token id"
                ))
            })?;
            let content = t.get("content").and_then(Value::as_str).ok_or_else(|| {
                err(format!(
                    "tokenizer_config.json: added_tokens_decoder[{id}] has no content"
                ))
            })?;
            let mut e = entry(id, content, false);
            for key in ["single_word", "lstrip", "rstrip", "normalized", "special"] {
                if let Some(b) = t.get(key).and_then(Value::as_bool) {
                    e[key] = json!(b);
                }
            }
            added.insert(id, e);
        }
    }
    if let Some(Value::Object(map)) = added_tokens_json {
        for (content, id) in map {
            let id = id
                .as_u64()
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| {
                    err(format!(
                        "added_tokens.json: the id of {content:?} is not a token id"
                    ))
                })?;
            added.entry(id).or_insert_with(|| entry(id, content, false));
        }
    }
    // The tokenizers crate numbers new tokens from the vocabulary's end, in order.
    for (next, (&id, t)) in (pieces.len() as u32..).zip(added.range(pieces.len() as u32..)) {
        if id != next {
            return Err(err(format!(
                "added token {} has id {id}, but the ids after the {} SentencePiece pieces must run on without gaps (next free id: {next})",
                t["content"],
                pieces.len()
            )));
        }
    }

    let add_prefix_space = flag("add_prefix_space", true);
    let prepend_scheme = match (add_prefix_space, flag("legacy", false)) {
        (false, _) => "never",
        (true, true) => "always",
        (true, false) => "first",
    };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_prefix_space {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }

    let vocab_json: serde_json::Map<String, Value> = pieces
        .iter()
        .enumerate()
        .map(|(id, p)| (p.to_string(), json!(id)))
        .collect();
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added.into_values().collect::<Vec<_>>(),
        "normalizer": null,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "▁",
                          "prepend_scheme": prepend_scheme, "split": false},
        "post_processor": post_processor(
            bos.filter(|b| flag("add_bos_token", true) && vocab.contains_key(b.as_str())).as_deref(),
            eos.filter(|e| flag("add_eos_token", false) && vocab.contains_key(e.as_str())).as_deref(),
            &vocab,
        ),
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab_json, "merges": merges(&pieces, &vocab)},
    }))
}

/// BPE merges from the vocabulary alone: every split of a piece into two pieces, ranked by the
/// piece's id (SentencePiece gives earlier pieces higher scores), then by the left part's length.
fn merges(pieces: &[&str], vocab: &HashMap<&str, u32>) -> Vec<[String; 2]> {
    let mut merges = Vec::new();
    for piece in pieces {
        for (split, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(split);
            if vocab.contains_key(left) && vocab.contains_key(right) {
                merges.push([left.to_string(), right.to_string()]);
            }
        }
    }
    merges
}

/// BOS and EOS around each sequence, as `add_bos_token` and `add_eos_token` ask.
fn post_processor(bos: Option<&str>, eos: Option<&str>, vocab: &HashMap<&str, u32>) -> Value {
    let special = |t: &str, type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
    let sequence = |s: &str, type_id: u32| json!({"Sequence": {"id": s, "type_id": type_id}});
    let wrap = |s: &str, type_id: u32| {
        let mut parts: Vec<Value> = bos.iter().map(|b| special(b, type_id)).collect();
        parts.push(sequence(s, type_id));
        parts.extend(eos.iter().map(|e| special(e, type_id)));
        parts
    };
    let mut special_tokens = serde_json::Map::new();
    for t in bos.iter().chain(eos.iter()) {
        if let Some(&id) = vocab.get(t) {
            special_tokens.insert(t.to_string(), json!({"id": t, "ids": [id], "tokens": [t]}));
        }
    }
    let mut pair = wrap("A", 0);
    pair.extend(wrap("B", 1));
    json!({"type": "TemplateProcessing", "single": wrap("A", 0), "pair": pair,
           "special_tokens": special_tokens})
}
