//! Scaled dot-product attention for inference on the CPU, in one pass per block of queries.
//!
//! Written as three products (`Q Kᵀ`, the softmax, `P V`), a prompt of 617 tokens and 32 heads
//! makes 49 MB of scores per decoder layer. Each is zeroed by the GEMM, written, masked into a
//! copy, normalised into another and read back, so prefill spent more time moving scores than
//! multiplying them, and computed every score past the causal diagonal only to zero it. Here a
//! task takes 32 query rows of one head: their scores (a few KiB per row) stay in cache from
//! the product to the softmax to `P V`, and keys after a query's position are never touched.
//!
//! The numbers are those of the three-step path: f32 sums, the softmax of
//! [`crate::kernels::fused::softmax_last_dim`] (the same `exp`, exact zeros for masked keys).

use candle_core::{CpuStorage, DType, Layout, Storage, Tensor};
use rayon::prelude::*;

use crate::error::{ModelError, Result};
use crate::kernels::fused::{self, simd, softmax_in_place};

/// Query rows per task.
const ROWS_PER_TASK: usize = 32;
/// Query rows that share each key's loads in the score product.
const ROW_GROUP: usize = 4;
/// Keys per score-product step: two AVX-512 vectors of sums per query row.
const KEYS: usize = 32;

/// Whether [`attention`] takes these operands: f32 on the CPU, `q: [b, heads, s, d]`,
/// `k`, `v`: `[b, kv_heads, t, d]` with `heads` a multiple of `kv_heads`, `s > 1` (a single
/// decoded query is a product of one row, which the GEMM already does well), a head size that
/// is a multiple of 16 up to 128, and a CPU with AVX-512 or AVX2+FMA.
pub fn applies(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    let (Ok((b, nh, s, d)), Ok((kb, nkv, t, kd))) = (q.dims4(), k.dims4()) else {
        return false;
    };
    [q, k, v]
        .iter()
        .all(|x| x.device().is_cpu() && x.dtype() == DType::F32)
        && v.dims() == k.dims()
        && b == kb
        && d == kd
        && nkv > 0
        && nh.is_multiple_of(nkv)
        && s > 1
        && s <= t
        && d.is_multiple_of(16)
        && (16..=128).contains(&d)
        && available()
}

