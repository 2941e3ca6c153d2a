//! The checkpoint's `tokenizer.json` (via the `tokenizers` crate), its special tokens, and the
//! two ways `<image>` becomes image-token ids.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::record::IMAGE_PLACEHOLDER;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Encode(String),
}

/// How the placeholder `<image>` in a prompt turns into `n` image positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageTokens {
    /// `<image>` is a token of the vocabulary (llava-hf): the text is expanded to `n` copies of
    /// it and tokenised whole, exactly as transformers' `LlavaProcessor` does.
    Expand { id: u32 },
    /// The vocabulary has no image token (the original layout): the prompt is tokenised in
    /// chunks around `<image>`, as the original `tokenizer_image_token` does, and `n` copies of
    /// `id` (a sentinel outside the vocabulary) go between them.
    Split {
        id: u32,
        /// LLaVA v0's `mm_use_im_start_end`: each `<image>` is first written
        /// `<im_start><image><im_end>`, as the original does to the text before tokenising,
        /// so the image positions sit between those two added tokens.
        im_start_end: bool,
    },
}

/// The added tokens around an image under `mm_use_im_start_end`.
pub const IM_START: &str = "<im_start>";
pub const IM_END: &str = "<im_end>";

impl ImageTokens {
    pub fn id(&self) -> u32 {
        match self {
            ImageTokens::Expand { id } | ImageTokens::Split { id, .. } => *id,
        }
    }
}

/// Reads a `tokenizer.json`. The tokenizers crate panics on some malformed JSON (its decoder
/// reader `expect`s a parse), so the syntax is checked first, and a panic on a well-formed but
/// unreadable file becomes an error too.
fn read_tokenizer_json(path: &Path) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let load = |message: String| TokenizerError::Load {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| load(e.to_string()))?;
    serde_json::from_str::<serde::de::IgnoredAny>(&text)
        .map_err(|e| load(format!("is not valid JSON: {e}")))?;
    std::panic::catch_unwind(|| text.parse::<tokenizers::Tokenizer>())
        .map_err(|_| load("is not a tokenizer that the tokenizers library can read".into()))?
        .map_err(|e| load(e.to_string()))
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub eos_token_id: Option<u32>,
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json`, else converts `dir/tokenizer.model`, with special-token
    /// strings from `tokenizer_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let path = dir.join("tokenizer.json");
        let sentencepiece = dir.join("tokenizer.model");
        let config = read_optional_json(&dir.join("tokenizer_config.json"))?;
        let inner = if path.is_file() {
            read_tokenizer_json(&path)?
        } else if sentencepiece.is_file() {
            // The original LLaVA releases: a SentencePiece model, no tokenizer.json.
            let added = read_optional_json(&dir.join("added_tokens.json"))?;
            let json = crate::sentencepiece::tokenizer_json(
                &sentencepiece,
                config.as_ref(),
                added.as_ref(),
            )?;
            json.to_string()
                .parse::<tokenizers::Tokenizer>()
                .map_err(|e| TokenizerError::Load {
                    path: sentencepiece.clone(),
                    message: format!("cannot be converted: {e}"),
                })?
        } else {
            return Err(TokenizerError::Load {
                path,
                message:
                    "missing, and there is no tokenizer.model (SentencePiece) beside it either"
                        .into(),
            });
        };
        let special = |key: &str, fallback: &str| -> Option<String> {
            config_token(config.as_ref(), key)
                .flatten()
                .or_else(|| inner.token_to_id(fallback).map(|_| fallback.to_string()))
        };
        let bos_token = special("bos_token", "<s>");
        let eos_token = special("eos_token", "</s>");
        let eos_token_id = eos_token.as_deref().and_then(|t| inner.token_to_id(t));
        Ok(Self {
            inner,
            bos_token,
            eos_token,
            eos_token_id,
        })
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary piece of an id, e.g. `▁cat` or `<0x0A>`.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// The image-token convention for this vocabulary; `fallback_id` is the model's
    /// `image_token_index`, used as the sentinel when the vocabulary has no `<image>`.
    /// `im_start_end` (the original layout's `mm_use_im_start_end`) applies to the sentinel
    /// convention, the only one the original layout has.
    pub fn image_tokens(&self, fallback_id: u32, im_start_end: bool) -> ImageTokens {
        match self.inner.token_to_id(IMAGE_PLACEHOLDER) {
            Some(id) => ImageTokens::Expand { id },
            None => ImageTokens::Split {
                id: fallback_id,
                im_start_end,
            },
        }
    }

    /// Tokenises a rendered prompt with one `<image>` per image: the i-th becomes
    /// `image_token_counts[i]` image ids (all the same in LLaVA-1.5, by image size in
    /// LLaVA-NeXT). A prompt with more or fewer placeholders than images is an error.
    pub fn encode_prompt(
        &self,
        prompt: &str,
        image: ImageTokens,
        image_token_counts: &[usize],
    ) -> Result<Vec<u32>, TokenizerError> {
        let placeholders = prompt.matches(IMAGE_PLACEHOLDER).count();
        if placeholders != image_token_counts.len() {
            return Err(TokenizerError::Encode(format!(
                "the prompt has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {} image(s) were given: put one {IMAGE_PLACEHOLDER} in the prompt per image",
                image_token_counts.len()
            )));
        }
        self.encode_expanding(prompt, image, |i| image_token_counts[i], true)
    }

    /// Tokenises a piece of a longer sequence, with every `<image>` becoming `n_image_tokens`
    /// image ids: `add_special_tokens` is false for every piece but the first, so BOS appears
    /// once.
    pub fn encode_with_images(
        &self,
        text: &str,
        image: ImageTokens,
        n_image_tokens: usize,
        add_special_tokens: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        self.encode_expanding(text, image, |_| n_image_tokens, add_special_tokens)
    }

    /// The `i`-th `<image>` of `text` becomes `count(i)` image ids.
    fn encode_expanding(
        &self,
        text: &str,
        image: ImageTokens,
        count: impl Fn(usize) -> usize,
        add_special_tokens: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        match image {
            ImageTokens::Expand { .. } => {
                let mut expanded = String::with_capacity(text.len());
                for (i, chunk) in text.split(IMAGE_PLACEHOLDER).enumerate() {
                    if i > 0 {
                        expanded.push_str(&IMAGE_PLACEHOLDER.repeat(count(i - 1)));
                    }
                    expanded.push_str(chunk);
                }
                self.encode(&expanded, add_special_tokens)
            }
            ImageTokens::Split { id, im_start_end } => {
                let wrapped;
                let text = if im_start_end {
                    wrapped = text.replace(
                        IMAGE_PLACEHOLDER,
                        &format!("{IM_START}{IMAGE_PLACEHOLDER}{IM_END}"),
                    );
                    &wrapped
                } else {
                    text
                };
                let mut ids = Vec::new();
                for (i, chunk) in text.split(IMAGE_PLACEHOLDER).enumerate() {
                    if i > 0 {
                        ids.extend(std::iter::repeat_n(id, count(i - 1)));
                    }
                    // Only the first chunk carries BOS, as in the original `tokenizer_image_token`.
                    ids.extend(self.encode(chunk, add_special_tokens && i == 0)?);
                }
                Ok(ids)
            }
        }
    }
}

