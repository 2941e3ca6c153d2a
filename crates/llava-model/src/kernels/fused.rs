//! Fused f32 CPU kernels that autograd can differentiate: layer norm, RMS norm, softmax over the
//! last dim, `x·σ(αx)` (SiLU, quick_gelu), rotary embedding, and a bias add.
//!
//! candle's own fused kernels have no backward, and the composite formulas that do (a mean, a
//! subtraction, a division, a broadcast multiply…) cost a pass over memory each, forwards and
//! backwards. Worse, the gradient of a weight broadcast over rows goes through candle's generic
//! reduction over leading dims, which divides per element: in a profile of the demo's tower
//! pretraining it alone took 17% of a step. Each op here is one pass forwards and one backwards,
//! the backward written out by hand (and checked against the composite formula in the tests).
//!
//! Only f32 on the CPU takes this path ([`applies`]); other dtypes and devices keep the
//! composite formulas in [`crate::model::nn`]. `x·σ(αx)` takes bf16 too ([`gate_applies`]):
//! `llava train --bf16` runs the MLP's activation in bf16, where candle's generic bf16 code
//! spent 7% of a step; here each element is widened, computed in f32 and rounded once.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

use crate::kernels::gemv::Widen;

type CResult<T> = candle_core::Result<T>;

/// Rows handed to one rayon task: enough work to outweigh the scheduling.
const MIN_ROWS_PER_TASK: usize = 32;

/// Whether every tensor can take the fused path.
pub fn applies(tensors: &[&Tensor]) -> bool {
    tensors
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// An f32 output buffer that parallel tasks write through, each to its own elements (the AMX
/// product's column blocks, the transposing loader's columns), where the elements of one task
/// are not one contiguous slice that `par_chunks_mut` could hand out.
pub(crate) struct DisjointWrites(*mut f32);

// SAFETY: the tasks write disjoint elements of one buffer that outlives them, and nothing reads
// it until all are done.
unsafe impl Sync for DisjointWrites {}

impl DisjointWrites {
    /// `buffer`: the start of the output (possibly capacity not yet initialised).
    pub(crate) fn new(buffer: *mut f32) -> Self {
        Self(buffer)
    }

    /// A method rather than a field read, so that closures capture the whole `Sync` wrapper.
    pub(crate) fn at(&self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// The f32 elements a contiguous layout covers in a CPU storage; `op` names the caller in the
/// error for any other layout.
pub fn data<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> CResult<&'a [f32]> {
    contiguous(s.as_slice::<f32>()?, l, op)
}

/// The elements of any dtype that a contiguous layout covers; `op` names the caller in the error
/// for any other layout.
pub fn contiguous<'a, T: WithDType>(s: &'a [T], l: &Layout, op: &str) -> CResult<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

fn last_dim(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1).max(1)
}

/// Runs `f(row_index, input_rows…, out_row)` over rows in parallel.
fn par_rows(out: &mut [f32], d: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    out.par_chunks_mut(d)
        .with_min_len(MIN_ROWS_PER_TASK)
        .enumerate()
        .for_each(|(i, row)| f(i, row));
}

/// Runs `f` over blocks of rows in parallel; each block also returns partial column sums
/// (`sums` of them, each `d` long), which are added up.
fn par_row_blocks(
    out: &mut [f32],
    d: usize,
    sums: usize,
    f: impl Fn(usize, &mut [f32], &mut [Vec<f32>]) + Sync,
) -> Vec<Vec<f32>> {
    let block = block_rows(out.len() / d);
    out.par_chunks_mut(block * d)
        .enumerate()
        .map(|(b, chunk)| {
            let mut partial = vec![vec![0f32; d]; sums];
            for (r, row) in chunk.chunks_mut(d).enumerate() {
                f(b * block + r, row, &mut partial);
            }
            partial
        })
        .reduce(|| vec![vec![0f32; d]; sums], add_partials)
}

/// Rows per block: about four blocks per thread, so that uneven blocks even out.
fn block_rows(rows: usize) -> usize {
    rows.div_ceil(4 * rayon::current_num_threads())
        .max(MIN_ROWS_PER_TASK)
}

