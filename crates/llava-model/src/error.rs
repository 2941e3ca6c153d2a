//! Typed errors. Each variant names the file, field or tensor at fault, so the CLI can print one
//! line that tells a user what to fix.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: not a valid safetensors file (truncated or corrupt?): {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("{path}: could not write the safetensors file: {message}")]
    SafetensorsWrite { path: PathBuf, message: String },
    #[error(
        "{path}: not a readable PyTorch checkpoint (truncated, corrupt, or saved by torch < 1.6?): {message}"
    )]
    Pytorch { path: PathBuf, message: String },
    #[error("weight `{name}` is missing from the checkpoint in {dir}")]
    MissingTensor { name: String, dir: PathBuf },
    #[error("weight `{name}` has shape {got:?}, but the config implies {expected:?}")]
    WrongShape {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("model `{0}` is neither a local directory nor a model in the local Hugging Face cache")]
    ModelNotFound(String),
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Tokenizer(#[from] llava_data::tokenizer::TokenizerError),
    #[error(transparent)]
    Template(#[from] llava_data::chat_template::TemplateError),
    #[error(transparent)]
    Image(#[from] llava_data::image::ImageError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Config {
            path: path.into(),
            message: message.into(),
        }
    }
}
