//! `llava merge-lora`: a LoRA release and its base made into one complete original-layout
//! checkpoint, as the original's `scripts/merge_lora_weights.py` does, so that it loads (here,
//! or in the original code) without `--model-base`. An adapter over an HF-layout LLaVA (what
//! `llava train --lora` saves) merges into an HF-layout checkpoint, as peft's
//! `merge_and_unload` followed by `save_pretrained` would.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use llava_model::checkpoint::{Checkpoint, Layout};
use llava_model::save::{write_config, write_safetensors, write_shards};
use llava_model::weights::original_name;
use llava_model::{DType, Device};

use super::model_args::CheckpointArgs;

#[derive(clap::Args, Debug)]
pub struct MergeLoraCommand {
    /// The LoRA release (adapter_config.json, adapter_model.*, non_lora_trainables.bin), or an
    /// adapter `llava train --lora` saved.
    #[command(flatten)]
    pub checkpoint: CheckpointArgs,
    /// The language model it was trained from (directory or hub id); for `llava train --lora`'s
    /// adapters, the HF-layout LLaVA.
    #[arg(long)]
    pub model_base: String,
    /// A new directory for the merged checkpoint. Alias: --save-model-path.
    #[arg(long, alias = "save-model-path")]
    pub out: PathBuf,
}

/// The files besides the weights that the merged checkpoint takes from the base, as the
/// original's merge script saves the base's tokenizer.
const TOKENIZER_FILES: [&str; 6] = [
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
];

/// Shards of at most this many bytes, as transformers' default `max_shard_size`.
const MAX_SHARD_BYTES: usize = 5 << 30;

pub fn run(c: MergeLoraCommand) -> Result<()> {
    super::require_new_out(&c.out, "llava merge-lora")?;
    let checkpoint = Checkpoint::open_with_base(
        &c.checkpoint.model,
        c.checkpoint.vision_tower.as_deref(),
        Some(&c.model_base),
    )
    .with_context(|| format!("loading {}", c.checkpoint.model))?;
    if !checkpoint.dir.join("adapter_config.json").is_file() {
        bail!(
            "--model {}: has no adapter_config.json, so there is nothing to merge",
            checkpoint.dir.display()
        );
    }
    let depth = checkpoint.config.projector_depth.unwrap_or(2);
    let hf = matches!(checkpoint.layout, Layout::HfAdapter { .. });
    // get_stored keeps each weight's stored dtype; the adapters are merged into it.
    let weights = checkpoint.weights(DType::F32, &Device::Cpu)?;
    let mut tensors = Vec::new();
    for name in weights.names() {
        let stored = if hf {
            Some(name.to_string())
        } else {
            original_name(name, depth)
        };
        if let Some(stored) = stored {
            tensors.push((stored, weights.get_stored(name)?));
        }
    }

    // `OUT.partial` beside it (not `with_extension`, which would cut `llava-v1.5-7b` at the dot).
    let mut partial_name = c.out.file_name().unwrap_or_default().to_os_string();
    partial_name.push(".partial");
    let partial = c.out.with_file_name(partial_name);
    if partial.exists() {
        std::fs::remove_dir_all(&partial)
            .with_context(|| format!("removing the leftover {}", partial.display()))?;
    }
    std::fs::create_dir_all(&partial).with_context(|| format!("creating {}", partial.display()))?;
    let copy = |from: PathBuf, file: &str| -> Result<()> {
        std::fs::copy(&from, partial.join(file))
            .map(|_| ())
            .with_context(|| format!("copying {}", from.display()))
    };
    if hf {
        // Canonical names, written in the llava-hf hub naming.
        write_safetensors(&partial, &tensors, MAX_SHARD_BYTES)?;
        write_config(&partial, &checkpoint.config)?;
    } else {
        write_shards(&partial, &tensors, MAX_SHARD_BYTES)?;
        copy(checkpoint.dir.join("config.json"), "config.json")?;
    }
    let processor = [
        "preprocessor_config.json",
        "processor_config.json",
        "chat_template.jinja",
        "chat_template.json",
    ];
    for f in TOKENIZER_FILES
        .iter()
        .chain(if hf { &processor[..] } else { &[] })
    {
        let from = checkpoint.tokenizer_dir().join(f);
        if from.is_file() {
            copy(from, f)?;
        }
    }
    if c.out.exists() {
        std::fs::remove_dir(&c.out).with_context(|| format!("replacing {}", c.out.display()))?;
    }
    std::fs::rename(&partial, &c.out).with_context(|| format!("writing {}", c.out.display()))?;
    eprintln!(
        "merged {} over {}: {} tensors in {}",
        checkpoint.dir.display(),
        c.model_base,
        tensors.len(),
        c.out.display()
    );
    Ok(())
}
