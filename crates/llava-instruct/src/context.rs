//! The symbolic representation of an image that the text-only teacher sees.
//!
//! **Captions**, one per line:
//! - each caption is trimmed and its inner whitespace (newlines, tabs, runs of spaces) is
//!   collapsed to one space; captions that end up empty are dropped;
//! - a caption that repeats an earlier one (ignoring case, surrounding whitespace and a final
//!   period) is dropped; the first occurrence keeps its place;
//! - otherwise the source order is kept (COCO: annotation-id order).
//!
//! **Boxes**, after the captions, one line per object: `category: [x1, y1, x2, y2]`:
//! - coordinates are divided by the image width (x) and height (y), clamped to 0..1, rounded
//!   to 3 decimals, and written without trailing zeros (`0.5`, `0`, `1`, `0.312`);
//! - boxes with a non-positive width or height, or an empty category, are dropped;
//! - a box whose line is identical to an earlier one is dropped (COCO has a few exact
//!   duplicates); the first keeps its place;
//! - otherwise the source order is kept (COCO: annotation-id order).
//!
//! The conversation type sees the captions only; detail and complex see captions and boxes.

use std::collections::HashSet;

use crate::source::ImageEntry;

/// Collapses whitespace and trims.
fn normalise_caption(c: &str) -> String {
    c.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The image's captions after normalisation and dedup, in source order.
pub fn caption_lines(captions: &[String]) -> Vec<String> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for c in captions {
        let n = normalise_caption(c);
        if n.is_empty() {
            continue;
        }
        let key = n.trim_end_matches('.').trim_end().to_lowercase();
        if seen.insert(key) {
            out.push(n);
        }
    }
    out
}

/// A coordinate in 0..1 with at most 3 decimals and no trailing zeros.
pub fn format_coord(v: f64) -> String {
    let v = if v.is_finite() {
        v.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let r = (v * 1000.0).round() / 1000.0;
    let s = format!("{r:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() || s == "-0" {
        "0".to_string()
    } else {
        s.to_string()
    }
}

/// The box lines of an image after normalisation and dedup, in source order.
pub fn box_lines(entry: &ImageEntry) -> Vec<String> {
    let (w, h) = (entry.width, entry.height);
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    if !(w.is_finite() && h.is_finite() && w > 0.0 && h > 0.0) {
        return out;
    }
    for b in &entry.boxes {
        let [x, y, bw, bh] = b.bbox;
        let category = normalise_caption(&b.category);
        let usable = !category.is_empty() && bw > 0.0 && bh > 0.0 && x.is_finite() && y.is_finite();
        if !usable {
            continue;
        }
        let line = format!(
            "{category}: [{}, {}, {}, {}]",
            format_coord(x / w),
            format_coord(y / h),
            format_coord((x + bw) / w),
            format_coord((y + bh) / h)
        );
        if seen.insert(line.clone()) {
            out.push(line);
        }
    }
    out
}

/// The context text: captions, then (when `with_boxes`) box lines, one per line.
pub fn format_context(entry: &ImageEntry, with_boxes: bool) -> String {
    let mut lines = caption_lines(&entry.captions);
    if with_boxes {
        lines.extend(box_lines(entry));
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::BoxAnnotation;

    fn entry() -> ImageEntry {
        ImageEntry {
            id: "1".into(),
            image: "1.jpg".into(),
            width: 640.0,
            height: 480.0,
            captions: vec![
                "  A man rides\na horse  ".into(),
                "".into(),
                "a man rides a horse.".into(),
                "Two dogs run.".into(),
            ],
            boxes: vec![
                BoxAnnotation {
                    category: "person".into(),
                    bbox: [199.68, 38.4, 293.12, 437.28],
                },
                BoxAnnotation {
                    category: "horse".into(),
                    bbox: [320.0, 240.0, 320.0, 240.0],
                },
                BoxAnnotation {
                    category: "person".into(),
                    bbox: [199.7, 38.39, 293.1, 437.3],
                },
                BoxAnnotation {
                    category: "dog".into(),
                    bbox: [-10.0, 0.0, 0.0, 5.0],
                },
                BoxAnnotation {
                    category: "dog".into(),
                    bbox: [-10.0, 470.0, 30.0, 30.0],
                },
                BoxAnnotation {
                    category: "  ".into(),
                    bbox: [1.0, 1.0, 1.0, 1.0],
                },
            ],
        }
    }

    #[test]
    fn coords_rounded_trimmed_clamped() {
        assert_eq!(format_coord(0.5), "0.5");
        assert_eq!(format_coord(0.0), "0");
        assert_eq!(format_coord(1.0), "1");
        assert_eq!(format_coord(0.3121), "0.312");
        assert_eq!(format_coord(0.3125), "0.313");
        assert_eq!(format_coord(0.0704), "0.07");
        assert_eq!(format_coord(0.9996), "1");
        assert_eq!(format_coord(0.0004), "0");
        assert_eq!(format_coord(-0.0001), "0");
        assert_eq!(format_coord(1.7), "1");
        assert_eq!(format_coord(f64::NAN), "0");
    }

    #[test]
    fn captions_normalised_and_deduplicated_in_order() {
        assert_eq!(
            caption_lines(&entry().captions),
            vec!["A man rides a horse", "Two dogs run."]
        );
    }

    #[test]
    fn boxes_normalised_dedup_and_degenerate_dropped() {
        let lines = box_lines(&entry());
        assert_eq!(
            lines,
            vec![
                "person: [0.312, 0.08, 0.77, 0.991]",
                "horse: [0.5, 0.5, 1, 1]",
                "dog: [0, 0.979, 0.031, 1]",
            ]
        );
    }

    #[test]
    fn conversation_context_has_no_boxes() {
        let e = entry();
        assert_eq!(
            format_context(&e, false),
            "A man rides a horse\nTwo dogs run."
        );
        assert_eq!(
            format_context(&e, true),
            "A man rides a horse\nTwo dogs run.\nperson: [0.312, 0.08, 0.77, 0.991]\nhorse: [0.5, 0.5, 1, 1]\ndog: [0, 0.979, 0.031, 1]"
        );
    }

    #[test]
    fn zero_size_image_gives_no_boxes() {
        let mut e = entry();
        e.width = 0.0;
        assert!(box_lines(&e).is_empty());
    }
}
