//! The complex-reasoning reply: exactly one question that takes a step or two of thought,
//! with an answer that shows those steps.
//!
//! The question is drawn from the kinds the scene supports: how many shapes remain if every
//! shape of one kind is removed; which colour is most common (or whether any colour repeats);
//! what lies between two objects; which object is highest or lowest, biggest, or which two
//! are closest (these three need boxes, and are asked only when the winner is clear by a
//! margin); which kinds of shape are missing; and, for a lone object, what adding a second
//! one of its colour would change.

use rand::Rng;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;

use crate::world::scene::SHAPES;

use super::knowledge::{Knowledge, SceneObject};
use crate::words::{capitalise, join_list, number_word, plural_if, with_article};

type Pair = (String, String);

fn the(o: &SceneObject) -> String {
    format!("the {}", o.name())
}

fn names(objects: &[&SceneObject]) -> String {
    join_list(&objects.iter().map(|o| the(o)).collect::<Vec<_>>())
}

fn remove_kind(k: &Knowledge, rng: &mut StdRng) -> Option<Pair> {
    let n = k.count();
    if n < 2 {
        return None;
    }
    let present: Vec<&str> = SHAPES
        .iter()
        .copied()
        .filter(|s| k.shape_count(s) > 0)
        .collect();
    let s = *present.choose(rng)?;
    let (gone, kept): (Vec<&SceneObject>, Vec<&SceneObject>) =
        k.objects.iter().partition(|o| o.shape == s);
    let q = match rng.random_range(0..2) {
        0 => format!("If every {s} were taken out of the picture, how many shapes would be left?"),
        _ => format!("Suppose all the {s}s were removed. How many shapes would remain, and which?"),
    };
    let left = kept.len();
    let first = if left == 0 {
        "None would be left.".to_string()
    } else {
        format!(
            "{} {} would be left.",
            capitalise(&number_word(left)),
            plural_if("shape", left)
        )
    };
    let which = if gone.len() == 1 {
        format!("only one of them is {}, {}", with_article(s), names(&gone))
    } else {
        format!(
            "{} of them are {s}s: {}",
            number_word(gone.len()),
            names(&gone)
        )
    };
    let rest = if left == 0 {
        format!("Taking away every {s} empties the picture completely.")
    } else {
        format!(
            "Taking {} away leaves {}.",
            if gone.len() == 1 { "it" } else { "them" },
            names(&kept)
        )
    };
    let a = format!(
        "{first} The picture has {} shapes in total, and {which}. {rest}",
        number_word(n)
    );
    Some((q, a))
}

/// Colours with how many objects have each, in order of first appearance.
fn colour_counts(k: &Knowledge) -> Vec<(String, usize)> {
    let mut out: Vec<(String, usize)> = Vec::new();
    for o in &k.objects {
        match out.iter_mut().find(|(c, _)| *c == o.colour) {
            Some((_, n)) => *n += 1,
            None => out.push((o.colour.clone(), 1)),
        }
    }
    out
}

fn colours(k: &Knowledge, rng: &mut StdRng) -> Option<Pair> {
    if k.count() < 2 {
        return None;
    }
    let counts = colour_counts(k);
    let max = counts.iter().map(|(_, n)| *n).max()?;
    let top: Vec<&(String, usize)> = counts.iter().filter(|(_, n)| *n == max).collect();
    if let ([(c, m)], true) = (top.as_slice(), max >= 2) {
        let these: Vec<&SceneObject> = k.objects.iter().filter(|o| o.colour == *c).collect();
        let others: Vec<String> = counts
            .iter()
            .filter(|(o, _)| o != c)
            .map(|(o, _)| o.clone())
            .collect();
        let tail = if others.is_empty() {
            "and no other colour is used at all".to_string()
        } else if counts.iter().all(|(o, n)| o == c || *n == 1) {
            format!(
                "while {} {}",
                join_list(&others),
                if others.len() == 1 {
                    "appears only once"
                } else {
                    "appear only once each"
                }
            )
        } else {
            "and every other colour is used on fewer shapes".to_string()
        };
        let q = match rng.random_range(0..2) {
            0 => "Which colour appears most often among the shapes?",
            _ => "Is any colour used for more than one shape, and which is the most common?",
        };
        let a = format!(
            "{} is the most common colour. There are {} {c} shapes, {}, {tail}.",
            capitalise(c),
            number_word(*m),
            names(&these)
        );
        return Some((q.to_string(), a));
    }
    let q = "Do any two shapes in the picture share the same colour?".to_string();
    if max == 1 {
        let list: Vec<String> = counts.iter().map(|(c, _)| c.clone()).collect();
        let a = format!(
            "No. Each of the {} shapes has a colour of its own ({}), so no colour is repeated.",
            number_word(k.count()),
            join_list(&list)
        );
        return Some((q, a));
    }
    let groups: Vec<String> = counts
        .iter()
        .filter(|(_, n)| *n >= 2)
        .map(|(c, n)| {
            let these: Vec<&SceneObject> = k.objects.iter().filter(|o| o.colour == *c).collect();
            let both = if *n == 2 { "both" } else { "all" };
            format!("{} are {both} {c}", names(&these))
        })
        .collect();
    let a = format!(
        "Yes. {}, so some colours are used more than once.",
        capitalise(&join_list(&groups))
    );
    Some((q, a))
}

