//! bf16 `x Wᵀ` on Intel AMX, the tile units of Sapphire Rapids and later Xeons.
//!
//! candle multiplies bf16 on the CPU by widening both sides to f32 and running its f32 GEMM,
//! so bf16 is slower than f32 there. PyTorch hands the same product to oneDNN, which runs it on
//! AMX at several times the f32 rate. This is that path for the products that dominate prefill
//! and the vision tower, the linear layers (`m > gemv::MAX_ROWS` rows) of bf16 weights, whose
//! activations stay f32 between the products (`weights::activation_dtype`):
//!
//! - `tdpbf16ps` multiplies a 16×32 bf16 tile by a 32×16 tile held as bf16 pairs and adds the
//!   products into 16×16 f32 sums. The activations are rounded to bf16 as they are packed, and
//!   the sums (plus the bias) come out as f32, unrounded.
//! - The weight is the left operand and the activations the right one, repacked once per call
//!   into the pair layout, so the result comes out transposed, `(W xᵀ)ᵀ`, which the final write
//!   undoes. Each task copies the k-chunk of its weight rows into tile order first: read in
//!   place, rows 2–11 KiB apart all fall in the same few L1 sets and are evicted before reuse.
//! - Eight tile registers hold a 32×32 block of sums (four tiles), two weight tiles and two
//!   activation tiles. The loads are interleaved with the products, because tiles are not
//!   renamed: a load into a tile waits for the last product that read it.
//! - Linux hands out the 8 KiB of tile state only on request (`arch_prctl`), once per process.

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

use crate::error::Result;
use crate::kernels::fused::{DisjointWrites, contiguous, simd};
use crate::kernels::gemv;

/// Whether this CPU has AMX-BF16 and the kernel granted the tile state. `LLAVA_NO_AMX=1` turns
/// the path off, to compare against candle's own product.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| std::env::var_os("LLAVA_NO_AMX").is_none() && kernel::enable())
}

/// Whether [`linear`] takes this product: on the CPU, f32 `x: [m, k]` with `m > gemv::MAX_ROWS`,
/// bf16 `w: [n, k]`, `k` a multiple of 32, both contiguous, and no bias or a contiguous f32 one.
pub fn applies(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> bool {
    gemv::contiguous_cpu_product(x, w)
        && x.dtype() == DType::F32
        && w.dtype() == DType::BF16
        && b.is_none_or(|b| b.dtype() == DType::F32 && b.is_contiguous() && b.rank() == 1)
        && x.dims()[0] > gemv::MAX_ROWS
        && x.dims()[1].is_multiple_of(K_STEP)
        && available()
}

/// `x Wᵀ (+ b)` for f32 `x: [m, k]`, bf16 `w: [n, k]`, f32 `b: [n]`, giving f32 `[m, n]`; see
/// [`applies`].
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    Ok(match b {
        Some(b) => x.apply_op3(w, b, AmxMatmul)?,
        None => x.apply_op2(w, AmxMatmul)?,
    })
}

/// The k extent of one tile product: 16 rows of 64 bytes, 32 bf16 each.
const K_STEP: usize = 32;
/// k-steps per pass over the activations: their packed slice (`m × 512` values) stays in L2
/// while every weight block of a task meets it, and one block's chunk of weights (32 KiB) in L1.
const K_CHUNK: usize = 16;
/// 32-row weight blocks per parallel task.
const BLOCKS_PER_TASK: usize = 4;

struct AmxMatmul;

const OP: &str = "amx-matmul";
const OP_BIAS: &str = "amx-linear";

impl CustomOp2 for AmxMatmul {
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
        amx_linear(xs, xl, ws, wl, None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        gemv::backward(x, w, grad)
    }
}

