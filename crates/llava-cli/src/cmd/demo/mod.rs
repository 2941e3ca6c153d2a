//! `llava demo`: the paper's whole pipeline, offline, on the synthetic shapes world.
//!
//! ```text
//! world ─► teacher + llava instruct ─► tokenizer + init ─► stage 0a (tower) ─► stage 0
//!       ─► stage 1 ─► stage 2
//!                  └─ baseline ─┴─ eval ─► report
//! ```
//!
//! Each step drives the real subcommands with the flags a user would type (`llava instruct`,
//! `llava train`, `llava eval`), so the demo exercises what users run. Each step leaves its
//! output under `OUT/` and is skipped when that output is complete, and a training stage
//! killed midway resumes from its last checkpoint, so rerunning the same command continues.

mod plan;
mod report_data;
mod stages;
mod tower;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;

pub use plan::Plan;

#[derive(Args)]
pub struct DemoCommand {
    /// Output folder: world, data, checkpoints, evaluation and `report.md`.
    #[arg(long, default_value = "out/demo")]
    pub out: PathBuf,
    /// The small version for CI (under 2 minutes): fewer scenes and steps.
    #[arg(long)]
    pub quick: bool,
    /// Seed of the world, the teacher's sampling and training.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Override the stage-0 steps (decoder pretraining on captions).
    #[arg(long, value_name = "N")]
    pub stage0_steps: Option<u64>,
    /// Override the stage-1 steps (projector alignment).
    #[arg(long, value_name = "N")]
    pub stage1_steps: Option<u64>,
    /// Override the stage-2 steps (instruction tuning).
    #[arg(long, value_name = "N")]
    pub stage2_steps: Option<u64>,
    /// Override the number of training scenes.
    #[arg(long, value_name = "N")]
    pub train_scenes: Option<usize>,
    /// A plan file (JSON, as written to OUT/plan.json) instead of the built-in sizes.
    #[arg(long, value_name = "FILE")]
    pub plan: Option<PathBuf>,
    /// Stop after this step (world, instruct, init, tower, stage0, stage1, stage2, eval).
    #[arg(long, value_name = "STEP")]
    pub stop_after: Option<String>,
}

/// Paths of everything the demo writes.
pub struct Layout {
    pub out: PathBuf,
}

impl Layout {
    pub fn world(&self) -> PathBuf {
        self.out.join("world")
    }
    pub fn images(&self) -> PathBuf {
        self.world().join("images")
    }
    pub fn data(&self) -> PathBuf {
        self.out.join("data")
    }
    pub fn instruct(&self) -> PathBuf {
        self.out.join("instruct")
    }
    pub fn init(&self) -> PathBuf {
        self.out.join("init")
    }
    pub fn tower(&self) -> PathBuf {
        self.out.join("stage0_tower")
    }
    pub fn stage(&self, n: u8) -> PathBuf {
        self.out.join(format!("stage{n}"))
    }
    pub fn eval(&self) -> PathBuf {
        self.out.join("eval")
    }
}

pub fn run(c: DemoCommand) -> Result<()> {
    let mut plan = match &c.plan {
        Some(p) => serde_json::from_str(
            &std::fs::read_to_string(p)
                .with_context(|| format!("reading --plan {}", p.display()))?,
        )
        .with_context(|| format!("--plan {}", p.display()))?,
        None if c.quick => Plan::quick(c.seed),
        None => Plan::full(c.seed),
    };
    if let Some(n) = c.stage0_steps {
        plan.stage0.steps = n;
    }
    if let Some(n) = c.stage1_steps {
        plan.stage1.steps = n;
    }
    if let Some(n) = c.stage2_steps {
        plan.stage2.steps = n;
    }
    if let Some(n) = c.train_scenes {
        plan.train_scenes = n;
        plan.instruct_images = plan.instruct_images.min(n);
        plan.probe_images = plan.probe_images.min(n);
        plan.text_records = plan.text_records.min(n);
    }
    validate(&plan)?;
    let layout = Layout { out: c.out.clone() };
    std::fs::create_dir_all(&layout.out)
        .with_context(|| format!("creating {}", layout.out.display()))?;
    check_plan(&layout.out, &plan)?;
    let clock = Instant::now();
    let stop = c.stop_after.as_deref();
    let mut report = report_data::ReportBuilder::new(&plan, c.quick);

    let steps: [(&str, stages::StepFn); 8] = [
        ("world", stages::world),
        ("instruct", stages::instruct),
        ("init", stages::init),
        ("tower", tower::tower),
        ("stage0", stages::stage0),
        ("stage1", stages::stage1),
        ("stage2", stages::stage2),
        ("eval", stages::eval),
    ];
    for (name, step) in steps {
        let started = Instant::now();
        eprintln!("\n== {name} ==");
        step(&plan, &layout, &mut report).with_context(|| format!("demo step {name}"))?;
        eprintln!("({name}: {:.1} s)", started.elapsed().as_secs_f64());
        if stop == Some(name) {
            eprintln!("stopping after {name} (--stop-after)");
            return Ok(());
        }
    }
    report.total_seconds = clock.elapsed().as_secs_f64();
    report.write(&layout)?;
    eprintln!(
        "\ndone in {:.0} s: {}",
        report.total_seconds,
        layout.out.join("report.md").display()
    );
    Ok(())
}

/// Sizes the world and the model cannot work with.
fn validate(plan: &Plan) -> Result<()> {
    let m = &plan.model;
    if m.image_size < 32 || m.patch_size == 0 || !m.image_size.is_multiple_of(m.patch_size) {
        anyhow::bail!(
            "plan: image_size must be at least 32 and a multiple of patch_size (got {} and {})",
            m.image_size,
            m.patch_size
        );
    }
    if plan.train_scenes == 0 || plan.test_scenes == 0 {
        anyhow::bail!("plan: train_scenes and test_scenes must be at least 1");
    }
    for (name, s) in [
        ("tower", &plan.tower),
        ("stage0", &plan.stage0),
        ("stage1", &plan.stage1),
        ("stage2", &plan.stage2),
    ] {
        if s.steps == 0 || s.batch_size == 0 {
            anyhow::bail!("plan: {name} needs at least one step and a batch of at least 1");
        }
    }
    if !(plan.tower_shape_weight.is_finite() && plan.tower_shape_weight >= 0.0) {
        anyhow::bail!(
            "plan: tower_shape_weight must be a number of at least 0 (got {})",
            plan.tower_shape_weight
        );
    }
    if m.text_heads == 0
        || !m.text_hidden.is_multiple_of(m.text_heads)
        || !m.vision_hidden.is_multiple_of(4)
    {
        anyhow::bail!("plan: text_hidden must divide into text_heads, vision_hidden into 4 heads");
    }
    Ok(())
}

/// A rerun must use the plan the folder was started with, or resumed steps would mix sizes.
fn check_plan(out: &Path, plan: &Plan) -> Result<()> {
    let path = out.join("plan.json");
    let text = serde_json::to_string_pretty(plan)?;
    match std::fs::read_to_string(&path) {
        Ok(old) if old != text => anyhow::bail!(
            "{} was made with a different plan (flags or --quick differ); use another --out or the same flags",
            out.display()
        ),
        Ok(_) => Ok(()),
        Err(_) => {
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
        }
    }
}
