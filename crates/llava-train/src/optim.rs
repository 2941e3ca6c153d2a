//! AdamW exactly as `torch.optim.AdamW` computes it: decoupled weight decay applied to the
//! parameter before the update, bias-corrected moments, and eps added outside the square root.
//! The moments are public so that a checkpoint can save and restore them for an exact resume.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

use crate::adamw_cpu;
use crate::clip::{clip_coefficient, global_grad_norm};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// PyTorch's defaults, with LLaVA's weight decay of 0.
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// One trainable parameter with its first and second moments.
pub struct Param {
    pub name: String,
    pub var: Var,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    /// Parameter groups: the projector may train at its own learning rate (`--projector-lr`).
    pub lr_scale: f64,
    /// False under `--zero 1` for a tensor whose moments another rank keeps ([`crate::zero`]):
    /// its moments here are empty, and this rank never updates it itself.
    pub owned: bool,
}

pub struct AdamW {
    pub params: Vec<Param>,
    pub config: AdamWConfig,
    /// Optimizer steps taken (PyTorch's per-parameter `step`, shared here).
    pub step: u64,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                // Two allocations, not one shared: the CPU path updates them in place.
                Ok(Param {
                    name,
                    exp_avg: var.as_tensor().zeros_like()?,
                    exp_avg_sq: var.as_tensor().zeros_like()?,
                    var,
                    lr_scale: 1.0,
                    owned: true,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            params,
            config,
            step: 0,
        })
    }

    /// Clips to `max_norm` (0 = off) by the global norm as `clip_grad_norm_` does, then takes
    /// one step; returns the norm before clipping, which training logs as `grad_norm`.
    pub fn clip_and_step(&mut self, grads: &GradStore, lr: f64, max_norm: f64) -> Result<f64> {
        let vars: Vec<&Var> = self.params.iter().map(|p| &p.var).collect();
        let norm = global_grad_norm(grads, &vars)?;
        self.step(grads, lr, clip_coefficient(norm, max_norm))?;
        Ok(norm)
    }

    /// One update at learning rate `lr` (the schedule's value for this step), with every
    /// gradient first multiplied by `grad_scale` (the clip coefficient; 1 when not clipping).
    /// Parameters that received no gradient are left untouched, as PyTorch skips params whose
    /// `.grad` is None.
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        for p in &mut self.params {
            let Some(g) = grads.get(p.var.as_tensor()).filter(|_| p.owned) else {
                continue;
            };
            let lr = lr * p.lr_scale;
            let param = p.var.as_tensor();
            if adamw_cpu::applies(&[param, &p.exp_avg, &p.exp_avg_sq, g]) {
                let s = adamw_cpu::Step {
                    beta1: c.beta1,
                    beta2: c.beta2,
                    eps: c.eps,
                    decay: 1.0 - lr * c.weight_decay,
                    step_size: lr / bias1,
                    bias2_sqrt,
                    grad_scale,
                };
                adamw_cpu::update(param, &p.exp_avg, &p.exp_avg_sq, g, &s)?;
                continue;
            }
            // Other devices and dtypes: the same update as tensor ops. A gradient can still
            // reference the step's graph (candle computes a weight's gradient from tracked
            // activations); the moments must not keep that graph alive.
            let g = &(g.detach() * grad_scale)?;
            let theta = param.detach();
            let theta = if c.weight_decay != 0.0 {
                (theta * (1.0 - lr * c.weight_decay))?
            } else {
                theta
            };
            p.exp_avg = ((&p.exp_avg * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            p.exp_avg_sq = ((&p.exp_avg_sq * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((p.exp_avg_sq.sqrt()? / bias2_sqrt)? + c.eps)?;
            let update = ((&p.exp_avg / &denom)? * (lr / bias1))?;
            p.var.set(&(theta - update)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Three steps with weight decay and a clip coefficient: the in-place f32 kernels against
    /// the tensor-op formulas, which f64 tensors take.
    #[test]
    fn the_cpu_kernels_match_the_tensor_formulas() {
        let cpu = Device::Cpu;
        let init = Tensor::randn(0f32, 1.0, (37, 53), &cpu).expect("init");
        let config = AdamWConfig {
            lr: 1e-2,
            weight_decay: 0.1,
            ..Default::default()
        };
        let make = |dtype: DType| -> AdamW {
            let var = Var::from_tensor(&init.to_dtype(dtype).expect("dtype")).expect("var");
            AdamW::new(vec![("w".into(), var)], config).expect("optimizer")
        };
        let (mut fast, mut slow) = (make(DType::F32), make(DType::F64));
        for step in 0..3 {
            let g = Tensor::randn(0f32, 1.0, (37, 53), &cpu).expect("grad");
            for (opt, dtype) in [(&mut fast, DType::F32), (&mut slow, DType::F64)] {
                let w = opt.params[0].var.as_tensor().clone();
                let mut grads = GradStore::default();
                grads.insert(&w, g.to_dtype(dtype).expect("dtype"));
                opt.step(&grads, config.lr, 0.5).expect("step");
            }
            let a: Vec<f32> = fast.params[0].var.flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f64> = slow.params[0].var.flatten_all().unwrap().to_vec1().unwrap();
            let moved = a
                .iter()
                .zip(init.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                .any(|(x, y)| (x - y).abs() > 1e-3);
            assert!(moved, "step {step} left the weights where they were");
            for (x, y) in a.iter().zip(&b) {
                assert!((*x as f64 - y).abs() < 1e-5, "step {step}: {x} vs {y}");
            }
        }
    }
}
