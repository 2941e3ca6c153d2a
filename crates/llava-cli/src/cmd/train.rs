//! `llava train`: stage 1 (feature alignment, `--stage pretrain`) or stage 2 (end-to-end
//! fine-tuning, `--stage finetune`), with the paper's defaults per stage.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use llava_data::conversation::ConvTemplate;
use llava_data::record::read_records;
use llava_data::sample::SampleOptions;
use llava_data::tokenizer::Tokenizer;
use llava_model::kernels::pool;
use llava_model::lora::{DropoutKey, LANGUAGE_MODEL_LINEARS, LoraInit, LoraTraining};
use llava_model::pipeline::image_processor;
use llava_model::quantized::Quantize;
use llava_model::weights::{hf_llava_name, projector_file_name};
use llava_model::{Checkpoint, DType, Device, Layout, Llava};
use llava_train::checkpoint::{
    TrainerState, read_state, restore_optimizer, resume_conflicts, truncate_log,
};
use llava_train::collective::Collective;
use llava_train::data::{DataStats, TrainDataset, usable_records};
use llava_train::memory::{MemoryPlan, PlanSettings};
use llava_train::optim::{AdamW, AdamWConfig};
use llava_train::trainer::{LoraSettings, SaveDtype, Stage, TrainConfig, Trainer};

