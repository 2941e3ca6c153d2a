//! `x Wᵀ` for an `x` of a few rows: the products of decoding, one token at a time.
//!
//! Each decoded token multiplies its activations by every weight matrix, so the product is bound
//! by how fast the weights stream from memory. A general GEMM first packs the weight into panels,
//! reading and writing it once more than the product needs. Here each output is the dot product
//! of two contiguous rows, the weight read as it is stored (`[out, in]`), bf16 weights widened to
//! f32 as they are read. Sums are f32 and a bf16 output is rounded once at the end, as
//! transformers' CPU bf16 linear does. Where the CPU has AVX512-BF16, bf16 weights instead meet
//! the activations rounded to bf16 in `vdpbf16ps` ([`bf16_gemm::dot_row`]), as the prefill's
//! bf16 products do, with one weight row read at a time.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

use crate::error::Result;
use crate::kernels::fused::{contiguous, simd};

/// Rows of `x` up to which one pass over the weight beats a GEMM: a server's decode step
/// (`llava serve --max-running`, 8 by default) stays here. Above 4 rows, the GEMM of a bf16
/// weight without AMX widens the whole weight to f32 on every call: a decode step of 8 rows
/// took 7.0 s against 0.20 s for one row on the tiny-1b decoder (BENCHMARKS.md, Serving).
pub const MAX_ROWS: usize = 16;

/// Weight rows per parallel task: big enough to amortise scheduling, small enough to balance
/// the 256-row key/value projections of grouped-query attention over the threads.
pub(crate) const ROWS_PER_TASK: usize = 16;

/// Whether [`matmul_t`] takes this product: CPU, f32 or bf16 on both sides or f32 activations
/// with bf16 weights, `x` of `[m ≤ MAX_ROWS, k]` and `w` of `[n, k]`, both contiguous.
pub fn applies(x: &Tensor, w: &Tensor) -> bool {
    contiguous_cpu_product(x, w)
        && matches!(
            (x.dtype(), w.dtype()),
            (DType::F32, DType::F32) | (DType::BF16, DType::BF16) | (DType::F32, DType::BF16)
        )
        && x.dims()[0] <= MAX_ROWS
}

/// What every CPU `x Wᵀ` kernel here needs: `x: [m, k]` and `w: [n, k]`, both contiguous on the
/// CPU.
pub(crate) fn contiguous_cpu_product(x: &Tensor, w: &Tensor) -> bool {
    x.device().is_cpu()
        && w.device().is_cpu()
        && x.rank() == 2
        && w.rank() == 2
        && x.dims()[1] == w.dims()[1]
        && x.is_contiguous()
        && w.is_contiguous()
}

/// `x Wᵀ` for `x: [m, k]`, `w: [n, k]`, giving `[m, n]`; see [`applies`] for what it takes.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.apply_op2(w, RowsTimesWeight)?)
}

struct RowsTimesWeight;

const OP: &str = "rows-times-weight";

impl CustomOp2 for RowsTimesWeight {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = xl.shape().dims2()?;
        let (n, wk) = wl.shape().dims2()?;
        if k != wk {
            candle_core::bail!("{OP}: x is [{m}, {k}] but the weight is [{n}, {wk}]");
        }
        let storage = match (xs, ws) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => CpuStorage::F32(product(
                contiguous(x, xl, OP)?,
                contiguous(w, wl, OP)?,
                m,
                k,
                n,
                |v| v,
            )),
            (CpuStorage::F32(x), CpuStorage::BF16(w)) if bf16_gemm::supported() => {
                // Rounded to bf16 once, as the prefill's bf16 products round them
                // (`bf16_linear`), for `vdpbf16ps`.
                let x: Vec<bf16> = contiguous(x, xl, OP)?
                    .iter()
                    .map(|&v| bf16::from_f32(v))
                    .collect();
                CpuStorage::F32(product_pairs(&x, contiguous(w, wl, OP)?, m, k, n, |v| v))
            }
            (CpuStorage::F32(x), CpuStorage::BF16(w)) => CpuStorage::F32(product(
                contiguous(x, xl, OP)?,
                contiguous(w, wl, OP)?,
                m,
                k,
                n,
                |v| v,
            )),
            (CpuStorage::BF16(x), CpuStorage::BF16(w)) if bf16_gemm::supported() => {
                CpuStorage::BF16(product_pairs(
                    contiguous(x, xl, OP)?,
                    contiguous(w, wl, OP)?,
                    m,
                    k,
                    n,
                    bf16::from_f32,
                ))
            }
            (CpuStorage::BF16(x), CpuStorage::BF16(w)) => {
                let x: Vec<f32> = contiguous(x, xl, OP)?.iter().map(|v| v.to_f32()).collect();
                let y = product(&x, contiguous(w, wl, OP)?, m, k, n, bf16::from_f32);
                CpuStorage::BF16(y)
            }
            _ => candle_core::bail!("{OP}: takes f32 or bf16 on both sides, or f32 with bf16"),
        };
        Ok((storage, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        backward(x, w, grad)
    }
}

