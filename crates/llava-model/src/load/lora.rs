//! peft LoRA adapters, the format of the original LLaVA's `*-lora` releases and of
//! `llava train --lora`: `adapter_config.json` and `adapter_model.{safetensors,bin}`.
//!
//! Two uses. For inference [`crate::load::weights::Weights`] merges an adapter into the base
//! weights as they are read, as peft's `merge_and_unload` does for the original's model builder:
//! `W + scale · B·A`, with `scale = lora_alpha / r`. For training, [`LoraTraining`] is a plain
//! setting the loader carries: it hands each adapted projection its `lora_A`/`lora_B` pair as
//! trainable `Var`s (fresh, with peft's init, or from an adapter), and the layer
//! ([`crate::model::lora`]) adds the product.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

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
    #[serde(default)]
    lora_dropout: f64,
}

/// An adapter directory, checked.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// `adapter_model.safetensors`, else `adapter_model.bin`.
    pub weights: PathBuf,
    /// What `B·A` is multiplied by.
    pub scale: f64,
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub lora_dropout: f64,
    /// Modules saved whole beside the pairs (peft's `modules_to_save`): the projector, which
    /// `llava train --lora` and LLaVA's own LoRA recipes train in full.
    pub modules_to_save: Vec<String>,
}

/// The modules a whole-module entry of `modules_to_save` may name: the projector, under its
/// llava-hf or original name. Others (`lm_head`, `embed_tokens`) would change what the base
/// computes in ways the loader does not track, so they are refused by name.
const SAVABLE_MODULES: [&str; 2] = ["multi_modal_projector", "mm_projector"];

/// The trained pair's scale: `lora_alpha / r`, or `lora_alpha / √r` with `use_rslora`.
pub fn scaling(lora_alpha: f64, r: usize, use_rslora: bool) -> f64 {
    let r = r as f64;
    if use_rslora {
        lora_alpha / r.sqrt()
    } else {
        lora_alpha / r
    }
}

/// The decoder's linear layers, which LLaVA's `find_all_linear_names` adapts: every linear of
/// the language model, not `lm_head`, the projector or the vision tower.
pub const LANGUAGE_MODEL_LINEARS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// How `llava train --lora` gets its pairs: peft's fresh init, or an existing adapter's.
#[derive(Debug, Clone)]
pub enum LoraInit {
    /// `lora_A` Kaiming-uniform with a = √5 (uniform on ±1/√in), `lora_B` zero, from this seed.
    Fresh(u64),
    /// The pairs (and the projector, if saved) of a peft adapter directory (`--lora-from`).
    From(PathBuf),
}

/// The LoRA setting of a training run: which decoder projections get a trainable pair, of what
/// rank and scale, and where the pairs start from. The loader carries it to the layers.
#[derive(Debug, Clone)]
pub struct LoraTraining {
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub lora_dropout: f64,
    /// Short module names adapted in every decoder layer ([`LANGUAGE_MODEL_LINEARS`]).
    pub targets: Vec<String>,
    pub init: LoraInit,
    /// The dropout masks' key, which the trainer moves on before each forward pass.
    pub dropout_key: DropoutKey,
}

impl LoraTraining {
    /// The setting an adapter directory implies: its rank, scale, dropout and adapted modules.
    pub fn from_adapter(dir: &Path) -> Result<Self> {
        let adapter = Adapter::read(dir)?;
        let names = adapter.tensor_names()?;
        let modules = pair_modules(names.iter().map(String::as_str), &adapter.modules_to_save)
            .map_err(|m| ModelError::config(&adapter.weights, m))?;
        let mut targets: Vec<String> = modules
            .iter()
            .filter_map(|(m, _, _)| m.rsplit('.').next().map(str::to_string))
            .collect();
        targets.sort();
        targets.dedup();
        if let Some(t) = targets
            .iter()
            .find(|t| !LANGUAGE_MODEL_LINEARS.contains(&t.as_str()))
        {
            return Err(ModelError::config(
                &adapter.weights,
                format!("adapts `{t}`; training adapts the language model's linear layers only"),
            ));
        }
        Ok(Self {
            r: adapter.r,
            lora_alpha: adapter.lora_alpha,
            use_rslora: adapter.use_rslora,
            lora_dropout: adapter.lora_dropout,
            targets,
            init: LoraInit::From(dir.to_path_buf()),
            dropout_key: DropoutKey::default(),
        })
    }

