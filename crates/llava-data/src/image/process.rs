//! The `CLIPImageProcessor` pipeline (PIL backend) plus LLaVA-1.5's pad-to-square.

use std::borrow::Cow;
use std::path::Path;
use std::str::FromStr;

use ::image::{Rgb, RgbImage};
use serde::{Deserialize, Serialize};

use super::ImageError;
use super::anyres::{ProcessedImage, anyres_tiles};
use super::config::{PreprocessorConfig, ResizeSize};
use super::load::{LoadOptions, load_image_with};
use super::resample::resize_pil;

/// LLaVA's `image_aspect_ratio`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageAspectRatio {
    /// The plain processor (LLaVA v1; `"square"`, or anything but `"pad"` in the original code).
    #[default]
    #[serde(alias = "none")]
    Square,
    /// LLaVA-1.5: paste the image centred on a mean-coloured square first (`expand2square`).
    Pad,
}

impl FromStr for ImageAspectRatio {
    type Err = ImageError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pad" => Ok(Self::Pad),
            "square" | "none" | "" => Ok(Self::Square),
            other => Err(ImageError::UnsupportedAspectRatio(other.to_string())),
        }
    }
}

/// Pixel values for one image, CHW, row-major: `data[(c * height + y) * width + x]`.
#[derive(Debug, Clone, PartialEq)]
pub struct PixelValues {
    pub data: Vec<f32>,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl PixelValues {
    /// `[channels, height, width]`, the shape `llava-model` gives the tensor (before batching).
    pub fn shape(&self) -> [usize; 3] {
        [self.channels, self.height, self.width]
    }
}

/// LLaVA's `expand2square`: centre the image on a `max(w, h)` square filled with `fill`, at
/// offsets `((s - w) // 2, (s - h) // 2)`. Square images are returned unchanged.
pub fn expand_to_square(img: &RgbImage, fill: [u8; 3]) -> RgbImage {
    let (w, h) = img.dimensions();
    if w == h {
        return img.clone();
    }
    let side = w.max(h);
    let mut out = RgbImage::from_pixel(side, side, Rgb(fill));
    let (ox, oy) = ((side - w) / 2, (side - h) / 2);
    let row = w as usize * 3;
    for y in 0..h as usize {
        let dst = ((y + oy as usize) * side as usize + ox as usize) * 3;
        out.as_mut()[dst..dst + row].copy_from_slice(&img.as_raw()[y * row..(y + 1) * row]);
    }
    out
}

/// The `(width, height)` transformers resizes to, given the input size.
///
/// Shortest edge: `get_resize_output_image_size(default_to_square=False)`, i.e. the short side
/// becomes `s` and the long side `int(s * long / short)` (truncated). With `longest_edge`, the
/// port of `get_size_with_aspect_ratio`. Exact: `(width, height)` as given.
pub fn resize_output_size(width: u32, height: u32, size: &ResizeSize) -> (u32, u32) {
    match *size {
        ResizeSize::Exact { height, width } => (width, height),
        ResizeSize::ShortestEdge {
            shortest_edge,
            longest_edge: None,
        } => {
            let (short, long) = if width <= height {
                (width, height)
            } else {
                (height, width)
            };
            let new_long = (f64::from(shortest_edge) * f64::from(long) / f64::from(short)) as u32;
            if width <= height {
                (shortest_edge, new_long)
            } else {
                (new_long, shortest_edge)
            }
        }
        ResizeSize::ShortestEdge {
            shortest_edge,
            longest_edge: Some(max_size),
        } => {
            let (h, w) = (f64::from(height), f64::from(width));
            let mut size = f64::from(shortest_edge);
            let mut raw_size = None;
            let (min_orig, max_orig) = (h.min(w), h.max(w));
            if max_orig / min_orig * size > f64::from(max_size) {
                let raw = f64::from(max_size) * min_orig / max_orig;
                raw_size = Some(raw);
                size = round_half_even(raw);
            }
            let (oh, ow) = if (h <= w && h == size) || (w <= h && w == size) {
                (h, w)
            } else if w < h {
                (raw_size.unwrap_or(size) * h / w, size)
            } else {
                (size, raw_size.unwrap_or(size) * w / h)
            };
            (ow as u32, oh as u32)
        }
    }
}

/// Python's `round()` (banker's rounding), used by `get_size_with_aspect_ratio`.
fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

/// transformers' `center_crop`: offsets `(size - crop) // 2` (floor), and zero padding, centred
/// with the larger half after, when the image is smaller than the crop.
pub fn center_crop(img: &RgbImage, crop_width: u32, crop_height: u32) -> RgbImage {
    let (w, h) = (i64::from(img.width()), i64::from(img.height()));
    // The padded-canvas offsets of numpy's version cancel out: the source row/column of output
    // (y, x) is simply (y + top, x + left) with the floor-divided offsets, zero when outside.
    let top = (h - i64::from(crop_height)).div_euclid(2);
    let left = (w - i64::from(crop_width)).div_euclid(2);
    RgbImage::from_fn(crop_width, crop_height, |x, y| {
        let (sx, sy) = (i64::from(x) + left, i64::from(y) + top);
        if (0..w).contains(&sx) && (0..h).contains(&sy) {
            *img.get_pixel(sx as u32, sy as u32)
        } else {
            Rgb([0, 0, 0])
        }
    })
}

/// Runs the processor on an RGB image: optional pad-to-square, resize, center crop, rescale,
/// normalise. Identical (to f32 rounding) to transformers' PIL-backend `CLIPImageProcessor`.
pub fn preprocess(
    img: &RgbImage,
    cfg: &PreprocessorConfig,
    aspect: ImageAspectRatio,
) -> Result<PixelValues, ImageError> {
    Ok(to_pixel_values(&resize_and_crop(img, cfg, aspect)?, cfg))
}

/// The geometric half of [`preprocess`]: pad-to-square, resize, center crop, still uint8. This
/// is the image the model actually sees (useful to show, and to test resampling exactly).
pub fn resize_and_crop(
    img: &RgbImage,
    cfg: &PreprocessorConfig,
    aspect: ImageAspectRatio,
) -> Result<RgbImage, ImageError> {
    check_not_empty(img)?;
    // Borrow until a step makes a new image: inputs can be large photos.
    let mut img = match aspect {
        ImageAspectRatio::Pad => Cow::Owned(expand_to_square(img, cfg.pad_color())),
        ImageAspectRatio::Square => Cow::Borrowed(img),
    };
    if cfg.do_resize {
        let (w, h) = resize_output_size(img.width(), img.height(), &cfg.size);
        img = Cow::Owned(resize_pil(&img, w, h, cfg.resample)?);
    }
    if cfg.do_center_crop {
        img = Cow::Owned(center_crop(&img, cfg.crop_size.width, cfg.crop_size.height));
    }
    Ok(img.into_owned())
}

/// A decoded image with no pixels cannot be resized or tiled.
pub(super) fn check_not_empty(img: &RgbImage) -> Result<(), ImageError> {
    if img.width() == 0 || img.height() == 0 {
        return Err(ImageError::EmptySize {
            what: "input image",
            width: img.width(),
            height: img.height(),
        });
    }
    Ok(())
}

/// Rescale then normalise, with numpy's dtypes: `(u8 as f64 * factor) as f32`, then
/// `(x - f32(mean)) / f32(std)` in f32.
fn to_pixel_values(img: &RgbImage, cfg: &PreprocessorConfig) -> PixelValues {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mean = cfg.image_mean.map(|m| m as f32);
    let std = cfg.image_std.map(|s| s as f32);
    let raw = img.as_raw();
    let mut data = vec![0f32; 3 * h * w];
    for (c, plane) in data.chunks_exact_mut(h * w).enumerate() {
        for (i, out) in plane.iter_mut().enumerate() {
            let v = raw[i * 3 + c];
            let mut x = if cfg.do_rescale {
                (f64::from(v) * cfg.rescale_factor) as f32
            } else {
                f32::from(v)
            };
            if cfg.do_normalize {
                x = (x - mean[c]) / std[c];
            }
            *out = x;
        }
    }
    PixelValues {
        data,
        channels: 3,
        height: h,
        width: w,
    }
}

/// A processor config plus LLaVA's aspect mode and load options: what the model/CLI hold.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ImageProcessor {
    pub config: PreprocessorConfig,
    pub aspect: ImageAspectRatio,
    pub load: LoadOptions,
    /// LLaVA-NeXT's `image_grid_pinpoints` (`(height, width)`): when set, [`Self::process`]
    /// tiles the image ([`anyres_tiles`]) and `aspect` is not used.
    pub anyres: Option<Vec<[u32; 2]>>,
}