/// `softmax(q kᵀ + bias) v` per head, for `q` already scaled; see [`applies`].
///
/// Query head `h` reads key/value head `h / (heads / kv_heads)`, as transformers' `repeat_kv`.
/// With `causal`, query `i` sees keys `0..=t - s + i` (the cache holds `t - s` earlier
/// positions). `bias` (`[b, 1, s, t]`, f32, added to the scores) carries padding.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    causal: bool,
) -> Result<Tensor> {
    let (b, nh, s, d) = q.dims4()?;
    let (_, nkv, t, _) = k.dims4()?;
    let bias = bias_values(bias, (b, 1, s, t))?;
    // Read in place: `contiguous` copies only a strided tensor, and keys and values whose
    // positions are rows (the cache's buffers with room) are read through their strides.
    let rows = |x: &Tensor| -> Result<Tensor> {
        Ok(if in_rows(x) {
            x.clone()
        } else {
            x.contiguous()?
        })
    };
    let (q, k, v) = (q.contiguous()?, rows(k)?, rows(v)?);
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
    // Keys transposed in panels of KEYS per kv head, `[b][kv head][t / KEYS][d][KEYS]`, so
    // that the score product runs along the keys; the padding keys are zeros.
    let tp = t.div_ceil(KEYS) * KEYS;
    let mut kt = vec![0f32; b * nkv * d * tp];
    kt.par_chunks_mut(d * tp).enumerate().for_each(|(bg, out)| {
        let keys = k.head(bg / nkv, bg % nkv, t, d);
        for (j, key) in keys.chunks_exact(d).enumerate() {
            let panel = &mut out[(j / KEYS) * d * KEYS..];
            for (l, &x) in key.iter().enumerate() {
                panel[l * KEYS + j % KEYS] = x;
            }
        }
    });
    let blocks = s.div_ceil(ROWS_PER_TASK);
    let mut out = vec![0f32; b * nh * s * d];
    // Tasks are (b, head, block of query rows); each writes its own rows of `out`.
    let pieces: Vec<&mut [f32]> = out
        .chunks_mut(s * d)
        .flat_map(|head| head.chunks_mut(ROWS_PER_TASK * d))
        .collect();
    pieces.into_par_iter().enumerate().for_each(|(task, out)| {
        let (bh, block) = (task / blocks, task % blocks);
        let (bi, h) = (bh / nh, bh % nh);
        let g = h / (nh / nkv);
        let i0 = block * ROWS_PER_TASK;
        let kv = bi * nkv + g;
        let rows = Rows {
            q: &q[(bh * s + i0) * d..][..out.len()],
            kt: &kt[kv * d * tp..(kv + 1) * d * tp],
            v: v.head(bi, g, t, d),
            bias: bias.as_deref().map(|m| &m[(bi * s + i0) * t..]),
            first: i0,
            causal,
            s,
            t,
        };
        match d / 16 {
            1 => block_attention::<1>(&rows, out),
            2 => block_attention::<2>(&rows, out),
            3 => block_attention::<3>(&rows, out),
            4 => block_attention::<4>(&rows, out),
            5 => block_attention::<5>(&rows, out),
            6 => block_attention::<6>(&rows, out),
            7 => block_attention::<7>(&rows, out),
            _ => block_attention::<8>(&rows, out),
        }
    });
    Ok(Tensor::from_vec(
        out,
        (b, nh, s, d),
        &candle_core::Device::Cpu,
    )?)
}

/// An additive attention bias broadcast to `shape` and read out, as the CPU kernels take it.
pub(crate) fn bias_values(
    bias: Option<&Tensor>,
    shape: (usize, usize, usize, usize),
) -> Result<Option<Vec<f32>>> {
    Ok(match bias {
        Some(m) => Some(m.broadcast_as(shape)?.flatten_all()?.to_vec1::<f32>()?),
        None => None,
    })
}

/// The f32 values of a CPU storage from the layout's start.
pub(crate) fn values<'a>(storage: &'a Storage, layout: &Layout) -> Result<&'a [f32]> {
    match storage {
        Storage::Cpu(CpuStorage::F32(v)) => Ok(&v[layout.start_offset()..]),
        _ => Err(ModelError::Input("attention takes f32 CPU tensors".into())),
    }
}

/// A `[b, heads, t, d]` tensor's values with its batch and head strides.
pub(crate) struct Strided<'a> {
    values: &'a [f32],
    batch: usize,
    head: usize,
}

impl<'a> Strided<'a> {
    /// `values` from the layout's start.
    pub(crate) fn new(values: &'a [f32], layout: &Layout) -> Self {
        let st = layout.stride();
        Self {
            values,
            batch: st[0],
            head: st[1],
        }
    }

    /// Head `h` of sequence `bi`: `t` rows of `d`.
    pub(crate) fn head(&self, bi: usize, h: usize, t: usize, d: usize) -> &'a [f32] {
        &self.values[bi * self.batch + h * self.head..][..t * d]
    }
}

/// Whether `x` (`[b, heads, t, d]`) holds each position as a row of `d` contiguous values, with
/// any head and batch strides: a view of the KV cache's buffers with room is read in place.
pub(crate) fn in_rows(x: &Tensor) -> bool {
    let (st, d) = (x.stride(), x.dims().last().copied().unwrap_or(0));
    st.len() == 4 && st[3] == 1 && st[2] == d
}

