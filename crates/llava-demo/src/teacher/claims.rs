//! Checkable statements in free text, and checking them against a recovered scene.
//!
//! The judge scores an answer by the share of its checkable statements that hold, and the
//! knowledge reader uses the same checks to cross-examine the captions. Only a few sentence
//! shapes are read, the ones that can be checked without guessing:
//!
//! - **objects**: every `colour shape` mention (`a red circle`) claims the object is there, or
//!   that it is not when `no`/`not`/`isn't`/`without` comes up to three words before it;
//!   `the circle is red` and `the red object is a circle` claim a red circle too;
//! - **counts**: `three shapes`/`objects` (all objects), `two circles` (one shape), `two red
//!   shapes` / `two shapes are red` (one colour);
//! - **left/right**: `X is (to the) left/right of Y`, where X is the sentence's first object
//!   and Y the first object after the phrase; `X is the leftmost shape`, `furthest to the
//!   right`, `on the far left`, with exactly one object in the sentence.
//!
//! Sentences that speak hypothetically (`would`, `if`, `could`, …) are skipped: "two shapes
//! would remain" says nothing about the picture. Relations in sentences with a negation are
//! skipped too. Objects may be named by shape alone (`the circle`) in relations; such a claim
//! is checkable only when one object has that shape.

use super::knowledge::{Knowledge, is_colour, mentions, shape_of};
use crate::words::{number_word, parse_number, sentences, words};

/// An object named in a claim: colour and shape, or the shape alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjRef {
    pub colour: Option<String>,
    pub shape: String,
}

impl ObjRef {
    fn describe(&self) -> String {
        match &self.colour {
            Some(c) => format!("the {c} {}", self.shape),
            None => format!("the {}", self.shape),
        }
    }

    /// The object's index, when the reference picks exactly one.
    fn resolve(&self, k: &Knowledge) -> Option<usize> {
        match &self.colour {
            Some(c) => k.find(c, &self.shape),
            None => {
                let mut it = k
                    .objects
                    .iter()
                    .enumerate()
                    .filter(|(_, o)| o.shape == self.shape);
                let (i, _) = it.next()?;
                it.next().is_none().then_some(i)
            }
        }
    }
}

/// One checkable statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// `a red circle` (present) or `no red circle` (absent).
    Exists {
        colour: String,
        shape: String,
        present: bool,
    },
    /// `n` objects, of a colour and/or shape when given.
    Count {
        n: usize,
        colour: Option<String>,
        shape: Option<String>,
    },
    LeftOf {
        left: ObjRef,
        right: ObjRef,
    },
    /// The leftmost (`left`) or rightmost object.
    Extreme {
        obj: ObjRef,
        left: bool,
    },
}

/// Words that make a sentence hypothetical.
const HYPOTHETICAL: [&str; 8] = [
    "would", "if", "could", "were", "might", "imagine", "suppose", "should",
];
/// Words that negate a mention a few words later.
const NEGATIONS: [&str; 9] = [
    "no", "not", "isn't", "aren't", "without", "nor", "never", "neither", "none",
];
/// Longer sentences are not read.
const MAX_SENTENCE_WORDS: usize = 200;
/// Words that make a following number count a subset.
const SUBSET_WORDS: [&str; 10] = [
    "other", "any", "every", "each", "first", "last", "next", "those", "these", "of",
];
/// Nouns that stand for "objects in the picture" in counts.
const OBJECT_NOUNS: [&str; 6] = ["shape", "shapes", "object", "objects", "thing", "things"];