/// The gradients of `x Wᵀ` as plain matmuls. These ops exist for speed, but a trainable path
/// must not lose its gradient if it ever meets one.
pub(crate) fn backward(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
    // bf16 weights meet f32 activations (`weights::activation_dtype`): the gradients are f32.
    let w = w.to_dtype(grad.dtype())?;
    Ok((Some(grad.matmul(&w)?), Some(grad.t()?.matmul(x)?)))
}

/// A weight element widened to f32 as it is read.
pub(crate) trait Widen: Copy + Send + Sync {
    fn widen(self) -> f32;
}

impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Widen for half::f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

impl Widen for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        // bf16 is the top half of an f32: exact, and a shift the compiler vectorises.
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
}

/// `out[i, j] = Σ_l x[i, l]·w[j, l]`, each weight row read once for all `m` rows of `x`.
/// Every output is summed in the same order whatever `m` is, so a row of a batch gets the bits
/// it gets alone.
fn product<W: Load16, O: Send + Copy + Default>(
    x: &[f32],
    w: &[W],
    m: usize,
    k: usize,
    n: usize,
    round: impl Fn(f32) -> O + Sync,
) -> Vec<O> {
    #[cfg(target_arch = "x86_64")]
    let rows_at_once = m >= 4 && std::arch::is_x86_feature_detected!("avx512f");
    by_weight_rows(
        m,
        n,
        #[inline(always)]
        |j0, out| {
            let rows = out.len() / m;
            let mut r = 0;
            // Four weight rows at once: four streams in flight draw more bandwidth
            // from memory than one (18 → 28 GB/s on the 2-core dev box).
            while r + 4 <= rows {
                let j = j0 + r;
                let w4 = [0, 1, 2, 3].map(|q| &w[(j + q) * k..(j + q + 1) * k]);
                let row = |i: usize| &x[i * k..(i + 1) * k];
                let mut i = 0;
                #[cfg(target_arch = "x86_64")]
                if rows_at_once {
                    // Four rows of `x` at a time (a batch's decode step): each piece of the
                    // four weight rows is loaded and widened once for all of them.
                    while i + 4 <= m {
                        // SAFETY: `rows_at_once` says the CPU has AVX-512F.
                        let sums = unsafe { avx512::dot4x4([0, 1, 2, 3].map(|t| row(i + t)), w4) };
                        for (t, sums) in sums.into_iter().enumerate() {
                            for (q, v) in sums.into_iter().enumerate() {
                                out[(r + q) * m + i + t] = round(v);
                            }
                        }
                        i += 4;
                    }
                }
                for i in i..m {
                    let sums = dot4(row(i), w4);
                    for (q, v) in sums.into_iter().enumerate() {
                        out[(r + q) * m + i] = round(v);
                    }
                }
                r += 4;
            }
            for r in r..rows {
                let j = j0 + r;
                let w_row = &w[j * k..(j + 1) * k];
                for i in 0..m {
                    out[r * m + i] = round(dot(&x[i * k..(i + 1) * k], w_row));
                }
            }
        },
    )
}

/// `x Wᵀ` with bf16 `x` (the activations rounded once) and bf16 weights through `vdpbf16ps`
/// ([`bf16_gemm::dot_row`]): one weight row at a time, against four rows of `x` at a time and
/// then one, each output rounded by `round` once. Each output gets the same bits whatever `m` is.
fn product_pairs<O: Send + Copy + Default>(
    x: &[bf16],
    w: &[bf16],
    m: usize,
    k: usize,
    n: usize,
    round: impl Fn(f32) -> O + Sync,
) -> Vec<O> {
    by_weight_rows(
        m,
        n,
        #[inline(always)]
        |j0, out| {
            let rows = out.len() / m;
            for r in 0..rows {
                let w_row = &w[(j0 + r) * k..(j0 + r + 1) * k];
                let row = |i: usize| &x[i * k..(i + 1) * k];
                let mut i = 0;
                while i + 4 <= m {
                    let sums = bf16_gemm::dot_row([0, 1, 2, 3].map(|t| row(i + t)), w_row);
                    for (t, v) in sums.into_iter().enumerate() {
                        out[r * m + i + t] = round(v);
                    }
                    i += 4;
                }
                for i in i..m {
                    out[r * m + i] = round(bf16_gemm::dot_row([row(i)], w_row)[0]);
                }
            }
        },
    )
}

