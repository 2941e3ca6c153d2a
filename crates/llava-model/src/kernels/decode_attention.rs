//! Attention of one new query per sequence against the cached keys and values, on the CPU: the
//! attention of a decoding step.
//!
//! Written as two batched products (`q Kᵀ`, then `P V`) it ran inside the GEMM on one thread
//! while the other core waited: about 5% of a 4-bit decoding step's samples at 600 cached
//! positions on the 2-core dev box (BENCHMARKS.md). Here each (sequence, key/value head) is one
//! task that reads its keys and values once, in place in the cache's buffers (rows of
//! `head_dim` values, any head and batch stride), for all the query heads that share them.
//!
//! The numbers are those of the products: f32 sums, then the softmax of
//! [`crate::kernels::fused::softmax_last_dim`] (the same `exp`, exact zeros for masked keys).

use candle_core::{DType, Tensor};
use std::sync::{Mutex, PoisonError};

use rayon::prelude::*;

use crate::error::Result;
use crate::kernels::attention::{Strided, bias_values, cpu_values, in_rows, values};
use crate::kernels::fused::{simd, softmax_in_place};
use crate::kernels::gemv::dot;

/// Whether [`attention`] takes these operands: f32 on the CPU, `q: [b, heads, 1, d]`
/// contiguous, `k`, `v`: `[b, kv_heads, t, d]` whose positions are rows of `d` contiguous
/// values (a view of the cache's buffers), `heads` a multiple of `kv_heads`.
pub fn applies(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    let (Ok((b, nh, s, d)), Ok((kb, nkv, _, kd))) = (q.dims4(), k.dims4()) else {
        return false;
    };
    [q, k, v]
        .iter()
        .all(|x| x.device().is_cpu() && x.dtype() == DType::F32)
        && q.is_contiguous()
        && in_rows(k)
        && in_rows(v)
        && v.dims() == k.dims()
        && s == 1
        && b == kb
        && d == kd
        && nkv > 0
        && nh.is_multiple_of(nkv)
}

/// The threads that run [`attention`]'s tasks: those of the step's weight products. Each pool's
/// workers spin for a while after their work; running the attention on the other pool left
/// its idle worker spinning beside the two busy ones, three threads on two cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// rayon's pool: the f32, bf16 and 8-bit products.
    Rayon,
    /// candle's barrier pool (`candle_core::utils::barrier_pool`): candle's 4-bit products.
    Candle,
}

/// `softmax(q kᵀ + bias) v` per head for one query per sequence, `q` already scaled; see
/// [`applies`]. Query head `h` reads key/value head `h / (heads / kv_heads)`, as transformers'
/// `repeat_kv`. `bias` (`[b, 1, 1, t]`, f32, added to the scores) carries padding and windows.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    threads: Threads,
) -> Result<Tensor> {
    let (b, nh, _, d) = q.dims4()?;
    let (_, nkv, t, _) = k.dims4()?;
    let n_rep = nh / nkv;
    let bias = bias_values(bias, (b, 1, 1, t))?;
    let ((qs, ql), (ks, kl), (vs, vl)) = (
        q.storage_and_layout(),
        k.storage_and_layout(),
        v.storage_and_layout(),
    );
    let (q, k, v) = (
        cpu_values(&qs, ql)?,
        Strided::new(values(&ks, kl)?, kl),
        Strided::new(values(&vs, vl)?, vl),
    );
    let mut out = vec![0f32; b * nh * d];
    // The scores, in a buffer the calling thread keeps: a fresh zeroed one per layer was
    // handed back to the OS between steps and faulted in again, zeroed by the kernel (3% of
    // a 4-bit step's samples).
    let mut probs = SCORES.with_borrow_mut(std::mem::take);
    probs.resize(b * nh * t, 0.0);
    // Each task's output rows and scores, locked once by the one task that writes them.
    let pieces: Vec<Mutex<(&mut [f32], &mut [f32])>> = out
        .chunks_mut(n_rep * d)
        .zip(probs.chunks_mut(n_rep * t))
        .map(Mutex::new)
        .collect();
    let task = |task: usize| {
        let (bi, g) = (task / nkv, task % nkv);
        let group = Group {
            q: &q[(bi * nh + g * n_rep) * d..][..n_rep * d],
            k: k.head(bi, g, t, d),
            v: v.head(bi, g, t, d),
            bias: bias.as_deref().map(|m| &m[bi * t..(bi + 1) * t]),
            d,
        };
        let mut piece = pieces[task].lock().unwrap_or_else(PoisonError::into_inner);
        let (out, probs) = &mut *piece;
        simd(
            #[inline(always)]
            || group.run(out, probs),
        )
    };
    // A small model's or a short context's attention is cheaper than waking a pool's workers,
    // which then spin beside the threads that serve the model (the HTTP server's, the next
    // step's).
    if b * nh * t * d < SERIAL_BELOW {
        (0..pieces.len()).for_each(task);
    } else {
        match threads {
            Threads::Rayon => (0..pieces.len()).into_par_iter().for_each(task),
            Threads::Candle => candle_core::utils::barrier_pool()
                .execute_chunked(pieces.len(), |tasks| tasks.for_each(task)),
        }
    }
    drop(pieces);
    SCORES.set(probs);
    Ok(Tensor::from_vec(
        out,
        (b, nh, 1, d),
        &candle_core::Device::Cpu,
    )?)
}

