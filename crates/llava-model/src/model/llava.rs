//! LLaVA: `H_v = W · g(X_v)`, spliced into the word embeddings of the prompt at every
//! `image_token_index` position, then decoded by `f_φ`.

use candle_core::{D, DType, Device, Tensor};

use crate::config::{LlavaConfig, SelectStrategy};
use crate::error::{ModelError, Result};
use crate::load::checkpoint::Checkpoint;
use crate::load::precision::Quantize;
use crate::load::weights::Weights;
use crate::model::anyres;
use crate::model::image_inputs::ImageInputs;
use crate::model::language_model::{KvCache, LlamaModel};
use crate::model::nn::Mode;
use crate::model::projector::MultiModalProjector;
use crate::model::vision_tower::{ClipVisionTower, layers_needed};

#[derive(Debug, Clone)]
pub struct Llava {
    pub vision_tower: ClipVisionTower,
    pub multi_modal_projector: MultiModalProjector,
    pub language_model: LlamaModel,
    /// LLaVA-NeXT's learned end-of-row vector (see [`crate::model::anyres`]); `None` for LLaVA-1.5.
    pub image_newline: Option<Tensor>,
    pub config: LlavaConfig,
}

impl Llava {
    /// Builds the model from a checkpoint's weights in `dtype` on `device`, the decoder's
    /// linear layers, `lm_head` and the embeddings quantized as they are read when asked (CPU only,
    /// [`crate::model::quantized`]).
    /// The vision tower is loaded in `vision_dtype` when given (`--vision-dtype`); its features
    /// are cast to the decoder's activations.
    pub fn from_checkpoint(
        checkpoint: &Checkpoint,
        dtype: DType,
        vision_dtype: Option<DType>,
        device: &Device,
        quantize: Option<Quantize>,
    ) -> Result<Self> {
        if quantize.is_some() && !device.is_cpu() {
            return Err(ModelError::Input(
                "8- and 4-bit weights (--load-8bit, --load-4bit) run on the CPU only here; on a GPU use --dtype bf16 or f16".into(),
            ));
        }
        let mut weights = checkpoint.weights(dtype, device)?;
        // Beside an 8- or 4-bit decoder the tower runs in bf16 unless asked otherwise, as the
        // original's `load_4bit`/`load_8bit` run CLIP in fp16 and llama.cpp its mmproj in f16:
        // half the tower's memory, for an error far below the decoder's (BENCHMARKS.md).
        let vision_dtype =
            vision_dtype.or((quantize.is_some() && dtype == DType::F32).then_some(DType::BF16));
        if let Some(vision_dtype) = vision_dtype {
            weights.set_dtype_under("vision_tower", vision_dtype);
        }
        weights.set_quantize(quantize);
        weights.set_quantize_vocab(true);
        Self::load(&checkpoint.config, &weights)
    }

    /// Builds the model from canonical weight names (see [`crate::load::weights`]).
    pub fn load(config: &LlavaConfig, weights: &Weights) -> Result<Self> {
        config.validate().map_err(ModelError::Input)?;
        let layers = config.vision_feature_layer.layers();
        let vision_layers = layers_needed(&config.vision_config, &layers);
        let vision_tower = ClipVisionTower::load(
            &weights.pp("vision_tower"),
            &config.vision_config,
            vision_layers,
        )?;
        let multi_modal_projector = MultiModalProjector::load(
            &weights.pp("multi_modal_projector"),
            &config.projector(),
            config.projector_input_size(),
            config.text_config.hidden_size,
        )?;
        let language_model = LlamaModel::load(
            &weights.pp("language_model"),
            &weights.pp("lm_head"),
            &config.text_config,
        )?;
        let image_newline = match config.is_next() {
            true => Some(weights.get("image_newline", &[config.text_config.hidden_size])?),
            false => None,
        };
        let leftovers = unexpected_unused(config, vision_layers, weights.unused());
        if let Some(first) = leftovers.first() {
            // transformers warns about such weights too; here they usually mean a config.json
            // that describes a smaller model than the files hold.
            tracing::warn!(
                "{} tensors in the checkpoint are not used by the model config.json describes (the first is `{first}`): is the config smaller than the weights?",
                leftovers.len()
            );
        }
        Ok(Self {
            vision_tower,
            multi_modal_projector,
            language_model,
            image_newline,
            config: config.clone(),
        })
    }

