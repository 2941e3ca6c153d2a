//! What the teacher knows about a picture, recovered from the request text alone.
//!
//! Like GPT in the paper, the offline teacher never sees pixels or our ground-truth files: it
//! reads the image's captions (one per line) and, for detail and complex requests, the box
//! lines `category: [x1, y1, x2, y2]`. From these it rebuilds the scene:
//!
//! - **objects, left to right**: from the caption that lists them "from left to right"; with
//!   no such caption, the distinct `colour shape` mentions of all captions (one mention means
//!   one object, which is trivially ordered; several are ordered by their boxes when every
//!   shape is different, and otherwise left unordered, so no left/right question is asked);
//! - **sizes**: from any caption that says `small` or `large` before the object, else from
//!   the width of its box;
//! - **background**: from `on a <name> background`;
//! - **boxes**: attached to objects shape by shape, the boxes of a category sorted by the
//!   horizontal position of their centres and matched to that shape's objects in left-to-right
//!   order.
//!
//! [`Knowledge::conflicts`] cross-checks the rest of the captions (counts, colours, relations)
//! against the recovered scene; a faithful reading has none.

use crate::world::scene::{COLOURS, SHAPES, Size};

use super::claims;
use crate::words::{sentences, words};

/// A box in 0..1 image fractions: left, top, right, bottom.
pub type Bbox = [f64; 4];

/// Boxes narrower than this (as a fraction of the width) are small shapes. Small shapes
/// span at most about 0.19 of the width and large ones at least 0.24.
const LARGE_MIN_WIDTH: f64 = 0.22;

/// One object of the recovered scene.
#[derive(Debug, Clone, PartialEq)]
pub struct SceneObject {
    pub colour: String,
    pub shape: String,
    /// Said in a caption, or read from the box width; `None` when neither tells.
    pub size: Option<Size>,
    pub bbox: Option<Bbox>,
}

impl SceneObject {
    /// `red circle`: unique in a scene, since no two objects share colour and shape.
    pub fn name(&self) -> String {
        format!("{} {}", self.colour, self.shape)
    }

    /// `large red circle` when the size is known.
    pub fn full_name(&self) -> String {
        match self.size {
            Some(s) => format!("{} {}", s.name(), self.name()),
            None => self.name(),
        }
    }

    /// The box centre.
    pub fn centre(&self) -> Option<(f64, f64)> {
        self.bbox
            .map(|[x1, y1, x2, y2]| ((x1 + x2) / 2.0, (y1 + y2) / 2.0))
    }

    pub fn area(&self) -> Option<f64> {
        self.bbox.map(|[x1, y1, x2, y2]| (x2 - x1) * (y2 - y1))
    }

    pub fn is(&self, colour: &str, shape: &str) -> bool {
        self.colour == colour && self.shape == shape
    }

    /// Where the object sits, in plain words, from its box centre on a 3×3 grid.
    pub fn place(&self) -> Option<&'static str> {
        let (x, y) = self.centre()?;
        let col = usize::from(x >= 1.0 / 3.0) + usize::from(x > 2.0 / 3.0);
        let row = usize::from(y >= 1.0 / 3.0) + usize::from(y > 2.0 / 3.0);
        Some(match (row, col) {
            (0, 0) => "in the upper left part of the picture",
            (0, 1) => "near the top, in the middle",
            (0, _) => "in the upper right part of the picture",
            (1, 0) => "on the left, halfway down",
            (1, 1) => "right in the centre",
            (1, _) => "on the right, halfway down",
            (_, 0) => "in the lower left part of the picture",
            (_, 1) => "near the bottom, in the middle",
            _ => "in the lower right part of the picture",
        })
    }
}

/// An object named in text: `[small|large] <colour> <shape>`, possibly plural.
#[derive(Debug, Clone, PartialEq)]
pub struct Mention {
    pub colour: String,
    pub shape: String,
    pub size: Option<Size>,
    pub plural: bool,
    /// Word index of the colour (the size, when said, is just before).
    pub at: usize,
}

pub fn is_colour(w: &str) -> bool {
    COLOURS.iter().any(|(c, _)| *c == w)
}

/// The shape a word names, and whether it is plural.
pub fn shape_of(w: &str) -> Option<(&'static str, bool)> {
    SHAPES.iter().find_map(|s| {
        if *s == w {
            Some((*s, false))
        } else if w.strip_suffix('s') == Some(*s) {
            Some((*s, true))
        } else {
            None
        }
    })
}

