//! Structs that mirror `config.json`, in the HF llava layout and the original liuhaotian layout.
//!
//! Released checkpoints omit any field equal to transformers' default (llava-1.5-7b-hf's
//! `vision_config` gives only a handful), so every default below is transformers' own.

pub mod anyres;
pub mod rope;

use serde::{Deserialize, Serialize};

use crate::config::anyres::AnyRes;
use crate::config::rope::yarn_mscale;
pub use crate::config::rope::{Rope, RopeScaling};

/// `vision_feature_layer`: one hidden-state index, or several whose features are concatenated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FeatureLayer {
    Single(i64),
    Many(Vec<i64>),
}

impl FeatureLayer {
    pub fn layers(&self) -> Vec<i64> {
        match self {
            FeatureLayer::Single(l) => vec![*l],
            FeatureLayer::Many(ls) => ls.clone(),
        }
    }
}

fn default_feature_layer() -> FeatureLayer {
    FeatureLayer::Single(-2)
}

/// Whether the CLS position of the vision tower reaches the language model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SelectStrategy {
    /// Patches only (the original's `patch`).
    Default,
    /// CLS + patches (the original's `cls_patch`).
    Full,
}

fn default_strategy() -> SelectStrategy {
    SelectStrategy::Default
}

/// CLIP vision tower (`CLIPVisionConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipVisionConfig {
    #[serde(default = "d768")]
    pub hidden_size: usize,
    #[serde(default = "d3072")]
    pub intermediate_size: usize,
    #[serde(default = "d12")]
    pub num_hidden_layers: usize,
    #[serde(default = "d12")]
    pub num_attention_heads: usize,
    #[serde(default = "d3")]
    pub num_channels: usize,
    #[serde(default = "d224")]
    pub image_size: usize,
    #[serde(default = "d32")]
    pub patch_size: usize,
    #[serde(default = "quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "eps_1e5")]
    pub layer_norm_eps: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projection_dim: Option<usize>,
    #[serde(default = "clip_vision_type")]
    pub model_type: String,
}

impl ClipVisionConfig {
    pub fn num_patches(&self) -> usize {
        let side = self.image_size / self.patch_size;
        side * side
    }
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// `rope_scaling` (transformers 4.x) or `rope_parameters` (5.x).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    #[serde(default, alias = "type", skip_serializing_if = "Option::is_none")]
    pub rope_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// `llama3` (Llama 3.1 and 3.2): the band between these wavelength factors is blended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
    /// `yarn`: the ramp's ends, in turns of a wavelength within the original context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_fast: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_slow: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncate: Option<bool>,
    /// `yarn`: the factor on cos and sin, or how to derive it from `factor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mscale: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mscale_all_dim: Option<f64>,
}

/// `eos_token_id` is an int in LLaMA configs and a list in some newer ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged, expecting = "a token id or a list of token ids")]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn ids(&self) -> Vec<u32> {
        match self {
            TokenIds::One(i) => vec![*i],
            TokenIds::Many(v) => v.clone(),
        }
    }
}

/// `generation_config.json`, which transformers' `generate` reads before the model's config.
/// Only its stop tokens are taken: Llama 3 chat models list `<|eot_id|>` there and nowhere
/// else. Sampling comes from the command line, as in the original LLaVA's scripts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GenerationConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
}

/// The LLaMA/Vicuna language model (`LlamaConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    #[serde(default = "d32000")]
    pub vocab_size: usize,
    #[serde(default = "d4096")]
    pub hidden_size: usize,
    #[serde(default = "d11008")]
    pub intermediate_size: usize,
    #[serde(default = "d32")]
    pub num_hidden_layers: usize,
    #[serde(default = "d32")]
    pub num_attention_heads: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    #[serde(default = "silu")]
    pub hidden_act: String,
    #[serde(default = "d2048")]
    pub max_position_embeddings: usize,
    #[serde(default = "eps_1e6")]
    pub rms_norm_eps: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeParameters>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeParameters>,
    /// Some configs (Phi-3's) give it beside the rope parameters; transformers then prefers it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    /// Mistral's sliding-window attention (BakLLaVA): a query sees only the last
    /// `sliding_window` positions, itself included. LLaMA configs have no such field.
    /// Absent (outer `None`) and `null` differ: transformers' Mistral default is 4096.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub sliding_window: Option<Option<usize>>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<u32>,
    #[serde(default = "llama_type")]
    pub model_type: String,
}