/// Multiply-adds of the scores (`b · heads · t · d`) below which [`attention`] runs on the calling
/// thread: about 30 µs of work.
const SERIAL_BELOW: usize = 1 << 18;

thread_local! {
    /// [`attention`]'s scores, kept between calls.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One task: the query heads that share a key/value head, of one sequence.
struct Group<'a> {
    /// `n_rep` query rows of `d`.
    q: &'a [f32],
    /// `t` rows of `d`.
    k: &'a [f32],
    v: &'a [f32],
    bias: Option<&'a [f32]>,
    d: usize,
}

impl Group<'_> {
    /// Writes the `n_rep` output rows of `d` into `out` (zeros on entry), with `probs` (`n_rep`
    /// rows of `t`) for the scores.
    #[inline(always)]
    fn run(&self, out: &mut [f32], probs: &mut [f32]) {
        let d = self.d;
        let t = self.k.len() / d;
        // Keys in blocks of 16 on AVX-512: one vector of 16 scores per block and query row.
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if d.is_multiple_of(16) && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F; `d` is a multiple of 16 and `probs` holds a row
            // of `t` per query row.
            done = unsafe { avx512::scores(self.q, self.k, d, t, probs) };
        }
        for (j, key) in self.k.chunks_exact(d).enumerate().skip(done) {
            for (r, q) in self.q.chunks_exact(d).enumerate() {
                probs[r * t + j] = dot(q, key);
            }
        }
        for row in probs.chunks_exact_mut(t) {
            if let Some(bias) = self.bias {
                for (p, b) in row.iter_mut().zip(bias) {
                    *p += b;
                }
            }
            softmax_in_place(row);
        }
        match d {
            64 => weighted_values::<64>(self.v, probs, out),
            128 => weighted_values::<128>(self.v, probs, out),
            _ => {
                for (j, value) in self.v.chunks_exact(d).enumerate() {
                    for (r, out) in out.chunks_exact_mut(d).enumerate() {
                        let p = probs[r * t + j];
                        for (o, x) in out.iter_mut().zip(value) {
                            *o = p.mul_add(*x, *o);
                        }
                    }
                }
            }
        }
    }
}

