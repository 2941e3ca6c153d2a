//! `mpirun -np 2 llava train` against one process (a build with `--features mpi`; CI installs
//! OpenMPI): two ranks of batch 1 must log the losses and grad norms, and end at the weights,
//! of one process with `--batch-size 1 --grad-accum 2`, on samples of unequal length, for both
//! stages. A rank killed mid-run ends the job, naming the rank, and a resume from the last
//! checkpoint logs the uninterrupted run's losses.
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use llava_model::{Device, Tensor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models")
}

/// Six records whose answers differ in length, so the ranks hold different token counts.
fn write_dataset(dir: &Path) -> PathBuf {
    let answers = [
        "A red circle.",
        "It is blue, a deep blue like the sea at noon.",
        "Two.",
        "A green triangle on grey, with a small square beside it and nothing else at all.",
        "On the left side.",
        "Yes, there is one circle near the top.",
    ];
    let images = ["shapes_64x48.png", "tall_40x60.png", "texture_45x45.png"];
    let records: Vec<serde_json::Value> = answers
        .iter()
        .enumerate()
        .map(|(i, a)| {
            serde_json::json!({"id": i, "image": images[i % 3], "conversations": [
                {"from": "human", "value": "<image>\nWhat do you see?"},
                {"from": "gpt", "value": a}]})
        })
        .collect();
    let path = dir.join("data.json");
    std::fs::write(&path, serde_json::to_string(&records).expect("json")).expect("write");
    path
}

fn train_args(data: &Path, output: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec!["train".into(), "--model".into()];
    args.push(
        fixtures()
            .join("llava15-default/model")
            .to_string_lossy()
            .into(),
    );
    for (flag, value) in [
        ("--data", data.to_path_buf()),
        ("--image-folder", fixtures().join("images")),
        ("--output", output.to_path_buf()),
    ] {
        args.push(flag.into());
        args.push(value.to_string_lossy().into());
    }
    for a in [
        "--lr-scheduler",
        "constant",
        "--warmup-ratio",
        "0",
        "--lr",
        "1e-3",
        "--batch-size",
        "1",
    ]
    .iter()
    .chain(extra)
    {
        args.push(a.to_string());
    }
    args
}

fn mpirun(ranks: usize) -> Command {
    let mut cmd = Command::new("mpirun");
    // CI runs as root on 2 cores.
    cmd.args(["--allow-run-as-root", "--oversubscribe", "-np"])
        .arg(ranks.to_string())
        .arg(env!("CARGO_BIN_EXE_llava"));
    // Each job its own session directory: OpenMPI makes one under TMPDIR, and two jobs of
    // the parallel tests starting at once raced on the same path ("mkdir ... File exists").
    static JOBS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = JOBS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("llava-mpi-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("an MPI session folder");
    cmd.env("TMPDIR", dir);
    cmd
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `(loss, grad_norm)` per step of a run's log.
fn log(dir: &Path) -> Vec<(f64, f64)> {
    std::fs::read_to_string(dir.join("train_log.jsonl"))
        .expect("log")
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("line");
            (
                v["loss"].as_f64().expect("loss"),
                v["grad_norm"].as_f64().expect("norm"),
            )
        })
        .collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * a.abs().max(b.abs())
}

/// The trained tensors: the model, or a LoRA run's peft adapter.
fn weights(dir: &Path) -> std::collections::HashMap<String, Tensor> {
    let adapter = dir.join("adapter_model.safetensors");
    let file = match adapter.exists() {
        true => adapter,
        false => dir.join("model.safetensors"),
    };
    candle_core::safetensors::load(file, &Device::Cpu).expect("weights")
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|m| m.to_scalar::<f32>())
        .expect("diff")
}

