//! `llava train` end to end on the tiny fixture checkpoint: it learns (over-fits 8 samples and
//! then answers verbatim), it freezes what the stage freezes (bit-identical), and a run killed
//! and resumed logs the same per-step losses as an uninterrupted one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use llava_model::weights::hf_llava_name;
use llava_model::{Device, Tensor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models")
}

fn base_model() -> PathBuf {
    fixtures().join("llava15-default/model")
}

const QA: [(&str, &str); 8] = [
    ("What is in the picture?", "A red circle."),
    ("What colour is the shape?", "It is blue."),
    ("How many shapes are there?", "There are two shapes."),
    ("Describe the image.", "A green triangle on grey."),
    ("Where is the square?", "On the left side."),
    ("Is there a circle?", "Yes, there is one."),
    ("What is the background?", "The background is white."),
    ("Name the largest shape.", "The square is largest."),
];
const IMAGES: [&str; 3] = ["shapes_64x48.png", "tall_40x60.png", "texture_45x45.png"];

/// Eight records, `<image>` before or after the question, images from the fixtures folder.
fn write_dataset(dir: &Path) -> PathBuf {
    let records: Vec<serde_json::Value> = QA
        .iter()
        .enumerate()
        .map(|(i, (q, a))| {
            let human = if i % 2 == 0 {
                format!("<image>\n{q}")
            } else {
                format!("{q}\n<image>")
            };
            serde_json::json!({"id": i, "image": IMAGES[i % 3],
                "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": a}]})
        })
        .collect();
    let path = dir.join("data.json");
    std::fs::write(&path, serde_json::to_string(&records).expect("json")).expect("write");
    path
}

/// `llava train` from `model` with a constant schedule and no warmup.
fn train_command(model: &Path, data: &Path, output: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_llava"));
    cmd.args(["train", "--model"])
        .arg(model)
        .arg("--data")
        .arg(data)
        .arg("--image-folder")
        .arg(fixtures().join("images"))
        .arg("--output")
        .arg(output)
        .args(["--lr-scheduler", "constant", "--warmup-ratio", "0"])
        .args(extra);
    cmd
}

fn train(data: &Path, output: &Path, extra: &[&str]) -> Output {
    train_command(&base_model(), data, output, extra)
        .output()
        .expect("runs")
}

/// The loss of one unshuffled stage-2 step of 8 samples from `model`, logged under `output`.
fn first_finetune_loss(model: &Path, data: &Path, output: &Path, extra: &[&str]) -> f64 {
    let mut args = vec![
        "--stage",
        "finetune",
        "--batch-size",
        "8",
        "--max-steps",
        "1",
        "--no-shuffle",
    ];
    args.extend_from_slice(extra);
    ok(&train_command(model, data, output, &args)
        .output()
        .expect("runs"));
    losses(output)[0].1
}

/// The checkpoint in `dir` answers questions `indices` of [`QA`] about their images exactly as
/// it was trained to.
fn answers_verbatim(dir: &Path, indices: &[usize]) {
    answers_verbatim_over(dir, None, &[], indices)
}

/// As [`answers_verbatim`], for an adapter in `dir` loaded over `--model-base base`.
fn answers_verbatim_over(dir: &Path, base: Option<&Path>, flags: &[&str], indices: &[usize]) {
    for &i in indices {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_llava"));
        cmd.arg("generate").args(flags);
        if let Some(base) = base {
            cmd.arg("--model-base").arg(base);
        }
        let out = cmd
            .args([
                "--template",
                "llava_v1",
                "--max-new-tokens",
                "24",
                "--model",
            ])
            .arg(dir)
            .arg("--image")
            .arg(fixtures().join("images").join(IMAGES[i % 3]))
            .args(["--prompt", QA[i].0])
            .output()
            .expect("runs");
        ok(&out);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            QA[i].1,
            "answer {i} verbatim"
        );
    }
}

/// Each step's loss of `b` within 1e-6 of `a`'s, relative to `|a|` or to `floor` if larger.
fn assert_losses_close(a: &[(u64, f64)], b: &[(u64, f64)], floor: f64) {
    for ((step, x), (_, y)) in a.iter().zip(b) {
        assert!(
            (x - y).abs() <= 1e-6 * x.abs().max(floor),
            "step {step}: loss {x} vs {y}"
        );
    }
}