/// The f32 values a contiguous CPU tensor covers (the queries, and any operand that is not rows).
pub(crate) fn cpu_values<'a>(storage: &'a Storage, layout: &Layout) -> Result<&'a [f32]> {
    match storage {
        Storage::Cpu(s) => Ok(fused::data(s, layout, "fused-attention")?),
        _ => Err(ModelError::Input(
            "fused attention takes CPU tensors".into(),
        )),
    }
}

/// One task's operands: its query rows, their head's transposed keys and values, and their
/// bias rows (`t` apart).
struct Rows<'a> {
    q: &'a [f32],
    kt: &'a [f32],
    v: &'a [f32],
    bias: Option<&'a [f32]>,
    /// The query position of the first row.
    first: usize,
    causal: bool,
    /// Queries of the head and keys.
    s: usize,
    t: usize,
}

/// One task: scores, softmax and `P V` for the rows of `out` (`NV` vectors of 16 per row).
fn block_attention<const NV: usize>(rows: &Rows, out: &mut [f32]) {
    let d = NV * 16;
    let (s, t) = (rows.s, rows.t);
    let n = out.len() / d;
    // Keys each row sees.
    let seen = |r: usize| {
        if rows.causal {
            t - s + rows.first + r + 1
        } else {
            t
        }
    };
    let width = seen(n - 1).div_ceil(KEYS) * KEYS;
    let mut scores = vec![0f32; n.div_ceil(ROW_GROUP) * ROW_GROUP * width];
    // Q Kᵀ, four rows at a time against 32 keys at a time.
    for g0 in (0..n).step_by(ROW_GROUP) {
        let mut q = [[0f32; 128]; ROW_GROUP];
        for (r, row) in q.iter_mut().enumerate().take(n - g0) {
            row[..d].copy_from_slice(&rows.q[(g0 + r) * d..(g0 + r + 1) * d]);
        }
        let panels = seen((g0 + ROW_GROUP).min(n) - 1).div_ceil(KEYS);
        for (c, panel) in rows.kt.chunks_exact(d * KEYS).take(panels).enumerate() {
            let mut acc = [[0f32; KEYS]; ROW_GROUP];
            kernel::scores(&q, panel, d, &mut acc);
            for (r, acc) in acc.iter().enumerate() {
                scores[(g0 + r) * width + c * KEYS..][..KEYS].copy_from_slice(acc);
            }
        }
    }
    // Softmax over the keys each row sees, as fused::softmax_last_dim computes it.
    simd(
        #[inline(always)]
        || {
            for r in 0..n {
                let row = &mut scores[r * width..r * width + seen(r)];
                if let Some(bias) = rows.bias {
                    for (x, &m) in row.iter_mut().zip(&bias[r * t..]) {
                        *x += m;
                    }
                }
                softmax_in_place(row);
            }
        },
    );
    // P V, four rows at a time, each value row read once per group. Past its own last key a
    // row's probabilities are zero, so a group stops at its last row's keys.
    for g0 in (0..n).step_by(ROW_GROUP) {
        let group = (n - g0).min(ROW_GROUP);
        let mut p = [&[][..]; ROW_GROUP];
        for (r, p) in p.iter_mut().enumerate().take(group) {
            *p = &scores[(g0 + r) * width..(g0 + r) * width + seen(g0 + r)];
        }
        let mut acc = [[0f32; 128]; ROW_GROUP];
        kernel::weighted_values::<NV>(&p, rows.v, &mut acc);
        for (r, acc) in acc.iter().enumerate().take(group) {
            out[(g0 + r) * d..(g0 + r + 1) * d].copy_from_slice(&acc[..d]);
        }
    }
}