impl Claim {
    /// Whether the claim holds in `k`; `None` when `k` cannot tell (no objects recovered, an
    /// ambiguous reference, an unknown order).
    pub fn check(&self, k: &Knowledge) -> Option<bool> {
        if k.objects.is_empty() {
            return None;
        }
        match self {
            Claim::Exists {
                colour,
                shape,
                present,
            } => Some(k.find(colour, shape).is_some() == *present),
            Claim::Count { n, colour, shape } => {
                let have = k
                    .objects
                    .iter()
                    .filter(|o| colour.as_ref().is_none_or(|c| *c == o.colour))
                    .filter(|o| shape.as_ref().is_none_or(|s| *s == o.shape))
                    .count();
                Some(have == *n)
            }
            Claim::LeftOf { left, right } => {
                let (a, b) = (left.resolve(k)?, right.resolve(k)?);
                (k.ordered && a != b).then_some(a < b)
            }
            Claim::Extreme { obj, left } => {
                let i = obj.resolve(k)?;
                if !k.ordered {
                    return None;
                }
                Some(if *left { i == 0 } else { i + 1 == k.count() })
            }
        }
    }

    /// The claim in words, for the judge's explanation.
    pub fn describe(&self) -> String {
        match self {
            Claim::Exists {
                colour,
                shape,
                present: true,
            } => format!("there is a {colour} {shape}"),
            Claim::Exists { colour, shape, .. } => format!("there is no {colour} {shape}"),
            Claim::Count { n, colour, shape } => {
                let noun = shape.clone().unwrap_or_else(|| "shape".into());
                let noun = if *n == 1 { noun } else { format!("{noun}s") };
                match colour {
                    Some(c) => format!("there are {} {c} {noun}", number_word(*n)),
                    None => format!("there are {} {noun}", number_word(*n)),
                }
            }
            Claim::LeftOf { left, right } => {
                format!("{} is left of {}", left.describe(), right.describe())
            }
            Claim::Extreme { obj, left } => format!(
                "{} is the {} shape",
                obj.describe(),
                if *left { "leftmost" } else { "rightmost" }
            ),
        }
    }
}

/// The checkable claims of a text, in order.
pub fn extract(text: &str) -> Vec<Claim> {
    let mut out = Vec::new();
    for s in sentences(text) {
        let ws = words(s);
        // No real sentence is this long; skipping keeps the relation search cheap on junk.
        if ws.len() > MAX_SENTENCE_WORDS || ws.iter().any(|w| HYPOTHETICAL.contains(&w.as_str())) {
            continue;
        }
        objects(&ws, &mut out);
        counts(&ws, &mut out);
        relations(&ws, &mut out);
    }
    out
}

fn negated(ws: &[String], at: usize) -> bool {
    ws[at.saturating_sub(3)..at]
        .iter()
        .any(|w| NEGATIONS.contains(&w.as_str()))
}

fn word(ws: &[String], i: usize) -> &str {
    ws.get(i).map_or("", String::as_str)
}

fn objects(ws: &[String], out: &mut Vec<Claim>) {
    for m in mentions(ws).into_iter().filter(|m| !m.plural) {
        let start = if m.size.is_some() { m.at - 1 } else { m.at };
        out.push(Claim::Exists {
            colour: m.colour,
            shape: m.shape,
            present: !negated(ws, start),
        });
    }
    for i in 0..ws.len() {
        // the circle is [painted] red / the circle is not red
        if let Some((shape, false)) = shape_of(&ws[i])
            && !(i > 0 && is_colour(&ws[i - 1]))
            && matches!(word(ws, i + 1), "is" | "looks")
        {
            let mut j = i + 2;
            let not = word(ws, j) == "not";
            if not {
                j += 1;
            }
            if matches!(word(ws, j), "painted" | "coloured" | "colored" | "all") {
                j += 1;
            }
            if is_colour(word(ws, j)) {
                out.push(Claim::Exists {
                    colour: ws[j].clone(),
                    shape: shape.to_string(),
                    present: !not && !negated(ws, i),
                });
            }
        }
        // the red object is a circle
        if is_colour(&ws[i])
            && matches!(word(ws, i + 1), "object" | "shape" | "thing" | "one")
            && word(ws, i + 2) == "is"
            && matches!(word(ws, i + 3), "a" | "an")
            && let Some((shape, false)) = shape_of(word(ws, i + 4))
        {
            out.push(Claim::Exists {
                colour: ws[i].clone(),
                shape: shape.to_string(),
                present: !negated(ws, i),
            });
        }
    }
}