fn size_of(w: &str) -> Option<Size> {
    match w {
        "small" | "little" | "tiny" => Some(Size::Small),
        "large" | "big" => Some(Size::Large),
        _ => None,
    }
}

/// Every `colour shape` pair in a sentence's words, left to right.
pub fn mentions(words: &[String]) -> Vec<Mention> {
    let mut out = Vec::new();
    for i in 0..words.len().saturating_sub(1) {
        if !is_colour(&words[i]) {
            continue;
        }
        let Some((shape, plural)) = shape_of(&words[i + 1]) else {
            continue;
        };
        let size = i.checked_sub(1).and_then(|j| size_of(&words[j]));
        out.push(Mention {
            colour: words[i].clone(),
            shape: shape.to_string(),
            size,
            plural,
            at: i,
        });
    }
    out
}

/// Reads a `category: [x1, y1, x2, y2]` line; `None` for anything else (captions included,
/// even those with a colon).
pub fn parse_box_line(line: &str) -> Option<(String, Bbox)> {
    let (category, rest) = line.trim().rsplit_once(": [")?;
    let inner = rest.trim_end().strip_suffix(']')?;
    let nums: Vec<f64> = inner
        .split(',')
        .map(|n| n.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .ok()?;
    let [x1, y1, x2, y2] = <[f64; 4]>::try_from(nums).ok()?;
    let ok = [x1, y1, x2, y2].iter().all(|v| v.is_finite()) && x2 > x1 && y2 > y1;
    let category = category.trim().to_lowercase();
    (ok && !category.is_empty()).then_some((category, [x1, y1, x2, y2]))
}

/// The scene as recovered from one request.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Knowledge {
    /// Left to right when `ordered`.
    pub objects: Vec<SceneObject>,
    pub ordered: bool,
    pub background: Option<String>,
    /// Whether the request had box lines.
    pub has_boxes: bool,
    /// The captions as read, for cross-checking.
    pub captions: Vec<String>,
    /// Box lines that matched no object.
    pub unmatched_boxes: usize,
}

impl Knowledge {
    /// Reads captions and box lines (one per line, in any order).
    pub fn from_context(text: &str) -> Knowledge {
        let mut captions = Vec::new();
        let mut boxes = Vec::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            match parse_box_line(line) {
                Some(b) => boxes.push(b),
                None => captions.push(line.to_string()),
            }
        }
        let (mut objects, mut ordered) = objects_from_captions(&captions);
        let unmatched_boxes = attach_boxes(&mut objects, &boxes);
        if !ordered && shapes_distinct(&objects) && objects.iter().all(|o| o.bbox.is_some()) {
            objects.sort_by(|a, b| centre_x(a).total_cmp(&centre_x(b)));
            ordered = true;
        }
        for o in &mut objects {
            if o.size.is_none()
                && let Some([x1, _, x2, _]) = o.bbox
            {
                o.size = Some(if x2 - x1 >= LARGE_MIN_WIDTH {
                    Size::Large
                } else {
                    Size::Small
                });
            }
        }
        Knowledge {
            objects,
            ordered,
            background: background(&captions),
            has_boxes: !boxes.is_empty(),
            captions,
            unmatched_boxes,
        }
    }

    pub fn count(&self) -> usize {
        self.objects.len()
    }

    /// The index of the object with this colour and shape.
    pub fn find(&self, colour: &str, shape: &str) -> Option<usize> {
        self.objects.iter().position(|o| o.is(colour, shape))
    }

    /// How many objects have this shape.
    pub fn shape_count(&self, shape: &str) -> usize {
        self.objects.iter().filter(|o| o.shape == shape).count()
    }

    pub fn colour_count(&self, colour: &str) -> usize {
        self.objects.iter().filter(|o| o.colour == colour).count()
    }

    /// Whether every object has a box.
    pub fn all_boxed(&self) -> bool {
        !self.objects.is_empty() && self.objects.iter().all(|o| o.bbox.is_some())
    }

    /// What the captions and boxes say that disagrees with the recovered scene: caption
    /// statements that do not hold (counts, relations, objects), a colour list that differs,
    /// boxes that match no object. Empty for a consistent reading.
    pub fn conflicts(&self) -> Vec<String> {
        let mut out = Vec::new();
        for c in &self.captions {
            for claim in claims::extract(c) {
                if claim.check(self) == Some(false) {
                    out.push(format!("`{c}`: not true that {}", claim.describe()));
                }
            }
            if let Some(listed) = colour_list(c) {
                let mut have: Vec<&str> = self.objects.iter().map(|o| o.colour.as_str()).collect();
                have.sort_unstable();
                have.dedup();
                let mut listed: Vec<&str> = listed.iter().map(String::as_str).collect();
                listed.sort_unstable();
                listed.dedup();
                if listed != have {
                    out.push(format!("`{c}`: colours differ from the objects'"));
                }
            }
        }
        if self.unmatched_boxes > 0 {
            out.push(format!("{} box(es) match no object", self.unmatched_boxes));
        }
        if self.has_boxes && !self.all_boxed() {
            out.push("some objects have no box".into());
        }
        out
    }
}

