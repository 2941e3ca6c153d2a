//! `llava teacher`: the offline, rule-based teacher of the shapes world, served as an
//! OpenAI-compatible endpoint, so that `llava instruct` and `llava eval judge` can run without
//! a network or an API key.
//!
//! ```text
//! llava teacher serve [--port 8000] [--host 127.0.0.1] [--fail-every N]
//! llava instruct ... --api-base http://127.0.0.1:8000/v1 --model offline-teacher
//! ```
//!
//! It understands only the shapes world's captions and boxes (see `llava_demo::teacher`).

use anyhow::Result;
use clap::{Args, Subcommand};
use llava_demo::teacher::{ServerConfig, TeacherServer};

#[derive(Args)]
pub struct TeacherCommand {
    #[command(subcommand)]
    sub: Sub,
}

#[derive(Subcommand)]
enum Sub {
    /// Serve `POST /v1/chat/completions` and `GET /v1/models` until Ctrl-C.
    Serve(ServeArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Refuse every N-th request with 429 and Retry-After, to exercise client retries.
    #[arg(long, value_name = "N")]
    fail_every: Option<u64>,
}

pub fn run(c: TeacherCommand) -> Result<()> {
    match c.sub {
        Sub::Serve(a) => {
            let server = TeacherServer::start(&ServerConfig {
                host: a.host,
                port: a.port,
                fail_every: a.fail_every,
            })?;
            eprintln!(
                "offline teacher listening; use --api-base {} (Ctrl-C to stop)",
                server.api_base()
            );
            server.wait_for_ctrl_c()?;
            Ok(())
        }
    }
}
