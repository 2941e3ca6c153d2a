//! Decoding to RGB the way `transformers.image_utils.load_image` does it with PIL:
//! `Image.open` → `ImageOps.exif_transpose` → `convert("RGB")`.

use std::io::Cursor;
use std::path::Path;

use ::image::{DynamicImage, ImageDecoder, ImageReader, Rgb, RgbImage};

use super::ImageError;

/// What to do with transparency when going to RGB. The two differ only for images with alpha.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AlphaMode {
    /// PIL's `convert("RGB")`: drop alpha, keep the colour underneath. What transformers'
    /// `load_image` (and so its pipelines) and the original LLaVA code (`.convert('RGB')`) do.
    #[default]
    Drop,
    /// Composite onto white with PIL's `alpha_composite` arithmetic. What transformers'
    /// `CLIPImageProcessor` itself does when handed a PIL image that still has alpha.
    CompositeOnWhite,
}

/// How to turn a file into RGB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Apply the EXIF orientation tag (JPEG, PNG eXIf, WebP), as `ImageOps.exif_transpose`.
    /// The original LLaVA code does not (it calls `Image.open(...).convert('RGB')`).
    pub apply_exif_orientation: bool,
    pub alpha: AlphaMode,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            apply_exif_orientation: true,
            alpha: AlphaMode::Drop,
        }
    }
}

/// Loads an image file as RGB with the default [`LoadOptions`] (transformers' `load_image`).
pub fn load_image(path: impl AsRef<Path>) -> Result<RgbImage, ImageError> {
    load_image_with(path, &LoadOptions::default())
}

/// Loads an image file as RGB.
pub fn load_image_with(path: impl AsRef<Path>, opts: &LoadOptions) -> Result<RgbImage, ImageError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode_image(&bytes, &path.display().to_string(), opts)
}

/// Decodes an in-memory image (png, jpeg, gif (first frame), webp, bmp) to RGB. `name` labels
/// errors: a path, a URL, or e.g. "request body".
pub fn decode_image(bytes: &[u8], name: &str, opts: &LoadOptions) -> Result<RgbImage, ImageError> {
    let decode_err = |source| ImageError::Decode {
        name: name.to_string(),
        source,
    };
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| decode_err(::image::ImageError::IoError(e)))?;
    if reader.format().is_none() {
        return Err(ImageError::UnknownFormat {
            name: name.to_string(),
        });
    }
    let mut decoder = reader.into_decoder().map_err(decode_err)?;
    // Checked from the header, before a tiny compressed file can ask for gigabytes.
    let (width, height) = decoder.dimensions();
    if u64::from(width) * u64::from(height) > super::MAX_PIXELS {
        return Err(ImageError::TooLarge {
            name: name.to_string(),
            width,
            height,
        });
    }
    // A broken EXIF block should not make a decodable image unreadable: treat it as upright.
    let orientation = if opts.apply_exif_orientation {
        decoder
            .orientation()
            .unwrap_or(::image::metadata::Orientation::NoTransforms)
    } else {
        ::image::metadata::Orientation::NoTransforms
    };
    let mut img = DynamicImage::from_decoder(decoder).map_err(decode_err)?;
    if img.width() == 0 || img.height() == 0 {
        return Err(ImageError::EmptySize {
            what: "decoded image",
            width: img.width(),
            height: img.height(),
        });
    }
    img.apply_orientation(orientation);
    Ok(to_rgb_like_pil(img, opts.alpha))
}

