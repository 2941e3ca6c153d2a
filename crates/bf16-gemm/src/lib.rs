//! bf16 matrix products with f32 sums on AVX512-BF16 (`vdpbf16ps`): AMD Zen 4 and later, Intel
//! Cooper Lake and later. Two callers share the GEMM here:
//! - candle's CPU matmul of two bf16 tensors (`vendor/candle-core`), which otherwise widens both
//!   to f32 and runs its f32 GEMM: every product of `llava train --bf16`, forward and backward;
//! - llava-model's bf16 linear layers over f32 activations (`kernels::bf16_linear`), rounded to
//!   bf16 as they are packed: prefill and the vision tower.
//!
//! How it runs:
//! - `vdpbf16ps` takes 16 lanes of bf16 pairs on each side and adds each lane's two products
//!   into an f32 sum: two multiply-adds per lane, twice an f32 FMA's work per instruction, on
//!   half the bytes.
//! - The lanes run over 16 output columns. A panel of 32 columns of `b` is repacked per k-chunk
//!   so that for each pair of k the 32 columns' two values lie side by side (two vectors). The
//!   rows of `a` are rounded to bf16 once and kept as pairs, row by row, and one row's pair is
//!   broadcast to every lane.
//! - A tile of 12 rows × 32 columns of sums lives in 24 of the 32 vector registers through a
//!   whole k-chunk, against 2 panel loads and 12 broadcasts per pair of k.
//! - A k-chunk keeps `a`'s slice (`m × 256` values) and a task's sums in L2, and one panel's
//!   repacked chunk (16 KiB) in L1. The sums start as whatever `out` holds (zeros, or a bias)
//!   and are added to chunk by chunk.
//!
//! The decoding GEMV, a few rows against the weights as stored, is [`dot_row`] (`gemv.rs`).
//!
//! Any strides: each operand is read through its row and column strides while it is packed,
//! so candle's transposed views (`x · Wᵀ`, `gradᵀ · x`) need no copy first. An odd `k` is
//! padded with a zero.

use half::bf16;
use rayon::prelude::*;

mod gemv;
pub use gemv::dot_row;

/// Rows of `a` per register tile.
const MR: usize = 12;
/// Output columns per panel: two vectors of 16 lanes.
const NR: usize = 32;
/// Pairs of k per chunk.
const KC: usize = 128;
/// Below this many multiply-adds a product runs on the calling thread: the tasks' start-up
/// costs more than they share (attention's per-head products in training).
const PARALLEL_FROM: usize = 1 << 20;

/// Whether this CPU has AVX512-BF16 (and AVX-512 F and BW, which every such CPU has), and
/// `LLAVA_NO_AVX512BF16` is unset: the variable turns the kernel off for its callers, to compare
/// against the paths without it.
pub fn supported() -> bool {
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SUPPORTED.get_or_init(|| std::env::var_os("LLAVA_NO_AVX512BF16").is_none() && cpu_has_it())
}

fn cpu_has_it() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A matrix read through strides: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Debug, Clone, Copy)]
pub struct View<'a, T> {
    pub data: &'a [T],
    pub rs: usize,
    pub cs: usize,
}

/// What `a` may hold: bf16 as is, or f32 rounded to bf16 as it is packed.
pub trait Element: Copy + Send + Sync {
    /// The value's bf16 bits.
    fn bf16_bits(self) -> u32;
}

impl Element for bf16 {
    #[inline(always)]
    fn bf16_bits(self) -> u32 {
        u32::from(self.to_bits())
    }
}

impl Element for f32 {
    #[inline(always)]
    fn bf16_bits(self) -> u32 {
        round_to_bf16_bits(self)
    }
}

/// `half::bf16::from_f32(v).to_bits()`: round to nearest even, NaNs kept quiet, written without
/// branches so that the packing loops vectorise.
#[inline(always)]
pub fn round_to_bf16_bits(v: f32) -> u32 {
    let b = v.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    if b & 0x7fff_ffff > 0x7f80_0000 {
        (b >> 16) | 0x40
    } else {
        rounded
    }
}

