//! The output folder: per-type JSONL files, `rejects.jsonl`, and the final
//! `llava_instruct.json`.
//!
//! Durability rules:
//! - each record is serialised to one line and written with a single `write` on a file opened
//!   for appending, then flushed, so a killed process leaves either the whole line or, at worst,
//!   an unterminated tail;
//! - on resume every file is scanned; an unterminated last line (a torn write) is cut off the
//!   file before anything is appended; a damaged *terminated* line is an error, never skipped;
//! - `llava_instruct.json` is written to a temporary file in the same folder, synced, and
//!   renamed over the target.

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use llava_data::record::LlavaRecord;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::InstructError;
use crate::types::InstructType;

/// The file name of the final merged dataset.
pub const FINAL_FILE: &str = "llava_instruct.json";
/// The file name of the reject log.
pub const REJECTS_FILE: &str = "rejects.jsonl";

/// At which stage a pair failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RejectStage {
    /// The image lacks what the type needs (e.g. no captions). Final.
    Input,
    /// The teacher's reply did not parse or leaked the input. Final unless `--retry-rejects`.
    Parse,
    /// The request failed after all retries. Retried on the next run.
    Request,
}

/// One line of `rejects.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RejectRecord {
    pub id: String,
    pub image: String,
    #[serde(rename = "type")]
    pub ty: InstructType,
    pub stage: RejectStage,
    /// Short stable tag, e.g. `unbalanced`, `leak`, `request`.
    pub tag: String,
    pub reason: String,
    /// The raw reply, when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<String>,
}

/// Reads a JSONL file written by this module. Returns the records and the number of bytes
/// of whole lines; an unterminated tail is reported as torn (its length), not parsed.
fn read_lines<T: DeserializeOwned>(path: &Path) -> Result<(Vec<T>, u64, u64), InstructError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0, 0)),
        Err(e) => {
            return Err(InstructError::Io {
                path: path.to_path_buf(),
                source: e,
            });
        }
    };
    let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
    let torn = (bytes.len() - whole) as u64;
    let mut out = Vec::new();
    for (i, line) in bytes[..whole].split(|&b| b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let v = serde_json::from_slice(line).map_err(|e| InstructError::CorruptOutput {
            path: path.to_path_buf(),
            line: i + 1,
            message: e.to_string(),
        })?;
        out.push(v);
    }
    Ok((out, whole as u64, torn))
}

/// Reads a JSONL file and cuts off a torn last line, so appends start on a fresh line.
fn recover<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>, InstructError> {
    let (items, whole, torn) = read_lines(path)?;
    if torn > 0 {
        tracing::warn!(path = %path.display(), bytes = torn, "dropping a torn last line left by an interrupted run");
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(InstructError::io(path))?;
        f.set_len(whole).map_err(InstructError::io(path))?;
        f.sync_all().map_err(InstructError::io(path))?;
    }
    Ok(items)
}

/// Reads the records of one type's file (read-only: a torn tail is ignored, not cut).
pub fn read_records(path: &Path) -> Result<Vec<LlavaRecord>, InstructError> {
    Ok(read_lines(path)?.0)
}

/// Reads `rejects.jsonl` (read-only).
pub fn read_rejects(path: &Path) -> Result<Vec<RejectRecord>, InstructError> {
    Ok(read_lines(path)?.0)
}

