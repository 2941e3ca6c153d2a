//! `loss.png`: the curves of `train_log.jsonl`, redrawn at the end of a run and at each save,
//! drawn as TensorBoard draws a scalar: the raw loss faint, an EMA-smoothed line over it, and
//! the learning rate in a panel below, with ticks, axis labels and a title naming the run.
//!
//! The text is set in DejaVu Sans, embedded in the binary (the `dejavu` crate) and rasterised by
//! plotters' `ab_glyph` backend, so drawing needs no system fonts or libraries.

use std::ops::Range;
use std::path::Path;

use plotters::coord::Shift;
use plotters::coord::types::{RangedCoordf64, RangedCoordu64};
use plotters::prelude::*;

use crate::error::{Result, TrainError};
use crate::smoothing::{ema, smoothing_weight};

pub const WIDTH: u32 = 960;
pub const HEIGHT: u32 = 640;
/// Pixel rows above the panels, where the title goes.
pub const TITLE_HEIGHT: u32 = 44;
/// Pixel columns left of each panel, where its y ticks and label go.
pub const Y_LABEL_WIDTH: u32 = 100;
/// Pixel columns left of the y label areas: plotters sets the rotated axis label at the
/// area's edge, half outside it.
pub const LEFT_MARGIN: u32 = 14;
/// Pixel rows under the learning-rate panel, where the step ticks and label go.
pub const X_LABEL_HEIGHT: u32 = 48;
/// The loss panel's share of the height below the title; the learning rate has the rest.
const LOSS_SHARE: f64 = 0.68;

/// Matplotlib's and TensorBoard's first colour.
const BLUE: RGBColor = RGBColor(31, 119, 180);
const ORANGE: RGBColor = RGBColor(255, 127, 14);

/// One line of `train_log.jsonl`, as far as the plot needs it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogPoint {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
}

/// The points of a `train_log.jsonl` (the trainer's and the tower pretraining's format); lines
/// without a step, loss and learning rate are left out.
pub fn read_log(log: &Path) -> Result<Vec<LogPoint>> {
    let text = std::fs::read_to_string(log).map_err(TrainError::io(log))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            Some(LogPoint {
                step: v.get("step")?.as_u64()?,
                loss: v.get("loss")?.as_f64()?,
                lr: v.get("lr")?.as_f64()?,
            })
        })
        .collect())
}

/// Redraws `png` from the log at `log`, under `title`.
pub fn plot_log(log: &Path, png: &Path, title: &str) -> Result<()> {
    plot_loss(png, title, &read_log(log)?)
}

/// Tick text with as many decimals as the axis span needs.
fn tick_label(v: f64, span: f64) -> String {
    let decimals = if span <= 0.0 {
        3
    } else {
        (2.0 - span.log10().floor()).clamp(0.0, 6.0) as usize
    };
    format!("{v:.decimals$}")
}

/// `(low, high)` of the finite values, padded by 5% of the span (or of the value when flat).
fn padded_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = if hi > lo {
        (hi - lo) * 0.05
    } else {
        lo.abs().max(1e-6) * 0.05
    };
    (lo - pad, hi + pad)
}

/// Draws the loss (raw and smoothed) and the learning rate of `points` to `path` as a PNG
/// (written atomically), under `title`.
pub fn plot_loss(path: &Path, title: &str, points: &[LogPoint]) -> Result<()> {
    let plot_err = |e: String| {
        TrainError::Data(format!(
            "{}: cannot draw the loss curve: {e}",
            path.display()
        ))
    };
    llava_chart::ensure_font().map_err(plot_err)?;
    let mut buffer = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    draw(&mut buffer, title, points).map_err(plot_err)?;
    llava_chart::write_png(path, &buffer, WIDTH, HEIGHT).map_err(plot_err)
}

type Panel<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordu64, RangedCoordf64>>;

/// One panel under the title: steps across (shared by both panels), `y` up, with room for
/// the y ticks on the left and `x_label_height` rows for the step ticks below.
fn panel<'a, 'b>(
    area: &'a DrawingArea<BitMapBackend<'b>, Shift>,
    x_label_height: u32,
    steps: Range<u64>,
    y: Range<f64>,
) -> std::result::Result<Panel<'a, 'b>, String> {
    ChartBuilder::on(area)
        .margin_right(24)
        .margin_left(LEFT_MARGIN)
        .margin_top(8)
        .x_label_area_size(x_label_height)
        .y_label_area_size(Y_LABEL_WIDTH)
        .build_cartesian_2d(steps, y)
        .map_err(|e| e.to_string())
}

