//! bf16 `x Wᵀ (+ b)` over many rows, multiplied in bf16 with f32 sums: the products of prefill
//! and the vision tower when the weights are bf16.
//!
//! candle multiplies bf16 on the CPU by widening both sides to f32 and running its f32 GEMM,
//! so bf16 is no faster than f32 there. PyTorch hands the same product to oneDNN, which runs it
//! on the CPU's bf16 instructions. This is that path, for the linear layers (`m >
//! gemv::MAX_ROWS` rows) of bf16 weights, whose activations stay f32 between the products
//! (`weights::activation_dtype`). The activations are rounded to bf16 as they are packed, and
//! the sums (plus the bias) come out as f32, unrounded.
//!
//! Picked at run time, fastest first:
//! - [`crate::kernels::amx`]: Intel AMX tiles (Sapphire Rapids and later Xeons);
//! - the `bf16-gemm` crate: AVX512-BF16's `vdpbf16ps` (AMD Zen 4 and later, Intel Cooper Lake
//!   and later), which candle's bf16 matmul shares (`vendor/candle-core`);
//! - neither: `Linear` widens the weight to f32 and candle's GEMM runs it on AVX-512, AVX2 + FMA
//!   or its portable path, as that crate dispatches.
//!
//! `LLAVA_NO_AMX=1` and `LLAVA_NO_AVX512BF16=1` turn a path off, to compare against the next
//! (the second also turns off candle's bf16 matmul on it).

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use half::bf16;

use crate::error::Result;
use crate::kernels::fused::contiguous;
use crate::kernels::{amx, gemv};

/// The instruction set that multiplies bf16 here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Amx,
    Avx512Bf16,
}

impl Backend {
    /// Whether this CPU (and for AMX, the kernel) offers the instructions.
    pub fn supported(self) -> bool {
        match self {
            Backend::Amx => amx::supported(),
            Backend::Avx512Bf16 => bf16_gemm::supported(),
        }
    }

    /// The `k` a product must be a multiple of: a tile's 32 values for AMX.
    fn k_step(self) -> usize {
        match self {
            Backend::Amx => amx::K_STEP,
            Backend::Avx512Bf16 => 1,
        }
    }

    fn product(
        self,
        x: &[f32],
        w: &[bf16],
        bias: &[f32],
        m: usize,
        k: usize,
        n: usize,
    ) -> Vec<f32> {
        match self {
            Backend::Amx => amx::product(x, w, bias, m, k, n),
            Backend::Avx512Bf16 => {
                // The sums start at the bias; `w: [n, k]` read as `Wᵀ: [k, n]`.
                let mut out: Vec<f32> = Vec::with_capacity(m * n);
                for _ in 0..m {
                    out.extend_from_slice(bias);
                }
                let x = bf16_gemm::View {
                    data: x,
                    rs: k,
                    cs: 1,
                };
                let w = bf16_gemm::View {
                    data: w,
                    rs: 1,
                    cs: k,
                };
                bf16_gemm::gemm(m, n, k, x, w, &mut out);
                out
            }
        }
    }
}

/// The fastest backend this machine offers and the environment allows, if any.
pub fn backend() -> Option<Backend> {
    static BACKEND: OnceLock<Option<Backend>> = OnceLock::new();
    *BACKEND.get_or_init(|| {
        let allowed = |var: &str| std::env::var_os(var).is_none();
        if allowed("LLAVA_NO_AMX") && Backend::Amx.supported() {
            Some(Backend::Amx)
        } else if Backend::Avx512Bf16.supported() {
            Some(Backend::Avx512Bf16)
        } else {
            None
        }
    })
}

/// Whether bf16 products over many rows run narrow here: then the layers that multiply many
/// rows keep their bf16 weights as stored instead of widening them (`gemm_layout`).
pub fn available() -> bool {
    backend().is_some()
}

/// Whether [`linear`] takes this product: on the CPU, f32 `x: [m, k]` with `m > gemv::MAX_ROWS`,
/// bf16 `w: [n, k]`, `k` a multiple of the backend's step, both contiguous, and no bias or a
/// contiguous f32 one.
pub fn applies(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> bool {
    gemv::contiguous_cpu_product(x, w)
        && x.dtype() == DType::F32
        && w.dtype() == DType::BF16
        && b.is_none_or(|b| b.dtype() == DType::F32 && b.is_contiguous() && b.rank() == 1)
        && x.dims()[0] > gemv::MAX_ROWS
        && backend().is_some_and(|be| x.dims()[1].is_multiple_of(be.k_step()))
}

/// `x Wᵀ (+ b)` for f32 `x: [m, k]`, bf16 `w: [n, k]`, f32 `b: [n]`, giving f32 `[m, n]`; see
/// [`applies`].
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    Ok(match b {
        Some(b) => x.apply_op3(w, b, Bf16Linear)?,
        None => x.apply_op2(w, Bf16Linear)?,
    })
}

struct Bf16Linear;

const OP: &str = "bf16-matmul";
const OP_BIAS: &str = "bf16-linear";

