//! A port of Pillow's convolution resampling (`libImaging/Resample.c`) for 8-bit RGB.
//!
//! Why our own: CLIP checkpoints were trained on PIL-resized pixels, and transformers' slow
//! processor resizes with PIL. Pillow computes the filter weights in f64, quantises them to
//! 22-bit fixed point, and runs a horizontal and a vertical pass through a clipped uint8 buffer,
//! in the order Pillow 13 picks.
//! Reproducing those exact steps makes the output identical to the last uint8; generic resizers
//! (fast_image_resize included) round differently and land within ±1 level (see the tests).

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::ImageError;

/// Pillow's `PRECISION_BITS` for 8-bit images: 32 - 8 - 2.
const PRECISION_BITS: u32 = 22;

/// PIL's resampling filters, with their PIL integer codes (the `resample` config field).
/// NEAREST (0) is not a convolution in Pillow and is not implemented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResampleFilter {
    /// 1
    Lanczos,
    /// 2
    Bilinear,
    /// 3: Catmull-Rom cubic (a = -0.5). CLIP's filter.
    #[default]
    Bicubic,
    /// 4
    Box,
    /// 5
    Hamming,
}

impl ResampleFilter {
    /// The PIL code (`PIL.Image.Resampling`).
    pub fn pil_code(self) -> u32 {
        match self {
            Self::Lanczos => 1,
            Self::Bilinear => 2,
            Self::Bicubic => 3,
            Self::Box => 4,
            Self::Hamming => 5,
        }
    }

    /// From a PIL code; `None` for NEAREST (0) and unknown codes.
    pub fn from_pil_code(code: u32) -> Option<Self> {
        Some(match code {
            1 => Self::Lanczos,
            2 => Self::Bilinear,
            3 => Self::Bicubic,
            4 => Self::Box,
            5 => Self::Hamming,
            _ => return None,
        })
    }

    fn support(self) -> f64 {
        match self {
            Self::Box => 0.5,
            Self::Bilinear | Self::Hamming => 1.0,
            Self::Bicubic => 2.0,
            Self::Lanczos => 3.0,
        }
    }

    /// The filter functions of Resample.c, operation for operation.
    fn eval(self, x: f64) -> f64 {
        match self {
            Self::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Self::Bilinear => {
                let x = x.abs();
                if x < 1.0 { 1.0 - x } else { 0.0 }
            }
            Self::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * std::f64::consts::PI;
                    x.sin() / x * (0.54 + 0.46 * x.cos())
                }
            }
            Self::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Self::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

impl Serialize for ResampleFilter {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(self.pil_code())
    }
}

impl<'de> Deserialize<'de> for ResampleFilter {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let code = Option::<u32>::deserialize(d).map_err(|e| {
            D::Error::custom(format!("`resample`: expected a PIL filter code ({e})"))
        })?;
        match code {
            None => Ok(Self::default()),
            Some(c) => Self::from_pil_code(c).ok_or_else(|| {
                D::Error::custom(format!(
                    "`resample`: PIL filter {c} is not supported (1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming)"
                ))
            }),
        }
    }
}

/// Per output pixel: first input index, tap count, and `ksize` fixed-point weights.
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

