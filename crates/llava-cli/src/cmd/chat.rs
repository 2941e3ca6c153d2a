//! `llava chat`: multi-turn chat on stdin/stdout. `/image PATH` switches the image (and starts a
//! new conversation about it), `/reset` forgets the conversation, `/exit` or EOF quits.
//!
//! Each turn renders the whole conversation, as the checkpoint's template wants it, and one
//! [`PromptCache`] keeps the conversation's keys and values: a follow-up question prefills only
//! its own tokens, and the image goes through the vision tower once.

use std::io::{BufRead, Write};

use anyhow::Result;
use llava_data::conversation::Message;
use llava_model::prompt_cache::PromptCache;

use super::image_source::{self, ImageSource};
use super::model_args::{ModelArgs, SamplingArgs};

#[derive(clap::Args, Debug)]
pub struct ChatCommand {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The image to talk about, a file or http(s) URL (optional; `/image PATH` sets or changes
    /// it). Alias: --image-file.
    #[arg(long, alias = "image-file", value_parser = ImageSource::parse)]
    pub image: Option<ImageSource>,
    /// System prompt for named templates that have one.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// After each reply, print its timings and how much of the prompt was reused to stderr.
    #[arg(long)]
    pub timings: bool,
}

/// The chat's own commands; any other line is a message to the model.
const COMMANDS: &str = "/image PATH to switch image, /reset to start over, /exit to quit";

pub fn run(c: ChatCommand) -> Result<()> {
    let mut pipeline = c.model.load()?;
    if c.sampling.ignore_eos {
        pipeline.eos_token_ids.clear();
    }
    if let Some(image) = &c.image {
        image.check()?;
    }
    let mut pixels = image_source::pixel_values(&pipeline, c.image.as_slice())?;
    let mut history: Vec<Message> = c.system.iter().map(Message::system).collect();
    let mut cache = PromptCache::new();
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    let interactive = std::io::IsTerminal::is_terminal(&stdin);
    if interactive {
        eprintln!("llava chat — {COMMANDS}");
    }
    let mut raw = Vec::new();
    loop {
        if interactive {
            eprint!("USER: ");
        }
        raw.clear();
        if stdin.lock().read_until(b'\n', &mut raw)? == 0 {
            break;
        }
        // A line that is not UTF-8 (a pasted binary, a wrong terminal encoding) keeps the chat
        // going, with U+FFFD where the bytes were, instead of ending it.
        let line = String::from_utf8_lossy(&raw);
        let input = line.trim();
        if input.is_empty() {
            continue;
        }
        if input == "/exit" || input == "/quit" {
            break;
        }
        if input == "/help" {
            eprintln!("{COMMANDS}");
            continue;
        }
        // A lone `/word` that is no command is a typo, not a question: answering it would put
        // it into the conversation. A message with spaces may begin with a slash.
        let command = input.split_whitespace().next().unwrap_or("");
        if input.starts_with('/')
            && !input.contains(char::is_whitespace)
            && !matches!(command, "/reset" | "/image")
        {
            eprintln!("error: unknown command {input} ({COMMANDS})");
            continue;
        }
        if input == "/reset" {
            history.retain(|m| m.role == llava_data::conversation::Role::System);
            cache.clear();
            continue;
        }
        if let Some(path) = input.strip_prefix("/image").filter(|_| command == "/image") {
            if path.trim().is_empty() {
                eprintln!("error: /image needs a path: /image PATH");
                continue;
            }
            // A bad image is reported and the chat goes on with the previous one.
            let image = ImageSource::parse(path.trim()).map_err(anyhow::Error::msg);
            match image.and_then(|image| {
                let p = image_source::pixel_values(&pipeline, std::slice::from_ref(&image))?;
                Ok((image, p))
            }) {
                Ok((image, p)) => {
                    pixels = p;
                    history.retain(|m| m.role == llava_data::conversation::Role::System);
                    cache.clear();
                    eprintln!("(image: {image})");
                }
                Err(e) => eprintln!("error: {}", crate::one_line(&e)),
            }
            continue;
        }
        // The image goes with the first question of the conversation, as in training.
        let first_user = !history
            .iter()
            .any(|m| m.role == llava_data::conversation::Role::User);
        let n_images = if first_user && pixels.is_some() { 1 } else { 0 };
        history.push(Message::user(input, n_images));
        let prompt = pipeline.render(&history)?;
        let turn_pixels = if history.iter().any(|m| m.images > 0) {
            pixels.as_ref()
        } else {
            None
        };
        let ids = pipeline.encode(&prompt, turn_pixels)?;
        if interactive {
            eprint!("ASSISTANT: ");
        }
        let result = pipeline.generate_with_cache(
            &mut cache,
            &ids,
            turn_pixels,
            &c.sampling.params(),
            c.sampling.max_new_tokens,
            &c.sampling.stop,
            |piece| {
                let _ = write!(stdout, "{piece}");
                let _ = stdout.flush();
            },
        );
        println!();
        match result {
            Ok(out) => {
                if c.timings {
                    let s = &out.stats;
                    eprintln!(
                        "({} prompt tokens, {} reused; vision {:.0} ms, prefill {:.0} ms, {} tokens at {:.2} tok/s)",
                        s.prompt_tokens,
                        s.cached_tokens,
                        s.vision_ms,
                        s.prefill_ms,
                        s.generated,
                        s.decode_tok_s()
                    );
                }
                history.push(Message::assistant(out.text.trim()))
            }
            Err(e) => {
                // e.g. the context is full: say so and let the user /reset.
                eprintln!("error: {e} (/reset starts a new conversation)");
                history.pop();
            }
        }
    }
    Ok(())
}
