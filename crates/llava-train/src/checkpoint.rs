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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub step: u64,
    pub epoch: u64,
    /// Records of the current epoch's order already consumed.
    pub position: usize,
    pub elapsed_s: f64,
    /// The ranks of the job that saved it: a resume with another count continues the same
    /// data order in global batches of the new size.
    #[serde(default = "one")]
    pub world_size: usize,
}

fn one() -> usize {
    1
}

impl Default for TrainerState {
    fn default() -> Self {
        Self {
            step: 0,
            epoch: 0,
            position: 0,
            elapsed_s: 0.0,
            world_size: 1,
        }
    }
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
/// `sharded_over`: the ranks of a `--zero` run, which have already written their moments
/// ([`write_optimizer_shard`]); otherwise this writes them all in `optimizer.safetensors`.
#[allow(clippy::too_many_arguments)]
pub fn save_checkpoint(
    dir: &Path,
    source_dir: &Path,
    source: &Weights,
    model_config: &LlavaConfig,
    optimizer: &AdamW,
    state: &TrainerState,
    config: &TrainConfig,
    sharded_over: Option<usize>,
) -> Result<()> {
    let target = staging_dir(dir);
    let in_place = target == dir;
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
    // Moments in the other layout are stale: a resume must never read them.
    for path in optimizer_files_in(&target)? {
        let stale = match sharded_over {
            Some(world) => !optimizer_shard_names(world).contains(&file_name(&path)),
            None => file_name(&path) != OPTIMIZER_FILE,
        };
        if stale {
            std::fs::remove_file(&path).map_err(TrainError::io(&path))?;
        }
    }
    if sharded_over.is_none() {
        write_tensors_file(
            &target.join(OPTIMIZER_FILE),
            &moments(optimizer, save_dtype),
        )?;
    }
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

/// Where a checkpoint is written before it is complete: in place for the output folder of a
/// run (it already holds the log), else `checkpoint-N.partial`, renamed when complete.
pub fn staging_dir(dir: &Path) -> PathBuf {
    let in_place = dir.join("train_log.jsonl").exists() || dir.join("trainer_state.json").exists();
    match in_place {
        true => dir.to_path_buf(),
        false => dir.with_extension("partial"),
    }
}

/// The optimizer's moments of the tensors this rank keeps, named by tensor. Where the weights
/// are saved narrower than their masters (`--save-dtype bf16` under f32 masters), the f32
/// masters go with them (`master.NAME`), so that --resume continues from them exactly.
fn moments(optimizer: &AdamW, save_dtype: Option<SaveDtype>) -> Vec<(String, Tensor)> {
    let mut moments = Vec::new();
    for p in optimizer.params.iter().filter(|p| p.owned) {
        moments.push((format!("exp_avg.{}", p.name), p.exp_avg.clone()));
        moments.push((format!("exp_avg_sq.{}", p.name), p.exp_avg_sq.clone()));
        let master = p.var.as_tensor();
        if save_dtype.is_some_and(|d| d.dtype() != master.dtype()) {
            moments.push((format!("master.{}", p.name), master.detach()));
        }
    }
    moments
}

const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// The moments of a `--zero` run over `world` ranks: one file per rank, as DeepSpeed keeps
/// one per rank (`optimizer-00001-of-00002.safetensors`).
fn optimizer_shard_names(world: usize) -> Vec<String> {
    (0..world)
        .map(|r| format!("optimizer-{:05}-of-{world:05}.safetensors", r))
        .collect()
}

/// Writes this rank's moments (and masters, see [`moments`]) into the checkpoint being written
/// at `target`.
pub fn write_optimizer_shard(
    target: &Path,
    optimizer: &AdamW,
    save_dtype: Option<SaveDtype>,
    rank: usize,
    world: usize,
) -> Result<()> {
    std::fs::create_dir_all(target).map_err(TrainError::io(target))?;
    let name = &optimizer_shard_names(world)[rank];
    write_tensors_file(&target.join(name), &moments(optimizer, save_dtype))?;
    Ok(())
}

/// Every optimizer file in `dir`, of either layout.
fn optimizer_files_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    if !dir.is_dir() {
        return Ok(files);
    }
    for entry in std::fs::read_dir(dir).map_err(TrainError::io(dir))? {
        let path = entry.map_err(TrainError::io(dir))?.path();
        let name = file_name(&path);
        if name.starts_with("optimizer") && name.ends_with(".safetensors") {
            files.push(path);
        }
    }
    Ok(files)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default()
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
/// follows from them: one line per difference, naming the flag and both values. A job with
/// another rank count (`saved_world` → `world`) may change the per-rank batch and the
/// accumulation too: the data order follows the global position, and the caller says what
/// the global batch becomes.
pub fn resume_conflicts(
    saved: &TrainConfig,
    now: &TrainConfig,
    saved_world: usize,
    world: usize,
) -> Vec<String> {
    fn differ<T: PartialEq + std::fmt::Debug>(out: &mut Vec<String>, flag: &str, was: T, is: T) {
        if was != is {
            out.push(format!("{flag} was {was:?}, now {is:?}"));
        }
    }
    let mut conflicts = Vec::new();
    let c = &mut conflicts;
    differ(c, "--stage", saved.stage, now.stage);
    if saved_world == world {
        differ(c, "--batch-size", saved.batch_size, now.batch_size);
        differ(c, "--grad-accum", saved.grad_accum, now.grad_accum);
    } else if saved.group_by_modality_length {
        // The epoch's order is grouped in runs of ranks × batch size.
        let (was, is) = (saved_world * saved.batch_size, world * now.batch_size);
        differ(c, "ranks × --batch-size (grouped by length)", was, is);
    }
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

/// Puts the saved moments back into a fresh optimizer (same trainable set, same names): those
/// of the tensors it keeps, from `optimizer.safetensors` or from the per-rank files of a
/// `--zero` run (`saved_world` ranks, `saved_zero`), whichever the checkpoint's run wrote. So
/// a run may resume with another rank count, sharded or not.
pub fn restore_optimizer(
    dir: &Path,
    optimizer: &mut AdamW,
    step: u64,
    (saved_world, saved_zero): (usize, u8),
    device: &Device,
) -> Result<()> {
    let names = match saved_zero >= 1 && saved_world > 1 {
        true => optimizer_shard_names(saved_world),
        false => vec![OPTIMIZER_FILE.to_string()],
    };
    let paths: Vec<PathBuf> = names.iter().map(|n| dir.join(n)).collect();
    let path = match paths.as_slice() {
        [one] => one.clone(),
        _ => dir.join("optimizer-*.safetensors"),
    };
    let mut saved = std::collections::HashMap::new();
    for file in &paths {
        let tensors =
            candle_core::safetensors::load(file, device).map_err(|e| TrainError::Resume {
                path: file.clone(),
                message: e.to_string(),
            })?;
        let kept = optimizer.params.iter().filter(|p| p.owned);
        let mut wanted: std::collections::HashSet<String> = kept
            .flat_map(|p| {
                [
                    format!("exp_avg.{}", p.name),
                    format!("exp_avg_sq.{}", p.name),
                ]
            })
            .collect();
        // Every tensor's master, whichever rank kept its moments: the weights are the same on
        // every rank.
        wanted.extend(
            optimizer
                .params
                .iter()
                .map(|p| format!("master.{}", p.name)),
        );
        saved.extend(tensors.into_iter().filter(|(n, _)| wanted.contains(n)));
    }
    for p in optimizer.params.iter_mut().filter(|p| p.owned) {
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
        for (what, t) in [("exp_avg", &p.exp_avg), ("exp_avg_sq", &p.exp_avg_sq)] {
            if t.shape() != shape {
                return Err(wrong_shape(&path, what, t, p));
            }
        }
    }
    // Present where the weights were saved narrower than their f32 masters.
    for p in &optimizer.params {
        if let Some(m) = saved.remove(&format!("master.{}", p.name)) {
            if m.shape() != p.var.as_tensor().shape() {
                return Err(wrong_shape(&path, "master", &m, p));
            }
            p.var.set(&m.to_dtype(p.var.dtype())?)?;
        }
    }
    optimizer.step = step;
    Ok(())
}

fn wrong_shape(path: &Path, what: &str, t: &Tensor, p: &Param) -> TrainError {
    TrainError::Resume {
        path: path.to_path_buf(),
        message: format!(
            "has {what} of shape {:?} for `{}`, which is {:?}: was it saved for another model?",
            t.dims(),
            p.name,
            p.var.as_tensor().dims()
        ),
    }
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
        let err = restore_optimizer(dir.path(), &mut optimizer, 1, (1, 0), &cpu)
            .expect_err("a shape mismatch is an error")
            .to_string();
        assert!(err.contains("exp_avg of shape [3, 2] for `w`"), "{err}");
    }

    /// The same ranks keep the batch shape; another rank count may change it, unless the
    /// order is grouped by length in runs of ranks × batch size.
    #[test]
    fn another_rank_count_may_change_the_batch_shape_unless_grouped() {
        let saved = TrainConfig {
            stage: Stage::Finetune,
            epochs: 1,
            max_steps: None,
            batch_size: 1,
            grad_accum: 1,
            lr: 1e-3,
            projector_lr: None,
            cosine: true,
            warmup_ratio: 0.0,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            seed: 42,
            shuffle: true,
            group_by_modality_length: false,
            save_steps: None,
            unfreeze_vision: false,
            gradient_checkpointing: false,
            lora: None,
            bits: None,
            bf16: false,
            save_dtype: None,
            zero: 1,
        };
        let now = TrainConfig {
            grad_accum: 2,
            zero: 0,
            ..saved.clone()
        };
        assert_eq!(
            resume_conflicts(&saved, &now, 2, 2),
            vec!["--grad-accum was 1, now 2".to_string()]
        );
        assert!(resume_conflicts(&saved, &now, 2, 1).is_empty());
        let grouped = |c: &TrainConfig, batch_size| TrainConfig {
            group_by_modality_length: true,
            batch_size,
            ..c.clone()
        };
        let (saved, now) = (grouped(&saved, 1), grouped(&now, 2));
        assert!(resume_conflicts(&saved, &now, 2, 1).is_empty());
        assert_eq!(
            resume_conflicts(&saved, &grouped(&now, 1), 2, 1),
            vec!["ranks × --batch-size (grouped by length) was 2, now 1".to_string()]
        );
    }
}
