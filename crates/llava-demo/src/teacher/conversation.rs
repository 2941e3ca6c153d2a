//! The conversation reply: three to five question/answer exchanges about things the picture
//! settles for certain.
//!
//! Each exchange comes from a different kind of question, asked only when its answer is
//! definite from what the teacher recovered: the colour of the object named by its shape
//! (only when no other object has that shape), the shape of the object of a colour (only when
//! that colour is unique), how many shapes there are, which side one object is of another
//! and which object is leftmost or rightmost (only when the order is known), whether a given
//! object is there (both present and absent ones), the background and an object's size
//! (when said). Answers are whole sentences that restate what they answer.

use rand::Rng;
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};

use crate::world::scene::{COLOURS, SHAPES};

use super::knowledge::{Knowledge, SceneObject};
use crate::words::{capitalise, join_list, number_word, with_article};

type Pair = (String, String);

/// One of the phrasings, at random.
fn pick<'a>(rng: &mut StdRng, options: &[&'a str]) -> &'a str {
    options.choose(rng).copied().unwrap_or("")
}

fn count_pair(k: &Knowledge, rng: &mut StdRng) -> Option<Pair> {
    let n = k.count();
    if n == 0 {
        return None;
    }
    let q = pick(
        rng,
        &[
            "How many shapes are there in the picture?",
            "How many objects can you see?",
            "Can you count the shapes in this image?",
            "How many shapes does the image contain?",
        ],
    );
    let list: Vec<String> = k.objects.iter().map(|o| with_article(&o.name())).collect();
    let a = if n == 1 {
        format!("There is just one shape in the picture: {}.", list.join(""))
    } else if k.ordered && rng.random_bool(0.5) {
        format!(
            "There are {} shapes. From left to right they are {}.",
            number_word(n),
            join_list(&list)
        )
    } else {
        format!(
            "There are {} shapes in the picture: {}.",
            number_word(n),
            join_list(&list)
        )
    };
    Some((q.to_string(), a))
}

fn colour_of_shape_pair(k: &Knowledge, rng: &mut StdRng) -> Option<Pair> {
    let unique: Vec<&SceneObject> = k
        .objects
        .iter()
        .filter(|o| k.shape_count(&o.shape) == 1)
        .collect();
    let o = unique.choose(rng)?;
    let s = &o.shape;
    let q = match rng.random_range(0..3) {
        0 => format!("What colour is the {s}?"),
        1 => format!("Which colour is the {s} painted?"),
        _ => format!("What is the colour of the {s}?"),
    };
    let a = match rng.random_range(0..3) {
        0 => format!("The {s} is {}.", o.colour),
        1 => format!("The {s} is painted {}.", o.colour),
        _ => format!(
            "The {s} is {}; it is the only {s} in the picture.",
            o.colour
        ),
    };
    Some((q, a))
}

fn shape_of_colour_pair(k: &Knowledge, rng: &mut StdRng) -> Option<Pair> {
    let unique: Vec<&SceneObject> = k
        .objects
        .iter()
        .filter(|o| k.colour_count(&o.colour) == 1)
        .collect();
    let o = unique.choose(rng)?;
    let c = &o.colour;
    let q = match rng.random_range(0..3) {
        0 => format!("What shape is the {c} object?"),
        1 => format!("Which shape is {c}?"),
        _ => format!("What is the {c} thing in the picture?"),
    };
    let a = match rng.random_range(0..2) {
        0 => format!("The {c} object is {}.", with_article(&o.shape)),
        _ => format!("The {c} shape is {}.", with_article(&o.shape)),
    };
    Some((q, a))
}

fn side_pair(k: &Knowledge, rng: &mut StdRng) -> Option<Pair> {
    if !k.ordered || k.count() < 2 {
        return None;
    }
    let n = k.count();
    let i = rng.random_range(0..n);
    let mut j = rng.random_range(0..n - 1);
    if j >= i {
        j += 1;
    }
    let (a, b) = (&k.objects[i], &k.objects[j]);
    let side = if i < j { "left" } else { "right" };
    let q = match rng.random_range(0..3) {
        0 => format!(
            "Is the {} to the left or to the right of the {}?",
            a.name(),
            b.name()
        ),
        1 => format!("Where is the {} relative to the {}?", a.name(), b.name()),
        _ => format!("On which side of the {} is the {}?", b.name(), a.name()),
    };
    let ans = match rng.random_range(0..2) {
        0 => format!("The {} is to the {side} of the {}.", a.name(), b.name()),
        _ => format!("The {} sits to the {side} of the {}.", a.name(), b.name()),
    };
    Some((q, ans))
}

