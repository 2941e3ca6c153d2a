//! A checkpoint ready to answer: model, tokenizer, prompt template and image processor loaded
//! together, with the steps from a conversation to generated text. `llava generate`, `llava
//! chat` and `llava eval answer` all go through here, so they produce the same text.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use llava_data::conversation::{ConvTemplate, Message};
use llava_data::image::{
    ImageAspectRatio, ImageProcessor, PreprocessorConfig, ProcessedImage, ResizeSize,
};
use llava_data::prompt::PromptTemplate;
use llava_data::tokenizer::{ImageTokens, Tokenizer};

use crate::error::{ModelError, Result};
use crate::generate::generation::{
    BatchPrompt, GenerationStats, Sampler, SamplingParams, generate_batch, generate_with_cache,
};
use crate::generate::prompt_cache::PromptCache;
use crate::generate::reply_text::ReplyText;
use crate::load::checkpoint::{Checkpoint, Layout};
use crate::load::precision::Quantize;
use crate::model::image_inputs::ImageInputs;
pub use crate::model::image_inputs::pixel_tensor;
use crate::model::llava::Llava;

#[derive(Debug, Clone)]
pub struct PipelineOptions {
    /// A checkpoint directory or a hub id in the local cache.
    pub model: String,
    /// The original layout's CLIP directory, when `mm_vision_tower` does not resolve.
    pub vision_tower: Option<PathBuf>,
    /// The language model a LoRA or projector-only release is loaded over.
    pub model_base: Option<String>,
    pub dtype: DType,
    /// The vision tower's compute dtype, when not `dtype` (`--vision-dtype`).
    pub vision_dtype: Option<DType>,
    pub device: Device,
    /// A named template instead of the checkpoint's chat template.
    pub template: Option<String>,
    /// Overrides the checkpoint's aspect-ratio handling.
    pub image_aspect_ratio: Option<ImageAspectRatio>,
    /// Loads the decoder's linear layers in 8 or 4 bits (CPU only).
    pub quantize: Option<Quantize>,
}

impl PipelineOptions {
    pub fn new(model: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            vision_tower: None,
            model_base: None,
            dtype: DType::F32,
            vision_dtype: None,
            device: Device::Cpu,
            template: None,
            image_aspect_ratio: None,
            quantize: None,
        }
    }
}

pub struct Pipeline {
    pub checkpoint: Checkpoint,
    pub model: Llava,
    pub tokenizer: Tokenizer,
    pub template: PromptTemplate,
    pub image_processor: ImageProcessor,
    pub image_tokens: ImageTokens,
    pub eos_token_ids: Vec<u32>,
    pub device: Device,
}

/// The result of one generation.
#[derive(Debug, Clone)]
pub struct Generation {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub stats: GenerationStats,
}

impl Pipeline {
    pub fn load(opts: &PipelineOptions) -> Result<Self> {
        let checkpoint = Checkpoint::open_with_base(
            &opts.model,
            opts.vision_tower.as_deref(),
            opts.model_base.as_deref(),
        )?;
        let tokenizer = Tokenizer::from_dir(checkpoint.tokenizer_dir())?;
        let template = PromptTemplate::select(
            &checkpoint.dir,
            opts.template.as_deref(),
            original_template(&checkpoint, &tokenizer),
        )?;
        let image_processor = image_processor(&checkpoint, opts.image_aspect_ratio)?;
        let image_tokens = checkpoint.image_tokens(&tokenizer)?;
        let mut eos_token_ids = checkpoint.eos_token_ids()?;
        if let Some(id) = tokenizer
            .eos_token_id
            .filter(|id| !eos_token_ids.contains(id))
        {
            eos_token_ids.push(id);
        }
        let model = Llava::from_checkpoint(
            &checkpoint,
            opts.dtype,
            opts.vision_dtype,
            &opts.device,
            opts.quantize,
        )?;
        Ok(Self {
            checkpoint,
            model,
            tokenizer,
            template,
            image_processor,
            image_tokens,
            eos_token_ids,
            device: opts.device.clone(),
        })
    }

    /// Renders the conversation with the generation cue for the assistant.
    pub fn render(&self, messages: &[Message]) -> Result<String> {
        let bos = self.tokenizer.bos_token.clone().unwrap_or_default();
        let eos = self.tokenizer.eos_token.clone().unwrap_or_default();
        Ok(self.template.render(messages, &bos, &eos, true)?)
    }

    /// Token ids of a rendered prompt, with one `<image>` per image in `images`, each
    /// expanded to as many image positions as that image takes.
    pub fn encode(&self, prompt: &str, images: Option<&ImageInputs>) -> Result<Vec<u32>> {
        let counts = match images {
            Some(images) => self.model.image_token_counts(images)?,
            None => Vec::new(),
        };
        Ok(self
            .tokenizer
            .encode_prompt(prompt, self.image_tokens, &counts)?)
    }