fn counts(ws: &[String], out: &mut Vec<Claim>) {
    for i in 0..ws.len() {
        let Some(n) = parse_number(&ws[i]) else {
            continue;
        };
        // "any other two shapes", "the first two": a subset, not the whole picture
        let before = if i > 0 { ws[i - 1].as_str() } else { "" };
        if negated(ws, i) || SUBSET_WORDS.contains(&before) {
            continue;
        }
        let (next, after) = (word(ws, i + 1), word(ws, i + 2));
        let claim = if OBJECT_NOUNS.contains(&next) {
            // "two shapes are red" counts the red ones
            let colour = (matches!(after, "is" | "are") && is_colour(word(ws, i + 3)))
                .then(|| ws[i + 3].clone());
            Some((colour, None))
        } else if is_colour(next) && OBJECT_NOUNS.contains(&after) {
            Some((Some(next.to_string()), None))
        } else if is_colour(next)
            && let Some((shape, plural)) = shape_of(after)
            && (plural || n == 1)
        {
            Some((Some(next.to_string()), Some(shape.to_string())))
        } else if let Some((shape, plural)) = shape_of(next)
            && (plural || n == 1)
        {
            Some((None, Some(shape.to_string())))
        } else {
            None
        };
        if let Some((colour, shape)) = claim {
            out.push(Claim::Count { n, colour, shape });
        }
    }
}

/// Objects named in a sentence, with their word index: `colour shape` mentions and bare
/// `the shape`.
fn refs(ws: &[String]) -> Vec<(usize, ObjRef)> {
    let mut out: Vec<(usize, ObjRef)> = mentions(ws)
        .into_iter()
        .filter(|m| !m.plural)
        .map(|m| {
            (
                m.at,
                ObjRef {
                    colour: Some(m.colour),
                    shape: m.shape,
                },
            )
        })
        .collect();
    for i in 1..ws.len() {
        if ws[i - 1] == "the"
            && let Some((shape, false)) = shape_of(&ws[i])
        {
            out.push((
                i,
                ObjRef {
                    colour: None,
                    shape: shape.to_string(),
                },
            ));
        }
    }
    out.sort_by_key(|(i, _)| *i);
    out
}

