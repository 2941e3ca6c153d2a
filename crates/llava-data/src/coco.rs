//! COCO `captions_*.json` / `instances_*.json` readers.
//!
//! Both the 2014 and the 2017 releases share one JSON layout; they differ only in file names
//! (`COCO_train2014_000000000009.jpg` vs `000000000009.jpg`) and in which images each split
//! holds. Image ids are the same across years, so annotations are matched by image id.
//!
//! The readers keep only what the LLaVA tools use (images, captions, boxes, categories); other
//! fields (segmentation polygons/RLE, licenses, keypoints) are skipped while parsing, so a
//! `instances_train2017.json` does not hold its segmentation in memory.
//!
//! [`join`] combines a captions file and/or an instances file into one [`CocoImageAnnotations`]
//! per image, sorted by image id, with captions and objects in annotation-id order.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Errors from reading or joining COCO annotation files.
#[derive(Debug, thiserror::Error)]
pub enum CocoError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a COCO annotation file: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "{what} annotation {annotation_id} refers to image id {image_id}, which is not in the file's `images`"
    )]
    UnknownImage {
        what: &'static str,
        annotation_id: u64,
        image_id: u64,
    },
    #[error(
        "instance annotation {annotation_id} refers to category id {category_id}, which is not in `categories`"
    )]
    UnknownCategory {
        annotation_id: u64,
        category_id: u64,
    },
    #[error(
        "image {image_id} is {a_width}x{a_height} in the captions file but {b_width}x{b_height} in the instances file; are they from the same dataset?"
    )]
    SizeMismatch {
        image_id: u64,
        a_width: u32,
        a_height: u32,
        b_width: u32,
        b_height: u32,
    },
    #[error("neither a captions file nor an instances file was given")]
    NoInput,
}

/// One entry of a COCO file's `images` list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CocoImage {
    pub id: u64,
    pub file_name: String,
    pub width: u32,
    pub height: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coco_url: Option<String>,
}

/// One entry of a `captions_*.json` `annotations` list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CocoCaption {
    pub id: u64,
    pub image_id: u64,
    pub caption: String,
}

/// One entry of an `instances_*.json` `annotations` list (segmentation is skipped).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CocoInstance {
    pub id: u64,
    pub image_id: u64,
    pub category_id: u64,
    /// `[x, y, width, height]` in pixels, origin at the top-left corner.
    pub bbox: [f64; 4],
    #[serde(default)]
    pub area: f64,
    #[serde(default)]
    pub iscrowd: u8,
}

/// One entry of an `instances_*.json` `categories` list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CocoCategory {
    pub id: u64,
    pub name: String,
    #[serde(default)]
    pub supercategory: String,
}

/// A parsed `captions_*.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaptionsFile {
    pub images: Vec<CocoImage>,
    /// Absent in `image_info_test*.json`-style files.
    #[serde(default)]
    pub annotations: Vec<CocoCaption>,
}

/// A parsed `instances_*.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstancesFile {
    pub images: Vec<CocoImage>,
    #[serde(default)]
    pub annotations: Vec<CocoInstance>,
    #[serde(default)]
    pub categories: Vec<CocoCategory>,
}

/// One object of an image, with its category resolved to a name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CocoObject {
    pub annotation_id: u64,
    pub category: String,
    /// `[x, y, width, height]` in pixels.
    pub bbox: [f64; 4],
    pub iscrowd: bool,
}