    /// The prompt positions each image takes (see [`LlavaConfig::image_token_count`]).
    pub fn image_token_counts(&self, images: &ImageInputs) -> Result<Vec<usize>> {
        images
            .image_sizes
            .iter()
            .map(|&size| self.config.image_token_count(size))
            .collect()
    }

    /// The features of every image, in order, as `[positions, hidden]`: what goes in at the
    /// image-token positions of the prompt. One pass of the vision tower takes all the tiles.
    pub fn image_features(&self, images: &ImageInputs, mode: Mode) -> Result<Tensor> {
        let z = self.vision_features(&images.all_tiles()?, mode)?;
        self.project_and_pack(&z, images)
    }

    /// `Z_v` of every tile of `images` (in order) → the rows that go in at the image positions:
    /// projected, then LLaVA-NeXT's grid with a newline after each row
    /// ([`crate::model::anyres::pack`]), or LLaVA-1.5's tiles one after another. Training
    /// calls it with a frozen tower's features, which it detached.
    pub fn project_and_pack(&self, z: &Tensor, images: &ImageInputs) -> Result<Tensor> {
        let features = self.multi_modal_projector.forward(z)?;
        let (Some(anyres), Some(newline)) = (self.config.anyres(), &self.image_newline) else {
            return Ok(features.flatten_to(1)?);
        };
        let mut packed = Vec::with_capacity(images.len());
        let mut first = 0;
        for (pixels, &size) in images.pixel_values.iter().zip(&images.image_sizes) {
            let tiles = pixels.dim(0)?;
            packed.push(anyres::pack(
                &anyres,
                &features.narrow(0, first, tiles)?,
                size,
                newline,
            )?);
            first += tiles;
        }
        Ok(Tensor::cat(&packed, 0)?)
    }

    /// `pixel_values` `[n_tiles, 3, H, W]` → projected features `[n_tiles, image_seq_len, hidden]`
    /// (an image is one tile in LLaVA-1.5).
    pub fn get_image_features(&self, pixel_values: &Tensor, mode: Mode) -> Result<Tensor> {
        self.multi_modal_projector
            .forward(&self.vision_features(pixel_values, mode)?)
    }

    /// `Z_v`: the selected vision-tower hidden states, before the projector. Training runs a
    /// frozen tower in `Mode::Infer` and detaches its output, since no gradient goes there.
    pub fn vision_features(&self, pixel_values: &Tensor, mode: Mode) -> Result<Tensor> {
        let layers = self.config.vision_feature_layer.layers();
        let features = self
            .vision_tower
            .hidden_states(pixel_values, &layers, mode)?;
        let features = match self.config.vision_feature_select_strategy {
            SelectStrategy::Default => features.narrow(1, 1, features.dim(1)? - 1)?,
            SelectStrategy::Full => features,
        };
        // A tower in its own dtype (`--vision-dtype`) hands the projector the decoder's.
        Ok(features.to_dtype(self.language_model.activation_dtype())?)
    }