/// Copies `run`'s `checkpoint-{step}` and log into `into` and resumes the run there with
/// `args`, as a run killed after that save would be resumed; returns `into`.
fn resume_in_copy(run: &Path, step: u64, into: &Path, data: &Path, args: &[&str]) -> PathBuf {
    let checkpoint = into.join(format!("checkpoint-{step}"));
    std::fs::create_dir_all(&checkpoint).expect("dir");
    for entry in std::fs::read_dir(run.join(format!("checkpoint-{step}"))).expect("read") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), checkpoint.join(entry.file_name())).expect("copy");
    }
    std::fs::copy(run.join("train_log.jsonl"), into.join("train_log.jsonl")).expect("log");
    let mut resume_args = args.to_vec();
    let checkpoint_arg = checkpoint.to_string_lossy().to_string();
    resume_args.extend(["--resume", checkpoint_arg.as_str()]);
    ok(&train(data, into, &resume_args));
    into.to_path_buf()
}

fn ok(out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Every weight a training run loads is one it uses, whatever it starts from.
    assert!(!stderr.contains("not used by the model"), "{stderr}");
}

/// Canonical name → tensor of a checkpoint directory's single safetensors file.
fn weights(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
        .expect("weights")
        .into_iter()
        .filter_map(|(k, v)| hf_llava_name(&k).map(|n| (n, v)))
        .collect()
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    let a: Vec<f32> = a.flatten_all().and_then(|t| t.to_vec1()).expect("a");
    let b: Vec<f32> = b.flatten_all().and_then(|t| t.to_vec1()).expect("b");
    a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()) && a.len() == b.len()
}

fn losses(dir: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(dir.join("train_log.jsonl"))
        .expect("log")
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json line");
            (
                v["step"].as_u64().expect("step"),
                v["loss"].as_f64().expect("loss"),
            )
        })
        .collect()
}

#[test]
fn finetune_overfits_and_generate_answers_verbatim() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = write_dataset(tmp.path());
    let out_dir = tmp.path().join("out");
    ok(&train(
        &data,
        &out_dir,
        &[
            "--stage",
            "finetune",
            "--batch-size",
            "8",
            "--max-steps",
            "50",
            "--lr",
            "3e-3",
        ],
    ));
    assert!(
        out_dir.join("loss.png").is_file(),
        "loss.png is drawn at the end"
    );
    let log = losses(&out_dir);
    assert_eq!(log.len(), 50);
    assert!(
        log[0].1 > 5.0 && log[49].1 < 0.01,
        "loss falls to near zero: {:?} → {:?}",
        log[0],
        log[49]
    );

    answers_verbatim(&out_dir, &[0, 3, 6]);

    // Stage 2 freezes the vision tower: bit-identical after training; the rest moved.
    let before = weights(&base_model());
    let after = weights(&out_dir);
    assert_eq!(before.len(), after.len(), "every tensor is saved");
    for (name, t) in &before {
        let unchanged = same(t, &after[name]);
        assert_eq!(
            unchanged,
            name.starts_with("vision_tower."),
            "{name}: frozen iff vision tower"
        );
    }
}

/// LLaVA-NeXT trains too: each image takes the positions its size asks for, the tower stays
/// frozen, `image_newline` moves with the decoder, and the checkpoint written answers verbatim
/// as a llava_next model.
#[test]
fn llava_next_finetune_overfits_and_its_checkpoint_answers() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = write_dataset(tmp.path());
    let out_dir = tmp.path().join("out");
    let base = fixtures().join("llava-next/model");
    ok(&train_command(
        &base,
        &data,
        &out_dir,
        &[
            "--stage",
            "finetune",
            "--batch-size",
            "8",
            "--max-steps",
            "40",
            "--lr",
            "3e-3",
        ],
    )
    .output()
    .expect("runs"));
    let log = losses(&out_dir);
    assert!(
        log[0].1 > 5.0 && log[39].1 < 0.05,
        "loss falls to near zero: {:?} → {:?}",
        log[0],
        log[39]
    );
    answers_verbatim(&out_dir, &[0, 4]);
    let before = weights(&base);
    let after = weights(&out_dir);
    assert_eq!(before.len(), after.len(), "every tensor is saved");
    for (name, t) in &before {
        assert_eq!(
            same(t, &after[name]),
            name.starts_with("vision_tower."),
            "{name}: frozen iff vision tower"
        );
    }
    assert!(after.contains_key("image_newline"));
}

