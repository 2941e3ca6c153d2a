//! Step 4, stage 0a: the vision tower's dense pretraining. LLaVA's CLIP tower arrives having
//! seen 400M captioned pictures; the demo's tower starts from random weights, so before anything
//! else it learns to tell, patch by patch, the colour of the object there and how many objects
//! the picture holds, and object by object (from the mean of its patches) the shape and place
//! from the left (the labels come from the world's ground truth, as a detector's come from COCO
//! boxes). The heads are thrown away; the decoder, projector and every later stage see only the
//! tower's features. A run killed midway starts this step again (it is a few minutes long).

use anyhow::{Context, Result};
use llava_demo::world::patches::{OBJECT_TASKS, PATCH_TASKS, dense_labels};
use llava_demo::world::{self, WorldPaths};
use llava_model::kernels::pool;
use llava_model::{Checkpoint, Device};
use llava_train::tower::{
    PatchExample, PatchTask, TowerPretrainConfig, TowerTasks, pretrain_tower,
};

use super::report_data::{ReportBuilder, StageReport};
use super::{Layout, Plan};

pub fn tower(plan: &Plan, layout: &Layout, report: &mut ReportBuilder) -> Result<()> {
    let out = layout.tower();
    let accuracy_file = out.join("tower_accuracy.json");
    let command = format!(
        "(in-process) dense tower pretraining: {} steps of {} pictures, lr {:e}, tasks {} (shape weighted {})",
        plan.tower.steps,
        plan.tower.batch_size,
        plan.tower.lr,
        PATCH_TASKS
            .iter()
            .chain(&OBJECT_TASKS)
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", "),
        plan.tower_shape_weight
    );
    if !accuracy_file.exists() {
        if out.exists() {
            std::fs::remove_dir_all(&out)
                .with_context(|| format!("clearing the unfinished {}", out.display()))?;
        }
        let paths = WorldPaths::new(layout.world());
        let grid = plan.model.image_size / plan.model.patch_size;
        let examples = |split: &str| -> Result<Vec<PatchExample>> {
            Ok(world::read_scenes(&paths.scenes(split))?
                .iter()
                .map(|s| {
                    let labels = dense_labels(s, grid);
                    PatchExample {
                        image: paths.images().join(&s.file_name),
                        labels: labels.patches,
                        regions: labels.objects,
                    }
                })
                .collect())
        };
        let task = |&(name, classes): &(&str, usize)| PatchTask {
            name: name.into(),
            classes,
            background: name == "colour",
            weight: if name == "shape" {
                plan.tower_shape_weight
            } else {
                1.0
            },
        };
        let tasks = TowerTasks {
            patch: PATCH_TASKS.iter().map(task).collect(),
            region: OBJECT_TASKS.iter().map(task).collect(),
        };
        let checkpoint = Checkpoint::open(&layout.init().to_string_lossy(), None)?;
        let bar = crate::cmd::train::steps_bar(plan.tower.steps);
        eprintln!("llava-rs {command}");
        let (train, test) = (examples("train")?, examples("test")?);
        // On one of rayon's workers, as `llava train` runs (`pool::on_worker`).
        let accuracy = pool::on_worker(&Device::Cpu, || {
            pretrain_tower(
                &checkpoint,
                &out,
                &tasks,
                &train,
                &test,
                &TowerPretrainConfig {
                    steps: plan.tower.steps,
                    batch_size: plan.tower.batch_size,
                    lr: plan.tower.lr,
                    warmup_ratio: 0.05,
                    max_grad_norm: 1.0,
                    seed: plan.seed,
                },
                |log| {
                    bar.set_position(log.step);
                    bar.set_message(format!("loss {:.4}", log.loss));
                },
            )
        })?;
        bar.finish();
        llava_train::plot::plot_log(
            &out.join("train_log.jsonl"),
            &out.join("loss.png"),
            "stage 0a: tower pretraining · model init · data: the world's train scenes",
        )?;
        world::write_file(
            &accuracy_file,
            serde_json::to_string_pretty(&accuracy)?.as_bytes(),
        )?;
    } else {
        eprintln!("tower already pretrained");
    }
    let text = std::fs::read_to_string(&accuracy_file)?;
    report.tower_accuracy = serde_json::from_str(&text)
        .with_context(|| format!("reading {}", accuracy_file.display()))?;
    report.stages.push(StageReport::read(
        "stage 0a: tower pretraining (dense labels)",
        &out,
        command,
    )?);
    Ok(())
}
