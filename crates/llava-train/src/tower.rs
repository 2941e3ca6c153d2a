//! Supervised dense pretraining of the vision tower alone, for a tower that does not arrive
//! pretrained (the demo trains one from scratch; LLaVA's CLIP tower comes from 400M
//! image-caption pairs).
//!
//! Linear heads read the features the projector will read (the tower's `vision_feature_layer`,
//! after `vision_feature_select_strategy`): patch tasks classify each feature, region tasks
//! classify the mean feature of a region's positions (an object's patches). The loss is the sum
//! of the tasks' mean cross-entropies, each times its weight. Only the tower and the heads
//! train; the heads are thrown away, and the output is the input checkpoint with a trained
//! tower.

use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::{D, DType, Device, Tensor, Var};
use llava_model::loss::cross_entropy;
use llava_model::nn::{Linear, Mode};
use llava_model::pipeline::{image_processor, pixel_tensor};
use llava_model::{Checkpoint, Llava};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::checkpoint::write_model;
use crate::error::{Result, TrainError};
use crate::optim::{AdamW, AdamWConfig};
use crate::schedule::{Schedule, lr_at, warmup_steps};
use crate::trainer::StepLog;

/// One classification task over the tower's features.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PatchTask {
    pub name: String,
    pub classes: usize,
    /// Class 0 means "nothing here", so held-out accuracy is also given without those positions.
    pub background: bool,
    /// The factor on this task's mean cross-entropy in the summed loss. A task that the others
    /// outpace (shape, behind colour) can be weighted up.
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

/// The tasks of a pretraining run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TowerTasks {
    /// One class per feature position.
    pub patch: Vec<PatchTask>,
    /// One class per region, from the mean of its positions' features.
    pub region: Vec<PatchTask>,
}

/// A region of a picture: the feature positions it covers and, per region task, its class.
pub type Region = (Vec<usize>, Vec<u32>);

/// An image and its labels.
#[derive(Debug, Clone)]
pub struct PatchExample {
    pub image: PathBuf,
    /// Per patch task, one class for each feature position.
    pub labels: Vec<Vec<u32>>,
    /// Regions: the feature positions each covers and, per region task, its class.
    pub regions: Vec<Region>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TowerPretrainConfig {
    pub steps: u64,
    pub batch_size: usize,
    pub lr: f64,
    pub warmup_ratio: f64,
    pub max_grad_norm: f64,
    pub seed: u64,
}

/// Held-out accuracy of one task's head.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskAccuracy {
    pub task: String,
    pub accuracy: f64,
    /// On positions whose label is not background, for tasks that have one.
    pub foreground_accuracy: Option<f64>,
}

