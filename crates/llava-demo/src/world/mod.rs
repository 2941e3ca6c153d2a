//! The shapes world: procedurally generated scenes written as a small COCO.
//!
//! `OUT/world/` holds:
//! - `images/NNNNNN.png`, every split in one folder (ids do not collide across splits);
//! - `annotations/captions_{split}.json` and `annotations/instances_{split}.json` in COCO's
//!   layout, the category of each box being the object's shape;
//! - `scenes_{split}.jsonl`, the ground truth (colours, sizes, positions) from which the
//!   evaluation questions are made. The teacher never sees it.

pub mod captions;
pub mod patches;
pub mod render;
pub mod scene;

use std::path::{Path, PathBuf};

use llava_data::coco::{
    CaptionsFile, CocoCaption, CocoCategory, CocoImage, CocoInstance, InstancesFile,
};
use rand::SeedableRng;
use rand::rngs::StdRng;

pub use scene::{Object, Scene};

use crate::error::{DemoError, Result, io_err};

/// The three splits and the first image id of each.
pub const SPLITS: [(&str, u64); 3] = [("train", 0), ("val", 100_000), ("test", 200_000)];

/// How many scenes of which size.
#[derive(Debug, Clone)]
pub struct WorldConfig {
    pub seed: u64,
    pub image_size: u32,
    pub train: usize,
    pub val: usize,
    pub test: usize,
}

/// Where the world's files are.
#[derive(Debug, Clone)]
pub struct WorldPaths {
    pub root: PathBuf,
}

impl WorldPaths {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        WorldPaths { root: root.into() }
    }
    pub fn images(&self) -> PathBuf {
        self.root.join("images")
    }
    pub fn captions(&self, split: &str) -> PathBuf {
        self.root
            .join("annotations")
            .join(format!("captions_{split}.json"))
    }
    pub fn instances(&self, split: &str) -> PathBuf {
        self.root
            .join("annotations")
            .join(format!("instances_{split}.json"))
    }
    /// A split's COCO files as `llava instruct` reads them (what the teacher and judge see).
    pub fn coco(&self, split: &str) -> llava_instruct::SourceSpec {
        llava_instruct::SourceSpec {
            captions: Some(self.captions(split)),
            instances: Some(self.instances(split)),
            annotations_jsonl: None,
        }
    }
    pub fn scenes(&self, split: &str) -> PathBuf {
        self.root.join(format!("scenes_{split}.jsonl"))
    }
}

/// The scenes of one split, sampled from the world's seed (each split has its own stream, so
/// changing the number of test scenes does not change the training scenes).
pub fn sample_split(config: &WorldConfig, split: &str) -> Vec<(Scene, Vec<String>)> {
    let (index, first_id) = SPLITS
        .iter()
        .enumerate()
        .find(|(_, (s, _))| *s == split)
        .map(|(i, (_, id))| (i as u64, *id))
        .unwrap_or((0, 0));
    let n = match split {
        "train" => config.train,
        "val" => config.val,
        _ => config.test,
    };
    let mut rng = StdRng::seed_from_u64(config.seed.wrapping_mul(31).wrapping_add(index));
    (0..n as u64)
        .map(|i| {
            let scene = Scene::sample(first_id + i, config.image_size, &mut rng);
            let caps = captions::captions(&scene, &mut rng);
            (scene, caps)
        })
        .collect()
}

/// Writes every split: images, COCO files and ground truth.
pub fn write_world(config: &WorldConfig, paths: &WorldPaths) -> Result<()> {
    let images = paths.images();
    std::fs::create_dir_all(&images).map_err(io_err(&images))?;
    std::fs::create_dir_all(paths.root.join("annotations"))
        .map_err(io_err(&paths.root.join("annotations")))?;
    let categories: Vec<CocoCategory> = scene::SHAPES
        .iter()
        .enumerate()
        .map(|(i, s)| CocoCategory {
            id: i as u64 + 1,
            name: s.to_string(),
            supercategory: "shape".into(),
        })
        .collect();
    for (split, _) in SPLITS {
        let scenes = sample_split(config, split);
        let mut coco_images = Vec::new();
        let mut caps = Vec::new();
        let mut instances = Vec::new();
        let mut truth = String::new();
        for (s, scene_caps) in &scenes {
            let path = images.join(&s.file_name);
            render::render(s)
                .save(&path)
                .map_err(|e| DemoError::Image(path.clone(), e.to_string()))?;
            coco_images.push(CocoImage {
                id: s.id,
                file_name: s.file_name.clone(),
                width: s.width,
                height: s.height,
                coco_url: None,
            });
            for c in scene_caps {
                caps.push(CocoCaption {
                    id: caps.len() as u64 + 1,
                    image_id: s.id,
                    caption: c.clone(),
                });
            }
            for o in &s.objects {
                let [x, y, w, h] = o.bbox().map(f64::from);
                instances.push(CocoInstance {
                    id: instances.len() as u64 + 1,
                    image_id: s.id,
                    category_id: scene::SHAPES
                        .iter()
                        .position(|k| *k == o.shape)
                        .map_or(0, |i| i as u64 + 1),
                    bbox: [x, y, w, h],
                    area: w * h,
                    iscrowd: 0,
                });
            }
            truth.push_str(&serde_json::to_string(s)?);
            truth.push('\n');
        }
        write_json(
            &paths.captions(split),
            &CaptionsFile {
                images: coco_images.clone(),
                annotations: caps,
            },
        )?;
        write_json(
            &paths.instances(split),
            &InstancesFile {
                images: coco_images,
                annotations: instances,
                categories: categories.clone(),
            },
        )?;
        write_file(&paths.scenes(split), truth.as_bytes())?;
    }
    Ok(())
}

/// Reads a split's ground truth back.
pub fn read_scenes(path: &Path) -> Result<Vec<Scene>> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| DemoError::Bad(format!("{}:{}: {e}", path.display(), i + 1)))
        })
        .collect()
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    write_file(path, serde_json::to_string(value)?.as_bytes())
}

/// Writes through a temporary file, so a killed run never leaves half a file.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}
