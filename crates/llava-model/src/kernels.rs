//! Every hand-written CPU and GPU kernel, with the checks that pick it. A kernel knows tensors
//! and slices only: nothing of configs, files or the model's layers.

pub mod amx;
pub mod attention;
pub mod bf16_linear;
pub mod cuda_kernels;
pub mod decode_attention;
pub mod fused;
pub mod gemm_layout;
pub mod gemv;
pub mod pool;
pub mod q8;

/// A tensor's values widened to f32, as bits: for tests that a kernel gives exactly what a
/// reference gives.
#[cfg(test)]
pub(crate) fn bits(t: &candle_core::Tensor) -> Vec<u32> {
    t.flatten_all()
        .and_then(|t| t.to_dtype(candle_core::DType::F32))
        .and_then(|t| t.to_vec1::<f32>())
        .expect("values")
        .into_iter()
        .map(f32::to_bits)
        .collect()
}