/// A base whose tokenizer is a SentencePiece `tokenizer.model` only (as Vicuna ships it) trains,
/// and the checkpoint it writes carries that tokenizer, so it loads on its own.
#[test]
fn a_sentencepiece_only_base_trains_and_its_checkpoint_loads() {
    let tmp = tempfile::tempdir().expect("tmp");
    let base = tmp.path().join("base");
    std::fs::create_dir(&base).expect("mkdir");
    for entry in std::fs::read_dir(base_model()).expect("fixture") {
        let entry = entry.expect("entry");
        if entry.file_name() != "tokenizer.json" {
            std::fs::copy(entry.path(), base.join(entry.file_name())).expect("copy");
        }
    }
    let sentencepiece = fixtures().join("../tokenizers/sentencepiece/variants/legacy-false");
    for f in ["tokenizer.model", "tokenizer_config.json"] {
        std::fs::copy(sentencepiece.join(f), base.join(f)).expect("copy");
    }
    let data = write_dataset(tmp.path());
    let out_dir = tmp.path().join("out");
    ok(&train_command(
        &base,
        &data,
        &out_dir,
        &["--stage", "pretrain", "--max-steps", "1"],
    )
    .output()
    .expect("runs"));
    assert!(out_dir.join("tokenizer.model").is_file());
    assert!(!out_dir.join("tokenizer.json").exists());
    let out = Command::new(env!("CARGO_BIN_EXE_llava"))
        .args(["generate", "--model"])
        .arg(&out_dir)
        .arg("--image")
        .arg(fixtures().join("images/shapes_64x48.png"))
        .args([
            "--prompt",
            "What is in the picture?",
            "--max-new-tokens",
            "2",
        ])
        .output()
        .expect("runs");
    ok(&out);
}

#[test]
fn pretrain_moves_only_the_projector() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = write_dataset(tmp.path());
    let out_dir = tmp.path().join("stage1");
    let run = train(
        &data,
        &out_dir,
        &[
            "--stage",
            "pretrain",
            "--batch-size",
            "4",
            "--max-steps",
            "3",
        ],
    );
    ok(&run);
    // The run ends with its measured peak beside the plan's.
    if cfg!(target_os = "linux") {
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(
            stderr.contains("memory: peak") && stderr.contains("the plan (--dry-run) said"),
            "{stderr}"
        );
    }
    let before = weights(&base_model());
    let after = weights(&out_dir);
    for (name, t) in &before {
        let unchanged = same(t, &after[name]);
        assert_eq!(
            !unchanged,
            name.starts_with("multi_modal_projector."),
            "{name}: trained iff projector"
        );
    }
    let projector =
        candle_core::safetensors::load(out_dir.join("projector.safetensors"), &Device::Cpu)
            .expect("projector");
    assert_eq!(projector.len(), 4, "two linears' weights and biases");
    assert!(same(
        &projector["multi_modal_projector.linear_1.weight"],
        &after["multi_modal_projector.linear_1.weight"]
    ));
    // A second run into the same folder without --resume would overwrite it: refused.
    let again = train(
        &data,
        &out_dir,
        &["--stage", "pretrain", "--max-steps", "1"],
    );
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"));
    // Resuming with a setting that fixes the data order is refused, naming it and both values.
    let resume = out_dir.to_string_lossy().to_string();
    let changed = train(
        &data,
        &out_dir,
        &[
            "--stage",
            "pretrain",
            "--max-steps",
            "4",
            "--batch-size",
            "2",
            "--resume",
            resume.as_str(),
        ],
    );
    assert_eq!(changed.status.code(), Some(1));
    let err = String::from_utf8_lossy(&changed.stderr);
    assert!(err.contains("--batch-size was 4, now 2"), "{err}");
}

