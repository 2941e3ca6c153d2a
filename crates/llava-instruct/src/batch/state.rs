//! `batch/state.json`: every input file, uploaded file id and batch id of the output folder's
//! Batch API work, saved (atomically) the moment it exists and before anything else happens,
//! so a run killed at any point resumes the same batches instead of paying twice.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::InstructError;
use crate::output::write_json_atomic;

/// The folder, inside the output folder, holding the batch files and the state.
pub const BATCH_DIR: &str = "batch";
/// The state file's name inside [`BATCH_DIR`].
pub const STATE_FILE: &str = "state.json";

/// One input file and the batch made from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchEntry {
    /// The input file's name inside [`BATCH_DIR`].
    pub input: String,
    /// 0 for first requests; `k` for the k-th retry of failed lines.
    pub round: u32,
    pub requests: usize,
    #[serde(default)]
    pub input_file_id: Option<String>,
    #[serde(default)]
    pub batch_id: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
    /// The results are in the output folder; the batch needs nothing more.
    #[serde(default)]
    pub imported: bool,
}

/// The whole state file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BatchState {
    pub batches: Vec<BatchEntry>,
}

impl BatchState {
    pub fn path(out_dir: &Path) -> PathBuf {
        out_dir.join(BATCH_DIR).join(STATE_FILE)
    }

    /// Reads the state of an output folder (empty when there is none).
    pub fn load(out_dir: &Path) -> Result<Self, InstructError> {
        let path = Self::path(out_dir);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| InstructError::CorruptOutput {
                path,
                line: 1,
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(InstructError::Io { path, source: e }),
        }
    }

    /// Writes the state through a synced temporary file and a rename.
    pub fn save(&self, out_dir: &Path) -> Result<(), InstructError> {
        write_json_atomic(&Self::path(out_dir), self)
    }

    /// The next free input file name.
    pub fn next_input_name(&self, round: u32) -> String {
        format!("input-r{round}-{:04}.jsonl", self.batches.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_a_damaged_file_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(BatchState::load(d.path()).unwrap(), BatchState::default());
        std::fs::create_dir_all(d.path().join(BATCH_DIR)).unwrap();
        let mut s = BatchState::default();
        s.batches.push(BatchEntry {
            input: s.next_input_name(0),
            round: 0,
            requests: 3,
            input_file_id: Some("file-1".into()),
            batch_id: None,
            status: None,
            imported: false,
        });
        s.save(d.path()).unwrap();
        assert_eq!(BatchState::load(d.path()).unwrap(), s);
        assert_eq!(s.batches[0].input, "input-r0-0000.jsonl");
        std::fs::write(BatchState::path(d.path()), "{").unwrap();
        assert!(matches!(
            BatchState::load(d.path()),
            Err(InstructError::CorruptOutput { .. })
        ));
    }
}