fn add_partials(mut a: Vec<Vec<f32>>, b: Vec<Vec<f32>>) -> Vec<Vec<f32>> {
    for (x, y) in a.iter_mut().zip(b) {
        for (p, q) in x.iter_mut().zip(y) {
            *p += q;
        }
    }
    a
}

/// Mean and 1/std of a row, as PyTorch's layer norm computes them (biased variance).
fn moments(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

fn rms_scale(x: &[f32], eps: f32) -> f32 {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    1.0 / (ms + eps).sqrt()
}

/// The frame of the norms' backward passes: `(x, weight, dy)` → `[rows + sums, d]`, the rows of
/// dx and then `sums` column sums (the weight's and bias's gradients). `row(x, weight, dy, dx,
/// partial)` fills one row of dx and adds that row's share to the partial sums.
fn packed_backward(
    name: &str,
    [(s1, l1), (s2, l2), (s3, l3)]: [(&CpuStorage, &Layout); 3],
    sums: usize,
    row: impl Fn(&[f32], &[f32], &[f32], &mut [f32], &mut [Vec<f32>]) + Sync,
) -> CResult<(CpuStorage, Shape)> {
    let (x, w, dy) = (
        data(s1, l1, name)?,
        data(s2, l2, name)?,
        data(s3, l3, name)?,
    );
    let d = last_dim(l1);
    let rows = x.len() / d;
    let mut out = vec![0f32; (rows + sums) * d];
    let (dx, _) = out.split_at_mut(rows * d);
    let totals = par_row_blocks(dx, d, sums, |i, dx_row, partial| {
        let span = i * d..(i + 1) * d;
        row(&x[span.clone()], w, &dy[span], dx_row, partial);
    });
    for (k, total) in totals.iter().enumerate() {
        out[(rows + k) * d..(rows + k + 1) * d].copy_from_slice(total);
    }
    Ok((CpuStorage::F32(out), Shape::from((rows + sums, d))))
}

// ---------------------------------------------------------------------------------------------
// Layer norm

/// `nn.LayerNorm` over the last dim with weight and bias.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> CResult<Tensor> {
    x.contiguous()?
        .apply_op3(weight, bias, LayerNorm { eps: eps as f32 })
}

struct LayerNorm {
    eps: f32,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (x, w, b) = (
            data(s1, l1, self.name())?,
            data(s2, l2, self.name())?,
            data(s3, l3, self.name())?,
        );
        let d = last_dim(l1);
        let mut y = vec![0f32; x.len()];
        par_rows(&mut y, d, |i, out| {
            let row = &x[i * d..(i + 1) * d];
            let (mean, rstd) = moments(row, self.eps);
            for j in 0..d {
                out[j] = (row[j] - mean) * rstd * w[j] + b[j];
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = x.dim(candle_core::D::Minus1)?;
        let rows = x.elem_count() / d;
        let packed = x.apply_op3(
            weight,
            &grad.contiguous()?,
            LayerNormBackward { eps: self.eps },
        )?;
        Ok((
            Some(packed.narrow(0, 0, rows)?.reshape(x.shape())?),
            Some(packed.get(rows)?),
            Some(packed.get(rows + 1)?),
        ))
    }
}

/// `(x, weight, dy)` → `[rows + 2, d]`: dx, then dweight, then dbias.
struct LayerNormBackward {
    eps: f32,
}

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "fused-layer-norm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let eps = self.eps;
        packed_backward(
            self.name(),
            [(s1, l1), (s2, l2), (s3, l3)],
            2,
            |x, w, g, dx, partial| {
                let d = x.len();
                let (mean, rstd) = moments(x, eps);
                let (mut mean_g, mut mean_gx) = (0f32, 0f32);
                for j in 0..d {
                    let xhat = (x[j] - mean) * rstd;
                    let gw = g[j] * w[j];
                    mean_g += gw;
                    mean_gx += gw * xhat;
                    partial[0][j] += g[j] * xhat;
                    partial[1][j] += g[j];
                }
                mean_g /= d as f32;
                mean_gx /= d as f32;
                for j in 0..d {
                    let xhat = (x[j] - mean) * rstd;
                    dx[j] = rstd * (g[j] * w[j] - mean_g - xhat * mean_gx);
                }
            },
        )
    }
}

