//! The training loop for both stages: freezing rules, gradient accumulation, clipping, the
//! schedule, AdamW, per-step logs, checkpoints and exact resume.

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use llava_model::language_model::KvCache;
use llava_model::loss::causal_lm_loss_from_hidden;
use llava_model::nn::Mode;
use llava_model::{Llava, LlavaConfig};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{TrainerState, save_checkpoint, staging_dir, write_optimizer_shard};
use crate::collective::{Collective, push_gradient, summed_gradient};
use crate::data::{Batch, DataStats, Item, TrainDataset, group_by_modality_length};
use crate::error::{Result, TrainError};
use crate::optim::AdamW;
use crate::schedule::{Schedule, lr_at, warmup_steps};

/// The mean cross-entropy of `batch` over its supervised tokens, and their count: the images
/// through the vision tower (frozen unless `unfreeze_vision`), the projector and, for
/// LLaVA-NeXT, the packing of each image's tiles; then the decoder in training mode.
pub fn batch_loss(model: &Llava, batch: &Batch, unfreeze_vision: bool) -> Result<(Tensor, usize)> {
    let features = match &batch.images {
        Some(images) => {
            let tiles = images.all_tiles()?;
            let z = if unfreeze_vision {
                model.vision_features(&tiles, Mode::Train)?
            } else {
                // A frozen tower needs no graph: the fast fused kernels, detached.
                model.vision_features(&tiles, Mode::Infer)?.detach()
            };
            Some(model.project_and_pack(&z, images)?)
        }
        None => None,
    };
    let embeds = model.embed(&batch.input_ids, features.as_ref())?;
    let hidden = model.language_model.forward(
        &embeds,
        Some(&batch.attention_mask),
        &mut KvCache::new(),
        Mode::Train,
    )?;
    Ok(causal_lm_loss_from_hidden(
        &hidden,
        &model.language_model.lm_head,
        &batch.labels,
    )?)
}

/// Which parts train. The vision tower is frozen in both stages unless asked otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Stage 1, feature alignment: the projector only.
    Pretrain,
    /// Stage 2, end-to-end fine-tuning: projector and language model.
    Finetune,
}

impl Stage {
    pub fn trains(&self, name: &str, unfreeze_vision: bool) -> bool {
        let projector = name.starts_with("multi_modal_projector.");
        // LLaVA-NeXT's row separator trains with the language model, as in its own trainer.
        let language = name.starts_with("language_model.")
            || name.starts_with("lm_head.")
            || name == "image_newline";
        let vision = unfreeze_vision && name.starts_with("vision_tower.");
        match self {
            Stage::Pretrain => projector || vision,
            Stage::Finetune => projector || language || vision,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    pub stage: Stage,
    pub epochs: u64,
    pub max_steps: Option<u64>,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub projector_lr: Option<f64>,
    pub cosine: bool,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub seed: u64,
    pub shuffle: bool,
    /// Batches of one modality and similar length (LLaVA's `group_by_modality_length`).
    #[serde(default)]
    pub group_by_modality_length: bool,
    pub save_steps: Option<u64>,
    pub unfreeze_vision: bool,
    /// Recompute each decoder layer in backward instead of keeping its activations.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// `--lora`: the language model trains as LoRA pairs, the projector in full.
    #[serde(default)]
    pub lora: Option<LoraSettings>,
    /// `--bits`: QLoRA's frozen base in 4 or 8 bits.
    #[serde(default)]
    pub bits: Option<u8>,
    /// `--bf16`: mixed precision. Frozen weights and activations in bf16, the products in bf16
    /// with f32 sums; the trainable weights' f32 masters, their gradients and AdamW's moments
    /// in f32; norms, the attention softmax and the loss upcast to f32.
    #[serde(default)]
    pub bf16: bool,
    /// `--save-dtype`: the dtype of the weights each save writes; `None` keeps the trained
    /// weights in f32 and the frozen ones as stored.
    #[serde(default)]
    pub save_dtype: Option<SaveDtype>,
    /// `--zero 1`: each rank keeps the AdamW moments of its share of the tensors only
    /// ([`crate::zero`]); 0 keeps them all everywhere.
    #[serde(default)]
    pub zero: u8,
}

/// The dtype of saved weights (`--save-dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SaveDtype {
    Bf16,
    F32,
}

impl SaveDtype {
    pub fn dtype(self) -> DType {
        match self {
            SaveDtype::Bf16 => DType::BF16,
            SaveDtype::F32 => DType::F32,
        }
    }
}

/// The LoRA shape of a run, kept in its trainer state so that a resume keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSettings {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
}

