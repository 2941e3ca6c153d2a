//! Global-norm gradient clipping as `torch.nn.utils.clip_grad_norm_` does it: one norm over all
//! gradients, and a scale of `max_norm / (norm + 1e-6)` applied only when it is below 1.

use candle_core::backprop::GradStore;
use candle_core::{Result, Var};

/// Clips in place and returns the norm before clipping (what training logs as `grad_norm`).
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[&Var], max_norm: f64) -> Result<f64> {
    let mut sum_sq = 0f64;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sum_sq += g
                .sqr()?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
        }
    }
    let norm = sum_sq.sqrt();
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for v in vars {
                if let Some(g) = grads.remove(v.as_tensor()) {
                    grads.insert(v.as_tensor(), (g * coef)?);
                }
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn clips_by_the_global_norm() {
        let a = Var::new(&[1f32, 2.0], &Device::Cpu).expect("var");
        let b = Var::new(&[2f32], &Device::Cpu).expect("var");
        // loss = 1·a0 + 2·a1 + 2·b0 makes the gradients (1, 2) and (2): global norm 3.
        let w = Tensor::new(&[1f32, 2.0], &Device::Cpu).expect("w");
        let loss = ((a.as_tensor() * &w).expect("mul").sum_all().expect("sum")
            + (b.as_tensor() * 2.0).expect("mul").sum_all().expect("sum"))
        .expect("add");
        let mut grads = loss.backward().expect("backward");
        let norm = clip_grad_norm(&mut grads, &[&a, &b], 1.5).expect("clip");
        assert!((norm - 3.0).abs() < 1e-6);
        let scale = 1.5 / (3.0 + 1e-6);
        let ga: Vec<f32> = grads
            .get(a.as_tensor())
            .expect("ga")
            .to_vec1()
            .expect("vec");
        assert!((ga[1] as f64 - 2.0 * scale).abs() < 1e-6, "{ga:?}");
        // Below the threshold nothing changes.
        let norm = clip_grad_norm(&mut grads, &[&a, &b], 10.0).expect("clip");
        assert!((norm - 1.5).abs() < 1e-5);
        let gb: Vec<f32> = grads
            .get(b.as_tensor())
            .expect("gb")
            .to_vec1()
            .expect("vec");
        assert!((gb[0] as f64 - 2.0 * scale).abs() < 1e-6);
    }
}
