//! The decoding product: a few rows of activations against bf16 weight rows, as one decoded
//! token (or a server's batch of them) multiplies every weight matrix.
//!
//! Decoding reads each weight once, so it is bound by memory if the arithmetic keeps up.
//! Widening bf16 weights to f32 for f32 FMAs costs three instructions per 16 weights;
//! `vdpbf16ps` takes 32 weights straight from memory in one, each pair's two products added
//! into an f32 lane. Each weight row is read as one stream: on the dev box that drew more from
//! memory than four rows read side by side (BENCHMARKS.md).

use half::bf16;

use crate::supported;

/// The dot products of `R` rows of `x` (bf16, the activations rounded once by the caller)
/// with one weight row: the bf16 products summed in f32 lanes of pairs, four steps of 32
/// values in flight in separate sums, which are added at the end. A row of `x` gets the same
/// bits whatever `R` is, so a batch's row gets what it gets alone.
///
/// # Panics
/// If the CPU lacks AVX512-BF16 (check [`supported`]) or the rows' lengths differ.
pub fn dot_row<const R: usize>(x: [&[bf16]; R], w: &[bf16]) -> [f32; R] {
    assert!(supported(), "bf16_gemm::dot_row needs AVX512-BF16");
    let k = w.len();
    assert!(
        x.iter().all(|row| row.len() == k),
        "bf16_gemm::dot_row: rows of different lengths"
    );
    // SAFETY: `supported` checked the CPU; every row is `k` long.
    unsafe { kernel::dot_row(x, w, k) }
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use std::arch::x86_64::*;

    use half::bf16;

    /// Values per step: 16 lanes of bf16 pairs.
    const STEP: usize = 32;
    /// Steps in flight, each in its own sums.
    const UNROLL: usize = 4;

    /// # Safety
    /// The CPU has AVX-512 F and BW and AVX512-BF16; every row is `k` long.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn dot_row<const R: usize>(
        x: [&[bf16]; R],
        w: &[bf16],
        k: usize,
    ) -> [f32; R] {
        // SAFETY: every load is of `STEP` values below `k`, or masked to those below it.
        unsafe {
            let load = |row: &[bf16], c: usize| -> __m512bh {
                let p = row.as_ptr().add(c).cast::<i16>();
                let v = if c + STEP <= k {
                    _mm512_loadu_epi16(p)
                } else {
                    // The tail: the lanes past `k` load as zeros and add nothing.
                    _mm512_maskz_loadu_epi16((1u32 << (k - c)) - 1, p)
                };
                std::mem::transmute(v)
            };
            let mut acc = [[_mm512_setzero_ps(); UNROLL]; R];
            let mut c = 0;
            while c + UNROLL * STEP <= k {
                let b: [__m512bh; UNROLL] = std::array::from_fn(|u| load(w, c + u * STEP));
                for (acc, x) in acc.iter_mut().zip(&x) {
                    for (u, (acc, b)) in acc.iter_mut().zip(&b).enumerate() {
                        *acc = _mm512_dpbf16_ps(*acc, load(x, c + u * STEP), *b);
                    }
                }
                c += UNROLL * STEP;
            }
            while c < k {
                let b = load(w, c);
                for (acc, x) in acc.iter_mut().zip(&x) {
                    acc[0] = _mm512_dpbf16_ps(acc[0], load(x, c), b);
                }
                c += STEP;
            }
            acc.map(|acc| {
                let total =
                    _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
                _mm512_reduce_add_ps(total)
            })
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod kernel {
    use half::bf16;

    pub(super) unsafe fn dot_row<const R: usize>(
        _: [&[bf16]; R],
        _: &[bf16],
        _: usize,
    ) -> [f32; R] {
        unreachable!("AVX512-BF16 is not supported off x86-64")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(k: usize, seed: usize) -> Vec<bf16> {
        (0..k)
            .map(|i| bf16::from_f32((((i + seed) * 7919) % 1000) as f32 / 500.0 - 1.0))
            .collect()
    }

    /// Against f64 sums of the same bf16 values (each product exact in f32), for lengths with
    /// and without a tail and a partial last step; four rows at once give each row's bits alone.
    #[test]
    fn dot_row_agrees_with_the_exact_sums() {
        if !supported() {
            eprintln!("skipped: this CPU lacks AVX512-BF16");
            return;
        }
        for k in [1, 31, 32, 77, 128, 200, 2048] {
            let xs: Vec<Vec<bf16>> = (0..4).map(|s| row(k, 100 + s)).collect();
            let w = row(k, 0);
            let four = dot_row([0, 1, 2, 3].map(|i| xs[i].as_slice()), &w);
            for (i, x) in xs.iter().enumerate() {
                let one = dot_row([x.as_slice()], &w)[0];
                assert_eq!(one.to_bits(), four[i].to_bits(), "k {k}, row {i}");
                let exact: f64 = x
                    .iter()
                    .zip(&w)
                    .map(|(a, b)| f64::from(a.to_f32()) * f64::from(b.to_f32()))
                    .sum();
                assert!(
                    (f64::from(one) - exact).abs() <= 1e-5 * (k as f64).sqrt().max(1.0),
                    "k {k}: {one} vs {exact}"
                );
            }
        }
    }
}