/// The id of a record as a string (numbers are written without quotes).
pub fn record_id(r: &LlavaRecord) -> String {
    match &r.id {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// What an output folder already holds.
#[derive(Debug, Default)]
pub struct Existing {
    /// (type, id) pairs present in a type file.
    pub records: HashSet<(InstructType, String)>,
    /// Pairs with a final reject (input or parse stage).
    pub rejected: HashSet<(InstructType, String)>,
    /// Record counts per type, duplicates included.
    pub counts: BTreeMap<InstructType, usize>,
}

/// Scans (and repairs torn tails of) the output folder's files.
pub fn scan(dir: &Path) -> Result<Existing, InstructError> {
    scan_with(dir, true)
}

/// Scans the output folder without changing anything (a torn tail is ignored, not cut).
pub fn scan_readonly(dir: &Path) -> Result<Existing, InstructError> {
    scan_with(dir, false)
}

fn scan_with(dir: &Path, repair: bool) -> Result<Existing, InstructError> {
    fn load<T: DeserializeOwned>(path: &Path, repair: bool) -> Result<Vec<T>, InstructError> {
        if repair {
            recover(path)
        } else {
            Ok(read_lines(path)?.0)
        }
    }
    let mut ex = Existing::default();
    for ty in InstructType::ALL {
        let recs: Vec<LlavaRecord> = load(&dir.join(ty.file_name()), repair)?;
        ex.counts.insert(ty, recs.len());
        for r in recs {
            ex.records.insert((ty, record_id(&r)));
        }
    }
    let rejects: Vec<RejectRecord> = load(&dir.join(REJECTS_FILE), repair)?;
    for r in rejects {
        if r.stage != RejectStage::Request {
            ex.rejected.insert((r.ty, r.id));
        }
    }
    Ok(ex)
}

/// Append-only writers of one output folder.
#[derive(Debug)]
pub struct Sink {
    dir: PathBuf,
    files: BTreeMap<InstructType, File>,
    rejects: File,
}

fn open_append(path: &Path) -> Result<File, InstructError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(InstructError::io(path))
}

impl Sink {
    /// Opens the files of `types` (and the reject log) for appending.
    pub fn open(dir: &Path, types: &[InstructType]) -> Result<Self, InstructError> {
        let mut files = BTreeMap::new();
        for &ty in types {
            files.insert(ty, open_append(&dir.join(ty.file_name()))?);
        }
        let rejects = open_append(&dir.join(REJECTS_FILE))?;
        Ok(Sink {
            dir: dir.to_path_buf(),
            files,
            rejects,
        })
    }

    fn write_line(file: &mut File, path: &Path, v: &impl Serialize) -> Result<(), InstructError> {
        let mut line = serde_json::to_vec(v).map_err(|e| InstructError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })?;
        line.push(b'\n');
        file.write_all(&line).map_err(InstructError::io(path))?;
        file.flush().map_err(InstructError::io(path))
    }

    pub fn write_record(&mut self, ty: InstructType, r: &LlavaRecord) -> Result<(), InstructError> {
        let path = self.dir.join(ty.file_name());
        match self.files.get_mut(&ty) {
            Some(f) => Self::write_line(f, &path, r),
            None => {
                let mut f = open_append(&path)?;
                Self::write_line(&mut f, &path, r)?;
                self.files.insert(ty, f);
                Ok(())
            }
        }
    }

    pub fn write_reject(&mut self, r: &RejectRecord) -> Result<(), InstructError> {
        let path = self.dir.join(REJECTS_FILE);
        Self::write_line(&mut self.rejects, &path, r)
    }
}

/// Merges every type file of `dir` into `llava_instruct.json` (a JSON array), atomically.
///
/// Records are ordered by type (conversation, detail, complex, brief) and then by id; a
/// repeated (type, id) keeps its first record. Returns the number of records written.
pub fn write_final(dir: &Path) -> Result<usize, InstructError> {
    merge_dirs(&[dir.to_path_buf()], &dir.join(FINAL_FILE))
}

/// Merges the type files of several output folders (e.g. the shards of one job) into one
/// LLaVA JSON array at `out`, atomically, ordered and deduplicated as [`write_final`] does.
pub fn merge_dirs(dirs: &[PathBuf], out: &Path) -> Result<usize, InstructError> {
    let mut all: Vec<LlavaRecord> = Vec::new();
    for ty in InstructType::ALL {
        let mut recs = Vec::new();
        for dir in dirs {
            if !dir.is_dir() {
                return Err(InstructError::InvalidArgument(format!(
                    "{} is not a folder",
                    dir.display()
                )));
            }
            recs.extend(read_records(&dir.join(ty.file_name()))?);
        }
        let before = recs.len();
        let mut seen = HashSet::new();
        recs.retain(|r| seen.insert(record_id(r)));
        if recs.len() != before {
            tracing::warn!(type = %ty, dropped = before - recs.len(), "dropped repeated record ids");
        }
        recs.sort_by_cached_key(record_id);
        all.extend(recs);
    }
    write_json_atomic(out, &all)?;
    Ok(all.len())
}

