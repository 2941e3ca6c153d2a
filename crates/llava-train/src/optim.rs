//! AdamW exactly as `torch.optim.AdamW` computes it: decoupled weight decay applied to the
//! parameter before the update, bias-corrected moments, and eps added outside the square root.
//! The moments are public so that a checkpoint can save and restore them for an exact resume.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

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
                let zeros = var.as_tensor().zeros_like()?;
                Ok(Param {
                    name,
                    exp_avg: zeros.clone(),
                    exp_avg_sq: zeros,
                    var,
                    lr_scale: 1.0,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            params,
            config,
            step: 0,
        })
    }

    /// One update at learning rate `lr` (the schedule's value for this step). Parameters that
    /// received no gradient are left untouched, as PyTorch skips params whose `.grad` is None.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        for p in &mut self.params {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            // A gradient can still reference the step's graph (candle computes a weight's
            // gradient from tracked activations); the moments must not keep that graph alive.
            let g = &g.detach();
            let lr = lr * p.lr_scale;
            let theta = p.var.as_tensor().detach();
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
