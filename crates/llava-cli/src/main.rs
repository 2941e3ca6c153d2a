//! The `llava` binary: thin subcommands over the libraries. Library errors become one-line
//! messages here, and every failure exits non-zero.

mod cmd;
mod color;
mod memory;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "llava",
    version,
    about = "LLaVA (Visual Instruction Tuning) in Rust"
)]
struct Cli {
    /// Colour the logs: auto (when stderr is a terminal and NO_COLOR is unset), always, never.
    #[arg(long, global = true, value_enum, default_value = "auto")]
    color: color::ColorChoice,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Interactive multi-turn chat about an image.
    Chat(cmd::chat::ChatCommand),
    /// Inspect training data: `llava data preview` shows a sample's tokens and label mask.
    Data(cmd::data::DataCommand),
    /// Train: stage 1 (feature alignment) or stage 2 (end-to-end fine-tuning).
    Train(Box<cmd::train::TrainCommand>),
    /// Answer one prompt about an image.
    Generate(cmd::generate::GenerateCommand),
    /// Serve the OpenAI chat-completions API (with images) over a checkpoint.
    Serve(Box<cmd::serve::ServeCommand>),
    /// Write a random-weight checkpoint of a named shape (for benchmarks and tests).
    Init(cmd::init::InitCommand),
    /// Merge an original LoRA release into its base: one checkpoint that needs no --model-base.
    MergeLora(cmd::merge_lora::MergeLoraCommand),
    /// Generate GPT-assisted multimodal instruction data with a text-only teacher.
    Instruct(Box<cmd::instruct::InstructCommand>),
    /// Evaluate as the paper does: LLaVA-Bench with an LLM judge, multiple-choice accuracy.
    Eval(Box<cmd::eval::EvalCommand>),
    /// The offline rule-based teacher of the shapes world, as an OpenAI-compatible server.
    Teacher(cmd::teacher::TeacherCommand),
    /// The whole pipeline offline on a synthetic shapes world: data, teacher, both training
    /// stages, evaluation and sample chats, with a report.
    Demo(cmd::demo::DemoCommand),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    memory::set_purge_delay(matches!(cli.command, Command::Serve(_)));
    cli.color.set_global();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(color::stderr())
        .init();
    let result = run(cli.command);
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, as `{:#}` writes them, but without a cause that an
/// earlier message already quotes (our error types name their source in their own text).
pub(crate) fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Runs `llava ARGS…` in this process: the demo drives the other subcommands through the
/// same flags a user would type.
pub(crate) fn run_args(args: &[String]) -> anyhow::Result<()> {
    let cli =
        Cli::try_parse_from(std::iter::once("llava".to_string()).chain(args.iter().cloned()))?;
    run(cli.command)
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Chat(c) => cmd::chat::run(c),
        Command::Data(c) => cmd::data::run(c),
        Command::Generate(c) => cmd::generate::run(c),
        Command::Train(c) => cmd::train::run(*c),
        Command::Serve(c) => cmd::serve::run(*c),
        Command::Init(c) => cmd::init::run(c),
        Command::MergeLora(c) => cmd::merge_lora::run(c),
        Command::Instruct(c) => cmd::instruct::run(*c),
        Command::Eval(c) => cmd::eval::run(*c),
        Command::Teacher(c) => cmd::teacher::run(c),
        Command::Demo(c) => cmd::demo::run(c),
    }
}
