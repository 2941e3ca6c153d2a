//! CLIP image preprocessing, matching PIL + transformers' slow `CLIPImageProcessor` bit for bit.
//!
//! The pipeline is the one a transformers user gets, step by step:
//!
//! 1. [`load_image`] / [`decode_image`]: decode (png, jpeg, gif, webp, bmp), apply the EXIF
//!    orientation (`ImageOps.exif_transpose`), convert to RGB as PIL's `convert("RGB")` does.
//! 2. [`ImageAspectRatio::Pad`]: LLaVA-1.5's `expand2square` with the mean colour.
//! 3. [`preprocess`]: resize the shortest edge with PIL's convolution resampling (bicubic,
//!    antialiased; a line-by-line port of Pillow's fixed-point `Resample.c`), center crop with
//!    transformers' offsets and zero padding, rescale 1/255 and normalise in f32.
//!
//! The result is plain CHW `f32` data ([`PixelValues`]); `llava-model` turns it into a tensor.
//! Parity is checked against tensors recorded from transformers by `tools/make_image_fixtures.py`.

mod anyres;
mod config;
mod load;
mod process;
mod resample;

use std::path::PathBuf;

pub use ::image::RgbImage;
pub use anyres::{ProcessedImage, anyres_tiles, patch_output_size, select_best_resolution};
pub use config::{CropSize, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PreprocessorConfig, ResizeSize};
pub use load::{AlphaMode, LoadOptions, decode_image, load_image, load_image_with};
pub use process::{
    ImageAspectRatio, ImageProcessor, PixelValues, center_crop, expand_to_square, preprocess,
    resize_and_crop, resize_output_size,
};
pub use resample::{ResampleFilter, resize_pil};

/// PIL raises `DecompressionBombError` above twice its `MAX_IMAGE_PIXELS` (89,478,485).
pub const MAX_PIXELS: u64 = 2 * 89_478_485;

/// Everything that can go wrong between a file (or bytes) and pixel values.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The image file could not be read.
    #[error("cannot read image file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not in a format we can decode (or not an image at all).
    #[error("{name}: not a recognised image format (expected png, jpeg, gif, webp or bmp)")]
    UnknownFormat { name: String },
    /// The decoder rejected the data (truncated, corrupt, unsupported variant, too large).
    #[error("cannot decode image {name}: {source}")]
    Decode {
        name: String,
        #[source]
        source: ::image::ImageError,
    },
    /// More pixels than PIL decodes (its decompression-bomb limit, which transformers inherits).
    #[error(
        "image {name} is {width}x{height} pixels, more than the {MAX_PIXELS} that PIL opens (a decompression bomb?)"
    )]
    TooLarge {
        name: String,
        width: u32,
        height: u32,
    },
    /// A zero-sized image or a zero-sized target cannot be resampled.
    #[error("{what}: empty size {width}x{height}")]
    EmptySize {
        what: &'static str,
        width: u32,
        height: u32,
    },
    /// `preprocessor_config.json` could not be read.
    #[error("cannot read preprocessor config {path}: {source}")]
    ConfigIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `preprocessor_config.json` is not valid JSON or a field has the wrong shape.
    #[error("invalid preprocessor config {path}: {source}")]
    ConfigParse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    /// A field parsed but holds a value we cannot honour.
    #[error("invalid preprocessor config {path}: field `{field}`: {reason}")]
    ConfigInvalid {
        path: String,
        field: &'static str,
        reason: String,
    },
    /// `image_aspect_ratio` names a mode we do not implement. LLaVA-1.6's `anyres` is not a
    /// mode of this processor: checkpoints that ask for it tile through [`ImageProcessor::anyres`].
    #[error(
        "unsupported image_aspect_ratio {0:?} (supported: \"square\", \"pad\"; LLaVA-1.6's anyres tiling comes with its checkpoint's config)"
    )]
    UnsupportedAspectRatio(String),
}
