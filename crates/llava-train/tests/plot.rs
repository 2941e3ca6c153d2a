//! `loss.png` from a known `train_log.jsonl`: the picture has its size, text in the title and
//! axis regions (the embedded font draws), the raw loss faint, the smoothed line over it and
//! the learning rate below.

use llava_train::plot::{
    HEIGHT, LEFT_MARGIN, TITLE_HEIGHT, WIDTH, X_LABEL_HEIGHT, Y_LABEL_WIDTH, plot_log,
};

/// 300 steps in the trainer's format: a loss falling from 4 to 1 with alternating spikes (two
/// kinds of batch), and a warmup + cosine learning rate.
fn write_log(path: &std::path::Path) {
    let mut text = String::new();
    for step in 1..=300u64 {
        let s = step as f64;
        let loss = 1.0 + 3.0 * (-s / 60.0).exp() + if step % 2 == 0 { 0.4 } else { -0.4 };
        let lr = if step <= 10 {
            2e-5 * s / 10.0
        } else {
            1e-5 * (1.0 + (std::f64::consts::PI * (s - 10.0) / 290.0).cos())
        };
        text.push_str(&format!(
            "{{\"step\":{step},\"epoch\":{},\"loss\":{loss},\"lr\":{lr},\"grad_norm\":1.0,\"tokens\":100,\"elapsed_s\":{s}}}\n",
            s / 300.0
        ));
    }
    std::fs::write(path, text).expect("write log");
}

/// Pixels in `[x0, x1) × [y0, y1)` that are dark (text or axis lines, not grid or white).
fn dark(img: &image::RgbImage, (x0, x1): (u32, u32), (y0, y1): (u32, u32)) -> usize {
    (y0..y1)
        .flat_map(|y| (x0..x1).map(move |x| (x, y)))
        .filter(|&(x, y)| img.get_pixel(x, y).0.iter().all(|&c| c < 110))
        .count()
}

#[test]
fn loss_png_has_a_title_axes_a_smoothed_curve_and_the_learning_rate() {
    let tmp = tempfile::tempdir().expect("tmp");
    let log = tmp.path().join("train_log.jsonl");
    write_log(&log);
    let png = tmp.path().join("loss.png");
    plot_log(
        &log,
        &png,
        "stage 2 (finetune) · model demo/init · data data/stage2.json",
    )
    .expect("draws");
    let img = image::open(&png).expect("a PNG").to_rgb8();
    assert_eq!(img.dimensions(), (WIDTH, HEIGHT));

    // The title, the y tick numbers and label (left strip, short of the axis and its ticks),
    // and the step tick numbers and label (bottom strip) are drawn in the embedded font.
    let title = dark(&img, (0, WIDTH), (0, TITLE_HEIGHT));
    let y_axis = dark(
        &img,
        (0, LEFT_MARGIN + Y_LABEL_WIDTH - 12),
        (TITLE_HEIGHT, HEIGHT - X_LABEL_HEIGHT),
    );
    let x_axis = dark(
        &img,
        (LEFT_MARGIN + Y_LABEL_WIDTH, WIDTH),
        (HEIGHT - X_LABEL_HEIGHT + 10, HEIGHT),
    );
    assert!(title > 300, "title text ({title} dark pixels)");
    assert!(y_axis > 600, "y tick labels ({y_axis} dark pixels)");
    assert!(x_axis > 300, "x tick labels ({x_axis} dark pixels)");

    // The smoothed line in full blue, the raw loss in faint blue (30% over white), the
    // learning rate in orange.
    let count = |rgb: [u8; 3], tol: i32| {
        img.pixels()
            .filter(|p| {
                p.0.iter()
                    .zip(rgb)
                    .all(|(&a, b)| (a as i32 - b as i32).abs() <= tol)
            })
            .count()
    };
    let smoothed = count([31, 119, 180], 2);
    // Faint: a light blue (blended at 30%, darker where the raw line crosses itself).
    let faint = img
        .pixels()
        .filter(|p| {
            let [r, g, b] = p.0.map(i32::from);
            (110..230).contains(&r) && b - r > 30 && g > r
        })
        .count();
    let lr = count([255, 127, 14], 2);
    assert!(smoothed > 800, "smoothed line ({smoothed} pixels)");
    assert!(faint > 2000, "raw loss band ({faint} pixels)");
    assert!(lr > 500, "learning rate ({lr} pixels)");
    // The learning rate is in the lower panel only.
    let split = TITLE_HEIGHT + ((HEIGHT - TITLE_HEIGHT) as f64 * 0.6) as u32;
    let lr_above = (0..split)
        .flat_map(|y| (0..WIDTH).map(move |x| (x, y)))
        .filter(|&(x, y)| img.get_pixel(x, y).0 == [255, 127, 14])
        .count();
    assert_eq!(lr_above, 0, "learning rate drawn in the loss panel");
}