#[test]
fn killed_and_resumed_run_logs_the_same_losses() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = write_dataset(tmp.path());
    // 8 records in batches of 2: 4 steps per epoch, so 6 steps cross an epoch boundary.
    let args = [
        "--stage",
        "finetune",
        "--batch-size",
        "2",
        "--max-steps",
        "6",
        "--save-steps",
        "3",
        "--lr",
        "1e-3",
    ];
    let straight = tmp.path().join("straight");
    let clock = std::time::Instant::now();
    ok(&train(&data, &straight, &args));
    let wall = clock.elapsed().as_secs_f64();
    // `elapsed_s` is training time: rising, and never more than the run took (saving a
    // checkpoint once made it count the time before the save twice).
    let elapsed: Vec<f64> = std::fs::read_to_string(straight.join("train_log.jsonl"))
        .expect("log")
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json")["elapsed_s"]
                .as_f64()
                .expect("elapsed_s")
        })
        .collect();
    assert!(elapsed.windows(2).all(|w| w[0] <= w[1]), "{elapsed:?}");
    assert!(
        elapsed.last().is_some_and(|&e| e > 0.0 && e <= wall),
        "{elapsed:?} vs {wall} s"
    );

    let interrupted = tmp.path().join("interrupted");
    let mut child = train_command(&base_model(), &data, &interrupted, &args)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawns");
    let checkpoint = interrupted.join("checkpoint-3");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !checkpoint.join("trainer_state.json").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "checkpoint-3 never appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill(); // SIGKILL; it may also have finished already.
    let _ = child.wait();

    let mut resume_args = args.to_vec();
    let checkpoint_arg = checkpoint.to_string_lossy().to_string();
    resume_args.extend(["--resume", checkpoint_arg.as_str()]);
    let resumed = train(&data, &interrupted, &resume_args);
    ok(&resumed);
    let a = losses(&straight);
    let b = losses(&interrupted);
    assert_eq!(a.len(), 6);
    assert_eq!(
        a.iter().map(|x| x.0).collect::<Vec<_>>(),
        b.iter().map(|x| x.0).collect::<Vec<_>>(),
        "each step once"
    );
    assert_losses_close(&a, &b, 1.0);
}

#[test]
fn stage2_starts_from_the_stage1_projector() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = write_dataset(tmp.path());
    let stage1 = tmp.path().join("stage1");
    ok(&train(
        &data,
        &stage1,
        &[
            "--stage",
            "pretrain",
            "--batch-size",
            "8",
            "--max-steps",
            "3",
            "--no-shuffle",
        ],
    ));
    let base = base_model();
    let step1 = |model: &Path, out: &str, extra: &[&str]| {
        first_finetune_loss(model, &data, &tmp.path().join(out), extra)
    };
    let projector = stage1.join("projector.safetensors");
    let with_projector = step1(
        &base,
        "with-projector",
        &["--projector", &projector.to_string_lossy()],
    );
    let from_base = step1(&base, "from-base", &[]);
    // The same starting weights as continuing from the whole stage-1 checkpoint.
    let from_stage1 = step1(&stage1, "from-stage1", &[]);
    assert_eq!(
        with_projector, from_stage1,
        "--projector loads the stage-1 projector"
    );
    assert_ne!(
        with_projector, from_base,
        "and it differs from the untrained one"
    );
}

/// The original LLaVA's stage-1 output and projector releases: `mm_projector.bin` (a PyTorch
/// pickle, `model.mm_projector.0.*` / `.2.*`). The fixture holds the base model's projector
/// halved (`tools/make_bin_fixtures.py`); the same values as a safetensors projector in our
/// naming must give the same first loss, and both must differ from the base model's own.
#[test]
fn projector_loads_the_original_mm_projector_bin() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = write_dataset(tmp.path());
    let halved: HashMap<String, Tensor> = weights(&base_model())
        .into_iter()
        .filter(|(name, _)| name.starts_with("multi_modal_projector."))
        .map(|(name, t)| (name, (t * 0.5).expect("halve")))
        .collect();
    assert_eq!(halved.len(), 4, "two linears' weights and biases");
    let ours = tmp.path().join("halved.safetensors");
    candle_core::safetensors::save(&halved, &ours).expect("save");
    let step1 = |out: &str, extra: &[&str]| {
        first_finetune_loss(&base_model(), &data, &tmp.path().join(out), extra)
    };
    let original = fixtures().join("llava15-default/mm_projector.bin");
    let from_bin = step1("bin", &["--projector", &original.to_string_lossy()]);
    let from_ours = step1("ours", &["--projector", &ours.to_string_lossy()]);
    let from_base = step1("base", &[]);
    assert_eq!(from_bin, from_ours, "the same projector in either format");
    assert_ne!(from_bin, from_base, "and not the base model's own");
}

#[test]
fn unfreeze_vision_trains_the_tower() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = write_dataset(tmp.path());
    let out_dir = tmp.path().join("out");
    ok(&train(
        &data,
        &out_dir,
        &[
            "--stage",
            "pretrain",
            "--batch-size",
            "4",
            "--max-steps",
            "2",
            "--unfreeze-vision",
        ],
    ));
    let before = weights(&base_model());
    let after = weights(&out_dir);
    let name = "vision_tower.encoder.layers.0.self_attn.q_proj.weight";
    assert!(!same(&before[name], &after[name]), "{name} moved");
    let lm = "language_model.layers.0.self_attn.q_proj.weight";
    assert!(
        same(&before[lm], &after[lm]),
        "{lm} stays frozen in stage 1"
    );
}

