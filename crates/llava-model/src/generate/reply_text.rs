//! A reply's text as its tokens arrive: detokenised piece by piece, cut at the first stop
//! string, and released only where no stop string could still begin, so that a stream never
//! shows text that is then taken back.

use std::borrow::Cow;
use std::ops::ControlFlow;

use llava_data::tokenizer::{StreamDecoder, Tokenizer, TokenizerError};

use crate::error::Result;

pub struct ReplyText<'a> {
    decoder: StreamDecoder<'a>,
    /// Borrowed by a one-off generation; owned by a server's sequence, which outlives no call.
    stops: Cow<'a, [String]>,
    text: String,
    /// Bytes of `text` already given out.
    emitted: usize,
    stopped: bool,
    error: Option<TokenizerError>,
}

impl<'a> ReplyText<'a> {
    pub fn new(tokenizer: &'a Tokenizer, stops: impl Into<Cow<'a, [String]>>) -> Self {
        Self {
            decoder: StreamDecoder::new(tokenizer),
            stops: stops.into(),
            text: String::new(),
            emitted: 0,
            stopped: false,
            error: None,
        }
    }

    /// Takes the next token and gives `on_text` the text that is now final. Breaks at a stop
    /// string, or at a token the tokenizer cannot decode (reported by [`ReplyText::finish`]).
    pub fn push(&mut self, id: u32, on_text: &mut impl FnMut(&str)) -> ControlFlow<()> {
        match self.decoder.push(id) {
            Ok(piece) => self.text.push_str(&piece),
            Err(e) => {
                self.error = Some(e);
                return ControlFlow::Break(());
            }
        }
        let stops = &self.stops;
        if let Some(cut) = stops
            .iter()
            .filter_map(|s| self.text.find(s.as_str()))
            .min()
        {
            self.text.truncate(cut);
            self.stopped = true;
        }
        // Hold back a tail that could still grow into a stop string.
        let safe = if self.stopped {
            self.text.len()
        } else {
            safe_prefix_len(&self.text, stops)
        };
        if safe > self.emitted {
            on_text(&self.text[self.emitted..safe]);
            self.emitted = safe;
        }
        if self.stopped {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }

    /// The whole reply, once generation has ended; `on_text` gets whatever was held back.
    pub fn finish(mut self, on_text: &mut impl FnMut(&str)) -> Result<String> {
        if let Some(e) = self.error {
            return Err(e.into());
        }
        if !self.stopped {
            // Bytes held back as an incomplete character are final now: decode them lossily.
            self.text = self.decoder.text()?;
        }
        if let Some(rest) = self.text.get(self.emitted..).filter(|r| !r.is_empty()) {
            on_text(rest);
        }
        Ok(self.text)
    }
}

/// The longest prefix of `text` that cannot be the start of a stop string.
fn safe_prefix_len(text: &str, stops: &[String]) -> usize {
    let mut safe = text.len();
    for stop in stops {
        for (i, _) in text.char_indices().rev().take(stop.len()) {
            if stop.starts_with(&text[i..]) {
                safe = safe.min(i);
            }
        }
    }
    safe
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_possible_stop_prefixes() {
        let stops = vec!["###".to_string()];
        assert_eq!(safe_prefix_len("hello ##", &stops), 6);
        assert_eq!(safe_prefix_len("hello", &stops), 5);
        assert_eq!(safe_prefix_len("a#b", &stops), 3);
    }
}