    /// Loads and preprocesses image files, in order; `None` for no image.
    pub fn pixel_values(&self, images: &[PathBuf]) -> Result<Option<ImageInputs>> {
        let processed = images
            .iter()
            .map(|p| self.image_processor.process_path(p))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        self.image_inputs(&processed)
    }

    /// Preprocessed images as the model takes them, on the pipeline's device.
    pub fn image_inputs(&self, images: &[ProcessedImage]) -> Result<Option<ImageInputs>> {
        if images.is_empty() {
            return Ok(None);
        }
        Ok(Some(ImageInputs::new(images, &self.device)?))
    }

    /// Generates a reply to `input_ids`, streaming text through `on_text`. Generation stops at
    /// EOS, at `max_new_tokens`, or when the text contains a stop string (which is cut off,
    /// together with anything after it).
    pub fn generate(
        &self,
        input_ids: &[u32],
        images: Option<&ImageInputs>,
        params: &SamplingParams,
        max_new_tokens: usize,
        extra_stop: &[String],
        on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        self.generate_with_cache(
            &mut PromptCache::new(),
            input_ids,
            images,
            params,
            max_new_tokens,
            extra_stop,
            on_text,
        )
    }

    /// As [`Pipeline::generate`], going on from what `cache` holds of the prompt: a chat keeps
    /// one cache for the conversation, so that each turn prefills only its new tokens
    /// ([`crate::generate::prompt_cache`]).
    #[allow(clippy::too_many_arguments)]
    pub fn generate_with_cache(
        &self,
        cache: &mut PromptCache,
        input_ids: &[u32],
        images: Option<&ImageInputs>,
        params: &SamplingParams,
        max_new_tokens: usize,
        extra_stop: &[String],
        mut on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        let max_new_tokens = self.max_new_tokens(input_ids.len(), max_new_tokens)?;
        let stops = self.stop_strings(extra_stop);
        let mut sampler = Sampler::new(params.clone())?;
        let mut reply = ReplyText::new(&self.tokenizer, &stops);
        let (token_ids, stats) = generate_with_cache(
            &self.model,
            cache,
            input_ids,
            images,
            &mut sampler,
            max_new_tokens,
            &self.eos_token_ids,
            |id| reply.push(id, &mut on_text),
        )?;
        Ok(Generation {
            text: reply.finish(&mut on_text)?,
            token_ids,
            stats,
        })
    }

    /// Generates replies to several prompts together ([`generate_batch`]): each reply is the
    /// one [`Pipeline::generate`] gives for its prompt alone, up to rounding, and each stops as
    /// it would alone. Faster than one by one wherever decoding is bound by reading the
    /// weights, as on a CPU or a GPU at small batch. Each generation carries the batch's stats.
    pub fn generate_batch(
        &self,
        prompts: &[BatchPrompt],
        params: &SamplingParams,
        max_new_tokens: usize,
        extra_stop: &[String],
    ) -> Result<Vec<Generation>> {
        // Each row as far as its own length allows: positions count from a row's first token,
        // so a shorter prompt beside a longer one loses nothing to the padding.
        let max_new_tokens = prompts
            .iter()
            .map(|p| self.max_new_tokens(p.input_ids.len(), max_new_tokens))
            .collect::<Result<Vec<_>>>()?;
        let stops = self.stop_strings(extra_stop);
        let mut samplers = prompts
            .iter()
            .map(|_| Sampler::new(params.clone()))
            .collect::<Result<Vec<_>>>()?;
        let mut replies: Vec<ReplyText> = prompts
            .iter()
            .map(|_| ReplyText::new(&self.tokenizer, &stops))
            .collect();
        let (token_ids, stats) = generate_batch(
            &self.model,
            prompts,
            &mut samplers,
            &max_new_tokens,
            &self.eos_token_ids,
            |row, id| replies[row].push(id, &mut |_| {}),
        )?;
        replies
            .into_iter()
            .zip(token_ids)
            .map(|(reply, token_ids)| {
                Ok(Generation {
                    text: reply.finish(&mut |_| {})?,
                    token_ids,
                    stats: stats.clone(),
                })
            })
            .collect()
    }

    /// `max_new_tokens`, cut to what the context leaves after a prompt of `prompt_len`.
    pub fn max_new_tokens(&self, prompt_len: usize, max_new_tokens: usize) -> Result<usize> {
        let max_pos = self.model.language_model.context_len();
        if prompt_len >= max_pos {
            return Err(ModelError::Input(format!(
                "the prompt is {prompt_len} tokens, but the model's context is {}",
                self.model.config.text_config.context_text()
            )));
        }
        Ok(max_new_tokens.min(max_pos - prompt_len))
    }

    /// The template's stop strings and the caller's.
    pub fn stop_strings(&self, extra_stop: &[String]) -> Vec<String> {
        self.template
            .stop_strings()
            .iter()
            .map(|s| s.to_string())
            .chain(extra_stop.iter().cloned())
            .collect()
    }
}

