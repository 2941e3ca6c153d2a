//! `--load-8bit` weights: blocks of 32 int8 values sharing one f32 scale (ggml's `Q8_0` with a
//! full-precision scale), and their products with integer dot products, as llama.cpp's.
//!
//! A product first rounds each row of activations to 8 bits in blocks of 32 with one f32 scale
//! of their own (llama.cpp's `Q8_0` activations, not torch's one scale per tensor). Each block
//! of 32 products is then summed exactly in integers, and the block's sum is scaled by the
//! weight's and the activations' scales into an f32 total. With AVX512-VNNI a single
//! `vpdpbusd` makes 64 of those products; AVX2 makes them with `vpmaddubsw` as llama.cpp does.
//! Decoding reads 1.125 bytes per weight and is bound by memory; prefill multiplies many rows
//! by each weight and is bound by arithmetic, where the integer products are four times as many
//! per instruction as f32's.
//!
//! The weight is stored in tiles of 16 rows × 32 values ([`TileBlock`]): one register of 16
//! i32 sums holds a tile's rows, so the per-block scaling is one vector multiply-add and no
//! horizontal sum is needed until the end. Every backend sums the same integers and adds the
//! scaled blocks in the same order, so they give the same bits, and a row of a batch gets the
//! bits it gets alone.

use candle_core::{DType, Storage, Tensor};
use rayon::prelude::*;

use crate::kernels::fused::{contiguous, simd};
use crate::kernels::gemv;

/// Values per scale.
pub const BLOCK: usize = 32;

/// Weight rows per tile.
pub const TILE_ROWS: usize = 16;

/// Groups of 4 values (the 4 bytes one `vpdpbusd` lane sums) per block.
const GRANULES: usize = BLOCK / 4;

/// The offset that makes a weight an unsigned byte: `vpdpbusd` multiplies unsigned bytes by
/// signed ones, so the weights are stored as `q + 128` and `128 · Σ x` is taken back.
const OFFSET: i32 = 128;

// One parallel task of `gemv::by_weight_rows` is one tile's rows.
const _: () = assert!(gemv::ROWS_PER_TASK == TILE_ROWS);

/// One block of 32 values of 16 consecutive weight rows, in the order the kernels read them.
#[repr(C, align(64))]
#[derive(Debug, Clone, Copy)]
struct TileBlock {
    /// `quants[g][r][t]`: row `r`'s value `4g + t` plus [`OFFSET`].
    quants: [[[u8; 4]; TILE_ROWS]; GRANULES],
    /// Each row's scale; 0 for the padding rows past `n`.
    scales: [f32; TILE_ROWS],
}

const _: () = assert!(std::mem::size_of::<TileBlock>() == 576);

impl TileBlock {
    const EMPTY: Self = Self {
        quants: [[[OFFSET as u8; 4]; TILE_ROWS]; GRANULES],
        scales: [0.0; TILE_ROWS],
    };

    /// Row `r`'s value `l` (`< BLOCK`) as the signed integer it stands for.
    #[inline(always)]
    fn value(&self, r: usize, l: usize) -> i32 {
        i32::from(self.quants[l / 4][r][l % 4]) - OFFSET
    }
}

#[derive(Debug, Clone)]
pub struct Q8Weight {
    /// `[n, k]`: `n` rows (outputs) of `k` values.
    pub n: usize,
    pub k: usize,
    /// `[⌈n / 16⌉, k / 32]`
    tiles: Vec<TileBlock>,
}

/// The nearest of 255 steps of `max |v| / 127` for each of `v` (a block), and that step.
#[inline(always)]
fn round_block(v: &[f32], q: &mut [i32]) -> f32 {
    let amax = v.iter().fold(0f32, |m, v| m.max(v.abs()));
    let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
    for (q, v) in q.iter_mut().zip(v) {
        *q = (v * inv).round_ties_even() as i32;
    }
    amax / 127.0
}

/// Rows `w` (`rows` of them, at most a tile's, `k` values each) into `tiles`.
#[inline(always)]
fn quantize_tile_row(w: &[f32], rows: usize, k: usize, tiles: &mut [TileBlock]) {
    let mut q = [0i32; BLOCK];
    for r in 0..TILE_ROWS.min(rows) {
        let row = &w[r * k..][..k];
        for (tile, v) in tiles.iter_mut().zip(row.chunks_exact(BLOCK)) {
            tile.scales[r] = round_block(v, &mut q);
            for (l, &q) in q.iter().enumerate() {
                tile.quants[l / 4][r][l % 4] = (q + OFFSET) as u8;
            }
        }
    }
}

