//! Dense tower pretraining on a task a random tower cannot do: say, patch by patch, whether the
//! patch is red or blue. The tower must learn it, and everything outside the tower must come out
//! bit-identical.

use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use llava_model::init::{DemoShape, demo_config, write_random_checkpoint};
use llava_model::{Checkpoint, DType, Device};
use llava_train::tower::{
    PatchExample, PatchTask, TowerPretrainConfig, TowerTasks, pretrain_tower,
};
use rand::{Rng, SeedableRng};

const GRID: usize = 4;
const PATCH: usize = 8;

/// A picture of `GRID`×`GRID` patches, each red or blue, and the colour of each patch.
fn example(dir: &Path, i: usize, rng: &mut impl Rng) -> PatchExample {
    let side = (GRID * PATCH) as u32;
    let labels: Vec<u32> = (0..GRID * GRID).map(|_| rng.random_range(0..2)).collect();
    let img = RgbImage::from_fn(side, side, |x, y| {
        let label = labels[(y as usize / PATCH) * GRID + x as usize / PATCH];
        let noise = rng.random_range(0..40);
        if label == 1 {
            Rgb([200 + noise / 2, 30 + noise, 30])
        } else {
            Rgb([30, 30 + noise, 200 + noise / 2])
        }
    });
    let image = dir.join(format!("{i}.png"));
    img.save(&image).expect("png");
    // One region: the top row of patches, labelled with how many of them are red.
    let top = (0..GRID).collect::<Vec<_>>();
    let reds = top.iter().filter(|&&p| labels[p] == 1).count() as u32;
    PatchExample {
        image,
        labels: vec![labels],
        regions: vec![(top, vec![reds])],
    }
}

/// A random checkpoint whose tower sees `GRID`×`GRID` patches, in `dir/init`.
fn tiny_checkpoint(dir: &Path) -> PathBuf {
    let init = dir.join("init");
    let shape = DemoShape {
        image_size: GRID * PATCH,
        patch_size: PATCH,
        vision_hidden: 32,
        vision_layers: 2,
        text_hidden: 32,
        text_intermediate: 64,
        text_layers: 1,
        text_heads: 2,
    };
    write_random_checkpoint(&demo_config(&shape, 300, 298, 299), &init, DType::F32, 3)
        .expect("checkpoint");
    init
}

/// Each patch: red or not; the top row: how many of its patches are red.
fn tasks() -> TowerTasks {
    TowerTasks {
        patch: vec![PatchTask {
            name: "red".into(),
            classes: 2,
            background: true,
            weight: 1.0,
        }],
        region: vec![PatchTask {
            name: "reds in the top row".into(),
            classes: GRID + 1,
            background: false,
            weight: 2.0,
        }],
    }
}