impl CustomOp3 for AmxMatmul {
    fn name(&self) -> &'static str {
        OP_BIAS
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        amx_linear(xs, xl, ws, wl, Some((bs, bl)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (gx, gw) = gemv::backward(x, w, grad)?;
        Ok((gx, gw, Some(grad.sum(0)?)))
    }
}

fn amx_linear(
    xs: &CpuStorage,
    xl: &Layout,
    ws: &CpuStorage,
    wl: &Layout,
    bias: Option<(&CpuStorage, &Layout)>,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let (m, k) = xl.shape().dims2()?;
    let (n, wk) = wl.shape().dims2()?;
    if k != wk || !k.is_multiple_of(K_STEP) {
        candle_core::bail!("{OP}: x is [{m}, {k}], the weight [{n}, {wk}]");
    }
    let (CpuStorage::F32(x), CpuStorage::BF16(w)) = (xs, ws) else {
        candle_core::bail!("{OP}: takes f32 activations and bf16 weights");
    };
    let (x, w) = (contiguous(x, xl, OP)?, contiguous(w, wl, OP)?);
    if !available() {
        candle_core::bail!("{OP}: this CPU or kernel offers no AMX-BF16");
    }
    let bias: Vec<f32> = match bias {
        None => vec![0.0; n],
        Some((CpuStorage::F32(b), bl)) if bl.shape().dims() == [n] => {
            contiguous(b, bl, OP)?.to_vec()
        }
        Some((_, bl)) => {
            candle_core::bail!("{OP}: bias {:?} for {n} f32 outputs", bl.dims())
        }
    };
    let out = product(x, w, &bias, m, k, n);
    Ok((CpuStorage::F32(out), Shape::from((m, n))))
}

fn product(x: &[f32], w: &[bf16], bias: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let steps = k / K_STEP;
    let x_blocks = m.div_ceil(32);
    let xp = pack_pairs(x, m, k);
    let w_blocks = n.div_ceil(32);
    // Not zeroed first: the tasks write every element (zeroing cost 5% of the vision tower).
    let mut out = Vec::<f32>::with_capacity(m * n);
    let cols = DisjointWrites::new(out.as_mut_ptr());
    let blocks: Vec<usize> = (0..w_blocks).collect();
    blocks.par_chunks(BLOCKS_PER_TASK).for_each(|task| {
        // Sums for this task's blocks: [block][x block][32 weight rows][32 x rows] f32.
        let mut sums = vec![0f32; task.len() * x_blocks * 1024];
        // One block's k-chunk of weights in tile order: [k step][32 rows][32 values].
        let mut tiles = vec![bf16::ZERO; K_CHUNK * 1024];
        kernel::with_tiles(|| {
            let mut s0 = 0;
            while s0 < steps {
                let chunk = K_CHUNK.min(steps - s0);
                for (b, &wb) in task.iter().enumerate() {
                    let rows = &w[wb * 32 * k..n.min((wb + 1) * 32) * k];
                    if rows.len() < 32 * k {
                        // The last block runs short of 32 rows: the rest of its tiles are zeros.
                        tiles.fill(bf16::ZERO);
                    }
                    for (r, row) in rows.chunks_exact(k).enumerate() {
                        for s in 0..chunk {
                            let from = (s0 + s) * K_STEP;
                            tiles[s * 1024 + r * K_STEP..][..K_STEP]
                                .copy_from_slice(&row[from..from + K_STEP]);
                        }
                    }
                    for xb in 0..x_blocks {
                        let at = (b * x_blocks + xb) * 1024;
                        let xs = &xp[(xb * steps + s0) * 512..(xb * steps + s0 + chunk) * 512];
                        kernel::block(&mut sums[at..at + 1024], &tiles, xs, chunk);
                    }
                }
                s0 += chunk;
            }
        });
        for (b, &wb) in task.iter().enumerate() {
            let width = 32.min(n - wb * 32);
            for xb in 0..x_blocks {
                let s = &sums[(b * x_blocks + xb) * 1024..][..1024];
                for r in 0..32.min(m - xb * 32) {
                    let i = xb * 32 + r;
                    for c in 0..width {
                        // SAFETY: i < m and wb * 32 + c < n; only this task writes these columns.
                        unsafe {
                            *cols.at(i * n + wb * 32 + c) = s[c * 32 + r] + bias[wb * 32 + c];
                        }
                    }
                }
            }
        }
    });
    // SAFETY: the tasks together wrote all m × n elements: every row i < m of every column of
    // every weight block.
    unsafe { out.set_len(m * n) };
    out
}

/// `x: [m, k]` as tiles of bf16 pairs: `[x block][k step][half][16 pair rows][16 x rows]`, each
/// element the two values `x[i, 2p]`, `x[i, 2p + 1]` rounded to bf16; rows past `m` are zeros.
fn pack_pairs(x: &[f32], m: usize, k: usize) -> Vec<u32> {
    let steps = k / K_STEP;
    let mut packed = vec![0u32; m.div_ceil(32) * steps * 512];
    packed
        .par_chunks_mut(steps * 512)
        .enumerate()
        .for_each(|(xb, block)| {
            let mut pairs = vec![0u32; k / 2];
            for h in 0..2 {
                for c in 0..16 {
                    let i = xb * 32 + h * 16 + c;
                    if i >= m {
                        return;
                    }
                    // A contiguous pass that vectorises, then the transposing scatter.
                    simd(
                        #[inline(always)]
                        || {
                            for (p, two) in
                                pairs.iter_mut().zip(x[i * k..(i + 1) * k].chunks_exact(2))
                            {
                                *p = bf16_bits(two[0]) | (bf16_bits(two[1]) << 16);
                            }
                        },
                    );
                    for (s, step) in pairs.chunks_exact(16).enumerate() {
                        let tile = &mut block[s * 512 + h * 256..][..256];
                        for (r, &pair) in step.iter().enumerate() {
                            tile[r * 16 + c] = pair;
                        }
                    }
                }
            }
        });
    packed
}

/// `half::bf16::from_f32(v).to_bits()`, round to nearest even and NaNs kept quiet, written
/// without branches so that the packing loop vectorises.
#[inline(always)]
fn bf16_bits(v: f32) -> u32 {
    let b = v.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    if b & 0x7fff_ffff > 0x7f80_0000 {
        (b >> 16) | 0x40
    } else {
        rounded
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod kernel {
    use std::arch::asm;

    use half::bf16;

    /// `ldtilecfg`'s operand: palette 1, eight tiles of 16 rows × 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        bytes_per_row: [u16; 16],
        rows: [u8; 16],
    }

    const CONFIG: TileConfig = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        bytes_per_row: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
        rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
    };

    pub fn enable() -> bool {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        let amx_bf16 = (leaf7.edx >> 22) & 1 == 1;
        let amx_tile = (leaf7.edx >> 24) & 1 == 1;
        // SAFETY: a request for permission; on refusal it returns -1 and changes nothing.
        amx_bf16
            && amx_tile
            && unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_REQ_XCOMP_PERM,
                    XFEATURE_XTILEDATA,
                )
            } == 0
    }

    /// Runs `f` with the tiles configured on this thread, and releases them after.
    pub fn with_tiles(f: impl FnOnce()) {
        // SAFETY: only called once `enable` succeeded (`available()`); the config is valid.
        unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly)) };
        f();
        // SAFETY: as above.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }

    /// Adds `chunk` k-steps of `tiles · xs` to the 32×32 sums block, laid out as
    /// `[weight row][x row]` (rows of 128 bytes: tile (0,0) at 0, (0,1) at 64 bytes, (1,0) 16
    /// rows down). `tiles` holds 32 weight rows of 32 values per step (1024 per step), `xs` the
    /// chunk's packed pairs (512 per step).
    pub fn block(sums: &mut [f32], tiles: &[bf16], xs: &[u32], chunk: usize) {
        assert!(sums.len() >= 1024 && xs.len() >= chunk * 512 && chunk > 0);
        assert!(tiles.len() >= chunk * 1024);
        // SAFETY: the asserts bound every tile load and store: a tile reads 16 rows of 64
        // bytes, the sums 32 rows of 128 bytes, the weights and the pairs 1 KiB per half-step.
        // The tiles were configured by `with_tiles`.
        unsafe {
            asm!(
                "tileloadd tmm0, [{c} + {ldc}*1]",
                "tileloadd tmm1, [{c} + {ldc}*1 + 64]",
                "tileloadd tmm2, [{c} + {ldc}*1 + 2048]",
                "tileloadd tmm3, [{c} + {ldc}*1 + 2112]",
                "2:",
                "tileloadd tmm4, [{w0} + {ldw}*1]",
                "tileloadd tmm6, [{x} + {ldx}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{x} + {ldx}*1 + 1024]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{w1} + {ldw}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "add {w0}, 2048",
                "add {w1}, 2048",
                "add {x}, 2048",
                "dec {n}",
                "jnz 2b",
                "tilestored [{c} + {ldc}*1], tmm0",
                "tilestored [{c} + {ldc}*1 + 64], tmm1",
                "tilestored [{c} + {ldc}*1 + 2048], tmm2",
                "tilestored [{c} + {ldc}*1 + 2112], tmm3",
                w0 = inout(reg) tiles.as_ptr() => _,
                w1 = inout(reg) tiles.as_ptr().add(512) => _,
                x = inout(reg) xs.as_ptr() => _,
                n = inout(reg) chunk => _,
                ldw = in(reg) 64usize,
                ldx = in(reg) 64usize,
                c = in(reg) sums.as_mut_ptr(),
                ldc = in(reg) 128usize,
                out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
                out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
                options(nostack),
            );
        }
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
mod kernel {
    use half::bf16;

    pub fn enable() -> bool {
        false
    }

    pub fn with_tiles(f: impl FnOnce()) {
        f()
    }

    pub fn block(_: &mut [f32], _: &[bf16], _: &[u32], _: usize) {
        unreachable!("amx::applies is false off x86-64 Linux")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn rand(m: usize, k: usize, seed: f64, dtype: DType) -> Tensor {
        Tensor::rand(-1f32, 1., (m, k), &Device::Cpu)
            .and_then(|t| t.affine(1.0, seed * 1e-3))
            .and_then(|t| t.to_dtype(dtype))
            .expect("tensor")
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("values")
    }

    #[test]
    fn equals_the_f32_product_of_the_bf16_rounded_activations() {
        if !available() {
            eprintln!("skipped: no AMX-BF16 on this machine");
            return;
        }
        // m and n that end mid-block; k of three steps, not a multiple of the chunk; k of
        // more than one chunk.
        for (m, k, n) in [(5, 96, 45), (37, 96, 64), (70, 608, 100), (40, 1024, 32)] {
            let x = rand(m, k, 1.0, DType::F32);
            let w = rand(n, k, 2.0, DType::BF16);
            let b = rand(1, n, 3.0, DType::F32).squeeze(0).expect("bias");
            assert!(applies(&x, &w, Some(&b)));
            let ours = linear(&x, &w, Some(&b)).expect("amx");
            assert_eq!((ours.dims(), ours.dtype()), (&[m, n][..], DType::F32));
            // The kernel rounds x to bf16 and sums in f32; only the order of the sums differs.
            let xr = x
                .to_dtype(DType::BF16)
                .and_then(|t| t.to_dtype(DType::F32))
                .expect("rounded x");
            let wf = w.to_dtype(DType::F32).expect("f32 w");
            let exact = xr
                .matmul(&wf.t().expect("t"))
                .and_then(|y| y.broadcast_add(&b))
                .expect("f32 product");
            let magnitude = xr
                .abs()
                .and_then(|x| x.matmul(&wf.abs()?.t()?))
                .expect("|x||w|");
            let bound = k as f32 * f32::EPSILON;
            let (ours, exact, magnitude) = (values(&ours), values(&exact), values(&magnitude));
            for ((o, e), s) in ours.iter().zip(&exact).zip(&magnitude) {
                assert!(
                    (o - e).abs() <= bound * (s + 1.0),
                    "m={m} k={k} n={n}: {o} vs {e}"
                );
            }
        }
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
                bf16_bits(v),
                u32::from(bf16::from_f32(v).to_bits()),
                "{v:e}"
            );
        }
    }

    #[test]
    fn declines_what_it_does_not_cover() {
        let w = rand(8, 64, 0.0, DType::BF16);
        let x = rand(8, 64, 0.0, DType::F32);
        assert!(!applies(
            &rand(gemv::MAX_ROWS, 64, 0.0, DType::F32),
            &w,
            None
        ));
        assert!(!applies(
            &rand(8, 48, 0.0, DType::F32),
            &rand(8, 48, 0.0, DType::BF16),
            None
        ));
        assert!(!applies(&x.to_dtype(DType::BF16).expect("bf16"), &w, None));
        assert!(!applies(&x, &w.to_dtype(DType::F32).expect("f32"), None));
        let bf16_bias = rand(1, 8, 0.0, DType::BF16).squeeze(0).expect("bias");
        assert!(!applies(&x, &w, Some(&bf16_bias)));
    }
}
