//! A LLaVA record → `input_ids` and `labels` for training.
//!
//! The template renders the conversation as segments (prompt text, or an assistant answer with
//! its end-of-turn marker). Each segment is tokenised on its own and its labels are set from
//! the same token list: the answer's tokens, or -100 everywhere else. The mask therefore cannot
//! drift from the tokens, which is the failure behind the original code's "tokenization
//! mismatch" warning (it tokenised the whole text, then re-tokenised pieces to count lengths).

use crate::conversation::{ConvTemplate, Message, Role};
use crate::record::{IMAGE_PLACEHOLDER, LlavaRecord};
use crate::tokenizer::{ImageTokens, Tokenizer, TokenizerError};

/// Label of a position that is not supervised (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    /// The record itself is malformed; the trainer skips it with a counted warning.
    #[error("record {id}: {reason}")]
    BadRecord { id: String, reason: String },
    #[error("record {id}: {source}")]
    Tokenizer {
        id: String,
        #[source]
        source: TokenizerError,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedSample {
    pub input_ids: Vec<u32>,
    /// Same length as `input_ids`; [`IGNORE_INDEX`] where the loss is not taken.
    pub labels: Vec<i64>,
    /// Images the sample needs (0 for text-only records).
    pub images: usize,
    /// True when `max_length` cut the sample short.
    pub truncated: bool,
}

#[derive(Debug, Clone)]
pub struct SampleOptions {
    pub template: ConvTemplate,
    pub image_tokens: ImageTokens,
    /// Image positions per image (`LlavaConfig::image_seq_len`).
    pub image_seq_len: usize,
    pub max_length: usize,
    /// Keep `<image>` where the record puts it instead of moving it to the front of the first
    /// question, as the original does.
    pub keep_image_position: bool,
}

/// Turns the record's turns into messages, checking the roles and the `<image>` placement.
pub fn record_messages(
    record: &LlavaRecord,
    keep_image_position: bool,
) -> Result<Vec<Message>, SampleError> {
    let bad = |reason: String| SampleError::BadRecord {
        id: record.id_string(),
        reason,
    };
    if record.conversations.is_empty() {
        return Err(bad("has no conversation turns".into()));
    }
    let placeholders: usize = record
        .conversations
        .iter()
        .map(|t| t.value.matches(IMAGE_PLACEHOLDER).count())
        .sum();
    match (&record.image, placeholders) {
        (Some(_), 0) => return Err(bad("has an image but no <image> in its turns".into())),
        (Some(_), n) if n > 1 => {
            return Err(bad(format!("has {n} <image> placeholders for one image")));
        }
        (None, n) if n > 0 => return Err(bad("has <image> in its turns but no image".into())),
        _ => {}
    }
    let mut messages = Vec::with_capacity(record.conversations.len());
    for (i, turn) in record.conversations.iter().enumerate() {
        let role = match turn.from.as_str() {
            "human" | "user" => Role::User,
            "gpt" | "assistant" => Role::Assistant,
            other => {
                return Err(bad(format!(
                    "turn {i} is from `{other}` (expected human or gpt)"
                )));
            }
        };
        let expected = if i % 2 == 0 {
            Role::User
        } else {
            Role::Assistant
        };
        if role != expected {
            return Err(bad(format!(
                "turn {i} is from `{}`, but turns must alternate human, gpt, …",
                turn.from
            )));
        }
        let has_image = turn.value.contains(IMAGE_PLACEHOLDER);
        if has_image && i != 0 {
            return Err(bad(format!(
                "<image> is in turn {i}; it must be in the first human turn"
            )));
        }
        let message = if has_image && !keep_image_position {
            // `<image>\nQ` or `Q\n<image>` both become an image in front of Q.
            let text = turn.value.replace(IMAGE_PLACEHOLDER, "").trim().to_string();
            Message {
                role,
                text,
                images: 1,
            }
        } else {
            Message {
                role,
                text: turn.value.clone(),
                images: 0,
            }
        };
        messages.push(message);
    }
    if messages.len() % 2 != 0 {
        return Err(bad("ends with a human turn that has no answer".into()));
    }
    Ok(messages)
}

/// Tokenises one record with its supervision mask.
pub fn tokenize_record(
    tokenizer: &Tokenizer,
    record: &LlavaRecord,
    opts: &SampleOptions,
) -> Result<TokenizedSample, SampleError> {
    let messages = record_messages(record, opts.keep_image_position)?;
    let eos = tokenizer.eos_token.clone().unwrap_or_else(|| "</s>".into());
    let segments = opts.template.segments(&messages, &eos, false);
    let mut input_ids = Vec::new();
    let mut labels = Vec::new();
    for (i, segment) in segments.iter().enumerate() {
        let ids = tokenizer
            .encode_with_images(&segment.text, opts.image_tokens, opts.image_seq_len, i == 0)
            .map_err(|source| SampleError::Tokenizer {
                id: record.id_string(),
                source,
            })?;
        labels.extend(ids.iter().map(|&t| {
            if segment.supervised {
                t as i64
            } else {
                IGNORE_INDEX
            }
        }));
        input_ids.extend(ids);
    }
    let truncated = input_ids.len() > opts.max_length;
    if truncated {
        input_ids.truncate(opts.max_length);
        labels.truncate(opts.max_length);
    }
    Ok(TokenizedSample {
        input_ids,
        labels,
        images: usize::from(record.image.is_some()),
        truncated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Turn;

    fn record(turns: &[(&str, &str)], image: bool) -> LlavaRecord {
        LlavaRecord {
            id: serde_json::json!("r1"),
            image: image.then(|| "a.jpg".to_string()),
            conversations: turns
                .iter()
                .map(|(f, v)| Turn {
                    from: f.to_string(),
                    value: v.to_string(),
                })
                .collect(),
        }
    }

    #[test]
    fn image_moves_to_the_front_unless_kept() {
        let r = record(
            &[("human", "What is it?\n<image>"), ("gpt", "A cat.")],
            true,
        );
        let m = record_messages(&r, false).expect("valid");
        assert_eq!((m[0].text.as_str(), m[0].images), ("What is it?", 1));
        let m = record_messages(&r, true).expect("valid");
        assert_eq!(
            (m[0].text.as_str(), m[0].images),
            ("What is it?\n<image>", 0)
        );
    }

    #[test]
    fn malformed_records_are_named() {
        let cases = [
            (
                record(&[("gpt", "Hi"), ("human", "<image>\nQ")], true),
                "alternate",
            ),
            (record(&[("human", "Q"), ("gpt", "A")], true), "no <image>"),
            (
                record(&[("human", "<image>\nQ"), ("gpt", "A")], false),
                "no image",
            ),
            (record(&[("human", "<image>\nQ")], true), "no answer"),
            (
                record(
                    &[
                        ("human", "Q"),
                        ("gpt", "A"),
                        ("human", "<image>\nQ2"),
                        ("gpt", "B"),
                    ],
                    true,
                ),
                "first human",
            ),
            (record(&[("bot", "Q"), ("gpt", "A")], false), "`bot`"),
            (record(&[], false), "no conversation"),
        ];
        for (r, needle) in cases {
            let e = record_messages(&r, false).expect_err(needle).to_string();
            assert!(e.contains("r1") && e.contains(needle), "{e}");
        }
    }
}