/// Everything known about one image after [`join`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CocoImageAnnotations {
    pub image: CocoImage,
    /// Caption strings as written in the file, in annotation-id order.
    pub captions: Vec<String>,
    /// Objects in annotation-id order.
    pub objects: Vec<CocoObject>,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, CocoError> {
    let bytes = std::fs::read(path).map_err(|source| CocoError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| CocoError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a `captions_{split}{year}.json` file.
pub fn read_captions(path: impl AsRef<Path>) -> Result<CaptionsFile, CocoError> {
    read_json(path.as_ref())
}

/// Reads an `instances_{split}{year}.json` file.
pub fn read_instances(path: impl AsRef<Path>) -> Result<InstancesFile, CocoError> {
    read_json(path.as_ref())
}

/// Matches captions and instances by image id.
///
/// The result holds every image listed in either file, sorted by image id. The image's
/// `file_name` comes from the captions file when both have it (so a 2014 captions file keeps
/// its `COCO_train2014_…` names even with 2017 instances); width and height must agree.
/// Annotations that name an unknown image or category are errors, not silently dropped.
pub fn join(
    captions: Option<&CaptionsFile>,
    instances: Option<&InstancesFile>,
) -> Result<Vec<CocoImageAnnotations>, CocoError> {
    if captions.is_none() && instances.is_none() {
        return Err(CocoError::NoInput);
    }
    let mut images: BTreeMap<u64, CocoImageAnnotations> = BTreeMap::new();
    if let Some(c) = captions {
        for img in &c.images {
            images
                .entry(img.id)
                .or_insert_with(|| CocoImageAnnotations {
                    image: img.clone(),
                    captions: Vec::new(),
                    objects: Vec::new(),
                });
        }
    }
    if let Some(inst) = instances {
        for img in &inst.images {
            match images.get(&img.id) {
                Some(existing) => {
                    let e = &existing.image;
                    if e.width != img.width || e.height != img.height {
                        return Err(CocoError::SizeMismatch {
                            image_id: img.id,
                            a_width: e.width,
                            a_height: e.height,
                            b_width: img.width,
                            b_height: img.height,
                        });
                    }
                }
                None => {
                    images.insert(
                        img.id,
                        CocoImageAnnotations {
                            image: img.clone(),
                            captions: Vec::new(),
                            objects: Vec::new(),
                        },
                    );
                }
            }
        }
    }
    if let Some(c) = captions {
        let mut anns: Vec<&CocoCaption> = c.annotations.iter().collect();
        anns.sort_by_key(|a| a.id);
        for a in anns {
            let entry = images.get_mut(&a.image_id).ok_or(CocoError::UnknownImage {
                what: "caption",
                annotation_id: a.id,
                image_id: a.image_id,
            })?;
            entry.captions.push(a.caption.clone());
        }
    }
    if let Some(inst) = instances {
        let cats: HashMap<u64, &str> = inst
            .categories
            .iter()
            .map(|c| (c.id, c.name.as_str()))
            .collect();
        let mut anns: Vec<&CocoInstance> = inst.annotations.iter().collect();
        anns.sort_by_key(|a| a.id);
        for a in anns {
            let category = *cats.get(&a.category_id).ok_or(CocoError::UnknownCategory {
                annotation_id: a.id,
                category_id: a.category_id,
            })?;
            let entry = images.get_mut(&a.image_id).ok_or(CocoError::UnknownImage {
                what: "instance",
                annotation_id: a.id,
                image_id: a.image_id,
            })?;
            entry.objects.push(CocoObject {
                annotation_id: a.id,
                category: category.to_string(),
                bbox: a.bbox,
                iscrowd: a.iscrowd != 0,
            });
        }
    }
    Ok(images.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPTIONS_2014: &str = r#"{
      "info": {"description": "COCO 2014 Dataset", "year": 2014},
      "licenses": [{"id": 1, "name": "x", "url": "y"}],
      "images": [
        {"license": 1, "file_name": "COCO_val2014_000000000042.jpg", "coco_url": "http://example/42.jpg",
         "height": 480, "width": 640, "date_captured": "2013-11-14 16:28:13", "flickr_url": "f", "id": 42},
        {"license": 1, "file_name": "COCO_val2014_000000000007.jpg", "height": 100, "width": 200, "id": 7}
      ],
      "annotations": [
        {"image_id": 42, "id": 11, "caption": "Second caption."},
        {"image_id": 42, "id": 3, "caption": "First caption."},
        {"image_id": 7, "id": 5, "caption": "Seven."}
      ]
    }"#;

    const INSTANCES_2017: &str = r#"{
      "images": [
        {"file_name": "000000000042.jpg", "height": 480, "width": 640, "id": 42},
        {"file_name": "000000000099.jpg", "height": 10, "width": 10, "id": 99}
      ],
      "annotations": [
        {"segmentation": [[1.0, 2.0, 3.0, 4.0]], "area": 12.5, "iscrowd": 0, "image_id": 42,
         "bbox": [10.0, 20.0, 30.0, 40.0], "category_id": 18, "id": 900},
        {"segmentation": {"counts": [1, 2], "size": [480, 640]}, "area": 100.0, "iscrowd": 1,
         "image_id": 42, "bbox": [0, 0, 640, 480], "category_id": 1, "id": 100}
      ],
      "categories": [
        {"supercategory": "person", "id": 1, "name": "person"},
        {"supercategory": "animal", "id": 18, "name": "dog"}
      ]
    }"#;

    #[test]
    fn joins_2014_captions_with_2017_instances_by_image_id() {
        let c: CaptionsFile = serde_json::from_str(CAPTIONS_2014).unwrap();
        let i: InstancesFile = serde_json::from_str(INSTANCES_2017).unwrap();
        let joined = join(Some(&c), Some(&i)).unwrap();
        let ids: Vec<u64> = joined.iter().map(|a| a.image.id).collect();
        assert_eq!(ids, vec![7, 42, 99]);
        let a42 = &joined[1];
        // captions file wins for the name; captions in annotation-id order
        assert_eq!(a42.image.file_name, "COCO_val2014_000000000042.jpg");
        assert_eq!(a42.captions, vec!["First caption.", "Second caption."]);
        // objects in annotation-id order with category names resolved; segmentation skipped
        assert_eq!(a42.objects.len(), 2);
        assert_eq!(a42.objects[0].category, "person");
        assert!(a42.objects[0].iscrowd);
        assert_eq!(a42.objects[1].category, "dog");
        assert_eq!(a42.objects[1].bbox, [10.0, 20.0, 30.0, 40.0]);
        assert!(joined[0].objects.is_empty());
        assert!(joined[2].captions.is_empty());
        assert_eq!(joined[2].image.file_name, "000000000099.jpg");
    }

    #[test]
    fn rejects_inconsistent_inputs() {
        let c: CaptionsFile = serde_json::from_str(CAPTIONS_2014).unwrap();
        let mut i: InstancesFile = serde_json::from_str(INSTANCES_2017).unwrap();
        i.images[0].width = 641;
        assert!(matches!(
            join(Some(&c), Some(&i)),
            Err(CocoError::SizeMismatch { image_id: 42, .. })
        ));

        let mut i: InstancesFile = serde_json::from_str(INSTANCES_2017).unwrap();
        i.annotations[0].category_id = 77;
        assert!(matches!(
            join(None, Some(&i)),
            Err(CocoError::UnknownCategory {
                category_id: 77,
                ..
            })
        ));

        let mut c2 = c.clone();
        c2.annotations[0].image_id = 1234;
        assert!(matches!(
            join(Some(&c2), None),
            Err(CocoError::UnknownImage { image_id: 1234, .. })
        ));
        assert!(matches!(join(None, None), Err(CocoError::NoInput)));
    }

    #[test]
    fn read_reports_path_on_bad_json() {
        let dir = std::env::temp_dir().join(format!("llava-coco-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("captions_bad.json");
        std::fs::write(&p, "{\"images\": 5}").unwrap();
        let err = read_captions(&p).unwrap_err();
        assert!(matches!(err, CocoError::Json { .. }));
        assert!(err.to_string().contains("captions_bad.json"));
        let missing = read_instances(dir.join("nope.json")).unwrap_err();
        assert!(matches!(missing, CocoError::Io { .. }));
        std::fs::remove_dir_all(&dir).ok();
    }
}