/// The key of one micro-batch's dropout masks: from the seed, the step, the rank and the
/// micro-batch alone, so a resumed run draws the masks the uninterrupted run drew, and ranks
/// draw their own.
fn dropout_key(seed: u64, step: u64, rank: usize, micro: usize) -> u64 {
    seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (step << 32) ^ ((rank as u64) << 16) ^ micro as u64
}

/// One line of `train_log.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepLog {
    pub step: u64,
    pub epoch: f64,
    /// Mean cross-entropy over the supervised tokens of this step's batch, before the update.
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: usize,
    pub elapsed_s: f64,
    /// Seconds of this step spent in the sums between ranks (0 for one process).
    #[serde(default)]
    pub comm_s: f64,
}

impl StepLog {
    /// Appends this step as one line of `train_log.jsonl` and flushes, so a killed run keeps it.
    pub fn append_to(&self, log: &mut std::fs::File, path: &Path) -> Result<()> {
        let line = serde_json::to_string(self).map_err(|e| TrainError::Data(e.to_string()))?;
        writeln!(log, "{line}")
            .and_then(|_| log.flush())
            .map_err(TrainError::io(path))
    }
}

pub struct Trainer<'a> {
    pub model: Llava,
    pub config: TrainConfig,
    pub model_config: LlavaConfig,
    pub optimizer: AdamW,
    pub state: TrainerState,
    pub data: &'a TrainDataset,
    pub output: PathBuf,
    /// Where the untrained weights come from, for the frozen parts of each saved checkpoint.
    pub source: &'a llava_model::weights::Weights,
    pub source_dir: PathBuf,
    pub device: Device,
    pub stats: DataStats,
    /// The job's ranks ([`crate::collective::SingleProcess`] alone): each takes its slice of
    /// every global batch, and rank 0 writes the log and the checkpoints.
    pub collective: &'a dyn Collective,
    /// The run as `loss.png`'s title names it: stage, model, data.
    pub title: String,
}

