//! The layout f32 linear weights of the vision tower and projector take for CPU inference:
//! `Wᵀ`, stored row-major.
//!
//! Checkpoints store a linear weight as `W: [out, in]`, and `x·Wᵀ` hands candle's CPU matmul (the
//! `gemm` crate) a transposed view of it, which gemm repacks on every call. From a contiguous
//! `Wᵀ` the same product runs up to 1.5× faster in the vision tower's shapes (BENCHMARKS.md).
//! So the layers that only ever multiply many rows at once (`Linear::load_for_rows`: the
//! vision tower's patches, the projector's features) are transposed once, as they are read from
//! the checkpoint, and kept as an `[out, in]` view of that storage: every shape stays as in the
//! checkpoint, and `w.t()` is the contiguous `Wᵀ` gemm wants.
//!
//! The decoder keeps the stored layout: decoding multiplies one row at a time, and the GEMV
//! ([`crate::kernels::gemv`]) streams the rows of `W` as stored faster than a kernel over `Wᵀ` did.
//! Trainable weights keep it too, since the optimizer updates them and the checkpoint writer
//! saves them.
//!
//! The transposition happens block by block as the file is read (`from_row_blocks`), so no
//! full-size copy in the stored order is ever made, and for an f16 or bf16 checkpoint it is the
//! same single pass that widens the values to f32.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::error::Result;
use crate::kernels::fused::DisjointWrites;
use crate::kernels::gemv::Widen;

/// Rows of `W` read per block: enough to keep the scattered writes a few cache lines long
/// (64 floats) per row of `Wᵀ`, few enough that the block stays in L2.
const ROWS_PER_BLOCK: usize = 64;
/// Values per row that a block's scatter widens and transposes at a time.
const TILE: usize = 16;

/// Whether weights computed in `dtype` on `device` take the transposed layout for inference.
/// f32 on the CPU, and bf16 on a CPU without bf16 products (neither AMX nor AVX512-BF16): there
/// nothing multiplies bf16 many rows at a time, and widening these layers' weights once at load
/// (0.6 GB more for CLIP ViT-L) beat widening them on every call (BENCHMARKS.md). With them,
/// bf16 runs in [`crate::kernels::bf16_linear`], which reads `W` as stored; GPU BLAS takes
/// either layout at full speed.
/// `LLAVA_NO_GEMM_LAYOUT=1` keeps the stored layout, to compare the two.
pub fn applies(dtype: DType, device: &Device) -> bool {
    let widened = match dtype {
        DType::F32 => true,
        DType::BF16 => !crate::kernels::bf16_linear::available(),
        _ => false,
    };
    widened && device.is_cpu() && std::env::var_os("LLAVA_NO_GEMM_LAYOUT").is_none()
}

/// A contiguous bf16 or f16 CPU weight `w: [n, k]` widened to f32 in this layout, in parallel:
/// for products over many rows whose weights stay narrow in memory (the decoder's, which the
/// GEMV reads narrow when decoding) on a CPU with no kernel that multiplies them narrow.
/// Widening and product together beat candle's `to_dtype` into the stored layout by about 11%
/// for a gate/up weight (BENCHMARKS.md). `None` for any other tensor.
pub fn widened(w: &Tensor) -> Result<Option<Tensor>> {
    fn from<T: Widen + Default + candle_core::WithDType>(w: &Tensor) -> Result<Tensor> {
        let (n, k) = w.dims2()?;
        let (storage, layout) = w.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            return Err(crate::error::ModelError::Input(
                "gemm_layout::widened takes CPU tensors".into(),
            ));
        };
        let values = crate::kernels::fused::contiguous(cpu.as_slice::<T>()?, layout, "widen")?;
        // The rows are copied into the block before the scatter although they are in memory
        // already: scattering straight from `values` measured 5-10% slower (25.6 / 28.0 ms
        // against 23.8 / 25.1 ms for a 5632×2048 weight), the copy bringing the block into cache.
        from_row_blocks(n, k, |j0, block: &mut [T]| {
            block.copy_from_slice(&values[j0 * k..j0 * k + block.len()]);
            Ok(())
        })
    }
    if w.rank() != 2 || !w.is_contiguous() || !w.device().is_cpu() {
        return Ok(None);
    }
    Ok(match w.dtype() {
        DType::BF16 => Some(from::<half::bf16>(w)?),
        DType::F16 => Some(from::<half::f16>(w)?),
        _ => None,
    })
}

