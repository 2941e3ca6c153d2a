//! LLaVA-NeXT's grid geometry: which grid of tiles an image of a given size takes, which
//! patch rows and columns of that grid show the image rather than its padding, and so how
//! many prompt positions the image takes. [`crate::model::anyres`] packs the features on it.

use std::ops::Range;

use llava_data::image::select_best_resolution;

use crate::error::{ModelError, Result};

/// The grid geometry of one checkpoint.
#[derive(Debug, Clone, Copy)]
pub struct AnyRes<'a> {
    /// `image_grid_pinpoints`, `(height, width)` in pixels.
    pub pinpoints: &'a [[u32; 2]],
    /// The tower's input side in pixels (`vision_config.image_size`).
    pub tile: usize,
    /// Patches along a tile's side (`image_size / patch_size`).
    pub side: usize,
    /// The original LLaVA-1.6 truncates `original * scale` when it unpads; transformers rounds
    /// it to 7 decimals first, which absorbs float error (36.99999999 is 37 there, 36 here).
    pub truncate: bool,
}

impl AnyRes<'_> {
    /// Tiles of the grid `(rows, columns)` for an image of `(height, width)`.
    pub fn grid(&self, image_size: (u32, u32)) -> Result<(usize, usize)> {
        let [h, w] = select_best_resolution(image_size, self.pinpoints).ok_or_else(|| {
            ModelError::Input("image_grid_pinpoints is empty: no grid to tile images into".into())
        })?;
        Ok((h as usize / self.tile, w as usize / self.tile))
    }

    /// The patch rows and columns of the grid that show the image, not the padding around it
    /// (transformers' `unpad_image`).
    pub fn unpadded(&self, image_size: (u32, u32)) -> Result<(Range<usize>, Range<usize>)> {
        Ok(self.unpadded_in(self.grid(image_size)?, image_size))
    }

    /// [`AnyRes::unpadded`] for the image's grid `(rows, cols)`, already chosen.
    pub(crate) fn unpadded_in(
        &self,
        (rows, cols): (usize, usize),
        image_size: (u32, u32),
    ) -> (Range<usize>, Range<usize>) {
        let (height, width) = (rows * self.side, cols * self.side);
        let (oh, ow) = (f64::from(image_size.0), f64::from(image_size.1));
        // `int(round(x, 7))` in transformers, `int(x)` in the original.
        let trunc7 = |x: f64| match self.truncate {
            true => x as usize,
            false => ((x * 1e7).round() / 1e7) as usize,
        };
        if ow / oh > width as f64 / height as f64 {
            let kept = trunc7(oh * (width as f64 / ow)).min(height);
            let pad = (height - kept) / 2;
            (pad..height - pad, 0..width)
        } else {
            let kept = trunc7(ow * (height as f64 / oh)).min(width);
            let pad = (width - kept) / 2;
            (0..height, pad..width - pad)
        }
    }

    /// How many positions an image of `(height, width)` takes in the prompt: the base tile's
    /// patches, the unpadded grid, and one newline per grid row.
    pub fn token_count(&self, image_size: (u32, u32)) -> Result<usize> {
        let (rows, cols) = self.unpadded(image_size)?;
        Ok(self.side * self.side + rows.len() * (cols.len() + 1))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The fixture's geometry: 30 px tiles of 6 px patches, llava-hf's pinpoints scaled to 30.
    const PINPOINTS: [[u32; 2]; 5] = [[30, 60], [60, 30], [60, 60], [90, 30], [30, 90]];
    pub(crate) const TOY: AnyRes = AnyRes {
        pinpoints: &PINPOINTS,
        tile: 30,
        side: 5,
        truncate: false,
    };

    #[test]
    fn token_counts_are_the_processors() {
        // LlavaNextProcessor's counts for the three fixture images.
        assert_eq!(TOY.token_count((48, 64)).unwrap(), 113);
        assert_eq!(TOY.token_count((60, 40)).unwrap(), 95);
        assert_eq!(TOY.token_count((28, 96)).unwrap(), 105);
        // llava-v1.6 at 336 px: a 640x480 photo takes 2340 positions in transformers.
        let real = AnyRes {
            pinpoints: &[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
            tile: 336,
            side: 24,
            truncate: false,
        };
        assert_eq!(real.token_count((480, 640)).unwrap(), 2340);
        // 110x352 on the 1x2 grid: 110 * (48 / 352) is 14.999999999999998 in f64. transformers
        // rounds it to 15 and keeps 16 of the 24 patch rows (4 cut on each side); the original
        // LLaVA-1.6 truncates it to 14 and keeps 14.
        assert_eq!(real.token_count((110, 352)).unwrap(), 1360);
        let original = AnyRes {
            truncate: true,
            ..real
        };
        assert_eq!(original.token_count((110, 352)).unwrap(), 1262);
    }
}