    pub fn scaling(&self) -> f64 {
        scaling(self.lora_alpha, self.r, self.use_rslora)
    }
}

/// The key the dropout masks of one forward pass are drawn from, shared by every LoRA layer:
/// the trainer sets it from the step (so a resumed run draws the same masks), and no key means
/// no dropout (inference, evaluation).
#[derive(Debug, Clone)]
pub struct DropoutKey(Arc<AtomicU64>);

impl Default for DropoutKey {
    fn default() -> Self {
        Self(Arc::new(AtomicU64::new(Self::OFF)))
    }
}

impl DropoutKey {
    const OFF: u64 = u64::MAX;

    pub fn set(&self, key: Option<u64>) {
        self.0.store(key.unwrap_or(Self::OFF), Ordering::Relaxed);
    }

    pub fn get(&self) -> Option<u64> {
        Some(self.0.load(Ordering::Relaxed)).filter(|&k| k != Self::OFF)
    }
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
        let modules_to_save = config.modules_to_save.clone().unwrap_or_default();
        if let Some(m) = modules_to_save
            .iter()
            .find(|m| !SAVABLE_MODULES.contains(&m.as_str()))
        {
            return refuse(&format!(
                "modules_to_save `{m}` (only the projector may be saved whole)"
            ));
        }
        let scale = scaling(config.lora_alpha, config.r, config.use_rslora);
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
        Ok(Self {
            weights,
            scale,
            r: config.r,
            lora_alpha: config.lora_alpha,
            use_rslora: config.use_rslora,
            lora_dropout: config.lora_dropout,
            modules_to_save,
        })
    }
}

impl Adapter {
    /// The stored names of the adapter file's tensors.
    pub fn tensor_names(&self) -> Result<Vec<String>> {
        let path = &self.weights;
        Ok(if path.extension().is_some_and(|x| x == "safetensors") {
            let f = crate::load::safetensors_file::SafetensorsFile::open(path)?;
            f.names().map(str::to_string).collect()
        } else {
            let f = crate::load::pytorch_file::PytorchFile::open(path)?;
            f.names().map(str::to_string).collect()
        })
    }
}

/// Whether a stored name belongs to one of the adapter's `modules_to_save` (peft saves such a
/// module's tensors under the module's own path, e.g.
/// `base_model.model.model.multi_modal_projector.linear_1.weight`).
pub fn is_saved_module(name: &str, modules_to_save: &[String]) -> bool {
    name.split('.')
        .any(|part| modules_to_save.iter().any(|m| m == part))
}

/// The base model's stored name of an adapter tensor: peft prefixes `base_model.model.`.
pub fn base_name(stored: &str) -> &str {
    stored.strip_prefix("base_model.model.").unwrap_or(stored)
}

/// The adapted modules of an adapter file, as `(module, lora_A name, lora_B name)`, from names
/// like `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (peft drops the adapter
/// name when it saves). `module` is the base model's name for the layer (`model.layers.0...`).
/// Tensors of `modules_to_save` are skipped: they are whole weights, not pairs.
pub fn pair_modules<'a>(
    names: impl IntoIterator<Item = &'a str>,
    modules_to_save: &[String],
) -> std::result::Result<Vec<(String, String, String)>, String> {
    let mut parts: BTreeMap<&str, (Option<&str>, Option<&str>)> = BTreeMap::new();
    for name in names {
        let module = base_name(name);
        if is_saved_module(module, modules_to_save) {
            continue;
        }
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
            pair_modules(names, &[]).unwrap(),
            vec![(
                "model.layers.0.mlp.up_proj".to_string(),
                names[1].to_string(),
                names[0].to_string()
            )]
        );
        let err = pair_modules(
            ["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"],
            &[],
        )
        .unwrap_err();
        assert!(err.contains("only one of lora_A and lora_B"), "{err}");
        let err = pair_modules(
            ["base_model.model.model.embed_tokens.lora_embedding_A"],
            &[],
        )
        .unwrap_err();
        assert!(err.contains("lora_embedding_A"), "{err}");
        let saved = ["multi_modal_projector".to_string()];
        let with_projector = [
            names[0],
            names[1],
            "base_model.model.model.multi_modal_projector.linear_1.weight",
        ];
        assert_eq!(pair_modules(with_projector, &saved).unwrap().len(), 1);
        assert!(pair_modules(with_projector, &[]).is_err());
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
