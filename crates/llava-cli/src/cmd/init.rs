//! `llava init`: a random-weight checkpoint of a named shape, for benchmarks and smoke tests.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use llava_model::DType;
use llava_model::init::{SHAPES, shape_config, write_random_checkpoint};

#[derive(clap::Args, Debug)]
pub struct InitCommand {
    /// One of: llava-1.5-7b, tiny-1b (CLIP ViT-L/14-336 + TinyLlama-1.1B shape),
    /// train-bench (ViT-B/16 + 4 × 512 LLaMA), test (seconds to load).
    #[arg(long)]
    pub shape: String,
    #[arg(long)]
    pub out: PathBuf,
    /// Storage dtype of the weights: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(c: InitCommand) -> Result<()> {
    let Some(config) = shape_config(&c.shape) else {
        bail!(
            "--shape {}: unknown shape; choose one of {}",
            c.shape,
            SHAPES.join(", ")
        );
    };
    let dtype = match c.dtype.as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        other => bail!("--dtype {other}: choose f32, bf16 or f16"),
    };
    super::require_new_out(&c.out, "llava init")?;
    write_random_checkpoint(&config, &c.out, dtype, c.seed)
        .with_context(|| format!("writing {}", c.out.display()))?;
    eprintln!(
        "wrote a random-weight `{}` checkpoint to {}",
        c.shape,
        c.out.display()
    );
    Ok(())
}