impl Q8Weight {
    /// Rounds each block of 32 to the nearest of 255 steps of `max |w| / 127`. `k` must be a
    /// multiple of [`BLOCK`].
    pub fn quantize(w: &[f32], n: usize, k: usize) -> Self {
        debug_assert!(k.is_multiple_of(BLOCK) && w.len() == n * k);
        let blocks = k / BLOCK;
        let mut tiles = vec![TileBlock::EMPTY; n.div_ceil(TILE_ROWS) * blocks];
        tiles
            .par_chunks_mut(blocks.max(1))
            .enumerate()
            .for_each(|(g, tiles)| {
                // Compiled with the SIMD features, where rounding is one instruction and not
                // a call.
                simd(
                    #[inline(always)]
                    || quantize_tile_row(&w[g * TILE_ROWS * k..], n - g * TILE_ROWS, k, tiles),
                )
            });
        Self { n, k, tiles }
    }

    /// Quantizes a `[n, k]` tensor: an f32 one read where it lies, without a copy (a vocabulary
    /// matrix is 263 MB on a 1B model, and the allocator keeps what a copy takes), any other
    /// dtype widened first.
    pub fn quantize_tensor(w: &Tensor) -> candle_core::Result<Self> {
        let (n, k) = w.dims2()?;
        with_f32(w, |w| Self::quantize(w, n, k))
    }

    fn blocks(&self) -> usize {
        self.k / BLOCK
    }

    /// Row `j` widened to f32 into `out` (`k` long).
    fn row_into(&self, j: usize, out: &mut [f32]) {
        let (g, r) = (j / TILE_ROWS, j % TILE_ROWS);
        let tiles = &self.tiles[g * self.blocks()..][..self.blocks()];
        for (w, tile) in out.chunks_exact_mut(BLOCK).zip(tiles) {
            for (l, w) in w.iter_mut().enumerate() {
                *w = tile.value(r, l) as f32 * tile.scales[r];
            }
        }
    }

    /// The weight widened to f32, `[n, k]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.n * self.k];
        w.par_chunks_mut(self.k.max(1))
            .enumerate()
            .for_each(|(j, row)| self.row_into(j, row));
        w
    }

    /// Rows `ids` widened to f32, `[ids.len(), k]`: an embedding lookup. Every id must be
    /// below `n`.
    pub fn rows(&self, ids: &[u32]) -> Vec<f32> {
        let mut out = vec![0f32; ids.len() * self.k];
        for (row, &id) in out.chunks_mut(self.k.max(1)).zip(ids) {
            self.row_into(id as usize, row);
        }
        out
    }

    /// `x Wᵀ` for `x: [m, k]`, giving `[m, n]`, with `x` rounded to 8 bits in blocks of 32
    /// first. Each tile is read once for all `m` rows.
    pub fn matmul_t(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_t_with(x, m, Backend::best())
    }

    /// [`Self::matmul_t`] of a `[m, k]` tensor, giving `[m, n]`: f32 rows on the CPU are read
    /// where they lie (a prefill's are megabytes).
    pub fn matmul_t_tensor(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (m, _) = x.dims2()?;
        let y = with_f32(x, |rows| self.matmul_t(rows, m))?;
        Tensor::from_vec(y, (m, self.n), x.device())
    }

    fn matmul_t_with(&self, x: &[f32], m: usize, backend: Backend) -> Vec<f32> {
        debug_assert_eq!(x.len(), m * self.k);
        let x = Activations::quantize(x, m, self.k);
        let blocks = self.blocks();
        let padded = self.n.div_ceil(TILE_ROWS) * TILE_ROWS;
        let out = gemv::by_weight_rows(
            m,
            padded,
            #[inline(always)]
            |j0, out: &mut [f32]| {
                let tiles = &self.tiles[j0 / TILE_ROWS * blocks..][..blocks];
                backend.tile_rows(tiles, &x, out);
            },
        );
        if padded == self.n {
            return out;
        }
        out.chunks_exact(padded)
            .flat_map(|row| &row[..self.n])
            .copied()
            .collect()
    }
}