impl LlamaConfig {
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }
    /// Resolves `rope_theta` given flat or under `rope_parameters`, and the scaling kind.
    pub fn rope(&self) -> Result<Rope, String> {
        let params = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref());
        let theta = params
            .and_then(|p| p.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10000.0);
        let kind = params
            .and_then(|p| p.rope_type.clone())
            .unwrap_or_else(|| "default".into());
        let need = |field: &str, value: Option<f64>| {
            value.ok_or_else(|| format!("rope scaling `{kind}` needs `{field}`"))
        };
        let factor = params.and_then(|p| p.factor);
        // transformers prefers the config's own key, then the rope parameters', then the
        // config's context.
        let original = self
            .original_max_position_embeddings
            .or(params.and_then(|p| p.original_max_position_embeddings))
            .unwrap_or(self.max_position_embeddings);
        let scaling = match kind.as_str() {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear(need("factor", factor)?),
            "llama3" => RopeScaling::Llama3 {
                factor: need("factor", factor)?,
                low_freq_factor: need("low_freq_factor", params.and_then(|p| p.low_freq_factor))?,
                high_freq_factor: need(
                    "high_freq_factor",
                    params.and_then(|p| p.high_freq_factor),
                )?,
                original_max_position_embeddings: original,
            },
            "dynamic" => RopeScaling::Dynamic {
                factor: need("factor", factor)?,
                max_position_embeddings: self.max_position_embeddings,
            },
            "yarn" => {
                if original == 0 {
                    return Err(
                        "rope scaling `yarn` needs original_max_position_embeddings > 0".into(),
                    );
                }
                // DeepSeek-style configs leave the factor to the two context lengths.
                let factor =
                    factor.unwrap_or(self.max_position_embeddings as f64 / original as f64);
                let p = params.cloned().unwrap_or_default();
                // Zero counts as absent, as in transformers.
                let given = |v: Option<f64>| v.filter(|&v| v != 0.0);
                let attention_factor =
                    match (p.attention_factor, given(p.mscale), given(p.mscale_all_dim)) {
                        (Some(a), _, _) => a,
                        (None, Some(m), Some(all)) => {
                            yarn_mscale(factor, m) / yarn_mscale(factor, all)
                        }
                        _ => yarn_mscale(factor, 1.0),
                    };
                if !(attention_factor.is_finite() && attention_factor > 0.0) {
                    return Err(format!(
                        "rope scaling `yarn` needs a positive attention_factor, got {attention_factor}"
                    ));
                }
                RopeScaling::Yarn {
                    factor,
                    original_max_position_embeddings: original,
                    beta_fast: given(p.beta_fast).unwrap_or(32.0),
                    beta_slow: given(p.beta_slow).unwrap_or(1.0),
                    truncate: p.truncate.unwrap_or(true),
                    attention_factor,
                }
            }
            other => {
                return Err(format!(
                    "rope scaling type `{other}` is not supported (supported: default, linear, llama3, dynamic, yarn)"
                ));
            }
        };
        // Each of these would put NaN or infinity into every rotary angle.
        if !(theta.is_finite() && theta > 0.0) {
            return Err(format!("rope_theta must be a positive number, got {theta}"));
        }
        let factor = match scaling {
            RopeScaling::None => 1.0,
            RopeScaling::Linear(f)
            | RopeScaling::Llama3 { factor: f, .. }
            | RopeScaling::Dynamic { factor: f, .. }
            | RopeScaling::Yarn { factor: f, .. } => f,
        };
        if !(factor.is_finite() && factor > 0.0) {
            return Err(format!(
                "rope scaling `{kind}` needs a positive `factor`, got {factor}"
            ));
        }
        // Below 1 these would shrink the context they exist to stretch.
        if matches!(
            scaling,
            RopeScaling::Dynamic { .. } | RopeScaling::Yarn { .. }
        ) && factor < 1.0
        {
            return Err(format!(
                "rope scaling `{kind}` needs factor >= 1, got {factor}"
            ));
        }
        if let RopeScaling::Llama3 {
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
            ..
        } = scaling
        {
            if original_max_position_embeddings == 0 {
                return Err(
                    "rope scaling `llama3` needs original_max_position_embeddings > 0".into(),
                );
            }
            if !(high_freq_factor > low_freq_factor && low_freq_factor > 0.0) {
                return Err(format!(
                    "rope scaling `llama3` needs 0 < low_freq_factor < high_freq_factor, got {low_freq_factor} and {high_freq_factor}"
                ));
            }
        }
        Ok(Rope { theta, scaling })
    }
    /// The longest sequence the decoder runs ([`Rope::context_len`]).
    pub fn context_len(&self) -> usize {
        self.rope().map_or(self.max_position_embeddings, |r| {
            r.context_len(self.max_position_embeddings)
        })
    }
    /// [`Self::context_len`] for messages: the number and where it comes from.
    pub fn context_text(&self) -> String {
        let n = self.context_len();
        if n == self.max_position_embeddings {
            format!("{n} tokens (max_position_embeddings)")
        } else {
            format!("{n} tokens (max_position_embeddings times the dynamic rope factor)")
        }
    }
    /// The attention window, where this decoder has one: transformers reads `sliding_window`
    /// for Mistral only, so a LLaMA config that carries the key attends to everything.
    pub fn attention_window(&self) -> Option<usize> {
        const MISTRAL_DEFAULT: Option<usize> = Some(4096);
        (self.model_type == "mistral")
            .then(|| self.sliding_window.unwrap_or(MISTRAL_DEFAULT))
            .flatten()
    }
    pub fn eos_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(|e| e.ids())
            .unwrap_or_else(|| vec![2])
    }
}