fn assert_same_run(one: &Path, two: &Path) {
    let (a, b) = (log(one), log(two));
    assert_eq!(a.len(), b.len());
    assert!(!a.is_empty());
    for (step, ((la, na), (lb, nb))) in a.iter().zip(&b).enumerate() {
        assert!(close(*la, *lb), "step {}: loss {la} vs {lb}", step + 1);
        assert!(close(*na, *nb), "step {}: grad norm {na} vs {nb}", step + 1);
    }
    let (wa, wb) = (weights(one), weights(two));
    assert_eq!(wa.len(), wb.len());
    for (name, ta) in &wa {
        let diff = max_diff(ta, &wb[name]);
        assert!(diff <= 1e-6, "{name} differs by {diff}");
    }
}

#[test]
fn two_ranks_equal_one_process_with_grad_accum_two() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = write_dataset(tmp.path());
    for stage in ["finetune", "pretrain"] {
        let one = tmp.path().join(format!("one-{stage}"));
        let two = tmp.path().join(format!("two-{stage}"));
        let extra = ["--stage", stage, "--max-steps", "3"];
        let mut single = vec!["--grad-accum", "2"];
        single.extend_from_slice(&extra);
        ok(&Command::new(env!("CARGO_BIN_EXE_llava"))
            .args(train_args(&data, &one, &single))
            .output()
            .expect("runs"));
        ok(&mpirun(2)
            .args(train_args(&data, &two, &extra))
            .output()
            .expect("mpirun runs"));
        assert_same_run(&one, &two);
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read").flatten() {
        let target = to.join(entry.file_name());
        match entry.path().is_dir() {
            true => copy_dir(&entry.path(), &target),
            false => drop(std::fs::copy(entry.path(), &target).expect("copy")),
        }
    }
}

/// `--zero 1`: each rank keeps the moments of its share of the tensors, and the run is the
/// unsharded one (stage 2 in full, and LoRA). Its checkpoint holds one optimizer file per rank,
/// which together hold the unsharded run's moments; it resumes on 2 ranks and, with a note, on
/// one process.
#[test]
fn zero_one_equals_unsharded_training_and_resumes_on_another_rank_count() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = write_dataset(tmp.path());
    for lora in [false, true] {
        let name = if lora { "lora" } else { "full" };
        let one = tmp.path().join(format!("one-{name}"));
        let two = tmp.path().join(format!("two-{name}"));
        let mut extra = vec![
            "--stage",
            "finetune",
            "--max-steps",
            "4",
            "--save-steps",
            "2",
        ];
        if lora {
            extra.extend_from_slice(&["--lora", "--lora-r", "4", "--lora-dropout", "0"]);
        }
        let mut single = vec!["--grad-accum", "2"];
        single.extend_from_slice(&extra);
        ok(&Command::new(env!("CARGO_BIN_EXE_llava"))
            .args(train_args(&data, &one, &single))
            .output()
            .expect("runs"));
        let mut sharded = vec!["--zero", "1"];
        sharded.extend_from_slice(&extra);
        ok(&mpirun(2)
            .args(train_args(&data, &two, &sharded))
            .output()
            .expect("mpirun runs"));
        assert_same_run(&one, &two);

        // The two shards are disjoint and hold the unsharded moments.
        let checkpoint = two.join("checkpoint-2");
        assert!(!checkpoint.join("optimizer.safetensors").exists());
        let unsharded = candle_core::safetensors::load(
            one.join("checkpoint-2/optimizer.safetensors"),
            &Device::Cpu,
        )
        .expect("moments");
        let mut seen = std::collections::HashMap::new();
        for rank in 0..2 {
            let file = checkpoint.join(format!("optimizer-0000{rank}-of-00002.safetensors"));
            let shard = candle_core::safetensors::load(&file, &Device::Cpu).expect("shard");
            assert!(!shard.is_empty(), "rank {rank} keeps some moments");
            for (n, t) in shard {
                assert!(seen.insert(n, t).is_none(), "a moment in two shards");
            }
        }
        assert_eq!(seen.len(), unsharded.len());
        for (n, t) in &unsharded {
            let diff = max_diff(t, &seen[n]);
            assert!(diff <= 1e-6, "{n} differs by {diff}");
        }

        // Resumed on 2 ranks, and on one process with the same global batch.
        for (ranks, dir) in [(2, "again"), (1, "alone")] {
            let out = tmp.path().join(format!("{dir}-{name}"));
            copy_dir(&two, &out);
            let from = out.join("checkpoint-2").to_string_lossy().to_string();
            let mut resume = extra.clone();
            resume.extend_from_slice(&["--resume", &from]);
            let run = match ranks {
                2 => {
                    resume.extend_from_slice(&["--zero", "1"]);
                    mpirun(2).args(train_args(&data, &out, &resume)).output()
                }
                _ => {
                    resume.extend_from_slice(&["--grad-accum", "2"]);
                    Command::new(env!("CARGO_BIN_EXE_llava"))
                        .args(train_args(&data, &out, &resume))
                        .output()
                }
            }
            .expect("resume runs");
            ok(&run);
            let stderr = String::from_utf8_lossy(&run.stderr);
            assert_eq!(
                stderr.contains("saved by 2 rank(s) and continues on 1"),
                ranks == 1,
                "{stderr}"
            );
            assert_same_run(&one, &out);
        }
    }
}