/// `f` of a tensor's values as contiguous f32: read where they lie when the tensor is f32 and
/// contiguous on the CPU, from a converted copy otherwise.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    if t.dtype() != DType::F32 || !t.is_contiguous() {
        return with_f32(&t.to_dtype(DType::F32)?.contiguous()?, f);
    }
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => Ok(f(contiguous(cpu.as_slice::<f32>()?, layout, "q8")?)),
        _ => Ok(f(&t.flatten_all()?.to_vec1::<f32>()?)),
    }
}

/// Rows of activations rounded to 8 bits in blocks of 32, as the products read them.
struct Activations {
    m: usize,
    k: usize,
    /// `[m, k]`
    quants: Vec<i8>,
    /// `[m, k / 32]`
    scales: Vec<f32>,
    /// `[m, k / 32]`: `128 · Σ` of the block's values, which the offset weights add.
    offsets: Vec<i32>,
}

impl Activations {
    fn quantize(x: &[f32], m: usize, k: usize) -> Self {
        let blocks = k / BLOCK;
        let mut quants = vec![0i8; m * k];
        let mut scales = vec![0f32; m * blocks];
        let mut offsets = vec![0i32; m * blocks];
        simd(
            #[inline(always)]
            || Self::round(x, &mut quants, &mut scales, &mut offsets),
        );
        Self {
            m,
            k,
            quants,
            scales,
            offsets,
        }
    }

    #[inline(always)]
    fn round(x: &[f32], quants: &mut [i8], scales: &mut [f32], offsets: &mut [i32]) {
        let mut q = [0i32; BLOCK];
        for (((v, qs), d), o) in x
            .chunks_exact(BLOCK)
            .zip(quants.chunks_exact_mut(BLOCK))
            .zip(scales.iter_mut())
            .zip(offsets.iter_mut())
        {
            *d = round_block(v, &mut q);
            for (qs, &q) in qs.iter_mut().zip(&q) {
                *qs = q as i8;
            }
            *o = OFFSET * q.iter().sum::<i32>();
        }
    }

    /// Row `i`'s values of block `b`.
    #[inline(always)]
    fn block(&self, i: usize, b: usize) -> &[i8] {
        &self.quants[i * self.k + b * BLOCK..][..BLOCK]
    }

    #[inline(always)]
    fn scale(&self, i: usize, b: usize) -> f32 {
        self.scales[i * (self.k / BLOCK) + b]
    }
}

/// The kernels, best first; each gives the same bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    #[cfg(target_arch = "x86_64")]
    Vnni512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Backend {
    fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512vnni")
                && std::arch::is_x86_feature_detected!("avx512bw")
            {
                return Self::Vnni512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Self::Avx2;
            }
        }
        Self::Portable
    }

    /// `out[r · m + i]` = row `i` of `x` times row `r` of the tile row `tiles` (one tile per
    /// block of `k`).
    #[inline(always)]
    fn tile_rows(self, tiles: &[TileBlock], x: &Activations, out: &mut [f32]) {
        match self {
            // SAFETY: `best` (or a test that checked the CPU) chose the backend.
            #[cfg(target_arch = "x86_64")]
            Self::Vnni512 => unsafe { x86::tile_rows_vnni512(tiles, x, out) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe { x86::tile_rows_avx2(tiles, x, out) },
            Self::Portable => tile_rows_portable(tiles, x, out),
        }
    }
}

/// The reference: each block's integer sum, then `total = sum · (d_w · d_x) + total` rounded
/// once (a fused multiply-add), blocks in order.
fn tile_rows_portable(tiles: &[TileBlock], x: &Activations, out: &mut [f32]) {
    let m = x.m;
    for i in 0..m {
        let mut total = [0f32; TILE_ROWS];
        for (b, tile) in tiles.iter().enumerate() {
            let xs = x.block(i, b);
            let d = x.scale(i, b);
            for (r, total) in total.iter_mut().enumerate() {
                let sum: i32 = (0..BLOCK)
                    .map(|l| tile.value(r, l) * i32::from(xs[l]))
                    .sum();
                *total = (sum as f32).mul_add(tile.scales[r] * d, *total);
            }
        }
        store(total, i, m, out);
    }
}

