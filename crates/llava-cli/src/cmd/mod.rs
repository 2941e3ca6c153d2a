//! One file per subcommand.

pub mod chat;
pub mod data;
pub mod demo;
pub mod eval;
pub mod generate;
pub mod image_source;
pub mod init;
pub mod instruct;
pub mod merge_lora;
pub mod model_args;
pub mod ranks;
pub mod teacher;
pub mod teacher_args;
pub mod train;

/// Refuses an `--out` that exists and is not an empty directory: writing a checkpoint over
/// another would leave a mix of their files (an old shard index would even win over the new
/// weights).
pub fn require_new_out(out: &std::path::Path, command: &str) -> anyhow::Result<()> {
    let occupied = match std::fs::read_dir(out) {
        Ok(mut entries) => entries.next().is_some(),
        Err(e) => e.kind() != std::io::ErrorKind::NotFound,
    };
    if occupied {
        anyhow::bail!(
            "--out {}: already exists and is not an empty directory; {command} writes only to a new one",
            out.display()
        );
    }
    Ok(())
}