impl Trainer<'_> {
    /// Optimizer steps in the whole run (`--max-steps`, or epochs × batches per epoch).
    pub fn total_steps(&self) -> u64 {
        // The global batch, as the HF Trainer counts it: ranks × batch size × accumulation.
        let per_step =
            (self.collective.world_size() * self.config.batch_size * self.config.grad_accum).max(1)
                as u64;
        let per_epoch = (self.data.records.len() as u64).div_ceil(per_step).max(1);
        self.config
            .max_steps
            .unwrap_or(per_epoch * self.config.epochs)
    }

    /// Runs until the step budget is spent, calling `on_step` after every optimizer step.
    pub fn train(&mut self, mut on_step: impl FnMut(&StepLog)) -> Result<()> {
        if self.config.gradient_checkpointing {
            self.model.language_model.enable_gradient_checkpointing()?;
        }
        let total = self.total_steps();
        let warmup = warmup_steps(self.config.warmup_ratio, total);
        let schedule = if self.config.cosine {
            Schedule::Cosine
        } else {
            Schedule::Constant
        };
        let clock = std::time::Instant::now();
        // Time spent before a resume; checkpoints store the running total.
        let elapsed_before = self.state.elapsed_s;
        let log_path = self.output.join("train_log.jsonl");
        let writes = self.collective.rank() == 0;
        let mut log = match writes {
            true => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log_path)
                    .map_err(TrainError::io(&log_path))?,
            ),
            false => None,
        };
        let world = self.collective.world_size();
        self.state.world_size = world;
        // Recomputed only when the epoch changes: grouping reads every record's length.
        let mut epoch_order: Option<(u64, Vec<usize>)> = None;
        // Under ranks, an epoch that ends without a step had no usable record anywhere.
        let mut epoch_start_step = self.state.step;
        while self.state.step < total {
            if epoch_order.as_ref().map(|(e, _)| *e) != Some(self.state.epoch) {
                epoch_order = Some((self.state.epoch, self.epoch_order()));
            }
            let order = epoch_order.as_ref().map_or(&[][..], |(_, o)| o.as_slice());
            let mut micro = Vec::new();
            if world > 1 && self.state.position >= order.len() {
                if self.state.step == epoch_start_step {
                    return Err(TrainError::Data(
                        "no usable record in the dataset (every one was skipped)".into(),
                    ));
                }
                epoch_start_step = self.state.step;
                self.state.epoch += 1;
                self.state.position = 0;
                continue;
            }
            for _ in 0..self.config.grad_accum.max(1) {
                if world > 1 {
                    // A rank whose slice held only bad records still joins the step's sums.
                    if self.state.position >= order.len() {
                        break;
                    }
                    let items = self.rank_items(order)?;
                    if !items.is_empty() {
                        micro.push(self.data.collate(&items, &self.device)?);
                    }
                    continue;
                }
                let items = self.next_items(order)?;
                if items.is_empty() {
                    break;
                }
                micro.push(self.data.collate(&items, &self.device)?);
            }
            if micro.is_empty() && world == 1 {
                if self.state.position == 0 {
                    return Err(TrainError::Data(
                        "no usable record in the dataset (every one was skipped)".into(),
                    ));
                }
                self.state.epoch += 1;
                self.state.position = 0;
                continue;
            }
            let lr = lr_at(schedule, self.config.lr, self.state.step, warmup, total);
            let Some((loss, grad_norm, tokens, comm_s)) = self.step(&micro, lr)? else {
                // No rank had a supervised token (every record of the global batch was bad).
                continue;
            };
            self.state.step += 1;
            let entry = StepLog {
                step: self.state.step,
                epoch: self.state.epoch as f64
                    + self.state.position as f64 / order.len().max(1) as f64,
                loss,
                lr,
                grad_norm,
                tokens,
                elapsed_s: elapsed_before + clock.elapsed().as_secs_f64(),
                comm_s,
            };
            if let Some(log) = &mut log {
                entry.append_to(log, &log_path)?;
            }
            on_step(&entry);
            if self.state.position >= order.len() {
                self.state.epoch += 1;
                self.state.position = 0;
            }
            let save_now = self
                .config
                .save_steps
                .is_some_and(|n| n > 0 && self.state.step.is_multiple_of(n));
            // Under --zero every rank writes its moments; otherwise rank 0 writes everything.
            if save_now && self.state.step < total && (writes || self.sharded()) {
                self.state.elapsed_s = entry.elapsed_s;
                let dir = self.output.join(format!("checkpoint-{}", self.state.step));
                self.save(&dir)?;
            }
        }
        self.state.elapsed_s = elapsed_before + clock.elapsed().as_secs_f64();
        let output = self.output.clone();
        match writes || self.sharded() {
            true => self.save(&output),
            false => Ok(()),
        }
    }

    /// Whether the optimizer state is split over the ranks (`--zero 1` with more than one).
    fn sharded(&self) -> bool {
        self.config.zero >= 1 && self.collective.world_size() > 1
    }

    /// The record order of the current epoch, from the seed alone (so a resume sees it again).
    fn epoch_order(&self) -> Vec<usize> {
        let c = &self.config;
        let order = self.data.order(c.seed, self.state.epoch, c.shuffle);
        if c.group_by_modality_length {
            let epoch = self.state.epoch;
            // As LLaVA's sampler, by the ranks' batches together: every rank of a step then
            // holds the same modality, and lengths sorted across them.
            let unit = c.batch_size * self.collective.world_size();
            group_by_modality_length(&self.data.records, &order, unit, c.seed, epoch)
        } else {
            order
        }
    }

    /// The next `batch_size` usable items of this epoch, skipping bad records.
    fn next_items(&mut self, order: &[usize]) -> Result<Vec<Item>> {
        let mut items = Vec::with_capacity(self.config.batch_size);
        while items.len() < self.config.batch_size && self.state.position < order.len() {
            let index = order[self.state.position];
            self.state.position += 1;
            if let Some(item) = self.data.item(index, &mut self.stats)? {
                items.push(item);
            }
        }
        Ok(items)
    }

    /// This rank's slice of the next global micro-batch (`world × batch_size` positions of the
    /// order): positions `rank·batch_size ..`, bad records skipped without a replacement, so
    /// that every rank moves through the order alike.
    fn rank_items(&mut self, order: &[usize]) -> Result<Vec<Item>> {
        let bs = self.config.batch_size;
        let start = (self.state.position + self.collective.rank() * bs).min(order.len());
        let end = (start + bs).min(order.len());
        self.state.position =
            (self.state.position + self.collective.world_size() * bs).min(order.len());
        let mut items = Vec::with_capacity(bs);
        for &index in &order[start..end] {
            if let Some(item) = self.data.item(index, &mut self.stats)? {
                items.push(item);
            }
        }
        Ok(items)
    }

    /// Accumulates gradients over the micro-batches (of every rank) so that the result is the
    /// gradient of the mean loss over every supervised token of the global step, then clips and
    /// updates; `None` when the global step has no supervised token. Each micro-batch's loss is
    /// weighted by its share of the global count, so ranks holding different token counts give
    /// the update of one process that saw the whole batch.
    /// Also returns the seconds spent in the sums between ranks.
    fn step(&mut self, micro: &[Batch], lr: f64) -> Result<Option<(f64, f64, usize, f64)>> {
        let local: usize = micro.iter().map(|b| b.supervised_tokens).sum();
        let mut counts = [local as f64];
        let mut comm = std::time::Duration::ZERO;
        let started = std::time::Instant::now();
        self.collective.all_reduce_sum_f64(&mut counts)?;
        comm += started.elapsed();
        let total_supervised = counts[0] as usize;
        if total_supervised == 0 {
            return Ok(None);
        }
        // Only the trainable parameters' gradients are kept between micro-batches.
        let mut grads = GradStore::default();
        let mut loss_sum = 0f64;
        let mut tokens = 0;
        for (i, batch) in micro.iter().enumerate() {
            if let Some(lora) = self.source.lora_training() {
                let rank = self.collective.rank();
                let key = dropout_key(self.config.seed, self.state.step, rank, i);
                lora.dropout_key.set(Some(key));
            }
            let (loss, n) = self.loss(batch)?;
            tokens += batch.tokens;
            let weight = n as f64 / total_supervised.max(1) as f64;
            loss_sum += loss.to_scalar::<f32>()? as f64 * weight;
            let mut micro_grads = (loss * weight)?.backward()?;
            // Under gradient checkpointing the layers' weights get theirs here.
            self.model
                .language_model
                .add_recomputed_grads(&mut micro_grads)?;
            for p in &self.optimizer.params {
                let t = p.var.as_tensor();
                if let Some(g) = micro_grads.get(t) {
                    let g = match grads.remove(t) {
                        Some(prev) => (prev + g)?,
                        None => g.clone(),
                    };
                    grads.insert(t, g);
                }
            }
        }
        let max_norm = self.config.max_grad_norm;
        if self.collective.world_size() > 1 {
            let started = std::time::Instant::now();
            let mut sums = [loss_sum, tokens as f64];
            self.collective.all_reduce_sum_f64(&mut sums)?;
            (loss_sum, tokens) = (sums[0], sums[1] as usize);
            comm += started.elapsed();
        }
        let grad_norm = if self.sharded() {
            let c = self.collective;
            let (norm, sums) = crate::zero::step(&mut self.optimizer, &mut grads, c, lr, max_norm)?;
            comm += sums;
            norm
        } else {
            if self.collective.world_size() > 1 {
                let started = std::time::Instant::now();
                self.all_reduce_grads(&mut grads)?;
                comm += started.elapsed();
            }
            self.optimizer.clip_and_step(&grads, lr, max_norm)?
        };
        Ok(Some((loss_sum, grad_norm, tokens, comm.as_secs_f64())))
    }

    /// Sums every trainable parameter's gradient over the ranks, in one flat f32 buffer with one
    /// more value per parameter that counts the ranks holding a gradient for it: a parameter no
    /// rank reached (LLaVA-NeXT's row separator in a text-only step) stays without one, as in a
    /// single process, and AdamW leaves it alone.
    fn all_reduce_grads(&self, grads: &mut GradStore) -> Result<()> {
        let params = &self.optimizer.params;
        let mut flat = Vec::new();
        for p in params {
            let t = p.var.as_tensor();
            push_gradient(&mut flat, grads.get(t), t.elem_count())?;
        }
        self.collective.all_reduce_sum_f32(&mut flat)?;
        let mut at = 0;
        for p in params {
            let t = p.var.as_tensor();
            let n = t.elem_count();
            if let Some(g) = summed_gradient(&flat[at..at + n + 1], t)? {
                grads.insert(t, g);
            }
            at += n + 1;
        }
        Ok(())
    }

    fn loss(&self, batch: &Batch) -> Result<(Tensor, usize)> {
        batch_loss(&self.model, batch, self.config.unfreeze_vision)
    }

    /// Under `--zero` every rank writes its moments into the checkpoint first, and rank 0
    /// completes it once they all have.
    fn save(&self, dir: &Path) -> Result<()> {
        let shards = self.sharded().then(|| self.collective.world_size());
        if let Some(world) = shards {
            let rank = self.collective.rank();
            let save_dtype = self.config.save_dtype;
            write_optimizer_shard(&staging_dir(dir), &self.optimizer, save_dtype, rank, world)?;
            self.collective.barrier()?;
            if rank != 0 {
                return Ok(());
            }
        }
        let log = self.output.join("train_log.jsonl");
        crate::plot::plot_log(&log, &self.output.join("loss.png"), &self.title)?;
        save_checkpoint(
            dir,
            &self.source_dir,
            self.source,
            &self.model_config,
            &self.optimizer,
            &self.state,
            &self.config,
            shards,
        )
    }
}
