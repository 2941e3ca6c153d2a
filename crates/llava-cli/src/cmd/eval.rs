//! `llava eval`: evaluation as the paper does it (a thin layer over `llava-eval`).
//!
//! ```text
//! llava eval answer --model DIR --questions questions.jsonl --image-folder images/ \
//!     --out answers.jsonl [--temperature 0] [--max-new-tokens 512] [--conv-mode llava_v1]
//! llava eval judge --questions questions.jsonl --context context.jsonl \
//!     --reference answers_gpt4.jsonl --answers answers.jsonl \
//!     --api-base https://api.openai.com/v1 --model gpt-4o --out reviews.jsonl [--rejudge-failed]
//! llava eval summarize reviews.jsonl [--json]
//! llava eval mc --model DIR --questions scienceqa.jsonl --image-folder images/ --out answers.jsonl
//! llava eval mc-prompts --questions scienceqa.jsonl --out questions.jsonl
//! llava eval mc-score --questions scienceqa.jsonl --answers answers.jsonl [--json]
//! llava eval pope --model DIR --questions coco_pope.jsonl --image-folder val2014/ --out answers.jsonl
//! llava eval mme --model DIR --questions mme.jsonl --image-folder MME/ --out answers.jsonl
//! llava eval mmbench-prompts --tsv mmbench_dev.tsv --image-dir mmbench/ --out mmbench.jsonl
//! llava eval mc --model DIR --questions mmbench.jsonl --image-folder mmbench/ --out answers.jsonl
//! llava eval mmbench-score --questions mmbench.jsonl --answers answers.jsonl
//! ```

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use llava_eval::answer::{AnswerConfig, answer_question_list, answer_questions};
use llava_eval::judge::{JudgeConfig, run_blocking};
use llava_eval::mc::{format_mc_summary, read_mc_questions, score_answers};
use llava_eval::{format_summary, read_reviews, summarize};

use super::model_args::{ModelArgs, SamplingArgs};

#[derive(Args)]
pub struct EvalCommand {
    #[command(subcommand)]
    sub: Sub,
}