/// The pids of this job's rank-1 processes, found by the rank mpirun put in their environment.
fn rank_one_pids(mpirun_pid: u32) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let parent = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .and_then(|p| p.trim().parse::<u32>().ok());
        let rank_one = environ
            .split(|&b| b == 0)
            .any(|v| v == b"OMPI_COMM_WORLD_RANK=1");
        if rank_one && parent == Some(mpirun_pid) {
            pids.push(pid);
        }
    }
    pids
}

#[test]
fn a_killed_rank_ends_the_job_and_the_run_resumes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = write_dataset(tmp.path());
    let extra = [
        "--stage",
        "finetune",
        "--max-steps",
        "40",
        "--save-steps",
        "2",
    ];
    let whole = tmp.path().join("whole");
    ok(&mpirun(2)
        .args(train_args(&data, &whole, &extra))
        .output()
        .expect("mpirun runs"));

    // The same run, with rank 1 killed once checkpoint-2 exists.
    let broken = tmp.path().join("broken");
    let mut job = mpirun(2)
        .args(train_args(&data, &broken, &extra))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpirun starts");
    let start = Instant::now();
    while !broken.join("checkpoint-2/trainer_state.json").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no checkpoint-2"
        );
        assert!(
            job.try_wait().expect("wait").is_none(),
            "the job ended early"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pids = rank_one_pids(job.id());
    assert_eq!(pids.len(), 1, "one rank-1 process");
    // SAFETY: sends SIGKILL to a process this test's job started.
    unsafe { libc::kill(pids[0], libc::SIGKILL) };
    let killed = Instant::now();
    let out = job.wait_with_output().expect("job ends");
    assert!(
        killed.elapsed() < Duration::from_secs(60),
        "the job took {:?} to end",
        killed.elapsed()
    );
    assert!(!out.status.success(), "a job with a dead rank fails");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("rank 1"),
        "the lost rank is named: {stderr}"
    );

    // The last checkpoint is intact: resuming it gives the uninterrupted run's losses.
    let last = std::fs::read_dir(&broken)
        .expect("output")
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            name.strip_prefix("checkpoint-")?.parse::<u64>().ok()
        })
        .max()
        .expect("a checkpoint");
    let checkpoint = broken.join(format!("checkpoint-{last}"));
    let checkpoint = checkpoint.to_string_lossy().to_string();
    let mut resume: Vec<&str> = extra.to_vec();
    resume.extend_from_slice(&["--resume", &checkpoint]);
    ok(&mpirun(2)
        .args(train_args(&data, &broken, &resume))
        .output()
        .expect("resume runs"));
    let (a, b) = (log(&whole), log(&broken));
    assert_eq!(a.len(), 40);
    assert_eq!(
        b.len(),
        40,
        "steps 1-{last} kept, the rest after the resume"
    );
    for (step, ((la, _), (lb, _))) in a.iter().zip(&b).enumerate() {
        assert!(close(*la, *lb), "step {}: {la} vs {lb}", step + 1);
    }
}

