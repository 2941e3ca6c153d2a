//! `x Wᵀ` for an `x` of a few rows: the products of decoding, one token at a time.
//!
//! Each decoded token multiplies its activations by every weight matrix, so the product is bound
//! by how fast the weights stream from memory. A general GEMM first packs the weight into panels,
//! reading and writing it once more than the product needs. Here each output is the dot product
//! of two contiguous rows, the weight read as it is stored (`[out, in]`), bf16 weights widened to
//! f32 as they are read. Sums are f32 and a bf16 output is rounded once at the end, as
//! transformers' CPU bf16 linear does.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

use crate::error::Result;
use crate::kernels::fused::{contiguous, simd};

/// Rows of `x` up to which one pass over the weight beats a GEMM.
pub const MAX_ROWS: usize = 4;

/// Weight rows per parallel task: big enough to amortise scheduling, small enough to balance
/// the 256-row key/value projections of grouped-query attention over the threads.
const ROWS_PER_TASK: usize = 16;

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
            (CpuStorage::F32(x), CpuStorage::BF16(w)) => CpuStorage::F32(product(
                contiguous(x, xl, OP)?,
                contiguous(w, wl, OP)?,
                m,
                k,
                n,
                |v| v,
            )),
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
fn product<W: Widen, O: Send + Copy + Default>(
    x: &[f32],
    w: &[W],
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
            let mut r = 0;
            // Four weight rows at once: four streams in flight draw more bandwidth
            // from memory than one (18 → 28 GB/s on the 2-core dev box).
            while r + 4 <= rows {
                let j = j0 + r;
                let w4 = [0, 1, 2, 3].map(|q| &w[(j + q) * k..(j + q + 1) * k]);
                for i in 0..m {
                    let sums = dot4(&x[i * k..(i + 1) * k], w4);
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
        *s += x[full..]
            .iter()
            .zip(&w[q][full..])
            .map(|(a, b)| a * b.widen())
            .sum::<f32>();
    }
    sums
}

/// A dot product in 32 independent f32 lanes, so that the adds do not wait on each other.
#[inline(always)]
fn dot<W: Widen>(x: &[f32], w: &[W]) -> f32 {
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

#[cfg(test)]
mod tests {
    use super::*;
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
