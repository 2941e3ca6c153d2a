//! Finding a checkpoint and reading its config: a local directory or a hub id already in the
//! local Hugging Face cache; the HF llava layout or the original liuhaotian layout.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use llava_data::tokenizer::{IM_END, IM_START, ImageTokens, Tokenizer};
use serde_json::Value;

use crate::config::{
    ClipVisionConfig, FeatureLayer, GenerationConfig, LlamaConfig, LlavaConfig, SelectStrategy,
};
use crate::error::{ModelError, Result};
use crate::load::json::{read_json, typed};
use crate::load::weights::{Weights, clip_vision_name, hf_llava_name, original_llava_name};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// transformers' `LlavaForConditionalGeneration` (`llava-hf/*`).
    Hf,
    /// A peft adapter over an HF-layout LLaVA (`llava train --lora`'s output: the LoRA pairs
    /// and the projector as `modules_to_save`), loaded over `--model-base`.
    HfAdapter { model_base: PathBuf },
    /// The original `LlavaLlamaForCausalLM` (`liuhaotian/*`), with the CLIP tower in its own
    /// directory.
    Original {
        vision_tower_dir: PathBuf,
        /// `--model-base`: the language model a LoRA or projector-only release was trained
        /// from, whose weights and tokenizer it is loaded over.
        model_base: Option<PathBuf>,
    },
}

#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: LlavaConfig,
    pub layout: Layout,
}

impl Checkpoint {
    /// `model` is a directory or a hub id (`org/name`) present in the local HF cache.
    /// `vision_tower` overrides where the original layout's CLIP tower is found.
    pub fn open(model: &str, vision_tower: Option<&Path>) -> Result<Self> {
        Self::open_with_base(model, vision_tower, None)
    }

    /// As [`Checkpoint::open`], for the original's releases that hold only what training
    /// changed: LoRA adapters (`adapter_config.json`, the projector in
    /// `non_lora_trainables.bin`) or a stage-1 `mm_projector.bin`. `model_base` (a directory or
    /// hub id) is the language model they were trained from, as the original's `--model-base`.
    pub fn open_with_base(
        model: &str,
        vision_tower: Option<&Path>,
        model_base: Option<&str>,
    ) -> Result<Self> {
        let dir = resolve_model_dir(model)?;
        let config_path = dir.join("config.json");
        let json = read_json(&config_path)?;
        let (config, layout) = if json.get("vision_config").is_some() {
            let adapter = dir.join("adapter_config.json").is_file();
            if let (true, Some(base)) = (adapter, model_base) {
                let (base_dir, hf_base) = resolve_base(base)?;
                if !hf_base {
                    return Err(ModelError::config(
                        &base_dir,
                        "--model-base of an adapter over an HF-layout LLaVA must be that HF-layout LLaVA checkpoint",
                    ));
                }
                let config: LlavaConfig = typed(json, &config_path)?;
                (
                    config,
                    Layout::HfAdapter {
                        model_base: base_dir,
                    },
                )
            } else if adapter {
                return Err(ModelError::config(
                    &dir,
                    "is a LoRA adapter (adapter_config.json); give the LLaVA checkpoint it was trained from with --model-base",
                ));
            } else if model_base.is_some() {
                return Err(ModelError::config(
                    &dir,
                    "is a complete HF-layout checkpoint; --model-base is for LoRA adapters and the original layout's projector-only releases",
                ));
            } else {
                let config: LlavaConfig = typed(json, &config_path)?;
                (config, Layout::Hf)
            }
        } else if json.get("mm_vision_tower").is_some() || json.get("mm_projector_type").is_some() {
            let (config, vision_tower_dir) = original_config(&dir, &json, vision_tower)?;
            let model_base = match model_base {
                Some(base) => {
                    let (base_dir, hf_base) = resolve_base(base)?;
                    // The original builder loads the base as its own LLaVA class: a plain
                    // LLaMA (Vicuna) or an original-layout LLaVA, never llava-hf's layout.
                    if hf_base {
                        return Err(ModelError::config(
                            &base_dir,
                            "--model-base is an HF-layout LLaVA checkpoint; the base of an original release is the language model it was trained from (e.g. lmsys/vicuna-7b-v1.5)",
                        ));
                    }
                    Some(base_dir)
                }
                None => {
                    check_complete(&dir, &json)?;
                    None
                }
            };
            (
                config,
                Layout::Original {
                    vision_tower_dir,
                    model_base,
                },
            )
        } else {
            return Err(ModelError::config(
                &config_path,
                "is not a LLaVA config: it has neither `vision_config` (HF layout) nor `mm_vision_tower` (original layout)",
            ));
        };
        config.validate().map_err(|m| match &layout {
            // The original layout's tower fields come from the CLIP directory's config, and
            // its feature layer from `mm_vision_select_layer`.
            Layout::Original {
                vision_tower_dir, ..
            } if m.starts_with("vision_config.") => {
                ModelError::config(vision_tower_dir.join("config.json"), m)
            }
            Layout::Original { .. } => ModelError::config(
                &config_path,
                m.replace("vision_feature_layer", "mm_vision_select_layer"),
            ),
            Layout::Hf | Layout::HfAdapter { .. } => ModelError::config(&config_path, m),
        })?;
        Ok(Self {
            dir,
            config,
            layout,
        })
    }