/// The skeleton of every product here: `task(j0, out)` fills the outputs of weight rows `j0..`
/// (`m` each, `out` holding [`ROWS_PER_TASK`] rows or the remainder), tasks run in parallel and
/// compiled with the SIMD features [`simd`] enables, and the result is `x Wᵀ`'s `[m, n]`.
/// Outputs land weight-row-major (`[n, m]`) so that each task writes one contiguous piece.
pub(crate) fn by_weight_rows<O: Send + Copy + Default>(
    m: usize,
    n: usize,
    task: impl Fn(usize, &mut [O]) + Sync,
) -> Vec<O> {
    let mut by_row = vec![O::default(); n * m];
    by_row
        .par_chunks_mut(ROWS_PER_TASK * m)
        .enumerate()
        .for_each(|(t, out)| {
            // Inlined so that the task's loops compile with the SIMD features.
            simd(
                #[inline(always)]
                || task(t * ROWS_PER_TASK, out),
            )
        });
    by_row_to_outputs(by_row, m, n)
}

/// Products computed weight-row-major (`[n, m]`) laid out as `x Wᵀ`'s `[m, n]`.
fn by_row_to_outputs<O: Copy + Default>(by_row: Vec<O>, m: usize, n: usize) -> Vec<O> {
    if m == 1 {
        return by_row;
    }
    let mut out = vec![O::default(); m * n];
    for (j, row) in by_row.chunks_exact(m).enumerate() {
        for (i, v) in row.iter().enumerate() {
            out[i * n + j] = *v;
        }
    }
    out
}

/// Four dot products of `x` with four weight rows, 16 lanes each.
#[inline(always)]
fn dot4<W: Widen>(x: &[f32], w: [&[W]; 4]) -> [f32; 4] {
    const LANES: usize = 16;
    let mut acc = [[0f32; LANES]; 4];
    let full = x.len() / LANES * LANES;
    for c in (0..full).step_by(LANES) {
        let a = &x[c..c + LANES];
        for (q, acc) in acc.iter_mut().enumerate() {
            let b = &w[q][c..c + LANES];
            for l in 0..LANES {
                acc[l] = a[l].mul_add(b[l].widen(), acc[l]);
            }
        }
    }
    let mut sums = acc.map(|a| a.iter().sum::<f32>());
    for (q, s) in sums.iter_mut().enumerate() {
        *s += tail(x, w[q], full);
    }
    sums
}

/// `Σ x[l]·w[l]` over `l ≥ full`, the part of a dot product past its whole 16-lane pieces.
#[inline(always)]
fn tail<W: Widen>(x: &[f32], w: &[W], full: usize) -> f32 {
    x[full..]
        .iter()
        .zip(&w[full..])
        .map(|(a, b)| a * b.widen())
        .sum::<f32>()
}