fn extreme_pair(k: &Knowledge, rng: &mut StdRng) -> Option<Pair> {
    if !k.ordered || k.count() < 2 {
        return None;
    }
    let left = rng.random_bool(0.5);
    let (o, side) = if left {
        (k.objects.first()?, "left")
    } else {
        (k.objects.last()?, "right")
    };
    let q = match rng.random_range(0..3) {
        0 => format!("Which shape is furthest to the {side}?"),
        1 => format!("What is the {side}most object in the picture?"),
        _ => format!("Which shape is on the far {side}?"),
    };
    let a = match rng.random_range(0..2) {
        0 => format!("The {} is the {side}most shape.", o.name()),
        _ => format!("The {} is furthest to the {side}.", o.name()),
    };
    Some((q, a))
}

fn present_pair(k: &Knowledge, rng: &mut StdRng) -> Option<Pair> {
    let o = k.objects.choose(rng)?;
    let name = o.name();
    let q = match rng.random_range(0..3) {
        0 => format!("Is there {} in the picture?", with_article(&name)),
        1 => format!("Can you see {}?", with_article(&name)),
        _ => format!("Does the image contain {}?", with_article(&name)),
    };
    let a = match rng.random_range(0..2) {
        0 => format!(
            "Yes, there is {} in the picture.",
            with_article(&o.full_name())
        ),
        _ => format!("Yes, I can see {}.", with_article(&o.full_name())),
    };
    Some((q, a))
}

/// Asks about an object that is not there, preferring one that shares its colour or shape
/// with an object that is, so the answer can point at what is there instead.
fn absent_pair(k: &Knowledge, rng: &mut StdRng) -> Option<Pair> {
    if k.objects.is_empty() {
        return None;
    }
    let mut near: Vec<(&str, &str, &SceneObject)> = Vec::new();
    let mut far: Vec<(&str, &str)> = Vec::new();
    for (c, _) in COLOURS {
        for s in SHAPES {
            if k.find(c, s).is_some() {
                continue;
            }
            match k.objects.iter().find(|o| o.colour == c || o.shape == s) {
                Some(o) => near.push((c, s, o)),
                None => far.push((c, s)),
            }
        }
    }
    let ((c, s), hint) = if !near.is_empty() && (far.is_empty() || rng.random_bool(0.7)) {
        let (c, s, o) = near.choose(rng)?;
        ((*c, *s), Some(*o))
    } else {
        (*far.choose(rng)?, None)
    };
    let name = format!("{c} {s}");
    let q = match rng.random_range(0..3) {
        0 => format!("Is there {} in the picture?", with_article(&name)),
        1 => format!("Can you see {} anywhere?", with_article(&name)),
        _ => format!("Does the image contain {}?", with_article(&name)),
    };
    let a = match hint {
        Some(o) => format!(
            "No, there is no {name} in the picture, though there is {}.",
            with_article(&o.name())
        ),
        None => format!("No, there is no {name} in this image."),
    };
    Some((q, a))
}

fn background_pair(k: &Knowledge, rng: &mut StdRng) -> Option<Pair> {
    let bg = k.background.as_ref()?;
    let q = pick(
        rng,
        &[
            "What colour is the background?",
            "What are the shapes placed on?",
            "What does the background look like?",
        ],
    );
    let a = match rng.random_range(0..2) {
        0 => format!("The background is plain {bg}."),
        _ => format!(
            "The shapes sit on {} background.",
            with_article(bg.as_str())
        ),
    };
    Some((q.to_string(), a))
}

fn size_pair(k: &Knowledge, rng: &mut StdRng) -> Option<Pair> {
    let sized: Vec<&SceneObject> = k.objects.iter().filter(|o| o.size.is_some()).collect();
    let o = sized.choose(rng)?;
    let size = o.size?.name();
    let q = match rng.random_range(0..2) {
        0 => format!("Is the {} large or small?", o.name()),
        _ => format!("How big is the {}?", o.name()),
    };
    let a = format!("The {} is {size}.", o.name());
    Some((q, a))
}

/// The exchanges, in a random order of kinds.
pub fn pairs(k: &Knowledge, rng: &mut StdRng) -> Vec<Pair> {
    type Maker = fn(&Knowledge, &mut StdRng) -> Option<Pair>;
    let mut makers: Vec<Maker> = vec![
        count_pair,
        colour_of_shape_pair,
        shape_of_colour_pair,
        side_pair,
        extreme_pair,
        present_pair,
        absent_pair,
        background_pair,
        size_pair,
    ];
    makers.shuffle(rng);
    let want = rng.random_range(3..=5);
    let mut out = Vec::new();
    for m in makers {
        if out.len() == want {
            break;
        }
        if let Some(p) = m(k, rng) {
            out.push(p);
        }
    }
    out
}

/// The whole reply, in the `Question:`/`Answer:` form.
pub fn reply(k: &Knowledge, rng: &mut StdRng) -> String {
    let mut ps = pairs(k, rng);
    if ps.is_empty() {
        ps.push((
            "What does the picture show?".into(),
            "It shows a simple arrangement of flat shapes, but I cannot make out enough to \
             say more with confidence."
                .into(),
        ));
    }
    ps.iter()
        .map(|(q, a)| format!("Question: {}\nAnswer: {}", capitalise(q), a))
        .collect::<Vec<_>>()
        .join("\n\n")
}
