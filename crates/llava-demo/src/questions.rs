//! Questions with exact answers about a scene, one per kind: colour, shape, count, position.
//!
//! The same probes serve two purposes, as academic VQA data does in LLaVA-1.5: on the test
//! split they are the benchmark (short-answer and multiple-choice files for `llava eval`), and
//! on the train split they are the short-answer part of the stage-2 mixture, which teaches the
//! model to answer "using a single word or phrase" or with an option's letter.

use rand::Rng;
use rand::seq::{IndexedRandom, SliceRandom};
use serde::Serialize;

use crate::world::scene::{COLOURS, MAX_OBJECTS, SHAPES, Scene};

/// What a question asks about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Colour,
    Shape,
    Count,
    Position,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Colour, Kind::Shape, Kind::Count, Kind::Position];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Colour => "colour",
            Kind::Shape => "shape",
            Kind::Count => "count",
            Kind::Position => "position",
        }
    }

    /// The accuracy of guessing among the multiple-choice options.
    pub fn chance(self) -> f64 {
        match self {
            Kind::Colour | Kind::Shape => 0.25,
            Kind::Count => 1.0 / MAX_OBJECTS as f64,
            Kind::Position => 0.5,
        }
    }
}

/// One question with its answer, and the options for the multiple-choice form.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Probe {
    pub kind: Kind,
    pub question: String,
    pub answer: String,
    pub options: Vec<String>,
    pub answer_index: usize,
}

fn with_distractors(
    answer: &str,
    pool: &[&str],
    n: usize,
    rng: &mut impl Rng,
) -> (Vec<String>, usize) {
    let mut options: Vec<String> = pool
        .iter()
        .filter(|p| **p != answer)
        .copied()
        .collect::<Vec<_>>()
        .choose_multiple(rng, n.saturating_sub(1))
        .map(|s| s.to_string())
        .collect();
    options.push(answer.to_string());
    options.shuffle(rng);
    let i = options.iter().position(|o| o == answer).unwrap_or(0);
    (options, i)
}

/// The probe of one kind, or `None` when the scene cannot pose it unambiguously (a colour
/// question needs a shape that only one object has; a position question needs two objects).
pub fn probe(scene: &Scene, kind: Kind, rng: &mut impl Rng) -> Option<Probe> {
    let colours: Vec<&str> = COLOURS.iter().map(|(c, _)| *c).collect();
    match kind {
        Kind::Colour => {
            let o = *scene.unique_by_shape().choose(rng)?;
            let (options, answer_index) = with_distractors(&o.colour, &colours, 4, rng);
            let question = match rng.random_range(0..3) {
                0 => format!("What colour is the {}?", o.shape),
                1 => format!("What is the colour of the {}?", o.shape),
                _ => format!("Which colour does the {} have?", o.shape),
            };
            Some(Probe {
                kind,
                question,
                answer: o.colour.clone(),
                options,
                answer_index,
            })
        }
        Kind::Shape => {
            let o = *scene.unique_by_colour().choose(rng)?;
            let (options, answer_index) = with_distractors(&o.shape, &SHAPES, 4, rng);
            let question = match rng.random_range(0..2) {
                0 => format!("What shape is the {} object?", o.colour),
                _ => format!("Which shape is {}?", o.colour),
            };
            Some(Probe {
                kind,
                question,
                answer: o.shape.clone(),
                options,
                answer_index,
            })
        }
        Kind::Count => {
            let n = scene.objects.len();
            let question = match rng.random_range(0..3) {
                0 => "How many shapes are there in the image?",
                1 => "How many objects are in the picture?",
                _ => "Count the shapes in the image.",
            };
            Some(Probe {
                kind,
                question: question.into(),
                answer: n.to_string(),
                options: (1..=MAX_OBJECTS).map(|i| i.to_string()).collect(),
                answer_index: n - 1,
            })
        }
        Kind::Position => {
            if scene.objects.len() < 2 {
                return None;
            }
            let picked: Vec<usize> = (0..scene.objects.len())
                .collect::<Vec<_>>()
                .choose_multiple(rng, 2)
                .copied()
                .collect();
            let (a, b) = (&scene.objects[picked[0]], &scene.objects[picked[1]]);
            let left = a.cx < b.cx;
            let question = format!(
                "Is the {} to the left or to the right of the {}?",
                a.name(),
                b.name()
            );
            Some(Probe {
                kind,
                question,
                answer: if left { "left" } else { "right" }.into(),
                options: vec!["left".into(), "right".into()],
                answer_index: if left { 0 } else { 1 },
            })
        }
    }
}

/// One probe of every kind the scene can pose.
pub fn probes(scene: &Scene, rng: &mut impl Rng) -> Vec<Probe> {
    Kind::ALL
        .iter()
        .filter_map(|k| probe(scene, *k, rng))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn answers_agree_with_the_scene() {
        let mut rng = StdRng::seed_from_u64(3);
        for id in 0..300 {
            let s = Scene::sample(id, 64, &mut rng);
            for p in probes(&s, &mut rng) {
                assert_eq!(p.options[p.answer_index], p.answer);
                match p.kind {
                    Kind::Count => assert_eq!(p.answer, s.objects.len().to_string()),
                    Kind::Colour => {
                        let shape = SHAPES.iter().find(|k| p.question.contains(*k)).unwrap();
                        let o = s.objects.iter().find(|o| o.shape == *shape).unwrap();
                        assert_eq!(o.colour, p.answer);
                    }
                    Kind::Position => {
                        let names: Vec<_> = s.objects.iter().map(|o| o.name()).collect();
                        let a = names
                            .iter()
                            .position(|n| p.question.starts_with(&format!("Is the {n} ")))
                            .unwrap();
                        let b = names
                            .iter()
                            .position(|n| p.question.ends_with(&format!("the {n}?")))
                            .unwrap();
                        assert_eq!(p.answer == "left", s.objects[a].cx < s.objects[b].cx);
                    }
                    Kind::Shape => assert!(SHAPES.contains(&p.answer.as_str())),
                }
            }
        }
    }
}