/// Turns generated ids into text as they arrive, emitting only complete characters: a token
/// may end inside a multi-byte character (byte-fallback tokens), and SentencePiece drops a
/// leading space when a piece is decoded on its own.
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    emitted: usize,
}

impl<'a> StreamDecoder<'a> {
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            emitted: 0,
        }
    }

    /// Adds one id and returns the newly completed text, if any.
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids, true)?;
        if text.ends_with('\u{FFFD}')
            || text.len() < self.emitted
            || !text.is_char_boundary(self.emitted)
        {
            return Ok(String::new());
        }
        let new = text[self.emitted..].to_string();
        self.emitted = text.len();
        Ok(new)
    }

    pub fn text(&self) -> Result<String, TokenizerError> {
        self.tokenizer.decode(&self.ids, true)
    }
}

/// A special token named in `tokenizer_config.json` (`bos_token`, …): `None` when the key is
/// absent, `Some(None)` when it is `null`, else its text, given as a string or, in older
/// configs, as a `{"content": "</s>", ...}` object.
pub(crate) fn config_token(config: Option<&Value>, key: &str) -> Option<Option<String>> {
    let v = config?.get(key)?;
    Some(match v {
        Value::String(s) => Some(s.clone()),
        v => v.get("content").and_then(Value::as_str).map(String::from),
    })
}

pub(crate) fn read_optional_json(path: &Path) -> Result<Option<Value>, TokenizerError> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| TokenizerError::Load {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TokenizerError::Load {
            path: path.to_path_buf(),
            message: format!("invalid JSON: {e}"),
        })
}
