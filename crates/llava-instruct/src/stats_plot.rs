//! `llava instruct stats --plot DIR`: bar charts of a set's statistics as PNGs.
//!
//! As `loss.png` in llava-train, plotters draws into a pixel buffer and `image` encodes it,
//! without a font backend (which would pull system libraries into the build): the pictures
//! are bars on a light grid, left to right in the order the `--json` output lists them; the
//! numbers are in that output.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::error::InstructError;
use crate::stats::Stats;

const WIDTH: u32 = 800;
const HEIGHT: u32 = 480;

/// Draws `values` as bars to `path` (written atomically).
pub fn bar_png(path: &Path, values: &[f64]) -> Result<(), InstructError> {
    let err = |e: String| InstructError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(format!("cannot draw the chart: {e}")),
    };
    let mut buffer = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (WIDTH, HEIGHT)).into_drawing_area();
        let n = values.len().max(1);
        let top = values
            .iter()
            .copied()
            .filter(|v| v.is_finite())
            .fold(0f64, f64::max)
            .max(1e-9);
        let mut chart = ChartBuilder::on(&root)
            .margin(24)
            .build_cartesian_2d(0f64..n as f64, 0f64..top * 1.05)
            .map_err(|e| err(e.to_string()))?;
        let grid = RGBColor(225, 225, 225);
        for i in 1..10 {
            let y = top * 1.05 * f64::from(i) / 10.0;
            chart
                .draw_series(LineSeries::new([(0.0, y), (n as f64, y)], grid))
                .map_err(|e| err(e.to_string()))?;
        }
        chart
            .draw_series(values.iter().enumerate().map(|(i, &v)| {
                let x = i as f64;
                Rectangle::new(
                    [(x + 0.1, 0.0), (x + 0.9, v.max(0.0))],
                    RGBColor(31, 119, 180).filled(),
                )
            }))
            .map_err(|e| err(e.to_string()))?;
        root.present().map_err(|e| err(e.to_string()))?;
    }
    let img = image::RgbImage::from_raw(WIDTH, HEIGHT, buffer)
        .ok_or_else(|| err("buffer size".into()))?;
    let tmp = path.with_extension("png.tmp");
    img.save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| err(e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(InstructError::io(path))
}

/// Writes `per_type.png`, `turns.png`, `question_words.png`, `answer_words.png` and
/// `verb_noun.png` into `dir` (created if needed); returns their paths.
pub fn plot_stats(s: &Stats, dir: &Path) -> Result<Vec<PathBuf>, InstructError> {
    std::fs::create_dir_all(dir).map_err(InstructError::io(dir))?;
    let as_f = |v: &[usize]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    let turns_max = s.turns.keys().max().copied().unwrap_or(0);
    let turns: Vec<usize> = (1..=turns_max)
        .map(|k| s.turns.get(&k).copied().unwrap_or(0))
        .collect();
    let charts: [(&str, Vec<f64>); 5] = [
        (
            "per_type.png",
            as_f(&s.per_type.values().copied().collect::<Vec<_>>()),
        ),
        ("turns.png", as_f(&turns)),
        ("question_words.png", as_f(&s.question_words.histogram)),
        ("answer_words.png", as_f(&s.answer_words.histogram)),
        (
            "verb_noun.png",
            as_f(&s.top_verb_noun.iter().map(|v| v.count).collect::<Vec<_>>()),
        ),
    ];
    let mut out = Vec::new();
    for (name, values) in charts {
        let p = dir.join(name);
        bar_png(&p, &values)?;
        out.push(p);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_bars_as_pngs() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("bars.png");
        bar_png(&p, &[1.0, 3.0, 2.0]).unwrap();
        let img = image::open(&p).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (WIDTH, HEIGHT));
        // the tallest bar (the middle one) is drawn in the bar colour near its top
        let blue = img.pixels().filter(|p| p.0 == [31, 119, 180]).count();
        assert!(blue > 1000, "{blue}");
        let s = crate::stats::Stats::default();
        let files = plot_stats(&s, &d.path().join("plots")).unwrap();
        assert_eq!(files.len(), 5);
        assert!(files.iter().all(|f| f.exists()));
    }
}