/// The template an original-layout checkpoint (which has no chat template) was trained with:
/// llava_v1, except for LLaVA-1.6's Mistral and 34B (ChatML-tokenizer) releases, which the
/// original's CLI runs with `mistral_instruct` and `chatml_direct`.
fn original_template(checkpoint: &Checkpoint, tokenizer: &Tokenizer) -> ConvTemplate {
    let config = &checkpoint.config;
    if !config.is_next() {
        return ConvTemplate::LlavaV1;
    }
    if config.text_config.model_type == "mistral" {
        ConvTemplate::MistralInstruct
    } else if tokenizer.token_to_id("<|im_start|>").is_some() {
        ConvTemplate::ChatmlDirect
    } else {
        ConvTemplate::LlavaV1
    }
}

/// The checkpoint's preprocessing: `preprocessor_config.json` (the CLIP directory's in the
/// original layout), or the `image_processor` nested in `processor_config.json` as transformers
/// 5 writes it, with pad-to-square where the checkpoint asks for it.
pub fn image_processor(
    checkpoint: &Checkpoint,
    aspect: Option<ImageAspectRatio>,
) -> Result<ImageProcessor> {
    let dir: &Path = checkpoint.preprocessor_dir();
    let (json, path) = match read_processor_json(dir)? {
        Some(found) => found,
        // Checkpoints without one get CLIP's own processor at the tower's resolution.
        None => {
            let config =
                PreprocessorConfig::clip(checkpoint.config.vision_config.image_size as u32);
            return Ok(ImageProcessor::new(config, aspect.unwrap_or_default()));
        }
    };
    let config = PreprocessorConfig::from_json_str(&json.to_string(), &path.display().to_string())?;
    // A fixed output size that the tower cannot take would fail only at the first image, with a
    // message about tensor shapes.
    let side = checkpoint.config.vision_config.image_size as u32;
    let fixed = if config.do_center_crop {
        Some(("crop_size", config.crop_size.height, config.crop_size.width))
    } else if let (true, ResizeSize::Exact { height, width }) = (config.do_resize, config.size) {
        Some(("size", height, width))
    } else {
        None
    };
    if let Some((field, height, width)) = fixed
        && (height, width) != (side, side)
    {
        return Err(ModelError::config(
            &path,
            format!(
                "`{field}` makes {height}x{width} images, but the vision tower takes {side}x{side} (vision_config.image_size)"
            ),
        ));
    }
    if let Some(anyres) = checkpoint.config.anyres() {
        if aspect == Some(ImageAspectRatio::Pad) {
            return Err(ModelError::Input(
                "--image-aspect-ratio pad is LLaVA-1.5's: this LLaVA-NeXT checkpoint tiles its images (anyres) instead".into(),
            ));
        }
        return next_image_processor(config, anyres.pinpoints, &json, &path);
    }
    let from_checkpoint = match &checkpoint.layout {
        Layout::Original { .. } => match checkpoint.config.image_aspect_ratio.as_deref() {
            Some(a) => a.parse()?,
            None => ImageAspectRatio::Square,
        },
        Layout::Hf | Layout::HfAdapter { .. } => {
            match json.get("do_pad").and_then(serde_json::Value::as_bool) {
                Some(true) => ImageAspectRatio::Pad,
                _ => ImageAspectRatio::Square,
            }
        }
    };
    Ok(ImageProcessor::new(
        config,
        aspect.unwrap_or(from_checkpoint),
    ))
}

/// LLaVA-NeXT's processor tiles by the model's `image_grid_pinpoints`. Its `do_pad` pads the
/// batch's tile counts, not the image, so it never means pad-to-square here.
fn next_image_processor(
    config: PreprocessorConfig,
    pinpoints: &[[u32; 2]],
    json: &serde_json::Value,
    path: &Path,
) -> Result<ImageProcessor> {
    if let Some(own) = json.get("image_grid_pinpoints") {
        let same =
            serde_json::from_value::<Vec<[u32; 2]>>(own.clone()).is_ok_and(|own| own == pinpoints);
        if !same {
            return Err(ModelError::config(
                path,
                "`image_grid_pinpoints` differs from config.json's: the images would be tiled for one grid and unpadded for another",
            ));
        }
    }
    let mut processor = ImageProcessor::new(config, ImageAspectRatio::Square);
    processor.anyres = Some(pinpoints.to_vec());
    Ok(processor)
}

fn read_processor_json(dir: &Path) -> Result<Option<(serde_json::Value, PathBuf)>> {
    let pre = dir.join("preprocessor_config.json");
    if pre.is_file() {
        return Ok(Some((crate::load::json::read_json(&pre)?, pre)));
    }
    let proc = dir.join("processor_config.json");
    if proc.is_file()
        && let Some(inner) = crate::load::json::read_json(&proc)?.get("image_processor")
    {
        return Ok(Some((inner.clone(), proc)));
    }
    Ok(None)
}
