//! LLaVA-NeXT's image features: the tiles of `llava_data::image::anyres_tiles` put back
//! together ("spatial_unpad", the only merge transformers implements).
//!
//! The first tile (the whole image, squashed) gives its features as LLaVA-1.5 would. The grid
//! tiles' features are laid out as the grid of patches they came from, the rows and columns
//! that only cover the black padding are cut off ([`AnyRes`]'s geometry), and after each
//! remaining row of patches comes the learned `image_newline` vector, so the decoder can tell
//! where a row ends. What reaches the language model per image is: base features, then the grid
//! row by row.

use candle_core::{D, Tensor};

use crate::config::anyres::AnyRes;
use crate::error::{ModelError, Result};

/// Packs one image's projected tile features `[tiles, side², hidden]` into its
/// `[token_count, hidden]` sequence on the checkpoint's grid.
pub fn pack(
    anyres: &AnyRes,
    features: &Tensor,
    image_size: (u32, u32),
    image_newline: &Tensor,
) -> Result<Tensor> {
    let (rows, cols) = anyres.grid(image_size)?;
    let (tiles, patches, hidden) = features.dims3()?;
    if tiles != 1 + rows * cols || patches != anyres.side * anyres.side {
        return Err(ModelError::Input(format!(
            "an image of {}x{} needs 1 + {rows}x{cols} tiles of {} patches, but its features are {tiles} tiles of {patches}",
            image_size.1,
            image_size.0,
            anyres.side * anyres.side
        )));
    }
    let base = features.get(0)?;
    let side = anyres.side;
    // [rows·cols, side², hidden] → [hidden, rows·side, cols·side]: the picture the patches make.
    let grid = features
        .narrow(0, 1, rows * cols)?
        .reshape((rows, cols, side, side, hidden))?
        .permute((4, 0, 2, 1, 3))?
        .contiguous()?
        .reshape((hidden, rows * side, cols * side))?;
    let (keep_rows, keep_cols) = anyres.unpadded_in((rows, cols), image_size);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::anyres::tests::TOY;
    use candle_core::Device;

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
        let packed = pack(&TOY, &f, (48, 64), &newline).unwrap();
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
