//! Files a run appends to and resumes from (answers, reviews): one JSON record per line,
//! flushed as written, with a torn last line from an interrupted run dropped on reopen.

use std::collections::HashSet;
use std::io::{Seek, Write};
use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::EvalError;
use crate::jsonl::QuestionId;

/// What [`read_appendable`] found.
#[derive(Debug)]
pub struct Appendable<T> {
    pub records: Vec<T>,
    /// Later reviews of an id already seen (the first one is kept).
    pub duplicates: usize,
    /// Bytes of a last line cut short by an interrupted run (no newline, not valid JSON).
    pub torn_tail: Option<u64>,
    /// Length of the file up to the end of its last complete line.
    pub good_len: u64,
}

impl<T> Default for Appendable<T> {
    fn default() -> Self {
        Self {
            records: Vec::new(),
            duplicates: 0,
            torn_tail: None,
            good_len: 0,
        }
    }
}

/// Reads a file that a run appends to, one record per line, keyed by question id. A missing
/// file is empty. A last line without its newline that does not parse is reported as torn
/// (an interrupted write), not an error; any other bad line is. `what` names the record in
/// messages.
pub fn read_appendable<T: DeserializeOwned>(
    path: &Path,
    what: &str,
    id: impl Fn(&T) -> QuestionId,
) -> Result<Appendable<T>, EvalError> {
    let text = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Appendable::default()),
        Err(e) => return Err(EvalError::io(path)(e)),
    };
    let mut out = Appendable::default();
    let mut seen = HashSet::new();
    let mut pos = 0usize;
    let mut lineno = 0usize;
    while pos < text.len() {
        lineno += 1;
        let (line, next, complete) = match text[pos..].iter().position(|&b| b == b'\n') {
            Some(n) => (&text[pos..pos + n], pos + n + 1, true),
            None => (&text[pos..], text.len(), false),
        };
        let s = String::from_utf8_lossy(line);
        if !s.trim().is_empty() {
            match serde_json::from_str::<T>(&s) {
                Ok(r) => {
                    if seen.insert(id(&r)) {
                        out.records.push(r);
                    } else {
                        out.duplicates += 1;
                    }
                }
                Err(_) if !complete => {
                    out.torn_tail = Some(line.len() as u64);
                    break;
                }
                Err(e) => {
                    return Err(EvalError::BadLine {
                        path: path.to_path_buf(),
                        line: lineno,
                        message: format!("not {what} ({e}); fix or move the file"),
                    });
                }
            }
        }
        pos = next;
        if complete {
            out.good_len = pos as u64;
        } else if !s.trim().is_empty() {
            // A whole record that only lacks its newline is kept; appending adds the newline.
            out.good_len = pos as u64;
        }
    }
    Ok(out)
}

/// An append-only JSONL file: every record is one line, flushed as it is written, so an
/// interrupted run loses at most the line being written.
pub struct AppendSink {
    file: std::fs::File,
    path: std::path::PathBuf,
}

impl AppendSink {
    /// Opens `path` for appending after cutting a torn last line (see [`read_appendable`]) and
    /// completing a final line that only lacks its newline.
    pub fn open<T>(path: &Path, existing: &Appendable<T>) -> Result<Self, EvalError> {
        let io = EvalError::io(path);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        let len = file.metadata().map_err(EvalError::io(path))?.len();
        if existing.torn_tail.is_some() && len > existing.good_len {
            tracing::warn!(
                path = %path.display(),
                "dropping a torn last line left by an interrupted run"
            );
            file.set_len(existing.good_len)
                .map_err(EvalError::io(path))?;
        }
        let len = file.metadata().map_err(EvalError::io(path))?.len();
        file.seek(std::io::SeekFrom::End(0))
            .map_err(EvalError::io(path))?;
        if len > 0 {
            let mut last = [0u8; 1];
            use std::io::Read;
            file.seek(std::io::SeekFrom::Start(len - 1))
                .map_err(EvalError::io(path))?;
            file.read_exact(&mut last).map_err(EvalError::io(path))?;
            file.seek(std::io::SeekFrom::End(0))
                .map_err(EvalError::io(path))?;
            if last[0] != b'\n' {
                file.write_all(b"\n").map_err(EvalError::io(path))?;
            }
        }
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Appends one record as a whole line and flushes it.
    pub fn write(&mut self, r: &impl Serialize) -> Result<(), EvalError> {
        let mut line = serde_json::to_vec(r).map_err(|e| EvalError::BadFile {
            path: self.path.clone(),
            message: format!("cannot encode a record: {e}"),
        })?;
        line.push(b'\n');
        self.file
            .write_all(&line)
            .and_then(|_| self.file.flush())
            .map_err(EvalError::io(&self.path))
    }
}