/// The projector between vision features and word embeddings.
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectorConfig {
    /// Number of linear layers: 1 for v1's `linear`, 2 for 1.5's `mlp2x_gelu`.
    pub depth: usize,
    pub hidden_act: String,
    pub bias: bool,
}

/// HF `LlavaConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlavaConfig {
    pub vision_config: ClipVisionConfig,
    pub text_config: LlamaConfig,
    #[serde(default = "d32000_u32", alias = "image_token_id")]
    pub image_token_index: u32,
    #[serde(default = "gelu")]
    pub projector_hidden_act: String,
    #[serde(default = "default_strategy")]
    pub vision_feature_select_strategy: SelectStrategy,
    #[serde(default = "default_feature_layer")]
    pub vision_feature_layer: FeatureLayer,
    #[serde(default = "yes")]
    pub multimodal_projector_bias: bool,
    /// Not an HF field: the original layout's `mlpNx_gelu` depth. HF projectors are depth 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projector_depth: Option<usize>,
    /// The original layout's `image_aspect_ratio` (`pad` for 1.5): the default preprocessing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_aspect_ratio: Option<String>,
    /// Not an HF field: the original layout's `mm_use_im_start_end` (LLaVA v0), under which
    /// every `<image>` is written `<im_start><image><im_end>` before it is tokenised.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mm_use_im_start_end: bool,
    /// LLaVA-NeXT's grid resolutions, `(height, width)` (see [`crate::config::anyres`]); absent in
    /// LLaVA-1.5 configs, and in a `llava_next` config transformers' default applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_grid_pinpoints: Option<Vec<[u32; 2]>>,
    /// Not an HF field: the original layout's LLaVA-1.6, whose unpadding truncates where
    /// transformers rounds first (see [`AnyRes::truncate`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub original_unpad: bool,
    #[serde(default = "llava_type")]
    pub model_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
}

/// `LlavaNextConfig`'s default `image_grid_pinpoints`, llava-v1.6's own.
pub const LLAVA_NEXT_PINPOINTS: [[u32; 2]; 5] =
    [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]];

