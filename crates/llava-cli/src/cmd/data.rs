//! `llava data preview`: one training sample as the model sees it, with the supervised tokens
//! marked, so a user can check the mask before spending compute on it.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use llava_data::conversation::ConvTemplate;
use llava_data::record::read_records;
use llava_data::sample::{IGNORE_INDEX, SampleOptions, tokenize_record};
use llava_data::tokenizer::Tokenizer;
use llava_model::Checkpoint;
use llava_model::pipeline::image_processor;

use super::model_args::CheckpointArgs;
use serde::Serialize;

#[derive(clap::Args, Debug)]
pub struct DataCommand {
    #[command(subcommand)]
    pub command: DataSubcommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum DataSubcommand {
    /// Show one sample's tokens, coloured by supervised (green) / not supervised (dim).
    Preview(PreviewArgs),
}

#[derive(clap::Args, Debug)]
pub struct PreviewArgs {
    // The checkpoint whose tokenizer and image-token settings to use.
    #[command(flatten)]
    pub checkpoint: CheckpointArgs,
    /// LLaVA dataset: a JSON array or JSONL of {id, image?, conversations}.
    #[arg(long)]
    pub data: PathBuf,
    /// Folder the record's `image` path is relative to. Read only for LLaVA-NeXT, whose image
    /// positions depend on the image's size.
    #[arg(long)]
    pub image_folder: Option<PathBuf>,
    /// Which record (0-based).
    #[arg(long, default_value_t = 0)]
    pub index: usize,
    /// llava_v1 (stage 2), plain (stage 1), llava_v0, llama_2, chatml.
    #[arg(long, default_value = "llava_v1")]
    pub template: String,
    /// Default: as `llava train` (2048, or 4096 for LLaVA-NeXT).
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Keep <image> where the record has it instead of moving it to the front.
    #[arg(long)]
    pub keep_image_position: bool,
    /// Print {"input_ids", "labels"} instead of coloured text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct PreviewJson<'a> {
    input_ids: &'a [u32],
    labels: &'a [i64],
}

pub fn run(c: DataCommand) -> Result<()> {
    match c.command {
        DataSubcommand::Preview(p) => preview(p),
    }
}

fn preview(p: PreviewArgs) -> Result<()> {
    let template = ConvTemplate::parse(&p.template)
        .map_err(|m| anyhow::anyhow!("--template {}: {m}", p.template))?;
    let checkpoint = Checkpoint::open(&p.checkpoint.model, p.checkpoint.vision_tower.as_deref())
        .with_context(|| format!("loading {}", p.checkpoint.model))?;
    let tokenizer = Tokenizer::from_dir(&checkpoint.dir)?;
    // Read record by record, so that a malformed record elsewhere in the file does not stop
    // the preview of a good one.
    let records = read_records(&p.data)?;
    let record = match records.get(p.index) {
        Some(Ok(record)) => record,
        Some(Err(bad)) => bail!("--index {}: {}: {bad}", p.index, p.data.display()),
        None => bail!(
            "--index {}: {} holds {} records",
            p.index,
            p.data.display(),
            records.len()
        ),
    };
    // LLaVA-1.5 gives every image the same positions; LLaVA-NeXT as many as its size asks for.
    let image_path = record.image_path(p.image_folder.as_deref());
    let image_seq_len = match (image_path, checkpoint.config.is_next()) {
        (Some(path), true) => {
            let size = image_processor(&checkpoint, None)?
                .process_path(&path)
                .with_context(|| format!("record {}: the image sets its positions", p.index))?
                .image_size;
            checkpoint.config.image_token_count(size)?
        }
        _ => checkpoint.config.image_seq_len(),
    };
    let opts = SampleOptions {
        template,
        image_tokens: checkpoint.image_tokens(&tokenizer)?,
        image_seq_len,
        max_length: p
            .max_length
            .unwrap_or(checkpoint.config.default_max_length()),
        keep_image_position: p.keep_image_position,
    };
    let sample = tokenize_record(&tokenizer, record, &opts)?;
    if p.json {
        println!(
            "{}",
            serde_json::to_string(&PreviewJson {
                input_ids: &sample.input_ids,
                labels: &sample.labels
            })?
        );
        return Ok(());
    }
    let colour = crate::color::stdout();
    let image_id = opts.image_tokens.id();
    let mut out = String::new();
    let mut i = 0;
    while i < sample.input_ids.len() {
        let id = sample.input_ids[i];
        let supervised = sample.labels[i] != IGNORE_INDEX;
        let piece = if id == image_id {
            let run = sample.input_ids[i..]
                .iter()
                .take_while(|&&t| t == image_id)
                .count();
            i += run;
            format!("<image>×{run}")
        } else {
            i += 1;
            let piece = tokenizer
                .id_to_token(id)
                .unwrap_or_else(|| format!("<{id}>"));
            if piece == "<0x0A>" {
                "\\n\n".to_string()
            } else {
                piece.replace('▁', " ")
            }
        };
        match (colour, supervised) {
            (true, true) => out.push_str(&format!("\x1b[32m{piece}\x1b[0m")),
            (true, false) => out.push_str(&format!("\x1b[2m{piece}\x1b[0m")),
            (false, true) => out.push_str(&format!("«{piece}»")),
            (false, false) => out.push_str(&piece),
        }
    }
    println!("{out}");
    let supervised = sample.labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
    let legend = if colour {
        "green = supervised"
    } else {
        "«…» = supervised"
    };
    eprintln!(
        "record {} · template {} · {} tokens, {supervised} supervised{} · {legend}",
        record.id_string(),
        template.name(),
        sample.input_ids.len(),
        if sample.truncated {
            " · TRUNCATED at --max-length"
        } else {
            ""
        }
    );
    Ok(())
}
