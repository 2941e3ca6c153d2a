//! The `llava` binary: thin subcommands over the libraries. Library errors become one-line
//! messages here, and every failure exits non-zero.

mod cmd;

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
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Chat(c) => cmd::chat::run(c),
        Command::Data(c) => cmd::data::run(c),
        Command::Generate(c) => cmd::generate::run(c),
        Command::Train(c) => cmd::train::run(*c),
        Command::Init(c) => cmd::init::run(c),
        Command::Instruct(c) => cmd::instruct::run(*c),
        Command::Eval(c) => cmd::eval::run(*c),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
