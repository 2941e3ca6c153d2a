//! llava-rs's own CUDA kernels (`cuda_kernels.cu`), where candle's ops leave the GPU idle.
//!
//! - **The attention softmax.** With candle's ops, a decoder layer's softmax over
//!   `[1, 32, 617, 617]` bf16 scores took four kernels: widen to f32, add the `[1, 1, s, t]`
//!   mask through candle's strided broadcast path, softmax, and narrow back to bf16. Nsight
//!   Compute put 12 ms of a 26 ms bf16 prefill there (BENCHMARKS.md). Here one kernel reads the
//!   scores in their own dtype, works out from indices which keys are in the future or padding,
//!   and writes the probabilities.
//! - **The bias add** of the vision tower's and projector's linear layers, which candle's
//!   broadcast add made slower than the products themselves.
//!
//! The numbers are those of the composite ops, bit for bit: the softmax sums in f32 in the order
//! of candle's kernel (a warp per row) and a masked score is `score + (-1e30)`, whose `exp` is an
//! exact 0; the bias add rounds an f32 sum, which for bf16 and f16 is the correctly rounded sum.
//! Unit tests compare both with candle's ops on the GPU.
//!
//! NVRTC compiles the source when a model loads onto the GPU ([`prepare`]), not at build time.
//! So a `--features cuda` build needs no extra step, and the PTX suits the GPU it runs on.

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};

/// The keys a query may not see.
#[derive(Debug, Clone, Copy)]
pub struct Mask<'a> {
    /// Positions already in the KV cache: query `i` of this call sees keys `0..=past + i`.
    pub past: usize,
    /// `[batch, keys]` u8 with 0 for padding, or `None` when nothing is padded.
    pub keys: Option<&'a Tensor>,
}

/// Whether the kernels here take `xs`: tensors on a CUDA device, all in one float dtype.
pub fn applies(xs: &[&Tensor]) -> bool {
    cfg!(feature = "cuda")
        && xs.iter().all(|x| {
            x.device().is_cuda()
                && x.dtype() == xs[0].dtype()
                && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16)
        })
}

/// Softmax over the last axis of `scores` (`[batch, heads, queries, keys]` when masked), with
/// `mask`'s keys left out, in the scores' dtype. Inference only: it has no backward pass.
pub fn softmax_last_dim(scores: &Tensor, mask: Option<Mask>) -> Result<Tensor> {
    imp::softmax_last_dim(scores, mask)
}

/// `y + bias` for `y: [rows, n]` and `bias: [n]`; see [`applies`].
pub fn add_bias(y: &Tensor, bias: &Tensor) -> Result<Tensor> {
    imp::add_bias(y, bias)
}

