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
pub mod teacher;
pub mod teacher_args;
pub mod train;
