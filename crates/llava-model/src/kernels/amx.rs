//! bf16 `x Wᵀ` on Intel AMX, the tile units of Sapphire Rapids and later Xeons: the first
//! backend of [`crate::kernels::bf16_linear`], which holds the op, its checks and its tests.
//!
//! - `tdpbf16ps` multiplies a 16×32 bf16 tile by a 32×16 tile held as bf16 pairs and adds the
//!   products into 16×16 f32 sums.
//! - The weight is the left operand and the activations the right one, repacked once per call
//!   into the pair layout, so the result comes out transposed, `(W xᵀ)ᵀ`, which the final write
//!   undoes. Each task copies the k-chunk of its weight rows into tile order first: read in
//!   place, rows 2–11 KiB apart all fall in the same few L1 sets and are evicted before reuse.
//! - Eight tile registers hold a 32×32 block of sums (four tiles), two weight tiles and two
//!   activation tiles. The loads are interleaved with the products, because tiles are not
//!   renamed: a load into a tile waits for the last product that read it.
//! - Linux hands out the 8 KiB of tile state only on request (`arch_prctl`), once per process.

use std::sync::OnceLock;

use bf16_gemm::pair_up;
use half::bf16;
use rayon::prelude::*;

use crate::kernels::fused::{DisjointWrites, simd};

/// Whether this CPU has AMX-BF16 and the kernel granted the tile state.
pub(crate) fn supported() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(kernel::enable)
}

/// The k extent of one tile product: 16 rows of 64 bytes, 32 bf16 each.
pub(crate) const K_STEP: usize = 32;
/// k-steps per pass over the activations: their packed slice (`m × 512` values) stays in L2
/// while every weight block of a task meets it, and one block's chunk of weights (32 KiB) in L1.
const K_CHUNK: usize = 16;
/// 32-row weight blocks per parallel task.
const BLOCKS_PER_TASK: usize = 4;

/// `x Wᵀ + bias` for `x: [m, k]`, `w: [n, k]`, `k` a multiple of [`K_STEP`]; only called where
/// [`supported`].
pub(crate) fn product(
    x: &[f32],
    w: &[bf16],
    bias: &[f32],
    m: usize,
    k: usize,
    n: usize,
) -> Vec<f32> {
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
                        || pair_up(&x[i * k..(i + 1) * k], &mut pairs),
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
        // SAFETY: only called once `enable` succeeded (`supported()`); the config is valid.
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
        unreachable!("AMX is not supported off x86-64 Linux")
    }
}