#[test]
fn gradient_checkpointing_logs_the_same_losses() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = write_dataset(tmp.path());
    let run = |name: &str, extra: &[&str]| {
        let out_dir = tmp.path().join(name);
        let mut args = vec![
            "--stage",
            "finetune",
            "--batch-size",
            "4",
            "--max-steps",
            "3",
            "--lr",
            "1e-3",
        ];
        args.extend_from_slice(extra);
        ok(&train(&data, &out_dir, &args));
        (losses(&out_dir), weights(&out_dir))
    };
    let (plain, plain_weights) = run("plain", &[]);
    let (recomputed, recomputed_weights) = run("recomputed", &["--gradient-checkpointing"]);
    assert_eq!(plain.len(), 3);
    assert_losses_close(&plain, &recomputed, 0.0);
    // The steps moved the layers' weights, so their gradients reached the optimizer.
    let name = "language_model.layers.1.mlp.down_proj.weight";
    let base = weights(&base_model());
    assert!(
        !same(&base[name], &recomputed_weights[name]),
        "{name} trained"
    );
    let diff = (&plain_weights[name] - &recomputed_weights[name])
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|m| m.to_scalar::<f32>())
        .expect("diff");
    assert!(diff <= 1e-6, "{name} differs by {diff} after three steps");
}

#[test]
fn dry_run_prints_the_memory_plan_and_loads_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = write_dataset(tmp.path());
    let out_dir = tmp.path().join("out");
    let out = train(
        &data,
        &out_dir,
        &[
            "--stage",
            "finetune",
            "--batch-size",
            "2",
            "--dry-run",
            "--memory-budget",
            "1",
        ],
    );
    ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    for part in [
        "frozen weights",
        "gradients",
        "AdamW moments",
        "activations",
        "logits",
    ] {
        assert!(text.contains(part), "{part} in:\n{text}");
    }
    assert!(text.contains("expected peak"), "{text}");
    assert!(text.contains("largest batch size within 1 GB: "), "{text}");
    assert!(!out_dir.exists(), "a dry run writes nothing");
    // --bf16: the mode is named and the working copies get their line.
    let out = train(
        &data,
        &out_dir,
        &[
            "--stage",
            "finetune",
            "--batch-size",
            "2",
            "--dry-run",
            "--bf16",
        ],
    );
    ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    for part in ["bf16 mixed precision", "f32 masters", "bf16 working copies"] {
        assert!(text.contains(part), "{part} in:\n{text}");
    }
    // --zero 1 in a job of 4 ranks: the plan is per rank, with a quarter of the moments.
    let moments = |extra: &[&str]| {
        let mut args = vec!["--stage", "finetune", "--dry-run"];
        args.extend_from_slice(extra);
        let out = train(&data, &out_dir, &args);
        ok(&out);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let line = text
            .lines()
            .find(|l| l.contains("AdamW moments"))
            .unwrap_or_else(|| panic!("a moments line in:\n{text}"))
            .to_string();
        (text, line)
    };
    let (_, whole) = moments(&[]);
    let (text, quarter) = moments(&["--zero", "1", "--ranks", "4"]);
    assert!(text.contains("on each of 4 ranks"), "{text}");
    assert!(quarter.contains("this rank's 1/4"), "{quarter}");
    assert_ne!(whole, quarter);
}

/// The eight good records with the issue's three malformed ones among them: `conversations`
/// null, a number for `conversations`, and a turn without `from`.
fn write_dataset_with_bad_records(dir: &Path) -> PathBuf {
    let good = write_dataset(dir);
    let mut records: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&good).expect("read")).expect("json");
    records.insert(
        2,
        serde_json::json!({"id": "null-conversations", "image": IMAGES[0], "conversations": null}),
    );
    records.insert(5, serde_json::json!({"id": 1234, "conversations": 5}));
    records.push(serde_json::json!({"id": "no-from", "image": IMAGES[1],
        "conversations": [{"value": "<image>\nWhat is here?"}, {"from": "gpt", "value": "A square."}]}));
    std::fs::write(&good, serde_json::to_string(&records).expect("json")).expect("write");
    good
}

const BAD_IDS: [&str; 3] = ["null-conversations", "1234", "no-from"];

