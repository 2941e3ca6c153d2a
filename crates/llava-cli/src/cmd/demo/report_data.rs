//! The demo's figures, gathered step by step, and `report.md` / `report.json` made from them.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use llava_demo::caption_check::CaptionScore;
use llava_demo::questions::Kind;
use llava_eval::mc::McSummary;
use llava_train::tower::TaskAccuracy;
use serde::Serialize;

use super::{Layout, Plan};

/// One training stage as it ran.
#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    pub name: String,
    pub folder: String,
    pub steps: u64,
    pub seconds: f64,
    pub first_loss: f64,
    pub final_loss: f64,
    /// The `llava` command line that ran it.
    pub command: String,
}

impl StageReport {
    /// Reads the stage's figures from its `train_log.jsonl`; `command` is what ran it.
    pub fn read(name: &str, output: &Path, command: String) -> Result<StageReport> {
        let log = output.join("train_log.jsonl");
        let text =
            std::fs::read_to_string(&log).with_context(|| format!("reading {}", log.display()))?;
        let lines: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let field = |v: Option<&serde_json::Value>, k: &str| {
            v.and_then(|v| v.get(k))
                .and_then(|x| x.as_f64())
                .unwrap_or(f64::NAN)
        };
        Ok(StageReport {
            name: name.into(),
            folder: output
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            steps: field(lines.last(), "step") as u64,
            seconds: field(lines.last(), "elapsed_s"),
            first_loss: field(lines.first(), "loss"),
            final_loss: field(lines.last(), "loss"),
            command,
        })
    }
}

/// Accuracy of one model on one form of the benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct AccuracyRow {
    pub model: String,
    pub form: String,
    pub summary: McSummary,
}

/// A question asked of the final model about a test image.
#[derive(Debug, Clone, Serialize)]
pub struct SampleChat {
    pub image: String,
    pub turns: Vec<(String, String)>,
}

#[derive(Debug, Serialize)]
pub struct ReportBuilder {
    pub plan: Plan,
    pub quick: bool,
    pub teacher_requests: u64,
    /// Requests the teacher refused with 429 (and the client retried).
    pub teacher_refused: u64,
    pub datasets: Vec<(String, usize)>,
    pub stages: Vec<StageReport>,
    /// Stage 0a's heads on the held-out pictures.
    pub tower_accuracy: Vec<TaskAccuracy>,
    pub accuracy: Vec<AccuracyRow>,
    pub judge: Option<serde_json::Value>,
    /// Stage 0's captions of held-out pictures, checked against the scenes.
    pub stage0_captions: Option<CaptionScore>,
    pub samples: Vec<SampleChat>,
    pub total_seconds: f64,
}

impl ReportBuilder {
    pub fn new(plan: &Plan, quick: bool) -> Self {
        ReportBuilder {
            plan: plan.clone(),
            quick,
            teacher_requests: 0,
            teacher_refused: 0,
            datasets: Vec::new(),
            stages: Vec::new(),
            tower_accuracy: Vec::new(),
            accuracy: Vec::new(),
            judge: None,
            stage0_captions: None,
            samples: Vec::new(),
            total_seconds: 0.0,
        }
    }

    pub fn add_accuracy(&mut self, model: &str, form: &str, summary: &McSummary) {
        self.accuracy.push(AccuracyRow {
            model: model.into(),
            form: form.into(),
            summary: summary.clone(),
        });
    }

    fn accuracy_of(&self, model: &str, form: &str, kind: Option<&str>) -> Option<f64> {
        let row = self
            .accuracy
            .iter()
            .find(|r| r.model == model && r.form == form)?;
        match kind {
            Some(k) => row.summary.categories.get(k)?.accuracy,
            None => row.summary.overall.accuracy,
        }
    }

    pub fn write(&self, layout: &Layout) -> Result<()> {
        let json = serde_json::to_string_pretty(self)?;
        std::fs::write(layout.out.join("report.json"), json)?;
        std::fs::write(layout.out.join("report.md"), self.markdown())?;
        Ok(())
    }