#[test]
fn the_tower_learns_patch_labels_and_nothing_else_changes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let init = tiny_checkpoint(tmp.path());
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let examples: Vec<PatchExample> = (0..40).map(|i| example(tmp.path(), i, &mut rng)).collect();
    let (train, held_out) = examples.split_at(32);
    let tasks = tasks();
    let out = tmp.path().join("tower");
    let checkpoint = Checkpoint::open(&init.to_string_lossy(), None).expect("open");
    let mut losses = Vec::new();
    let accuracy = pretrain_tower(
        &checkpoint,
        &out,
        &tasks,
        train,
        held_out,
        &TowerPretrainConfig {
            steps: 40,
            batch_size: 8,
            lr: 3e-3,
            warmup_ratio: 0.0,
            max_grad_norm: 1.0,
            seed: 1,
        },
        |log| losses.push(log.loss),
    )
    .expect("pretraining");
    assert_eq!(losses.len(), 40);
    assert!(losses[39] < 0.5 * losses[0], "loss {losses:?}");
    assert_eq!(accuracy.len(), 2);
    assert!(accuracy[0].accuracy > 0.95, "{accuracy:?}");
    assert!(accuracy[1].accuracy > 0.6, "{accuracy:?}");
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).expect("log");
    assert_eq!(log.lines().count(), 40);

    let before = Checkpoint::open(&init.to_string_lossy(), None)
        .and_then(|c| c.weights(DType::F32, &Device::Cpu))
        .expect("weights before");
    let after = Checkpoint::open(&out.to_string_lossy(), None)
        .and_then(|c| c.weights(DType::F32, &Device::Cpu))
        .expect("the output loads as a checkpoint");
    assert_eq!(before.names(), after.names());
    let mut tower_changed = 0;
    for name in before.names() {
        let a = before.get_stored(name).expect("a");
        let b = after.get_stored(name).expect("b");
        let same = a.flatten_all().and_then(|a| a.to_vec1::<f32>()).expect("a")
            == b.flatten_all().and_then(|b| b.to_vec1::<f32>()).expect("b");
        if name.starts_with("vision_tower.") {
            tower_changed += usize::from(!same);
        } else {
            assert!(same, "{name} is outside the tower but changed");
        }
    }
    // Layer 2 of 2 is never run (LLaVA reads the penultimate layer), so it stays as it was.
    assert!(
        tower_changed > 10,
        "only {tower_changed} tower tensors moved"
    );
}

#[test]
fn labels_that_do_not_fit_the_tower_are_refused_with_the_image_named() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let init = tiny_checkpoint(tmp.path());
    let checkpoint = Checkpoint::open(&init.to_string_lossy(), None).expect("open");
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let good = example(tmp.path(), 0, &mut rng);
    let tasks = tasks();
    let config = TowerPretrainConfig {
        steps: 1,
        batch_size: 1,
        lr: 1e-3,
        warmup_ratio: 0.0,
        max_grad_norm: 1.0,
        seed: 0,
    };
    let mut short = good.clone();
    short.labels[0].pop();
    let mut out_of_range = good.clone();
    out_of_range.labels[0][0] = 7;
    let mut bad_region = good.clone();
    bad_region.regions[0].0.push(GRID * GRID);
    for (bad, needle) in [
        (short, "label rows"),
        (out_of_range, "outside 0..2"),
        (bad_region, "positions"),
    ] {
        let err = pretrain_tower(
            &checkpoint,
            &tmp.path().join("out"),
            &tasks,
            &[good.clone(), bad],
            &[],
            &config,
            |_| {},
        )
        .expect_err("bad labels must be refused");
        let msg = err.to_string();
        assert!(msg.contains("0.png") && msg.contains(needle), "{msg}");
    }
}

#[test]
fn each_task_counts_in_the_loss_by_its_weight() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let init = tiny_checkpoint(tmp.path());
    let checkpoint = Checkpoint::open(&init.to_string_lossy(), None).expect("open");
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let examples: Vec<PatchExample> = (0..4).map(|i| example(tmp.path(), i, &mut rng)).collect();
    // The first step's loss, before any update: patch CE + weight × region CE.
    let first_loss = |region_weight: f64| {
        let mut tasks = tasks();
        tasks.region[0].weight = region_weight;
        let mut loss = None;
        pretrain_tower(
            &checkpoint,
            &tmp.path().join(format!("w{region_weight}")),
            &tasks,
            &examples,
            &examples,
            &TowerPretrainConfig {
                steps: 1,
                batch_size: 4,
                lr: 1e-3,
                warmup_ratio: 0.0,
                max_grad_norm: 1.0,
                seed: 2,
            },
            |log| loss = Some(log.loss),
        )
        .expect("pretraining");
        loss.expect("one step logged")
    };
    let (none, once, twice) = (first_loss(0.0), first_loss(1.0), first_loss(2.0));
    let region = once - none;
    assert!(
        region > 0.1,
        "the region task adds to the loss: {none} {once}"
    );
    assert!(
        (twice - once - region).abs() < 1e-4,
        "weight 2 adds the region loss twice: {none} {once} {twice}"
    );
}
