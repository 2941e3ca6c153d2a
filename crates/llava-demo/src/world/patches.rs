//! What each image patch shows: the labels of the tower's dense pretraining (the demo's stage
//! 0a), read from a scene's ground truth as a detector's targets are read from COCO boxes.
//!
//! The tower cuts a picture into a `grid`×`grid` raster of patches, row by row, and so do these
//! labels: one per patch and task, in the order of the tower's patch features.

use super::render::inside;
use super::scene::{COLOURS, MAX_OBJECTS, SHAPES, Scene};

/// Sample points per patch side when measuring how much of a patch an object covers.
const SAMPLES: usize = 4;

/// A patch belongs to the object covering most of it, if that object covers at least this share.
const MIN_COVER: f32 = 0.1;

/// Tasks with one class per patch. Class 0 of `colour` is "background".
/// - `colour`: of the object under the patch;
/// - `count`: the number of objects in the whole picture (class = count − 1), asked of every
///   patch, so that each patch's feature carries it.
pub const PATCH_TASKS: [(&str, usize); 2] = [("colour", COLOURS.len() + 1), ("count", MAX_OBJECTS)];

/// Tasks with one class per object, read from the mean feature of the patches it covers.
/// Asking it of every patch alone fails: the inside of a large circle looks like the inside of
/// a square, and a 3-layer tower from scratch stayed at chance on shape that way.
/// - `shape`;
/// - `order`: the object's place from the left (class 0 = leftmost), which the captions and the
///   left/right questions speak of.
pub const OBJECT_TASKS: [(&str, usize); 2] = [("shape", SHAPES.len()), ("order", MAX_OBJECTS)];

/// One picture's labels, in the order of the tower's patch features.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseLabels {
    /// Per [`PATCH_TASKS`] entry, one class per patch.
    pub patches: Vec<Vec<u32>>,
    /// Per object: the patches it covers and, per [`OBJECT_TASKS`] entry, its class.
    pub objects: Vec<(Vec<usize>, Vec<u32>)>,
}

/// The object under each patch (row-major), if any.
pub fn patch_objects(scene: &Scene, grid: usize) -> Vec<Option<usize>> {
    let grid = grid.max(1);
    let (pw, ph) = (
        scene.width as f32 / grid as f32,
        scene.height as f32 / grid as f32,
    );
    let mut owner = vec![None; grid * grid];
    for (gy, gx) in (0..grid).flat_map(|y| (0..grid).map(move |x| (y, x))) {
        let mut best = (0.0f32, None);
        for (i, o) in scene.objects.iter().enumerate() {
            let mut hits = 0;
            for sy in 0..SAMPLES {
                for sx in 0..SAMPLES {
                    let x = (gx as f32 + (sx as f32 + 0.5) / SAMPLES as f32) * pw;
                    let y = (gy as f32 + (sy as f32 + 0.5) / SAMPLES as f32) * ph;
                    if inside(&o.shape, (x - o.cx) / o.radius, (y - o.cy) / o.radius) {
                        hits += 1;
                    }
                }
            }
            let cover = hits as f32 / (SAMPLES * SAMPLES) as f32;
            if cover > best.0 {
                best = (cover, Some(i));
            }
        }
        if best.0 >= MIN_COVER {
            owner[gy * grid + gx] = best.1;
        }
    }
    // A small star may cover no patch well; its centre patch is still its own.
    for (i, o) in scene.objects.iter().enumerate() {
        if !owner.contains(&Some(i)) {
            let gx = ((o.cx / pw) as usize).min(grid - 1);
            let gy = ((o.cy / ph) as usize).min(grid - 1);
            owner[gy * grid + gx] = Some(i);
        }
    }
    owner
}

/// The labels of every task for a picture cut into `grid`×`grid` patches.
pub fn dense_labels(scene: &Scene, grid: usize) -> DenseLabels {
    let owner = patch_objects(scene, grid);
    let class_of = |list: &[&str], name: &str| {
        list.iter()
            .position(|n| *n == name)
            .map_or(0, |i| i as u32 + 1)
    };
    let colours: Vec<&str> = COLOURS.iter().map(|(n, _)| *n).collect();
    let count = scene.objects.len().clamp(1, MAX_OBJECTS) as u32 - 1;
    let colour = owner
        .iter()
        .map(|o| o.map_or(0, |i| class_of(&colours, &scene.objects[i].colour)))
        .collect();
    // `objects` are sorted left to right, so an object's index is its place from the left.
    let objects = scene
        .objects
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let patches = (0..owner.len()).filter(|&p| owner[p] == Some(i)).collect();
            let shape = class_of(&SHAPES, &o.shape).saturating_sub(1);
            (patches, vec![shape, i.min(MAX_OBJECTS - 1) as u32])
        })
        .collect();
    DenseLabels {
        patches: vec![colour, vec![count; owner.len()]],
        objects,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::scene::{Object, Size};

    fn object(shape: &str, colour: &str, cx: f32, cy: f32, radius: f32) -> Object {
        Object {
            shape: shape.into(),
            colour: colour.into(),
            size: Size::Large,
            cx,
            cy,
            radius,
        }
    }

    #[test]
    fn patches_are_labelled_with_the_object_under_them() {
        let scene = Scene {
            id: 0,
            file_name: "0.png".into(),
            width: 64,
            height: 64,
            background: "white".into(),
            // A square filling patches (1..3, 1..3), and a tiny star inside patch (6, 6).
            objects: vec![
                object("square", "red", 16.0, 16.0, 8.0 / 0.9),
                object("star", "blue", 52.0, 52.0, 3.0),
            ],
            noise_seed: 0,
        };
        let labels = dense_labels(&scene, 8);
        let colour = |x: usize, y: usize| labels.patches[0][y * 8 + x];
        for (x, y) in [(1, 1), (2, 1), (1, 2), (2, 2)] {
            assert_eq!(colour(x, y), 1, "red at ({x}, {y})");
        }
        assert_eq!((colour(0, 0), colour(5, 5)), (0, 0), "background");
        // The star covers under a tenth of any patch, but keeps its centre patch.
        assert_eq!(colour(6, 6), 3);
        assert!(
            labels.patches[1].iter().all(|&c| c == 1),
            "two objects, class 1"
        );
        assert_eq!(
            labels.objects,
            vec![
                (vec![9, 10, 17, 18], vec![1, 0]),
                (vec![6 * 8 + 6], vec![3, 1])
            ]
        );
        for (task, (_, classes)) in PATCH_TASKS.iter().enumerate() {
            assert!(
                labels.patches[task]
                    .iter()
                    .all(|&c| (c as usize) < *classes)
            );
        }
    }
}
