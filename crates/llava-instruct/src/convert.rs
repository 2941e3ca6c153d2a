//! Image–caption pairs (CC3M, LAION, SBU style) to stage-1 LLaVA data, the naive way: each
//! pair becomes a brief-description instruction (drawn from the paraphrase list) answered by
//! the caption, with `<image>` before or after the instruction at random (seeded per id).
//!
//! Inputs:
//! - JSONL, one object per line: `{"image": "00453/004539375.jpg", "caption": "…"}` with an
//!   optional `"id"` (string or number); `"text"` is accepted for `"caption"`.
//! - TSV, one pair per line: `image<TAB>caption` (or `caption<TAB>image` with
//!   [`TsvOrder::CaptionImage`]). Lines starting with `#` are skipped.
//!
//! Without an id the image path's file stem is the id. Blank captions are skipped and
//! counted; a malformed line or a repeated id is an error naming the line.

use std::collections::HashSet;
use std::io::BufRead;
use std::path::Path;

use llava_data::record::LlavaRecord;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::Deserialize;

use crate::error::InstructError;
use crate::output::write_json_atomic;
use crate::parse::brief_record;
use crate::prompts::PromptLibrary;
use crate::source::ImageEntry;
use crate::types::{InstructType, pair_seed};

/// Input file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairFormat {
    Jsonl,
    Tsv(TsvOrder),
}

/// Column order of a TSV.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TsvOrder {
    #[default]
    ImageCaption,
    CaptionImage,
}

impl PairFormat {
    /// Guesses from the extension: `.tsv`/`.txt` → TSV, otherwise JSONL.
    pub fn from_path(p: &Path) -> Self {
        match p
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("tsv") | Some("txt") => PairFormat::Tsv(TsvOrder::ImageCaption),
            _ => PairFormat::Jsonl,
        }
    }
}

#[derive(Deserialize)]
struct PairLine {
    #[serde(default)]
    id: Option<serde_json::Value>,
    image: String,
    #[serde(alias = "text")]
    caption: String,
}

/// Counts of a conversion.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConvertSummary {
    pub records: usize,
    pub skipped_blank: usize,
}

fn stem_id(image: &str) -> Option<String> {
    Path::new(image)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
}

/// Converts pairs into LLaVA records.
pub fn convert_pairs(
    input: &Path,
    format: PairFormat,
    lib: &PromptLibrary,
    seed: u64,
) -> Result<(Vec<LlavaRecord>, ConvertSummary), InstructError> {
    let f = std::fs::File::open(input).map_err(InstructError::io(input))?;
    let mut records = Vec::new();
    let mut summary = ConvertSummary::default();
    let mut seen = HashSet::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let lineno = i + 1;
        let line = line.map_err(InstructError::io(input))?;
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || (matches!(format, PairFormat::Tsv(_)) && line.starts_with('#'))
        {
            continue;
        }
        let bad = |message: String| InstructError::Annotations {
            path: input.to_path_buf(),
            line: lineno,
            message,
        };
        let (id, image, caption) = match format {
            PairFormat::Jsonl => {
                let p: PairLine = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
                let id = match p.id {
                    Some(serde_json::Value::String(s)) if !s.trim().is_empty() => Some(s),
                    Some(serde_json::Value::Number(n)) => Some(n.to_string()),
                    None => None,
                    Some(other) => {
                        return Err(bad(format!(
                            "`id` must be a non-empty string or a number, got {other}"
                        )));
                    }
                };
                (id, p.image, p.caption)
            }
            PairFormat::Tsv(order) => {
                let (a, b) = line
                    .split_once('\t')
                    .ok_or_else(|| bad("expected two tab-separated columns".into()))?;
                let (image, caption) = match order {
                    TsvOrder::ImageCaption => (a, b),
                    TsvOrder::CaptionImage => (b, a),
                };
                (None, image.trim().to_string(), caption.to_string())
            }
        };
        if image.trim().is_empty() {
            return Err(bad("empty image path".into()));
        }
        let id = match id {
            Some(id) => id,
            None => {
                stem_id(&image).ok_or_else(|| bad(format!("cannot derive an id from `{image}`")))?
            }
        };
        if caption.trim().is_empty() {
            summary.skipped_blank += 1;
            continue;
        }
        if !seen.insert(id.clone()) {
            return Err(bad(format!("duplicate id `{id}`")));
        }
        let entry = ImageEntry {
            id,
            image,
            width: 1.0,
            height: 1.0,
            captions: vec![caption],
            boxes: vec![],
        };
        let mut rng = StdRng::seed_from_u64(pair_seed(seed, &entry.id, InstructType::Brief));
        match brief_record(&entry, lib, &mut rng) {
            Ok(r) => records.push(r),
            Err(why) => return Err(bad(why.to_string())),
        }
    }
    summary.records = records.len();
    Ok((records, summary))
}

