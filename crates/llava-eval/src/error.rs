//! Typed errors of the evaluation library.

use std::path::PathBuf;

use llava_instruct::ClientError;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The I/O error is part of the message, not a `source`, so that a CLI printing the
    /// error chain does not repeat it.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}, line {line}: {message}")]
    BadLine {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    BadFile { path: PathBuf, message: String },
    #[error("{0}")]
    InvalidArgument(String),
    #[error("the judge endpoint refused the request, stopping: {0}")]
    Judge(ClientError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Model(#[from] llava_model::ModelError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

impl EvalError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |error| EvalError::Io { path, error }
    }
}