/// Writes `value` as pretty JSON to `path` through a synced temporary file and a rename.
pub fn write_json_atomic(path: &Path, value: &impl Serialize) -> Result<(), InstructError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let f = File::create(&tmp).map_err(InstructError::io(&tmp))?;
        let mut w = std::io::BufWriter::new(f);
        serde_json::to_writer_pretty(&mut w, value).map_err(|e| InstructError::Io {
            path: tmp.clone(),
            source: std::io::Error::other(e),
        })?;
        w.write_all(b"\n").map_err(InstructError::io(&tmp))?;
        let f = w.into_inner().map_err(|e| InstructError::Io {
            path: tmp.clone(),
            source: e.into_error(),
        })?;
        f.sync_all().map_err(InstructError::io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(InstructError::io(path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use llava_data::record::Turn;

    fn rec(id: &str) -> LlavaRecord {
        LlavaRecord {
            id: serde_json::json!(id),
            image: Some(format!("{id}.jpg")),
            conversations: vec![Turn::human("<image>\nq"), Turn::gpt("a")],
        }
    }

    #[test]
    fn torn_tail_is_cut_and_appends_continue_cleanly() {
        let d = tempfile::tempdir().unwrap();
        {
            let mut s = Sink::open(d.path(), &[InstructType::Detail]).unwrap();
            s.write_record(InstructType::Detail, &rec("1")).unwrap();
            s.write_record(InstructType::Detail, &rec("2")).unwrap();
        }
        let p = d.path().join("detail.jsonl");
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"id\":\"3\",\"image\":\"3.jp").unwrap();
        drop(f);
        let ex = scan(d.path()).unwrap();
        assert_eq!(ex.counts[&InstructType::Detail], 2);
        assert!(
            ex.records
                .contains(&(InstructType::Detail, "2".to_string()))
        );
        assert!(
            !ex.records
                .contains(&(InstructType::Detail, "3".to_string()))
        );
        let mut s = Sink::open(d.path(), &[InstructType::Detail]).unwrap();
        s.write_record(InstructType::Detail, &rec("3")).unwrap();
        let recs = read_records(&p).unwrap();
        assert_eq!(
            recs.iter().map(record_id).collect::<Vec<_>>(),
            vec!["1", "2", "3"]
        );
    }

    #[test]
    fn damaged_whole_line_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("complex.jsonl"),
            "{\"id\":\"1\",\"conversations\":[]}\nnot json\n",
        )
        .unwrap();
        let err = scan(d.path()).unwrap_err();
        assert!(
            matches!(err, InstructError::CorruptOutput { line: 2, .. }),
            "{err}"
        );
    }

    #[test]
    fn request_rejects_are_not_final() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Sink::open(d.path(), &[]).unwrap();
        for (id, stage) in [
            ("1", RejectStage::Parse),
            ("2", RejectStage::Request),
            ("3", RejectStage::Input),
        ] {
            s.write_reject(&RejectRecord {
                id: id.into(),
                image: "x".into(),
                ty: InstructType::Complex,
                stage,
                tag: "t".into(),
                reason: "r".into(),
                raw: None,
            })
            .unwrap();
        }
        let ex = scan(d.path()).unwrap();
        let mut ids: Vec<&str> = ex.rejected.iter().map(|(_, i)| i.as_str()).collect();
        ids.sort();
        assert_eq!(ids, vec!["1", "3"]);
    }

    #[test]
    fn merging_shards_unions_them() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        Sink::open(a.path(), &[])
            .unwrap()
            .write_record(InstructType::Detail, &rec("2"))
            .unwrap();
        let mut sb = Sink::open(b.path(), &[]).unwrap();
        sb.write_record(InstructType::Detail, &rec("1")).unwrap();
        sb.write_record(InstructType::Brief, &rec("2")).unwrap();
        let out = a.path().join("merged.json");
        let n = merge_dirs(&[a.path().to_path_buf(), b.path().to_path_buf()], &out).unwrap();
        assert_eq!(n, 3);
        let v: Vec<LlavaRecord> = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        assert_eq!(
            v.iter().map(record_id).collect::<Vec<_>>(),
            vec!["1", "2", "2"]
        );
        assert!(merge_dirs(&[a.path().join("nope")], &out).is_err());
    }

    #[test]
    fn final_json_is_sorted_deduplicated_and_atomic() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Sink::open(
            d.path(),
            &[InstructType::Complex, InstructType::Conversation],
        )
        .unwrap();
        for id in ["b", "a", "b"] {
            s.write_record(InstructType::Complex, &rec(id)).unwrap();
        }
        s.write_record(InstructType::Conversation, &rec("z"))
            .unwrap();
        assert_eq!(write_final(d.path()).unwrap(), 3);
        let v: Vec<LlavaRecord> =
            serde_json::from_slice(&std::fs::read(d.path().join(FINAL_FILE)).unwrap()).unwrap();
        assert_eq!(
            v.iter().map(record_id).collect::<Vec<_>>(),
            vec!["z", "a", "b"]
        );
        let leftovers: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }
}