fn centre_x(o: &SceneObject) -> f64 {
    o.centre().map_or(0.0, |c| c.0)
}

fn shapes_distinct(objects: &[SceneObject]) -> bool {
    objects
        .iter()
        .enumerate()
        .all(|(i, a)| objects[i + 1..].iter().all(|b| b.shape != a.shape))
}

/// The objects and whether their order is known.
fn objects_from_captions(captions: &[String]) -> (Vec<SceneObject>, bool) {
    let all: Vec<Mention> = captions
        .iter()
        .flat_map(|c| sentences(c).into_iter().flat_map(|s| mentions(&words(s))))
        .filter(|m| !m.plural)
        .collect();
    let size_of = |colour: &str, shape: &str| {
        all.iter()
            .find(|m| m.colour == colour && m.shape == shape && m.size.is_some())
            .and_then(|m| m.size)
    };
    let object = |m: &Mention| SceneObject {
        colour: m.colour.clone(),
        shape: m.shape.clone(),
        size: size_of(&m.colour, &m.shape),
        bbox: None,
    };
    let order_caption = captions.iter().find_map(|c| {
        let ws = words(c);
        let says_order = ws.windows(3).any(|w| w == ["left", "to", "right"]);
        let ms = mentions(&ws);
        (says_order && !ms.is_empty()).then_some(ms)
    });
    if let Some(ms) = order_caption {
        let mut objects: Vec<SceneObject> = Vec::new();
        for m in ms.iter().filter(|m| !m.plural) {
            if !objects.iter().any(|o| o.is(&m.colour, &m.shape)) {
                objects.push(object(m));
            }
        }
        return (objects, true);
    }
    let mut objects: Vec<SceneObject> = Vec::new();
    for m in &all {
        if !objects.iter().any(|o| o.is(&m.colour, &m.shape)) {
            objects.push(object(m));
        }
    }
    let ordered = objects.len() == 1;
    (objects, ordered)
}

/// Attaches boxes to objects; returns how many boxes found no object.
fn attach_boxes(objects: &mut [SceneObject], boxes: &[(String, Bbox)]) -> usize {
    let mut unmatched = 0;
    let mut categories: Vec<&str> = boxes.iter().map(|(c, _)| c.as_str()).collect();
    categories.sort_unstable();
    categories.dedup();
    for cat in categories {
        let mut these: Vec<Bbox> = boxes
            .iter()
            .filter(|(c, _)| c == cat)
            .map(|(_, b)| *b)
            .collect();
        these.sort_by(|a, b| (a[0] + a[2]).total_cmp(&(b[0] + b[2])));
        let targets: Vec<usize> = objects
            .iter()
            .enumerate()
            .filter(|(_, o)| o.shape == cat)
            .map(|(i, _)| i)
            .collect();
        if targets.len() != these.len() {
            unmatched += these.len();
            continue;
        }
        for (i, b) in targets.into_iter().zip(these) {
            objects[i].bbox = Some(b);
        }
    }
    unmatched
}

/// `light grey` from `... on a light grey background`.
fn background(captions: &[String]) -> Option<String> {
    captions.iter().find_map(|c| {
        let ws = words(c);
        let end = ws.iter().position(|w| w == "background")?;
        let start = ws[..end].iter().rposition(|w| w == "a" || w == "an")? + 1;
        let name = ws[start..end].join(" ");
        // Plain colour words only: the name is repeated in replies, which must not echo
        // anything odd from the request.
        let plain = ws[start..end]
            .iter()
            .all(|w| w.chars().all(|c| c.is_ascii_alphabetic()) && !w.contains("caption"));
        (!name.is_empty() && end - start <= 3 && plain).then_some(name)
    })
}

