//! bf16 `x Wᵀ` on Intel AMX, the tile units of Sapphire Rapids and later Xeons.
//!
//! candle multiplies bf16 on the CPU by widening both sides to f32 and running its f32 GEMM,
//! so bf16 is slower than f32 there. PyTorch hands the same product to oneDNN, which runs it on
//! AMX at several times the f32 rate. This is that path for the products that dominate prefill
//! and the vision tower, the linear layers (`m > gemv::MAX_ROWS` rows):
//!
//! - `tdpbf16ps` multiplies a 16×32 bf16 tile by a 32×16 tile held as bf16 pairs and adds the
//!   products into 16×16 f32 sums, which stay f32 until the one rounding to bf16 at the end, as
//!   oneDNN does.
//! - The weight is the left operand, its rows read in place. The activations are the right
//!   operand, repacked once per call into the pair layout. So the weight needs no copy, and the
//!   result comes out transposed, `(W xᵀ)ᵀ`, which the final write undoes.
//! - Eight tile registers hold a 32×32 block of sums (four tiles), two weight tiles and two
//!   activation tiles. The loads are interleaved with the products, because tiles are not
//!   renamed: a load into a tile waits for the last product that read it.
//! - Linux hands out the 8 KiB of tile state only on request (`arch_prctl`), once per process.

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

use crate::error::Result;
use crate::fused::contiguous;
use crate::gemv;

/// Whether this CPU has AMX-BF16 and the kernel granted the tile state. `LLAVA_NO_AMX=1` turns
/// the path off, to compare against candle's own product.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| std::env::var_os("LLAVA_NO_AMX").is_none() && kernel::enable())
}

/// Whether [`matmul_t`] takes this product: bf16 on the CPU, `x: [m, k]` with
/// `m > gemv::MAX_ROWS`, `w: [n, k]`, `k` a multiple of 32, both contiguous.
pub fn applies(x: &Tensor, w: &Tensor) -> bool {
    x.device().is_cpu()
        && w.device().is_cpu()
        && x.dtype() == DType::BF16
        && w.dtype() == DType::BF16
        && x.rank() == 2
        && w.rank() == 2
        && x.dims()[0] > gemv::MAX_ROWS
        && x.dims()[1] == w.dims()[1]
        && x.dims()[1].is_multiple_of(K_STEP)
        && x.is_contiguous()
        && w.is_contiguous()
        && available()
}

/// `x Wᵀ (+ b)` for bf16 `x: [m, k]`, `w: [n, k]`, `b: [n]`, giving bf16 `[m, n]`; see
/// [`applies`]. The bias joins the f32 sums before their one rounding, as in oneDNN's linear.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    Ok(match b {
        Some(b) => x.apply_op3(w, b, AmxMatmul)?,
        None => x.apply_op2(w, AmxMatmul)?,
    })
}

/// The k extent of one tile product: 16 rows of 64 bytes, 32 bf16 each.
const K_STEP: usize = 32;
/// k-steps per pass over the activations: their packed slice (`m × 512` values) stays in L2
/// while every weight block of a task meets it.
const K_CHUNK: usize = 16;
/// 32-row weight blocks per parallel task.
const BLOCKS_PER_TASK: usize = 4;

struct AmxMatmul;

const OP: &str = "amx-matmul";

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
        "amx-linear"
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
    let (CpuStorage::BF16(x), CpuStorage::BF16(w)) = (xs, ws) else {
        candle_core::bail!("{OP}: takes bf16 on both sides");
    };
    let (x, w) = (contiguous(x, xl, OP)?, contiguous(w, wl, OP)?);
    if !available() {
        candle_core::bail!("{OP}: this CPU or kernel offers no AMX-BF16");
    }
    let bias: Vec<f32> = match bias {
        None => vec![0.0; n],
        Some((CpuStorage::BF16(b), bl)) if bl.shape().dims() == [n] => {
            contiguous(b, bl, OP)?.iter().map(|v| v.to_f32()).collect()
        }
        Some((_, bl)) => {
            candle_core::bail!("{OP}: bias {:?} for {n} bf16 outputs", bl.dims())
        }
    };
    let out = product(x, w, &bias, m, k, n);
    Ok((CpuStorage::BF16(out), Shape::from((m, n))))
}