#[test]
fn malformed_records_are_skipped_by_id_and_the_rest_train() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = write_dataset_with_bad_records(tmp.path());
    let args = [
        "--stage",
        "finetune",
        "--batch-size",
        "4",
        "--max-steps",
        "2",
    ];
    let out_dir = tmp.path().join("out");
    // stderr is a pipe here: the warnings come without colour codes.
    let run = train(&data, &out_dir, &args);
    ok(&run);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        !stderr.contains('\x1b'),
        "no ANSI codes when piped:\n{stderr}"
    );
    for id in BAD_IDS {
        let warning = stderr
            .lines()
            .find(|l| l.contains("WARN") && l.contains(&format!("id={id}")))
            .unwrap_or_else(|| panic!("no warning names {id}:\n{stderr}"));
        assert!(
            warning.contains("skipping record: not a LLaVA record"),
            "{warning}"
        );
    }
    assert!(
        stderr.contains("8 records"),
        "the good eight train:\n{stderr}"
    );
    assert!(stderr.contains("skipped 3 bad records"), "{stderr}");
    assert_eq!(losses(&out_dir).len(), 2);

    // --strict stops at the first, by id.
    let strict = train(
        &data,
        &tmp.path().join("strict"),
        &[&args[..], &["--strict"]].concat(),
    );
    assert!(!strict.status.success());
    let stderr = String::from_utf8_lossy(&strict.stderr);
    assert!(
        stderr.contains("error:")
            && stderr.contains("record null-conversations: not a LLaVA record"),
        "{stderr}"
    );

    // --color always keeps the colours, even piped (and over NO_COLOR, which only sets `auto`).
    let coloured = train_command(&base_model(), &data, &tmp.path().join("colour"), &args)
        .args(["--color", "always"])
        .env("NO_COLOR", "1")
        .output()
        .expect("runs");
    ok(&coloured);
    let stderr = String::from_utf8_lossy(&coloured.stderr);
    assert!(
        stderr.contains("\x1b["),
        "colour codes with --color always:\n{stderr}"
    );
}

#[test]
fn a_dataset_that_is_not_json_fails_as_a_file() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data.json");
    std::fs::write(&data, "[{\"id\": 1, \"conversations\": [}").expect("write");
    let run = train(&data, &tmp.path().join("out"), &["--stage", "finetune"]);
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("not a JSON array of LLaVA records"),
        "{stderr}"
    );
}

/// A stage-2 LoRA run of rank 8 that over-fits the 8 samples in 40 steps of the whole set:
/// the LoRA and QLoRA learning tests.
const OVERFITTING_LORA: [&str; 15] = [
    "--stage",
    "finetune",
    "--lora",
    "--lora-r",
    "8",
    "--lora-alpha",
    "16",
    "--batch-size",
    "8",
    "--max-steps",
    "40",
    "--lr",
    "1e-2",
    "--mm-projector-lr",
    "1e-3",
];

/// Trains [`OVERFITTING_LORA`] with `extra` in a fresh folder and checks that the 8 samples were
/// learnt (the loss from above 5 to below 0.05); the folder and the run's output.
fn overfit_lora(extra: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = write_dataset(tmp.path());
    let out_dir = tmp.path().join("out");
    ok(&train(
        &data,
        &out_dir,
        &[&OVERFITTING_LORA[..], extra].concat(),
    ));
    let log = losses(&out_dir);
    assert!(
        log[0].1 > 5.0 && log[39].1 < 0.05,
        "{extra:?}: {:?} → {:?}",
        log[0],
        log[39]
    );
    (tmp, out_dir)
}

/// `--lora`: the pairs and the projector learn 8 samples by heart; every save (a mid-run
/// checkpoint and the output) is a peft adapter that `generate --model-base` answers from and
/// `merge-lora` merges; the optimizer state holds the trainables only.
#[test]
fn lora_overfits_and_every_save_answers_over_the_base() {
    let (tmp, out_dir) = overfit_lora(&["--save-steps", "30"]);
    let mid = out_dir.join("checkpoint-30");
    for dir in [&mid, &out_dir] {
        assert!(!dir.join("model.safetensors").exists(), "no full model");
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("adapter_config.json")).expect("config"),
        )
        .expect("json");
        assert_eq!(config["peft_type"], "LORA");
        assert_eq!(config["r"], 8);
        assert_eq!(config["modules_to_save"][0], "multi_modal_projector");
        let adapter =
            candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)
                .expect("adapter");
        // 3 layers × 7 projections × 2, and the projector's 4 tensors.
        assert_eq!(adapter.len(), 46, "{:?}", adapter.keys());
        assert!(adapter.contains_key(
            "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
        ));
        assert!(
            adapter.contains_key("base_model.model.model.multi_modal_projector.linear_1.weight")
        );
        let moments =
            candle_core::safetensors::load(dir.join("optimizer.safetensors"), &Device::Cpu)
                .expect("moments");
        assert_eq!(moments.len(), 2 * 46, "moments of the trainables only");
    }
    answers_verbatim_over(&mid, Some(&base_model()), &[], &[0, 3]);
    answers_verbatim_over(&out_dir, Some(&base_model()), &[], &[0, 3, 6]);

    let merged = tmp.path().join("merged");
    let out = Command::new(env!("CARGO_BIN_EXE_llava"))
        .arg("merge-lora")
        .arg("--model")
        .arg(&out_dir)
        .arg("--model-base")
        .arg(base_model())
        .arg("--out")
        .arg(&merged)
        .output()
        .expect("runs");
    ok(&out);
    answers_verbatim(&merged, &[0, 3, 6]);
    // The merge leaves the vision tower as it was and changes the decoder's projections.
    let (before, after) = (weights(&base_model()), weights(&merged));
    for (name, t) in &before {
        let unchanged = same(t, &after[name]);
        let adapted = name.starts_with("multi_modal_projector.")
            || (name.contains("_proj.weight") && name.starts_with("language_model."));
        assert_eq!(unchanged, !adapted, "{name}");
    }
}