    /// Input embeddings with `image_features` (`[.., hidden]`, one row per image position, in
    /// order) placed at the image-token positions of `input_ids`.
    pub fn embed(&self, input_ids: &[Vec<u32>], image_features: Option<&Tensor>) -> Result<Tensor> {
        let image_token = self.config.image_token_index;
        // The decoder embeds ids past its vocabulary as row 0 (the image placeholder may lie
        // there), so any other such id means the tokenizer and the config disagree.
        let vocab = self.config.text_config.vocab_size;
        if let Some(&id) = input_ids
            .iter()
            .flatten()
            .find(|&&i| i != image_token && i as usize >= vocab)
        {
            return Err(ModelError::Input(format!(
                "token id {id} is outside the vocabulary (text_config.vocab_size = {vocab}): the tokenizer and config.json disagree"
            )));
        }
        let text = self.language_model.embed(input_ids)?;
        let positions: usize = input_ids
            .iter()
            .flatten()
            .filter(|&&i| i == image_token)
            .count();
        let Some(features) = image_features else {
            if positions > 0 {
                return Err(ModelError::Input(format!(
                    "the prompt has {positions} image tokens but no image was given"
                )));
            }
            return Ok(text);
        };
        let hidden = features.dim(D::Minus1)?;
        let features = features.reshape(((), hidden))?;
        let n_features = features.dim(0)?;
        if positions != n_features {
            return Err(ModelError::Input(format!(
                "the prompt has {positions} image tokens but the images give {n_features} features"
            )));
        }
        // Gather rows from [text embeddings; image features]: position p takes its own text row,
        // or the next image-feature row if it is an image token. Gathering keeps both inputs
        // differentiable, which a mutating scatter would not.
        let (b, s) = (
            input_ids.len(),
            input_ids.first().map(Vec::len).unwrap_or(0),
        );
        let mut next_feature = 0u32;
        let mut index = Vec::with_capacity(b * s);
        for (p, &id) in input_ids.iter().flatten().enumerate() {
            if id == image_token {
                index.push((b * s) as u32 + next_feature);
                next_feature += 1;
            } else {
                index.push(p as u32);
            }
        }
        let index = Tensor::from_vec(index, b * s, text.device())?;
        let rows = Tensor::cat(
            &[
                &text.reshape((b * s, hidden))?,
                &features.to_dtype(text.dtype())?,
            ],
            0,
        )?;
        Ok(rows.index_select(&index, 0)?.reshape((b, s, hidden))?)
    }

    /// Full forward pass; returns final hidden states `[batch, seq, hidden]`. Apply
    /// [`LlamaModel::logits`] to the positions whose logits are needed.
    pub fn forward(
        &self,
        input_ids: &[Vec<u32>],
        pixel_values: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
        mode: Mode,
    ) -> Result<Tensor> {
        check_rectangular(input_ids)?;
        let features = match pixel_values {
            // A tensor cannot say which tiles make up which image, nor how large it was.
            Some(_) if self.config.is_next() => {
                return Err(ModelError::Input(
                    "a LLaVA-NeXT (llava_next) model takes its images as ImageInputs, through Llava::image_features".into(),
                ));
            }
            Some(p) => Some(self.get_image_features(p, mode)?),
            None => None,
        };
        let embeds = self.embed(input_ids, features.as_ref())?;
        self.language_model
            .forward(&embeds, attention_mask, cache, mode)
    }
}

fn check_rectangular(ids: &[Vec<u32>]) -> Result<()> {
    let Some(first) = ids.first() else {
        return Err(ModelError::Input("empty batch".into()));
    };
    if first.is_empty() || ids.iter().any(|r| r.len() != first.len()) {
        return Err(ModelError::Input(
            "input_ids rows must be non-empty and of equal length (pad them)".into(),
        ));
    }
    Ok(())
}

/// Unread checkpoint tensors that LLaVA leaves unread on purpose are dropped: CLIP's
/// post-layernorm and the vision layers past the deepest feature layer (which are never run),
/// and the buffers older checkpoints saved (`rotary_emb.inv_freq`, `position_ids`).
fn unexpected_unused<'a>(
    config: &LlavaConfig,
    vision_layers: usize,
    unused: Vec<&'a str>,
) -> Vec<&'a str> {
    let skipped_layer = |name: &str| {
        name.strip_prefix("vision_tower.encoder.layers.")
            .and_then(|rest| rest.split('.').next()?.parse::<usize>().ok())
            .is_some_and(|i| (vision_layers..config.vision_config.num_hidden_layers).contains(&i))
    };
    unused
        .into_iter()
        .filter(|name| {
            !(name.starts_with("vision_tower.post_layernorm.")
                || name.ends_with("rotary_emb.inv_freq")
                || name.ends_with("position_ids")
                || skipped_layer(name))
        })
        .collect()
}
