//! `llava generate`: one prompt (with an optional image) in, the model's answer out.

use std::io::Write;

use anyhow::{Result, bail};
use llava_data::conversation::Message;
use serde::Serialize;

use super::image_source::{self, ImageSource};
use super::model_args::{ModelArgs, SamplingArgs};

#[derive(clap::Args, Debug)]
pub struct GenerateCommand {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Image file (png, jpeg, gif, webp, bmp) or http(s) URL. Repeat for several images, in
    /// prompt order. Alias: --image-file.
    #[arg(long, alias = "image-file", value_parser = ImageSource::parse)]
    pub image: Vec<ImageSource>,
    /// The user's question; the checkpoint's chat template is applied. Alias: --query.
    #[arg(long, alias = "query")]
    pub prompt: String,
    /// Take --prompt verbatim (no template); `<image>` marks where each image goes.
    #[arg(long)]
    pub raw: bool,
    /// System prompt for named templates that have one.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Generate this many times first, unreported: for benchmarks, since a GPU's first run also
    /// loads its kernels.
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
}

#[derive(Serialize)]
struct Timings {
    vision_ms: f64,
    prefill_ms: f64,
    decode_tok_s: f64,
}

#[derive(Serialize)]
struct JsonOutput {
    text: String,
    token_ids: Vec<u32>,
    prompt_tokens: usize,
    timings: Timings,
}

pub fn run(c: GenerateCommand) -> Result<()> {
    for image in &c.image {
        image.check()?;
    }
    let mut pipeline = c.model.load()?;
    if c.sampling.ignore_eos {
        pipeline.eos_token_ids.clear();
    }
    let prompt = if c.raw {
        c.prompt.clone()
    } else {
        if c.prompt.contains("<image>") {
            bail!("--prompt contains <image>; without --raw the template places the image itself");
        }
        let mut messages = Vec::new();
        if let Some(system) = &c.system {
            messages.push(Message::system(system));
        }
        messages.push(Message::user(&c.prompt, c.image.len()));
        pipeline.render(&messages)?
    };
    tracing::info!(template = %pipeline.template.describe(), "prompt: {prompt:?}");
    let pixel_values = image_source::pixel_values(&pipeline, &c.image)?;
    let input_ids = pipeline.encode(&prompt, pixel_values.as_ref())?;
    for _ in 0..c.warmup {
        pipeline.generate(
            &input_ids,
            pixel_values.as_ref(),
            &c.sampling.params(),
            c.sampling.max_new_tokens,
            &c.sampling.stop,
            |_| {},
        )?;
    }
    let stream = !c.json;
    let mut stdout = std::io::stdout();
    let out = pipeline.generate(
        &input_ids,
        pixel_values.as_ref(),
        &c.sampling.params(),
        c.sampling.max_new_tokens,
        &c.sampling.stop,
        |piece| {
            if stream {
                // A closed stdout is not worth aborting generation for.
                let _ = write!(stdout, "{piece}");
                let _ = stdout.flush();
            }
        },
    )?;
    if c.json {
        let json = JsonOutput {
            text: out.text,
            token_ids: out.token_ids,
            prompt_tokens: out.stats.prompt_tokens,
            timings: Timings {
                vision_ms: out.stats.vision_ms,
                prefill_ms: out.stats.prefill_ms,
                decode_tok_s: out.stats.decode_tok_s(),
            },
        };
        println!("{}", serde_json::to_string(&json)?);
    } else {
        println!();
    }
    Ok(())
}