/// A panel's grid, ticks and axis labels, each axis as (label, tick text).
fn draw_axes(
    chart: &mut Panel,
    (x_desc, x_ticks): (&str, &dyn Fn(&u64) -> String),
    (y_desc, y_ticks): (&str, &dyn Fn(&f64) -> String),
    y_tick_count: usize,
) -> std::result::Result<(), String> {
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .x_label_formatter(x_ticks)
        .y_desc(y_desc)
        .y_label_formatter(y_ticks)
        .y_labels(y_tick_count)
        .light_line_style(RGBColor(238, 238, 238))
        .bold_line_style(RGBColor(215, 215, 215))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .draw()
        .map_err(|e| e.to_string())
}

fn draw(buffer: &mut [u8], title: &str, points: &[LogPoint]) -> std::result::Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let root = BitMapBackend::with_buffer(buffer, (WIDTH, HEIGHT)).into_drawing_area();
    let (title_area, panels) = root.split_vertically(TITLE_HEIGHT);
    title_area
        .draw_text(
            title,
            &("sans-serif", 20).into_font().color(&BLACK),
            ((LEFT_MARGIN + Y_LABEL_WIDTH) as i32, 14),
        )
        .map_err(|e| err(&e))?;
    let split = ((HEIGHT - TITLE_HEIGHT) as f64 * LOSS_SHARE) as u32;
    let (loss_area, lr_area) = panels.split_vertically(split);

    let last_step = points.iter().map(|p| p.step).max().unwrap_or(1).max(1);
    let first_step = points
        .iter()
        .map(|p| p.step)
        .min()
        .unwrap_or(0)
        .min(last_step - 1);
    let losses: Vec<f64> = points.iter().map(|p| p.loss).collect();
    let weight = smoothing_weight(points.len());
    let smoothed = ema(&losses, weight);
    let (lo, hi) = padded_range(losses.iter().copied());
    let finite = |(s, v): (u64, f64)| v.is_finite().then_some((s, v));

    let steps = first_step..last_step;
    let mut chart = panel(&loss_area, 8, steps.clone(), lo..hi)?;
    draw_axes(
        &mut chart,
        ("", &|_| String::new()),
        ("loss", &|v| tick_label(*v, hi - lo)),
        10,
    )?;
    chart
        .draw_series(LineSeries::new(
            points.iter().map(|p| (p.step, p.loss)).filter_map(finite),
            BLUE.mix(0.3).stroke_width(1),
        ))
        .map_err(|e| err(&e))?
        .label("raw loss")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE.mix(0.3).stroke_width(2)));
    let last = points
        .iter()
        .zip(&smoothed)
        .rev()
        .find(|(_, s)| s.is_finite());
    let smoothed_label = match last {
        Some((p, s)) => format!(
            "EMA-smoothed (weight {weight:.2}): {} at step {}",
            tick_label(*s, (hi - lo) / 10.0),
            p.step
        ),
        None => format!("EMA-smoothed (weight {weight:.2})"),
    };
    chart
        .draw_series(LineSeries::new(
            points
                .iter()
                .zip(&smoothed)
                .map(|(p, &s)| (p.step, s))
                .filter_map(finite),
            BLUE.stroke_width(2),
        ))
        .map_err(|e| err(&e))?
        .label(smoothed_label)
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(200, 200, 200))
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| err(&e))?;

    let (lr_lo, lr_hi) = padded_range(points.iter().map(|p| p.lr));
    let lr_lo = lr_lo.max(0.0);
    let mut chart = panel(&lr_area, X_LABEL_HEIGHT, steps, lr_lo..lr_hi)?;
    let lr_label = |v: &f64| {
        if *v == 0.0 {
            "0".into()
        } else {
            format!("{v:.1e}")
        }
    };
    draw_axes(
        &mut chart,
        ("step", &|v| v.to_string()),
        ("learning rate", &lr_label),
        4,
    )?;
    chart
        .draw_series(LineSeries::new(
            points.iter().map(|p| (p.step, p.lr)).filter_map(finite),
            ORANGE.stroke_width(2),
        ))
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_labels_carry_the_decimals_the_span_needs() {
        assert_eq!(tick_label(2.34567, 5.0), "2.35");
        assert_eq!(tick_label(0.123456, 0.02), "0.1235");
        assert_eq!(tick_label(1234.4, 2000.0), "1234");
    }
}
