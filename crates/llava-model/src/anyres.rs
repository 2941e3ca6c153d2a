//! LLaVA-NeXT's image features: the tiles of `llava_data::image::anyres_tiles` put back
//! together ("spatial_unpad", the only merge transformers implements).
//!
//! The first tile (the whole image, squashed) gives its features as LLaVA-1.5 would. The grid
//! tiles' features are laid out as the grid of patches they came from, the rows and columns
//! that only cover the black padding are cut off, and after each remaining row of patches comes
//! the learned `image_newline` vector, so the decoder can tell where a row ends. What reaches
//! the language model per image is: base features, then the grid row by row.

use std::ops::Range;

use candle_core::{D, Tensor};
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
    fn unpadded_in(
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

    /// Packs one image's projected tile features `[tiles, side², hidden]` into its
    /// `[token_count, hidden]` sequence.
    pub fn pack(
        &self,
        features: &Tensor,
        image_size: (u32, u32),
        image_newline: &Tensor,
    ) -> Result<Tensor> {
        let (rows, cols) = self.grid(image_size)?;
        let (tiles, patches, hidden) = features.dims3()?;
        if tiles != 1 + rows * cols || patches != self.side * self.side {
            return Err(ModelError::Input(format!(
                "an image of {}x{} needs 1 + {rows}x{cols} tiles of {} patches, but its features are {tiles} tiles of {patches}",
                image_size.1,
                image_size.0,
                self.side * self.side
            )));
        }
        let base = features.get(0)?;
        let side = self.side;
        // [rows·cols, side², hidden] → [hidden, rows·side, cols·side]: the picture the patches make.
        let grid = features
            .narrow(0, 1, rows * cols)?
            .reshape((rows, cols, side, side, hidden))?
            .permute((4, 0, 2, 1, 3))?
            .contiguous()?
            .reshape((hidden, rows * side, cols * side))?;
        let (keep_rows, keep_cols) = self.unpadded_in((rows, cols), image_size);
        let grid = grid.narrow(1, keep_rows.start, keep_rows.len())?.narrow(
            2,
            keep_cols.start,
            keep_cols.len(),
        )?;
        let newline = image_newline
            .to_dtype(grid.dtype())?
            .reshape((hidden, 1, 1))?
            .broadcast_as((hidden, keep_rows.len(), 1))?;
        let grid = Tensor::cat(&[&grid, &newline], D::Minus1)?
            .flatten_from(1)?
            .t()?;
        Ok(Tensor::cat(&[&base, &grid], 0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The fixture's geometry: 30 px tiles of 6 px patches, llava-hf's pinpoints scaled to 30.
    const PINPOINTS: [[u32; 2]; 5] = [[30, 60], [60, 30], [60, 60], [90, 30], [30, 90]];
    const TOY: AnyRes = AnyRes {
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

    #[test]
    fn pack_puts_a_newline_after_every_kept_row() {
        // Features numbered by position, so where each lands can be read off.
        let (hidden, side) = (2usize, 5usize);
        let tiles = 1 + 2 * 2;
        let data: Vec<f32> = (0..tiles * side * side * hidden)
            .map(|i| i as f32)
            .collect();
        let f = Tensor::from_vec(data, (tiles, side * side, hidden), &Device::Cpu).unwrap();
        let newline = Tensor::new(&[-1f32, -2.0], &Device::Cpu).unwrap();
        let packed = TOY.pack(&f, (48, 64), &newline).unwrap();
        assert_eq!(packed.dims(), &[113, 2]);
        let rows: Vec<Vec<f32>> = packed.to_vec2().unwrap();
        // The base tile comes first, untouched.
        assert_eq!(rows[0], vec![0.0, 1.0]);
        // Kept grid rows are 1..9 of 10; the first kept row starts in tile 1 (top-left), patch
        // row 1, column 0: feature index 25 (tile 1) + 5 (row 1) = 30.
        assert_eq!(rows[25], vec![60.0, 61.0]);
        // Column 5 of that row is tile 2's (top-right) patch row 1, column 0: 50 + 5 = 55.
        assert_eq!(rows[30], vec![110.0, 111.0]);
        assert_eq!(rows[35], vec![-1.0, -2.0], "a newline ends each row");
        assert_eq!(rows[112], vec![-1.0, -2.0]);
    }
}