/// Pretrains the tower of `checkpoint` on `train`, writes the checkpoint with the trained tower
/// to `output` (with a `train_log.jsonl` in the trainer's format) and returns the heads'
/// accuracy on `held_out`.
pub fn pretrain_tower(
    checkpoint: &Checkpoint,
    output: &Path,
    tasks: &TowerTasks,
    train: &[PatchExample],
    held_out: &[PatchExample],
    config: &TowerPretrainConfig,
    mut on_step: impl FnMut(&StepLog),
) -> Result<Vec<TaskAccuracy>> {
    if train.is_empty() || config.batch_size == 0 || config.steps == 0 {
        return Err(TrainError::Data(
            "tower pretraining needs examples, steps and a batch of at least 1".into(),
        ));
    }
    let device = Device::Cpu;
    let mut weights = checkpoint.weights(DType::F32, &device)?;
    weights.set_trainable(|n| n.starts_with("vision_tower."));
    let model = Llava::load(&checkpoint.config, &weights)?;
    let positions = checkpoint.config.image_seq_len();
    let width = checkpoint.config.projector_input_size();
    for e in train.iter().chain(held_out) {
        check_example(e, tasks, positions)?;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(config.seed);
    let mut vars = weights.take_vars();
    let heads = tasks
        .patch
        .iter()
        .chain(&tasks.region)
        .map(|t| head(t, width, &mut rng, &device, &mut vars))
        .collect::<Result<Vec<_>>>()?;
    let mut optimizer = AdamW::new(
        vars,
        AdamWConfig {
            lr: config.lr,
            ..Default::default()
        },
    )?;
    let processor = image_processor(checkpoint, None)?;
    let pixels = |batch: &[&PatchExample]| -> Result<Tensor> {
        let p = batch
            .iter()
            .map(|e| processor.preprocess_path(&e.image))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| TrainError::Data(e.to_string()))?;
        Ok(pixel_tensor(&p, &device)?)
    };

    std::fs::create_dir_all(output).map_err(TrainError::io(output))?;
    let log_path = output.join("train_log.jsonl");
    let mut log = std::fs::File::create(&log_path).map_err(TrainError::io(&log_path))?;
    let warmup = warmup_steps(config.warmup_ratio, config.steps);
    let clock = std::time::Instant::now();
    let mut order: Vec<usize> = Vec::new();
    for step in 0..config.steps {
        if order.len() < config.batch_size {
            let mut fresh: Vec<usize> = (0..train.len()).collect();
            fresh.shuffle(&mut rng);
            order.extend(fresh);
        }
        let batch: Vec<&PatchExample> = order
            .drain(..config.batch_size.min(order.len()))
            .map(|i| &train[i])
            .collect();
        let features = model
            .vision_features(&pixels(&batch)?, Mode::Train)?
            .reshape((batch.len() * positions, width))?;
        let mut loss = Tensor::zeros((), DType::F32, &device)?;
        let weights = tasks.patch.iter().chain(&tasks.region).map(|t| t.weight);
        for ((head, (input, targets)), weight) in heads
            .iter()
            .zip(head_inputs(&batch, &features, tasks)?)
            .zip(weights)
        {
            loss = (loss + (cross_entropy(&head.forward(&input)?, &targets)? * weight)?)?;
        }
        let loss_value = loss.to_scalar::<f32>()? as f64;
        let grads: GradStore = loss.backward()?;
        let lr = lr_at(Schedule::Cosine, config.lr, step, warmup, config.steps);
        let grad_norm = optimizer.clip_and_step(&grads, lr, config.max_grad_norm)?;
        let entry = StepLog {
            step: step + 1,
            epoch: ((step + 1) as usize * config.batch_size) as f64 / train.len() as f64,
            loss: loss_value,
            lr,
            grad_norm,
            tokens: batch.len() * positions,
            elapsed_s: clock.elapsed().as_secs_f64(),
            comm_s: 0.0,
        };
        entry.append_to(&mut log, &log_path)?;
        on_step(&entry);
    }

    let accuracy = evaluate(&model, tasks, &heads, held_out, &pixels)?;
    let tower: Vec<_> = optimizer
        .params
        .into_iter()
        .filter(|p| p.name.starts_with("vision_tower."))
        .collect();
    write_model(
        output,
        &checkpoint.dir,
        &weights,
        &checkpoint.config,
        &tower,
        None,
    )?;
    Ok(accuracy)
}

/// A linear classifier over one feature, at `nn.Linear`'s default init; its weight and bias
/// join `vars` as `head.{task}.*`.
fn head(
    task: &PatchTask,
    width: usize,
    rng: &mut rand::rngs::StdRng,
    device: &Device,
    vars: &mut Vec<(String, Var)>,
) -> Result<Linear> {
    use rand::Rng;
    let bound = 1.0 / (width as f32).sqrt();
    let w: Vec<f32> = (0..task.classes * width)
        .map(|_| rng.random_range(-bound..bound))
        .collect();
    let weight = Var::from_tensor(&Tensor::from_vec(w, (task.classes, width), device)?)?;
    let bias = Var::zeros(task.classes, DType::F32, device)?;
    let linear = Linear {
        weight: weight.as_tensor().clone(),
        bias: Some(bias.as_tensor().clone()),
    };
    vars.push((format!("head.{}.weight", task.name), weight));
    vars.push((format!("head.{}.bias", task.name), bias));
    Ok(linear)
}

/// Per head (patch tasks, then region tasks), what it reads and the classes it should give:
/// the patch features themselves, or the regions' mean features.
fn head_inputs(
    batch: &[&PatchExample],
    features: &Tensor,
    tasks: &TowerTasks,
) -> Result<Vec<(Tensor, Vec<u32>)>> {
    let mut inputs: Vec<(Tensor, Vec<u32>)> = (0..tasks.patch.len())
        .map(|t| {
            let targets = batch.iter().flat_map(|e| e.labels[t].clone()).collect();
            (features.clone(), targets)
        })
        .collect();
    let positions = features.dim(0)? / batch.len().max(1);
    if let Some((pool, targets)) = region_pool(batch, positions, features.device())? {
        let pooled = pool.matmul(features)?;
        inputs.extend(targets.into_iter().map(|t| (pooled.clone(), t)));
    }
    Ok(inputs)
}