#[test]
fn ranks_with_no_usable_record_stop_with_a_message() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("bad.json");
    let records: Vec<serde_json::Value> = (0..3)
        .map(|i| {
            serde_json::json!({"id": i, "image": format!("missing-{i}.png"), "conversations": [
                {"from": "human", "value": "<image>\nWhat is here?"},
                {"from": "gpt", "value": "Nothing."}]})
        })
        .collect();
    std::fs::write(&data, serde_json::to_string(&records).expect("json")).expect("write");
    let out = mpirun(2)
        .args(train_args(
            &data,
            &tmp.path().join("out"),
            &["--stage", "finetune", "--max-steps", "2"],
        ))
        .output()
        .expect("mpirun runs");
    assert!(!out.status.success(), "the job fails");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no usable record"), "{stderr}");
}

/// `--bf16` under `--zero 1`: the weights are saved in bf16, each rank writes the f32 masters
/// of the tensors whose moments it keeps beside them, and a resume on 2 ranks sets every
/// tensor's master back on every rank, so it logs the uninterrupted run's losses.
#[test]
fn zero_one_under_bf16_resumes_from_the_masters() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = write_dataset(tmp.path());
    let name = "bf16";
    let straight = tmp.path().join(format!("straight{name}"));
    let mut extra = vec![
        "--stage",
        "finetune",
        "--max-steps",
        "4",
        "--save-steps",
        "2",
        "--zero",
        "1",
    ];
    extra.push("--bf16");
    ok(&mpirun(2)
        .args(train_args(&data, &straight, &extra))
        .output()
        .expect("mpirun runs"));
    let checkpoint = straight.join("checkpoint-2");
    let mut masters = std::collections::HashSet::new();
    for rank in 0..2 {
        let file = checkpoint.join(format!("optimizer-0000{rank}-of-00002.safetensors"));
        let shard = candle_core::safetensors::load(&file, &Device::Cpu).expect("shard");
        assert!(shard.keys().any(|k| k.starts_with("exp_avg.")));
        for (n, t) in shard {
            assert_eq!(t.dtype(), llava_model::DType::F32, "{n}");
            if let Some(name) = n.strip_prefix("master.") {
                assert!(
                    masters.insert(name.to_string()),
                    "{name}'s master in two shards"
                );
            }
        }
    }
    let saved = candle_core::safetensors::load(checkpoint.join("model.safetensors"), &Device::Cpu)
        .expect("model");
    assert!(
        saved
            .values()
            .all(|t| t.dtype() == llava_model::DType::BF16)
    );
    assert!(!masters.is_empty());

    let again = tmp.path().join(format!("again{name}"));
    copy_dir(&straight, &again);
    let from = again.join("checkpoint-2").to_string_lossy().to_string();
    let mut resume = extra.clone();
    resume.extend_from_slice(&["--resume", &from]);
    ok(&mpirun(2)
        .args(train_args(&data, &again, &resume))
        .output()
        .expect("resume runs"));
    let (a, b) = (log(&straight), log(&again));
    assert_eq!(a.len(), 4);
    assert_eq!(a.len(), b.len());
    for (step, ((la, na), (lb, nb))) in a.iter().zip(&b).enumerate() {
        assert!(
            close(*la, *lb),
            "{name} step {}: loss {la} vs {lb}",
            step + 1
        );
        assert!(
            close(*na, *nb),
            "{name} step {}: grad norm {na} vs {nb}",
            step + 1
        );
    }
}
