//! Flags shared by the subcommands that load a checkpoint.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use llava_data::image::ImageAspectRatio;
use llava_model::generation::SamplingParams;
use llava_model::pipeline::{Pipeline, PipelineOptions};
use llava_model::quantized::Quantize;
use llava_model::{DType, Device};

/// Which checkpoint: the two flags every checkpoint-reading subcommand takes (`generate`,
/// `chat`, `eval`, `train`, `data preview`).
#[derive(clap::Args, Debug, Clone)]
pub struct CheckpointArgs {
    /// Checkpoint directory (HF llava layout or original LLaVA layout), or a hub id already in
    /// the local Hugging Face cache. Alias: --model-path.
    #[arg(long, alias = "model-path")]
    pub model: String,
    /// CLIP directory for original-layout checkpoints whose `mm_vision_tower` is not local.
    #[arg(long)]
    pub vision_tower: Option<PathBuf>,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    #[command(flatten)]
    pub checkpoint: CheckpointArgs,
    /// The language model (directory or hub id) that an original-layout LoRA release
    /// (adapter_config.json) or projector-only release (mm_projector.bin) was trained from;
    /// its weights and tokenizer are loaded, with the release over them. For an adapter that
    /// `llava train --lora` saved, the HF-layout LLaVA it was trained over.
    #[arg(long)]
    pub model_base: Option<String>,
    /// Compute dtype: f32 (exact reference), bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// The vision tower's compute dtype (f32, bf16 or f16), when it should differ from --dtype.
    /// Default: --dtype, and bf16 beside --load-8bit / --load-4bit with an f32 --dtype (as the
    /// original runs CLIP in fp16 beside a quantized decoder); `--vision-dtype f32` keeps it f32.
    #[arg(long)]
    pub vision_dtype: Option<String>,
    /// A named template (llava_v1, vicuna_v1, llava_v0, llama_2, mistral_instruct, chatml,
    /// chatml_direct, plain) instead of the checkpoint's chat template. Alias: --conv-mode.
    #[arg(long, alias = "conv-mode")]
    pub template: Option<String>,
    /// `pad` pastes the image on a mean-coloured square first (LLaVA-1.5); `square` does not.
    /// Default: what the checkpoint asks for.
    #[arg(long)]
    pub image_aspect_ratio: Option<String>,
    /// Run on this CUDA device (needs a build with `--features cuda`).
    #[arg(long)]
    pub cuda: Option<usize>,
    /// The language model's linear layers, lm_head and embedding rows in 8 bits (int8 blocks of
    /// 32 with one scale), as the original's flag asks; CPU only. The projector keeps --dtype,
    /// the vision tower runs in bf16 (see --vision-dtype).
    #[arg(long, alias = "load_8bit", conflicts_with = "load_4bit")]
    pub load_8bit: bool,
    /// The language model's linear layers in 4 bits (ggml Q4_K), lm_head in 6 (Q6_K) as
    /// llama.cpp's Q4_K_M, the embedding rows in 8; CPU only.
    #[arg(long, alias = "load_4bit")]
    pub load_4bit: bool,
}

impl ModelArgs {
    pub fn load(&self) -> Result<Pipeline> {
        let dtype = parse_dtype("--dtype", &self.dtype)?;
        let vision_dtype = match &self.vision_dtype {
            Some(d) => Some(parse_dtype("--vision-dtype", d)?),
            None => None,
        };
        let device = match self.cuda {
            Some(i) => cuda_device(i)?,
            None => Device::Cpu,
        };
        let image_aspect_ratio = match &self.image_aspect_ratio {
            Some(a) => Some(
                a.parse::<ImageAspectRatio>()
                    .context("--image-aspect-ratio")?,
            ),
            None => None,
        };
        let opts = PipelineOptions {
            model: self.checkpoint.model.clone(),
            vision_tower: self.checkpoint.vision_tower.clone(),
            model_base: self.model_base.clone(),
            dtype,
            vision_dtype,
            device,
            template: self.template.clone(),
            image_aspect_ratio,
            quantize: match (self.load_8bit, self.load_4bit) {
                (true, _) => Some(Quantize::Bits8),
                (_, true) => Some(Quantize::Bits4),
                _ => None,
            },
        };
        crate::memory::while_loading(|| Pipeline::load(&opts))
            .with_context(|| format!("loading {}", self.checkpoint.model))
    }
}

/// A compute dtype flag's value.
fn parse_dtype(flag: &str, value: &str) -> Result<DType> {
    Ok(match value {
        "f32" | "float32" => DType::F32,
        "bf16" | "bfloat16" => DType::BF16,
        "f16" | "float16" => DType::F16,
        other => bail!("{flag} {other}: choose f32, bf16 or f16"),
    })
}

/// CUDA device `i`. cudarc opens libcuda, libcublas and libcurand with dlopen and panics when
/// one is missing, so a panic here becomes an error like any other (the hook is silenced
/// meanwhile, so that no panic message is printed).
pub fn cuda_device(i: usize) -> Result<Device> {
    if !cfg!(feature = "cuda") {
        bail!(
            "--cuda {i}: this llava was built without CUDA (cargo build --release -p llava-cli --features cuda)"
        );
    }
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let device = std::panic::catch_unwind(|| Device::new_cuda(i));
    std::panic::set_hook(hook);
    match device {
        Ok(device) => device.with_context(|| format!("--cuda {i}")),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("CUDA initialisation panicked");
            // cudarc's message goes on to list every file name it tried.
            let msg = msg.split(" - searched for").next().unwrap_or(msg);
            bail!("--cuda {i}: {msg}; are the CUDA libraries on LD_LIBRARY_PATH?")
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Maximum number of new tokens. (The underscore spellings of these flags are the
    /// original's `run_llava.py`'s.)
    #[arg(long, alias = "max_new_tokens", default_value_t = 512)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, alias = "top_p", default_value_t = 1.0)]
    pub top_p: f64,
    /// 0 = off.
    #[arg(long, alias = "top_k", default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep generating past EOS (for benchmarks that need a fixed number of tokens).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Extra text at which to stop (repeatable).
    #[arg(long = "stop", value_parser = non_empty_stop)]
    pub stop: Vec<String>,
}

/// An empty stop string would match before the first token.
fn non_empty_stop(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("a stop string cannot be empty".into());
    }
    Ok(s.to_string())
}

impl SamplingArgs {
    pub fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
        }
    }
}