/// A stage-2 LoRA run of rank 4 with dropout on, in batches of 4.
const SMALL_LORA: [&str; 11] = [
    "--stage",
    "finetune",
    "--lora",
    "--lora-r",
    "4",
    "--lora-alpha",
    "8",
    "--lora-dropout",
    "0.3",
    "--batch-size",
    "4",
];

/// With dropout on, a LoRA run killed after a save and resumed logs the losses of an
/// uninterrupted run: the masks follow the step, the adapter and moments are restored.
#[test]
fn a_resumed_lora_run_with_dropout_logs_the_same_losses() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = write_dataset(tmp.path());
    let mut args = SMALL_LORA.to_vec();
    args.extend(["--max-steps", "4", "--save-steps", "2", "--lr", "1e-2"]);
    let straight = tmp.path().join("straight");
    ok(&train(&data, &straight, &args));
    // The second half again, from the straight run's checkpoint-2, in a copy of its folder.
    let resumed = resume_in_copy(&straight, 2, &tmp.path().join("resumed"), &data, &args);
    let (a, b) = (losses(&straight), losses(&resumed));
    assert_eq!(a.len(), 4);
    assert_eq!(b.len(), 4);
    assert_losses_close(&a, &b, 1.0);
    // Dropout is on: the same run without it logs other losses from step 2 on (at step 1
    // `lora_B` is still zero, so the pairs add nothing either way).
    let no_dropout = tmp.path().join("no-dropout");
    let mut plain = args.to_vec();
    plain[8] = "0";
    ok(&train(&data, &no_dropout, &plain));
    let c = losses(&no_dropout);
    assert_eq!(c[0].1, a[0].1);
    assert_ne!(c[1].1, a[1].1);
}

/// LoRA under gradient checkpointing: the recomputed layers draw the same dropout masks and
/// their pairs get their gradients, so the losses are those without it.
#[test]
fn lora_with_gradient_checkpointing_logs_the_same_losses() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = write_dataset(tmp.path());
    let run = |name: &str, extra: &[&str]| {
        let out_dir = tmp.path().join(name);
        let mut args = SMALL_LORA.to_vec();
        args.extend(["--max-steps", "3", "--lr", "1e-2"]);
        args.extend_from_slice(extra);
        ok(&train(&data, &out_dir, &args));
        losses(&out_dir)
    };
    let plain = run("plain", &[]);
    let recomputed = run("recomputed", &["--gradient-checkpointing"]);
    assert_eq!(plain.len(), 3);
    assert!(plain[2].1 < plain[0].1, "the pairs trained: {plain:?}");
    assert_losses_close(&plain, &recomputed, 0.0);
}

/// QLoRA (`--bits 4` and `--bits 8`): the pairs learn 8 samples by heart over the quantized
/// base, the gradient reaching the lower layers' pairs through the frozen blocks (8 bits: the
/// integer products, the activations rounded to 8 bits in blocks); the adapter then answers
/// over the base held quantized as in training, and over the f32 base.
#[test]
fn qlora_overfits_and_answers_over_the_base() {
    for (bits, load) in [("4", "--load-4bit"), ("8", "--load-8bit")] {
        let (_tmp, out_dir) = overfit_lora(&["--bits", bits]);
        answers_verbatim_over(&out_dir, Some(&base_model()), &[load], &[0, 3, 6]);
        answers_verbatim_over(&out_dir, Some(&base_model()), &[], &[1, 5]);
    }
}