impl LlavaConfig {
    pub fn projector(&self) -> ProjectorConfig {
        ProjectorConfig {
            depth: self.projector_depth.unwrap_or(2),
            hidden_act: self.projector_hidden_act.clone(),
            bias: self.multimodal_projector_bias,
        }
    }

    /// The feature width entering the projector: concatenated layers widen it.
    pub fn projector_input_size(&self) -> usize {
        self.vision_config.hidden_size * self.vision_feature_layer.layers().len()
    }

    /// LLaVA-NeXT (`llava_next`): images are tiled and their features packed by
    /// [`crate::config::anyres`].
    pub fn is_next(&self) -> bool {
        self.model_type == "llava_next"
    }

    /// The grid geometry of a LLaVA-NeXT checkpoint; `None` for LLaVA-1.5.
    pub fn anyres(&self) -> Option<AnyRes<'_>> {
        self.is_next().then(|| AnyRes {
            pinpoints: self
                .image_grid_pinpoints
                .as_deref()
                .unwrap_or(&LLAVA_NEXT_PINPOINTS),
            tile: self.vision_config.image_size,
            side: self.vision_config.image_size / self.vision_config.patch_size,
            truncate: self.original_unpad,
        })
    }

    /// Positions in the prompt of an image of `(height, width)`: the same for every image in
    /// LLaVA-1.5, by size in LLaVA-NeXT.
    pub fn image_token_count(&self, image_size: (u32, u32)) -> crate::error::Result<usize> {
        match self.anyres() {
            Some(anyres) => anyres.token_count(image_size),
            None => Ok(self.image_seq_len()),
        }
    }

    /// The training `--max-length` default: LLaVA-1.5's 2048, or 4096 for LLaVA-NeXT, whose
    /// largest grid alone takes 2880 positions at 336 px.
    pub fn default_max_length(&self) -> usize {
        if self.is_next() { 4096 } else { 2048 }
    }

    /// How many embedding positions one image occupies in the language model's input
    /// (LLaVA-1.5; LLaVA-NeXT's base tile).
    pub fn image_seq_len(&self) -> usize {
        let n = self.vision_config.num_patches();
        match self.vision_feature_select_strategy {
            SelectStrategy::Default => n,
            SelectStrategy::Full => n + 1,
        }
    }

    /// Checks what the config implies before any weight is read, so errors name the field.
    pub fn validate(&self) -> Result<(), String> {
        let v = &self.vision_config;
        let t = &self.text_config;
        // LLaVA-NeXT and later tile the image (anyres) and add weights this model lacks: run
        // as LLaVA-1.5 they would give plausible but wrong answers, so they are refused.
        if !matches!(self.model_type.as_str(), "llava" | "llava_next") {
            return Err(format!(
                "model_type `{}` is not supported (supported: llava, the LLaVA-1.5 architecture, \
                 and llava_next, LLaVA-NeXT/1.6)",
                self.model_type
            ));
        }
        if v.model_type != "clip_vision_model" {
            return Err(format!(
                "vision_config.model_type `{}` is not supported (supported: clip_vision_model)",
                v.model_type
            ));
        }
        // Before `anyres()`, which divides by the patch size.
        if v.patch_size == 0 || !v.image_size.is_multiple_of(v.patch_size) {
            return Err(format!(
                "vision_config.image_size {} is not a multiple of patch_size {}",
                v.image_size, v.patch_size
            ));
        }
        if let Some(anyres) = self.anyres() {
            if self.vision_feature_select_strategy != SelectStrategy::Default {
                // transformers cannot lay the CLS position out on the grid either.
                return Err(
                    "vision_feature_select_strategy `full` is not supported for llava_next: \
                     the CLS position does not fit the grid of patches"
                        .into(),
                );
            }
            if anyres.pinpoints.is_empty() {
                return Err("image_grid_pinpoints is empty".into());
            }
            if let Some([h, w]) = anyres.pinpoints.iter().find(|[h, w]| {
                *h == 0
                    || *w == 0
                    || !(*h as usize).is_multiple_of(anyres.tile)
                    || !(*w as usize).is_multiple_of(anyres.tile)
            }) {
                return Err(format!(
                    "image_grid_pinpoints has {h}x{w}, which is not a grid of whole {0}x{0} tiles (vision_config.image_size)",
                    anyres.tile
                ));
            }
        }
        if v.num_attention_heads == 0 || !v.hidden_size.is_multiple_of(v.num_attention_heads) {
            return Err(
                "vision_config.hidden_size is not a multiple of num_attention_heads".into(),
            );
        }
        if !matches!(
            v.hidden_act.as_str(),
            "quick_gelu" | "gelu" | "gelu_new" | "gelu_pytorch_tanh"
        ) {
            return Err(format!(
                "vision_config.hidden_act `{}` is not supported",
                v.hidden_act
            ));
        }
        if self.vision_feature_layer.layers().is_empty() {
            return Err(
                "vision_feature_layer is an empty list: no vision features to project".into(),
            );
        }
        let n_layers = v.num_hidden_layers as i64;
        for l in self.vision_feature_layer.layers() {
            if l < -(n_layers + 1) || l > n_layers {
                return Err(format!(
                    "vision_feature_layer {l} is out of range for {n_layers} vision layers"
                ));
            }
        }
        if !matches!(
            t.model_type.as_str(),
            "llama" | "mistral" | "vicuna" | "llava_llama"
        ) {
            return Err(format!(
                "text_config.model_type `{}` is not supported (supported: llama, mistral)",
                t.model_type
            ));
        }
        if t.hidden_act != "silu" {
            return Err(format!(
                "text_config.hidden_act `{}` is not supported (supported: silu)",
                t.hidden_act
            ));
        }
        if t.num_attention_heads == 0 || t.num_kv_heads() == 0 {
            return Err(
                "text_config.num_attention_heads and num_key_value_heads must be at least 1".into(),
            );
        }
        if !t.num_attention_heads.is_multiple_of(t.num_kv_heads()) {
            return Err(
                "text_config.num_attention_heads is not a multiple of num_key_value_heads".into(),
            );
        }
        if !t.head_dim().is_multiple_of(2) {
            return Err("text_config head_dim must be even for rotary embeddings".into());
        }
        t.rope().map_err(|e| format!("text_config: {e}"))?;
        for (field, eps) in [
            ("text_config.rms_norm_eps", t.rms_norm_eps),
            ("vision_config.layer_norm_eps", v.layer_norm_eps),
        ] {
            if !(eps.is_finite() && eps >= 0.0) {
                return Err(format!(
                    "{field} must be a number >= 0, got {eps} (a norm would divide by a negative variance)"
                ));
            }
        }
        if t.attention_window() == Some(0) {
            return Err("text_config.sliding_window is 0: no position could see any".into());
        }
        if !matches!(
            self.projector_hidden_act.as_str(),
            "gelu" | "gelu_new" | "gelu_pytorch_tanh" | "relu" | "silu" | "quick_gelu"
        ) {
            return Err(format!(
                "projector_hidden_act `{}` is not supported",
                self.projector_hidden_act
            ));
        }
        Ok(())
    }
}