/// `W: [n, k]` as `Wᵀ` in f32, read `ROWS_PER_BLOCK` rows at a time by `read(first_row, block)`
/// (the block holds whole rows, `k` values each) and scattered into place, widened to f32.
/// Blocks are read and scattered in parallel. Returns a `[n, k]` view of the `[k, n]` storage.
pub(crate) fn from_row_blocks<T: Widen + Default>(
    n: usize,
    k: usize,
    read: impl Fn(usize, &mut [T]) -> Result<()> + Sync,
) -> Result<Tensor> {
    let mut wt = vec![0f32; k * n];
    let out = DisjointWrites::new(wt.as_mut_ptr());
    // Each thread takes a contiguous run of blocks, with one block buffer for all of them.
    let blocks = n.div_ceil(ROWS_PER_BLOCK);
    let per_thread = blocks.div_ceil(rayon::current_num_threads().max(1));
    (0..blocks)
        .into_par_iter()
        .step_by(per_thread.max(1))
        .try_for_each(|first| {
            let mut block = vec![T::default(); ROWS_PER_BLOCK * k];
            let mut tile = [[0f32; ROWS_PER_BLOCK]; TILE];
            for b in first..(first + per_thread).min(blocks) {
                let j0 = b * ROWS_PER_BLOCK;
                let rows = (n - j0).min(ROWS_PER_BLOCK);
                let block = &mut block[..rows * k];
                read(j0, block)?;
                // TILE values from each row, widened, then written out as TILE rows of `Wᵀ`.
                for l0 in (0..k).step_by(TILE) {
                    let width = (k - l0).min(TILE);
                    for (j, v) in block.chunks_exact(k).enumerate() {
                        for (t, x) in v[l0..l0 + width].iter().enumerate() {
                            tile[t][j] = x.widen();
                        }
                    }
                    for (t, values) in tile.iter().enumerate().take(width) {
                        // SAFETY: row `l0 + t < k` of `Wᵀ`, columns `j0..j0 + rows ≤ n`: inside
                        // `wt`, which outlives the loop. Each block writes only its own
                        // columns, so no two threads write the same element.
                        let dst = out.at((l0 + t) * n + j0);
                        if rows == ROWS_PER_BLOCK {
                            // A fixed-size copy, which compiles to vector moves.
                            unsafe { dst.cast::<[f32; ROWS_PER_BLOCK]>().write_unaligned(*values) };
                        } else {
                            unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), dst, rows) };
                        }
                    }
                }
            }
            Ok::<(), crate::error::ModelError>(())
        })?;
    Ok(Tensor::from_vec(wt, (k, n), &Device::Cpu)?.t()?)
}

/// An F32 or F16 value of the file, widened through bf16 (round to nearest even, as candle's
/// `to_dtype` rounds): what the weight is when a bf16 compute dtype loads it.
#[derive(Debug, Clone, Copy, Default)]
#[repr(transparent)]
pub(crate) struct ViaBf16<T>(T);

// SAFETY: a transparent wrapper of a Pod value is itself plain old data.
unsafe impl bytemuck::Zeroable for ViaBf16<f32> {}
unsafe impl bytemuck::Pod for ViaBf16<f32> {}
unsafe impl bytemuck::Zeroable for ViaBf16<half::f16> {}
unsafe impl bytemuck::Pod for ViaBf16<half::f16> {}

impl<T: Widen> Widen for ViaBf16<T> {
    #[inline(always)]
    fn widen(self) -> f32 {
        half::bf16::from_f32(self.0.widen()).to_f32()
    }
}

/// Whether `w` is stored as `from_row_blocks` leaves it (`w.t()` contiguous, `w` itself not).
pub fn is_transposed(w: &Tensor) -> bool {
    w.rank() == 2 && !w.is_contiguous() && w.t().is_ok_and(|t| t.is_contiguous())
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    #[test]
    fn transposes_block_by_block_and_keeps_values_and_shape() {
        // Ragged against the block and the task size, with a bf16 source widened on the way.
        let (n, k) = (ROWS_PER_BLOCK * 2 + 5, 71);
        let w: Vec<f32> = (0..n * k).map(|i| (i % 251) as f32 - 125.0).collect();
        let stored: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let reads = std::sync::Mutex::new(Vec::new());
        let t = from_row_blocks(n, k, |j0, block: &mut [bf16]| {
            reads.lock().expect("lock").push(j0);
            block.copy_from_slice(&stored[j0 * k..j0 * k + block.len()]);
            Ok(())
        })
        .expect("transposed");
        let mut reads = reads.into_inner().expect("lock");
        reads.sort();
        assert_eq!(reads, vec![0, ROWS_PER_BLOCK, 2 * ROWS_PER_BLOCK]);
        assert_eq!(t.dims(), &[n, k]);
        assert!(is_transposed(&t));
        let expected = Tensor::from_vec(w, (n, k), &Device::Cpu).expect("w");
        assert!(!is_transposed(&expected));
        assert_eq!(
            t.to_vec2::<f32>().expect("t"),
            expected.to_vec2::<f32>().expect("w")
        );
    }

    #[test]
    fn widens_a_narrow_weight_into_the_layout() {
        let (n, k) = (ROWS_PER_BLOCK + 3, 40);
        let w: Vec<f32> = (0..n * k).map(|i| (i % 97) as f32 - 48.0).collect();
        let w = Tensor::from_vec(w, (n, k), &Device::Cpu).expect("w");
        for dtype in [DType::BF16, DType::F16] {
            let narrow = w.to_dtype(dtype).expect("narrow");
            let wide = widened(&narrow).expect("widened").expect("applies");
            assert!(is_transposed(&wide));
            assert_eq!(
                wide.to_vec2::<f32>().expect("wide"),
                w.to_vec2::<f32>().expect("w")
            );
        }
        assert!(widened(&w).expect("f32").is_none());
        let strided = w.to_dtype(DType::BF16).and_then(|w| w.t()).expect("t");
        assert!(widened(&strided).expect("strided").is_none());
    }

    #[test]
    fn a_read_error_stops_the_load() {
        let r = from_row_blocks(10, 4, |_, _: &mut [f32]| {
            Err(crate::error::ModelError::Input("truncated".into()))
        });
        assert!(r.is_err_and(|e| e.to_string().contains("truncated")));
    }

    #[test]
    fn f32_on_the_cpu_and_bf16_without_bf16_products() {
        assert!(applies(DType::F32, &Device::Cpu));
        assert_eq!(
            applies(DType::BF16, &Device::Cpu),
            !crate::kernels::bf16_linear::available()
        );
        assert!(!applies(DType::F16, &Device::Cpu));
    }
}