/// A dot product in 32 independent f32 lanes, so that the adds do not wait on each other.
#[inline(always)]
pub(crate) fn dot<W: Widen>(x: &[f32], w: &[W]) -> f32 {
    const LANES: usize = 32;
    let mut acc = [0f32; LANES];
    let (xc, wc) = (x.chunks_exact(LANES), w.chunks_exact(LANES));
    let tail: f32 = xc
        .remainder()
        .iter()
        .zip(wc.remainder())
        .map(|(a, b)| a * b.widen())
        .sum();
    for (a, b) in xc.zip(wc) {
        for l in 0..LANES {
            acc[l] = a[l].mul_add(b[l].widen(), acc[l]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// A weight type [`product`] takes: f32 or bf16, which [`avx512::dot4x4`] loads 16 at a time.
pub(crate) trait Load16: Widen {
    /// 16 values at `p`, widened to f32.
    ///
    /// # Safety
    /// The CPU has AVX-512F and `p` points at 16 readable values.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl Load16 for f32 {
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller's contract.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
}

impl Load16 for bf16 {
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const bf16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract; 16 bf16 are 32 bytes. Each widened as `Widen` does:
        // the bits moved to the top half of an f32.
        unsafe {
            let h = _mm256_loadu_si256(p.cast::<__m256i>());
            _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
        }
    }
}

/// The four-rows-at-once product in AVX-512 intrinsics: written as plain loops (as [`dot4`]),
/// the compiler's code for it came out several times slower than four [`dot4`]s, or not,
/// depending on the build.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Load16, tail};

    /// The dot products of four rows of `x` with four weight rows, `[x row][weight row]`, each
    /// summed exactly as [`super::dot4`] sums it: 16 lanes of fused multiply-adds in order,
    /// the lanes added in order, then the tail.
    ///
    /// # Safety
    /// The CPU has AVX-512F; all eight slices have the same length.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(super) unsafe fn dot4x4<W: Load16>(x: [&[f32]; 4], w: [&[W]; 4]) -> [[f32; 4]; 4] {
        const LANES: usize = 16;
        let k = w[0].len();
        let full = k / LANES * LANES;
        let mut acc = [[_mm512_setzero_ps(); 4]; 4];
        let mut c = 0;
        while c < full {
            // SAFETY: `c + 16 ≤ full ≤ k`, the length of every slice.
            unsafe {
                let b = [0, 1, 2, 3].map(|q| W::load16(w[q].as_ptr().add(c)));
                for (acc, x) in acc.iter_mut().zip(&x) {
                    let a = _mm512_loadu_ps(x.as_ptr().add(c));
                    for (acc, b) in acc.iter_mut().zip(&b) {
                        *acc = _mm512_fmadd_ps(a, *b, *acc);
                    }
                }
            }
            c += LANES;
        }
        let mut sums = [[0f32; 4]; 4];
        for ((sums, acc), x) in sums.iter_mut().zip(&acc).zip(&x) {
            for ((s, acc), w) in sums.iter_mut().zip(acc).zip(&w) {
                let mut lanes = [0f32; LANES];
                // SAFETY: 16 floats into a 16-float array.
                unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), *acc) };
                *s = lanes.iter().sum::<f32>() + tail(x, w, full);
            }
        }
        sums
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::bits;
    use candle_core::Device;

    fn tensor(m: usize, k: usize, seed: u64) -> Tensor {
        Tensor::rand(-1f32, 1., (m, k), &Device::Cpu)
            .and_then(|t| t.affine(1.0, seed as f64 * 1e-3))
            .expect("tensor")
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let a = a
            .to_dtype(DType::F32)
            .expect("f32")
            .flatten_all()
            .expect("flat");
        let b = b
            .to_dtype(DType::F32)
            .expect("f32")
            .flatten_all()
            .expect("flat");
        let a = a.to_vec1::<f32>().expect("vec");
        let b = b.to_vec1::<f32>().expect("vec");
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs() / x.abs().max(y.abs()).max(1.0))
            .fold(0.0, f32::max)
    }

    #[test]
    fn agrees_with_matmul_for_every_row_count_and_ragged_sizes() {
        // k = 77 leaves a remainder after the 32-lane chunks; n = 37 a partial last task.
        for m in 1..=MAX_ROWS {
            let x = tensor(m, 77, 1);
            let w = tensor(37, 77, 2);
            assert!(applies(&x, &w));
            let ours = matmul_t(&x, &w).expect("product");
            let reference = x.matmul(&w.t().expect("t")).expect("matmul");
            assert_eq!(ours.dims(), &[m, 37]);
            assert!(max_rel(&ours, &reference) < 1e-5, "m={m}");
            // bf16 on both sides: the output is rounded to bf16 (a relative step of 2⁻⁸).
            let (xb, wb) = (
                x.to_dtype(DType::BF16).expect("bf16"),
                w.to_dtype(DType::BF16).expect("bf16"),
            );
            let reference = xb
                .to_dtype(DType::F32)
                .and_then(|x| x.matmul(&wb.to_dtype(DType::F32)?.t()?))
                .expect("matmul");
            let ours = matmul_t(&xb, &wb).expect("product");
            assert!(max_rel(&ours, &reference) < 4e-3, "bf16, m={m}");
        }
    }

    /// A server's decode step multiplies every running sequence's row at once; each row's
    /// products must be the bits it gets alone, or a greedy reply would depend on its company.
    #[test]
    fn each_row_of_a_batch_gets_the_bits_it_gets_alone() {
        let x32 = tensor(MAX_ROWS, 77, 9);
        let bf = |t: Tensor| t.to_dtype(DType::BF16).expect("bf16");
        // f32 weights, bf16 weights under f32 activations, and bf16 on both sides (the
        // `vdpbf16ps` path where the CPU has it).
        for (x, w) in [
            (x32.clone(), tensor(37, 77, 10)),
            (x32.clone(), bf(tensor(37, 77, 10))),
            (bf(x32.clone()), bf(tensor(37, 77, 10))),
        ] {
            for m in [2, 4, 7, MAX_ROWS] {
                let batch = x.narrow(0, 0, m).expect("rows");
                assert!(applies(&batch, &w));
                let together = matmul_t(&batch, &w).expect("batch");
                for i in 0..m {
                    let alone = matmul_t(&batch.narrow(0, i, 1).expect("row"), &w).expect("row");
                    assert_eq!(
                        bits(&together.get(i).expect("row")),
                        bits(&alone),
                        "row {i} of {m}, {:?} x {:?}",
                        x.dtype(),
                        w.dtype()
                    );
                }
            }
        }
    }

    #[test]
    fn bf16_sums_in_f32_and_rounds_once() {
        let x = tensor(2, 300, 3).to_dtype(DType::BF16).expect("bf16");
        let w = tensor(50, 300, 4).to_dtype(DType::BF16).expect("bf16");
        let ours = matmul_t(&x, &w).expect("product");
        assert_eq!(ours.dtype(), DType::BF16);
        // The exact product of the same bf16 values, rounded to bf16 once.
        let f = |t: &Tensor| t.to_dtype(DType::F32).expect("f32");
        let exact = f(&x).matmul(&f(&w).t().expect("t")).expect("matmul");
        let rounded = exact.to_dtype(DType::BF16).expect("bf16");
        // One bf16 rounding either way at most: 2⁻⁸ relative.
        assert!(max_rel(&ours, &rounded) <= 1.0 / 256.0);
        assert!(max_rel(&ours, &exact) <= 1.0 / 256.0);
    }

    #[test]
    fn f32_activations_read_bf16_weights_exactly() {
        let x = tensor(3, 300, 7);
        let w = tensor(50, 300, 8).to_dtype(DType::BF16).expect("bf16");
        assert!(applies(&x, &w));
        let ours = matmul_t(&x, &w).expect("product");
        assert_eq!(ours.dtype(), DType::F32);
        // The same product with the weight widened first: only the order of the sums differs.
        // With AVX512-BF16 the activations are rounded to bf16 first, as the prefill's
        // products round them.
        let x = match bf16_gemm::supported() {
            true => x
                .to_dtype(DType::BF16)
                .and_then(|x| x.to_dtype(DType::F32))
                .expect("rounded"),
            false => x,
        };
        let wide = w.to_dtype(DType::F32).expect("f32");
        let reference = x.matmul(&wide.t().expect("t")).expect("matmul");
        assert!(max_rel(&ours, &reference) < 1e-5);
    }

    #[test]
    fn gradients_flow_to_both_inputs() {
        let x = candle_core::Var::from_tensor(&tensor(2, 40, 5)).expect("var");
        let w = candle_core::Var::from_tensor(&tensor(6, 40, 6)).expect("var");
        let ours = matmul_t(&x, &w)
            .expect("product")
            .sqr()
            .expect("sq")
            .sum_all()
            .expect("sum");
        let reference = x
            .matmul(&w.t().expect("t"))
            .and_then(|y| y.sqr())
            .and_then(|y| y.sum_all())
            .expect("reference");
        let (g, r) = (
            ours.backward().expect("bwd"),
            reference.backward().expect("bwd"),
        );
        for v in [&x, &w] {
            let (a, b) = (g.get(v).expect("grad"), r.get(v).expect("grad"));
            assert!(max_rel(a, b) < 1e-5);
        }
    }

    #[test]
    fn declines_what_it_does_not_cover() {
        let w = tensor(8, 16, 0);
        assert!(!applies(&tensor(MAX_ROWS + 1, 16, 0), &w));
        assert!(!applies(&tensor(1, 16, 0), &w.t().expect("t")));
        let half = tensor(1, 16, 0).to_dtype(DType::F16).expect("f16");
        assert!(!applies(&half, &w.to_dtype(DType::F16).expect("f16")));
    }
}
