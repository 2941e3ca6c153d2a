//! bf16 `x Wᵀ` on AVX512-BF16: the second backend of [`crate::kernels::bf16_linear`], for CPUs
//! with `vdpbf16ps` and no AMX (AMD Zen 4 and later, Intel Cooper Lake). The op, its checks and
//! its tests live there.
//!
//! - `vdpbf16ps` takes 16 lanes of bf16 pairs on each side and adds each lane's two products
//!   into an f32 sum: two multiply-adds per lane, twice an f32 FMA's work per instruction, on
//!   half the bytes.
//! - The lanes run over 16 output columns: a weight panel of 32 columns is repacked per k-chunk
//!   so that for each pair of k the 32 columns' two values lie side by side (two vectors). The
//!   activations are rounded to bf16 once, kept as pairs row by row, and one row's pair is
//!   broadcast to every lane.
//! - A tile of 12 rows × 32 columns of sums lives in 24 of the 32 vector registers through a
//!   whole k-chunk, against 2 weight loads and 12 broadcasts per pair of k.
//! - A k-chunk keeps the activations' slice (`m × 256` values) and a task's sums in L2 and one
//!   panel's repacked chunk (16 KiB) in L1; the sums start as the bias and are added to chunk by
//!   chunk.

use half::bf16;
use rayon::prelude::*;

use crate::kernels::bf16_linear::bf16_bits;
use crate::kernels::fused::{DisjointWrites, simd};

/// Rows of `x` per register tile.
const MR: usize = 12;
/// Output columns per panel: two vectors of 16 lanes.
const NR: usize = 32;
/// Pairs of k per chunk.
const KC: usize = 128;