/// Whether this CPU runs the kernels below: AVX-512, or AVX2 with FMA (AMD Zen 2/3 and
/// older Intel parts, where the three-product path was the only one).
fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        kernel::avx512()
            || (std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The two products in AVX-512 or AVX2, their sums in registers: plain loops left them in
/// memory.
#[cfg(target_arch = "x86_64")]
mod kernel {
    use std::arch::x86_64::*;

    use super::{KEYS, ROW_GROUP};

    pub fn avx512() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
    }

    /// `acc[r][j] = Σ_l q[r][l] · panel[l][j]` for a panel of `d` × 32 keys.
    pub fn scores(
        q: &[[f32; 128]; ROW_GROUP],
        panel: &[f32],
        d: usize,
        acc: &mut [[f32; KEYS]; ROW_GROUP],
    ) {
        assert!(panel.len() >= d * KEYS && d <= 128);
        // SAFETY: `available()` checked AVX-512F, or else AVX2 and FMA, before any task ran.
        unsafe {
            if avx512() {
                scores_avx512(q, panel, d, acc)
            } else {
                scores_avx2(q, panel, d, acc)
            }
        }
    }

    // `l` indexes the panel and all four query rows together.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f")]
    unsafe fn scores_avx512(
        q: &[[f32; 128]; ROW_GROUP],
        panel: &[f32],
        d: usize,
        acc: &mut [[f32; KEYS]; ROW_GROUP],
    ) {
        let mut sums = [_mm512_setzero_ps(); 2 * ROW_GROUP];
        for l in 0..d {
            // SAFETY: l < d, and the panel holds d rows of KEYS = 32 values (asserted).
            let (k0, k1) = unsafe {
                let at = panel.as_ptr().add(l * KEYS);
                (_mm512_loadu_ps(at), _mm512_loadu_ps(at.add(16)))
            };
            for r in 0..ROW_GROUP {
                let x = _mm512_set1_ps(q[r][l]);
                sums[2 * r] = _mm512_fmadd_ps(x, k0, sums[2 * r]);
                sums[2 * r + 1] = _mm512_fmadd_ps(x, k1, sums[2 * r + 1]);
            }
        }
        for r in 0..ROW_GROUP {
            // SAFETY: each row of acc holds 32 values.
            unsafe {
                _mm512_storeu_ps(acc[r].as_mut_ptr(), sums[2 * r]);
                _mm512_storeu_ps(acc[r].as_mut_ptr().add(16), sums[2 * r + 1]);
            }
        }
    }

    /// `acc[r] = Σ_j p[r][j] · v[j]` over the `16·NV` values of each value row.
    pub fn weighted_values<const NV: usize>(
        p: &[&[f32]; ROW_GROUP],
        v: &[f32],
        acc: &mut [[f32; 128]; ROW_GROUP],
    ) {
        let keys = p.iter().map(|p| p.len()).max().unwrap_or(0);
        assert!(NV <= 8 && v.len() >= keys * NV * 16);
        // SAFETY: as in `scores`.
        unsafe {
            if avx512() {
                weighted_values_avx512::<NV>(p, v, keys, acc)
            } else {
                weighted_values_avx2::<NV>(p, v, keys, acc)
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn weighted_values_avx512<const NV: usize>(
        p: &[&[f32]; ROW_GROUP],
        v: &[f32],
        keys: usize,
        acc: &mut [[f32; 128]; ROW_GROUP],
    ) {
        let mut sums = [[_mm512_setzero_ps(); NV]; ROW_GROUP];
        for j in 0..keys {
            let mut value = [_mm512_setzero_ps(); NV];
            for (c, value) in value.iter_mut().enumerate() {
                // SAFETY: j < keys and v holds keys rows of 16·NV values (asserted).
                *value = unsafe { _mm512_loadu_ps(v.as_ptr().add((j * NV + c) * 16)) };
            }
            for r in 0..ROW_GROUP {
                let w = _mm512_set1_ps(p[r].get(j).copied().unwrap_or(0.0));
                for (sum, &value) in sums[r].iter_mut().zip(&value) {
                    *sum = _mm512_fmadd_ps(w, value, *sum);
                }
            }
        }
        for (acc, sums) in acc.iter_mut().zip(&sums) {
            for (c, &sum) in sums.iter().enumerate() {
                // SAFETY: 16·NV ≤ 128 values per row of acc.
                unsafe { _mm512_storeu_ps(acc.as_mut_ptr().add(c * 16), sum) };
            }
        }
    }

    /// [`scores_avx512`] in 8-wide vectors: 16 keys at a time, so that the eight sums, two
    /// key vectors and the broadcast fit AVX2's sixteen registers.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scores_avx2(
        q: &[[f32; 128]; ROW_GROUP],
        panel: &[f32],
        d: usize,
        acc: &mut [[f32; KEYS]; ROW_GROUP],
    ) {
        for half in 0..KEYS / 16 {
            let mut sums = [_mm256_setzero_ps(); 2 * ROW_GROUP];
            for l in 0..d {
                // SAFETY: l < d, and the panel holds d rows of KEYS = 32 values (asserted).
                let (k0, k1) = unsafe {
                    let at = panel.as_ptr().add(l * KEYS + half * 16);
                    (_mm256_loadu_ps(at), _mm256_loadu_ps(at.add(8)))
                };
                for r in 0..ROW_GROUP {
                    let x = _mm256_set1_ps(q[r][l]);
                    sums[2 * r] = _mm256_fmadd_ps(x, k0, sums[2 * r]);
                    sums[2 * r + 1] = _mm256_fmadd_ps(x, k1, sums[2 * r + 1]);
                }
            }
            for r in 0..ROW_GROUP {
                // SAFETY: each row of acc holds 32 values; half * 16 + 16 <= 32.
                unsafe {
                    let at = acc[r].as_mut_ptr().add(half * 16);
                    _mm256_storeu_ps(at, sums[2 * r]);
                    _mm256_storeu_ps(at.add(8), sums[2 * r + 1]);
                }
            }
        }
    }

    /// [`weighted_values_avx512`] in 8-wide vectors, 16 columns of the values at a time: all
    /// 128 columns of four rows would need 64 registers.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn weighted_values_avx2<const NV: usize>(
        p: &[&[f32]; ROW_GROUP],
        v: &[f32],
        keys: usize,
        acc: &mut [[f32; 128]; ROW_GROUP],
    ) {
        for c in 0..NV {
            let mut sums = [[_mm256_setzero_ps(); 2]; ROW_GROUP];
            for j in 0..keys {
                // SAFETY: j < keys and v holds keys rows of 16·NV values (asserted).
                let (v0, v1) = unsafe {
                    let at = v.as_ptr().add((j * NV + c) * 16);
                    (_mm256_loadu_ps(at), _mm256_loadu_ps(at.add(8)))
                };
                for r in 0..ROW_GROUP {
                    let w = _mm256_set1_ps(p[r].get(j).copied().unwrap_or(0.0));
                    sums[r][0] = _mm256_fmadd_ps(w, v0, sums[r][0]);
                    sums[r][1] = _mm256_fmadd_ps(w, v1, sums[r][1]);
                }
            }
            for (acc, sums) in acc.iter_mut().zip(&sums) {
                // SAFETY: 16·NV ≤ 128 values per row of acc.
                unsafe {
                    let at = acc.as_mut_ptr().add(c * 16);
                    _mm256_storeu_ps(at, sums[0]);
                    _mm256_storeu_ps(at.add(8), sums[1]);
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod kernel {
    use super::{KEYS, ROW_GROUP};

    pub fn scores(
        _: &[[f32; 128]; ROW_GROUP],
        _: &[f32],
        _: usize,
        _: &mut [[f32; KEYS]; ROW_GROUP],
    ) {
        unreachable!("attention::applies is false off x86-64")
    }

    pub fn weighted_values<const NV: usize>(
        _: &[&[f32]; ROW_GROUP],
        _: &[f32],
        _: &mut [[f32; 128]; ROW_GROUP],
    ) {
        unreachable!("attention::applies is false off x86-64")
    }
}

/// The same attention as three tensor products, for tests.
#[cfg(test)]
fn reference(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>, causal: bool) -> Tensor {
    let (b, nh, s, d) = q.dims4().expect("q");
    let (_, nkv, t, _) = k.dims4().expect("k");
    let rep = nh / nkv;
    let expand = |x: &Tensor| {
        x.unsqueeze(2)
            .and_then(|x| x.broadcast_as((b, nkv, rep, t, d)))
            .and_then(|x| x.reshape((b, nh, t, d)))
            .expect("repeat_kv")
    };
    let (k, v) = (expand(k), expand(v));
    let mut scores = q.matmul(&k.t().expect("t")).expect("qk");
    if causal {
        let mask: Vec<f32> = (0..s)
            .flat_map(|i| (0..t).map(move |j| if j > t - s + i { -1e30 } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (1, 1, s, t), q.device()).expect("mask");
        scores = scores.broadcast_add(&mask).expect("masked");
    }
    if let Some(m) = bias {
        scores = scores.broadcast_add(m).expect("bias");
    }
    candle_nn::ops::softmax(&scores, candle_core::D::Minus1)
        .and_then(|p| p.matmul(&v))
        .expect("pv")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::fused::tests::{max_diff, random};
    use candle_core::Device;

    #[test]
    fn agrees_with_the_three_products() {
        if !available() {
            eprintln!("skipped: neither AVX-512 nor AVX2 on this machine");
            return;
        }
        // Causal prefill with GQA and a cache of earlier positions; a block that ends
        // mid-group and mid-task (s = 37); the vision tower's unmasked case; head sizes of the
        // fixtures and of real models.
        for (b, nh, nkv, s, t, d, causal) in [
            (1, 4, 2, 37, 37, 16, true),
            (2, 4, 4, 9, 14, 32, true),
            (1, 8, 2, 70, 70, 64, false),
            (1, 2, 1, 33, 33, 128, true),
        ] {
            let q = random(&[b, nh, s, d], 1);
            let k = random(&[b, nkv, t, d], 2);
            let v = random(&[b, nkv, t, d], 3);
            assert!(applies(&q, &k, &v));
            let ours = attention(&q, &k, &v, None, causal).expect("attention");
            let want = reference(&q, &k, &v, None, causal);
            assert!(
                max_diff(&ours, &want) < 1e-5,
                "{b} {nh} {nkv} {s} {t} {d} {causal}"
            );
        }
    }

    /// Keys and values read in place from buffers with room (the KV cache's views, positions
    /// as rows, not contiguous as a whole) give the bits of their contiguous copies.
    #[test]
    fn reads_the_cache_buffers_in_place() {
        if !available() {
            eprintln!("skipped: neither AVX-512 nor AVX2 on this machine");
            return;
        }
        let (b, nh, nkv, s, t, d) = (2, 8, 2, 17, 40, 64);
        let q = random(&[b, nh, s, d], 1);
        let k = random(&[b, nkv, t + 24, d], 2)
            .narrow(2, 0, t)
            .expect("view");
        let v = random(&[b, nkv, t + 24, d], 3)
            .narrow(2, 0, t)
            .expect("view");
        assert!(!k.is_contiguous() && in_rows(&k));
        let viewed = attention(&q, &k, &v, None, true).expect("attention");
        let (k, v) = (k.contiguous().expect("k"), v.contiguous().expect("v"));
        let copied = attention(&q, &k, &v, None, true).expect("attention");
        assert_eq!(crate::kernels::bits(&viewed), crate::kernels::bits(&copied));
        assert!(max_diff(&viewed, &reference(&q, &k, &v, None, true)) < 1e-5);
    }

    /// The AVX2 kernels against plain sums, on any machine that has AVX2 (one with AVX-512
    /// runs the other kernels in `agrees_with_the_three_products`).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_kernels_agree_with_plain_sums() {
        if !(std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma"))
        {
            eprintln!("skipped: no AVX2 on this machine");
            return;
        }
        let d = 48;
        let value = |i: usize| ((i * 37 % 101) as f32 - 50.0) / 25.0;
        let mut q = [[0f32; 128]; ROW_GROUP];
        for (r, row) in q.iter_mut().enumerate() {
            for (l, x) in row.iter_mut().enumerate().take(d) {
                *x = value(r * 131 + l);
            }
        }
        let panel: Vec<f32> = (0..d * KEYS).map(|i| value(i + 7)).collect();
        let mut acc = [[0f32; KEYS]; ROW_GROUP];
        // SAFETY: AVX2 and FMA checked above.
        unsafe { kernel::scores_avx2(&q, &panel, d, &mut acc) };
        for r in 0..ROW_GROUP {
            for j in 0..KEYS {
                let want: f32 = (0..d).map(|l| q[r][l] * panel[l * KEYS + j]).sum();
                assert!((acc[r][j] - want).abs() < 1e-4, "score {r} {j}");
            }
        }
        // Rows that see 5, 40, 0 and 33 keys of 40.
        const NV: usize = 3;
        let keys = 40;
        let v: Vec<f32> = (0..keys * NV * 16).map(|i| value(i + 3)).collect();
        let probs: Vec<Vec<f32>> = [5, 40, 0, 33]
            .iter()
            .enumerate()
            .map(|(r, &n)| (0..n).map(|j| value(r * 17 + j) / 4.0).collect())
            .collect();
        let p = [&probs[0][..], &probs[1][..], &probs[2][..], &probs[3][..]];
        let mut out = [[0f32; 128]; ROW_GROUP];
        // SAFETY: as above.
        unsafe { kernel::weighted_values_avx2::<NV>(&p, &v, keys, &mut out) };
        for r in 0..ROW_GROUP {
            for c in 0..NV * 16 {
                let want: f32 = p[r]
                    .iter()
                    .enumerate()
                    .map(|(j, w)| w * v[j * NV * 16 + c])
                    .sum();
                assert!((out[r][c] - want).abs() < 1e-4, "value {r} {c}");
            }
        }
    }

    #[test]
    fn padding_bias_masks_keys() {
        if !available() {
            eprintln!("skipped: neither AVX-512 nor AVX2 on this machine");
            return;
        }
        let (b, nh, s, d) = (2, 2, 6, 16);
        let q = random(&[b, nh, s, d], 4);
        let k = random(&[b, nh, s, d], 5);
        let v = random(&[b, nh, s, d], 6);
        // The second sequence is left-padded by two positions.
        let bias: Vec<f32> = (0..b * s * s)
            .map(|x| {
                if x / (s * s) == 1 && x % s < 2 {
                    -1e30
                } else {
                    0.0
                }
            })
            .collect();
        let bias = Tensor::from_vec(bias, (b, 1, s, s), &Device::Cpu).expect("bias");
        let ours = attention(&q, &k, &v, Some(&bias), true).expect("attention");
        let want = reference(&q, &k, &v, Some(&bias), true);
        // Rows that see only padding are uniform over it in both; the rest must agree.
        let rows = |x: &Tensor| x.narrow(2, 2, s - 2).expect("rows");
        assert!(max_diff(&rows(&ours), &rows(&want)) < 1e-5);
    }

    #[test]
    fn declines_what_it_does_not_cover() {
        let kv = random(&[1, 2, 8, 16], 0);
        assert!(!applies(&random(&[1, 2, 1, 16], 0), &kv, &kv));
        assert!(!applies(&random(&[1, 3, 8, 16], 0), &kv, &kv));
        let odd = random(&[1, 2, 8, 12], 0);
        assert!(!applies(&odd, &odd, &odd));
        let half = kv.to_dtype(DType::BF16).expect("bf16");
        assert!(!applies(&half, &half, &half));
    }
}
