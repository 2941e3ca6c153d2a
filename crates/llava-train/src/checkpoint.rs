//! Checkpoints in the HF llava layout (so `llava generate` and transformers load them), plus
//! what an exact resume needs: optimizer moments and the trainer state (step, epoch, position
//! in the epoch's seeded order).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use llava_model::LlavaConfig;
use llava_model::save::{
    write_adapter, write_atomic, write_config, write_safetensors, write_tensors_file,
};
use llava_model::weights::Weights;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::optim::{AdamW, Param};
use crate::trainer::{SaveDtype, Stage, TrainConfig};

/// Where training stands; with the seed this fixes the data order of every epoch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub step: u64,
    pub epoch: u64,
    /// Records of the current epoch's order already consumed.
    pub position: usize,
    pub elapsed_s: f64,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    state: TrainerState,
    config: TrainConfig,
}

/// The files besides the weights that make a checkpoint directory usable on its own.
const SIDE_FILES: [&str; 10] = [
    "tokenizer.json",
    // A base with a SentencePiece tokenizer only (Vicuna, the original releases).
    "tokenizer.model",
    "added_tokens.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
];

/// Saves the model (trained weights from the optimizer, frozen ones copied as stored, so they
/// stay bit-identical), config, tokenizer/processor files, optimizer state and trainer state.
/// A LoRA run (`source` carries a LoRA setting) saves a peft adapter instead of the model: the
/// pairs and the projector ([`write_adapter`]), loadable over the base at every save.
/// A `checkpoint-N` directory is written under a temporary name and renamed when complete.
pub fn save_checkpoint(
    dir: &Path,
    source_dir: &Path,
    source: &Weights,
    model_config: &LlavaConfig,
    optimizer: &AdamW,
    state: &TrainerState,
    config: &TrainConfig,
) -> Result<()> {
    let in_place = dir.join("train_log.jsonl").exists() || dir.join("trainer_state.json").exists();
    let target = if in_place {
        dir.to_path_buf()
    } else {
        dir.with_extension("partial")
    };
    let save_dtype = config.save_dtype;
    let tensors = match source.lora_training() {
        Some(lora) => {
            let tensors = optimizer
                .params
                .iter()
                .map(|p| Ok((p.name.clone(), in_dtype(p.var.as_tensor(), save_dtype)?)))
                .collect::<Result<Vec<(String, Tensor)>>>()?;
            write_adapter(&target, lora, &source_dir.to_string_lossy(), &tensors)?;
            write_config(&target, model_config)?;
            copy_side_files(&target, source_dir)?;
            tensors
        }
        None => write_model(
            &target,
            source_dir,
            source,
            model_config,
            &optimizer.params,
            save_dtype,
        )?,
    };
    if config.stage == Stage::Pretrain {
        let projector: Vec<(String, Tensor)> = tensors
            .iter()
            .filter(|(n, _)| n.starts_with("multi_modal_projector."))
            .cloned()
            .collect();
        write_tensors_file(&target.join("projector.safetensors"), &projector)?;
    }
    let mut moments = Vec::new();
    for p in &optimizer.params {
        moments.push((format!("exp_avg.{}", p.name), p.exp_avg.clone()));
        moments.push((format!("exp_avg_sq.{}", p.name), p.exp_avg_sq.clone()));
        // Weights saved narrower than their master (`--save-dtype bf16` under f32 masters):
        // the f32 master goes with the moments, so that --resume continues from it exactly.
        let master = p.var.as_tensor();
        if save_dtype.is_some_and(|d| d.dtype() != master.dtype()) {
            moments.push((format!("master.{}", p.name), master.detach()));
        }
    }
    write_tensors_file(&target.join("optimizer.safetensors"), &moments)?;
    let state_json = serde_json::to_string_pretty(&StateFile {
        state: state.clone(),
        config: config.clone(),
    })
    .map_err(|e| TrainError::Data(e.to_string()))?;
    write_atomic(&target.join("trainer_state.json"), state_json.as_bytes())?;
    if !in_place {
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(TrainError::io(dir))?;
        }
        std::fs::rename(&target, dir).map_err(TrainError::io(dir))?;
    }
    Ok(())
}

/// `t` detached, in the save dtype if one is asked for.
fn in_dtype(t: &Tensor, save_dtype: Option<SaveDtype>) -> Result<Tensor> {
    Ok(match save_dtype {
        Some(d) => t.detach().to_dtype(d.dtype())?,
        None => t.detach(),
    })
}

/// Writes a loadable HF-layout model into `target`: the `trained` parameters as they are now,
/// every other weight copied as stored (so frozen parts stay bit-identical), the config, and the
/// tokenizer and processor files of `source_dir`. With `save_dtype` every weight is written in
/// that dtype. Returns the tensors written.
pub fn write_model(
    target: &Path,
    source_dir: &Path,
    source: &Weights,
    model_config: &LlavaConfig,
    trained: &[Param],
    save_dtype: Option<SaveDtype>,
) -> Result<Vec<(String, Tensor)>> {
    std::fs::create_dir_all(target).map_err(TrainError::io(target))?;
    let trained: std::collections::HashMap<&str, &Tensor> = trained
        .iter()
        .map(|p| (p.name.as_str(), p.var.as_tensor()))
        .collect();
    let mut tensors = Vec::new();
    for name in source.names() {
        let t = match trained.get(name) {
            Some(t) => in_dtype(t, save_dtype)?,
            None => in_dtype(&source.get_stored(name)?, save_dtype)?,
        };
        tensors.push((name.to_string(), t));
    }
    write_safetensors(target, &tensors, 2 << 30)?;
    write_config(target, model_config)?;
    copy_side_files(target, source_dir)?;
    Ok(tensors)
}