// ---------------------------------------------------------------------------------------------
// RMS norm

/// `LlamaRMSNorm` over the last dim.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> CResult<Tensor> {
    x.contiguous()?
        .apply_op2(weight, RmsNorm { eps: eps as f32 })
}

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (x, w) = (data(s1, l1, self.name())?, data(s2, l2, self.name())?);
        let d = last_dim(l1);
        let mut y = vec![0f32; x.len()];
        par_rows(&mut y, d, |i, out| {
            let row = &x[i * d..(i + 1) * d];
            let rstd = rms_scale(row, self.eps);
            for j in 0..d {
                out[j] = row[j] * rstd * w[j];
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let d = x.dim(candle_core::D::Minus1)?;
        let rows = x.elem_count() / d;
        let packed = x.apply_op3(
            weight,
            &grad.contiguous()?,
            RmsNormBackward { eps: self.eps },
        )?;
        Ok((
            Some(packed.narrow(0, 0, rows)?.reshape(x.shape())?),
            Some(packed.get(rows)?),
        ))
    }
}

/// `(x, weight, dy)` → `[rows + 1, d]`: dx, then dweight.
struct RmsNormBackward {
    eps: f32,
}

impl CustomOp3 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "fused-rms-norm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let eps = self.eps;
        packed_backward(
            self.name(),
            [(s1, l1), (s2, l2), (s3, l3)],
            1,
            |x, w, g, dx, partial| {
                let d = x.len();
                let rstd = rms_scale(x, eps);
                let mut mean_gx = 0f32;
                for j in 0..d {
                    let xhat = x[j] * rstd;
                    mean_gx += g[j] * w[j] * xhat;
                    partial[0][j] += g[j] * xhat;
                }
                mean_gx /= d as f32;
                for j in 0..d {
                    dx[j] = rstd * (g[j] * w[j] - x[j] * rstd * mean_gx);
                }
            },
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Softmax

/// Softmax over the last dim.
pub fn softmax_last_dim(x: &Tensor) -> CResult<Tensor> {
    x.contiguous()?.apply_op1(Softmax)
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = data(s, l, self.name())?;
        let d = last_dim(l);
        let mut y = vec![0f32; x.len()];
        par_rows(&mut y, d, |i, out| {
            simd(
                #[inline(always)]
                || {
                    out.copy_from_slice(&x[i * d..(i + 1) * d]);
                    softmax_in_place(out);
                },
            )
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(y.apply_op2(&grad.contiguous()?, SoftmaxBackward)?))
    }
}

/// Softmax of one row, in place; inlined into loops that [`simd`] compiles, where every pass
/// vectorises: the maximum and the sum run in 16 lanes, the exp is the branch-free polynomial.
///
/// Masked scores (a large negative) give exact zeros: `exp` stops at e⁻⁸⁷, which the division
/// would take into denormals, and a GEMM over denormal probabilities runs several times slower.
#[inline(always)]
pub(crate) fn softmax_in_place(row: &mut [f32]) {
    let (chunks, tail) = row.as_chunks::<16>();
    let mut lanes = [f32::NEG_INFINITY; 16];
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            // A select rather than `f32::max`, whose NaN rule keeps the loop scalar.
            *l = if v > *l { v } else { *l };
        }
    }
    let max = lanes
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    for x in row.iter_mut() {
        let t = *x - max;
        *x = if t < -87.0 { 0.0 } else { exp(t) };
    }
    let (chunks, tail) = row.as_chunks::<16>();
    let mut lanes = [0f32; 16];
    for c in chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l += v;
        }
    }
    let inv = 1.0 / (lanes.iter().sum::<f32>() + tail.iter().sum::<f32>());
    for x in row.iter_mut() {
        let p = *x * inv;
        *x = if p < f32::MIN_POSITIVE { 0.0 } else { p };
    }
}