use super::model_args::CheckpointArgs;

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum StageArg {
    Pretrain,
    Finetune,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum SaveDtypeArg {
    Bf16,
    F32,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum SchedulerArg {
    Cosine,
    Constant,
}

#[derive(clap::Args, Debug)]
pub struct TrainCommand {
    /// pretrain: stage 1, projector only. finetune: stage 2, projector + language model.
    #[arg(long, value_enum)]
    pub stage: StageArg,
    // The checkpoint to start from.
    #[command(flatten)]
    pub checkpoint: CheckpointArgs,
    /// LLaVA dataset: JSON array or JSONL of {id, image?, conversations}.
    #[arg(long)]
    pub data: PathBuf,
    /// Folder that the records' relative image paths start from.
    #[arg(long)]
    pub image_folder: Option<PathBuf>,
    #[arg(long)]
    pub output: PathBuf,
    /// Stage-1 projector weights for a stage-2 run: our projector.safetensors, or the original
    /// LLaVA's mm_projector.bin.
    #[arg(long)]
    pub projector: Option<PathBuf>,
    /// Continue a run from one of its checkpoints (a checkpoint-N folder or the output folder).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Default: 1.
    #[arg(long)]
    pub epochs: Option<u64>,
    /// Stop after this many optimizer steps (overrides --epochs).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Samples per micro-batch. Default: 256 for pretrain, 128 for finetune (LLaVA-1.5's global
    /// batches); lower it and raise --grad-accum on small machines.
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Under mpirun: 1 shards the optimizer state over the ranks, as DeepSpeed's ZeRO stage 1
    /// (each rank keeps the AdamW moments of 1/N of the trainable tensors; the update is the
    /// same). 0 keeps all of it on every rank.
    #[arg(long, default_value_t = 0, value_name = "STAGE")]
    pub zero: u8,
    /// Default: 1e-3 for pretrain, 2e-5 for finetune.
    #[arg(long)]
    pub lr: Option<f64>,
    /// A separate learning rate for the projector. Alias: --mm-projector-lr (the original's).
    #[arg(long, alias = "mm-projector-lr")]
    pub projector_lr: Option<f64>,
    /// LoRA fine-tuning (the original's --lora_enable): every linear layer of the language
    /// model gets a trainable LoRA pair, the projector trains in full, everything else is
    /// frozen. Each save is a peft adapter. Stage 2 (finetune) only. Alias: --lora-enable.
    #[arg(long, alias = "lora-enable")]
    pub lora: bool,
    /// LoRA rank. Default: 128 (the original's finetune_lora.sh); from --lora-from's adapter.
    #[arg(long)]
    pub lora_r: Option<usize>,
    /// LoRA alpha: the pair's output is scaled by alpha / r. Default: 256; from --lora-from's
    /// adapter.
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Dropout on the pair's input. Default: 0.05; from --lora-from's adapter.
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// Start the LoRA pairs (and the projector, if the adapter saved it) from an existing peft
    /// adapter directory instead of a fresh init; implies --lora.
    #[arg(long)]
    pub lora_from: Option<PathBuf>,
    /// QLoRA (the original's --bits): the frozen language model's linear layers held in 4 bits
    /// (Q4_K blocks; Q4_0 where a width is not a multiple of 256) or 8 bits (int8 blocks of
    /// 32), on the CPU. The LoRA pairs, the projector and their optimizer state stay f32.
    /// Needs --lora.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(["4", "8"]))]
    pub bits: Option<String>,
    #[arg(long, value_enum, default_value = "cosine")]
    pub lr_scheduler: SchedulerArg,
    #[arg(long, default_value_t = 0.03)]
    pub warmup_ratio: f64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Global gradient-norm clip; 0 turns it off.
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[arg(long)]
    pub no_shuffle: bool,
    /// Batch records of one modality (image or text-only) and similar length together, as
    /// LLaVA's `--group_by_modality_length` does: less padding on mixed data.
    #[arg(long)]
    pub group_by_modality_length: bool,
    /// Save a checkpoint-N folder every N steps (for --resume).
    #[arg(long)]
    pub save_steps: Option<u64>,
    /// Tokens per sample; longer samples are cut, and a sample cut through its image is
    /// skipped. Default: 2048 (LLaVA-1.5's), or 4096 for LLaVA-NeXT, whose largest grid alone
    /// takes 2880 positions at 336 px.
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Default: plain for pretrain, llava_v1 for finetune. LLaVA-1.5's own fine-tuning used
    /// vicuna_v1 (the original's `--version v1`). Aliases: --conv-mode, --version.
    #[arg(long, aliases = ["conv-mode", "version"])]
    pub template: Option<String>,
    /// Keep <image> where each record has it instead of moving it to the front.
    #[arg(long)]
    pub keep_image_position: bool,
    /// Also train the vision tower (the paper keeps it frozen).
    #[arg(long)]
    pub unfreeze_vision: bool,
    /// Keep only each decoder layer's input and recompute the layer in backward: activation
    /// memory of one layer instead of all, for about one more forward pass per step. The
    /// gradients are the same.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// bf16 mixed precision (the HF Trainer's --bf16, with f32 master weights): frozen weights
    /// held in bf16, activations in bf16, products in bf16 with f32 sums; the trainable
    /// weights' f32 masters, their gradients and AdamW's moments in f32; norms, the attention
    /// softmax and the loss in f32. About half the memory of the frozen weights and the
    /// activations.
    #[arg(long)]
    pub bf16: bool,
    /// The dtype of the saved weights (model or adapter). Default: bf16 with --bf16 (the
    /// original LLaVA loads the model in bf16 under --bf16, so it saves bf16), otherwise the
    /// trained weights in f32 and the frozen ones as stored. Narrower than the f32 masters, the
    /// masters go into optimizer.safetensors, so --resume continues exactly; but a run in f32
    /// (no --bf16) saved in bf16 resumes over its frozen weights rounded to bf16.
    #[arg(long, value_enum)]
    pub save_dtype: Option<SaveDtypeArg>,
    /// Stop at the first bad record instead of skipping it.
    #[arg(long)]
    pub strict: bool,
    /// Print the memory the run will need at its peak (weights, gradients, optimizer state,
    /// activations, logits) from the config and the flags, and stop before loading anything.
    #[arg(long)]
    pub dry_run: bool,
    /// With --dry-run: also print the largest per-device batch size that fits this many GB.
    #[arg(long, value_name = "GB", requires = "dry_run")]
    pub memory_budget: Option<f64>,
    /// With --dry-run: plan one rank of a job of N ranks (with --zero 1 each keeps 1/N of the
    /// optimizer state). Default: the ranks of the mpirun job it runs in, else 1.
    #[arg(long, value_name = "N", requires = "dry_run")]
    pub ranks: Option<usize>,
    /// Train on this CUDA device (needs a build with `--features cuda`); the CPU otherwise.
    #[arg(long)]
    pub cuda: Option<usize>,
    /// `pad` (LLaVA-1.5) or `square`; default: what the checkpoint asks for.
    #[arg(long)]
    pub image_aspect_ratio: Option<String>,
}

pub fn run(c: TrainCommand) -> Result<()> {
    // On a CPU the whole run (loading, steps, MPI's setup and sums) happens on one of rayon's
    // workers, so that each op's parallel loop forks there instead of waking this thread.
    match c.cuda {
        None => pool::on_worker(&Device::Cpu, || run_here(c)),
        Some(_) => run_here(c),
    }
}

fn run_here(c: TrainCommand) -> Result<()> {
    if c.dry_run {
        return train(c, &llava_train::collective::SingleProcess);
    }
    let job = super::ranks::join_job()?;
    let (rank, world) = (job.rank(), job.world_size());
    match train(c, job.as_ref()) {
        Err(e) if world > 1 => {
            // Returning would wait in MPI_Finalize while the other ranks wait in a sum.
            eprintln!("error: rank {rank} of {world}: {e:#}");
            job.abort(1)
        }
        result => result,
    }
}

/// The run on this rank of `job` (one process: a world of one).
fn train(c: TrainCommand, job: &dyn Collective) -> Result<()> {
    let lead = job.rank() == 0;
    let stage = match c.stage {
        StageArg::Pretrain => Stage::Pretrain,
        StageArg::Finetune => Stage::Finetune,
    };
    let lora_on = c.lora || c.lora_from.is_some() || c.lora_r.is_some() || c.lora_alpha.is_some();
    let lora_on = lora_on || c.lora_dropout.is_some();
    if lora_on && !c.lora && c.lora_from.is_none() {
        bail!("--lora-r, --lora-alpha and --lora-dropout shape a LoRA run: add --lora");
    }
    if lora_on && stage == Stage::Pretrain {
        bail!(
            "--lora adapts the language model, which stage 1 (--stage pretrain) keeps frozen: use --stage finetune"
        );
    }
    if c.bits.is_some() && !lora_on {
        bail!("--bits holds the frozen base quantized under LoRA pairs (QLoRA): add --lora");
    }
    if c.bits.is_some() && c.cuda.is_some() {
        bail!(
            "--bits (quantized blocks) trains on the CPU only here; on a GPU use --lora without it"
        );
    }
    if c.zero > 1 {
        bail!(
            "--zero {}: ZeRO stages 2 and 3 (gradients and weights sharded too) are not implemented; --zero 1 shards the optimizer state",
            c.zero
        );
    }
    if lora_on && c.unfreeze_vision {
        bail!("--lora trains LoRA pairs and the projector only; drop --unfreeze-vision");
    }
    let (default_lr, default_batch, default_template) = match stage {
        // finetune_lora.sh's learning rate.
        Stage::Finetune if lora_on => (2e-4, 128, ConvTemplate::LlavaV1),
        Stage::Pretrain => (1e-3, 256, ConvTemplate::Plain),
        Stage::Finetune => (2e-5, 128, ConvTemplate::LlavaV1),
    };
    // With --resume a LoRA run continues from the checkpoint's adapter.
    let lora_from = match (&c.resume, lora_on) {
        (Some(dir), true) => Some(dir.clone()),
        _ => c.lora_from.clone(),
    };
    let lora = if lora_on {
        Some(lora_setting(&c, lora_from.as_deref())?)
    } else {
        None
    };
    let template = match &c.template {
        Some(name) => {
            ConvTemplate::parse(name).map_err(|m| anyhow::anyhow!("--template {name}: {m}"))?
        }
        None => default_template,
    };
    let config = TrainConfig {
        stage,
        epochs: c.epochs.unwrap_or(1),
        max_steps: c.max_steps,
        batch_size: c.batch_size.unwrap_or(default_batch),
        grad_accum: c.grad_accum.max(1),
        lr: c.lr.unwrap_or(default_lr),
        projector_lr: c.projector_lr,
        cosine: matches!(c.lr_scheduler, SchedulerArg::Cosine),
        warmup_ratio: c.warmup_ratio,
        weight_decay: c.weight_decay,
        max_grad_norm: c.max_grad_norm,
        seed: c.seed,
        shuffle: !c.no_shuffle,
        group_by_modality_length: c.group_by_modality_length,
        save_steps: c.save_steps,
        unfreeze_vision: c.unfreeze_vision,
        gradient_checkpointing: c.gradient_checkpointing,
        bits: c.bits.as_deref().and_then(|b| b.parse().ok()),
        bf16: c.bf16,
        save_dtype: match (c.save_dtype, c.bf16) {
            (Some(SaveDtypeArg::Bf16), _) | (None, true) => Some(SaveDtype::Bf16),
            (Some(SaveDtypeArg::F32), _) => Some(SaveDtype::F32),
            (None, false) => None,
        },
        lora: lora.as_ref().map(|l| LoraSettings {
            r: l.r,
            lora_alpha: l.lora_alpha,
            lora_dropout: l.lora_dropout,
        }),
        zero: c.zero,
    };
    if config.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if c.dry_run {
        return print_memory_plan(&c, &config, lora.as_ref().map(|l| l.r));
    }

    // A resumed run starts from the checkpoint's weights and state.
    // The ranks and ZeRO stage of the run that saved the checkpoint: where its moments are.
    let mut saved_layout = (1, 0);
    let (model_source, state) = match &c.resume {
        Some(dir) => {
            let (state, saved) =
                read_state(dir).with_context(|| format!("--resume {}", dir.display()))?;
            saved_layout = (state.world_size, saved.zero);
            if state.world_size != job.world_size() && lead {
                eprintln!(
                    "note: --resume {}: the run was saved by {} rank(s) and continues on {}: the data order is the same (epoch {}, from record {}), in global batches of {} records (it had {})",
                    dir.display(),
                    state.world_size,
                    job.world_size(),
                    state.epoch,
                    state.position,
                    job.world_size() * config.batch_size * config.grad_accum,
                    state.world_size * saved.batch_size * saved.grad_accum,
                );
            }
            let conflicts = resume_conflicts(&saved, &config, state.world_size, job.world_size());
            if !conflicts.is_empty() {
                bail!(
                    "--resume {}: an exact continuation needs the run's settings: {}",
                    dir.display(),
                    conflicts.join("; ")
                );
            }
            // A LoRA checkpoint holds the adapter only: the base is loaded again under it.
            let source = match &lora {
                Some(_) => c.checkpoint.model.clone(),
                None => dir.to_string_lossy().to_string(),
            };
            (source, state)
        }
        // Rank 0 checks before it writes anything; the others would see its new log.
        None if !lead => (c.checkpoint.model.clone(), TrainerState::default()),
        None => {
            if c.output.join("train_log.jsonl").exists()
                || c.output.join("trainer_state.json").exists()
            {
                bail!(
                    "--output {} already holds a training run; continue it with --resume {} or choose another folder",
                    c.output.display(),
                    c.output.display()
                );
            }
            (c.checkpoint.model.clone(), TrainerState::default())
        }
    };
    std::fs::create_dir_all(&c.output)
        .with_context(|| format!("creating {}", c.output.display()))?;
    if c.resume.is_some() && lead {
        truncate_log(&c.output, state.step)?;
    }

    let checkpoint = Checkpoint::open(&model_source, c.checkpoint.vision_tower.as_deref())
        .with_context(|| format!("loading {model_source}"))?;
    llava_train::memory::reset_peak_resident();
    let (planned_bytes, planned_length) = {
        let r = lora.as_ref().map(|l| l.r);
        let (settings, _) = plan_settings(&c, &config, r, &checkpoint.config);
        let total = MemoryPlan::new(&checkpoint.config, &settings).total();
        (total, settings.max_length)
    };
    if stage == Stage::Pretrain && checkpoint.config.mm_use_im_start_end {
        bail!(
            "{}: stage 1 with mm_use_im_start_end (LLaVA v0) is not supported: the original also trains the input embeddings of <im_start>/<im_end> there, and this trainer keeps them frozen",
            model_source
        );
    }
    let device = match c.cuda {
        Some(i) => super::model_args::cuda_device(i)?,
        None => Device::Cpu,
    };
    // --bf16: frozen weights read in bf16, trainable ones as f32 masters.
    let mut weights = match c.bf16 {
        true => {
            let mut w = checkpoint.weights(DType::BF16, &device)?;
            w.set_master_dtype(DType::F32);
            w
        }
        false => checkpoint.weights(DType::F32, &device)?,
    };
    weights.set_quantize(match c.bits.as_deref() {
        Some("4") => Some(Quantize::Bits4),
        Some(_) => Some(Quantize::Bits8),
        None => None,
    });
    if c.bits.is_some() {
        // The frozen base held once, not beside a repacked copy.
        llava_model::quantized::keep_repacked_weights(false);
    }
    if let (Some(p), None) = (&c.projector, &c.resume) {
        weights
            .add_file(p, projector_file_name)
            .with_context(|| format!("--projector {}", p.display()))?;
    }
    let unfreeze = c.unfreeze_vision;
    match lora {
        Some(lora) => {
            // The projector in full; the language model through the pairs only.
            weights.set_trainable(|n| n.starts_with("multi_modal_projector."));
            if let Layout::Original { .. } = checkpoint.layout {
                bail!(
                    "{model_source}: --lora trains an adapter over an HF-layout LLaVA (the model transformers + peft load it over); this checkpoint is in the original layout"
                );
            }
            weights
                .set_lora_training(lora, hf_llava_name)
                .with_context(|| format!("the LoRA adapter of {model_source}"))?;
        }
        None => weights.set_trainable(move |n| stage.trains(n, unfreeze)),
    }
    let model = crate::memory::while_loading(|| Llava::load(&checkpoint.config, &weights))?;
    let mut optimizer = AdamW::new(
        weights.take_vars(),
        AdamWConfig {
            lr: config.lr,
            weight_decay: config.weight_decay,
            ..Default::default()
        },
    )?;
    if let Some(plr) = config.projector_lr {
        for p in optimizer
            .params
            .iter_mut()
            .filter(|p| p.name.starts_with("multi_modal_projector."))
        {
            p.lr_scale = plr / config.lr;
        }
    }
    if config.zero >= 1 && job.world_size() > 1 {
        llava_train::zero::shard(&mut optimizer, job.rank(), job.world_size())?;
    }
    if let Some(dir) = &c.resume {
        restore_optimizer(dir, &mut optimizer, state.step, saved_layout, &device)?;
    }

    let tokenizer = Tokenizer::from_dir(&checkpoint.dir)?;
    let aspect = match &c.image_aspect_ratio {
        Some(a) => Some(a.parse().context("--image-aspect-ratio")?),
        None => None,
    };
    let pad_id = tokenizer
        .token_to_id("<pad>")
        .or(checkpoint.config.text_config.pad_token_id)
        .unwrap_or(0);
    let mut stats = DataStats::default();
    let records = usable_records(read_records(&c.data)?, c.strict, &mut stats)
        .with_context(|| format!("{} (--strict)", c.data.display()))?;
    let data = TrainDataset {
        records,
        image_folder: c.image_folder.clone(),
        image_processor: image_processor(&checkpoint, aspect)?,
        sample: SampleOptions {
            template,
            image_tokens: checkpoint.image_tokens(&tokenizer)?,
            // Set per image, from its size (`TrainDataset::model_config`).
            image_seq_len: checkpoint.config.image_seq_len(),
            max_length: c
                .max_length
                .unwrap_or(checkpoint.config.default_max_length()),
            keep_image_position: c.keep_image_position,
        },
        model_config: checkpoint.config.clone(),
        tokenizer,
        pad_id,
        strict: c.strict,
    };
    let trainable: usize = optimizer
        .params
        .iter()
        .map(|p| p.var.as_tensor().elem_count())
        .sum();
    eprintln!(
        "stage {:?}: {} records, template {}, {} trainable parameters in {} tensors",
        stage,
        data.records.len(),
        template.name(),
        trainable,
        optimizer.params.len()
    );

    let mut trainer = Trainer {
        model_config: checkpoint.config.clone(),
        model,
        config,
        optimizer,
        state,
        data: &data,
        output: c.output.clone(),
        source: &weights,
        source_dir: checkpoint.dir.clone(),
        device,
        stats,
        title: run_title(stage, &c.checkpoint.model, &c.data),
        collective: job,
    };
    let total = trainer.total_steps();
    let bar = match lead {
        true => steps_bar(total).with_position(trainer.state.step),
        false => ProgressBar::hidden(),
    };
    let mut last = None;
    let ranks = job.world_size();
    // Time in the sums between ranks, since this process started.
    let (mut comm_s, started_s) = (0.0, trainer.state.elapsed_s);
    trainer.train(|log| {
        bar.set_position(log.step);
        comm_s += log.comm_s;
        // Tokens are the global batch's, summed over the ranks.
        let tok_s = log.tokens as f64 / (log.elapsed_s / log.step.max(1) as f64).max(1e-9);
        let comm = match ranks > 1 {
            true => {
                let share = comm_s / (log.elapsed_s - started_s).max(1e-9);
                format!(" · {:.0}% in sums over {ranks} ranks", 100.0 * share)
            }
            false => String::new(),
        };
        bar.set_message(format!(
            "loss {:.4} · lr {:.2e} · {tok_s:.0} tok/s{comm}",
            log.loss, log.lr
        ));
        last = Some(log.clone());
    })?;
    bar.finish();
    let stats = trainer.stats;
    if stats.skipped > 0 || stats.truncated > 0 {
        eprintln!(
            "warning: skipped {} bad records, truncated {} at --max-length",
            stats.skipped, stats.truncated
        );
    }
    if let Some(l) = last.filter(|_| lead) {
        eprintln!(
            "done: step {} · loss {:.4} · saved to {}",
            l.step,
            l.loss,
            c.output.display()
        );
        // The measured peak beside what --dry-run would have said, so a user sees how far
        // the plan can be trusted for the next, larger run.
        if let Some(peak) = llava_train::memory::peak_resident_bytes() {
            eprintln!(
                "memory: peak {:.2} GB resident; the plan (--dry-run) said {:.2} GB for batches \
                 of {planned_length} tokens (--max-length; shorter data take less)",
                peak as f64 / 1e9,
                planned_bytes / 1e9
            );
        }
    }
    Ok(())
}

/// The LoRA setting from the flags: the original's defaults (r 128, alpha 256, dropout 0.05)
/// for a fresh pair, or the shape of the adapter training continues from.
fn lora_setting(c: &TrainCommand, from: Option<&std::path::Path>) -> Result<LoraTraining> {
    let mut setting = match from {
        Some(dir) => {
            let setting = LoraTraining::from_adapter(dir)
                .with_context(|| format!("the LoRA adapter in {}", dir.display()))?;
            if let Some(r) = c.lora_r.filter(|&r| r != setting.r) {
                bail!(
                    "--lora-r {r}: the adapter in {} has r {}",
                    dir.display(),
                    setting.r
                );
            }
            if let Some(a) = c.lora_alpha.filter(|&a| a != setting.lora_alpha) {
                bail!(
                    "--lora-alpha {a}: the adapter in {} has lora_alpha {}",
                    dir.display(),
                    setting.lora_alpha
                );
            }
            setting
        }
        None => LoraTraining {
            r: c.lora_r.unwrap_or(128),
            lora_alpha: c.lora_alpha.unwrap_or(256.0),
            use_rslora: false,
            lora_dropout: 0.05,
            targets: LANGUAGE_MODEL_LINEARS.map(str::to_string).to_vec(),
            init: LoraInit::Fresh(c.seed),
            dropout_key: DropoutKey::default(),
        },
    };
    if let Some(p) = c.lora_dropout {
        setting.lora_dropout = p;
    }
    if setting.r == 0 {
        bail!("--lora-r must be at least 1");
    }
    if !(0.0..1.0).contains(&setting.lora_dropout) {
        bail!("--lora-dropout {}: must be in [0, 1)", setting.lora_dropout);
    }
    Ok(setting)
}

/// `loss.png`'s title: the stage, and the model and data as their last two path components
/// (a hub id whole, `demo/init` for `out/demo/init`).
fn run_title(stage: Stage, model: &str, data: &std::path::Path) -> String {
    let tail = |p: &std::path::Path| {
        let parts: Vec<String> = p
            .components()
            .rev()
            .take(2)
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        parts.into_iter().rev().collect::<Vec<_>>().join("/")
    };
    let stage = match stage {
        Stage::Pretrain => "stage 1 (pretrain)",
        Stage::Finetune => "stage 2 (finetune)",
    };
    format!(
        "{stage} · model {} · data {}",
        tail(std::path::Path::new(model)),
        tail(data)
    )
}

/// The progress bar of a training run: steps, a message (loss, lr, speed) and the ETA.
pub(crate) fn steps_bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps · {msg} · ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// What the memory plan needs to know of this run, and the number of ranks it is planned for.
fn plan_settings(
    c: &TrainCommand,
    config: &TrainConfig,
    lora_r: Option<usize>,
    model: &llava_model::LlavaConfig,
) -> (PlanSettings, usize) {
    // mpirun tells each process the job's size (OpenMPI's variable), with no MPI call.
    let job = std::env::var("OMPI_COMM_WORLD_SIZE").ok();
    let ranks = c
        .ranks
        .or_else(|| job.and_then(|n| n.parse().ok()))
        .unwrap_or(1)
        .max(1);
    let settings = PlanSettings {
        stage: config.stage,
        unfreeze_vision: config.unfreeze_vision,
        gradient_checkpointing: config.gradient_checkpointing,
        batch_size: config.batch_size,
        max_length: c.max_length.unwrap_or(model.default_max_length()),
        frozen_bytes: if config.bf16 { 2.0 } else { 4.0 },
        lora_r,
        bits: config.bits,
        bf16: config.bf16,
        zero_ranks: if config.zero >= 1 { ranks } else { 1 },
    };
    (settings, ranks)
}

/// `--dry-run`: the memory plan of this run ([`MemoryPlan`]), read from `config.json` alone.
fn print_memory_plan(c: &TrainCommand, config: &TrainConfig, lora_r: Option<usize>) -> Result<()> {
    let checkpoint = Checkpoint::open(&c.checkpoint.model, c.checkpoint.vision_tower.as_deref())
        .with_context(|| format!("reading {}", c.checkpoint.model))?;
    let model = &checkpoint.config;
    let (settings, ranks) = plan_settings(c, config, lora_r, model);
    let plan = MemoryPlan::new(model, &settings);
    println!(
        "memory plan for {} ({:?}, batch {} × {} tokens, {} on {}):",
        c.checkpoint.model,
        config.stage,
        settings.batch_size,
        settings.max_length,
        if config.bf16 {
            "bf16 mixed precision"
        } else {
            "f32"
        },
        match ranks {
            1 => "one device".to_string(),
            n => format!("each of {n} ranks"),
        }
    );
    println!("{plan}");
    if let Some(gb) = c.memory_budget {
        match MemoryPlan::largest_batch(model, &settings, gb * 1e9) {
            Some(b) => println!("largest batch size within {gb} GB: {b}"),
            None => println!("not even batch size 1 fits in {gb} GB"),
        }
    }
    Ok(())
}
