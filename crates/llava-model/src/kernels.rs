//! Every hand-written CPU and GPU kernel, with the checks that pick it. A kernel knows tensors
//! and slices only: nothing of configs, files or the model's layers.

pub mod amx;
pub mod attention;
pub mod bf16_linear;
pub mod cuda_kernels;
pub mod fused;
pub mod gemm_layout;
pub mod gemv;
pub mod q8;