fn relations(ws: &[String], out: &mut Vec<Claim>) {
    if ws.iter().any(|w| NEGATIONS.contains(&w.as_str())) {
        return;
    }
    let refs = refs(ws);
    let Some((_, subject)) = refs.first() else {
        return;
    };
    for j in 0..ws.len() {
        let side = ws[j].as_str();
        if !matches!(side, "left" | "right") || word(ws, j + 1) != "of" {
            continue;
        }
        let Some((_, other)) = refs.iter().find(|(i, _)| *i > j + 1) else {
            continue;
        };
        if other == subject || refs.iter().all(|(i, _)| *i > j) {
            continue;
        }
        let (left, right) = if side == "left" {
            (subject.clone(), other.clone())
        } else {
            (other.clone(), subject.clone())
        };
        out.push(Claim::LeftOf { left, right });
    }
    if refs.len() == 1 {
        let text = ws.join(" ");
        let says = |side: &str| {
            text.contains(&format!("{side}most"))
                || text.contains(&format!("furthest to the {side}"))
                || text.contains(&format!("farthest to the {side}"))
                || text.contains(&format!("far {side}"))
        };
        for (side, left) in [("left", true), ("right", false)] {
            if says(side) {
                out.push(Claim::Extreme {
                    obj: subject.clone(),
                    left,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exists(c: &str, s: &str, present: bool) -> Claim {
        Claim::Exists {
            colour: c.into(),
            shape: s.into(),
            present,
        }
    }

    fn r(c: Option<&str>, s: &str) -> ObjRef {
        ObjRef {
            colour: c.map(String::from),
            shape: s.into(),
        }
    }

    #[test]
    fn objects_and_negations() {
        assert_eq!(
            extract("No, there is no green star, though there is a large green square."),
            vec![
                exists("green", "star", false),
                exists("green", "square", true)
            ]
        );
        assert_eq!(
            extract(
                "There isn't a red circle. The circle is painted blue. The red object is a star."
            ),
            vec![
                exists("red", "circle", false),
                exists("blue", "circle", true),
                exists("red", "star", true)
            ]
        );
        assert_eq!(
            extract("The square is not red."),
            vec![exists("red", "square", false)]
        );
    }

    #[test]
    fn counts_of_all_shape_and_colour() {
        let count = |n, c: Option<&str>, s: Option<&str>| Claim::Count {
            n,
            colour: c.map(String::from),
            shape: s.map(String::from),
        };
        assert_eq!(
            extract("There are three shapes."),
            vec![count(3, None, None)]
        );
        assert_eq!(
            extract("Two circles and a square on a white background."),
            vec![count(2, None, Some("circle"))]
        );
        assert_eq!(extract("Just one object here."), vec![count(1, None, None)]);
        assert_eq!(
            extract("Two shapes are red."),
            vec![count(2, Some("red"), None)]
        );
        assert_eq!(
            extract("There are 2 red shapes."),
            vec![count(2, Some("red"), None)]
        );
        assert!(
            extract("Two shapes would be left.").is_empty(),
            "hypothetical"
        );
        assert!(extract("One of them is round.").is_empty());
        assert!(extract("Closer than any other two shapes.").is_empty());
        let junk = "the red circle is left of the blue star ".repeat(2000);
        assert!(extract(&junk).is_empty(), "overlong sentences are skipped");
    }

    #[test]
    fn relations_and_extremes() {
        assert_eq!(
            extract("A blue square sits to the right of a red circle."),
            vec![
                exists("blue", "square", true),
                exists("red", "circle", true),
                Claim::LeftOf {
                    left: r(Some("red"), "circle"),
                    right: r(Some("blue"), "square")
                }
            ]
        );
        let c = extract("The circle is to the left of the star and to the right of the square.");
        assert_eq!(
            c,
            vec![
                Claim::LeftOf {
                    left: r(None, "circle"),
                    right: r(None, "star")
                },
                Claim::LeftOf {
                    left: r(None, "square"),
                    right: r(None, "circle")
                }
            ]
        );
        assert_eq!(
            extract("On the far left is the star."),
            vec![Claim::Extreme {
                obj: r(None, "star"),
                left: true
            }]
        );
        assert!(extract("The red star is on the left side of the image.").len() == 1);
        assert!(
            !extract("The circle is not left of the star.")
                .iter()
                .any(|c| matches!(c, Claim::LeftOf { .. }))
        );
    }

    #[test]
    fn checks_against_knowledge() {
        let k = Knowledge::from_context(
            "From left to right: a red circle, a blue square and a red star.",
        );
        let ok =
            |t: &str| -> Vec<Option<bool>> { extract(t).iter().map(|c| c.check(&k)).collect() };
        assert_eq!(ok("There are three shapes."), vec![Some(true)]);
        assert_eq!(ok("There are two red shapes."), vec![Some(true)]);
        assert_eq!(ok("There are four shapes."), vec![Some(false)]);
        assert_eq!(ok("There is no green star."), vec![Some(true)]);
        assert_eq!(ok("There is a green star."), vec![Some(false)]);
        assert_eq!(
            ok("The square is to the left of the red circle."),
            vec![Some(true), Some(false)]
        );
        assert_eq!(
            ok("The red star is the rightmost shape."),
            vec![Some(true), Some(true)]
        );
        assert_eq!(
            ok("The circle is to the left of the star."),
            vec![Some(true)]
        );
        let empty = Knowledge::default();
        assert_eq!(extract("There is a red circle.")[0].check(&empty), None);
    }
}