/// `precompute_coeffs` + `normalize_coeffs_8bpc` for the box `[0, in_size)`.
fn precompute_coeffs(in_size: usize, out_size: usize, filter: ResampleFilter) -> Coeffs {
    let (in0, in1) = (0.0f64, in_size as f64);
    let scale = (in1 - in0) / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = in0 + (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) truncates toward zero; negatives are clamped to 0 right after.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut ww = 0.0f64;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = filter.eval((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        let out = &mut weights[xx * ksize..(xx + 1) * ksize];
        for x in 0..n {
            let v = if ww != 0.0 { k[x] / ww } else { k[x] };
            let scaled = v * f64::from(1u32 << PRECISION_BITS);
            out[x] = if v < 0.0 {
                (-0.5 + scaled) as i32
            } else {
                (0.5 + scaled) as i32
            };
        }
        bounds.push((xmin, n));
    }
    Coeffs {
        ksize,
        bounds,
        weights,
    }
}

#[inline]
fn clip8(ss: i32) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes interleaved RGB exactly as `PIL.Image.resize((width, height), filter)` on an RGB image.
///
/// Sums wrap like Pillow's C `int` arithmetic instead of panicking; with these filters they
/// stay far from the i32 range for any uint8 input.
pub fn resize_pil(
    src: &::image::RgbImage,
    width: u32,
    height: u32,
    filter: ResampleFilter,
) -> Result<::image::RgbImage, ImageError> {
    let (in_w, in_h) = src.dimensions();
    if in_w == 0 || in_h == 0 {
        return Err(ImageError::EmptySize {
            what: "resize input",
            width: in_w,
            height: in_h,
        });
    }
    if width == 0 || height == 0 {
        return Err(ImageError::EmptySize {
            what: "resize target",
            width,
            height,
        });
    }
    // PIL returns a copy when the size does not change.
    if (in_w, in_h) == (width, height) {
        return Ok(src.clone());
    }
    let (in_w, in_h, out_w, out_h) = (
        in_w as usize,
        in_h as usize,
        width as usize,
        height as usize,
    );
    let horiz = precompute_coeffs(in_w, out_w, filter);
    let vert = precompute_coeffs(in_h, out_h, filter);
    let src = src.as_raw();
    // Pillow 13 runs the vertical pass first when the height shrinks by more than twice as
    // many pixels as the width does (ImagingResampleInner's `horizontal_first`). The order
    // changes the intermediate uint8 rounding, so it is followed exactly.
    let horizontal_first =
        !(in_h > out_h && (in_h - out_h) as i64 > (in_w as i64 - out_w as i64) * 2);
    let data = if horizontal_first {
        if out_w == in_w {
            vertical(src, in_w, 0, &vert, out_h)
        } else {
            // Only over the rows the vertical pass reads.
            let first = vert.bounds[0].0;
            let (last_min, last_n) = vert.bounds[out_h - 1];
            let tmp = horizontal(src, in_w, first..last_min + last_n, &horiz, out_w);
            if out_h == in_h {
                tmp
            } else {
                vertical(&tmp, out_w, first, &vert, out_h)
            }
        }
    } else {
        let tmp = vertical(src, in_w, 0, &vert, out_h);
        if out_w == in_w {
            tmp
        } else {
            horizontal(&tmp, in_w, 0..out_h, &horiz, out_w)
        }
    };
    Ok(::image::RgbImage::from_raw(width, height, data)
        .expect("passes produce width*height*3 bytes"))
}

/// Pillow's `ResampleHorizontal_8bpc` over rows `rows` of an `in_w`-wide RGB buffer.
fn horizontal(
    src: &[u8],
    in_w: usize,
    rows: std::ops::Range<usize>,
    c: &Coeffs,
    out_w: usize,
) -> Vec<u8> {
    let mut out = vec![0u8; rows.len() * out_w * 3];
    for (yy, out_row) in out.chunks_exact_mut(out_w * 3).enumerate() {
        let row = &src[(yy + rows.start) * in_w * 3..][..in_w * 3];
        for (xx, px) in out_row.chunks_exact_mut(3).enumerate() {
            let (xmin, n) = c.bounds[xx];
            let k = &c.weights[xx * c.ksize..][..n];
            let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
            for (x, &kx) in k.iter().enumerate() {
                let p = &row[(xmin + x) * 3..][..3];
                ss[0] = ss[0].wrapping_add(i32::from(p[0]).wrapping_mul(kx));
                ss[1] = ss[1].wrapping_add(i32::from(p[1]).wrapping_mul(kx));
                ss[2] = ss[2].wrapping_add(i32::from(p[2]).wrapping_mul(kx));
            }
            px.copy_from_slice(&ss.map(clip8));
        }
    }
    out
}

/// Pillow's `ResampleVertical_8bpc` of a `width`-wide RGB buffer whose first row is source row
/// `offset` (the rows a horizontal pass skipped).
fn vertical(src: &[u8], width: usize, offset: usize, c: &Coeffs, out_h: usize) -> Vec<u8> {
    let row_len = width * 3;
    let mut out = vec![0u8; out_h * row_len];
    for (yy, out_row) in out.chunks_exact_mut(row_len).enumerate() {
        let (ymin, n) = c.bounds[yy];
        let ymin = ymin - offset;
        let k = &c.weights[yy * c.ksize..][..n];
        for (i, o) in out_row.iter_mut().enumerate() {
            let mut ss = 1i32 << (PRECISION_BITS - 1);
            for (y, &ky) in k.iter().enumerate() {
                ss = ss.wrapping_add(i32::from(src[(ymin + y) * row_len + i]).wrapping_mul(ky));
            }
            *o = clip8(ss);
        }
    }
    out
}
