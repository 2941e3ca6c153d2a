//! Painting a scene into an RGB image.
//!
//! Shapes are filled by testing sample points against their outline, 3×3 samples per pixel,
//! so that a 10-pixel star still looks like a star rather than a blob: at these sizes the
//! anti-aliased edge carries much of the shape. The background is the scene's colour with a
//! gentle vertical gradient and a little per-pixel noise, so that no two pictures share pixels.

use image::{Rgb, RgbImage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::scene::{Object, Scene};

const SUPERSAMPLE: u32 = 3;

/// Whether the point (x, y), relative to the object's centre and in units of its radius,
/// lies inside the shape.
pub(super) fn inside(shape: &str, x: f32, y: f32) -> bool {
    match shape {
        "circle" => x * x + y * y <= 1.0,
        "square" => x.abs() <= 0.9 && y.abs() <= 0.9,
        "triangle" => in_polygon(&[(0.0, -1.0), (1.0, 0.95), (-1.0, 0.95)], x, y),
        "star" => in_polygon(&star_outline(), x, y),
        _ => false,
    }
}

/// A five-pointed star, point up, inner radius 0.45.
fn star_outline() -> [(f32, f32); 10] {
    let mut pts = [(0.0, 0.0); 10];
    for (i, p) in pts.iter_mut().enumerate() {
        let r = if i % 2 == 0 { 1.0 } else { 0.45 };
        let a = std::f32::consts::PI * (i as f32) / 5.0 - std::f32::consts::FRAC_PI_2;
        *p = (r * a.cos(), r * a.sin());
    }
    pts
}

/// Even-odd point-in-polygon test.
fn in_polygon(pts: &[(f32, f32)], x: f32, y: f32) -> bool {
    let mut inside = false;
    let mut j = pts.len() - 1;
    for i in 0..pts.len() {
        let (xi, yi) = pts[i];
        let (xj, yj) = pts[j];
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

/// The fraction of pixel (px, py) that the object covers.
fn coverage(o: &Object, px: u32, py: u32) -> f32 {
    let mut hits = 0;
    for sy in 0..SUPERSAMPLE {
        for sx in 0..SUPERSAMPLE {
            let x = px as f32 + (sx as f32 + 0.5) / SUPERSAMPLE as f32;
            let y = py as f32 + (sy as f32 + 0.5) / SUPERSAMPLE as f32;
            if inside(&o.shape, (x - o.cx) / o.radius, (y - o.cy) / o.radius) {
                hits += 1;
            }
        }
    }
    hits as f32 / (SUPERSAMPLE * SUPERSAMPLE) as f32
}

/// Paints the scene.
pub fn render(scene: &Scene) -> RgbImage {
    let (w, h) = (scene.width, scene.height);
    let base = scene.background_rgb();
    let mut rng = StdRng::seed_from_u64(scene.noise_seed);
    let slope: f32 = rng.random_range(-14.0..14.0);
    let mut img = RgbImage::new(w, h);
    for y in 0..h {
        let shade = slope * (y as f32 / h.max(1) as f32 - 0.5);
        for x in 0..w {
            let noise: f32 = rng.random_range(-5.0..5.0);
            let px = base.map(|c| (c as f32 + shade + noise).clamp(0.0, 255.0));
            img.put_pixel(x, y, Rgb(px.map(|c| c.round() as u8)));
        }
    }
    for o in &scene.objects {
        let rgb = o.rgb();
        let x0 = (o.cx - o.radius - 1.0).floor().max(0.0) as u32;
        let y0 = (o.cy - o.radius - 1.0).floor().max(0.0) as u32;
        let x1 = ((o.cx + o.radius + 1.0).ceil() as u32).min(w);
        let y1 = ((o.cy + o.radius + 1.0).ceil() as u32).min(h);
        for y in y0..y1 {
            for x in x0..x1 {
                let a = coverage(o, x, y);
                if a > 0.0 {
                    let p = img.get_pixel_mut(x, y);
                    for (dst, &src) in p.0.iter_mut().zip(&rgb) {
                        *dst = (a * src as f32 + (1.0 - a) * *dst as f32).round() as u8;
                    }
                }
            }
        }
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::scene::Size;

    fn scene_with(shape: &str) -> Scene {
        Scene {
            id: 1,
            file_name: "x.png".into(),
            width: 40,
            height: 40,
            background: "white".into(),
            objects: vec![Object {
                shape: shape.into(),
                colour: "blue".into(),
                size: Size::Large,
                cx: 20.0,
                cy: 20.0,
                radius: 12.0,
            }],
            noise_seed: 3,
        }
    }

    fn painted(shape: &str) -> usize {
        let img = render(&scene_with(shape));
        img.pixels()
            .filter(|p| p.0[2] > 150 && p.0[0] < 120)
            .count()
    }

    #[test]
    fn shapes_cover_the_areas_their_outlines_give() {
        // Area in units of r² (r = 12): circle π, square 3.24, triangle 1.95, star ≈ 1.05.
        let r2 = 144.0;
        let expect = [
            ("circle", std::f32::consts::PI),
            ("square", 3.24),
            ("triangle", 1.95),
            ("star", 1.06),
        ];
        for (shape, area) in expect {
            let got = painted(shape) as f32 / r2;
            assert!((got - area).abs() < 0.25, "{shape}: {got} vs {area}");
        }
    }

    #[test]
    fn background_is_reproducible_and_noisy() {
        let s = scene_with("circle");
        assert_eq!(render(&s), render(&s));
        let img = render(&s);
        let corner: Vec<_> = (0..5).map(|x| img.get_pixel(x, 0).0).collect();
        assert!(corner.windows(2).any(|w| w[0] != w[1]));
    }
}