/// `out[r] += Σ_j probs[r][j] · v[j]` for a head size known when compiling, so that an output
/// row's sums stay in registers: keys in blocks that stay in L1 for every query row.
#[inline(always)]
fn weighted_values<const D: usize>(v: &[f32], probs: &[f32], out: &mut [f32]) {
    const KEYS: usize = 64;
    let t = v.len() / D;
    for j0 in (0..t).step_by(KEYS) {
        let keys = j0..(j0 + KEYS).min(t);
        for (r, out) in out.chunks_exact_mut(D).enumerate() {
            let mut acc = [0f32; D];
            acc.copy_from_slice(out);
            for j in keys.clone() {
                let p = probs[r * t + j];
                let value = &v[j * D..(j + 1) * D];
                for l in 0..D {
                    acc[l] = p.mul_add(value[l], acc[l]);
                }
            }
            out.copy_from_slice(&acc);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// The scores of every query row (`q`: rows of `d`) against the keys (`k`: `t` rows of
    /// `d`) in whole blocks of 16 keys, into `probs` (a row of `t` per query row). Returns the
    /// keys done, a multiple of 16; the caller does the rest.
    ///
    /// # Safety
    /// The CPU has AVX-512F, `d` is a multiple of 16, `k` holds `t` rows and `probs` a row of
    /// `t` for each row of `q`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scores(
        q: &[f32],
        k: &[f32],
        d: usize,
        t: usize,
        probs: &mut [f32],
    ) -> usize {
        let full = t / 16 * 16;
        for j in (0..full).step_by(16) {
            for (r, q) in q.chunks_exact(d).enumerate() {
                // SAFETY: key rows j..j + 16 < t and lanes c..c + 16 ≤ d are inside `k` and
                // `q`; the 16 scores land in row r's first `full` values.
                unsafe {
                    let mut acc = [_mm512_setzero_ps(); 16];
                    for c in (0..d).step_by(16) {
                        let qv = _mm512_loadu_ps(q.as_ptr().add(c));
                        for (u, acc) in acc.iter_mut().enumerate() {
                            let kv = _mm512_loadu_ps(k.as_ptr().add((j + u) * d + c));
                            *acc = _mm512_fmadd_ps(qv, kv, *acc);
                        }
                    }
                    _mm512_storeu_ps(probs.as_mut_ptr().add(r * t + j), sums(acc));
                }
            }
        }
        full
    }

    /// The sum of each of 16 vectors, as one vector (lane `u` = the sum of `a[u]`): a tree of
    /// unpacks and lane shuffles, 45 instructions for the 16 sums instead of a horizontal sum
    /// each.
    #[target_feature(enable = "avx512f")]
    fn sums(a: [__m512; 16]) -> __m512 {
        // Pairs: in each 128-bit lane, [a0 0+2, a1 0+2, a0 1+3, a1 1+3].
        let b: [__m512; 8] = std::array::from_fn(|i| {
            let (x, y) = (a[2 * i], a[2 * i + 1]);
            _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y))
        });
        // Fours: in each 128-bit lane, that lane's sums of a[4i..4i + 4].
        let c: [__m512; 4] = std::array::from_fn(|i| {
            let (x, y) = (_mm512_castps_pd(b[2 * i]), _mm512_castps_pd(b[2 * i + 1]));
            _mm512_add_ps(
                _mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)),
            )
        });
        // The four 128-bit lanes of each: halves, then quarters.
        let half = |x: __m512, y: __m512| {
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b01_00_01_00>(x, y),
                _mm512_shuffle_f32x4::<0b11_10_11_10>(x, y),
            )
        };
        let (e01, e23) = (half(c[0], c[1]), half(c[2], c[3]));
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(e01, e23),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(e01, e23),
        )
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::kernels::fused::softmax_last_dim;

    fn random(shape: (usize, usize, usize, usize), seed: u64) -> Tensor {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
    }

    /// The products and softmax written out, as the decoder's three-step path computes them,
    /// with K/V heads repeated.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>) -> Tensor {
        let n_rep = q.dim(1).unwrap() / k.dim(1).unwrap();
        let rep = |x: &Tensor| {
            let (b, h, t, d) = x.dims4().unwrap();
            x.unsqueeze(2)
                .unwrap()
                .expand((b, h, n_rep, t, d))
                .unwrap()
                .reshape((b, h * n_rep, t, d))
                .unwrap()
        };
        let (k, v) = (rep(k), rep(v));
        let scores = q.matmul(&k.t().unwrap()).unwrap();
        let scores = match bias {
            Some(m) => scores.broadcast_add(m).unwrap(),
            None => scores,
        };
        softmax_last_dim(&scores).unwrap().matmul(&v).unwrap()
    }

    /// Against the written-out attention, for grouped and plain heads, a batch with a padding
    /// bias, a head size with a tail, and keys and values read in place from buffers with room
    /// (a view that is not contiguous).
    #[test]
    fn agrees_with_the_products() -> Result<()> {
        for (b, nh, nkv, t, d, cap) in [
            (1, 8, 2, 37, 64, 37),
            (1, 32, 4, 600, 64, 640),
            (3, 4, 4, 19, 24, 32),
            (2, 6, 3, 1, 16, 8),
            (1, 4, 1, 48, 128, 50),
        ] {
            let q = random((b, nh, 1, d), 1);
            let k = random((b, nkv, cap, d), 2).narrow(2, 0, t)?;
            let v = random((b, nkv, cap, d), 3).narrow(2, 0, t)?;
            let bias = (b > 1).then(|| {
                let m: Vec<f32> = (0..b * t)
                    .map(|i| if i % t < i / t { f32::MIN } else { 0.0 })
                    .collect();
                Tensor::from_vec(m, (b, 1, 1, t), &Device::Cpu).expect("bias")
            });
            assert!(applies(&q, &k, &v));
            let want = reference(&q, &k.contiguous()?, &v.contiguous()?, bias.as_ref());
            for threads in [Threads::Rayon, Threads::Candle] {
                let got = attention(&q, &k, &v, bias.as_ref(), threads)?;
                let diff = (got - &want)?
                    .abs()?
                    .flatten_all()?
                    .max(0)?
                    .to_scalar::<f32>()?;
                assert!(
                    diff < 1e-5,
                    "b {b} heads {nh}/{nkv} t {t} d {d} {threads:?}: {diff}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn refuses_what_it_does_not_take() {
        let q = random((1, 4, 2, 16), 1);
        let k = random((1, 2, 5, 16), 2);
        assert!(!applies(&q, &k, &k), "two queries");
        let q = random((1, 3, 1, 16), 1);
        assert!(!applies(&q, &k, &k), "3 heads over 2");
        let q = random((1, 4, 1, 16), 1);
        assert!(applies(&q, &k, &k));
        assert!(!applies(&q, &k.t().unwrap(), &k), "keys transposed");
    }
}
