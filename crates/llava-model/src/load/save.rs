//! Writing checkpoints in the HF llava layout: `config.json` and safetensors shards with
//! `model.safetensors.index.json`, tensor names in the llava-hf hub naming. Files are written
//! to a temporary name and renamed, so a killed writer never leaves a half shard behind.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Tensor;

use crate::config::LlavaConfig;
use crate::error::{ModelError, Result};
use crate::load::weights::hub_name;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path` atomically (temp file + rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

pub fn write_config(dir: &Path, config: &LlavaConfig) -> Result<()> {
    let mut json = serde_json::to_value(config).map_err(|e| ModelError::Input(e.to_string()))?;
    if let Some(obj) = json.as_object_mut() {
        obj.insert(
            "architectures".into(),
            serde_json::json!(["LlavaForConditionalGeneration"]),
        );
        obj.remove("projector_depth");
    }
    let text = serde_json::to_string_pretty(&json).map_err(|e| ModelError::Input(e.to_string()))?;
    write_atomic(&dir.join("config.json"), text.as_bytes())
}

/// Writes canonical-named tensors as shards of at most `max_shard_bytes` (a single
/// `model.safetensors` when everything fits in one), under llava-hf's hub names.
pub fn write_safetensors(
    dir: &Path,
    tensors: &[(String, Tensor)],
    max_shard_bytes: usize,
) -> Result<()> {
    let named: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| (hub_name(n), t.clone()))
        .collect();
    write_shards(dir, &named, max_shard_bytes)
}

/// Writes tensors under the names given as shards of at most `max_shard_bytes`, with
/// `model.safetensors.index.json` when there is more than one.
pub fn write_shards(
    dir: &Path,
    tensors: &[(String, Tensor)],
    max_shard_bytes: usize,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut shards: Vec<Vec<(String, &Tensor)>> = vec![Vec::new()];
    let mut size = 0;
    for (name, t) in tensors {
        let bytes = t.elem_count() * t.dtype().size_in_bytes();
        if size > 0 && size + bytes > max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        size += bytes;
        if let Some(last) = shards.last_mut() {
            last.push((name.clone(), t));
        }
    }
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut total = 0usize;
    for (i, shard) in shards.iter().enumerate() {
        let file = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", i + 1)
        };
        let path = dir.join(&file);
        let tmp = path.with_extension("tmp");
        safetensors::serialize_to_file(
            shard.iter().map(|(k, t)| (k.clone(), *t)),
            metadata.clone(),
            &tmp,
        )
        .map_err(|e| write_failed(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        for (name, t) in shard {
            total += t.elem_count() * t.dtype().size_in_bytes();
            weight_map.insert(name.clone(), file.clone());
        }
    }
    if n > 1 {
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let text =
            serde_json::to_string_pretty(&index).map_err(|e| ModelError::Input(e.to_string()))?;
        write_atomic(&dir.join("model.safetensors.index.json"), text.as_bytes())?;
    }
    Ok(())
}

/// A failed write (a full disk, most often): the partial file is removed, so that it neither
/// fills the disk further nor passes for a checkpoint.
fn write_failed(tmp: &Path, e: safetensors::SafeTensorError) -> ModelError {
    let _ = std::fs::remove_file(tmp);
    ModelError::SafetensorsWrite {
        path: tmp.to_path_buf(),
        message: e.to_string(),
    }
}

/// Writes tensors under the given names into one safetensors file, atomically.
pub fn write_tensors_file(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    let tmp = path.with_extension("tmp");
    safetensors::serialize_to_file(tensors.iter().map(|(k, t)| (k.clone(), t)), metadata, &tmp)
        .map_err(|e| write_failed(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// The name peft 0.21 saves a tensor of `PeftModel` over transformers 5's
/// `LlavaForConditionalGeneration` under: `base_model.model.` and the module path, which is
/// `model.` before our canonical language-model and projector names
/// (`base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight`; a
/// `modules_to_save` module's tensors under the module's own path).
pub fn peft_name(canonical: &str) -> String {
    format!("base_model.model.model.{canonical}")
}

/// Writes a peft LoRA adapter: `adapter_config.json` for `setting` (peft's fields, the targets
/// as a pattern that matches the language model's layers only, the projector as
/// `modules_to_save`) and `adapter_model.safetensors` holding `tensors` (canonical names:
/// `….lora_A.weight`/`….lora_B.weight` pairs and the projector's weights) under peft's names.
pub fn write_adapter(
    dir: &Path,
    setting: &crate::load::lora::LoraTraining,
    base_model_name_or_path: &str,
    tensors: &[(String, Tensor)],
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let saves_projector = tensors
        .iter()
        .any(|(n, _)| n.starts_with("multi_modal_projector."));
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": setting.r,
        "lora_alpha": setting.lora_alpha,
        "lora_dropout": setting.lora_dropout,
        "use_rslora": setting.use_rslora,
        // LLaVA's find_all_linear_names gives bare names, which on transformers' Llava would
        // also match the vision tower's q/k/v_proj: the pattern keeps them to the decoder.
        "target_modules": format!(".*language_model.*\\.({})", setting.targets.join("|")),
        "bias": "none",
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "use_dora": false,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": if saves_projector {
            serde_json::json!(["multi_modal_projector"])
        } else {
            serde_json::Value::Null
        },
    });
    let text =
        serde_json::to_string_pretty(&config).map_err(|e| ModelError::Input(e.to_string()))?;
    write_atomic(&dir.join("adapter_config.json"), text.as_bytes())?;
    let named: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| (peft_name(n), t.clone()))
        .collect();
    write_tensors_file(&dir.join("adapter_model.safetensors"), &named)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    #[test]
    fn a_failed_write_is_reported_as_a_write() {
        let dir = std::env::temp_dir().join(format!("llava-save-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        // A folder where the temporary file should go: the write fails, as on a full disk.
        let path = dir.join("model.safetensors");
        std::fs::create_dir_all(path.with_extension("tmp")).expect("blocking folder");
        let t = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).expect("tensor");
        let err = write_tensors_file(&path, &[("w".into(), t)]).expect_err("the write fails");
        let written = path.exists();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(matches!(err, ModelError::SafetensorsWrite { .. }), "{err}");
        assert!(err.to_string().contains("could not write"), "{err}");
        assert!(!written);
    }
}