/// The colours a caption lists when it names colours but no shapes (`Colours in the picture:
/// red and blue.`, `Everything in the picture is red`).
fn colour_list(caption: &str) -> Option<Vec<String>> {
    let ws = words(caption);
    if ws.iter().any(|w| shape_of(w).is_some()) {
        return None;
    }
    let colours: Vec<String> = ws.into_iter().filter(|w| is_colour(w)).collect();
    (!colours.is_empty()).then_some(colours)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTEXT: &str = "Some shapes: a small green square, a blue triangle and a large green star.\n\
        There are three shapes in the picture.\n\
        The green star is to the left of the blue triangle.\n\
        From left to right: a green star, a large blue triangle and a green square.\n\
        Two objects on a light grey background.\n\
        triangle: [0.4, 0.6, 0.65, 0.85]\n\
        square: [0.7, 0.05, 0.85, 0.2]\n\
        star: [0.05, 0.1, 0.3, 0.35]";

    #[test]
    fn reads_objects_sizes_background_and_boxes() {
        let k = Knowledge::from_context(CONTEXT);
        let names: Vec<String> = k.objects.iter().map(SceneObject::full_name).collect();
        assert_eq!(
            names,
            vec![
                "large green star",
                "large blue triangle",
                "small green square"
            ]
        );
        assert!(k.ordered && k.has_boxes && k.all_boxed());
        assert_eq!(k.background.as_deref(), Some("light grey"));
        assert_eq!(k.objects[2].bbox, Some([0.7, 0.05, 0.85, 0.2]));
        // "Two objects" disagrees with the three listed.
        let conflicts = k.conflicts();
        assert_eq!(conflicts.len(), 1, "{conflicts:?}");
        assert!(conflicts[0].contains("Two objects"), "{conflicts:?}");
    }

    #[test]
    fn boxes_of_one_shape_go_left_to_right() {
        let k = Knowledge::from_context(
            "Left to right, there is a red circle, a blue square and a green circle.\n\
             circle: [0.7, 0.1, 0.9, 0.3]\ncircle: [0.1, 0.5, 0.3, 0.7]\nsquare: [0.4, 0.4, 0.6, 0.6]",
        );
        assert_eq!(k.objects[0].bbox, Some([0.1, 0.5, 0.3, 0.7]));
        assert_eq!(k.objects[2].bbox, Some([0.7, 0.1, 0.9, 0.3]));
        assert!(k.conflicts().is_empty(), "{:?}", k.conflicts());
        // a box of a shape with no object is reported
        let k = Knowledge::from_context(
            "From left to right: a red circle.\nstar: [0.1, 0.1, 0.2, 0.2]",
        );
        assert_eq!(k.unmatched_boxes, 1);
        assert!(!k.conflicts().is_empty());
    }

    #[test]
    fn single_object_and_unordered_fallbacks() {
        let k = Knowledge::from_context(
            "A small red star on a beige background.\nOne star, painted red.\nA picture of a single red star.",
        );
        assert_eq!(k.objects.len(), 1);
        assert!(k.ordered);
        assert_eq!(k.objects[0].size, Some(Size::Small));
        assert_eq!(k.background.as_deref(), Some("beige"));
        assert!(k.conflicts().is_empty(), "{:?}", k.conflicts());

        let k = Knowledge::from_context("An image showing a blue square and a red circle.");
        assert_eq!(k.objects.len(), 2);
        assert!(!k.ordered, "no left-to-right caption, no boxes");
        let k = Knowledge::from_context(
            "An image showing a blue square and a red circle.\n\
             square: [0.6, 0.1, 0.8, 0.3]\ncircle: [0.1, 0.1, 0.3, 0.3]",
        );
        assert!(k.ordered, "distinct shapes are ordered by their boxes");
        assert_eq!(k.objects[0].name(), "red circle");
        assert_eq!(k.objects[0].size, Some(Size::Small), "from the box width");

        let k = Knowledge::from_context("");
        assert!(k.objects.is_empty() && k.conflicts().is_empty());
    }

    #[test]
    fn box_lines_and_not_box_lines() {
        assert_eq!(
            parse_box_line("dining table: [0, 0.207, 1, 1]"),
            Some(("dining table".to_string(), [0.0, 0.207, 1.0, 1.0]))
        );
        assert_eq!(parse_box_line("From left to right: a red circle."), None);
        assert_eq!(parse_box_line("x: [0.1, 0.2, 0.3]"), None);
        assert_eq!(parse_box_line("x: [0.5, 0.2, 0.3, 0.4]"), None, "x2 < x1");
        assert_eq!(parse_box_line("x: [a, b, c, d]"), None);
    }
}
