//! The images of one prompt, preprocessed, as the model takes them.
//!
//! LLaVA-1.5 turns every image into one tower-sized tile. LLaVA-NeXT turns each into several,
//! as many as its size asks for, and needs that size again to unpad their features, so the
//! images travel as one tensor of tiles per image together with their original sizes.

use candle_core::{Device, Tensor};
use llava_data::image::{PixelValues, ProcessedImage};

use crate::error::{ModelError, Result};

#[derive(Debug, Clone)]
pub struct ImageInputs {
    /// Each image's tiles, `[tiles, 3, H, W]`, in prompt order.
    pub pixel_values: Vec<Tensor>,
    /// Each image's `(height, width)` before preprocessing.
    pub image_sizes: Vec<(u32, u32)>,
}

impl ImageInputs {
    /// Stacks each image's tiles into a tensor on `device`.
    pub fn new(images: &[ProcessedImage], device: &Device) -> Result<Self> {
        let pixel_values = images
            .iter()
            .map(|image| pixel_tensor(&image.tiles, device))
            .collect::<Result<_>>()?;
        Ok(Self {
            pixel_values,
            image_sizes: images.iter().map(|image| image.image_size).collect(),
        })
    }

    /// LLaVA-1.5 pixel values `[n, 3, H, W]` as `n` one-tile images.
    pub fn from_tensor(pixel_values: &Tensor) -> Result<Self> {
        let (n, _, h, w) = pixel_values.dims4()?;
        Ok(Self {
            pixel_values: (0..n)
                .map(|i| pixel_values.narrow(0, i, 1))
                .collect::<candle_core::Result<_>>()?,
            image_sizes: vec![(h as u32, w as u32); n],
        })
    }

    pub fn len(&self) -> usize {
        self.pixel_values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pixel_values.is_empty()
    }

    /// The images after the first `n`.
    pub fn skip(&self, n: usize) -> Self {
        Self {
            pixel_values: self.pixel_values.iter().skip(n).cloned().collect(),
            image_sizes: self.image_sizes.iter().skip(n).copied().collect(),
        }
    }

    /// Every image's tiles in one `[tiles, 3, H, W]` batch for the vision tower.
    pub fn all_tiles(&self) -> Result<Tensor> {
        Ok(Tensor::cat(&self.pixel_values, 0)?)
    }
}

/// Stacks preprocessed images (or one image's tiles) into `[n, c, h, w]`.
pub fn pixel_tensor(pixels: &[PixelValues], device: &Device) -> Result<Tensor> {
    let first = pixels
        .first()
        .ok_or_else(|| ModelError::Input("no images".into()))?;
    let [c, h, w] = first.shape();
    let mut data = Vec::with_capacity(pixels.len() * c * h * w);
    for p in pixels {
        if p.shape() != [c, h, w] {
            return Err(ModelError::Input(
                "images preprocessed to different sizes".into(),
            ));
        }
        data.extend_from_slice(&p.data);
    }
    Ok(Tensor::from_vec(data, (pixels.len(), c, h, w), device)?)
}