    fn markdown(&self) -> String {
        let mut m = String::new();
        let pct = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.1}%"));
        let _ = writeln!(m, "# llava demo: the shapes world\n");
        let _ = writeln!(
            m,
            "{} run, seed {}, {:.0} s in all.\n",
            if self.quick { "Quick (CI)" } else { "Full" },
            self.plan.seed,
            self.total_seconds
        );
        let _ = writeln!(m, "## Accuracy on held-out test scenes\n");
        let _ = writeln!(
            m,
            "Short answer = exact match after normalisation; MC = multiple choice (chance in brackets). \
             *Before* is the model after stage 1, *after* the final model. *In words* asks the \
             final model the short-answer questions with the scene written out as a sentence \
             and no picture: what its decoder does when seeing is not the problem.\n"
        );
        let _ = writeln!(
            m,
            "| kind | short, before | short, after | MC, before | MC, after (chance) | in words, after |"
        );
        let _ = writeln!(m, "|---|---|---|---|---|---|");
        let (b, a) = ("before stage 2", "after stage 2");
        for k in Kind::ALL {
            let name = k.name();
            let _ = writeln!(
                m,
                "| {name} | {} | {} | {} | {} ({:.0}%) | {} |",
                pct(self.accuracy_of(b, "short", Some(name))),
                pct(self.accuracy_of(a, "short", Some(name))),
                pct(self.accuracy_of(b, "mc", Some(name))),
                pct(self.accuracy_of(a, "mc", Some(name))),
                k.chance() * 100.0,
                pct(self.accuracy_of(a, "words", Some(name))),
            );
        }
        let _ = writeln!(
            m,
            "| **overall** | {} | {} | {} | {} | {} |\n",
            pct(self.accuracy_of(b, "short", None)),
            pct(self.accuracy_of(a, "short", None)),
            pct(self.accuracy_of(b, "mc", None)),
            pct(self.accuracy_of(a, "mc", None)),
            pct(self.accuracy_of(a, "words", None)),
        );
        if let Some(j) = &self.judge {
            let _ = writeln!(m, "## LLaVA-Bench-style judged answers\n");
            let _ = writeln!(
                m,
                "The teacher's first question about held-out images, its own answer as the \
                 reference, and the offline teacher as the judge. The rule-based judge checks \
                 facts only (which objects are there, counts, left/right), so the score measures \
                 accuracy, not helpfulness or detail.\n"
            );
            let _ = writeln!(m, "| category | relative | model | reference | reviews |");
            let _ = writeln!(m, "|---|---|---|---|---|");
            let row = |name: &str, v: &serde_json::Value| {
                let f = |k: &str| v.get(k).and_then(|x| x.as_f64());
                format!(
                    "| {name} | {} | {} | {} | {} |",
                    f("relative").map_or("–".into(), |x| format!("{x:.1}%")),
                    f("model_mean").map_or("–".into(), |x| format!("{x:.2}")),
                    f("reference_mean").map_or("–".into(), |x| format!("{x:.2}")),
                    f("count").unwrap_or(0.0)
                )
            };
            if let Some(cats) = j.get("categories").and_then(|c| c.as_object()) {
                for (name, v) in cats {
                    let _ = writeln!(m, "{}", row(name, v));
                }
            }
            if let Some(v) = j.get("overall") {
                let _ = writeln!(m, "{}\n", row("**overall**", v));
            }
        }
        let _ = writeln!(m, "## Training\n");
        let _ = writeln!(m, "| stage | steps | time | first loss | final loss |");
        let _ = writeln!(m, "|---|---|---|---|---|");
        for s in &self.stages {
            let _ = writeln!(
                m,
                "| {} | {} | {:.0} s | {:.3} | {:.3} |",
                s.name, s.steps, s.seconds, s.first_loss, s.final_loss
            );
        }
        let _ = writeln!(m);
        if !self.tower_accuracy.is_empty() {
            let parts: Vec<String> = self
                .tower_accuracy
                .iter()
                .map(|t| match t.foreground_accuracy {
                    Some(f) => format!("{} {:.1}% (of object patches)", t.task, f * 100.0),
                    None => format!("{} {:.1}%", t.task, t.accuracy * 100.0),
                })
                .collect();
            let _ = writeln!(
                m,
                "Stage 0a's heads on the held-out pictures (colour and count per patch, shape and \
                 order per object): {}.\n",
                parts.join(", ")
            );
        }
        if let Some(c) = &self.stage0_captions {
            let _ = writeln!(
                m,
                "Stage 0's captions of {} held-out pictures (`--template plain`, greedy): \
                 {:.1}% of the objects they name are in the picture, they name {:.1}% of the \
                 objects there, and {:.1}% name as many objects as there are.\n",
                c.captions,
                c.precision() * 100.0,
                c.recall() * 100.0,
                c.count_accuracy() * 100.0
            );
        }
        for s in &self.stages {
            let _ = writeln!(m, "![{} loss]({}/loss.png)", s.name, s.folder);
        }
        let _ = writeln!(m, "\nThe commands that ran:\n\n```text");
        for s in &self.stages {
            let _ = writeln!(m, "{}", s.command);
        }
        let _ = writeln!(m, "```\n");
        let _ = writeln!(m, "## Data\n");
        let _ = writeln!(
            m,
            "{} requests to the offline teacher over HTTP, {} of them refused with 429 and retried.\n",
            self.teacher_requests, self.teacher_refused
        );
        for (what, n) in &self.datasets {
            let _ = writeln!(m, "- {what}: {n}");
        }
        if !self.samples.is_empty() {
            let _ = writeln!(m, "\n## Sample chats\n");
            for c in &self.samples {
                let _ = writeln!(m, "![{}](world/images/{})\n", c.image, c.image);
                for (q, a) in &c.turns {
                    let _ = writeln!(m, "- **User:** {q}\n- **LLaVA:** {a}");
                }
                let _ = writeln!(m);
            }
        }
        let _ = writeln!(m, "\n## Configuration\n\n```json");
        let _ = writeln!(
            m,
            "{}",
            serde_json::to_string_pretty(&self.plan).unwrap_or_default()
        );
        let _ = writeln!(m, "```");
        m
    }
}