/// Compiles and loads the kernels on `device` (a no-op off CUDA), so that a missing NVRTC
/// library shows up as an error at load and not inside the first prompt's timings.
pub fn prepare(device: &Device) -> Result<()> {
    imp::prepare(device)
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::*;

    fn unbuilt() -> ModelError {
        ModelError::Input("llava-rs's CUDA kernels need a build with --features cuda".into())
    }

    pub fn softmax_last_dim(_: &Tensor, _: Option<Mask>) -> Result<Tensor> {
        Err(unbuilt())
    }

    pub fn add_bias(_: &Tensor, _: &Tensor) -> Result<Tensor> {
        Err(unbuilt())
    }

    pub fn prepare(_: &Device) -> Result<()> {
        Ok(())
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use std::sync::OnceLock;

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaFunction, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::cudarc::nvrtc;
    use candle_core::cuda_backend::{CudaDType, CudaStorageSlice, WrapErr};
    use candle_core::{
        CpuStorage, CudaDevice, CudaStorage, CustomOp1, CustomOp2, Layout, Shape, Storage,
    };
    use half::{bf16, f16};

    use super::*;

    const MODULE: &str = "llava_kernels";
    const SOURCE: &str = include_str!("cuda_kernels.cu");

    /// The PTX, compiled once per process.
    fn ptx() -> Result<&'static str> {
        static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
        PTX.get_or_init(|| {
            // cudarc would panic on a missing library; say which one instead.
            // SAFETY: only looks the library up.
            if !unsafe { nvrtc::sys::is_culib_present() } {
                return Err(
                    "the CUDA runtime compiler (libnvrtc) was not found: add the \
                     CUDA toolkit's lib directory to LD_LIBRARY_PATH"
                        .into(),
                );
            }
            nvrtc::compile_ptx(SOURCE)
                .map(|p| p.to_src())
                .map_err(|e| format!("NVRTC could not compile cuda_kernels.cu: {e}"))
        })
        .as_deref()
        .map_err(|e| ModelError::Input(e.clone()))
    }

    pub fn prepare(device: &Device) -> Result<()> {
        if let Device::Cuda(dev) = device {
            function(dev, "llava_softmax_f32")?;
        }
        Ok(())
    }

    /// A kernel of the module, loaded on first use.
    fn function(dev: &CudaDevice, name: &str) -> candle_core::Result<CudaFunction> {
        let ptx = ptx().map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok(dev
            .get_or_load_custom_func(name, MODULE, ptx)?
            .into_cuda_function())
    }

    /// The kernel name's dtype suffix.
    fn suffix(slice: &CudaStorageSlice) -> candle_core::Result<&'static str> {
        Ok(match slice {
            CudaStorageSlice::F32(_) => "f32",
            CudaStorageSlice::BF16(_) => "bf16",
            CudaStorageSlice::F16(_) => "f16",
            _ => candle_core::bail!("llava-rs's CUDA kernels take f32, bf16 or f16"),
        })
    }

    /// The contiguous part of a tensor's storage that its layout covers.
    fn view<'a, T: CudaDType>(
        s: &'a CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<CudaView<'a, T>> {
        let Some((o1, o2)) = l.contiguous_offsets() else {
            candle_core::bail!("llava-rs's CUDA kernels take contiguous tensors")
        };
        Ok(s.as_cuda_slice::<T>()?.slice(o1..o2))
    }

    pub fn softmax_last_dim(scores: &Tensor, mask: Option<Mask>) -> Result<Tensor> {
        let heads = match mask {
            Some(_) => scores.dims4()?.1,
            None => 1,
        };
        let keys = match mask.and_then(|m| m.keys) {
            Some(k) => Some(k.to_dtype(DType::U8)?.contiguous()?),
            None => None,
        };
        let op = Softmax {
            past: mask.map(|m| m.past),
            keys: keys.as_ref(),
            heads,
        };
        Ok(scores.contiguous()?.apply_op1_no_bwd(&op)?)
    }

    struct Softmax<'a> {
        /// `Some(past)` for the decoder's causal mask.
        past: Option<usize>,
        keys: Option<&'a Tensor>,
        heads: usize,
    }

    impl CustomOp1 for Softmax<'_> {
        fn name(&self) -> &'static str {
            "llava-cuda-softmax"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("the CUDA softmax was given CPU scores")
        }

        fn cuda_fwd(
            &self,
            storage: &CudaStorage,
            layout: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let out = match &storage.slice {
                CudaStorageSlice::F32(_) => self.launch::<f32>(storage, layout)?,
                CudaStorageSlice::BF16(_) => self.launch::<bf16>(storage, layout)?,
                CudaStorageSlice::F16(_) => self.launch::<f16>(storage, layout)?,
                _ => candle_core::bail!("the CUDA softmax takes f32, bf16 or f16 scores"),
            };
            Ok((out, layout.shape().clone()))
        }
    }

    impl Softmax<'_> {
        fn launch<T: DeviceRepr + CudaDType>(
            &self,
            storage: &CudaStorage,
            layout: &Layout,
        ) -> candle_core::Result<CudaStorage> {
            let dev = storage.device();
            let x = view::<T>(storage, layout)?;
            let dims = layout.dims();
            let t = dims.last().copied().unwrap_or(1).max(1);
            let rows = layout.shape().elem_count() / t;
            let s = match self.past {
                Some(_) if dims.len() == 4 => dims[2],
                _ => 1,
            };
            let func = function(dev, &format!("llava_softmax_{}", suffix(&storage.slice)?))?;
            // SAFETY: every element is written by the kernel below.
            let y = unsafe { dev.alloc::<T>(rows * t)? };
            let keys = self.keys.map(|k| k.storage_and_layout());
            let keys = match &keys {
                Some((guard, l)) => match &**guard {
                    Storage::Cuda(c) => Some(view::<u8>(c, l)?),
                    _ => candle_core::bail!("the padding mask is not on the GPU"),
                },
                None => None,
            };
            // A warp per row, four rows per block.
            const ROWS_PER_BLOCK: usize = 4;
            let cfg = LaunchConfig {
                grid_dim: (rows.div_ceil(ROWS_PER_BLOCK) as u32, 1, 1),
                block_dim: (32 * ROWS_PER_BLOCK as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&func);
            b.arg(&x);
            b.arg(&y);
            // A null pointer when nothing is padded.
            let null = 0u64;
            match &keys {
                Some(k) => b.arg(k),
                None => b.arg(&null),
            };
            candle_core::builder_arg!(
                b,
                rows as i64,
                t as i32,
                s as i32,
                self.heads as i32,
                self.past.unwrap_or(0) as i32,
                self.past.is_some() as i32
            );
            // SAFETY: the arguments match the kernel's signature; x and y hold rows * t values.
            unsafe { b.launch(cfg) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
        }
    }

    pub fn add_bias(y: &Tensor, bias: &Tensor) -> Result<Tensor> {
        Ok(y.contiguous()?
            .apply_op2_no_bwd(&bias.contiguous()?, &BiasAdd)?)
    }

    struct BiasAdd;

    impl CustomOp2 for BiasAdd {
        fn name(&self) -> &'static str {
            "llava-cuda-bias"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("the CUDA bias add was given CPU tensors")
        }

        fn cuda_fwd(
            &self,
            s1: &CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let n = l1.dims().last().copied().unwrap_or(1);
            if l2.dims() != [n] {
                candle_core::bail!("bias {:?} for rows of {n}", l2.dims())
            }
            if s1.dtype() != s2.dtype() {
                candle_core::bail!("bias {:?} for {:?} values", s2.dtype(), s1.dtype())
            }
            let out = match &s1.slice {
                CudaStorageSlice::F32(_) => bias_launch::<f32>(s1, l1, s2, l2)?,
                CudaStorageSlice::BF16(_) => bias_launch::<bf16>(s1, l1, s2, l2)?,
                CudaStorageSlice::F16(_) => bias_launch::<f16>(s1, l1, s2, l2)?,
                _ => candle_core::bail!("the CUDA bias add takes f32, bf16 or f16"),
            };
            Ok((out, l1.shape().clone()))
        }
    }

    fn bias_launch<T: DeviceRepr + CudaDType>(
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<CudaStorage> {
        let dev = s1.device();
        let (x, bias) = (view::<T>(s1, l1)?, view::<T>(s2, l2)?);
        let n = l2.dims()[0].max(1);
        let rows = l1.shape().elem_count() / n;
        let func = function(dev, &format!("llava_bias_{}", suffix(&s1.slice)?))?;
        // SAFETY: every element is written by the kernel below.
        let y = unsafe { dev.alloc::<T>(rows * n)? };
        const THREADS: usize = 256;
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, n.div_ceil(THREADS) as u32, 1),
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&func);
        b.arg(&x);
        b.arg(&bias);
        b.arg(&y);
        candle_core::builder_arg!(b, n as i32);
        // SAFETY: the arguments match the kernel's signature; x and y hold rows * n values.
        unsafe { b.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    }
}

