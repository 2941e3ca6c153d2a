//! `loss.png`: the loss curve of `train_log.jsonl`, redrawn at the end of a run and at each save.
//!
//! plotters draws the curve into a pixel buffer and `image` encodes it, without a font backend
//! (which would pull system libraries into the build): the picture is the curve on a light grid
//! with the loss axis from 0 to the highest loss; the numbers are in `train_log.jsonl`.

use std::path::Path;

use plotters::prelude::*;

use crate::error::{Result, TrainError};

const WIDTH: u32 = 800;
const HEIGHT: u32 = 480;

/// Draws `(step, loss)` points to `path` as a PNG (written atomically).
pub fn plot_loss(path: &Path, points: &[(u64, f64)]) -> Result<()> {
    let plot_err = |e: String| {
        TrainError::Data(format!(
            "{}: cannot draw the loss curve: {e}",
            path.display()
        ))
    };
    let mut buffer = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (WIDTH, HEIGHT)).into_drawing_area();
        let last_step = points.iter().map(|p| p.0).max().unwrap_or(1).max(1);
        let top = points
            .iter()
            .map(|p| p.1)
            .filter(|l| l.is_finite())
            .fold(0f64, f64::max)
            .max(1e-6);
        let mut chart = ChartBuilder::on(&root)
            .margin(24)
            .build_cartesian_2d(0u64..last_step, 0f64..top * 1.05)
            .map_err(|e| plot_err(e.to_string()))?;
        let grid = RGBColor(225, 225, 225);
        for i in 1..10 {
            let y = top * 1.05 * i as f64 / 10.0;
            chart
                .draw_series(LineSeries::new([(0, y), (last_step, y)], grid))
                .map_err(|e| plot_err(e.to_string()))?;
        }
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                RGBColor(31, 119, 180).stroke_width(2),
            ))
            .map_err(|e| plot_err(e.to_string()))?;
        root.present().map_err(|e| plot_err(e.to_string()))?;
    }
    let img = image::RgbImage::from_raw(WIDTH, HEIGHT, buffer)
        .ok_or_else(|| plot_err("buffer size".into()))?;
    let tmp = path.with_extension("png.tmp");
    img.save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| plot_err(e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(TrainError::io(path))
}

/// `(step, loss)` pairs from a `train_log.jsonl`.
pub fn read_losses(log: &Path) -> Result<Vec<(u64, f64)>> {
    let text = std::fs::read_to_string(log).map_err(TrainError::io(log))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v.get("step")?.as_u64()?, v.get("loss")?.as_f64()?)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_png_of_the_curve() {
        let dir = std::env::temp_dir().join(format!("llava-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("loss.png");
        let points: Vec<(u64, f64)> = (1..=50).map(|s| (s, 10.0 / s as f64)).collect();
        plot_loss(&path, &points).expect("plots");
        let img = image::open(&path).expect("a PNG").to_rgb8();
        assert_eq!(img.dimensions(), (WIDTH, HEIGHT));
        let blue = img.pixels().filter(|p| p.0 == [31, 119, 180]).count();
        assert!(blue > 500, "the curve is drawn ({blue} curve pixels)");
        std::fs::remove_dir_all(&dir).ok();
    }
}