/// The output pointer shared by the tasks, each of which writes its own columns.
struct Columns(*mut bf16);
// SAFETY: tasks write disjoint column ranges of one buffer that outlives them.
unsafe impl Sync for Columns {}

fn product(x: &[bf16], w: &[bf16], bias: &[f32], m: usize, k: usize, n: usize) -> Vec<bf16> {
    let steps = k / K_STEP;
    let x_blocks = m.div_ceil(32);
    let xp = pack_pairs(x, m, k);
    let w_blocks = n.div_ceil(32);
    // The last weight block reads 32 rows: copy it, zero-padded, when n runs short of that.
    let tail: Vec<bf16> = if !n.is_multiple_of(32) {
        let mut t = vec![bf16::ZERO; 32 * k];
        let r0 = (w_blocks - 1) * 32;
        t[..(n - r0) * k].copy_from_slice(&w[r0 * k..n * k]);
        t
    } else {
        Vec::new()
    };
    let mut out = vec![bf16::ZERO; m * n];
    let cols = Columns(out.as_mut_ptr());
    let blocks: Vec<usize> = (0..w_blocks).collect();
    blocks.par_chunks(BLOCKS_PER_TASK).for_each(|task| {
        let cols = &cols;
        // Sums for this task's blocks: [block][x block][32 weight rows][32 x rows] f32.
        let mut sums = vec![0f32; task.len() * x_blocks * 1024];
        kernel::with_tiles(|| {
            let mut s0 = 0;
            while s0 < steps {
                let chunk = K_CHUNK.min(steps - s0);
                for (b, &wb) in task.iter().enumerate() {
                    let rows = if !tail.is_empty() && wb == w_blocks - 1 {
                        &tail[..]
                    } else {
                        &w[wb * 32 * k..(wb + 1) * 32 * k]
                    };
                    for xb in 0..x_blocks {
                        let at = (b * x_blocks + xb) * 1024;
                        let xs = &xp[(xb * steps + s0) * 512..(xb * steps + s0 + chunk) * 512];
                        kernel::block(&mut sums[at..at + 1024], &rows[s0 * K_STEP..], k, xs, chunk);
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
                            *cols.0.add(i * n + wb * 32 + c) =
                                bf16::from_f32(s[c * 32 + r] + bias[wb * 32 + c]);
                        }
                    }
                }
            }
        }
    });
    out
}