/// Run in a `--features cuda` build on a machine with a GPU (`tools/cuda_check.sh`).
#[cfg(all(test, feature = "cuda"))]
mod tests {
    use super::*;

    /// The composite path this kernel replaces: widen, add the additive mask, candle's
    /// softmax, narrow.
    fn composite(scores: &Tensor, bias: Option<&Tensor>) -> Tensor {
        let x = scores.to_dtype(DType::F32).unwrap();
        let x = match bias {
            Some(b) => x.broadcast_add(b).unwrap(),
            None => x,
        };
        candle_nn::ops::softmax_last_dim(&x)
            .unwrap()
            .to_dtype(scores.dtype())
            .unwrap()
    }

    fn values(x: &Tensor) -> Vec<f32> {
        let x = x.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        x.to_vec1().unwrap()
    }

    /// Largest difference and number of differing values.
    fn compare(a: &Tensor, b: &Tensor) -> (f32, usize) {
        values(a)
            .iter()
            .zip(&values(b))
            .fold((0f32, 0), |(m, n), (x, y)| {
                ((x - y).abs().max(m), n + usize::from(x != y))
            })
    }

    #[test]
    fn matches_the_composite_softmax_with_and_without_masks() {
        let dev = Device::new_cuda(0).expect("a GPU");
        let (b, h, s, past) = (2, 3, 37, 16);
        let t = past + s;
        let scores = Tensor::randn(0f32, 3.0, (b, h, s, t), &dev).unwrap();
        // Batch 1 has its first five keys padded.
        let keep: Vec<u8> = (0..b * t).map(|i| u8::from(i < t || i % t >= 5)).collect();
        let keys = Tensor::from_vec(keep.clone(), (b, t), &dev).unwrap();
        let mut bias = vec![0f32; b * s * t];
        for bi in 0..b {
            for i in 0..s {
                for j in 0..t {
                    if j > past + i || keep[bi * t + j] == 0 {
                        bias[(bi * s + i) * t + j] = -1e30;
                    }
                }
            }
        }
        let bias = Tensor::from_vec(bias, (b, 1, s, t), &dev).unwrap();
        let mut differ = Vec::new();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let x = scores.to_dtype(dtype).unwrap();
            let mask = Mask {
                past,
                keys: Some(&keys),
            };
            let got = softmax_last_dim(&x, Some(mask)).unwrap();
            assert_eq!(got.dtype(), dtype);
            let (d, n) = compare(&got, &composite(&x, Some(&bias)));
            eprintln!(
                "{dtype:?} masked: max diff {d:e}, {n} of {} differ",
                b * h * s * t
            );
            if n > 0 {
                differ.push(format!("{dtype:?} masked: {n} differ, by up to {d:e}"));
            }
            // Unmasked (the vision tower), a row length that is not a multiple of 32.
            let got = softmax_last_dim(&x, None).unwrap();
            let (d, n) = compare(&got, &composite(&x, None));
            eprintln!("{dtype:?} unmasked: max diff {d:e}, {n} differ");
            if n > 0 {
                differ.push(format!("{dtype:?} unmasked: {n} differ, by up to {d:e}"));
            }
        }
        // The same sums in the same order: bit for bit.
        assert!(differ.is_empty(), "{differ:?}");
    }

    #[test]
    fn bias_add_matches_the_broadcast_add() {
        let dev = Device::new_cuda(0).expect("a GPU");
        // 300 columns: a partial block of threads in each row.
        let x = Tensor::randn(0f32, 2.0, (3, 7, 300), &dev).unwrap();
        let bias = Tensor::randn(0f32, 2.0, 300, &dev).unwrap();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let (x, bias) = (x.to_dtype(dtype).unwrap(), bias.to_dtype(dtype).unwrap());
            let got = add_bias(&x, &bias).unwrap();
            assert_eq!(got.dims(), x.dims());
            let (d, n) = compare(&got, &x.broadcast_add(&bias).unwrap());
            eprintln!("{dtype:?} bias: max diff {d:e}, {n} differ");
            assert_eq!(n, 0, "{dtype:?}: {n} sums differ, by up to {d:e}");
        }
    }
}
