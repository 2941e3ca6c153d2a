//! How true a caption is of its picture. The demo scores stage 0's captions of held-out scenes
//! with this, to show whether the tower has learned to see before the projector is replaced.
//! Captions are read with the judge's own claim reader ([`crate::teacher::claims`]).

use serde::Serialize;

use crate::teacher::claims::{Claim, extract};
use crate::world::Scene;

/// Totals over many captions.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CaptionScore {
    pub captions: usize,
    /// `colour shape` objects the captions say are there.
    pub named: usize,
    /// Of those, the ones that are in the picture.
    pub named_correctly: usize,
    /// Objects in the pictures.
    pub objects: usize,
    /// Of those, the ones a caption named.
    pub objects_found: usize,
    /// Captions that name as many objects as the picture has.
    pub right_count: usize,
}

impl CaptionScore {
    pub fn add(&mut self, scene: &Scene, caption: &str) {
        let named: Vec<(String, String)> = extract(caption)
            .into_iter()
            .filter_map(|c| match c {
                Claim::Exists {
                    colour,
                    shape,
                    present: true,
                } => Some((colour, shape)),
                _ => None,
            })
            .collect();
        let is_there = |(c, s): &(String, String)| {
            scene
                .objects
                .iter()
                .any(|o| &o.colour == c && &o.shape == s)
        };
        let mut distinct = named.clone();
        distinct.sort();
        distinct.dedup();
        self.captions += 1;
        self.named += distinct.len();
        self.named_correctly += distinct.iter().filter(|n| is_there(n)).count();
        self.objects += scene.objects.len();
        self.objects_found += scene
            .objects
            .iter()
            .filter(|o| distinct.contains(&(o.colour.clone(), o.shape.clone())))
            .count();
        self.right_count += usize::from(named.len() == scene.objects.len());
    }

    /// The share of named objects that are there.
    pub fn precision(&self) -> f64 {
        ratio(self.named_correctly, self.named)
    }

    /// The share of the pictures' objects that were named.
    pub fn recall(&self) -> f64 {
        ratio(self.objects_found, self.objects)
    }

    /// The share of captions with the right number of objects.
    pub fn count_accuracy(&self) -> f64 {
        ratio(self.right_count, self.captions)
    }
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::{WorldConfig, sample_split};

    #[test]
    fn the_true_caption_scores_full_marks_and_a_wrong_one_does_not() {
        let config = WorldConfig {
            seed: 3,
            image_size: 64,
            train: 20,
            val: 0,
            test: 0,
        };
        let scenes = sample_split(&config, "train");
        let mut truth = CaptionScore::default();
        let mut wrong = CaptionScore::default();
        for (scene, _) in &scenes {
            let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
            truth.add(scene, &crate::world::captions::order(scene, &mut rng));
            wrong.add(
                scene,
                "From left to right: a blue star, a blue star and a red circle.",
            );
        }
        assert_eq!(truth.captions, 20);
        assert_eq!(truth.precision(), 1.0);
        assert_eq!(truth.recall(), 1.0);
        assert_eq!(truth.count_accuracy(), 1.0);
        assert!(wrong.precision() < 0.5, "{wrong:?}");
        assert!(wrong.recall() < 0.3, "{wrong:?}");
        // Three objects named, duplicates included.
        let threes = scenes.iter().filter(|(s, _)| s.objects.len() == 3).count();
        assert_eq!(wrong.right_count, threes);
    }
}