/// PIL's `convert("RGB")` (or transformers' composite onto white) for each decoded layout.
///
/// - 8-bit grey, grey+alpha: replicate L (alpha dropped or composited).
/// - Palette PNG/GIF: the decoders expand palettes (and tRNS) to RGB(A) already, as PIL's lookup.
/// - 16-bit RGB(A) and grey+alpha PNG: PIL unpacks these to 8 bits by keeping the high byte.
/// - 16-bit grey PNG: PIL opens it as mode `I;16`, whose RGB conversion clips to 255 (values
///   above 255 become white). Surprising, but it is what the reference does.
fn to_rgb_like_pil(img: DynamicImage, alpha: AlphaMode) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let from_rgba = |px: [u8; 4]| -> Rgb<u8> {
        match alpha {
            AlphaMode::Drop => Rgb([px[0], px[1], px[2]]),
            AlphaMode::CompositeOnWhite => Rgb(composite_on_white(px)),
        }
    };
    match img {
        DynamicImage::ImageRgb8(rgb) => rgb,
        DynamicImage::ImageRgba8(rgba) => {
            RgbImage::from_fn(w, h, |x, y| from_rgba(rgba.get_pixel(x, y).0))
        }
        DynamicImage::ImageLuma8(l) => {
            RgbImage::from_fn(w, h, |x, y| Rgb([l.get_pixel(x, y).0[0]; 3]))
        }
        DynamicImage::ImageLumaA8(la) => RgbImage::from_fn(w, h, |x, y| {
            let [l, a] = la.get_pixel(x, y).0;
            from_rgba([l, l, l, a])
        }),
        DynamicImage::ImageLuma16(l) => {
            RgbImage::from_fn(w, h, |x, y| Rgb([l.get_pixel(x, y).0[0].min(255) as u8; 3]))
        }
        DynamicImage::ImageLumaA16(la) => RgbImage::from_fn(w, h, |x, y| {
            let [l, a] = la.get_pixel(x, y).0.map(|v| (v >> 8) as u8);
            from_rgba([l, l, l, a])
        }),
        DynamicImage::ImageRgb16(rgb) => RgbImage::from_fn(w, h, |x, y| {
            Rgb(rgb.get_pixel(x, y).0.map(|v| (v >> 8) as u8))
        }),
        DynamicImage::ImageRgba16(rgba) => RgbImage::from_fn(w, h, |x, y| {
            from_rgba(rgba.get_pixel(x, y).0.map(|v| (v >> 8) as u8))
        }),
        // Float images do not come out of the formats we enable; keep a sane fallback.
        other => other.to_rgb8(),
    }
}

/// Pillow's `ImagingAlphaComposite` (7-bit extra precision) of `src` over opaque white.
fn composite_on_white(src: [u8; 4]) -> [u8; 3] {
    const PREC: u32 = 7;
    let [r, g, b, a] = src.map(u32::from);
    if a == 0 {
        return [255; 3];
    }
    let dst_a = 255u32;
    let blend = dst_a * (255 - a);
    let outa255 = a * 255 + blend;
    let coef1 = a * 255 * 255 * (1 << PREC) / outa255;
    let coef2 = 255 * (1 << PREC) - coef1;
    let shift_div255 = |v: u32| ((v >> 8) + v) >> 8;
    [r, g, b].map(|c| {
        let tmp = c * coef1 + 255 * coef2;
        (shift_div255(tmp + (0x80 << PREC)) >> PREC) as u8
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composite_extremes() {
        assert_eq!(composite_on_white([10, 20, 30, 255]), [10, 20, 30]);
        assert_eq!(composite_on_white([10, 20, 30, 0]), [255, 255, 255]);
        // Half-transparent black over white is mid grey.
        assert_eq!(composite_on_white([0, 0, 0, 128]), [127, 127, 127]);
    }

    /// A PNG whose header claims 20000×20000 pixels (with almost no pixel data): refused from the
    /// header, before anything is allocated for it.
    #[test]
    fn a_decompression_bomb_is_refused_from_its_header() {
        let chunk = |kind: &[u8], data: &[u8]| {
            let mut out = (data.len() as u32).to_be_bytes().to_vec();
            let body = [kind, data].concat();
            out.extend(&body);
            out.extend(crc32fast::hash(&body).to_be_bytes());
            out
        };
        let side = 20_000u32;
        let ihdr = [
            &side.to_be_bytes()[..],
            &side.to_be_bytes(),
            &[8, 2, 0, 0, 0],
        ]
        .concat();
        let png = [
            &b"\x89PNG\r\n\x1a\n"[..],
            &chunk(b"IHDR", &ihdr),
            // An empty zlib stream: the decoder opens once it sees image data.
            &chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]),
            &chunk(b"IEND", &[]),
        ]
        .concat();
        let e = decode_image(&png, "bomb.png", &LoadOptions::default()).expect_err("too large");
        assert!(matches!(e, ImageError::TooLarge { .. }), "{e}");
        assert!(e.to_string().contains("20000x20000"), "{e}");
    }
}