#[derive(Subcommand)]
enum Sub {
    /// Answer benchmark questions with a checkpoint (the same text `llava generate` gives).
    Answer(AnswerArgs),
    /// Score model answers against reference answers with an LLM judge (LLaVA-Bench).
    Judge(JudgeArgs),
    /// Relative scores per category and overall from a reviews file.
    Summarize {
        /// The reviews JSONL written by `llava eval judge`.
        reviews: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Answer a multiple-choice file (ScienceQA-style) with a checkpoint and report accuracy.
    Mc {
        #[command(flatten)]
        answer: AnswerArgs,
        /// Print the accuracy as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Answer a short-answer file (VQAv2/GQA-style) with a checkpoint and report exact-match
    /// accuracy after normalisation.
    Vqa {
        #[command(flatten)]
        answer: AnswerArgs,
        /// Print the accuracy as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Answer a POPE file (yes/no object-hallucination questions) with a checkpoint and report
    /// accuracy, precision, recall, F1 and the yes ratio per split.
    Pope {
        #[command(flatten)]
        answer: AnswerArgs,
        /// Print the metrics as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// POPE metrics of an answers file against a POPE file's labels.
    /// The questions: {question_id, image, text|question, label|answer: yes/no, category}.
    PopeScore(ScoreArgs),
    /// Answer an MME file (two yes/no questions per image) with a checkpoint and report each
    /// subtask's acc + acc+ and the perception and cognition totals.
    Mme {
        #[command(flatten)]
        answer: AnswerArgs,
        /// Print the scores as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// MME scores of an answers file against an MME file's labels (the line format of POPE's).
    MmeScore(ScoreArgs),
    /// Exact-match accuracy of an answers file against a short-answer file's references.
    /// The questions: {question_id, question|text, answers|answer, category?, image?}.
    VqaScore(ScoreArgs),
    /// Turn a multiple-choice file (ScienceQA-style) into benchmark questions with the
    /// lettered-options prompt, for answering.
    McPrompts {
        /// JSONL: {question_id, question, options, answer, context?, category?, image?}.
        #[arg(long, value_name = "FILE")]
        questions: PathBuf,
        /// Output questions JSONL: {question_id, image, text, category}.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Multiple-choice accuracy of an answers file, overall and per category.
    /// The questions: the multiple-choice JSONL with the answer key.
    McScore(ScoreArgs),
    /// Turn MMBench's TSV (base64 images) into a multiple-choice file for `eval mc`, one line
    /// per rotation of the options, and the images into files.
    MmbenchPrompts {
        /// MMBench's TSV with answers (e.g. mmbench_dev_20230712.tsv).
        #[arg(long, value_name = "FILE")]
        tsv: PathBuf,
        /// Folder to write the images to; pass it to `eval mc` as --image-folder.
        #[arg(long, value_name = "DIR")]
        image_dir: PathBuf,
        /// The multiple-choice JSONL to write.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Ask each question once, as printed, instead of once per rotation.
        #[arg(long)]
        no_circular: bool,
    },
    /// MMBench's circular accuracy of an answers file: a question counts only when every
    /// rotation of its options is answered right. The questions: `mmbench-prompts`' file.
    MmbenchScore(ScoreArgs),
}

/// Scoring an answers file against a benchmark file, without a model.
#[derive(Args)]
struct ScoreArgs {
    /// The benchmark's questions JSONL, with its answer key.
    #[arg(long, value_name = "FILE")]
    questions: PathBuf,
    /// Answers JSONL: {question_id, text, ...}.
    #[arg(long, value_name = "FILE")]
    answers: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// The yes/no benchmarks, which share a question format and differ in their scores.
#[derive(Clone, Copy)]
enum YesNo {
    Pope,
    Mme,
}

#[derive(Args)]
struct AnswerArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Questions JSONL: {question_id, image, text, category}.
    #[arg(long, value_name = "FILE")]
    questions: PathBuf,
    /// Folder the questions' `image` paths are relative to.
    #[arg(long, value_name = "DIR", default_value = ".")]
    image_folder: PathBuf,
    /// Answers JSONL to write; rerunning resumes it.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// The `model_id` written with each answer (default: the checkpoint folder's name).
    #[arg(long)]
    model_id: Option<String>,
    /// Answer at most N new questions.
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    /// Generate N questions together (left-padded, as transformers batches). Decoding reads the
    /// weights once per step for all N; 1 answers one at a time and reuses a shared prompt
    /// beginning (the same image) from the question before instead.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    batch_size: u16,
}

/// Loads the checkpoint and answers `questions` (all of `a.questions` when `None`).
fn answer(
    a: AnswerArgs,
    questions: Option<Vec<llava_eval::Question>>,
) -> anyhow::Result<llava_eval::answer::AnswerReport> {
    if !a.questions.is_file() {
        bail!("--questions {}: no such file", a.questions.display());
    }
    if !a.image_folder.is_dir() {
        bail!(
            "--image-folder {}: no such folder",
            a.image_folder.display()
        );
    }
    let mut pipeline = a.model.load()?;
    if a.sampling.ignore_eos {
        pipeline.eos_token_ids.clear();
    }
    let model_id = a.model_id.clone().unwrap_or_else(|| {
        std::path::Path::new(&a.model.checkpoint.model)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| a.model.checkpoint.model.clone())
    });
    let cfg = AnswerConfig {
        questions: a.questions,
        image_folder: a.image_folder,
        out: a.out,
        model_id,
        sampling: a.sampling.params(),
        max_new_tokens: a.sampling.max_new_tokens,
        stop: a.sampling.stop.clone(),
        limit: a.limit,
        batch_size: a.batch_size.into(),
    };
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} questions ({eta} left)")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let progress = |done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    let clock = std::time::Instant::now();
    let report = match questions {
        Some(qs) => answer_question_list(&pipeline, &qs, &cfg, progress),
        None => answer_questions(&pipeline, &cfg, progress),
    }
    .context("answering failed")?;
    bar.finish_and_clear();
    eprintln!(
        "{} (in {:.1} s)",
        report.describe(),
        clock.elapsed().as_secs_f64()
    );
    if report.failed > 0 {
        bail!("{} questions failed; rerun to retry them", report.failed);
    }
    Ok(report)
}

fn mc(a: AnswerArgs, json: bool) -> anyhow::Result<()> {
    let mcq = read_mc_questions(&a.questions)?;
    let questions = mcq.iter().map(|q| q.to_question()).collect();
    let out = a.out.clone();
    answer(a, Some(questions))?;
    let answers = llava_eval::jsonl::read_answers(&out)?;
    print_mc(&mcq, &answers, json)
}

fn vqa(a: AnswerArgs, json: bool) -> anyhow::Result<()> {
    let vq = llava_eval::vqa::read_vqa_questions(&a.questions)?;
    let questions = vq.iter().map(|q| q.to_question()).collect();
    let out = a.out.clone();
    answer(a, Some(questions))?;
    let answers = llava_eval::jsonl::read_answers(&out)?;
    print_accuracy(llava_eval::vqa::score_vqa(&vq, &answers), json)
}

/// Answers a yes/no benchmark file and reports its scores.
fn yes_no(kind: YesNo, a: AnswerArgs, json: bool) -> anyhow::Result<()> {
    let questions = llava_eval::yes_no::read_yes_no_questions(&a.questions)?;
    let out = a.out.clone();
    answer(a, Some(questions.iter().map(|q| q.to_question()).collect()))?;
    let answers = llava_eval::jsonl::read_answers(&out)?;
    print_yes_no(kind, &questions, &answers, json)
}

fn yes_no_score(kind: YesNo, a: ScoreArgs) -> anyhow::Result<()> {
    let questions = llava_eval::yes_no::read_yes_no_questions(&a.questions)?;
    let answers = llava_eval::jsonl::read_answers(&a.answers)?;
    print_yes_no(kind, &questions, &answers, a.json)
}

fn print_yes_no(
    kind: YesNo,
    questions: &[llava_eval::yes_no::YesNoQuestion],
    answers: &std::collections::HashMap<llava_eval::QuestionId, llava_eval::Answer>,
    json: bool,
) -> anyhow::Result<()> {
    use llava_eval::{mme, pope};
    match kind {
        YesNo::Pope => print_scores(
            pope::score_pope(questions, answers),
            pope::format_pope_summary,
            json,
        ),
        YesNo::Mme => print_scores(
            mme::score_mme(questions, answers),
            mme::format_mme_summary,
            json,
        ),
    }
}

fn print_mc(
    questions: &[llava_eval::mc::McQuestion],
    answers: &std::collections::HashMap<llava_eval::QuestionId, llava_eval::Answer>,
    json: bool,
) -> anyhow::Result<()> {
    print_accuracy(score_answers(questions, answers), json)
}

/// Writes a questions file the `*-prompts` subcommands make: one JSON value a line.
fn write_jsonl<T: serde::Serialize>(
    out: &std::path::Path,
    items: impl IntoIterator<Item = T>,
) -> anyhow::Result<()> {
    let mut text = String::new();
    for item in items {
        text.push_str(&serde_json::to_string(&item)?);
        text.push('\n');
    }
    std::fs::write(out, text).with_context(|| format!("cannot write {}", out.display()))
}

/// Prints an accuracy summary (multiple choice or short answer) as a table or JSON.
fn print_accuracy(scores: (llava_eval::mc::McSummary, usize), json: bool) -> anyhow::Result<()> {
    print_scores(scores, format_mc_summary, json)
}

/// Prints a benchmark's scores as `table` lays them out, or as JSON, with a note of the
/// questions left unanswered.
fn print_scores<S: serde::Serialize>(
    (scores, missing): (S, usize),
    table: impl Fn(&S) -> String,
    json: bool,
) -> anyhow::Result<()> {
    if missing > 0 {
        eprintln!("note: {missing} questions have no answer and are not scored");
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&scores)?);
    } else {
        print!("{}", table(&scores));
    }
    Ok(())
}

#[derive(Args)]
struct JudgeArgs {
    /// Questions JSONL: {question_id, image, text, category}.
    #[arg(long, value_name = "FILE")]
    questions: PathBuf,
    /// Image descriptions JSONL: {image, captions, instances: [{category, bbox}]} or {image, caption}.
    #[arg(long, value_name = "FILE")]
    context: PathBuf,
    /// Reference answers JSONL (Assistant 1).
    #[arg(long, value_name = "FILE")]
    reference: PathBuf,
    /// The model's answers JSONL (Assistant 2).
    #[arg(long, value_name = "FILE")]
    answers: PathBuf,
    /// Reviews JSONL to write; rerunning resumes it.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    #[command(flatten)]
    teacher: super::teacher_args::TeacherArgs,
    /// New requests for a reply whose scores cannot be read, before recording [-1, -1].
    #[arg(long, default_value_t = 3)]
    parse_retries: u32,
    /// Judge at most N new questions.
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    /// On a rerun, ask again the questions recorded as [-1, -1] (no readable scores). The new
    /// review is appended; when the file is read, a later review of a question replaces its
    /// failed one. Without this flag a failed review counts as done.
    #[arg(long)]
    rejudge_failed: bool,
}

fn judge(a: JudgeArgs) -> anyhow::Result<()> {
    let Some(client) = a.teacher.client_config()? else {
        bail!("judging needs a judge endpoint: pass --api-base URL and --model NAME");
    };
    let cfg = JudgeConfig {
        questions: a.questions,
        context: a.context,
        reference: a.reference,
        answers: a.answers,
        out: a.out,
        client,
        temperature: a.teacher.temperature,
        max_tokens: a.teacher.max_tokens,
        parse_retries: a.parse_retries,
        limit: a.limit,
        rejudge_failed: a.rejudge_failed,
    };
    let report = run_blocking(&cfg).context("judging failed")?;
    eprintln!("{}", report.describe());
    let reviews = read_reviews(&cfg.out)?;
    print!("{}", format_summary(&summarize(&reviews.records)));
    if report.request_failures > 0 {
        bail!(
            "{} questions could not be judged (endpoint errors); rerun to retry them",
            report.request_failures
        );
    }
    Ok(())
}

pub fn run(c: EvalCommand) -> anyhow::Result<()> {
    match c.sub {
        Sub::Answer(a) => answer(a, None).map(|_| ()),
        Sub::Mc { answer: a, json } => mc(a, json),
        Sub::Vqa { answer: a, json } => vqa(a, json),
        Sub::Pope { answer: a, json } => yes_no(YesNo::Pope, a, json),
        Sub::PopeScore(a) => yes_no_score(YesNo::Pope, a),
        Sub::Mme { answer: a, json } => yes_no(YesNo::Mme, a, json),
        Sub::MmeScore(a) => yes_no_score(YesNo::Mme, a),
        Sub::VqaScore(a) => {
            let qs = llava_eval::vqa::read_vqa_questions(&a.questions)?;
            let ans = llava_eval::jsonl::read_answers(&a.answers)?;
            print_accuracy(llava_eval::vqa::score_vqa(&qs, &ans), a.json)
        }
        Sub::Judge(a) => judge(a),
        Sub::Summarize { reviews, json } => {
            if !reviews.exists() {
                bail!("{}: no such file", reviews.display());
            }
            let file = read_reviews(&reviews)?;
            if file.torn_tail.is_some() {
                eprintln!("note: ignoring a torn last line (an interrupted run)");
            }
            if file.duplicates > 0 {
                eprintln!(
                    "note: {} repeated question ids ignored (a later review replaces a failed \
                     one; otherwise the first review of each is used)",
                    file.duplicates
                );
            }
            if file.records.is_empty() {
                bail!("{}: no reviews", reviews.display());
            }
            let s = summarize(&file.records);
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", format_summary(&s));
            }
            Ok(())
        }
        Sub::McPrompts { questions, out } => {
            let qs = read_mc_questions(&questions)?;
            write_jsonl(&out, qs.iter().map(|q| q.to_question()))?;
            eprintln!("{} questions written to {}", qs.len(), out.display());
            Ok(())
        }
        Sub::McScore(a) => {
            let qs = read_mc_questions(&a.questions)?;
            let ans = llava_eval::jsonl::read_answers(&a.answers)?;
            print_mc(&qs, &ans, a.json)
        }
        Sub::MmbenchPrompts {
            tsv,
            image_dir,
            out,
            no_circular,
        } => {
            let rows = llava_eval::mmbench::read_mmbench_tsv(&tsv)?;
            let lines = llava_eval::mmbench::mmbench_questions(&rows, &image_dir, !no_circular)?;
            write_jsonl(&out, &lines)?;
            eprintln!(
                "{} questions as {} lines written to {}, images to {}",
                rows.len(),
                lines.len(),
                out.display(),
                image_dir.display()
            );
            Ok(())
        }
        Sub::MmbenchScore(a) => {
            let qs = read_mc_questions(&a.questions)?;
            let ans = llava_eval::jsonl::read_answers(&a.answers)?;
            print_accuracy(llava_eval::mmbench::score_mmbench(&qs, &ans), a.json)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        eval: EvalCommand,
    }

    #[test]
    fn subcommands_parse() {
        let judge = [
            "x",
            "judge",
            "--questions",
            "q",
            "--context",
            "c",
            "--reference",
            "r",
            "--answers",
            "a",
            "--api-base",
            "http://h/v1",
            "--model",
            "m",
            "--out",
            "o",
        ];
        let c = Cli::try_parse_from(judge).unwrap();
        assert!(
            matches!(c.eval.sub, Sub::Judge(ref a) if a.parse_retries == 3
                && a.teacher.concurrency == 16
                && !a.rejudge_failed)
        );
        let c = Cli::try_parse_from(judge.iter().chain(&["--rejudge-failed"])).unwrap();
        assert!(matches!(c.eval.sub, Sub::Judge(ref a) if a.rejudge_failed));
        let c = Cli::try_parse_from([
            "x",
            "answer",
            "--model",
            "m",
            "--questions",
            "q",
            "--out",
            "o",
            "--conv-mode",
            "llava_v1",
            "--max-new-tokens",
            "64",
        ])
        .unwrap();
        assert!(
            matches!(c.eval.sub, Sub::Answer(ref a) if a.sampling.max_new_tokens == 64
                && a.sampling.temperature == 0.0
                && a.model.template.as_deref() == Some("llava_v1"))
        );
        let c = Cli::try_parse_from(["x", "summarize", "r.jsonl", "--json"]).unwrap();
        assert!(matches!(c.eval.sub, Sub::Summarize { json: true, .. }));
        assert!(Cli::try_parse_from(["x", "judge", "--questions", "q"]).is_err());
    }
}