impl ImageProcessor {
    pub fn new(config: PreprocessorConfig, aspect: ImageAspectRatio) -> Self {
        Self {
            config,
            aspect,
            load: LoadOptions::default(),
            anyres: None,
        }
    }

    /// The image as the model takes it: one tile, or LLaVA-NeXT's tiles with anyres.
    pub fn process(&self, img: &RgbImage) -> Result<ProcessedImage, ImageError> {
        match &self.anyres {
            Some(pinpoints) => anyres_tiles(img, &self.config, pinpoints),
            None => Ok(ProcessedImage {
                tiles: vec![self.preprocess(img)?],
                image_size: (img.height(), img.width()),
            }),
        }
    }

    /// Loads a file and [`Self::process`]es it.
    pub fn process_path(&self, path: impl AsRef<Path>) -> Result<ProcessedImage, ImageError> {
        self.process(&load_image_with(path, &self.load)?)
    }

    /// Decodes bytes and [`Self::process`]es them; `name` labels errors.
    pub fn process_bytes(&self, bytes: &[u8], name: &str) -> Result<ProcessedImage, ImageError> {
        self.process(&super::load::decode_image(bytes, name, &self.load)?)
    }

    /// Preprocesses an already-decoded RGB image.
    pub fn preprocess(&self, img: &RgbImage) -> Result<PixelValues, ImageError> {
        preprocess(img, &self.config, self.aspect)
    }

    /// Loads a file and preprocesses it.
    pub fn preprocess_path(&self, path: impl AsRef<Path>) -> Result<PixelValues, ImageError> {
        let img = load_image_with(path, &self.load)?;
        self.preprocess(&img)
    }

    /// Decodes bytes and preprocesses them; `name` labels errors.
    pub fn preprocess_bytes(&self, bytes: &[u8], name: &str) -> Result<PixelValues, ImageError> {
        let img = super::load::decode_image(bytes, name, &self.load)?;
        self.preprocess(&img)
    }
}