/// Writes row `i`'s 16 totals where [`Backend::tile_rows`] puts them: `out[r · m + i]`.
#[inline(always)]
fn store(totals: [f32; TILE_ROWS], i: usize, m: usize, out: &mut [f32]) {
    for (r, t) in totals.into_iter().enumerate() {
        if let Some(o) = out.get_mut(r * m + i) {
            *o = t;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Activations, GRANULES, TILE_ROWS, TileBlock, store};

    /// Rows of `x` that share each loaded tile.
    const ROWS_AT_ONCE: usize = 4;

    /// The 4 bytes of row `i`'s block `b` that granule `g` multiplies, as one i32.
    #[inline(always)]
    fn granule(x: &Activations, i: usize, b: usize, g: usize) -> i32 {
        let q = &x.block(i, b)[4 * g..4 * g + 4];
        i32::from_le_bytes([q[0] as u8, q[1] as u8, q[2] as u8, q[3] as u8])
    }

    /// # Safety
    /// The CPU has AVX-512F, AVX-512BW and AVX512-VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile_rows_vnni512(tiles: &[TileBlock], x: &Activations, out: &mut [f32]) {
        let mut i = 0;
        while i + ROWS_AT_ONCE <= x.m {
            // SAFETY: the caller's contract.
            unsafe { rows_vnni512::<ROWS_AT_ONCE>(tiles, x, i, out) };
            i += ROWS_AT_ONCE;
        }
        while i < x.m {
            // SAFETY: as above.
            unsafe { rows_vnni512::<1>(tiles, x, i, out) };
            i += 1;
        }
    }

    /// Rows `i0..i0 + R` of `x` against the tile row, each block's 16 × 32 weights loaded once
    /// for the `R` rows: 8 `vpdpbusd` per row and block, each 4 values of the activations
    /// (broadcast) against 4 values of each of the 16 weight rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn rows_vnni512<const R: usize>(
        tiles: &[TileBlock],
        x: &Activations,
        i0: usize,
        out: &mut [f32],
    ) {
        let mut totals = [_mm512_setzero_ps(); R];
        for (b, tile) in tiles.iter().enumerate() {
            // SAFETY: a tile is 64-byte aligned and each granule is 64 bytes.
            let (w, scales): ([__m512i; GRANULES], __m512) = unsafe {
                (
                    std::array::from_fn(|g| _mm512_load_si512(tile.quants[g].as_ptr().cast())),
                    _mm512_load_ps(tile.scales.as_ptr()),
                )
            };
            for (r, total) in totals.iter_mut().enumerate() {
                let i = i0 + r;
                // Start from -128 · Σ x: the weights' offset taken back.
                let mut sum = _mm512_set1_epi32(-x.offsets[i * (x.k / super::BLOCK) + b]);
                for (g, w) in w.iter().enumerate() {
                    sum = _mm512_dpbusd_epi32(sum, *w, _mm512_set1_epi32(granule(x, i, b, g)));
                }
                let d = _mm512_mul_ps(scales, _mm512_set1_ps(x.scale(i, b)));
                *total = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), d, *total);
            }
        }
        for (r, total) in totals.into_iter().enumerate() {
            let mut t = [0f32; TILE_ROWS];
            // SAFETY: 16 floats into a 16-float array.
            unsafe { _mm512_storeu_ps(t.as_mut_ptr(), total) };
            store(t, i0 + r, x.m, out);
        }
    }

    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_rows_avx2(tiles: &[TileBlock], x: &Activations, out: &mut [f32]) {
        let ones = _mm256_set1_epi16(1);
        let flip = _mm256_set1_epi8(-128);
        for i in 0..x.m {
            let mut totals = [_mm256_setzero_ps(); 2];
            for (b, tile) in tiles.iter().enumerate() {
                let mut sums = [_mm256_setzero_si256(); 2];
                for g in 0..GRANULES {
                    let xs = _mm256_set1_epi32(granule(x, i, b, g));
                    let ax = _mm256_abs_epi8(xs);
                    for (h, sum) in sums.iter_mut().enumerate() {
                        // SAFETY: rows 8h..8h+8 of granule g are 32 bytes inside the tile.
                        let w =
                            unsafe { _mm256_loadu_si256(tile.quants[g][8 * h..].as_ptr().cast()) };
                        // Back to signed bytes, then each weight times the sign of its
                        // activation, so that |x| can be the unsigned operand: no i16 pair
                        // exceeds 2 · 127 · 127.
                        let w = _mm256_sign_epi8(_mm256_xor_si256(w, flip), xs);
                        let pairs = _mm256_maddubs_epi16(ax, w);
                        *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(pairs, ones));
                    }
                }
                let d = _mm256_set1_ps(x.scale(i, b));
                for (h, (total, sum)) in totals.iter_mut().zip(sums).enumerate() {
                    // SAFETY: 8 of the tile's 16 scales.
                    let scales = unsafe { _mm256_loadu_ps(tile.scales[8 * h..].as_ptr()) };
                    let d = _mm256_mul_ps(scales, d);
                    *total = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), d, *total);
                }
            }
            let mut t = [0f32; TILE_ROWS];
            for (h, total) in totals.into_iter().enumerate() {
                // SAFETY: 8 floats into half of a 16-float array.
                unsafe { _mm256_storeu_ps(t[8 * h..].as_mut_ptr(), total) };
            }
            store(t, i, x.m, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i + seed) * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    #[test]
    fn weights_round_to_the_nearest_step_of_their_block() {
        let (n, k) = (37, 96);
        let w = values(n * k, 0);
        let q = Q8Weight::quantize(&w, n, k);
        let dense = q.dequantize();
        for (j, (w, d)) in w.chunks(k).zip(dense.chunks(k)).enumerate() {
            for (b, (w, d)) in w.chunks(BLOCK).zip(d.chunks(BLOCK)).enumerate() {
                let amax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
                let step = q.tiles[j / TILE_ROWS * q.blocks() + b].scales[j % TILE_ROWS];
                assert_eq!(step, amax / 127.0);
                assert!(
                    w.iter()
                        .zip(d)
                        .all(|(a, b)| (a - b).abs() <= step / 2.0 + 1e-6)
                );
            }
        }
    }

    /// The product is that of the dequantized weights with the activations rounded the same
    /// way, up to f32 rounding; every backend the CPU has gives the portable one's bits, for
    /// every row count (a batch's rows get the bits they get alone).
    #[test]
    fn every_backend_gives_the_reference_product() {
        let (n, k) = (37, 96);
        let q = Q8Weight::quantize(&values(n * k, 0), n, k);
        let dense = q.dequantize();
        let mut backends = vec![Backend::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512vnni")
                && std::arch::is_x86_feature_detected!("avx512bw")
            {
                backends.push(Backend::Vnni512);
            } else {
                eprintln!("skipped the AVX512-VNNI kernel: this CPU lacks it");
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                backends.push(Backend::Avx2);
            } else {
                eprintln!("skipped the AVX2 kernel: this CPU lacks it");
            }
        }
        let x = values(7 * k, 3).iter().map(|v| v * 3.0).collect::<Vec<_>>();
        let reference = q.matmul_t_with(&x, 7, Backend::Portable);
        let rounded = Activations::quantize(&x, 7, k);
        for i in 0..7 {
            for j in 0..n {
                let want: f32 = (0..k)
                    .map(|l| {
                        f32::from(rounded.quants[i * k + l])
                            * rounded.scale(i, l / BLOCK)
                            * dense[j * k + l]
                    })
                    .sum();
                let got = reference[i * n + j];
                assert!(
                    (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                    "{i},{j}: {got} vs {want}"
                );
            }
        }
        for backend in backends {
            for m in [1, 3, 4, 5, 7] {
                let got = q.matmul_t_with(&x[..m * k], m, backend);
                assert_eq!(got, reference[..m * n], "{backend:?}, {m} rows");
            }
        }
    }

    #[test]
    fn activations_keep_the_extremes_and_zero_blocks() {
        let mut x = values(64, 5);
        x[3] = -4.0;
        x[32..].fill(0.0);
        let a = Activations::quantize(&x, 1, 64);
        assert_eq!(a.quants[3], -127);
        assert_eq!(a.scale(0, 0), 4.0 / 127.0);
        assert_eq!(a.scale(0, 1), 0.0);
        assert!(a.quants[32..].iter().all(|&q| q == 0));
        assert_eq!(
            a.offsets[0],
            128 * a.quants[..32].iter().map(|&q| i32::from(q)).sum::<i32>()
        );
    }

    #[test]
    fn rows_are_the_dequantized_rows() {
        let (n, k) = (19, 64);
        let w = values(n * k, 9);
        let q = Q8Weight::quantize(&w, n, k);
        let dense = q.dequantize();
        let got = q.rows(&[4, 0, 4, 18]);
        for (r, id) in [4usize, 0, 4, 18].into_iter().enumerate() {
            assert_eq!(got[r * k..(r + 1) * k], dense[id * k..(id + 1) * k]);
        }
    }
}