/// `x: [m, k]` as tiles of bf16 pairs: `[x block][k step][half][16 pair rows][16 x rows]`, each
/// element the two values `x[i, 2p]`, `x[i, 2p + 1]`; rows past `m` are zeros.
fn pack_pairs(x: &[bf16], m: usize, k: usize) -> Vec<u32> {
    let steps = k / K_STEP;
    let mut packed = vec![0u32; m.div_ceil(32) * steps * 512];
    packed
        .par_chunks_mut(steps * 512)
        .enumerate()
        .for_each(|(xb, block)| {
            for h in 0..2 {
                for c in 0..16 {
                    let i = xb * 32 + h * 16 + c;
                    if i >= m {
                        return;
                    }
                    let row = &x[i * k..(i + 1) * k];
                    for (p, pair) in row.chunks_exact(2).enumerate() {
                        let (s, r) = (p / 16, p % 16);
                        block[s * 512 + h * 256 + r * 16 + c] =
                            u32::from(pair[0].to_bits()) | (u32::from(pair[1].to_bits()) << 16);
                    }
                }
            }
        });
    packed
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

    /// Adds `chunk` k-steps of `rows[0..32] · xs` to the 32×32 sums block, laid out as
    /// `[weight row][x row]` (rows of 128 bytes: tile (0,0) at 0, (0,1) at 64 bytes, (1,0) 16
    /// rows down). `rows` starts at the chunk's first k of 32 weight rows `ld` values apart;
    /// `xs` holds the chunk's packed pairs (512 per step).
    pub fn block(sums: &mut [f32], rows: &[bf16], ld: usize, xs: &[u32], chunk: usize) {
        assert!(sums.len() >= 1024 && xs.len() >= chunk * 512 && chunk > 0);
        assert!(rows.len() >= 31 * ld + chunk * 32);
        // SAFETY: the asserts bound every tile load and store: a tile reads 16 rows of 64
        // bytes, the sums 32 rows of 128 bytes, the weights rows `ld` apart from each row's
        // first element, the pairs 1 KiB per half-step. The tiles were configured by
        // `with_tiles`.
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
                "add {w0}, 64",
                "add {w1}, 64",
                "add {x}, 2048",
                "dec {n}",
                "jnz 2b",
                "tilestored [{c} + {ldc}*1], tmm0",
                "tilestored [{c} + {ldc}*1 + 64], tmm1",
                "tilestored [{c} + {ldc}*1 + 2048], tmm2",
                "tilestored [{c} + {ldc}*1 + 2112], tmm3",
                w0 = inout(reg) rows.as_ptr() => _,
                w1 = inout(reg) rows.as_ptr().add(16 * ld) => _,
                x = inout(reg) xs.as_ptr() => _,
                n = inout(reg) chunk => _,
                ldw = in(reg) ld * 2,
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

    pub fn block(_: &mut [f32], _: &[bf16], _: usize, _: &[u32], _: usize) {
        unreachable!("amx::applies is false off x86-64 Linux")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn bf16_tensor(m: usize, k: usize, seed: f64) -> Tensor {
        Tensor::rand(-1f32, 1., (m, k), &Device::Cpu)
            .and_then(|t| t.affine(1.0, seed * 1e-3))
            .and_then(|t| t.to_dtype(DType::BF16))
            .expect("tensor")
    }

    #[test]
    fn agrees_with_the_f32_product_of_the_same_values() {
        if !available() {
            eprintln!("skipped: no AMX-BF16 on this machine");
            return;
        }
        // m and n that end mid-block; k of three steps, not a multiple of the chunk.
        for (m, k, n) in [(5, 96, 45), (37, 96, 64), (70, 608, 100)] {
            let x = bf16_tensor(m, k, 1.0);
            let w = bf16_tensor(n, k, 2.0);
            assert!(applies(&x, &w));
            let b = bf16_tensor(1, n, 3.0).squeeze(0).expect("bias");
            let ours = linear(&x, &w, Some(&b)).expect("amx");
            assert_eq!((ours.dims(), ours.dtype()), (&[m, n][..], DType::BF16));
            let f = |t: &Tensor| t.to_dtype(DType::F32).expect("f32");
            let exact = f(&x)
                .matmul(&f(&w).t().expect("t"))
                .and_then(|y| y.broadcast_add(&f(&b)))
                .expect("f32 product");
            let diff = (f(&ours) - &exact)
                .and_then(|d| d.abs())
                .and_then(|d| d.flatten_all())
                .and_then(|d| d.to_vec1::<f32>())
                .expect("diff");
            let scale = exact
                .abs()
                .and_then(|d| d.flatten_all())
                .and_then(|d| d.to_vec1::<f32>())
                .expect("scale");
            for (d, s) in diff.iter().zip(&scale) {
                // One bf16 rounding of an f32 sum: 2⁻⁸ relative, plus f32 summation noise.
                assert!(*d <= s.max(1.0) / 256.0, "m={m} k={k} n={n}: {d} vs {s}");
            }
        }
    }

    #[test]
    fn declines_what_it_does_not_cover() {
        let w = bf16_tensor(8, 64, 0.0);
        assert!(!applies(&bf16_tensor(gemv::MAX_ROWS, 64, 0.0), &w));
        assert!(!applies(&bf16_tensor(8, 48, 0.0), &bf16_tensor(8, 48, 0.0)));
        let f32s = Tensor::zeros((8, 64), DType::F32, &Device::Cpu).expect("zeros");
        assert!(!applies(&f32s, &w.to_dtype(DType::F32).expect("f32")));
    }
}