/// Whether this CPU has AVX512-BF16 (and AVX-512 F, which every such CPU has).
pub(crate) fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x Wᵀ + bias` for `x: [m, k]`, `w: [n, k]`, `k` even; only called where [`supported`].
pub(crate) fn product(
    x: &[f32],
    w: &[bf16],
    bias: &[f32],
    m: usize,
    k: usize,
    n: usize,
) -> Vec<f32> {
    let kp = k / 2;
    let xp = pack_rows(x, m, k);
    let mut out = vec![0f32; m * n];
    out.par_chunks_mut(n)
        .for_each(|row| row.copy_from_slice(bias));
    let sums = DisjointWrites::new(out.as_mut_ptr());
    let panels: Vec<usize> = (0..n.div_ceil(NR)).collect();
    // Up to 4 panels share a task's pass over the activations' chunk, while leaving every
    // thread a few tasks to balance.
    let per_task = (panels.len() / (4 * rayon::current_num_threads())).clamp(1, 4);
    panels.par_chunks(per_task).for_each(|task| {
        let mut packed = vec![0u32; KC * NR];
        let mut p0 = 0;
        while p0 < kp {
            let pairs = KC.min(kp - p0);
            for &panel in task {
                let width = NR.min(n - panel * NR);
                pack_panel(&mut packed, w, k, panel * NR, width, p0, pairs);
                let mut i = 0;
                while i < m {
                    let rows = MR.min(m - i);
                    // SAFETY: rows i..i + rows < m of columns panel·NR..+width < n, which only
                    // this task writes; x's rows hold kp pairs each, from p0 + pairs ≤ kp; the
                    // panel holds `pairs` steps of NR values; `supported()` was checked.
                    unsafe {
                        kernel::tile(
                            rows,
                            sums.at(i * n + panel * NR),
                            n,
                            width,
                            xp.as_ptr().add(i * kp + p0),
                            kp,
                            packed.as_ptr(),
                            pairs,
                        )
                    };
                    i += rows;
                }
            }
            p0 += pairs;
        }
    });
    out
}

/// `x: [m, k]` rounded to bf16, as pairs: `[m][k / 2]`, each `x[i, 2p] | x[i, 2p + 1] << 16`.
fn pack_rows(x: &[f32], m: usize, k: usize) -> Vec<u32> {
    let mut packed = vec![0u32; m * (k / 2)];
    packed
        .par_chunks_mut(k / 2)
        .zip(x.par_chunks(k))
        .for_each(|(pairs, row)| {
            simd(
                #[inline(always)]
                || {
                    for (p, two) in pairs.iter_mut().zip(row.chunks_exact(2)) {
                        *p = bf16_bits(two[0]) | (bf16_bits(two[1]) << 16);
                    }
                },
            )
        });
    packed
}

/// Columns `col0..col0 + width` of `w: [n, k]`, pairs `p0..p0 + pairs`, into `packed` as
/// `[pair][NR columns]`; columns past `width` are zeros.
fn pack_panel(
    packed: &mut [u32],
    w: &[bf16],
    k: usize,
    col0: usize,
    width: usize,
    p0: usize,
    pairs: usize,
) {
    if width < NR {
        packed.fill(0);
    }
    for c in 0..width {
        let row = &w[(col0 + c) * k + 2 * p0..][..2 * pairs];
        for (p, two) in row.chunks_exact(2).enumerate() {
            packed[p * NR + c] = u32::from(two[0].to_bits()) | (u32::from(two[1].to_bits()) << 16);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use std::arch::x86_64::*;

    use super::{MR, NR};

    /// Adds `pairs` steps of `x · panel` to the sums tile of `rows ≤ MR` rows and `width ≤ NR`
    /// columns at `c` (row stride `ldc`).
    ///
    /// # Safety
    /// The CPU has AVX-512 F and BF16; `c` addresses `rows` rows of `width` writable f32 at
    /// stride `ldc`; `x` `rows` rows of `pairs` u32 at stride `ldx`; `panel` `pairs × NR` u32.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile(
        rows: usize,
        c: *mut f32,
        ldc: usize,
        width: usize,
        x: *const u32,
        ldx: usize,
        panel: *const u32,
        pairs: usize,
    ) {
        let masks = [lanes(width), lanes(width.saturating_sub(16))];
        // SAFETY: forwarded from the caller.
        unsafe {
            match rows {
                12 => rows_of::<12>(c, ldc, masks, x, ldx, panel, pairs),
                11 => rows_of::<11>(c, ldc, masks, x, ldx, panel, pairs),
                10 => rows_of::<10>(c, ldc, masks, x, ldx, panel, pairs),
                9 => rows_of::<9>(c, ldc, masks, x, ldx, panel, pairs),
                8 => rows_of::<8>(c, ldc, masks, x, ldx, panel, pairs),
                7 => rows_of::<7>(c, ldc, masks, x, ldx, panel, pairs),
                6 => rows_of::<6>(c, ldc, masks, x, ldx, panel, pairs),
                5 => rows_of::<5>(c, ldc, masks, x, ldx, panel, pairs),
                4 => rows_of::<4>(c, ldc, masks, x, ldx, panel, pairs),
                3 => rows_of::<3>(c, ldc, masks, x, ldx, panel, pairs),
                2 => rows_of::<2>(c, ldc, masks, x, ldx, panel, pairs),
                1 => rows_of::<1>(c, ldc, masks, x, ldx, panel, pairs),
                _ => unreachable!("a tile has 1 to {MR} rows"),
            }
        }
    }

    /// The mask of the first `n` of 16 lanes.
    fn lanes(n: usize) -> __mmask16 {
        if n >= 16 { 0xffff } else { (1u16 << n) - 1 }
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn rows_of<const R: usize>(
        c: *mut f32,
        ldc: usize,
        masks: [__mmask16; 2],
        x: *const u32,
        ldx: usize,
        panel: *const u32,
        pairs: usize,
    ) {
        // SAFETY: the bounds are `tile`'s contract; the masks keep loads and stores in `width`.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 2]; R];
            for (r, sums) in acc.iter_mut().enumerate() {
                for (h, sum) in sums.iter_mut().enumerate() {
                    *sum = _mm512_maskz_loadu_ps(masks[h], c.add(r * ldc + h * 16));
                }
            }
            for p in 0..pairs {
                let w0: __m512bh =
                    std::mem::transmute(_mm512_loadu_epi32(panel.add(p * NR) as *const i32));
                let w1: __m512bh =
                    std::mem::transmute(_mm512_loadu_epi32(panel.add(p * NR + 16) as *const i32));
                for (r, sums) in acc.iter_mut().enumerate() {
                    let xb: __m512bh =
                        std::mem::transmute(_mm512_set1_epi32(*x.add(r * ldx + p) as i32));
                    sums[0] = _mm512_dpbf16_ps(sums[0], w0, xb);
                    sums[1] = _mm512_dpbf16_ps(sums[1], w1, xb);
                }
            }
            for (r, sums) in acc.iter().enumerate() {
                for (h, sum) in sums.iter().enumerate() {
                    _mm512_mask_storeu_ps(c.add(r * ldc + h * 16), masks[h], *sum);
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod kernel {
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile(
        _: usize,
        _: *mut f32,
        _: usize,
        _: usize,
        _: *const u32,
        _: usize,
        _: *const u32,
        _: usize,
    ) {
        unreachable!("AVX512-BF16 is not supported off x86-64")
    }
}
