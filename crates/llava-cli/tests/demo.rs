//! `llava demo --quick`, the whole pipeline at toy size: every stage runs and lowers its loss,
//! every file is written, the benchmark is answered and scored for every question kind, and a
//! rerun of the same command resumes instead of redoing the work.
//!
//! The quick run is too short to learn the world; the accuracy targets belong to the full demo
//! (see BENCHMARKS.md), so this test does not assert them.

use std::path::Path;
use std::process::Command;

fn llava() -> Command {
    Command::new(env!("CARGO_BIN_EXE_llava"))
}

fn overall(report: &serde_json::Value, model: &str, form: &str) -> f64 {
    report["accuracy"]
        .as_array()
        .and_then(|rows| {
            rows.iter()
                .find(|r| r["model"] == model && r["form"] == form)
        })
        .and_then(|r| r["summary"]["overall"]["accuracy"].as_f64())
        .unwrap_or_else(|| panic!("no {form} accuracy for {model} in the report"))
}

#[test]
fn quick_demo_runs_every_stage_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let run = llava()
        .args(["demo", "--quick", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "demo failed:\n{stderr}");
    // Each stage loads every weight it was handed.
    assert!(!stderr.contains("not used by the model"), "{stderr}");

    for f in [
        "report.md",
        "report.json",
        "plan.json",
        "world/annotations/captions_train.json",
        "world/annotations/instances_test.json",
        "instruct/train/llava_instruct.json",
        "data/stage2.json",
        "init/tokenizer.json",
        "stage0_tower/loss.png",
        "stage0_tower/tower_accuracy.json",
        "stage0/loss.png",
        "stage1/loss.png",
        "stage2/loss.png",
        "stage2/config.json",
        "stage1/projector.safetensors",
        "eval/stage2_mc_answers.jsonl",
        "eval/bench_reviews.jsonl",
    ] {
        assert!(out.join(f).is_file(), "{f} is missing");
    }

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let plan = &report["plan"];
    let stages = report["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 4);
    for (s, (key, folder)) in stages.iter().zip([
        ("tower", "stage0_tower"),
        ("stage0", "stage0"),
        ("stage1", "stage1"),
        ("stage2", "stage2"),
    ]) {
        assert_eq!(s["steps"], plan[key]["steps"], "{key} ran its steps");
        assert_eq!(s["folder"], folder);
        let last = s["final_loss"].as_f64().unwrap();
        assert!(last.is_finite() && last > 0.0, "{key}: final loss {last}");
        if key != "stage1" {
            // Stage 1 starts from a fresh projector behind a trained decoder: a few steps need
            // not lower it. The other stages fall steadily; single steps are noisy, so compare
            // the first and last quarters of the log.
            let losses: Vec<f64> =
                std::fs::read_to_string(out.join(folder).join("train_log.jsonl"))
                    .unwrap()
                    .lines()
                    .map(|l| {
                        serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                            .as_f64()
                            .unwrap()
                    })
                    .collect();
            let q = (losses.len() / 4).max(1);
            let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
            let (early, late) = (mean(&losses[..q]), mean(&losses[losses.len() - q..]));
            assert!(late < early, "{key}: loss {early} → {late} did not fall");
        }
    }
    assert!(report["teacher_requests"].as_u64().unwrap() > 0);
    assert!(
        report["teacher_refused"].as_u64().unwrap() > 0,
        "the retry path ran"
    );
    assert_eq!(report["samples"].as_array().unwrap().len(), 3);

    // Every question kind was asked and scored, before and after stage 2, in both forms, and
    // of the final model with the scene in words.
    let forms: Vec<(&str, &str)> = report["accuracy"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["model"].as_str().unwrap(), r["form"].as_str().unwrap()))
        .collect();
    assert_eq!(
        forms,
        [
            ("before stage 2", "short"),
            ("before stage 2", "mc"),
            ("after stage 2", "short"),
            ("after stage 2", "mc"),
            ("after stage 2", "words"),
        ]
    );
    for row in report["accuracy"].as_array().unwrap() {
        let cats = row["summary"]["categories"].as_object().unwrap();
        for kind in ["colour", "shape", "count", "position"] {
            assert!(cats[kind]["total"].as_u64().unwrap() > 0, "{kind} in {row}");
        }
    }
    let after = overall(&report, "after stage 2", "mc");
    // The tower's heads were scored on the held-out pictures, task by task.
    let tower = report["tower_accuracy"].as_array().unwrap();
    let tasks: Vec<&str> = tower.iter().map(|t| t["task"].as_str().unwrap()).collect();
    assert_eq!(tasks, ["colour", "count", "shape", "order"]);
    for t in tower {
        let a = t["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&a), "{t}");
    }
    // Stage 0's captions of every test picture were generated and checked.
    let captions = &report["stage0_captions"];
    assert_eq!(captions["captions"], plan["test_scenes"], "{captions}");
    assert!(captions["objects"].as_u64().unwrap() >= captions["captions"].as_u64().unwrap());

    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for needle in [
        "| colour |",
        "in words, after",
        "| count |",
        "stage0/loss.png",
        "stage0_tower/loss.png",
        "Stage 0a's heads on the held-out pictures",
        "llava train --stage pretrain",
        "Stage 0's captions of",
    ] {
        assert!(md.contains(needle), "report.md lacks {needle:?}");
    }

    // The same command again finds every step done.
    let again = llava()
        .args(["demo", "--quick", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "rerun failed:\n{stderr}");
    for done in [
        "world already written",
        "model already initialised",
        "tower already pretrained",
        "already trained",
    ] {
        assert!(
            stderr.contains(done),
            "rerun did not skip ({done}):\n{stderr}"
        );
    }
    let report2: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(overall(&report2, "after stage 2", "mc"), after);

    // Another plan in the same folder is refused rather than mixed in.
    let clash = llava().args(["demo", "--out"]).arg(&out).output().unwrap();
    assert!(!clash.status.success());
    assert!(String::from_utf8_lossy(&clash.stderr).contains("different plan"));
    assert!(Path::new(&out).join("report.md").is_file());
}

#[test]
fn bad_plans_are_refused_with_a_message() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        ("{not json", "--plan"),
        (
            r#"{"seed":0,"train_scenes":10,"val_scenes":1,"test_scenes":2,"instruct_images":2,"bench_images":1,"vocab_size":512,
               "model":{"image_size":16,"patch_size":8,"vision_hidden":128,"vision_layers":4,"text_hidden":192,"text_intermediate":512,"text_layers":3,"text_heads":3},
               "stage0":{"steps":1,"batch_size":1,"lr":0.001},"stage1":{"steps":1,"batch_size":1,"lr":0.001},"stage2":{"steps":1,"batch_size":1,"lr":0.001}}"#,
            "image_size",
        ),
        (
            r#"{"seed":0,"train_scenes":10,"val_scenes":1,"test_scenes":2,"instruct_images":2,"bench_images":1,"vocab_size":512,
               "model":{"image_size":64,"patch_size":8,"vision_hidden":128,"vision_layers":4,"text_hidden":192,"text_intermediate":512,"text_layers":3,"text_heads":3},
               "tower_shape_weight":-1,
               "stage0":{"steps":1,"batch_size":1,"lr":0.001},"stage1":{"steps":1,"batch_size":1,"lr":0.001},"stage2":{"steps":1,"batch_size":1,"lr":0.001}}"#,
            "tower_shape_weight",
        ),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let plan = tmp.path().join(format!("plan{i}.json"));
        std::fs::write(&plan, text).unwrap();
        let out = llava()
            .args(["demo", "--out"])
            .arg(tmp.path().join(format!("out{i}")))
            .arg("--plan")
            .arg(&plan)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
