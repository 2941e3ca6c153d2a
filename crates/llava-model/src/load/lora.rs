//! peft LoRA adapters, the format of the original LLaVA's `*-lora` releases:
//! `adapter_config.json` and `adapter_model.{safetensors,bin}`. [`crate::load::weights::Weights`]
//! merges them into the base weights as they are read, as peft's `merge_and_unload` does for
//! the original's model builder: `W + scale · B·A`, with `scale = lora_alpha / r`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::error::{ModelError, Result};

/// The fields of `adapter_config.json` that decide how a delta is formed. Anything that would
/// form it differently from `scale · B·A` is refused by name rather than merged wrongly.
#[derive(Debug, Clone, Deserialize)]
struct AdapterConfig {
    #[serde(default)]
    peft_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    rank_pattern: BTreeMap<String, Value>,
    #[serde(default)]
    alpha_pattern: BTreeMap<String, Value>,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
}

/// An adapter directory, checked.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// `adapter_model.safetensors`, else `adapter_model.bin`.
    pub weights: PathBuf,
    /// What `B·A` is multiplied by.
    pub scale: f64,
}

impl Adapter {
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("adapter_config.json");
        let json = crate::load::json::read_json(&path)?;
        let config: AdapterConfig = crate::load::json::typed(json, &path)?;
        let refuse = |what: &str| {
            Err(ModelError::config(
                &path,
                format!("{what} is not supported (plain LoRA adapters only)"),
            ))
        };
        match config.peft_type.as_deref() {
            None | Some("LORA") => {}
            Some(other) => return refuse(&format!("peft_type `{other}`")),
        }
        if config.r == 0 {
            return Err(ModelError::config(&path, "r must be at least 1"));
        }
        if config.use_dora {
            return refuse("use_dora");
        }
        if config.fan_in_fan_out {
            return refuse("fan_in_fan_out");
        }
        if let Some(bias) = config.bias.as_deref().filter(|b| *b != "none") {
            return refuse(&format!("bias `{bias}`"));
        }
        if !config.rank_pattern.is_empty() || !config.alpha_pattern.is_empty() {
            return refuse("a per-module rank_pattern or alpha_pattern");
        }
        if config
            .modules_to_save
            .as_ref()
            .is_some_and(|m| !m.is_empty())
        {
            return refuse("modules_to_save");
        }
        let r = config.r as f64;
        let scale = if config.use_rslora {
            config.lora_alpha / r.sqrt()
        } else {
            config.lora_alpha / r
        };
        let weights = ["adapter_model.safetensors", "adapter_model.bin"]
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                ModelError::config(
                    dir,
                    "has adapter_config.json but no adapter_model.safetensors or adapter_model.bin",
                )
            })?;
        Ok(Self { weights, scale })
    }
}

/// The adapted modules of an adapter file, as `(module, lora_A name, lora_B name)`, from names
/// like `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (peft drops the adapter
/// name when it saves). `module` is the base model's name for the layer (`model.layers.0...`).
pub fn pair_modules<'a>(
    names: impl IntoIterator<Item = &'a str>,
) -> std::result::Result<Vec<(String, String, String)>, String> {
    let mut parts: BTreeMap<&str, (Option<&str>, Option<&str>)> = BTreeMap::new();
    for name in names {
        let module = name.strip_prefix("base_model.model.").unwrap_or(name);
        if let Some(m) = module.strip_suffix(".lora_A.weight") {
            parts.entry(m).or_default().0 = Some(name);
        } else if let Some(m) = module.strip_suffix(".lora_B.weight") {
            parts.entry(m).or_default().1 = Some(name);
        } else {
            return Err(format!(
                "holds `{name}`, which is not a LoRA A or B matrix (embedding or bias adapters are not supported)"
            ));
        }
    }
    parts
        .into_iter()
        .map(|(module, ab)| match ab {
            (Some(a), Some(b)) => Ok((module.to_string(), a.to_string(), b.to_string())),
            _ => Err(format!("has only one of lora_A and lora_B for `{module}`")),
        })
        .collect()
}

/// The original LLaVA trainer's `non_lora_trainables.bin` names (`base_model.model.model.mm_projector.0.weight`)
/// as the original's model builder strips them, to the original layout's names.
pub fn non_lora_name(stored: &str) -> Option<String> {
    let name = stored.strip_prefix("base_model.").unwrap_or(stored);
    let name = match name.strip_prefix("model.") {
        Some(rest) if rest.starts_with("model.") => rest,
        _ => name,
    };
    crate::load::weights::original_llava_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_pair_up() {
        let names = [
            "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight",
            "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight",
        ];
        assert_eq!(
            pair_modules(names).unwrap(),
            vec![(
                "model.layers.0.mlp.up_proj".to_string(),
                names[1].to_string(),
                names[0].to_string()
            )]
        );
        let err = pair_modules(["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"])
            .unwrap_err();
        assert!(err.contains("only one of lora_A and lora_B"), "{err}");
        let err =
            pair_modules(["base_model.model.model.embed_tokens.lora_embedding_A"]).unwrap_err();
        assert!(err.contains("lora_embedding_A"), "{err}");
    }

    #[test]
    fn non_lora_trainables_are_named_as_the_original_strips_them() {
        assert_eq!(
            non_lora_name("base_model.model.model.mm_projector.2.weight").as_deref(),
            Some("multi_modal_projector.linear_2.weight")
        );
        assert_eq!(
            non_lora_name("model.mm_projector.0.bias").as_deref(),
            Some("multi_modal_projector.linear_1.bias")
        );
    }
}
