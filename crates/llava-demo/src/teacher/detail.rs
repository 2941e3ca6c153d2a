//! The detailed description: one paragraph that walks through the picture.
//!
//! It says how many shapes there are and on what background, then each object from left to
//! right with its size and colour and, when boxes were given, where it sits in the frame;
//! then which object is highest and lowest, which are large or small, and whether any touch.
//! Positions are always put in words (never numbers), as the system prompt asks.

use rand::Rng;
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};

use super::knowledge::{Knowledge, SceneObject};
use crate::words::{capitalise, join_list, number_word, with_article};

fn pick<'a>(rng: &mut StdRng, options: &[&'a str]) -> &'a str {
    options.choose(rng).copied().unwrap_or("")
}

fn opening(k: &Knowledge, rng: &mut StdRng) -> String {
    let on_bg = k
        .background
        .as_ref()
        .map(|b| format!(" on {} background", with_article(b)))
        .unwrap_or_default();
    if let [o] = k.objects.as_slice() {
        let a = with_article(&o.full_name());
        return match rng.random_range(0..2) {
            0 => format!("The picture shows a single shape, {a},{on_bg}."),
            _ => format!("This image contains just one shape: {a}{on_bg}."),
        }
        .replace(",.", ".");
    }
    let n = number_word(k.count());
    match rng.random_range(0..3) {
        0 => format!("The picture shows {n} flat shapes{on_bg}."),
        1 => format!("This image contains {n} simple shapes{on_bg}."),
        _ => format!("There are {n} shapes in this picture{on_bg}."),
    }
}

/// One sentence per object, left to right when the order is known.
fn walk(k: &Knowledge, rng: &mut StdRng) -> Vec<String> {
    let n = k.count();
    let mut out = Vec::new();
    if n == 1 {
        if let Some(p) = k.objects[0].place() {
            out.push(format!("The {} sits {p}.", k.objects[0].name()));
        }
        return out;
    }
    // Middle objects take the connecting phrases in a shuffled order, so none repeats.
    let mut middle = [
        "Next comes",
        "Then, moving right, there is",
        "After that is",
    ];
    middle.shuffle(rng);
    let mut middle = middle.iter().cycle();
    for (i, o) in k.objects.iter().enumerate() {
        let a = with_article(&o.full_name());
        let lead = if !k.ordered {
            "There is also".to_string()
        } else if i == 0 {
            pick(
                rng,
                &[
                    "On the far left is",
                    "Furthest to the left sits",
                    "Leftmost is",
                ],
            )
            .to_string()
        } else if i + 1 == n {
            pick(
                rng,
                &[
                    "On the far right is",
                    "Furthest to the right is",
                    "Rightmost is",
                ],
            )
            .to_string()
        } else {
            middle.next().copied().unwrap_or("Next comes").to_string()
        };
        let sentence = match o.place() {
            Some(p) => format!("{lead} {a}, {p}."),
            None => format!("{lead} {a}."),
        };
        out.push(sentence);
    }
    out
}

/// Which object is highest and lowest, when the difference is clear.
fn heights(k: &Knowledge) -> Option<String> {
    if k.count() < 2 || !k.all_boxed() {
        return None;
    }
    let y = |o: &SceneObject| o.centre().map_or(0.0, |c| c.1);
    let top = k.objects.iter().min_by(|a, b| y(a).total_cmp(&y(b)))?;
    let bottom = k.objects.iter().max_by(|a, b| y(a).total_cmp(&y(b)))?;
    (y(bottom) - y(top) > 0.2).then(|| {
        format!(
            "The {} is placed highest, while the {} sits closest to the bottom edge.",
            top.name(),
            bottom.name()
        )
    })
}

/// Which objects are large and which small, when every size is known.
fn sizes(k: &Knowledge) -> Option<String> {
    if k.count() < 2 || k.objects.iter().any(|o| o.size.is_none()) {
        return None;
    }
    let of = |large: bool| -> Vec<String> {
        k.objects
            .iter()
            .filter(|o| o.size.map(|s| s.name() == "large") == Some(large))
            .map(|o| format!("the {}", o.name()))
            .collect()
    };
    let (large, small) = (of(true), of(false));
    let all = if k.count() == 2 {
        "Both shapes are"
    } else {
        "All of the shapes are"
    };
    Some(match (large.is_empty(), small.is_empty()) {
        (true, _) => format!("{all} small."),
        (_, true) => format!("{all} large."),
        _ => format!(
            "{} {} large, while {} {} small.",
            capitalise(&join_list(&large)),
            if large.len() == 1 { "is" } else { "are" },
            join_list(&small),
            if small.len() == 1 { "is" } else { "are" }
        ),
    })
}

/// Whether any two boxes overlap.
fn any_overlap(k: &Knowledge) -> bool {
    let boxes: Vec<[f64; 4]> = k.objects.iter().filter_map(|o| o.bbox).collect();
    boxes.iter().enumerate().any(|(i, a)| {
        boxes[i + 1..]
            .iter()
            .any(|b| a[0] < b[2] && b[0] < a[2] && a[1] < b[3] && b[1] < a[3])
    })
}

/// The description.
pub fn reply(k: &Knowledge, rng: &mut StdRng) -> String {
    if k.objects.is_empty() {
        return "The picture shows a plain scene with a few simple flat shapes; nothing in it \
                stands out clearly enough to describe in more detail."
            .into();
    }
    let mut parts = vec![opening(k, rng)];
    parts.extend(walk(k, rng));
    parts.extend(heights(k));
    parts.extend(sizes(k));
    if k.all_boxed() && k.count() > 1 && !any_overlap(k) {
        parts.push(
            pick(
                rng,
                &[
                    "None of the shapes overlap, so each one stands clearly on its own.",
                    "The shapes are spread out without touching one another.",
                ],
            )
            .to_string(),
        );
    }
    parts.push(
        pick(
            rng,
            &[
                "Each shape is painted in a single flat colour with crisp edges.",
                "The colours are bright and solid, which makes every shape easy to tell apart.",
                "It is a clean, simple composition with nothing else in the frame.",
            ],
        )
        .to_string(),
    );
    parts.join(" ")
}