/// The dtype of every tensor in a safetensors file, by stored name.
fn dtypes(path: &Path) -> HashMap<String, llava_model::DType> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .expect("tensors")
        .into_iter()
        .map(|(k, v)| (k, v.dtype()))
        .collect()
}

/// `--bf16` (stage 2, full): it learns; its saves are bf16 by default (the model whole, with
/// the f32 masters beside the moments), f32 with `--save-dtype f32`; a run resumed from a
/// bf16 save logs the uninterrupted run's losses; and gradient checkpointing changes nothing.
#[test]
fn bf16_trains_saves_in_the_asked_dtype_and_resumes_exactly() {
    use llava_model::DType;
    let tmp = tempfile::tempdir().expect("tmp");
    let data = write_dataset(tmp.path());
    let args = [
        "--stage",
        "finetune",
        "--bf16",
        "--batch-size",
        "2",
        "--max-steps",
        "4",
        "--save-steps",
        "2",
        "--lr",
        "1e-3",
        "--no-shuffle",
    ];
    let straight = tmp.path().join("straight");
    ok(&train(&data, &straight, &args));
    let a = losses(&straight);
    assert_eq!(a.len(), 4);
    let saved = dtypes(&straight.join("model.safetensors"));
    assert!(
        saved.values().all(|&d| d == DType::BF16),
        "a --bf16 run saves bf16: {saved:?}"
    );
    let moments = dtypes(&straight.join("checkpoint-2/optimizer.safetensors"));
    let masters: Vec<_> = moments
        .keys()
        .filter(|k| k.starts_with("master."))
        .collect();
    assert!(!masters.is_empty(), "the f32 masters go with the moments");
    assert!(moments.values().all(|&d| d == DType::F32), "{moments:?}");

    // Resumed from checkpoint-2, in a copy of the run's folder.
    let resumed = resume_in_copy(&straight, 2, &tmp.path().join("resumed"), &data, &args);
    assert_losses_close(&a, &losses(&resumed), 1.0);

    let mut f32_args = args.to_vec();
    f32_args.extend(["--save-dtype", "f32", "--gradient-checkpointing"]);
    let wide = tmp.path().join("wide");
    ok(&train(&data, &wide, &f32_args));
    assert_losses_close(&a, &losses(&wide), 0.0);
    let saved = dtypes(&wide.join("model.safetensors"));
    assert!(saved.values().all(|&d| d == DType::F32), "{saved:?}");
    let moments = dtypes(&wide.join("optimizer.safetensors"));
    assert!(!moments.keys().any(|k| k.starts_with("master.")));
    // The same run in f32 logs other losses: the products really ran in bf16.
    let f32_run = tmp.path().join("f32");
    let plain: Vec<&str> = args.iter().copied().filter(|&a| a != "--bf16").collect();
    ok(&train(&data, &f32_run, &plain));
    let b = losses(&f32_run);
    assert_ne!(a[0].1, b[0].1);
    assert!((a[0].1 - b[0].1).abs() < 1e-2 * b[0].1, "{a:?} vs {b:?}");
}

/// `--bf16 --lora` with gradient checkpointing: the pairs learn, the adapter is saved in bf16
/// under peft's names, and the losses are those without checkpointing.
#[test]
fn bf16_lora_with_gradient_checkpointing_logs_the_same_losses() {
    use llava_model::DType;
    let tmp = tempfile::tempdir().expect("tmp");
    let data = write_dataset(tmp.path());
    let run = |name: &str, extra: &[&str]| {
        let out_dir = tmp.path().join(name);
        let mut args = SMALL_LORA.to_vec();
        args.extend(["--bf16", "--max-steps", "3", "--lr", "1e-2"]);
        args.extend_from_slice(extra);
        ok(&train(&data, &out_dir, &args));
        out_dir
    };
    let plain = run("plain", &[]);
    let recomputed = run("recomputed", &["--gradient-checkpointing"]);
    let (a, b) = (losses(&plain), losses(&recomputed));
    assert_eq!(a.len(), 3);
    assert!(a[2].1 < a[0].1, "the pairs trained: {a:?}");
    assert_losses_close(&a, &b, 0.0);
    let adapter = dtypes(&plain.join("adapter_model.safetensors"));
    assert!(
        adapter.keys().any(|k| k.contains(".lora_A."))
            && adapter.values().all(|&d| d == DType::BF16),
        "{adapter:?}"
    );
}