/// `out[i * n + j] += Σ_k a(i, k) · b(k, j)` for `a: [m, k]` and `b: [k, n]`, with bf16
/// products and f32 sums; `out` is `[m, n]`, contiguous.
///
/// # Panics
/// If the CPU lacks AVX512-BF16 (check [`supported`]) or a view or `out` is too short for its
/// shape.
pub fn gemm<A: Element>(m: usize, n: usize, k: usize, a: View<A>, b: View<bf16>, out: &mut [f32]) {
    assert!(supported(), "bf16_gemm::gemm needs AVX512-BF16");
    assert!(out.len() >= m * n, "out holds {} of {m}×{n}", out.len());
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let last =
        |v_rs: usize, v_cs: usize, rows: usize, cols: usize| (rows - 1) * v_rs + (cols - 1) * v_cs;
    assert!(
        a.data.len() > last(a.rs, a.cs, m, k),
        "a is short of [{m}, {k}]"
    );
    assert!(
        b.data.len() > last(b.rs, b.cs, k, n),
        "b is short of [{k}, {n}]"
    );
    let kp = k.div_ceil(2);
    let parallel = m * n * k >= PARALLEL_FROM;
    let ap = pack_rows(a, m, k, parallel);
    let sums = Disjoint(out.as_mut_ptr());
    let panels: Vec<usize> = (0..n.div_ceil(NR)).collect();
    let run = |task: &[usize]| {
        let mut packed = vec![0u32; KC * NR];
        let mut p0 = 0;
        while p0 < kp {
            let pairs = KC.min(kp - p0);
            for &panel in task {
                let width = NR.min(n - panel * NR);
                pack_panel(&mut packed, b, k, panel * NR, width, p0, pairs);
                let mut i = 0;
                while i < m {
                    let rows = MR.min(m - i);
                    // SAFETY: rows i..i + rows < m of columns panel·NR..+width ≤ n of `out`,
                    // which only this task writes; a's packed rows hold kp pairs, read from p0
                    // to p0 + pairs ≤ kp; the panel holds `pairs` steps of NR values;
                    // `supported()` was asserted.
                    unsafe {
                        kernel::tile(
                            rows,
                            sums.at(i * n + panel * NR),
                            n,
                            width,
                            ap.as_ptr().add(i * kp + p0),
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
    };
    if parallel {
        // Up to 4 panels share a task's pass over a's chunk, while every thread gets a few
        // tasks to balance.
        let per_task = (panels.len() / (4 * rayon::current_num_threads())).clamp(1, 4);
        panels.par_chunks(per_task).for_each(run);
    } else {
        run(&panels);
    }
}

/// The output the tasks write through, each to its own columns.
struct Disjoint(*mut f32);

// SAFETY: the tasks write disjoint elements of one buffer that outlives them, and nothing reads
// it until all are done.
unsafe impl Sync for Disjoint {}

impl Disjoint {
    /// A method rather than a field read, so that closures capture the whole `Sync` wrapper.
    fn at(&self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// One contiguous row as bf16 pairs, `pairs[p] = row[2p] | row[2p + 1] << 16`; an odd length's
/// last pair has a zero high half. `pairs` holds `ceil(row.len() / 2)`. Inlined, so that it
/// vectorises with the caller's target features (AMX's packing runs it under AVX-512).
#[inline(always)]
pub fn pair_up<A: Element>(row: &[A], pairs: &mut [u32]) {
    let whole = row.chunks_exact(2);
    let odd = whole.remainder();
    for (p, two) in pairs.iter_mut().zip(whole) {
        *p = two[0].bf16_bits() | (two[1].bf16_bits() << 16);
    }
    if let [last] = odd {
        pairs[row.len() / 2] = last.bf16_bits();
    }
}

/// `a: [m, k]` as bf16 pairs, `[m][ceil(k / 2)]`, each `a(i, 2p) | a(i, 2p + 1) << 16`; an odd
/// `k`'s last pair has a zero high half.
fn pack_rows<A: Element>(a: View<A>, m: usize, k: usize, parallel: bool) -> Vec<u32> {
    let kp = k.div_ceil(2);
    let mut packed = vec![0u32; m * kp];
    const ROWS: usize = 64;
    let block = |(blk, pairs): (usize, &mut [u32])| {
        let i0 = blk * ROWS;
        let rows = pairs.len() / kp;
        let at = |i: usize, kk: usize| a.data[(i0 + i) * a.rs + kk * a.cs].bf16_bits();
        if a.cs == 1 {
            // Rows contiguous: a pass along each row, which vectorises.
            for (r, row_pairs) in pairs.chunks_exact_mut(kp).enumerate() {
                pair_up(&a.data[(i0 + r) * a.rs..][..k], row_pairs);
            }
        } else {
            // A transposed view (`gradᵀ` in a weight's gradient): down the columns, which are
            // the contiguous direction there.
            for p in 0..kp {
                for r in 0..rows {
                    let hi = if 2 * p + 1 < k { at(r, 2 * p + 1) } else { 0 };
                    pairs[r * kp + p] = at(r, 2 * p) | (hi << 16);
                }
            }
        }
    };
    if parallel {
        packed.par_chunks_mut(ROWS * kp).enumerate().for_each(block);
    } else {
        packed.chunks_mut(ROWS * kp).enumerate().for_each(block);
    }
    packed
}

/// Columns `col0..col0 + width` of `b: [k, n]`, pairs `p0..p0 + pairs`, into `packed` as
/// `[pair][NR columns]`; columns past `width`, and the high half past an odd `k`, are zeros.
fn pack_panel(
    packed: &mut [u32],
    b: View<bf16>,
    k: usize,
    col0: usize,
    width: usize,
    p0: usize,
    pairs: usize,
) {
    if width < NR {
        packed.fill(0);
    }
    let at = |kk: usize, j: usize| {
        if kk < k {
            u32::from(b.data[kk * b.rs + (col0 + j) * b.cs].to_bits())
        } else {
            0
        }
    };
    if b.rs == 1 {
        // A stored weight seen as `Wᵀ`: each column is a contiguous row of W.
        for c in 0..width {
            let col = &b.data[(col0 + c) * b.cs..];
            for p in 0..pairs {
                let kk = 2 * (p0 + p);
                let hi = if kk + 1 < k {
                    u32::from(col[kk + 1].to_bits())
                } else {
                    0
                };
                packed[p * NR + c] = u32::from(col[kk].to_bits()) | (hi << 16);
            }
        }
    } else {
        for p in 0..pairs {
            let kk = 2 * (p0 + p);
            for c in 0..width {
                packed[p * NR + c] = at(kk, c) | (at(kk + 1, c) << 16);
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Values in ±1 from a fixed linear congruential sequence.
    fn values(len: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (state >> 8) as f32 / (1u32 << 23) as f32 - 1.0
            })
            .collect()
    }

    fn bf16s(v: &[f32]) -> Vec<bf16> {
        v.iter().map(|&x| bf16::from_f32(x)).collect()
    }

    /// Every layout candle hands the product (a and b each row-major or transposed), odd k,
    /// edges of tiles and panels, a k of more than one chunk, and the parallel path; each
    /// against an f64 sum of the same bf16-rounded products, within the f32 summation bound.
    #[test]
    fn equals_the_f64_sum_of_bf16_products_in_every_layout() {
        if !supported() {
            eprintln!("skipped: no AVX512-BF16 on this machine");
            return;
        }
        for (m, k, n) in [
            (1, 1, 1),
            (5, 7, 45),
            (13, 96, 33),
            (37, 301, 64),
            (70, 608, 100),
        ] {
            let a = bf16s(&values(m * k, 1));
            let b = bf16s(&values(k * n, 2));
            let bias = values(n, 3);
            for (a_t, b_t) in [(false, false), (false, true), (true, false), (true, true)] {
                // Stored row-major or as the transpose, then read through the view.
                let a_view = if a_t {
                    View {
                        data: &a[..],
                        rs: 1,
                        cs: m,
                    }
                } else {
                    View {
                        data: &a[..],
                        rs: k,
                        cs: 1,
                    }
                };
                let b_view = if b_t {
                    View {
                        data: &b[..],
                        rs: 1,
                        cs: k,
                    }
                } else {
                    View {
                        data: &b[..],
                        rs: n,
                        cs: 1,
                    }
                };
                let mut out: Vec<f32> = (0..m).flat_map(|_| bias.iter().copied()).collect();
                gemm(m, n, k, a_view, b_view, &mut out);
                for i in 0..m {
                    for j in 0..n {
                        let (mut exact, mut magnitude) = (f64::from(bias[j]), 0f64);
                        for kk in 0..k {
                            let x = f64::from(a_view.data[i * a_view.rs + kk * a_view.cs]);
                            let y = f64::from(b_view.data[kk * b_view.rs + j * b_view.cs]);
                            exact += x * y;
                            magnitude += (x * y).abs();
                        }
                        let bound = (k as f64 + 1.0) * f64::from(f32::EPSILON) * (magnitude + 1.0);
                        let got = f64::from(out[i * n + j]);
                        assert!(
                            (got - exact).abs() <= bound,
                            "m={m} k={k} n={n} a_t={a_t} b_t={b_t} ({i},{j}): {got} vs {exact}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn f32_rows_are_rounded_to_bf16_as_they_are_packed() {
        if !supported() {
            eprintln!("skipped: no AVX512-BF16 on this machine");
            return;
        }
        let (m, k, n) = (17, 40, 20);
        let a = values(m * k, 4);
        let b = bf16s(&values(k * n, 5));
        let b_view = View {
            data: &b[..],
            rs: n,
            cs: 1,
        };
        let mut from_f32 = vec![0f32; m * n];
        gemm(
            m,
            n,
            k,
            View {
                data: &a[..],
                rs: k,
                cs: 1,
            },
            b_view,
            &mut from_f32,
        );
        let rounded = bf16s(&a);
        let mut from_bf16 = vec![0f32; m * n];
        gemm(
            m,
            n,
            k,
            View {
                data: &rounded[..],
                rs: k,
                cs: 1,
            },
            b_view,
            &mut from_bf16,
        );
        assert_eq!(from_f32, from_bf16);
    }

    #[test]
    fn rounds_to_bf16_as_half_does() {
        let special = [
            0.0,
            -0.0,
            1.0,
            f32::MAX,
            f32::MIN_POSITIVE,
            f32::INFINITY,
            f32::NAN,
        ];
        let mut state = 0x9e37_79b9u32;
        let random = (0..100_000).map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            f32::from_bits(state)
        });
        for v in special.into_iter().chain(random) {
            assert_eq!(
                round_to_bf16_bits(v),
                u32::from(bf16::from_f32(v).to_bits()),
                "{v:e}"
            );
        }
    }
}