/// `(y, dy)` → `y · (dy − Σ dy·y)`.
struct SoftmaxBackward;

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "fused-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (y, dy) = (data(s1, l1, self.name())?, data(s2, l2, self.name())?);
        let d = last_dim(l1);
        let mut dx = vec![0f32; y.len()];
        par_rows(&mut dx, d, |i, out| {
            let (yr, gr) = (&y[i * d..(i + 1) * d], &dy[i * d..(i + 1) * d]);
            let dot: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
            for j in 0..d {
                out[j] = yr[j] * (gr[j] - dot);
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// x·σ(αx): SiLU (α = 1) and CLIP's quick_gelu (α = 1.702)

/// Whether [`sigmoid_gate`] takes `x`: f32 or bf16 on the CPU.
pub fn gate_applies(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::BF16)
}

/// The bf16 elements a contiguous layout covers.
fn data_bf16<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> CResult<&'a [half::bf16]> {
    contiguous(s.as_slice::<half::bf16>()?, l, op)
}

/// [`map_chunks`] over bf16: each piece of the inputs widened to f32 on the stack, `f` run on
/// it, and the result rounded to bf16 once. (Heap buffers per piece left the allocator holding
/// 0.2 GB more at the peak of a train-bench step.)
fn map_chunks_bf16<const N: usize>(
    out: &mut [half::bf16],
    inputs: [&[half::bf16]; N],
    f: impl Fn(&mut [f32], [&[f32]; N]) + Sync + Copy,
) {
    const PIECE: usize = 1024;
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(i, o)| {
        let start = i * CHUNK;
        for (p, o) in o.chunks_mut(PIECE).enumerate() {
            let at = start + p * PIECE;
            let mut wide = [[0f32; PIECE]; N];
            let mut y = [0f32; PIECE];
            simd(
                #[inline(always)]
                || {
                    for (w, x) in wide.iter_mut().zip(&inputs) {
                        for (w, v) in w.iter_mut().zip(&x[at..at + o.len()]) {
                            *w = v.widen();
                        }
                    }
                },
            );
            let ins: [&[f32]; N] = std::array::from_fn(|k| &wide[k][..o.len()]);
            dispatch(&mut y[..o.len()], ins, f);
            simd(
                #[inline(always)]
                || {
                    for (o, &v) in o.iter_mut().zip(&y) {
                        *o = half::bf16::from_bits(bf16_gemm::round_to_bf16_bits(v) as u16);
                    }
                },
            );
        }
    });
}

/// `x · sigmoid(alpha · x)` in one pass. The per-element `exp` was a tenth of the CLIP-L
/// tower's forward time as libm's scalar `expf` ([`exp`] here vectorises).
pub fn sigmoid_gate(x: &Tensor, alpha: f32) -> CResult<Tensor> {
    x.contiguous()?.apply_op1(SigmoidGate { alpha })
}

/// The elements a rayon task handles in the element-wise kernels.
const CHUNK: usize = 1 << 13;

/// `exp(x)` for f32 with Cephes' `expf` polynomial (within 2 ulp over the normal range),
/// branch-free so that loops over it vectorise. Rounds with the 1.5·2²³ trick instead of
/// `floor`, which would be a libm call without SSE4.1 at compile time.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_2e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * (r * r) + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

#[inline(always)]
fn sigmoid(t: f32) -> f32 {
    1.0 / (1.0 + exp(-t))
}

/// Runs `f` over matching chunks of `out` and `inputs`, compiled for AVX-512 or AVX2 where the
/// CPU has them (the build itself targets baseline x86-64).
fn map_chunks<const N: usize>(
    out: &mut [f32],
    inputs: [&[f32]; N],
    f: impl Fn(&mut [f32], [&[f32]; N]) + Sync + Copy,
) {
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(i, o)| {
        let start = i * CHUNK;
        let ins = inputs.map(|x| &x[start..start + o.len()]);
        dispatch(o, ins, f);
    });
}

