//! The demo's errors.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
    #[error("cannot write image {0}: {1}")]
    Image(PathBuf, String),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error("{0}")]
    Bad(String),
}

pub type Result<T> = std::result::Result<T, DemoError>;

/// `map_err` helper naming the path.
pub fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DemoError + '_ {
    move |e| DemoError::Io(path.to_path_buf(), e)
}
