//! Reading the JSON files of a checkpoint (`config.json`, `adapter_config.json`, …) with
//! errors that name the file, and the field where a value has the wrong type.

use std::path::Path;

use serde_json::Value;

use crate::error::{ModelError, Result};

/// A JSON file, parsed.
pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// A config struct from parsed JSON; a value of the wrong type is reported with its field's
/// path (`text_config.hidden_size`), which serde alone leaves out.
pub fn typed<T: serde::de::DeserializeOwned>(json: Value, path: &Path) -> Result<T> {
    serde_path_to_error::deserialize(json).map_err(|e| {
        let field = e.path().to_string();
        let message = if field == "." {
            e.inner().to_string()
        } else {
            format!("field `{field}`: {}", e.inner())
        };
        ModelError::config(path, message)
    })
}
