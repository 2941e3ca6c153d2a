//! `llava instruct`: GPT-assisted instruction data generation (a thin layer over
//! `llava-instruct`).
//!
//! ```text
//! llava instruct --captions captions_train2014.json --instances instances_train2014.json \
//!     --types conversation,detail,complex --api-base https://api.openai.com/v1 --model gpt-4o \
//!     --out out/ [--concurrency 16] [--rpm 500] [--limit N] [--seed S] [--shard i/n]
//! llava instruct preview --captions … --instances … --image-id 42 [--types detail] [--json]
//! llava instruct convert-captions --input pairs.tsv --out chat.json
//! llava instruct export-prompts my-prompts/
//! llava instruct merge --out all.json shard0/ shard1/
//! llava instruct … --batch [--batch-retries 2]      (OpenAI Batch API, resumable)
//! llava instruct export-batch … --model gpt-4o      (input files, to submit by hand)
//! llava instruct import-batch … --results out.jsonl errors.jsonl
//! llava instruct stats out/llava_instruct.json [--json] [--plot plots/]
//! ```

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use llava_instruct::batch::{BatchConfig, BatchLimits, run_batch_blocking};
use llava_instruct::convert::{PairFormat, TsvOrder, convert_pairs_to_file};
use llava_instruct::pipeline::{
    Price, RunConfig, RunSummary, brief_for, format_summary, messages_for, run_blocking,
};
use llava_instruct::types::{InstructType, Shard, parse_types};
use llava_instruct::{ChatRequest, Filters, ImageEntry, PromptLibrary, Role, SourceSpec};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct InstructCommand {
    #[command(subcommand)]
    sub: Option<Sub>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Sub {
    /// Print the exact messages that would be sent to the teacher for one image.
    Preview(PreviewArgs),
    /// Turn image–caption pairs (JSONL or TSV) into stage-1 LLaVA data (brief instructions).
    ConvertCaptions(ConvertArgs),
    /// Merge the outputs of several runs (e.g. the shards of one job) into one LLaVA JSON file.
    Merge {
        /// Output file (written atomically).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Output folders of `llava instruct` runs.
        #[arg(required = true, value_name = "DIR")]
        dirs: Vec<PathBuf>,
    },
    /// Write the Batch API input files of every pair left to do into OUT/batch/export-NNNN.jsonl
    /// (for submitting by hand or with `vllm run-batch`); takes the same flags as a run.
    ExportBatch(RunArgs),
    /// Read Batch API output/error files (OpenAI's or `vllm run-batch`'s) into the output folder;
    /// takes the same flags as the run that exported them.
    ImportBatch {
        #[command(flatten)]
        run: RunArgs,
        /// Output and error files of the batches.
        #[arg(long = "results", required = true, num_args = 1.., value_name = "FILE")]
        results: Vec<PathBuf>,
    },
    /// Statistics of a generated set (types, turns, lengths, root verb-noun pairs), to compare
    /// with LLaVA-Instruct-158K.
    Stats {
        /// A LLaVA JSON (or JSONL) file, e.g. OUT/llava_instruct.json.
        file: PathBuf,
        /// Print the statistics as JSON.
        #[arg(long)]
        json: bool,
        /// Also draw bar charts as PNGs into DIR.
        #[arg(long, value_name = "DIR")]
        plot: Option<PathBuf>,
        /// How many verb-noun pairs to list.
        #[arg(long, default_value_t = 20)]
        top: usize,
        /// The prompt set the data was made with (its instruction lists tell detail and brief
        /// records apart).
        #[arg(long, value_name = "DIR")]
        prompts: Option<PathBuf>,
    },
    /// Write the built-in prompt set to DIR, to edit and pass back with --prompts DIR.
    ExportPrompts {
        /// Folder to create the prompt files in (must not already hold them).
        dir: PathBuf,
    },
}

#[derive(Args)]
struct SourceArgs {
    /// COCO captions file (captions_{train,val}{2014,2017}.json).
    #[arg(long, value_name = "FILE")]
    captions: Option<PathBuf>,
    /// COCO instances file (instances_{train,val}{2014,2017}.json), matched to captions by image id.
    #[arg(long, value_name = "FILE")]
    instances: Option<PathBuf>,
    /// Generic JSONL instead of COCO: {image, width, height, captions: [..], boxes: [{category, bbox: [x,y,w,h]}]}.
    #[arg(long, value_name = "FILE")]
    annotations: Option<PathBuf>,
}

impl SourceArgs {
    fn load(&self) -> anyhow::Result<Vec<ImageEntry>> {
        let spec = SourceSpec {
            captions: self.captions.clone(),
            instances: self.instances.clone(),
            annotations_jsonl: self.annotations.clone(),
        };
        spec.load().context("cannot load the annotations")
    }
}

/// Switches for the quality filters (all on by default; see `llava_instruct::filter`).
#[derive(Args)]
struct FilterArgs {
    /// Keep replies that refuse or apologise ("as an AI", "I cannot see", "I'm sorry, but").
    #[arg(long)]
    no_refusal_filter: bool,
    /// Keep replies that mention the captions, boxes or coordinates the teacher was shown.
    #[arg(long)]
    no_context_filter: bool,
    /// Keep answers of any length (default bounds in words: conversation 10-1000, detail
    /// 30-600, complex 20-600).
    #[arg(long)]
    no_length_filter: bool,
    /// Keep conversations that ask the same question twice.
    #[arg(long)]
    no_duplicate_filter: bool,
}

impl FilterArgs {
    fn filters(&self) -> Filters {
        Filters {
            refusal: !self.no_refusal_filter,
            context: !self.no_context_filter,
            length: !self.no_length_filter,
            duplicates: !self.no_duplicate_filter,
            ..Filters::default()
        }
    }
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// Comma-separated: conversation, detail, complex, brief (the naive baseline, no teacher).
    #[arg(long, default_value = "conversation,detail,complex")]
    types: String,
    #[command(flatten)]
    teacher: super::teacher_args::TeacherArgs,
    /// Output folder: <type>.jsonl, rejects.jsonl and llava_instruct.json. Rerunning resumes.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Prompt set folder replacing the built-in one (see `llava instruct export-prompts`).
    #[arg(long, value_name = "DIR")]
    prompts: Option<PathBuf>,
    /// Only the first N images (of the shard, in id order).
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    /// Per-type caps (per shard), e.g. conversation=58000,detail=23000,complex=77000 (the paper's
    /// 158K mix); each type gets its own seeded pseudo-random subset of the images.
    #[arg(long, value_name = "TYPE=N,...")]
    type_limits: Option<String>,
    /// Seed of the instruction paraphrase, caption and <image>-placement choices.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Work on shard i of n (0-based), a deterministic partition of the images by id.
    #[arg(long, value_name = "i/n")]
    shard: Option<String>,
    /// Price per 1000 tokens for the cost estimate: P, or PROMPT,COMPLETION.
    #[arg(long, value_name = "PRICE", conflicts_with_all = ["price_in", "price_out"])]
    price_per_1k: Option<String>,
    /// Price per 1M prompt tokens, for --dry-run's plan and the run's estimate.
    #[arg(long, value_name = "USD", requires = "price_out")]
    price_in: Option<f64>,
    /// Price per 1M completion tokens.
    #[arg(long, value_name = "USD", requires = "price_in")]
    price_out: Option<f64>,
    /// Build every prompt and print the requests, tokens (with --model's tokenizer) and cost
    /// per type, live and through the Batch API; send nothing, write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Ask again for pairs whose earlier reply was rejected.
    #[arg(long)]
    retry_rejects: bool,
    #[command(flatten)]
    filters: FilterArgs,
    /// Send the requests through OpenAI's Batch API (half price, results within 24 h) instead of
    /// one by one. Resumable: rerun the same command to pick up the same batches.
    #[arg(long)]
    batch: bool,
    /// New batches for failed or expired lines (after the first batch).
    #[arg(long, default_value_t = 2, value_name = "N")]
    batch_retries: u32,
    /// First wait between batch status polls (it grows to 5 minutes).
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    batch_poll: f64,
    /// Requests per batch input file (the API allows 50,000).
    #[arg(long, default_value_t = 50_000, value_name = "N")]
    batch_max_requests: usize,
    /// Bytes per batch input file (the API allows 200 MB).
    #[arg(long, default_value_t = 200_000_000, value_name = "BYTES")]
    batch_max_bytes: usize,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json_summary: bool,
}

#[derive(Args)]
struct PreviewArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// The image: its record id, or a COCO image id (42 finds 000000000042).
    #[arg(long, value_name = "ID")]
    image_id: String,
    #[arg(long, default_value = "conversation,detail,complex")]
    types: String,
    #[arg(long, value_name = "DIR")]
    prompts: Option<PathBuf>,
    /// Print the request bodies as JSON, exactly as sent (with this model name).
    #[arg(long)]
    json: bool,
    #[arg(long, default_value = "MODEL")]
    model: String,
    #[arg(long, default_value_t = 0.2)]
    temperature: f32,
    #[arg(long, default_value_t = 1024)]
    max_tokens: u32,
    /// Seed (for the brief type's choices).
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct ConvertArgs {
    /// Pairs file: JSONL ({image, caption}) or TSV (image<TAB>caption), by extension unless --format.
    #[arg(long, value_name = "FILE")]
    input: PathBuf,
    /// Output LLaVA JSON file (written atomically).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// jsonl, tsv (image<TAB>caption) or tsv-caption-first (caption<TAB>image, as in CC3M).
    #[arg(long)]
    format: Option<String>,
    #[arg(long, value_name = "DIR")]
    prompts: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn prompts(dir: &Option<PathBuf>, types: &[InstructType]) -> anyhow::Result<PromptLibrary> {
    match dir {
        Some(d) => PromptLibrary::load(d, types).context("cannot load the prompt set"),
        None => PromptLibrary::builtin().context("the built-in prompt set is broken"),
    }
}

pub fn run(c: InstructCommand) -> anyhow::Result<()> {
    match c.sub {
        Some(Sub::Preview(a)) => preview(a),
        Some(Sub::ConvertCaptions(a)) => convert(a),
        Some(Sub::ExportPrompts { dir }) => {
            let files = llava_instruct::prompts::export_builtin(&dir)
                .context("cannot export the prompts")?;
            println!("wrote {} prompt files under {}", files.len(), dir.display());
            Ok(())
        }
        Some(Sub::Merge { out, dirs }) => {
            let n = llava_instruct::output::merge_dirs(&dirs, &out)
                .context("cannot merge the outputs")?;
            println!("wrote {n} records to {}", out.display());
            Ok(())
        }
        Some(Sub::ExportBatch(a)) => export_batch(a),
        Some(Sub::Stats {
            file,
            json,
            plot,
            top,
            prompts: dir,
        }) => stats(&file, json, plot.as_deref(), top, &dir),
        Some(Sub::ImportBatch { run, results }) => import_batch(run, &results),
        None => generate(c.run),
    }
}

impl RunArgs {
    fn batch_config(&self) -> anyhow::Result<BatchConfig> {
        if !(self.batch_poll.is_finite() && self.batch_poll > 0.0) {
            bail!("--batch-poll must be a positive number of seconds");
        }
        Ok(BatchConfig {
            limits: self.batch_limits(),
            retries: self.batch_retries,
            poll_initial: Duration::from_secs_f64(self.batch_poll),
            ..BatchConfig::default()
        })
    }

    fn prices_per_1m(&self) -> anyhow::Result<Option<(f64, f64)>> {
        match (self.price_in, self.price_out) {
            (Some(i), Some(o)) if i.is_finite() && o.is_finite() && i >= 0.0 && o >= 0.0 => {
                Ok(Some((i, o)))
            }
            (None, None) => Ok(None),
            _ => bail!("--price-in and --price-out must both be given, as numbers >= 0"),
        }
    }

    fn batch_limits(&self) -> BatchLimits {
        BatchLimits {
            max_requests: self.batch_max_requests,
            max_bytes: self.batch_max_bytes,
        }
    }
}

/// The annotations, prompt set and run settings the flags describe.
fn setup(a: &RunArgs) -> anyhow::Result<(Vec<ImageEntry>, PromptLibrary, RunConfig)> {
    let Some(out) = a.out.clone() else {
        bail!("--out DIR is required")
    };
    let types = parse_types(&a.types)?;
    let lib = prompts(&a.prompts, &types)?;
    let entries = a.source.load()?;
    let mut cfg = RunConfig::new(types, out);
    cfg.limit = a.limit;
    cfg.seed = a.seed;
    if let Some(l) = &a.type_limits {
        cfg.type_limits = llava_instruct::types::parse_type_limits(l)?;
    }
    cfg.shard = match &a.shard {
        Some(s) => s.parse::<Shard>()?,
        None => Shard::default(),
    };
    cfg.temperature = Some(a.teacher.temperature);
    cfg.max_tokens = Some(a.teacher.max_tokens);
    cfg.retry_rejects = a.retry_rejects;
    cfg.filters = a.filters.filters();
    cfg.price = match (a.price_per_1k.as_deref(), a.prices_per_1m()?) {
        (Some(p), _) => Some(p.parse::<Price>()?),
        (None, Some((pin, pout))) => Some(Price {
            prompt_per_1k: pin / 1000.0,
            completion_per_1k: pout / 1000.0,
        }),
        (None, None) => None,
    };
    cfg.progress = !a.no_progress;
    cfg.max_pending = a.teacher.concurrency.saturating_mul(2).max(1);
    Ok((entries, lib, cfg))
}

fn dry_run(a: &RunArgs) -> anyhow::Result<()> {
    let Some(model) = a.teacher.model.clone() else {
        bail!("--dry-run needs --model: its tokenizer counts the prompt tokens")
    };
    let (entries, lib, cfg) = setup(a)?;
    let plan = llava_instruct::cost::plan(&entries, &lib, &cfg, &model, a.prices_per_1m()?)
        .context("cannot plan the run")?;
    if a.json_summary {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        println!("{}", llava_instruct::cost::format_plan(&plan));
    }
    Ok(())
}

fn generate(a: RunArgs) -> anyhow::Result<()> {
    if a.dry_run {
        return dry_run(&a);
    }
    let types = parse_types(&a.types)?;
    let client = a.teacher.client_config()?;
    if client.is_none() && types.iter().any(|t| t.needs_teacher()) {
        bail!("--api-base and --model are required for the conversation, detail and complex types");
    }
    let (entries, lib, cfg) = setup(&a)?;
    let out = cfg.out_dir.clone();
    let summary = match client {
        Some(client) if a.batch => {
            run_batch_blocking(entries, lib, client, &cfg, &a.batch_config()?)
        }
        _ if a.batch => bail!("--batch needs --api-base and --model"),
        client => run_blocking(entries, lib, client, &cfg),
    }
    .with_context(|| format!("instruction generation into {} stopped", out.display()))?;
    report(&a, &summary)
}

fn report(a: &RunArgs, summary: &RunSummary) -> anyhow::Result<()> {
    if a.json_summary {
        println!("{}", serde_json::to_string_pretty(summary)?);
    } else {
        println!("{}", format_summary(summary));
    }
    if summary.failed > 0 {
        bail!(
            "{} pairs failed after all retries; rerun the same command to retry them",
            summary.failed
        );
    }
    Ok(())
}

fn stats(
    file: &std::path::Path,
    json: bool,
    plot: Option<&std::path::Path>,
    top: usize,
    dir: &Option<PathBuf>,
) -> anyhow::Result<()> {
    let lib = prompts(dir, &[])?;
    let records = llava_data::record::read_dataset(file)
        .with_context(|| format!("cannot read {}", file.display()))?;
    let s = llava_instruct::stats::compute(&records, &lib, top);
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{}", llava_instruct::stats::format_stats(&s));
    }
    if let Some(d) = plot {
        let files = llava_instruct::stats_plot::plot_stats(&s, d)
            .with_context(|| format!("cannot draw the plots into {}", d.display()))?;
        eprintln!("wrote {} plots under {}", files.len(), d.display());
    }
    Ok(())
}

fn export_batch(a: RunArgs) -> anyhow::Result<()> {
    let Some(model) = a.teacher.model.clone() else {
        bail!("--model is required: it is written into every request")
    };
    let (entries, lib, cfg) = setup(&a)?;
    let (files, summary) =
        llava_instruct::batch::export_batch(entries, &lib, &model, &cfg, a.batch_limits())
            .with_context(|| format!("cannot export batch input into {}", cfg.out_dir.display()))?;
    for f in &files {
        println!("{}", f.display());
    }
    println!(
        "{} requests in {} file(s); submit them, then run `llava instruct import-batch` with the same flags and --results",
        summary.unanswered,
        files.len()
    );
    Ok(())
}

fn import_batch(a: RunArgs, results: &[PathBuf]) -> anyhow::Result<()> {
    let (entries, lib, cfg) = setup(&a)?;
    let summary = llava_instruct::batch::import_batch(entries, &lib, &cfg, results)
        .with_context(|| format!("cannot import batch results into {}", cfg.out_dir.display()))?;
    report(&a, &summary)
}

fn preview(a: PreviewArgs) -> anyhow::Result<()> {
    let types = parse_types(&a.types)?;
    let lib = prompts(&a.prompts, &types)?;
    let entries = a.source.load()?;
    let wanted = a.image_id.trim();
    let numeric = wanted.parse::<u64>().ok();
    let entry = entries
        .iter()
        .find(|e| e.id == wanted || (numeric.is_some() && e.id.parse::<u64>().ok() == numeric))
        .with_context(|| format!("no image with id `{wanted}` in the annotations"))?;
    for ty in types {
        match messages_for(entry, ty, &lib) {
            Some(messages) => {
                let req = ChatRequest {
                    messages,
                    temperature: Some(a.temperature),
                    max_tokens: Some(a.max_tokens),
                };
                if a.json {
                    let body = llava_instruct::client::request_json(&a.model, &req);
                    println!(
                        "{}",
                        serde_json::to_string(&serde_json::json!({"type": ty, "request": body}))?
                    );
                } else {
                    println!("######## {ty} ({} messages) ########", req.messages.len());
                    for m in &req.messages {
                        let role = match m.role {
                            Role::System => "system",
                            Role::User => "user",
                            Role::Assistant => "assistant",
                        };
                        println!("--- {role} ---\n{}", m.content);
                    }
                    println!();
                }
            }
            None => {
                // brief: no teacher; show the record it would produce
                match brief_for(entry, &lib, a.seed) {
                    Ok(r) => println!(
                        "######## {ty} (no teacher) ########\n{}",
                        serde_json::to_string_pretty(&r)?
                    ),
                    Err(why) => println!("######## {ty} (no teacher) ########\nno record: {why}"),
                }
            }
        }
    }
    Ok(())
}

fn convert(a: ConvertArgs) -> anyhow::Result<()> {
    let format = match a.format.as_deref() {
        None => PairFormat::from_path(&a.input),
        Some("jsonl") => PairFormat::Jsonl,
        Some("tsv") => PairFormat::Tsv(TsvOrder::ImageCaption),
        Some("tsv-caption-first") => PairFormat::Tsv(TsvOrder::CaptionImage),
        Some(other) => {
            bail!("unknown --format `{other}`; expected jsonl, tsv or tsv-caption-first")
        }
    };
    let lib = prompts(&a.prompts, &[])?;
    let s = convert_pairs_to_file(&a.input, format, &a.out, &lib, a.seed)
        .with_context(|| format!("cannot convert {}", a.input.display()))?;
    println!(
        "wrote {} records to {} ({} blank captions skipped)",
        s.records,
        a.out.display(),
        s.skipped_blank
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        c: InstructCommand,
    }

    fn parse(args: &[&str]) -> Result<InstructCommand, clap::Error> {
        let mut v = vec!["instruct"];
        v.extend_from_slice(args);
        Wrap::try_parse_from(v).map(|w| w.c)
    }

    #[test]
    fn run_flags_and_subcommands_parse() {
        let c = parse(&[
            "--captions",
            "c.json",
            "--instances",
            "i.json",
            "--types",
            "detail,complex",
            "--api-base",
            "http://127.0.0.1:1/v1",
            "--model",
            "m",
            "--out",
            "o",
            "--concurrency",
            "3",
            "--shard",
            "1/4",
            "--limit",
            "9",
            "--no-length-filter",
        ])
        .unwrap();
        let f = c.run.filters.filters();
        assert!(!f.length && f.refusal && f.context && f.duplicates);
        assert!(c.sub.is_none());
        assert_eq!(c.run.teacher.concurrency, 3);
        assert_eq!(c.run.shard.as_deref(), Some("1/4"));
        assert_eq!(c.run.limit, Some(9));
        let cfg = c.run.teacher.client_config().unwrap().unwrap();
        assert_eq!(cfg.concurrency, 3);

        let c = parse(&[
            "preview",
            "--captions",
            "c.json",
            "--image-id",
            "42",
            "--json",
        ])
        .unwrap();
        match c.sub {
            Some(Sub::Preview(p)) => {
                assert_eq!(p.image_id, "42");
                assert!(p.json);
            }
            _ => panic!("expected preview"),
        }
        let c = parse(&["merge", "--out", "all.json", "a", "b"]).unwrap();
        assert!(matches!(c.sub, Some(Sub::Merge { ref dirs, .. }) if dirs.len() == 2));
        assert!(parse(&["preview"]).is_err(), "preview needs --image-id");
    }

    #[test]
    fn batch_dry_run_and_offline_flags_parse() {
        let c = parse(&[
            "--out",
            "o",
            "--batch",
            "--batch-retries",
            "3",
            "--batch-max-requests",
            "10",
        ])
        .unwrap();
        assert!(c.run.batch);
        let b = c.run.batch_config().unwrap();
        assert_eq!(b.retries, 3);
        assert_eq!(b.limits.max_requests, 10);
        assert_eq!(b.limits.max_bytes, 200_000_000);
        assert_eq!(b.completion_window, "24h");
        let c = parse(&["--out", "o", "--batch-poll", "0"]).unwrap();
        assert!(c.run.batch_config().is_err());

        let c = parse(&[
            "--out",
            "o",
            "--dry-run",
            "--model",
            "gpt-4o",
            "--price-in",
            "2.5",
            "--price-out",
            "10",
        ])
        .unwrap();
        assert!(c.run.dry_run);
        assert_eq!(c.run.prices_per_1m().unwrap(), Some((2.5, 10.0)));
        assert!(
            parse(&["--out", "o", "--price-in", "1"]).is_err(),
            "both prices"
        );
        assert!(
            parse(&[
                "--out",
                "o",
                "--price-in",
                "1",
                "--price-out",
                "2",
                "--price-per-1k",
                "1"
            ])
            .is_err()
        );
        let c = parse(&["--out", "o", "--price-in=-1", "--price-out", "2"]).unwrap();
        assert!(c.run.prices_per_1m().is_err());

        let c = parse(&["export-batch", "--out", "o", "--model", "m"]).unwrap();
        assert!(
            matches!(c.sub, Some(Sub::ExportBatch(ref r)) if r.teacher.model.as_deref() == Some("m"))
        );
        let c = parse(&[
            "import-batch",
            "--out",
            "o",
            "--results",
            "a.jsonl",
            "b.jsonl",
        ])
        .unwrap();
        assert!(matches!(c.sub, Some(Sub::ImportBatch { ref results, .. }) if results.len() == 2));
        assert!(
            parse(&["import-batch", "--out", "o"]).is_err(),
            "needs --results"
        );
        let c = parse(&["export-batch", "--out", "o"]).unwrap();
        match c.sub {
            Some(Sub::ExportBatch(r)) => assert!(export_batch(r).is_err(), "needs --model"),
            _ => panic!("expected export-batch"),
        }
        let c = parse(&["--out", "o", "--batch"]).unwrap();
        assert!(generate(c.run).is_err(), "--batch needs a teacher");
        let c = parse(&["stats", "a.json", "--json", "--plot", "p", "--top", "5"]).unwrap();
        assert!(matches!(
            c.sub,
            Some(Sub::Stats {
                json: true,
                top: 5,
                ..
            })
        ));
    }

    #[test]
    fn teacher_flags_go_together() {
        let c = parse(&["--api-base", "http://h/v1", "--out", "o"]).unwrap();
        assert!(c.run.teacher.client_config().is_err());
        let c = parse(&["--out", "o"]).unwrap();
        assert!(c.run.teacher.client_config().unwrap().is_none());
        assert!(
            generate(c.run).is_err(),
            "teacher types without a teacher are refused"
        );
    }
}
