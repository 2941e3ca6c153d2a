//! A tokenizer for the shapes world, trained by the `tokenizers` crate on the demo's own text.
//!
//! It is LLaMA-shaped, so that every part of llava-rs treats it as it would Vicuna's:
//! BPE over `▁`-prefixed words (Metaspace), `<s>` prepended, `</s>` as end of turn, and the
//! special tokens at fixed ids: `<unk>` 0, `<s>` 1, `</s>` 2, `<pad>` 3, `<image>` 4. The
//! initial alphabet holds all printable ASCII, so a user can type words the world never used
//! and still get (character-level) tokens rather than `<unk>`.

use std::collections::HashSet;
use std::path::Path;

use tokenizers::decoders::metaspace::Metaspace as MetaspaceDecoder;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{DemoError, Result};

pub const UNK: &str = "<unk>";
pub const BOS: &str = "<s>";
pub const EOS: &str = "</s>";
pub const PAD: &str = "<pad>";
pub const IMAGE: &str = "<image>";
/// The special tokens in id order.
pub const SPECIALS: [&str; 5] = [UNK, BOS, EOS, PAD, IMAGE];
pub const IMAGE_TOKEN_INDEX: u32 = 4;
pub const PAD_TOKEN_ID: u32 = 3;

fn tk_err(e: impl std::fmt::Display) -> DemoError {
    DemoError::Bad(format!("tokenizer: {e}"))
}

/// Trains a BPE tokenizer of at most `vocab_size` ids on `texts`.
pub fn train_tokenizer<'a>(
    texts: impl Iterator<Item = &'a str> + Send,
    vocab_size: usize,
) -> Result<Tokenizer> {
    let model = BPE::builder()
        .unk_token(UNK.into())
        .build()
        .map_err(tk_err)?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::First, true)));
    tokenizer.with_decoder(Some(MetaspaceDecoder::new('▁', PrependScheme::First, true)));
    let alphabet: HashSet<char> = (' '..='~').chain(['▁']).collect();
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(
            SPECIALS
                .iter()
                .map(|s| AddedToken::from(*s, true))
                .collect(),
        )
        .initial_alphabet(alphabet)
        .build()
        .into();
    tokenizer.train(&mut trainer, texts).map_err(tk_err)?;
    let post = TemplateProcessing::builder()
        .try_single(format!("{BOS} $A"))
        .map_err(tk_err)?
        .try_pair(format!("{BOS} $A {BOS} $B"))
        .map_err(tk_err)?
        .special_tokens(vec![(BOS, 1)])
        .build()
        .map_err(tk_err)?;
    tokenizer.with_post_processor(Some(post));
    for (id, s) in SPECIALS.iter().enumerate() {
        if tokenizer.token_to_id(s) != Some(id as u32) {
            return Err(DemoError::Bad(format!(
                "tokenizer: {s} did not land at id {id}"
            )));
        }
    }
    Ok(tokenizer)
}

/// Writes `tokenizer.json` and a `tokenizer_config.json` naming the special tokens.
pub fn save_tokenizer(tokenizer: &Tokenizer, dir: &Path, max_length: usize) -> Result<()> {
    let json = tokenizer.to_string(true).map_err(tk_err)?;
    crate::world::write_file(&dir.join("tokenizer.json"), json.as_bytes())?;
    let config = serde_json::json!({
        "bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD,
        "padding_side": "left", "model_max_length": max_length,
        "tokenizer_class": "LlamaTokenizer", "clean_up_tokenization_spaces": false,
        "add_bos_token": true, "add_eos_token": false
    });
    crate::world::write_file(
        &dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn world_words_become_single_tokens_and_decode_back() {
        let texts = ["From left to right: a red circle and a blue square."; 20];
        let tk = train_tokenizer(texts.iter().copied(), 200).unwrap();
        let enc = tk.encode("a red circle <image> zebra", true).unwrap();
        let toks = enc.get_tokens();
        assert_eq!(toks[0], BOS);
        assert!(toks.contains(&"▁circle".to_string()), "{toks:?}");
        assert!(toks.contains(&IMAGE.to_string()), "{toks:?}");
        assert!(
            !enc.get_ids().contains(&0),
            "unseen words fall back to letters: {toks:?}"
        );
        let plain = tk.encode("a red circle zebra", true).unwrap();
        assert_eq!(
            tk.decode(plain.get_ids(), true).unwrap(),
            "a red circle zebra"
        );
    }
}