    /// Maps every weight file onto canonical names, converting to `dtype` on load.
    pub fn weights(&self, dtype: DType, device: &Device) -> Result<Weights> {
        let mut w = Weights::new(dtype, device.clone());
        match &self.layout {
            Layout::Hf => w.add_dir(&self.dir, hf_llava_name)?,
            Layout::HfAdapter { model_base } => {
                w.add_dir(model_base, hf_llava_name)?;
                w.add_lora(&self.dir, hf_llava_name)?;
            }
            Layout::Original {
                vision_tower_dir,
                model_base,
            } => {
                w.add_dir(vision_tower_dir, clip_vision_name)?;
                match model_base {
                    None => w.add_dir(&self.dir, original_llava_name)?,
                    Some(base) => {
                        w.add_dir(base, original_llava_name)?;
                        self.add_release_over_base(&mut w)?;
                    }
                }
            }
        }
        Ok(w)
    }

    /// What the original's model builder loads over `--model-base`: for a LoRA release the
    /// non-LoRA weights (the projector), then the merged adapters; else `mm_projector.bin`.
    fn add_release_over_base(&self, w: &mut Weights) -> Result<()> {
        if self.dir.join("adapter_config.json").is_file() {
            let extra = self.dir.join("non_lora_trainables.bin");
            if !extra.is_file() {
                return Err(ModelError::config(
                    &self.dir,
                    "is a LoRA release but has no non_lora_trainables.bin (its projector)",
                ));
            }
            w.add_file(&extra, crate::load::lora::non_lora_name)?;
            return w.add_lora(&self.dir, original_llava_name);
        }
        let projector = ["mm_projector.safetensors", "mm_projector.bin"]
            .iter()
            .map(|f| self.dir.join(f))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                ModelError::config(
                    &self.dir,
                    "has neither adapter_config.json (a LoRA release) nor mm_projector.bin (a projector-only release) to load over --model-base",
                )
            })?;
        w.add_file(&projector, original_llava_name)
    }

    /// Where the tokenizer is: the base's, for a release loaded over `--model-base` (as the
    /// original's model builder does), else the checkpoint's own.
    pub fn tokenizer_dir(&self) -> &Path {
        match &self.layout {
            Layout::Original {
                model_base: Some(base),
                ..
            } => base,
            _ => &self.dir,
        }
    }

    /// How `<image>` becomes image positions with this checkpoint's tokenizer, checked against
    /// the config: an `<image>` token must be `image_token_index`, and under
    /// `mm_use_im_start_end` the tokenizer must have `<im_start>` and `<im_end>` with
    /// embedding rows.
    pub fn image_tokens(&self, tokenizer: &Tokenizer) -> Result<ImageTokens> {
        let config = &self.config;
        let image_tokens =
            tokenizer.image_tokens(config.image_token_index, config.mm_use_im_start_end);
        let bad = |m: String| ModelError::config(self.dir.join("config.json"), m);
        if let ImageTokens::Expand { id } = image_tokens
            && id != config.image_token_index
        {
            return Err(bad(format!(
                "image_token_index is {} but the tokenizer's <image> token is {id}",
                config.image_token_index
            )));
        }
        if config.mm_use_im_start_end {
            if let ImageTokens::Expand { .. } = image_tokens {
                return Err(bad(
                    "mm_use_im_start_end is a setting of the original layout, whose tokenizer has no <image> token; this one has".into(),
                ));
            }
            let rows = config.text_config.vocab_size;
            for token in [IM_START, IM_END] {
                match tokenizer.token_to_id(token) {
                    None => {
                        return Err(bad(format!(
                            "mm_use_im_start_end is true but tokenizer.json has no {token} token"
                        )));
                    }
                    Some(id) if id as usize >= rows => {
                        return Err(bad(format!(
                            "mm_use_im_start_end: the tokenizer's {token} is id {id}, but vocab_size is {rows}"
                        )));
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(image_tokens)
    }

    /// The ids at which generation stops. As in transformers, `generation_config.json` comes
    /// first, then the model's config. Where `generation_config.json` names no
    /// `eos_token_id`, transformers would not stop at all; the config's is taken instead.
    pub fn eos_token_ids(&self) -> Result<Vec<u32>> {
        // A release over --model-base takes the base's, as the original loads its model from there.
        let path = self.tokenizer_dir().join("generation_config.json");
        if path.is_file() {
            let generation: GenerationConfig = typed(read_json(&path)?, &path)?;
            if let Some(ids) = generation.eos_token_id {
                return Ok(ids.ids());
            }
        }
        Ok(self.config.text_config.eos_ids())
    }

    /// The directory holding `preprocessor_config.json`: the CLIP directory in the original layout.
    pub fn preprocessor_dir(&self) -> &Path {
        match &self.layout {
            Layout::Original {
                vision_tower_dir, ..
            } if !self.dir.join("preprocessor_config.json").is_file() => vision_tower_dir,
            _ => &self.dir,
        }
    }
}

/// `--model-base`'s directory, and whether it is an HF-layout LLaVA (has `vision_config`).
fn resolve_base(base: &str) -> Result<(PathBuf, bool)> {
    let dir = resolve_model_dir(base)
        .map_err(|e| ModelError::Input(format!("--model-base {base}: {e}")))?;
    let hf = read_json(&dir.join("config.json"))?
        .get("vision_config")
        .is_some();
    Ok((dir, hf))
}

/// A directory as given, else `org/name` looked up in the HF hub cache (`HF_HUB_CACHE`,
/// `HF_HOME/hub`, or `~/.cache/huggingface/hub`), at `refs/main` or the only snapshot.
pub fn resolve_model_dir(model: &str) -> Result<PathBuf> {
    let p = Path::new(model);
    if p.is_dir() {
        if !p.join("config.json").is_file() {
            return Err(ModelError::config(p, "has no config.json"));
        }
        return Ok(p.to_path_buf());
    }
    if p.exists() {
        return Err(ModelError::config(
            p,
            "is not a directory (give the checkpoint directory)",
        ));
    }
    let looks_like_id =
        model.split('/').count() == 2 && !model.starts_with('.') && !model.starts_with('/');
    if let Some(dir) = looks_like_id.then(|| hub_cache_snapshot(model)).flatten() {
        return Ok(dir);
    }
    Err(ModelError::ModelNotFound(model.to_string()))
}

fn hub_cache_root() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("HF_HUB_CACHE") {
        return Some(PathBuf::from(p));
    }
    if let Ok(p) = std::env::var("HF_HOME") {
        return Some(PathBuf::from(p).join("hub"));
    }
    std::env::var("HOME")
        .ok()
        .map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
}

fn hub_cache_snapshot(id: &str) -> Option<PathBuf> {
    let repo = hub_cache_root()?.join(format!("models--{}", id.replace('/', "--")));
    let snapshots = repo.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(repo.join("refs/main")) {
        let dir = snapshots.join(rev.trim());
        if dir.join("config.json").is_file() {
            return Some(dir);
        }
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|d| d.join("config.json").is_file())
        .collect();
    dirs.sort();
    if dirs.len() == 1 { dirs.pop() } else { None }
}

/// An original-layout directory without `--model-base` must hold the whole model: a LoRA or
/// projector-only release says what it lacks, and what the original's `--model-base` wants.
fn check_complete(dir: &Path, json: &Value) -> Result<()> {
    let what = if dir.join("adapter_config.json").is_file() {
        "a LoRA release (adapter_config.json)"
    } else if crate::load::weights::weight_file_paths(dir).is_ok_and(|paths| {
        // The only weights the loader would find are the projector's.
        !paths.is_empty()
            && paths
                .iter()
                .all(|p| p.file_stem().is_some_and(|stem| stem == "mm_projector"))
    }) {
        "a projector-only release (mm_projector.bin)"
    } else {
        return Ok(());
    };
    let base = json
        .get("_name_or_path")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .map(|n| format!(" (its config names `{n}`)"))
        .unwrap_or_default();
    Err(ModelError::config(
        dir,
        format!("is {what}: pass --model-base DIR, the language model it was trained from{base}"),
    ))
}

/// Translates a liuhaotian `config.json` (flat LLaMA fields + `mm_*`) into an HF `LlavaConfig`.
fn original_config(
    dir: &Path,
    json: &Value,
    vision_tower: Option<&Path>,
) -> Result<(LlavaConfig, PathBuf)> {
    let config_path = dir.join("config.json");
    let bad = |m: String| ModelError::config(&config_path, m);
    let mut text_config: LlamaConfig = typed(json.clone(), &config_path)?;
    // The original code's `LlavaMistralForCausalLM` is Mistral's decoder, sliding window
    // included; `llava_llama` (and the v0 releases' `llava`) is LLaMA's.
    text_config.model_type = match json.get("model_type").and_then(Value::as_str) {
        Some("llava_mistral" | "mistral") => "mistral".into(),
        None | Some("llava_llama" | "llava" | "llama") => "llama".into(),
        Some(other) => {
            return Err(bad(format!(
                "model_type `{other}` is not supported (llava_llama, llava_mistral)"
            )));
        }
    };
    let vision_tower_dir = match vision_tower {
        Some(p) => p.to_path_buf(),
        None => {
            let name = json
                .get("mm_vision_tower")
                .and_then(Value::as_str)
                .unwrap_or("openai/clip-vit-large-patch14-336");
            let local = if Path::new(name).is_absolute() {
                PathBuf::from(name)
            } else {
                dir.join(name)
            };
            if local.join("config.json").is_file() {
                local
            } else {
                resolve_model_dir(name).map_err(|_| {
                    bad(format!(
                        "mm_vision_tower `{name}` is neither a local directory nor in the local HF cache; pass --vision-tower DIR"
                    ))
                })?
            }
        }
    };
    let clip_path = vision_tower_dir.join("config.json");
    let clip = read_json(&clip_path)?;
    // A full CLIPModel config nests the tower; a CLIPVisionModel config is the tower.
    let vision_json = clip.get("vision_config").cloned().unwrap_or(clip);
    let vision_config: ClipVisionConfig = typed(vision_json, &clip_path)?;
    let layer = json
        .get("mm_vision_select_layer")
        .and_then(Value::as_i64)
        .unwrap_or(-2);
    let strategy = match json
        .get("mm_vision_select_feature")
        .and_then(Value::as_str)
        .unwrap_or("patch")
    {
        "patch" => SelectStrategy::Default,
        "cls_patch" => SelectStrategy::Full,
        other => {
            return Err(bad(format!(
                "mm_vision_select_feature `{other}` is not supported (patch, cls_patch)"
            )));
        }
    };
    let projector_type = json
        .get("mm_projector_type")
        .and_then(Value::as_str)
        .unwrap_or("linear");
    let depth = parse_projector_type(projector_type).ok_or_else(|| {
        bad(format!(
            "mm_projector_type `{projector_type}` is not supported (linear, mlpNx_gelu)"
        ))
    })?;
    let image_token_index = text_config.vocab_size as u32;
    let aspect = json.get("image_aspect_ratio").and_then(Value::as_str);
    let anyres = aspect == Some("anyres");
    let image_grid_pinpoints = match anyres {
        true => Some(original_pinpoints(json).map_err(bad)?),
        false => None,
    };
    let config = LlavaConfig {
        vision_config,
        text_config,
        image_token_index,
        projector_hidden_act: "gelu".into(),
        vision_feature_select_strategy: strategy,
        vision_feature_layer: FeatureLayer::Single(layer),
        multimodal_projector_bias: true,
        projector_depth: Some(depth),
        // LLaVA-1.6 tiles instead (see `image_grid_pinpoints`).
        image_aspect_ratio: aspect.filter(|_| !anyres).map(String::from),
        mm_use_im_start_end: json
            .get("mm_use_im_start_end")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        image_grid_pinpoints,
        original_unpad: anyres,
        model_type: if anyres { "llava_next" } else { "llava" }.into(),
        architectures: None,
    };
    Ok((config, vision_tower_dir))
}

/// The original LLaVA-1.6's grid: `image_grid_pinpoints` as `(width, height)` pairs, turned into
/// the `(height, width)` of transformers' configs, and only with `spatial_unpad` merging, the
/// one its releases use.
fn original_pinpoints(json: &Value) -> std::result::Result<Vec<[u32; 2]>, String> {
    match json.get("mm_patch_merge_type").and_then(Value::as_str) {
        Some("spatial_unpad") => {}
        other => {
            return Err(format!(
                "image_aspect_ratio `anyres` with mm_patch_merge_type `{}` is not supported (spatial_unpad, as the LLaVA-1.6 releases)",
                other.unwrap_or("flat")
            ));
        }
    }
    let pinpoints = json
        .get("image_grid_pinpoints")
        .cloned()
        .map(serde_json::from_value::<Vec<[u32; 2]>>)
        .and_then(|parsed| parsed.ok())
        .ok_or("`image_grid_pinpoints` must be a list of [width, height] pairs for anyres")?;
    Ok(pinpoints.into_iter().map(|[w, h]| [h, w]).collect())
}

/// `linear` → 1, `mlp2x_gelu` → 2, `mlpNx_gelu` → N.
fn parse_projector_type(t: &str) -> Option<usize> {
    if t == "linear" {
        return Some(1);
    }
    t.strip_prefix("mlp")?
        .strip_suffix("x_gelu")?
        .parse()
        .ok()
        .filter(|&n| n >= 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projector_types() {
        assert_eq!(parse_projector_type("linear"), Some(1));
        assert_eq!(parse_projector_type("mlp2x_gelu"), Some(2));
        assert_eq!(parse_projector_type("mlp3x_gelu"), Some(3));
        assert_eq!(parse_projector_type("identity"), None);
        assert_eq!(parse_projector_type("mlpx_gelu"), None);
    }

    /// The original layout names its decoder in `model_type`; a Mistral one keeps its window.
    #[test]
    fn original_model_type_picks_the_decoder() {
        let clip = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models/original-layout/clip");
        let config = |model_type: &str| {
            let json = serde_json::json!({
                "model_type": model_type, "sliding_window": 4096,
                "mm_vision_tower": "clip", "mm_projector_type": "mlp2x_gelu",
            });
            original_config(Path::new("/ckpt"), &json, Some(&clip)).map(|(c, _)| c)
        };
        let mistral = config("llava_mistral").expect("llava_mistral");
        assert_eq!(mistral.text_config.attention_window(), Some(4096));
        let llama = config("llava_llama").expect("llava_llama");
        assert_eq!(llama.text_config.attention_window(), None);
        let e = config("llava_mpt")
            .expect_err("MPT is not a LLaMA")
            .to_string();
        assert!(e.contains("llava_mpt") && e.contains("/ckpt"), "{e}");
    }

    #[test]
    fn unknown_model_is_a_clear_error() {
        let e = resolve_model_dir("no-such-org/no-such-model-xyz").expect_err("not found");
        assert!(e.to_string().contains("no-such-org/no-such-model-xyz"));
    }
}
