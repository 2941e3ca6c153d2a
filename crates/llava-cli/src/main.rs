//! The `llava` binary: thin subcommands over the libraries. Library errors become one-line
//! messages here, and every failure exits non-zero.

mod cmd;

/// candle allocates a fresh buffer for every tensor op; glibc's malloc hands large freed
/// buffers back to the kernel, so each training step paid page faults for memory it had just
/// freed. mimalloc keeps and reuses them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "llava",
    version,
    about = "LLaVA (Visual Instruction Tuning) in Rust"
)]
struct Cli {
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
    /// Write a random-weight checkpoint of a named shape (for benchmarks and tests).
    Init(cmd::init::InitCommand),
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = run(Cli::parse().command);
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
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
        Command::Init(c) => cmd::init::run(c),
        Command::Instruct(c) => cmd::instruct::run(*c),
        Command::Eval(c) => cmd::eval::run(*c),
        Command::Teacher(c) => cmd::teacher::run(c),
        Command::Demo(c) => cmd::demo::run(c),
    }
}
