//! Where the symbolic descriptions of images come from: COCO annotation files, or a generic
//! JSONL with one image per line:
//!
//! ```json
//! {"id": "a1", "image": "dir/a1.jpg", "width": 640, "height": 480,
//!  "captions": ["A cat on a sofa."], "boxes": [{"category": "cat", "bbox": [10, 20, 100, 80]}]}
//! ```
//!
//! `bbox` is `[x, y, width, height]` in pixels as in COCO. `id` is optional (a string or a
//! number); without it the image path's file stem is the id. `boxes` and `captions` may be
//! omitted.

use std::collections::HashSet;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::InstructError;

/// One object box in pixels, `[x, y, width, height]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BoxAnnotation {
    pub category: String,
    pub bbox: [f64; 4],
}

/// Everything the teacher is told about one image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageEntry {
    /// The record id written to the dataset (unique per response type).
    pub id: String,
    /// The image path written to the dataset, relative to the image folder.
    pub image: String,
    pub width: f64,
    pub height: f64,
    pub captions: Vec<String>,
    pub boxes: Vec<BoxAnnotation>,
}

/// The record id for a COCO image, as in LLaVA-Instruct: the image id zero-padded to 12 digits.
pub fn coco_record_id(image_id: u64) -> String {
    format!("{image_id:012}")
}

/// Loads and joins COCO captions and/or instances files.
pub fn load_coco(
    captions: Option<&Path>,
    instances: Option<&Path>,
) -> Result<Vec<ImageEntry>, InstructError> {
    let c = captions.map(llava_data::coco::read_captions).transpose()?;
    let i = instances
        .map(llava_data::coco::read_instances)
        .transpose()?;
    let joined = llava_data::coco::join(c.as_ref(), i.as_ref())?;
    Ok(joined
        .into_iter()
        .map(|a| ImageEntry {
            id: coco_record_id(a.image.id),
            image: a.image.file_name,
            width: f64::from(a.image.width),
            height: f64::from(a.image.height),
            captions: a.captions,
            boxes: a
                .objects
                .into_iter()
                .map(|o| BoxAnnotation {
                    category: o.category,
                    bbox: o.bbox,
                })
                .collect(),
        })
        .collect())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GenericLine {
    #[serde(default)]
    id: Option<serde_json::Value>,
    image: String,
    width: f64,
    height: f64,
    #[serde(default)]
    captions: Vec<String>,
    #[serde(default)]
    boxes: Vec<BoxAnnotation>,
}

/// Reads the generic JSONL annotation format. Blank lines are skipped; a malformed line, a
/// non-positive size or a duplicate id is an error naming the line.
pub fn load_generic_jsonl(path: &Path) -> Result<Vec<ImageEntry>, InstructError> {
    let f = std::fs::File::open(path).map_err(|source| InstructError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let reader = std::io::BufReader::new(f);
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (i, line) in reader.lines().enumerate() {
        let lineno = i + 1;
        let line = line.map_err(|source| InstructError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| InstructError::Annotations {
            path: path.to_path_buf(),
            line: lineno,
            message,
        };
        let g: GenericLine = serde_json::from_str(&line).map_err(|e| bad(e.to_string()))?;
        if !(g.width.is_finite() && g.height.is_finite() && g.width > 0.0 && g.height > 0.0) {
            return Err(bad(format!(
                "width and height must be positive, got {}x{}",
                g.width, g.height
            )));
        }
        let id = match g.id {
            Some(serde_json::Value::String(s)) if !s.trim().is_empty() => s,
            Some(serde_json::Value::Number(n)) => n.to_string(),
            None => Path::new(&g.image)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .filter(|s| !s.is_empty())
                .ok_or_else(|| {
                    bad(format!(
                        "cannot derive an id from image path `{}`; give an `id`",
                        g.image
                    ))
                })?,
            Some(other) => {
                return Err(bad(format!(
                    "`id` must be a non-empty string or a number, got {other}"
                )));
            }
        };
        if !seen.insert(id.clone()) {
            return Err(bad(format!("duplicate id `{id}`")));
        }
        for b in &g.boxes {
            if b.bbox.iter().any(|v| !v.is_finite()) {
                return Err(bad(format!(
                    "box of `{}` has a non-finite coordinate",
                    b.category
                )));
            }
        }
        out.push(ImageEntry {
            id,
            image: g.image,
            width: g.width,
            height: g.height,
            captions: g.captions,
            boxes: g.boxes,
        });
    }
    Ok(out)
}

/// The input selection of a run or preview.
#[derive(Debug, Clone, Default)]
pub struct SourceSpec {
    pub captions: Option<PathBuf>,
    pub instances: Option<PathBuf>,
    pub annotations_jsonl: Option<PathBuf>,
}

impl SourceSpec {
    /// Loads the images, sorted by id (COCO ids sort numerically thanks to the padding).
    pub fn load(&self) -> Result<Vec<ImageEntry>, InstructError> {
        let mut entries = match (&self.annotations_jsonl, &self.captions, &self.instances) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                return Err(InstructError::InvalidArgument(
                    "give either COCO files (--captions/--instances) or a JSONL (--annotations), not both".into(),
                ));
            }
            (Some(j), None, None) => load_generic_jsonl(j)?,
            (None, None, None) => {
                return Err(InstructError::InvalidArgument(
                    "no input: give --captions and/or --instances (COCO) or --annotations (JSONL)"
                        .into(),
                ));
            }
            (None, c, i) => load_coco(c.as_deref(), i.as_deref())?,
        };
        entries.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, s: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, s).unwrap();
        p
    }

    #[test]
    fn generic_jsonl_ids_and_errors() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "a.jsonl",
            "{\"image\":\"x/cat.jpg\",\"width\":10,\"height\":20,\"captions\":[\"c\"]}\n\n{\"id\":7,\"image\":\"y.png\",\"width\":1,\"height\":1,\"boxes\":[{\"category\":\"dog\",\"bbox\":[0,0,1,1]}]}\n",
        );
        let e = load_generic_jsonl(&p).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].id, "cat");
        assert_eq!(e[1].id, "7");
        assert_eq!(e[1].boxes[0].category, "dog");

        let p = write(
            d.path(),
            "b.jsonl",
            "{\"image\":\"a.jpg\",\"width\":0,\"height\":20}\n",
        );
        let err = load_generic_jsonl(&p).unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("positive"), "{err}");

        let p = write(
            d.path(),
            "c.jsonl",
            "{\"image\":\"a.jpg\",\"width\":1,\"height\":1}\n{\"image\":\"b/a.jpg\",\"width\":1,\"height\":1}\n",
        );
        let err = load_generic_jsonl(&p).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("duplicate"), "{err}");

        let p = write(
            d.path(),
            "d.jsonl",
            "{\"image\":\"a.jpg\",\"width\":1,\"height\":1,\"capshuns\":[]}\n",
        );
        assert!(load_generic_jsonl(&p).is_err());
        let p = write(d.path(), "e.jsonl", "not json\n");
        assert!(load_generic_jsonl(&p).is_err());
    }

    #[test]
    fn spec_requires_exactly_one_kind_of_input() {
        let s = SourceSpec::default();
        assert!(matches!(s.load(), Err(InstructError::InvalidArgument(_))));
        let s = SourceSpec {
            captions: Some("a".into()),
            annotations_jsonl: Some("b".into()),
            ..Default::default()
        };
        assert!(matches!(s.load(), Err(InstructError::InvalidArgument(_))));
    }
}
