//! `llava demo --quick`, the whole pipeline at CI size: every stage runs, every file is
//! written, the final model beats chance clearly and beats the model before stage 2, and a
//! rerun of the same command resumes instead of redoing the work.

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
fn quick_demo_runs_every_stage_and_learns() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let run = llava()
        .args(["demo", "--quick", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "demo failed:\n{stderr}");

    for f in [
        "report.md",
        "report.json",
        "plan.json",
        "world/annotations/captions_train.json",
        "world/annotations/instances_test.json",
        "instruct/train/llava_instruct.json",
        "data/stage2.json",
        "init/tokenizer.json",
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
    assert_eq!(stages.len(), 3);
    for (s, key) in stages.iter().zip(["stage0", "stage1", "stage2"]) {
        assert_eq!(s["steps"], plan[key]["steps"], "{key} ran its steps");
        let (first, last) = (
            s["first_loss"].as_f64().unwrap(),
            s["final_loss"].as_f64().unwrap(),
        );
        assert!(last < first, "{key}: loss {first} → {last} did not fall");
    }
    assert!(report["teacher_requests"].as_u64().unwrap() > 0);
    assert_eq!(report["samples"].as_array().unwrap().len(), 3);

    // Chance over the quick benchmark's mix of kinds is about 30% for multiple choice.
    let after = overall(&report, "after stage 2", "mc");
    let before = overall(&report, "before stage 2", "mc");
    assert!(after >= 45.0, "multiple-choice accuracy {after}% is not clearly above chance");
    assert!(after > before + 10.0, "stage 2 did not help: {before}% → {after}%");

    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for needle in ["| colour |", "| count |", "stage0/loss.png", "llava train --stage pretrain"] {
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
    for done in ["world already written", "model already initialised", "already trained"] {
        assert!(stderr.contains(done), "rerun did not skip ({done}):\n{stderr}");
    }
    let report2: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(overall(&report2, "after stage 2", "mc"), after);

    // Another plan in the same folder is refused rather than mixed in.
    let clash = llava()
        .args(["demo", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!clash.status.success());
    assert!(String::from_utf8_lossy(&clash.stderr).contains("different plan"));
    assert!(Path::new(&out).join("report.md").is_file());
}
