//! A scene of the shapes world: what is in the picture, as ground truth.
//!
//! Scenes are sampled so that every question the demo asks has one right answer:
//! - no two objects share both colour and shape, so "the red circle" names one object;
//! - objects do not overlap, so each can be seen and counted;
//! - the centres of any two objects are at least [`MIN_DX`] of the width apart horizontally,
//!   so "left of" is never a judgement call.

use rand::Rng;
use rand::seq::IndexedRandom;
use serde::{Deserialize, Serialize};

/// Object colours, with the RGB they are painted in. Saturated, so that none is close to a
/// background.
pub const COLOURS: [(&str, [u8; 3]); 6] = [
    ("red", [214, 39, 40]),
    ("green", [44, 160, 44]),
    ("blue", [31, 90, 220]),
    ("yellow", [240, 200, 20]),
    ("purple", [148, 60, 189]),
    ("orange", [255, 127, 14]),
];

/// Object shapes; the COCO category of each object.
pub const SHAPES: [&str; 4] = ["circle", "square", "triangle", "star"];

/// Backgrounds: a name for the captions and a base RGB (a gradient and noise vary it).
pub const BACKGROUNDS: [(&str, [u8; 3]); 5] = [
    ("white", [246, 246, 246]),
    ("light grey", [205, 205, 205]),
    ("beige", [230, 218, 190]),
    ("cream", [250, 243, 220]),
    ("dark grey", [80, 80, 80]),
];

/// The fewest and most objects in a scene.
pub const MIN_OBJECTS: usize = 1;
pub const MAX_OBJECTS: usize = 5;

/// The smallest horizontal gap between two object centres, as a fraction of the width.
pub const MIN_DX: f32 = 0.08;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Size {
    Small,
    Large,
}

impl Size {
    pub fn name(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Large => "large",
        }
    }

    /// The object's radius as a fraction of the image width.
    fn radius_range(self) -> (f32, f32) {
        match self {
            Size::Small => (0.075, 0.095),
            Size::Large => (0.12, 0.15),
        }
    }
}

/// One object: its attributes and where it sits, in pixels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Object {
    pub shape: String,
    pub colour: String,
    pub size: Size,
    pub cx: f32,
    pub cy: f32,
    /// Half the side of the object's bounding square.
    pub radius: f32,
}

impl Object {
    /// `small red circle`-style names for captions and questions.
    pub fn name(&self) -> String {
        format!("{} {}", self.colour, self.shape)
    }

    /// The COCO box `[x, y, width, height]` of the painted object.
    pub fn bbox(&self) -> [f32; 4] {
        let r = self.radius;
        [self.cx - r, self.cy - r, 2.0 * r, 2.0 * r]
    }

    pub fn rgb(&self) -> [u8; 3] {
        COLOURS
            .iter()
            .find(|(n, _)| *n == self.colour)
            .map(|(_, c)| *c)
            .unwrap_or([0, 0, 0])
    }
}

/// A whole scene. `objects` are sorted left to right, which the captions and questions rely on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    pub id: u64,
    pub file_name: String,
    pub width: u32,
    pub height: u32,
    pub background: String,
    pub objects: Vec<Object>,
    /// The seed of the background's noise, so that rendering is reproducible.
    pub noise_seed: u64,
}

impl Scene {
    /// Samples a scene of `side`×`side` pixels.
    pub fn sample(id: u64, side: u32, rng: &mut impl Rng) -> Scene {
        let n = rng.random_range(MIN_OBJECTS..=MAX_OBJECTS);
        let w = side as f32;
        loop {
            if let Some(objects) = place_objects(n, w, rng) {
                let (background, _) = *BACKGROUNDS.choose(rng).unwrap_or(&BACKGROUNDS[0]);
                return Scene {
                    id,
                    file_name: format!("{id:06}.png"),
                    width: side,
                    height: side,
                    background: background.to_string(),
                    objects,
                    noise_seed: rng.random(),
                };
            }
        }
    }

    pub fn background_rgb(&self) -> [u8; 3] {
        BACKGROUNDS
            .iter()
            .find(|(n, _)| *n == self.background)
            .map(|(_, c)| *c)
            .unwrap_or([255, 255, 255])
    }

    /// Objects whose shape no other object has.
    pub fn unique_by_shape(&self) -> Vec<&Object> {
        self.objects
            .iter()
            .filter(|o| self.objects.iter().filter(|p| p.shape == o.shape).count() == 1)
            .collect()
    }

    /// Objects whose colour no other object has.
    pub fn unique_by_colour(&self) -> Vec<&Object> {
        self.objects
            .iter()
            .filter(|o| self.objects.iter().filter(|p| p.colour == o.colour).count() == 1)
            .collect()
    }
}

/// Tries to place `n` objects; `None` when the random placement got stuck (the caller
/// resamples).
fn place_objects(n: usize, w: f32, rng: &mut impl Rng) -> Option<Vec<Object>> {
    let mut objects: Vec<Object> = Vec::with_capacity(n);
    let mut attempts = 0;
    while objects.len() < n {
        attempts += 1;
        if attempts > 500 {
            return None;
        }
        let shape = *SHAPES.choose(rng)?;
        let (colour, _) = *COLOURS.choose(rng)?;
        if objects
            .iter()
            .any(|o| o.shape == shape && o.colour == colour)
        {
            continue;
        }
        let size = if rng.random_bool(0.5) {
            Size::Small
        } else {
            Size::Large
        };
        let (lo, hi) = size.radius_range();
        let radius = (rng.random_range(lo..hi) * w).round().max(2.0);
        let margin = radius + 1.0;
        let cx = rng.random_range(margin..w - margin);
        let cy = rng.random_range(margin..w - margin);
        let clear = objects.iter().all(|o| {
            let apart = (o.cx - cx).abs().max((o.cy - cy).abs()) >= o.radius + radius + 2.0;
            apart && (o.cx - cx).abs() >= MIN_DX * w
        });
        if clear {
            objects.push(Object {
                shape: shape.to_string(),
                colour: colour.to_string(),
                size,
                cx,
                cy,
                radius,
            });
        }
    }
    objects.sort_by(|a, b| a.cx.total_cmp(&b.cx));
    Some(objects)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn scenes_keep_their_promises() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut counts = [0usize; MAX_OBJECTS + 1];
        for id in 0..400 {
            let s = Scene::sample(id, 64, &mut rng);
            counts[s.objects.len()] += 1;
            for (i, a) in s.objects.iter().enumerate() {
                let [x, y, bw, bh] = a.bbox();
                assert!(x >= 0.0 && y >= 0.0 && x + bw <= 64.0 && y + bh <= 64.0);
                for b in &s.objects[i + 1..] {
                    assert!(b.cx - a.cx >= MIN_DX * 64.0, "sorted and apart");
                    assert!(!(a.shape == b.shape && a.colour == b.colour));
                    let gap = (a.cx - b.cx).abs().max((a.cy - b.cy).abs());
                    assert!(gap >= a.radius + b.radius, "no overlap");
                }
            }
        }
        assert!(counts[1..].iter().all(|&c| c > 50), "{counts:?}");
    }
}