fn between(k: &Knowledge, rng: &mut StdRng) -> Option<Pair> {
    let n = k.count();
    if !k.ordered || n < 3 {
        return None;
    }
    let i = rng.random_range(0..n - 2);
    let j = rng.random_range(i + 2..n);
    let (a, b) = (&k.objects[i], &k.objects[j]);
    let mid: Vec<&SceneObject> = k.objects[i + 1..j].iter().collect();
    let (first_two, last_two) = if rng.random_bool(0.5) { (a, b) } else { (b, a) };
    let q = match rng.random_range(0..2) {
        0 => format!(
            "Going across the picture, which shapes lie between the {} and the {}?",
            first_two.name(),
            last_two.name()
        ),
        _ => format!(
            "What is between the {} and the {}?",
            first_two.name(),
            last_two.name()
        ),
    };
    let verb = if mid.len() == 1 { "is" } else { "are" };
    let seq: Vec<String> = std::iter::once(the(a))
        .chain(mid.iter().map(|o| the(o)))
        .chain(std::iter::once(the(b)))
        .collect();
    let so = if mid.len() == 1 {
        format!(
            "So {} lies to the right of {} and to the left of {}.",
            the(mid[0]),
            the(a),
            the(b)
        )
    } else {
        format!(
            "So {} and the others in the middle all lie to the right of {} and to the left of {}.",
            the(mid[0]),
            the(a),
            the(b)
        )
    };
    let ans = format!(
        "{} {verb} between them. Reading the picture from left to right, the shapes come in \
         this order: {}. {so}",
        capitalise(&names(&mid)),
        join_list(&seq)
    );
    Some((q, ans))
}

fn y(o: &SceneObject) -> f64 {
    o.centre().map_or(0.0, |c| c.1)
}

fn highest(k: &Knowledge, rng: &mut StdRng) -> Option<Pair> {
    if k.count() < 2 || !k.all_boxed() {
        return None;
    }
    let mut by_y: Vec<&SceneObject> = k.objects.iter().collect();
    by_y.sort_by(|a, b| y(a).total_cmp(&y(b)));
    let top = rng.random_bool(0.5);
    if !top {
        by_y.reverse();
    }
    let (winner, runner) = (by_y[0], by_y[1]);
    if (y(winner) - y(runner)).abs() < 0.1 {
        return None;
    }
    let (word, q) = if top {
        ("highest", "Which shape is placed highest in the picture?")
    } else {
        ("lowest", "Which shape sits lowest in the picture?")
    };
    let (higher, lower) = if top {
        ("higher", "lower")
    } else {
        ("lower", "higher")
    };
    let a = if let [_, other] = by_y.as_slice() {
        format!(
            "The {} is the {higher} of the two shapes: it sits {}, while {} is {}.",
            winner.name(),
            winner.place().unwrap_or("apart from the other"),
            the(other),
            other.place().unwrap_or("elsewhere")
        )
    } else {
        let others: Vec<String> = by_y[1..]
            .iter()
            .filter_map(|o| o.place().map(|p| format!("{} is {p}", the(o))))
            .collect();
        format!(
            "The {} is the {word} shape: it sits {}. By comparison, {}. So every other shape \
             is {lower} than the {}, the nearest contender being {}.",
            winner.name(),
            winner.place().unwrap_or("apart from the others"),
            join_list(&others),
            winner.name(),
            the(runner)
        )
    };
    Some((q.to_string(), a))
}