/// Labels of the wrong number or range would train silently wrong heads.
fn check_example(e: &PatchExample, tasks: &TowerTasks, positions: usize) -> Result<()> {
    let bad = |what: String| Err(TrainError::Data(format!("{}: {what}", e.image.display())));
    if e.labels.len() != tasks.patch.len() || e.labels.iter().any(|l| l.len() != positions) {
        return bad(format!(
            "expected {} label rows of {positions} (one per feature position)",
            tasks.patch.len()
        ));
    }
    for (labels, task) in e.labels.iter().zip(&tasks.patch) {
        if labels.iter().any(|&c| c as usize >= task.classes) {
            return bad(format!(
                "a {} label is outside 0..{}",
                task.name, task.classes
            ));
        }
    }
    for (region, labels) in &e.regions {
        if region.is_empty() || region.iter().any(|&p| p >= positions) {
            return bad(format!(
                "a region's positions must be within 0..{positions}"
            ));
        }
        if labels.len() != tasks.region.len()
            || labels
                .iter()
                .zip(&tasks.region)
                .any(|(&c, t)| c as usize >= t.classes)
        {
            return bad("a region's labels do not fit the region tasks".into());
        }
    }
    Ok(())
}

/// The matrix that averages each region's rows of the batch's flattened features
/// (`[regions, batch × positions]`), and per region task the regions' classes.
fn region_pool(
    batch: &[&PatchExample],
    positions: usize,
    device: &Device,
) -> Result<Option<(Tensor, Vec<Vec<u32>>)>> {
    let regions: Vec<(usize, &Region)> = batch
        .iter()
        .enumerate()
        .flat_map(|(b, e)| e.regions.iter().map(move |r| (b, r)))
        .collect();
    let Some((_, (_, first))) = regions.first() else {
        return Ok(None);
    };
    let cols = batch.len() * positions;
    let mut pool = vec![0f32; regions.len() * cols];
    let mut targets = vec![Vec::with_capacity(regions.len()); first.len()];
    for (r, (b, (members, labels))) in regions.iter().enumerate() {
        for &p in members {
            pool[r * cols + b * positions + p] = 1.0 / members.len() as f32;
        }
        for (t, &c) in labels.iter().enumerate() {
            targets[t].push(c);
        }
    }
    let pool = Tensor::from_vec(pool, (regions.len(), cols), device)?;
    Ok(Some((pool, targets)))
}

/// Each head's accuracy on `examples`, with the tower in inference mode.
fn evaluate(
    model: &Llava,
    tasks: &TowerTasks,
    heads: &[Linear],
    examples: &[PatchExample],
    pixels: &dyn Fn(&[&PatchExample]) -> Result<Tensor>,
) -> Result<Vec<TaskAccuracy>> {
    let n_patch = tasks.patch.len();
    let mut right = vec![(0usize, 0usize); heads.len()];
    let mut fg = vec![(0usize, 0usize); heads.len()];
    let all: Vec<&PatchExample> = examples.iter().collect();
    for chunk in all.chunks(32) {
        let features = model.vision_features(&pixels(chunk)?, Mode::Infer)?;
        let features = features.flatten_to(1)?;
        for (t, (head, (input, truth))) in heads
            .iter()
            .zip(head_inputs(chunk, &features, tasks)?)
            .enumerate()
        {
            let predicted: Vec<u32> = head.forward(&input)?.argmax(D::Minus1)?.to_vec1::<u32>()?;
            for (&p, &y) in predicted.iter().zip(&truth) {
                right[t].1 += 1;
                right[t].0 += usize::from(p == y);
                if y != 0 {
                    fg[t].1 += 1;
                    fg[t].0 += usize::from(p == y);
                }
            }
        }
    }
    let ratio = |(r, n): (usize, usize)| {
        if n == 0 {
            f64::NAN
        } else {
            r as f64 / n as f64
        }
    };
    Ok(tasks
        .patch
        .iter()
        .chain(&tasks.region)
        .enumerate()
        .map(|(t, task)| TaskAccuracy {
            task: task.name.clone(),
            accuracy: ratio(right[t]),
            foreground_accuracy: (t < n_patch && task.background).then(|| ratio(fg[t])),
        })
        .collect())
}
