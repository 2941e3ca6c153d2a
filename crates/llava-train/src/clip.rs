//! Global-norm gradient clipping as `torch.nn.utils.clip_grad_norm_` does it: one norm over all
//! gradients, and a scale of `max_norm / (norm + 1e-6)` applied only when it is below 1.

use candle_core::backprop::GradStore;
use candle_core::{Result, Var};

use crate::adamw_cpu;

/// The global L2 norm over every parameter's gradient: what training logs as `grad_norm`.
pub fn global_grad_norm(grads: &GradStore, vars: &[&Var]) -> Result<f64> {
    Ok(grad_sum_sq(grads, vars)?.sqrt())
}

/// The sum of the squares of the gradients of `vars` (those that have one): the sharded
/// optimizer adds the ranks' sums before the square root.
pub fn grad_sum_sq(grads: &GradStore, vars: &[&Var]) -> Result<f64> {
    let mut sum_sq = 0f64;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sum_sq += if adamw_cpu::applies(&[g]) {
                adamw_cpu::sum_sq(g)?
            } else {
                g.sqr()?
                    .sum_all()?
                    .to_dtype(candle_core::DType::F64)?
                    .to_scalar::<f64>()?
            };
        }
    }
    Ok(sum_sq)
}

/// What `clip_grad_norm_` multiplies every gradient by for a global `norm`: `max_norm / (norm +
/// 1e-6)` when that is below 1, else 1. A `max_norm` of 0 turns clipping off. The optimizer
/// applies it ([`crate::optim::AdamW::step`]), so the gradients are never rewritten.
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 {
        (max_norm / (norm + 1e-6)).min(1.0)
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn the_norm_is_global_and_the_coefficient_clips_only_above_it() {
        let a = Var::new(&[1f32, 2.0], &Device::Cpu).expect("var");
        let b = Var::new(&[2f32], &Device::Cpu).expect("var");
        // loss = 1·a0 + 2·a1 + 2·b0 makes the gradients (1, 2) and (2): global norm 3.
        let w = Tensor::new(&[1f32, 2.0], &Device::Cpu).expect("w");
        let loss = ((a.as_tensor() * &w).expect("mul").sum_all().expect("sum")
            + (b.as_tensor() * 2.0).expect("mul").sum_all().expect("sum"))
        .expect("add");
        let grads = loss.backward().expect("backward");
        let norm = global_grad_norm(&grads, &[&a, &b]).expect("norm");
        assert!((norm - 3.0).abs() < 1e-6, "{norm}");
        // Only the vars asked about count.
        let norm_a = global_grad_norm(&grads, &[&a]).expect("norm");
        assert!((norm_a - 5f64.sqrt()).abs() < 1e-6, "{norm_a}");
        assert!((clip_coefficient(norm, 1.5) - 1.5 / (3.0 + 1e-6)).abs() < 1e-12);
        assert_eq!(clip_coefficient(norm, 10.0), 1.0);
        assert_eq!(clip_coefficient(norm, 0.0), 1.0);
    }

    #[test]
    fn the_fast_and_the_tensor_sum_of_squares_agree() {
        let g = Tensor::randn(0f32, 1.0, (300, 70), &Device::Cpu).expect("randn");
        let fast = adamw_cpu::sum_sq(&g).expect("fast");
        let slow = g
            .sqr()
            .and_then(|x| x.sum_all())
            .and_then(|x| x.to_scalar::<f32>())
            .expect("slow") as f64;
        assert!((fast - slow).abs() / slow < 1e-5, "{fast} vs {slow}");
    }
}
