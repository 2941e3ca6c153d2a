//! LLaVA-NeXT's "anyres" tiling, as transformers' PIL-backend `LlavaNextImageProcessor` does it.
//!
//! A 336 px CLIP tower sees a photo at 336 px whatever its size. LLaVA-NeXT also shows it the
//! photo at a higher resolution, as a grid of tower-sized tiles:
//!
//! 1. pick the grid resolution (`image_grid_pinpoints`, `(height, width)`) that keeps the most of
//!    the image's pixels and, among those, wastes the least ([`select_best_resolution`]);
//! 2. resize the image to fit it, keeping the aspect ratio, and centre it on a black canvas of
//!    that resolution ([`patch_output_size`]);
//! 3. cut the canvas into tiles, row by row;
//! 4. put the whole image, squashed to one tile, in front.
//!
//! Every tile then goes through the usual CLIP preprocessing. The model unpads the grid's features
//! by the image's original size, so [`ProcessedImage`] keeps it.

use ::image::{Rgb, RgbImage};

use super::ImageError;
use super::config::{PreprocessorConfig, ResizeSize};
use super::process::{ImageAspectRatio, PixelValues, check_not_empty, preprocess};
use super::resample::resize_pil;

/// One image, ready for the vision tower: its tiles (a single one without anyres) and the size
/// it had before any of them were made.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedImage {
    /// CHW tiles: for anyres the whole image first, then the grid row by row.
    pub tiles: Vec<PixelValues>,
    /// `(height, width)` of the decoded image.
    pub image_size: (u32, u32),
}

/// transformers' `select_best_resolution`: among `(height, width)` candidates, the one whose
/// aspect-preserving fit keeps the most pixels of the original (at most all of them), then the
/// one that wastes the least. Ties keep the earlier candidate.
pub fn select_best_resolution(image_size: (u32, u32), pinpoints: &[[u32; 2]]) -> Option<[u32; 2]> {
    let (h, w) = (f64::from(image_size.0), f64::from(image_size.1));
    let original = u64::from(image_size.0) * u64::from(image_size.1);
    let mut best = None;
    let (mut max_effective, mut min_wasted) = (0u64, u64::MAX);
    for &[ph, pw] in pinpoints {
        let scale = (f64::from(pw) / w).min(f64::from(ph) / h);
        // Python's int() truncates.
        let (dw, dh) = ((w * scale) as u64, (h * scale) as u64);
        let effective = (dw * dh).min(original);
        let wasted = (u64::from(ph) * u64::from(pw)).saturating_sub(effective);
        if effective > max_effective || (effective == max_effective && wasted < min_wasted) {
            max_effective = effective;
            min_wasted = wasted;
            best = Some([ph, pw]);
        }
    }
    best
}

/// transformers' `get_patch_output_size`: the `(height, width)` an image of `image_size` is
/// resized to so that it fits `target` with its aspect ratio kept (rounded up, capped).
pub fn patch_output_size(image_size: (u32, u32), target: [u32; 2]) -> (u32, u32) {
    let (h, w) = (f64::from(image_size.0), f64::from(image_size.1));
    let [th, tw] = target;
    let scale_w = f64::from(tw) / w;
    let scale_h = f64::from(th) / h;
    if scale_w < scale_h {
        (((h * scale_w).ceil() as u32).min(th), tw)
    } else {
        (th, ((w * scale_h).ceil() as u32).min(tw))
    }
}

/// The tiles of `img` for a tower that takes `cfg.crop_size` squares (see the module docs).
pub fn anyres_tiles(
    img: &RgbImage,
    cfg: &PreprocessorConfig,
    pinpoints: &[[u32; 2]],
) -> Result<ProcessedImage, ImageError> {
    check_not_empty(img)?;
    let (w, h) = img.dimensions();
    let best = select_best_resolution((h, w), pinpoints).ok_or(ImageError::EmptySize {
        what: "image_grid_pinpoints",
        width: 0,
        height: 0,
    })?;
    let (new_h, new_w) = patch_output_size((h, w), best);
    let resized = resize_pil(img, new_w, new_h, cfg.resample)?;
    // np.pad with zeros, the larger half of an odd margin after the image.
    let [th, tw] = best;
    let (left, top) = ((tw - new_w) / 2, (th - new_h) / 2);
    let mut canvas = RgbImage::from_pixel(tw, th, Rgb([0, 0, 0]));
    ::image::imageops::replace(&mut canvas, &resized, i64::from(left), i64::from(top));

    let side = cfg.crop_size.height;
    let (base_h, base_w) = match cfg.size {
        ResizeSize::Exact { height, width } => (height, width),
        ResizeSize::ShortestEdge { shortest_edge, .. } => (shortest_edge, shortest_edge),
    };
    let mut tiles = vec![resize_pil(img, base_w, base_h, cfg.resample)?];
    for y in (0..th).step_by(side as usize) {
        for x in (0..tw).step_by(side as usize) {
            let (tile_w, tile_h) = (side.min(tw - x), side.min(th - y));
            tiles.push(::image::imageops::crop_imm(&canvas, x, y, tile_w, tile_h).to_image());
        }
    }
    Ok(ProcessedImage {
        tiles: tiles
            .iter()
            .map(|tile| preprocess(tile, cfg, ImageAspectRatio::Square))
            .collect::<Result<_, _>>()?,
        image_size: (h, w),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAVA_HF: [[u32; 2]; 5] = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]];

    #[test]
    fn best_resolution_as_transformers_picks_it() {
        // Values from transformers' select_best_resolution.
        assert_eq!(
            select_best_resolution((480, 640), &LLAVA_HF),
            Some([672, 672])
        );
        assert_eq!(
            select_best_resolution((200, 900), &LLAVA_HF),
            Some([336, 1008])
        );
        assert_eq!(
            select_best_resolution((1000, 300), &LLAVA_HF),
            Some([1008, 336])
        );
        assert_eq!(
            select_best_resolution((100, 100), &LLAVA_HF),
            Some([336, 672]),
            "every grid keeps the whole small image; the first that wastes least wins"
        );
        assert_eq!(select_best_resolution((10, 10), &[]), None);
    }

    #[test]
    fn fit_keeps_the_aspect_ratio_and_rounds_up() {
        assert_eq!(patch_output_size((480, 640), [672, 672]), (504, 672));
        assert_eq!(patch_output_size((60, 40), [60, 60]), (60, 40));
        assert_eq!(patch_output_size((28, 96), [30, 90]), (27, 90));
    }
}