fn dispatch<const N: usize>(
    o: &mut [f32],
    ins: [&[f32]; N],
    f: impl Fn(&mut [f32], [&[f32]; N]) + Copy,
) {
    simd(
        #[inline(always)]
        || f(o, ins),
    )
}

/// Runs `f` compiled for AVX-512, else AVX2+FMA, whichever the CPU has: the kernels here are
/// written as plain loops that the compiler vectorises once it may use those instructions.
#[cfg(target_arch = "x86_64")]
pub(crate) fn simd<R>(f: impl FnOnce() -> R) -> R {
    #[target_feature(enable = "avx512f")]
    fn avx512<R>(f: impl FnOnce() -> R) -> R {
        f()
    }
    #[target_feature(enable = "avx2,fma")]
    fn avx2<R>(f: impl FnOnce() -> R) -> R {
        f()
    }
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has the feature the function is compiled for.
        unsafe { avx512(f) }
    } else if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
    {
        // SAFETY: as above.
        unsafe { avx2(f) }
    } else {
        f()
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn simd<R>(f: impl FnOnce() -> R) -> R {
    f()
}

struct SigmoidGate {
    alpha: f32,
}

impl CustomOp1 for SigmoidGate {
    fn name(&self) -> &'static str {
        "fused-sigmoid-gate"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let alpha = self.alpha;
        let gate = move |out: &mut [f32], [x]: [&[f32]; 1]| {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = v * sigmoid(alpha * v);
            }
        };
        if let CpuStorage::BF16(_) = s {
            let x = data_bf16(s, l, self.name())?;
            let mut y = vec![half::bf16::ZERO; x.len()];
            map_chunks_bf16(&mut y, [x], gate);
            return Ok((CpuStorage::BF16(y), l.shape().clone()));
        }
        let x = data(s, l, self.name())?;
        let mut y = vec![0f32; x.len()];
        map_chunks(&mut y, [x], gate);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let op = SigmoidGateBackward { alpha: self.alpha };
        Ok(Some(x.apply_op2(&grad.contiguous()?, op)?))
    }
}

/// `(x, dy)` → `dy · (s + αx·s·(1 − s))` with `s = σ(αx)`.
struct SigmoidGateBackward {
    alpha: f32,
}

impl CustomOp2 for SigmoidGateBackward {
    fn name(&self) -> &'static str {
        "fused-sigmoid-gate-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        if l1.shape().elem_count() != l2.shape().elem_count() {
            candle_core::bail!(
                "{}: {} inputs, {} gradients",
                self.name(),
                l1.shape().elem_count(),
                l2.shape().elem_count()
            );
        }
        let alpha = self.alpha;
        let gate = move |out: &mut [f32], [x, dy]: [&[f32]; 2]| {
            for ((o, &v), &g) in out.iter_mut().zip(x).zip(dy) {
                let s = sigmoid(alpha * v);
                *o = g * (s + alpha * v * s * (1.0 - s));
            }
        };
        if let (CpuStorage::BF16(_), CpuStorage::BF16(_)) = (s1, s2) {
            let (x, dy) = (
                data_bf16(s1, l1, self.name())?,
                data_bf16(s2, l2, self.name())?,
            );
            let mut dx = vec![half::bf16::ZERO; x.len()];
            map_chunks_bf16(&mut dx, [x, dy], gate);
            return Ok((CpuStorage::BF16(dx), l1.shape().clone()));
        }
        let (x, dy) = (data(s1, l1, self.name())?, data(s2, l2, self.name())?);
        let mut dx = vec![0f32; x.len()];
        map_chunks(&mut dx, [x, dy], gate);
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding

/// Rotary embedding, "rotate half" convention: `x` is `[batch, heads, seq, dim]`, `cos`/`sin`
/// are `[seq, dim/2]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> CResult<Tensor> {
    x.contiguous()?.apply_op3(
        &cos.contiguous()?,
        &sin.contiguous()?,
        Rope { inverse: false },
    )
}

