//! `llava instruct stats --plot DIR`: bar charts of a set's statistics as PNGs, each with a
//! title, axis labels and a label under every bar, drawn as `loss.png` is (llava-chart: the
//! embedded font and the PNG writer), so a set can be read beside LLaVA-Instruct-158K's figures.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::error::InstructError;
use crate::stats::{Dist, Stats};

const WIDTH: u32 = 800;
const HEIGHT: u32 = 480;
const BAR: RGBColor = RGBColor(31, 119, 180);

/// One chart: its title, its axes' names, and a labelled bar per value.
pub struct Bars<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub bars: Vec<(String, f64)>,
}

/// Draws `chart` to `path` (written atomically).
pub fn bar_png(path: &Path, chart: &Bars) -> Result<(), InstructError> {
    let err = |e: String| InstructError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(format!("cannot draw the chart: {e}")),
    };
    llava_chart::ensure_font().map_err(err)?;
    let mut buffer = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    draw(&mut buffer, chart).map_err(err)?;
    llava_chart::write_png(path, &buffer, WIDTH, HEIGHT).map_err(err)
}

fn draw(buffer: &mut [u8], chart: &Bars) -> Result<(), String> {
    let root = BitMapBackend::with_buffer(buffer, (WIDTH, HEIGHT)).into_drawing_area();
    let n = chart.bars.len().max(1);
    let top = chart
        .bars
        .iter()
        .map(|(_, v)| *v)
        .filter(|v| v.is_finite())
        .fold(0f64, f64::max)
        .max(1.0);
    let labels: Vec<&str> = chart.bars.iter().map(|(l, _)| l.as_str()).collect();
    let mut c = ChartBuilder::on(&root)
        .caption(chart.title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(56)
        .y_label_area_size(64)
        .build_cartesian_2d((0..n - 1).into_segmented(), 0f64..top * 1.08)
        .map_err(|e| e.to_string())?;
    c.configure_mesh()
        .disable_x_mesh()
        .light_line_style(RGBColor(235, 235, 235))
        .x_desc(chart.x_label)
        .y_desc(chart.y_label)
        .x_labels(n)
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => labels.get(*i).map_or(String::new(), |s| s.to_string()),
            _ => String::new(),
        })
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 15))
        .draw()
        .map_err(|e| e.to_string())?;
    c.draw_series(
        Histogram::vertical(&c).style(BAR.filled()).margin(6).data(
            chart
                .bars
                .iter()
                .enumerate()
                .map(|(i, (_, v))| (i, v.max(0.0))),
        ),
    )
    .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

/// A histogram's buckets as bars labelled by their lower bound in words.
fn buckets(d: &Dist) -> Vec<(String, f64)> {
    let w = d.bucket_width.max(1);
    d.histogram
        .iter()
        .enumerate()
        .map(|(i, &c)| (format!("{}", i * w), c as f64))
        .collect()
}

/// Writes `per_type.png`, `turns.png`, `question_words.png`, `answer_words.png` and
/// `verb_noun.png` into `dir` (created if needed); returns their paths.
pub fn plot_stats(s: &Stats, dir: &Path) -> Result<Vec<PathBuf>, InstructError> {
    std::fs::create_dir_all(dir).map_err(InstructError::io(dir))?;
    let turns_max = s.turns.keys().max().copied().unwrap_or(0);
    let charts = [
        (
            "per_type.png",
            Bars {
                title: "Records per type",
                x_label: "type",
                y_label: "records",
                bars: s
                    .per_type
                    .iter()
                    .map(|(t, &c)| (t.name().to_string(), c as f64))
                    .collect(),
            },
        ),
        (
            "turns.png",
            Bars {
                title: "Question-answer turns per record",
                x_label: "turns",
                y_label: "records",
                bars: (1..=turns_max)
                    .map(|k| (k.to_string(), s.turns.get(&k).copied().unwrap_or(0) as f64))
                    .collect(),
            },
        ),
        (
            "question_words.png",
            Bars {
                title: "Question length",
                x_label: "words (bucket start)",
                y_label: "questions",
                bars: buckets(&s.question_words),
            },
        ),
        (
            "answer_words.png",
            Bars {
                title: "Answer length",
                x_label: "words (bucket start)",
                y_label: "answers",
                bars: buckets(&s.answer_words),
            },
        ),
        (
            "verb_noun.png",
            Bars {
                title: "Most frequent verb-noun pairs of the questions",
                x_label: "verb noun",
                y_label: "questions",
                bars: s
                    .top_verb_noun
                    .iter()
                    .map(|v| (format!("{} {}", v.verb, v.noun), v.count as f64))
                    .collect(),
            },
        ),
    ];
    let mut out = Vec::new();
    for (name, chart) in &charts {
        let p = dir.join(name);
        bar_png(&p, chart)?;
        out.push(p);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dark(img: &image::RgbImage, x: std::ops::Range<u32>, y: std::ops::Range<u32>) -> usize {
        let mut n = 0;
        for yy in y {
            for xx in x.clone() {
                if img.get_pixel(xx, yy).0.iter().all(|&c| c < 100) {
                    n += 1;
                }
            }
        }
        n
    }

    #[test]
    fn draws_labelled_bars_as_pngs() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("bars.png");
        let chart = Bars {
            title: "Records per type",
            x_label: "type",
            y_label: "records",
            bars: vec![("a".into(), 1.0), ("b".into(), 3.0), ("c".into(), 2.0)],
        };
        bar_png(&p, &chart).unwrap();
        let img = image::open(&p).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (WIDTH, HEIGHT));
        let blue = img.pixels().filter(|p| p.0 == [31, 119, 180]).count();
        assert!(blue > 1000, "{blue}");
        // Text: the title at the top, tick labels left of the plot, bar labels below it.
        assert!(dark(&img, 200..600, 0..40) > 50, "title");
        assert!(dark(&img, 0..80, 60..420) > 50, "y axis text");
        assert!(dark(&img, 80..800, 420..480) > 50, "x axis text");
        let s = crate::stats::Stats::default();
        let files = plot_stats(&s, &d.path().join("plots")).unwrap();
        assert_eq!(files.len(), 5);
        assert!(files.iter().all(|f| f.exists()));
    }
}