/// Converts pairs and writes the LLaVA JSON array atomically to `out`.
pub fn convert_pairs_to_file(
    input: &Path,
    format: PairFormat,
    out: &Path,
    lib: &PromptLibrary,
    seed: u64,
) -> Result<ConvertSummary, InstructError> {
    let (records, summary) = convert_pairs(input, format, lib, seed)?;
    write_json_atomic(out, &records)?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use llava_data::record::IMAGE_PLACEHOLDER;

    #[test]
    fn jsonl_and_tsv() {
        let d = tempfile::tempdir().unwrap();
        let lib = PromptLibrary::builtin().unwrap();
        let j = d.path().join("pairs.jsonl");
        std::fs::write(
            &j,
            "{\"image\":\"00453/004539375.jpg\",\"caption\":\"a red car\"}\n{\"id\":5,\"image\":\"b.jpg\",\"text\":\"x\"}\n{\"image\":\"c.jpg\",\"caption\":\"  \"}\n",
        )
        .unwrap();
        let (recs, s) = convert_pairs(&j, PairFormat::from_path(&j), &lib, 0).unwrap();
        assert_eq!(
            s,
            ConvertSummary {
                records: 2,
                skipped_blank: 1
            }
        );
        assert_eq!(recs[0].id, serde_json::json!("004539375"));
        assert_eq!(recs[0].image.as_deref(), Some("00453/004539375.jpg"));
        assert_eq!(recs[0].conversations[1].value, "a red car");
        let q = recs[0].conversations[0]
            .value
            .replace(IMAGE_PLACEHOLDER, "");
        assert!(lib.brief_instructions.iter().any(|i| i == q.trim()));
        assert_eq!(recs[1].id, serde_json::json!("5"));

        let t = d.path().join("pairs.tsv");
        std::fs::write(
            &t,
            "# header\na caption here\timgs/1.jpg\r\nanother\timgs/2.jpg\n",
        )
        .unwrap();
        let (recs, _) =
            convert_pairs(&t, PairFormat::Tsv(TsvOrder::CaptionImage), &lib, 0).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].image.as_deref(), Some("imgs/1.jpg"));
        assert_eq!(recs[0].conversations[1].value, "a caption here");
        assert_eq!(recs[1].conversations[1].value, "another");

        // same seed, same output; different seed, some difference
        let (again, _) =
            convert_pairs(&t, PairFormat::Tsv(TsvOrder::CaptionImage), &lib, 0).unwrap();
        assert_eq!(again, recs);

        std::fs::write(&t, "only-one-column\n").unwrap();
        let err = convert_pairs(&t, PairFormat::Tsv(TsvOrder::ImageCaption), &lib, 0).unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
        std::fs::write(&t, "a.jpg\tx\nb/a.jpg\ty\n").unwrap();
        let err = convert_pairs(&t, PairFormat::Tsv(TsvOrder::ImageCaption), &lib, 0).unwrap_err();
        assert!(err.to_string().contains("duplicate"), "{err}");
    }
}