/// Rotation by the angles of `cos`/`sin`, or by their negatives (the backward: a rotation's
/// transpose is its inverse).
struct Rope {
    inverse: bool,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (x, cos, sin) = (
            data(s1, l1, self.name())?,
            data(s2, l2, self.name())?,
            data(s3, l3, self.name())?,
        );
        let dims = l1.dims();
        if dims.len() != 4 || !dims[3].is_multiple_of(2) {
            candle_core::bail!(
                "{}: expected [batch, heads, seq, even dim], got {dims:?}",
                self.name()
            );
        }
        let (seq, d) = (dims[2], dims[3]);
        let half = d / 2;
        if cos.len() != seq * half || sin.len() != seq * half {
            candle_core::bail!("{}: cos/sin must be [{seq}, {half}]", self.name());
        }
        let sign = if self.inverse { -1f32 } else { 1f32 };
        let mut y = vec![0f32; x.len()];
        par_rows(&mut y, d, |i, out| {
            let row = &x[i * d..(i + 1) * d];
            let t = i % seq;
            let (c, s) = (
                &cos[t * half..(t + 1) * half],
                &sin[t * half..(t + 1) * half],
            );
            for j in 0..half {
                let (x1, x2, sj) = (row[j], row[j + half], sign * s[j]);
                out[j] = x1 * c[j] - x2 * sj;
                out[j + half] = x2 * c[j] + x1 * sj;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = grad.contiguous()?.apply_op3(
            cos,
            sin,
            Rope {
                inverse: !self.inverse,
            },
        )?;
        Ok((Some(dx), None, None))
    }
}

// ---------------------------------------------------------------------------------------------
// Bias add

/// `x + bias` with `bias` broadcast over every leading dim (`bias` has the shape of `x`'s
/// trailing dims, flattened). The bias gradient is a plain column sum.
pub fn add_bias(x: &Tensor, bias: &Tensor) -> CResult<Tensor> {
    x.contiguous()?.apply_op2(bias, AddBias)
}

struct AddBias;

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "fused-add-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (x, b) = (data(s1, l1, self.name())?, data(s2, l2, self.name())?);
        let d = b.len().max(1);
        if !x.len().is_multiple_of(d) {
            candle_core::bail!(
                "{}: {} values do not split into rows of {d}",
                self.name(),
                x.len()
            );
        }
        let mut y = vec![0f32; x.len()];
        par_rows(&mut y, d, |i, out| {
            for ((o, &v), &c) in out.iter_mut().zip(&x[i * d..(i + 1) * d]).zip(b) {
                *o = v + c;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let sums = grad.contiguous()?.apply_op1(ColumnSum {
            width: bias.elem_count(),
        })?;
        Ok((Some(grad.clone()), Some(sums.reshape(bias.shape())?)))
    }
}

/// The sum of every row of `width` values.
struct ColumnSum {
    width: usize,
}

impl CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "fused-column-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = data(s, l, self.name())?;
        let d = self.width.max(1);
        let block = block_rows(x.len() / d);
        let sums = x
            .par_chunks(block * d)
            .map(|chunk| {
                let mut partial = vec![vec![0f32; d]];
                for row in chunk.chunks(d) {
                    for (p, &v) in partial[0].iter_mut().zip(row) {
                        *p += v;
                    }
                }
                partial
            })
            .reduce(|| vec![vec![0f32; d]], add_partials);
        let sum = sums.into_iter().next().unwrap_or_else(|| vec![0f32; d]);
        Ok((CpuStorage::F32(sum), Shape::from(d)))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::kernels::bits;
    use candle_core::{D, Device, Var};

    pub(crate) fn random(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
    }

    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .expect("diff")
    }

    /// Runs `f` on fresh vars of `inputs` and returns the output and each input's gradient of
    /// `Σ output · probe` (a random probe, so every output element matters differently).
    fn value_and_grads(
        inputs: &[Tensor],
        f: impl Fn(&[Tensor]) -> CResult<Tensor>,
    ) -> (Tensor, Vec<Tensor>) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).expect("var"))
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts).expect("forward");
        let probe = random(y.dims(), 99);
        let loss = (&y * &probe).and_then(|p| p.sum_all()).expect("loss");
        let grads = loss.backward().expect("backward");
        let g = ts
            .iter()
            .map(|t| grads.get(t).expect("gradient").clone())
            .collect();
        (y, g)
    }

    fn agree(
        inputs: &[Tensor],
        fused: impl Fn(&[Tensor]) -> CResult<Tensor>,
        composite: impl Fn(&[Tensor]) -> CResult<Tensor>,
    ) {
        let (y1, g1) = value_and_grads(inputs, fused);
        let (y2, g2) = value_and_grads(inputs, composite);
        assert!(max_diff(&y1, &y2) < 1e-5, "forward {}", max_diff(&y1, &y2));
        for (i, (a, b)) in g1.iter().zip(&g2).enumerate() {
            assert_eq!(a.dims(), b.dims());
            assert!(max_diff(a, b) < 1e-4, "gradient {i}: {}", max_diff(a, b));
        }
    }

    #[test]
    fn layer_norm_matches_the_composite_formula() {
        let inputs = [random(&[3, 70, 48], 1), random(&[48], 2), random(&[48], 3)];
        agree(
            &inputs,
            |t| layer_norm(&t[0], &t[1], &t[2], 1e-5),
            |t| {
                let mean = t[0].mean_keepdim(D::Minus1)?;
                let c = t[0].broadcast_sub(&mean)?;
                let var = c.sqr()?.mean_keepdim(D::Minus1)?;
                c.broadcast_div(&(var + 1e-5)?.sqrt()?)?
                    .broadcast_mul(&t[1])?
                    .broadcast_add(&t[2])
            },
        );
    }

    #[test]
    fn rms_norm_matches_the_composite_formula() {
        let inputs = [random(&[2, 90, 40], 4), random(&[40], 5)];
        agree(
            &inputs,
            |t| rms_norm(&t[0], &t[1], 1e-6),
            |t| {
                let var = t[0].sqr()?.mean_keepdim(D::Minus1)?;
                t[0].broadcast_div(&(var + 1e-6)?.sqrt()?)?
                    .broadcast_mul(&t[1])
            },
        );
    }

    #[test]
    fn sigmoid_gate_matches_silu_and_quick_gelu() {
        let x = (random(&[3, 40, 70], 7) * 5.0).expect("scale");
        agree(
            std::slice::from_ref(&x),
            |t| sigmoid_gate(&t[0], 1.0),
            |t| t[0].silu(),
        );
        agree(
            &[x],
            |t| sigmoid_gate(&t[0], 1.702),
            |t| &t[0] * candle_nn::ops::sigmoid(&(&t[0] * 1.702)?)?,
        );
    }

    /// In bf16 the gate and its gradient are the f32 ones of the widened values, rounded once.
    #[test]
    fn sigmoid_gate_in_bf16_is_the_f32_gate_rounded_once() {
        let bf = |t: &Tensor| t.to_dtype(DType::BF16).expect("bf16");
        let wide = |t: &Tensor| t.to_dtype(DType::F32).expect("f32");
        let x = bf(&(random(&[3, 40, 70], 9) * 5.0).expect("scale"));
        let g = bf(&random(&[3, 40, 70], 10));
        assert!(gate_applies(&x));
        for alpha in [1.0, 1.702] {
            let (xb, xf) = (
                Var::from_tensor(&x).expect("var"),
                Var::from_tensor(&wide(&x)).expect("var"),
            );
            let yb = sigmoid_gate(&xb, alpha).expect("bf16 gate");
            let yf = sigmoid_gate(&xf, alpha).expect("f32 gate");
            assert_eq!(yb.dtype(), DType::BF16);
            assert_eq!(bits(&yb), bits(&bf(&yf)), "forward, alpha {alpha}");
            let gb = (yb * &g)
                .and_then(|y| y.sum_all())
                .expect("loss")
                .backward();
            let gf = (yf * wide(&g))
                .and_then(|y| y.sum_all())
                .expect("loss")
                .backward();
            let (gb, gf) = (gb.expect("grads"), gf.expect("grads"));
            let (db, df) = (gb.get(&xb).expect("dx"), gf.get(&xf).expect("dx"));
            assert_eq!(db.dtype(), DType::BF16);
            assert_eq!(bits(db), bits(&bf(df)), "backward, alpha {alpha}");
        }
    }

    #[test]
    fn exp_is_within_a_few_ulp_of_libm() {
        let mut worst = 0f32;
        for i in -87_000..88_000 {
            let x = i as f32 * 1e-3 + 3.3e-4;
            let (a, b) = (exp(x), x.exp());
            worst = worst.max((a - b).abs() / b);
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
        // Far outside the range it saturates instead of turning into NaN.
        assert!(exp(-1e4) >= 0.0 && exp(-1e4) < 1e-37);
        assert!(exp(1e4).is_finite() && exp(1e4) > 1e38);
        assert!(sigmoid(-1e4) >= 0.0 && sigmoid(-1e4) < 1e-37);
        assert_eq!(sigmoid(1e4), 1.0);
    }

    #[test]
    fn softmax_matches_the_composite_formula() {
        let x = (random(&[2, 3, 50, 50], 6) * 4.0).expect("scale");
        agree(
            &[x],
            |t| softmax_last_dim(&t[0]),
            |t| candle_nn::ops::softmax(&t[0], D::Minus1),
        );
    }

    #[test]
    fn softmax_gives_masked_scores_exact_zeros_and_no_denormals() {
        // A causal row as the decoder masks it: a large finite negative past the diagonal.
        let row: Vec<f32> = (0..40)
            .map(|i| if i < 7 { i as f32 * 0.1 } else { -1e9 })
            .collect();
        let x = Tensor::from_vec(row, (1, 40), &Device::Cpu).expect("tensor");
        let y: Vec<f32> = softmax_last_dim(&x)
            .and_then(|y| y.flatten_all())
            .and_then(|y| y.to_vec1())
            .expect("softmax");
        assert!(y[7..].iter().all(|&p| p == 0.0));
        assert!(y.iter().all(|p| *p == 0.0 || p.is_normal()));
        assert!((y.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn rope_matches_the_composite_formula_and_its_backward_inverts_it() {
        let (cos, sin) = {
            let angles = random(&[40, 8], 7);
            (angles.cos().expect("cos"), angles.sin().expect("sin"))
        };
        let x = random(&[2, 3, 40, 16], 8);
        // The composite path sees a transposed (non-contiguous) input, as attention gives it.
        let xt = x.transpose(1, 2).expect("t").contiguous().expect("c");
        agree(
            &[xt],
            |t| rope(&t[0].transpose(1, 2)?, &cos, &sin),
            |t| candle_nn::rotary_emb::rope_slow(&t[0].transpose(1, 2)?.contiguous()?, &cos, &sin),
        );
    }

    #[test]
    fn add_bias_matches_a_broadcast_add() {
        let inputs = [random(&[5, 7, 24], 9), random(&[24], 10)];
        agree(
            &inputs,
            |t| add_bias(&t[0], &t[1]),
            |t| t[0].broadcast_add(&t[1]),
        );
        // A bias over the two trailing dims (position embeddings over a batch).
        let inputs = [random(&[4, 6, 8], 11), random(&[6, 8], 12)];
        agree(
            &inputs,
            |t| add_bias(&t[0], &t[1].flatten_all()?.reshape((6, 8))?),
            |t| t[0].broadcast_add(&t[1]),
        );
    }

    #[test]
    fn only_f32_on_the_cpu_takes_the_fused_path() {
        let x = random(&[2, 2], 0);
        assert!(applies(&[&x]));
        assert!(!applies(&[&x.to_dtype(DType::BF16).expect("bf16")]));
    }
}
