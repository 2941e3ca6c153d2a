//! Typed errors of the instruction-data library.

use std::path::PathBuf;

use crate::client::ClientError;

#[derive(Debug, thiserror::Error)]
pub enum InstructError {
    #[error(transparent)]
    Coco(#[from] llava_data::coco::CocoError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}, line {line}: {message}")]
    Annotations {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("prompt set {path}: {message}")]
    Prompts { path: PathBuf, message: String },
    #[error(
        "{path}, line {line} is not a valid record ({message}); the output folder is damaged, fix or move that file"
    )]
    CorruptOutput {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{0}")]
    InvalidArgument(String),
    #[error("the teacher endpoint refused the request, stopping: {0}")]
    Teacher(#[source] ClientError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("Batch API, {what}: {source}; rerun the same command to resume")]
    BatchApi {
        what: String,
        #[source]
        source: ClientError,
    },
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

impl InstructError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| InstructError::Io { path, source }
    }
}