/// Copies the tokenizer and processor files of `source_dir` into `target`.
fn copy_side_files(target: &Path, source_dir: &Path) -> Result<()> {
    for f in SIDE_FILES {
        let from = source_dir.join(f);
        if from.is_file() && from != target.join(f) {
            std::fs::copy(&from, target.join(f)).map_err(TrainError::io(&from))?;
        }
    }
    Ok(())
}

/// The settings a resumed run must keep, because the data order or the set of trained tensors
/// follows from them: one line per difference, naming the flag and both values.
pub fn resume_conflicts(saved: &TrainConfig, now: &TrainConfig) -> Vec<String> {
    fn differ<T: PartialEq + std::fmt::Debug>(out: &mut Vec<String>, flag: &str, was: T, is: T) {
        if was != is {
            out.push(format!("{flag} was {was:?}, now {is:?}"));
        }
    }
    let mut conflicts = Vec::new();
    let c = &mut conflicts;
    differ(c, "--stage", saved.stage, now.stage);
    differ(c, "--batch-size", saved.batch_size, now.batch_size);
    differ(c, "--grad-accum", saved.grad_accum, now.grad_accum);
    differ(c, "--seed", saved.seed, now.seed);
    differ(c, "shuffling (--no-shuffle)", saved.shuffle, now.shuffle);
    let (was, is) = (saved.group_by_modality_length, now.group_by_modality_length);
    differ(c, "--group-by-modality-length", was, is);
    differ(
        c,
        "--unfreeze-vision",
        saved.unfreeze_vision,
        now.unfreeze_vision,
    );
    differ(c, "--lora (r, alpha, dropout)", &saved.lora, &now.lora);
    differ(c, "--bits", saved.bits, now.bits);
    conflicts
}

/// Reads a checkpoint's trainer state.
pub fn read_state(dir: &Path) -> Result<(TrainerState, TrainConfig)> {
    let path = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&path).map_err(TrainError::io(&path))?;
    let file: StateFile = serde_json::from_str(&text).map_err(|e| TrainError::Resume {
        path: path.clone(),
        message: format!("not a trainer state: {e}"),
    })?;
    Ok((file.state, file.config))
}

/// Puts the saved moments back into a fresh optimizer (same trainable set, same names).
pub fn restore_optimizer(
    dir: &Path,
    optimizer: &mut AdamW,
    step: u64,
    device: &Device,
) -> Result<()> {
    let path = dir.join("optimizer.safetensors");
    let mut saved =
        candle_core::safetensors::load(&path, device).map_err(|e| TrainError::Resume {
            path: path.clone(),
            message: e.to_string(),
        })?;
    for p in &mut optimizer.params {
        let missing = |what: &str| TrainError::Resume {
            path: path.clone(),
            message: format!(
                "has no {what} for `{}`: was it saved by a run with the same stage?",
                p.name
            ),
        };
        p.exp_avg = saved
            .remove(&format!("exp_avg.{}", p.name))
            .ok_or_else(|| missing("exp_avg"))?;
        p.exp_avg_sq = saved
            .remove(&format!("exp_avg_sq.{}", p.name))
            .ok_or_else(|| missing("exp_avg_sq"))?;
        let shape = p.var.as_tensor().shape();
        // Present where the weights were saved narrower than the f32 master.
        let master = saved.remove(&format!("master.{}", p.name));
        let mut checked = vec![("exp_avg", &p.exp_avg), ("exp_avg_sq", &p.exp_avg_sq)];
        if let Some(m) = &master {
            checked.push(("master", m));
        }
        for (what, t) in checked {
            if t.shape() != shape {
                return Err(TrainError::Resume {
                    path: path.clone(),
                    message: format!(
                        "has {what} of shape {:?} for `{}`, which is {:?}: was it saved for another model?",
                        t.dims(),
                        p.name,
                        shape.dims()
                    ),
                });
            }
        }
        if let Some(m) = master {
            p.var.set(&m.to_dtype(p.var.dtype())?)?;
        }
    }
    optimizer.step = step;
    Ok(())
}

/// Drops log lines past `step`: they came from steps the killed run took after its last save,
/// which the resumed run takes again.
pub fn truncate_log(output: &Path, step: u64) -> Result<()> {
    let path: PathBuf = output.join("train_log.jsonl");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    write_atomic(&path, kept.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::AdamWConfig;
    use candle_core::{Tensor, Var};

    #[test]
    fn moments_of_another_shape_are_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cpu = Device::Cpu;
        let wrong = Tensor::zeros((3, 2), candle_core::DType::F32, &cpu).expect("zeros");
        let saved = std::collections::HashMap::from([
            ("exp_avg.w".to_string(), wrong.clone()),
            ("exp_avg_sq.w".to_string(), wrong),
        ]);
        candle_core::safetensors::save(&saved, dir.path().join("optimizer.safetensors"))
            .expect("save");
        let var = Var::zeros((2, 3), candle_core::DType::F32, &cpu).expect("var");
        let mut optimizer =
            AdamW::new(vec![("w".into(), var)], AdamWConfig::default()).expect("optimizer");
        let err = restore_optimizer(dir.path(), &mut optimizer, 1, &cpu)
            .expect_err("a shape mismatch is an error")
            .to_string();
        assert!(err.contains("exp_avg of shape [3, 2] for `w`"), "{err}");
    }
}