impl CustomOp2 for Bf16Linear {
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
        forward(xs, xl, ws, wl, None)
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

impl CustomOp3 for Bf16Linear {
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
        forward(xs, xl, ws, wl, Some((bs, bl)))
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

fn forward(
    xs: &CpuStorage,
    xl: &Layout,
    ws: &CpuStorage,
    wl: &Layout,
    bias: Option<(&CpuStorage, &Layout)>,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let Some(backend) = backend() else {
        candle_core::bail!("{OP}: this CPU has neither AMX-BF16 nor AVX512-BF16");
    };
    let (m, k) = xl.shape().dims2()?;
    let (n, wk) = wl.shape().dims2()?;
    if k != wk || !k.is_multiple_of(backend.k_step()) {
        candle_core::bail!("{OP}: x is [{m}, {k}], the weight [{n}, {wk}]");
    }
    let (CpuStorage::F32(x), CpuStorage::BF16(w)) = (xs, ws) else {
        candle_core::bail!("{OP}: takes f32 activations and bf16 weights");
    };
    let (x, w) = (contiguous(x, xl, OP)?, contiguous(w, wl, OP)?);
    let bias: Vec<f32> = match bias {
        None => vec![0.0; n],
        Some((CpuStorage::F32(b), bl)) if bl.shape().dims() == [n] => {
            contiguous(b, bl, OP)?.to_vec()
        }
        Some((_, bl)) => {
            candle_core::bail!("{OP}: bias {:?} for {n} f32 outputs", bl.dims())
        }
    };
    let out = backend.product(x, w, &bias, m, k, n);
    Ok((CpuStorage::F32(out), Shape::from((m, n))))
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

    /// Every backend this machine has, each against the f32 product of the bf16-rounded
    /// activations; a backend the CPU lacks says that it skipped.
    #[test]
    fn each_backend_equals_the_f32_product_of_the_bf16_rounded_activations() {
        let mut ran = 0;
        for backend in [Backend::Amx, Backend::Avx512Bf16] {
            if !backend.supported() {
                eprintln!("skipped {backend:?}: not on this machine");
                continue;
            }
            ran += 1;
            // m and n that end mid-block and mid-tile; k of three AMX steps, not a multiple of
            // a chunk; k of more than one chunk; a wide n that spreads over several tasks.
            for (m, k, n) in [
                (5, 96, 45),
                (37, 96, 64),
                (70, 608, 100),
                (40, 1024, 32),
                (25, 320, 530),
            ] {
                let x = rand(m, k, 1.0, DType::F32);
                let w = rand(n, k, 2.0, DType::BF16);
                let b = rand(1, n, 3.0, DType::F32).squeeze(0).expect("bias");
                let (xv, wv, bv) = (
                    values(&x),
                    w.flatten_all()
                        .and_then(|t| t.to_vec1::<bf16>())
                        .expect("w"),
                    values(&b),
                );
                let ours = backend.product(&xv, &wv, &bv, m, k, n);
                // The kernels round x to bf16 and sum in f32; only the order of the sums differs.
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
                let (exact, magnitude) = (values(&exact), values(&magnitude));
                assert_eq!(ours.len(), m * n);
                for ((o, e), s) in ours.iter().zip(&exact).zip(&magnitude) {
                    assert!(
                        (o - e).abs() <= bound * (s + 1.0),
                        "{backend:?} m={m} k={k} n={n}: {o} vs {e}"
                    );
                }
            }
        }
        if ran > 0 {
            // And through the op, on whichever backend the dispatch picked.
            let x = rand(20, 64, 1.0, DType::F32);
            let w = rand(24, 64, 2.0, DType::BF16);
            assert!(applies(&x, &w, None));
            let y = linear(&x, &w, None).expect("linear");
            assert_eq!((y.dims(), y.dtype()), (&[20, 24][..], DType::F32));
        }
    }

    #[test]
    fn declines_what_it_does_not_cover() {
        let w = rand(8, 64, 0.0, DType::BF16);
        let x = rand(gemv::MAX_ROWS + 4, 64, 0.0, DType::F32);
        assert_eq!(applies(&x, &w, None), available());
        assert!(!applies(
            &rand(gemv::MAX_ROWS, 64, 0.0, DType::F32),
            &w,
            None
        ));
        // AMX multiplies whole tiles of 32 values of k; AVX512-BF16 pads an odd k.
        assert_eq!(
            applies(
                &rand(gemv::MAX_ROWS + 4, 63, 0.0, DType::F32),
                &rand(8, 63, 0.0, DType::BF16),
                None
            ),
            backend() == Some(Backend::Avx512Bf16)
        );
        assert!(!applies(&x.to_dtype(DType::BF16).expect("bf16"), &w, None));
        assert!(!applies(&x, &w.to_dtype(DType::F32).expect("f32"), None));
        let bf16_bias = rand(1, 8, 0.0, DType::BF16).squeeze(0).expect("bias");
        assert!(!applies(&x, &w, Some(&bf16_bias)));
    }
}