fn d3() -> usize {
    3
}
fn d12() -> usize {
    12
}
fn d32() -> usize {
    32
}
fn d224() -> usize {
    224
}
fn d768() -> usize {
    768
}
fn d2048() -> usize {
    2048
}
fn d3072() -> usize {
    3072
}
fn d4096() -> usize {
    4096
}
fn d11008() -> usize {
    11008
}
fn d32000() -> usize {
    32000
}
fn d32000_u32() -> u32 {
    32000
}
fn eps_1e5() -> f64 {
    1e-5
}
fn eps_1e6() -> f64 {
    1e-6
}
fn yes() -> bool {
    true
}
fn quick_gelu() -> String {
    "quick_gelu".into()
}
fn gelu() -> String {
    "gelu".into()
}
fn silu() -> String {
    "silu".into()
}
/// A key that is present, `null` included, as `Some`; with `#[serde(default)]` an absent one
/// stays `None`.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::deserialize(d).map(Some)
}

fn llama_type() -> String {
    "llama".into()
}
fn llava_type() -> String {
    "llava".into()
}
fn clip_vision_type() -> String {
    "clip_vision_model".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_hub_config_takes_transformers_defaults() {
        // The shape of llava-hf/llava-1.5-7b-hf's config.json: most fields left to defaults.
        let json = r#"{
          "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100,
          "image_token_index": 32000, "model_type": "llava", "pad_token_id": 32001,
          "projector_hidden_act": "gelu",
          "text_config": {"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096,
            "model_type": "llama", "rms_norm_eps": 1e-05, "torch_dtype": "float16", "vocab_size": 32064},
          "tie_word_embeddings": false, "torch_dtype": "float16",
          "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
            "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
            "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
          "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064
        }"#;
        let c: LlavaConfig = serde_json::from_str(json).expect("parses");
        c.validate().expect("valid");
        assert_eq!(c.text_config.hidden_size, 4096);
        assert_eq!(c.text_config.num_kv_heads(), 32);
        assert_eq!(c.text_config.head_dim(), 128);
        assert_eq!(c.vision_config.hidden_act, "quick_gelu");
        assert_eq!(c.image_seq_len(), 576);
        assert_eq!(c.projector().depth, 2);
        assert_eq!(
            c.text_config.rope().expect("rope"),
            Rope {
                theta: 10000.0,
                scaling: RopeScaling::None
            }
        );
    }

    #[test]
    fn rope_parameters_and_list_feature_layers() {
        let json = r#"{"vision_config": {"num_hidden_layers": 4}, "text_config": {
            "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}},
            "image_token_id": 7, "vision_feature_layer": [-2, -1], "vision_feature_select_strategy": "full"}"#;
        let c: LlavaConfig = serde_json::from_str(json).expect("parses");
        c.validate().expect("valid");
        assert_eq!(c.image_token_index, 7);
        assert_eq!(c.projector_input_size(), 2 * 768);
        assert_eq!(
            c.text_config.rope().expect("rope"),
            Rope {
                theta: 500000.0,
                scaling: RopeScaling::Linear(2.0)
            }
        );
        assert_eq!(c.image_seq_len(), 50);
    }

    /// A fine-tuned v0 checkpoint is saved in the HF layout; the flag must survive that, and an
    /// HF config must not grow it.
    #[test]
    fn mm_use_im_start_end_is_kept_only_when_set() {
        let json = r#"{"vision_config": {}, "text_config": {}}"#;
        let mut c: LlavaConfig = serde_json::from_str(json).expect("parses");
        assert!(!c.mm_use_im_start_end);
        let saved = serde_json::to_value(&c).expect("serialises");
        assert!(saved.get("mm_use_im_start_end").is_none());
        c.mm_use_im_start_end = true;
        let saved = serde_json::to_string(&c).expect("serialises");
        let back: LlavaConfig = serde_json::from_str(&saved).expect("parses");
        assert!(back.mm_use_im_start_end);
    }

    /// transformers applies `sliding_window` in Mistral's mask and ignores it in LLaMA's.
    #[test]
    fn sliding_window_is_mistrals_only() {
        let parse = |text: &str| -> LlavaConfig {
            serde_json::from_str(&format!(
                r#"{{"vision_config": {{}}, "text_config": {text}}}"#
            ))
            .expect("parses")
        };
        let mistral = parse(r#"{"model_type": "mistral", "sliding_window": 4096}"#);
        mistral.validate().expect("valid");
        assert_eq!(mistral.text_config.attention_window(), Some(4096));
        let llama = parse(r#"{"model_type": "llama", "sliding_window": 4096}"#);
        assert_eq!(llama.text_config.attention_window(), None);
        assert_eq!(parse("{}").text_config.attention_window(), None);
        // Mistral-7B-v0.2 and later write null; a config without the key takes 4096.
        let null = parse(r#"{"model_type": "mistral", "sliding_window": null}"#);
        assert_eq!(null.text_config.attention_window(), None);
        let absent = parse(r#"{"model_type": "mistral"}"#);
        assert_eq!(absent.text_config.attention_window(), Some(4096));
        let saved = serde_json::to_value(&null.text_config).expect("serialises");
        assert!(saved["sliding_window"].is_null() && saved.get("sliding_window").is_some());
        let e = parse(r#"{"model_type": "mistral", "sliding_window": 0}"#)
            .validate()
            .expect_err("an empty window");
        assert!(e.contains("sliding_window"), "{e}");
    }

    /// Llama 3.1's `rope_scaling` as its config.json writes it, and what an incomplete one says.
    #[test]
    fn llama3_rope_scaling_is_read_and_checked() {
        let text = |scaling: &str| -> Result<Rope, String> {
            let json = format!(
                r#"{{"max_position_embeddings": 131072, "rope_theta": 500000.0, "rope_scaling": {scaling}}}"#
            );
            serde_json::from_str::<LlamaConfig>(&json)
                .expect("parses")
                .rope()
        };
        let rope = text(
            r#"{"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_type": "llama3"}"#,
        )
        .expect("llama 3.1");
        assert_eq!(
            rope.scaling,
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192
            }
        );
        let inv = rope.inv_freq(128);
        // The fastest frequency is kept, the slowest divided by the factor.
        assert_eq!(inv[0], 1.0);
        let slowest = 1.0 / 500000f32.powf(126.0 / 128.0);
        assert!((inv[63] - slowest / 8.0).abs() <= 1e-6 * slowest);
        let e = text(r#"{"factor": 8.0, "high_freq_factor": 4.0, "rope_type": "llama3"}"#)
            .expect_err("incomplete");
        assert!(e.contains("low_freq_factor"), "{e}");
        let e = text(
            r#"{"factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0, "rope_type": "llama3"}"#,
        )
        .expect_err("an empty band");
        assert!(e.contains("low_freq_factor < high_freq_factor"), "{e}");
        for bad in [
            r#"{"factor": 0.0, "rope_type": "linear"}"#,
            r#"{"factor": -8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "rope_type": "llama3"}"#,
        ] {
            let e = text(bad).expect_err("a factor that is not positive");
            assert!(e.contains("positive `factor`"), "{bad}: {e}");
        }
        let e = text(r#"{"rope_theta": 0.0, "rope_type": "default"}"#).expect_err("theta 0");
        assert!(e.contains("rope_theta"), "{e}");
    }

    /// Dynamic NTK and YaRN as transformers 4.x and 5.x configs write them, with the defaults
    /// transformers fills in and what it would compute from a bad value refused.
    #[test]
    fn dynamic_and_yarn_rope_scaling_are_read_and_checked() {
        let config = |extra: &str| -> LlamaConfig {
            serde_json::from_str(&format!(r#"{{"max_position_embeddings": 4096{extra}}}"#))
                .expect("parses")
        };
        let dynamic = config(r#", "rope_scaling": {"type": "dynamic", "factor": 2.0}"#);
        assert_eq!(
            dynamic.rope().expect("dynamic").scaling,
            RopeScaling::Dynamic {
                factor: 2.0,
                max_position_embeddings: 4096
            }
        );
        // The context grows by the factor only with dynamic scaling.
        assert_eq!(dynamic.context_len(), 8192);
        let yarn = config(
            r#", "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                "original_max_position_embeddings": 1024}"#,
        );
        let rope = yarn.rope().expect("yarn");
        assert_eq!(rope.theta, 1e6);
        assert_eq!(
            rope.scaling,
            RopeScaling::Yarn {
                factor: 4.0,
                original_max_position_embeddings: 1024,
                beta_fast: 32.0,
                beta_slow: 1.0,
                truncate: true,
                attention_factor: 0.1 * 4f64.ln() + 1.0,
            }
        );
        assert_eq!(yarn.context_len(), 4096);
        // No factor: the ratio of the contexts. mscale / mscale_all_dim: their quotient.
        let deepseek = config(
            r#", "original_max_position_embeddings": 512, "rope_scaling": {"type": "yarn",
                "mscale": 2.0, "mscale_all_dim": 1.0, "beta_fast": 16, "truncate": false}"#,
        );
        let RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            beta_fast,
            truncate,
            attention_factor,
            ..
        } = deepseek.rope().expect("yarn").scaling
        else {
            panic!("not yarn");
        };
        assert_eq!((factor, original_max_position_embeddings), (8.0, 512));
        assert_eq!((beta_fast, truncate), (16.0, false));
        let m = |s: f64| 0.1 * s * 8f64.ln() + 1.0;
        assert!((attention_factor - m(2.0) / m(1.0)).abs() < 1e-12);
        for (bad, says) in [
            (r#", "rope_scaling": {"type": "dynamic"}"#, "needs `factor`"),
            (
                r#", "rope_scaling": {"type": "dynamic", "factor": 0.5}"#,
                "factor >= 1",
            ),
            (
                r#", "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 0}"#,
                "original_max_position_embeddings > 0",
            ),
            (
                r#", "rope_scaling": {"type": "yarn", "factor": 4.0, "attention_factor": -1.0}"#,
                "positive attention_factor",
            ),
        ] {
            let e = config(bad).rope().expect_err(bad);
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    /// LLaVA-NeXT's grid is worked out from the patch size, so a zero one must be refused
    /// before it (it once divided by zero).
    #[test]
    fn a_zero_patch_size_is_refused_for_llava_next_too() {
        let json = r#"{"model_type": "llava_next", "vision_config": {"patch_size": 0}, "text_config": {}}"#;
        let c: LlavaConfig = serde_json::from_str(json).expect("parses");
        let e = c.validate().expect_err("patch size 0");
        assert!(e.contains("patch_size 0"), "{e}");
    }

    /// A LLaVA-NeXT or SigLIP checkpoint would load and answer wrongly if it were not refused.
    #[test]
    fn other_llava_architectures_are_refused_by_name() {
        let parse = |json: &str| serde_json::from_str::<LlavaConfig>(json).expect("parses");
        let next = parse(
            r#"{"model_type": "llava_next", "vision_feature_select_strategy": "full", "vision_config": {}, "text_config": {}}"#,
        );
        let e = next.validate().expect_err("full with anyres");
        assert!(e.contains("full") && e.contains("llava_next"), "{e}");
        let next = parse(
            r#"{"model_type": "llava_next", "image_grid_pinpoints": [[224, 448], [300, 224]], "vision_config": {}, "text_config": {}}"#,
        );
        let e = next.validate().expect_err("pinpoints off the tile grid");
        assert!(e.contains("300x224") && e.contains("image_size"), "{e}");
        let next = parse(r#"{"model_type": "llava_next", "vision_config": {}, "text_config": {}}"#);
        assert_eq!(next.anyres().map(|a| a.pinpoints.len()), Some(5));
        // Its largest grid takes 2880 positions at 336 px: training defaults to a longer limit.
        assert_eq!(next.default_max_length(), 4096);
        assert_eq!(
            parse(r#"{"vision_config": {}, "text_config": {}}"#).default_max_length(),
            2048
        );
        let siglip =
            parse(r#"{"vision_config": {"model_type": "siglip_vision_model"}, "text_config": {}}"#);
        let e = siglip.validate().expect_err("siglip");
        assert!(e.contains("siglip_vision_model"), "{e}");
    }

    #[test]
    fn unsupported_values_are_named() {
        let json = r#"{"vision_config": {}, "text_config": {"rope_scaling": {"type": "longrope", "factor": 4.0}}}"#;
        let c: LlavaConfig = serde_json::from_str(json).expect("parses");
        let e = c.validate().expect_err("longrope is unsupported");
        assert!(e.contains("longrope") && e.contains("yarn"), "{e}");
        let json = r#"{"vision_config": {"layer_norm_eps": -10.0}, "text_config": {}}"#;
        let c: LlavaConfig = serde_json::from_str(json).expect("parses");
        let e = c.validate().expect_err("a negative eps");
        assert!(e.contains("vision_config.layer_norm_eps"), "{e}");
        let json = r#"{"vision_config": {}, "text_config": {}, "vision_feature_layer": -20}"#;
        let c: LlavaConfig = serde_json::from_str(json).expect("parses");
        assert!(
            c.validate()
                .expect_err("out of range")
                .contains("vision_feature_layer")
        );
    }
}