fn biggest(k: &Knowledge, _rng: &mut StdRng) -> Option<Pair> {
    if k.count() < 2 || !k.all_boxed() {
        return None;
    }
    let area = |o: &SceneObject| o.area().unwrap_or(0.0);
    let mut by_area: Vec<&SceneObject> = k.objects.iter().collect();
    by_area.sort_by(|a, b| area(b).total_cmp(&area(a)));
    let (winner, runner) = (by_area[0], by_area[1]);
    if area(winner) < 1.2 * area(runner) {
        return None;
    }
    let a = format!(
        "The {} takes up the most space. Comparing the shapes side by side, it is visibly \
         bigger than the next largest, {}, and the remaining shapes are smaller again.",
        winner.name(),
        the(runner)
    );
    Some((
        "Which shape takes up the most space in the picture?".into(),
        a,
    ))
}

fn closest(k: &Knowledge, _rng: &mut StdRng) -> Option<Pair> {
    if k.count() < 3 || !k.all_boxed() {
        return None;
    }
    let mut pairs: Vec<(f64, &SceneObject, &SceneObject)> = Vec::new();
    for (i, a) in k.objects.iter().enumerate() {
        for b in &k.objects[i + 1..] {
            let ((ax, ay), (bx, by)) = (a.centre()?, b.centre()?);
            pairs.push((((ax - bx).powi(2) + (ay - by).powi(2)).sqrt(), a, b));
        }
    }
    pairs.sort_by(|p, q| p.0.total_cmp(&q.0));
    let ((d1, a, b), (d2, _, _)) = (pairs[0], pairs[1]);
    if d2 < 1.25 * d1 {
        return None;
    }
    let ans = format!(
        "The {} and the {} are the closest pair. The {} sits {} and the {} sits {}, so the gap \
         between them is smaller than the gap within any other pair.",
        a.name(),
        b.name(),
        a.name(),
        a.place().unwrap_or("on one side"),
        b.name(),
        b.place().unwrap_or("just beside it")
    );
    Some(("Which two shapes are closest to each other?".into(), ans))
}

fn missing(k: &Knowledge, rng: &mut StdRng) -> Option<Pair> {
    if k.objects.is_empty() {
        return None;
    }
    let (have, lack): (Vec<&str>, Vec<&str>) = SHAPES.iter().partition(|s| k.shape_count(s) > 0);
    let ask_all = rng.random_bool(0.5);
    let q = if ask_all {
        "Does the picture have at least one circle, square, triangle and star?"
    } else {
        "Which kinds of shape, among circles, squares, triangles and stars, are missing from \
         the picture?"
    };
    let list: Vec<String> = k.objects.iter().map(|o| with_article(&o.name())).collect();
    let plural = |v: &[&str]| join_list(&v.iter().map(|s| format!("{s}s")).collect::<Vec<_>>());
    let a = if lack.is_empty() {
        format!(
            "{}every kind is there. The picture holds {}, which covers circles, squares, \
             triangles and stars.",
            if ask_all {
                "Yes, "
            } else {
                "Nothing is missing: "
            },
            join_list(&list)
        )
    } else {
        format!(
            "{}The picture has no {}. {} {}, so it contains {} only.",
            if ask_all { "No. " } else { "" },
            plural(&lack).replace(" and ", " or "),
            if list.len() == 1 {
                "Its only shape is"
            } else {
                "Its shapes are"
            },
            join_list(&list),
            plural(&have)
        )
    };
    Some((q.to_string(), a))
}

fn lone(k: &Knowledge, _rng: &mut StdRng) -> Option<Pair> {
    let [o] = k.objects.as_slice() else {
        return None;
    };
    let c = &o.colour;
    let q = format!(
        "If a second {c} shape were placed next to the {}, how many colours would the picture have?",
        o.name()
    );
    let a = format!(
        "It would still have a single colour. The picture holds just one shape, {}. Another {c} \
         shape would make two shapes, but {c} would remain the only colour in the picture.",
        with_article(&o.name())
    );
    Some((q, a))
}

/// One question/answer pair in the `Question:`/`Answer:` form.
pub fn reply(k: &Knowledge, rng: &mut StdRng) -> String {
    type Maker = fn(&Knowledge, &mut StdRng) -> Option<Pair>;
    let makers: [Maker; 8] = [
        remove_kind,
        colours,
        between,
        highest,
        biggest,
        closest,
        missing,
        lone,
    ];
    let mut found: Vec<Pair> = makers.iter().filter_map(|m| m(k, rng)).collect();
    let pair = if found.is_empty() {
        (
            "What kind of picture is this, and what is it likely used for?".to_string(),
            "It is a very simple picture of flat shapes on a plain background. Pictures like \
             this are often used to practise naming colours, shapes and positions, because \
             everything in them is clear and easy to tell apart."
                .to_string(),
        )
    } else {
        let i = rng.random_range(0..found.len());
        found.swap_remove(i)
    };
    format!("Question: {}\nAnswer: {}", pair.0, pair.1)
}
