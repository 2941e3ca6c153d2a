//! Five human-like captions per scene, as COCO has.
//!
//! Each caption is drawn from one of six kinds, five kinds per image, in random order:
//! - **order** (always present): the objects left to right — `From left to right: a red
//!   circle, a large blue square and a green star.` With one object: `A small red circle on a
//!   beige background.`
//! - **count**: `There are three shapes in the picture.`
//! - **relation**: one pair, `The red circle is to the left of the blue square.` (or `right
//!   of`, with the pair swapped); with one object, which side of the picture it is on.
//! - **inventory**: the objects in random order, `An image showing a green star and a red
//!   circle.`
//! - **colours**: `Colours in the picture: red, blue and green.`
//! - **tally**: shapes counted by kind, `Two circles and a square on a white background.`
//!
//! An object is always written `a|an [small|large] <colour> <shape>`, so that the offline
//! teacher, which reads only these words, can recover every object and their order.

use rand::Rng;
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};

use super::scene::{Object, Scene};
use crate::words::{article, capitalise, join_list, number_word, plural_if, with_article};

/// How many captions each image has.
pub const CAPTIONS_PER_IMAGE: usize = 5;

/// `a red circle` or `a large red circle`, the size said half the time.
fn phrase(o: &Object, rng: &mut impl Rng) -> String {
    let words = if rng.random_bool(0.5) {
        format!("{} {}", o.size.name(), o.name())
    } else {
        o.name()
    };
    with_article(&words)
}

/// The **order** caption: every object, left to right.
pub fn order(s: &Scene, rng: &mut impl Rng) -> String {
    let list: Vec<String> = s.objects.iter().map(|o| phrase(o, rng)).collect();
    if let [only] = list.as_slice() {
        return format!(
            "{} on {} {} background.",
            capitalise(only),
            article(&s.background),
            s.background
        );
    }
    let list = join_list(&list);
    match rng.random_range(0..3) {
        0 => format!("From left to right: {list}."),
        1 => format!("Left to right, there is {list}."),
        _ => format!("Reading from left to right we see {list}."),
    }
}

fn count(s: &Scene, rng: &mut impl Rng) -> String {
    let n = s.objects.len();
    let word = number_word(n);
    if n == 1 {
        return match rng.random_range(0..2) {
            0 => "There is only one shape in this picture.".into(),
            _ => format!(
                "Just one object on {} {} background.",
                article(&s.background),
                s.background
            ),
        };
    }
    match rng.random_range(0..3) {
        0 => format!("There are {word} shapes in the picture."),
        1 => format!(
            "{} objects on {} {} background.",
            capitalise(&word),
            article(&s.background),
            s.background
        ),
        _ => format!("A picture of {word} shapes."),
    }
}

fn relation(s: &Scene, rng: &mut impl Rng) -> String {
    if let [o] = s.objects.as_slice() {
        let third = o.cx / s.width as f32;
        let side = if third < 0.4 {
            "on the left side of"
        } else if third > 0.6 {
            "on the right side of"
        } else {
            "in the middle of"
        };
        return format!("The {} is {side} the image.", o.name());
    }
    let i = rng.random_range(0..s.objects.len());
    let mut j = rng.random_range(0..s.objects.len() - 1);
    if j >= i {
        j += 1;
    }
    let (a, b) = (&s.objects[i.min(j)], &s.objects[i.max(j)]);
    match rng.random_range(0..3) {
        0 => format!("The {} is to the left of the {}.", a.name(), b.name()),
        1 => format!("The {} is to the right of the {}.", b.name(), a.name()),
        _ => format!(
            "{} {} sits to the right of {} {}.",
            capitalise(article(&b.colour)),
            b.name(),
            article(&a.colour),
            a.name()
        ),
    }
}

fn inventory(s: &Scene, rng: &mut impl Rng) -> String {
    let mut list: Vec<String> = s.objects.iter().map(|o| phrase(o, rng)).collect();
    list.shuffle(rng);
    if list.len() == 1 {
        return format!("A picture of a single {}.", s.objects[0].name());
    }
    match rng.random_range(0..2) {
        0 => format!("An image showing {}.", join_list(&list)),
        _ => format!("Some shapes: {}.", join_list(&list)),
    }
}

fn colours(s: &Scene, rng: &mut impl Rng) -> String {
    let mut seen: Vec<String> = Vec::new();
    for o in &s.objects {
        if !seen.contains(&o.colour) {
            seen.push(o.colour.clone());
        }
    }
    seen.shuffle(rng);
    if let [only] = seen.as_slice() {
        return format!("Everything in the picture is {only}, apart from the background.");
    }
    format!("Colours in the picture: {}.", join_list(&seen))
}

fn tally(s: &Scene, rng: &mut impl Rng) -> String {
    let mut kinds: Vec<(String, usize)> = Vec::new();
    for o in &s.objects {
        match kinds.iter_mut().find(|(k, _)| *k == o.shape) {
            Some((_, n)) => *n += 1,
            None => kinds.push((o.shape.clone(), 1)),
        }
    }
    kinds.shuffle(rng);
    let parts: Vec<String> = kinds
        .iter()
        .map(|(k, n)| match n {
            1 => format!("{} {k}", article(k)),
            n => format!("{} {}", number_word(*n), plural_if(k, *n)),
        })
        .collect();
    if let [(shape, 1)] = kinds.as_slice() {
        return format!("One {shape}, painted {}.", s.objects[0].colour);
    }
    format!(
        "{} on {} {} background.",
        capitalise(&join_list(&parts)),
        article(&s.background),
        s.background
    )
}

/// The scene's captions.
pub fn captions(s: &Scene, rng: &mut StdRng) -> Vec<String> {
    type Kind = fn(&Scene, &mut StdRng) -> String;
    let others: [Kind; 5] = [count, relation, inventory, colours, tally];
    let mut chosen: Vec<Kind> = others
        .choose_multiple(rng, CAPTIONS_PER_IMAGE - 1)
        .copied()
        .collect();
    chosen.push(order);
    chosen.shuffle(rng);
    chosen.iter().map(|k| k(s, rng)).collect()
}
