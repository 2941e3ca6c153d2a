//! `--load-8bit` weights: blocks of 32 int8 values sharing one f32 scale (ggml's `Q8_0` with a
//! full-precision scale), and the products decoding needs from them.
//!
//! Decoding one token reads every weight once, so it is bound by memory: the GEMV here reads
//! 1.125 bytes per weight instead of f32's 4 and widens each value to f32 in registers, with
//! f32 sums like the dense GEMV (`gemv.rs`). candle's `Q8_0` kernel first quantizes the
//! activations to 8 bits too and decoded 0.87× as fast as torch's int8 on the dev box.
//! Prefill multiplies many rows and is bound by arithmetic instead: there the weight is widened
//! to f32 once and goes through the dense GEMM.

use candle_core::{DType, Storage, Tensor};
use rayon::prelude::*;

use crate::kernels::fused::contiguous;
use crate::kernels::gemv;

/// Values per scale.
pub const BLOCK: usize = 32;

#[derive(Debug, Clone)]
pub struct Q8Weight {
    /// `[n, k]`: `n` rows (outputs) of `k` values.
    pub n: usize,
    pub k: usize,
    /// `[n, k / BLOCK]`
    scales: Vec<f32>,
    /// `[n, k]`
    quants: Vec<i8>,
}

impl Q8Weight {
    /// Rounds each block of 32 to the nearest of 255 steps of `max |w| / 127`. `k` must be a
    /// multiple of [`BLOCK`].
    pub fn quantize(w: &[f32], n: usize, k: usize) -> Self {
        debug_assert!(k.is_multiple_of(BLOCK) && w.len() == n * k);
        let mut scales = vec![0f32; n * k / BLOCK];
        let mut quants = vec![0i8; n * k];
        scales
            .par_chunks_mut(k / BLOCK)
            .zip(quants.par_chunks_mut(k))
            .zip(w.par_chunks(k))
            .for_each(|((s, q), w)| {
                for ((d, q), w) in s.iter_mut().zip(q.chunks_mut(BLOCK)).zip(w.chunks(BLOCK)) {
                    let amax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
                    *d = amax / 127.0;
                    let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
                    for (q, v) in q.iter_mut().zip(w) {
                        *q = (v * inv).round() as i8;
                    }
                }
            });
        Self {
            n,
            k,
            scales,
            quants,
        }
    }

    /// Quantizes a `[n, k]` tensor: an f32 one read where it lies, without a copy (a vocabulary
    /// matrix is 263 MB on a 1B model, and the allocator keeps what a copy takes), any other
    /// dtype widened first.
    pub fn quantize_tensor(w: &Tensor) -> candle_core::Result<Self> {
        let (n, k) = w.dims2()?;
        if w.dtype() != DType::F32 || !w.is_contiguous() {
            return Self::quantize_tensor(&w.to_dtype(DType::F32)?.contiguous()?);
        }
        let (storage, layout) = w.storage_and_layout();
        match &*storage {
            Storage::Cpu(cpu) => Ok(Self::quantize(
                contiguous(cpu.as_slice::<f32>()?, layout, "q8")?,
                n,
                k,
            )),
            _ => Ok(Self::quantize(&w.flatten_all()?.to_vec1::<f32>()?, n, k)),
        }
    }

    /// The weight widened to f32, `[n, k]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.n * self.k];
        w.par_chunks_mut(BLOCK)
            .zip(self.quants.par_chunks(BLOCK))
            .zip(self.scales.par_iter())
            .for_each(|((w, q), &d)| {
                for (w, &q) in w.iter_mut().zip(q) {
                    *w = f32::from(q) * d;
                }
            });
        w
    }

    /// Rows `ids` widened to f32, `[ids.len(), k]`: an embedding lookup. Every id must be
    /// below `n`.
    pub fn rows(&self, ids: &[u32]) -> Vec<f32> {
        let (k, blocks) = (self.k, self.k / BLOCK);
        let mut out = vec![0f32; ids.len() * k];
        for (row, &id) in out.chunks_mut(k).zip(ids) {
            let id = id as usize;
            let q = &self.quants[id * k..(id + 1) * k];
            let s = &self.scales[id * blocks..(id + 1) * blocks];
            for ((w, q), &d) in row.chunks_mut(BLOCK).zip(q.chunks(BLOCK)).zip(s) {
                for (w, &q) in w.iter_mut().zip(q) {
                    *w = f32::from(q) * d;
                }
            }
        }
        out
    }

    /// `x Wᵀ` for `x: [m, k]`, giving `[m, n]`, each weight row read once for all `m` rows.
    pub fn matmul_t(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        debug_assert_eq!(x.len(), m * k);
        let blocks = k / BLOCK;
        gemv::by_weight_rows(
            m,
            n,
            #[inline(always)]
            |j0, out: &mut [f32]| {
                for (r, out) in out.chunks_mut(m).enumerate() {
                    let j = j0 + r;
                    let q = &self.quants[j * k..(j + 1) * k];
                    let s = &self.scales[j * blocks..(j + 1) * blocks];
                    for (i, o) in out.iter_mut().enumerate() {
                        *o = dot(&x[i * k..(i + 1) * k], q, s);
                    }
                }
            },
        )
    }
}

/// `Σ_b d_b · Σ_l q_{b,l} x_{b,l}` in four independent chains of 8 lanes, so that no add waits
/// on the one before it.
#[inline(always)]
fn dot(x: &[f32], q: &[i8], scales: &[f32]) -> f32 {
    let mut total = [[0f32; 8]; 4];
    for ((x, q), &d) in x.chunks_exact(BLOCK).zip(q.chunks_exact(BLOCK)).zip(scales) {
        for (c, total) in total.iter_mut().enumerate() {
            for l in 0..8 {
                let p = f32::from(q[c * 8 + l]) * x[c * 8 + l];
                total[l] = p.mul_add(d, total[l]);
            }
        }
    }
    total.iter().flatten().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn product_is_the_dequantized_weights_product() {
        let (n, k) = (37, 96);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let q = Q8Weight::quantize(&w, n, k);
        let dense = q.dequantize();
        // Each value is within half a step of its block's scale.
        for (b, (w, d)) in w.chunks(BLOCK).zip(dense.chunks(BLOCK)).enumerate() {
            let step = q.scales[b];
            assert!(
                w.iter()
                    .zip(d)
                    .all(|(a, b)| (a - b).abs() <= step / 2.0 + 1e-6)
            );
        }
        for m in [1, 3] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0)
                .collect();
            let got = q.matmul_t(&x, m);
            for i in 0..m {
                for j in 0..n {
                    let want: f32 = (0..k).map(|l| x[i * k + l] * dense[j * k + l]).sum();
                    let g = got[i * n + j];
                    assert!(
                        (g - want).abs() <= 1e-4 * want.abs().max(1.0),
                        "{i},{j}: {g} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn rows_are_the_dequantized_rows() {
        let (n, k) = (9, 64);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let q = Q8Weight::quantize(&w, n, k);
        let dense = q.dequantize();
        let got = q.rows(&[4, 0, 4, 8]);
        for (r, id) in [4usize, 0, 4, 8].into_iter().enumerate() {
            assert_eq!(got[r * k..(r + 1) * k], dense[id * k..(id + 1) * k]);
        }
    }
}
