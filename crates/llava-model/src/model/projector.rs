//! The projector `W` that maps vision features into the word-embedding space: one linear layer
//! in LLaVA v1, Linear–GELU–Linear (`mlp2x_gelu`) in 1.5, `mlpNx_gelu` in general.

use candle_core::Tensor;

use crate::config::ProjectorConfig;
use crate::error::Result;
use crate::load::weights::WeightsView;
use crate::model::nn::{Activation, Linear};

#[derive(Debug, Clone)]
pub struct MultiModalProjector {
    /// `linear_1`, `linear_2`, … with the activation between consecutive layers.
    pub linears: Vec<Linear>,
    act: Activation,
}

impl MultiModalProjector {
    pub fn load(
        w: &WeightsView,
        c: &ProjectorConfig,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<Self> {
        let linears = (0..c.depth)
            .map(|i| {
                let input = if i == 0 { in_dim } else { out_dim };
                Linear::load_for_rows(&w.pp(format!("linear_{}", i + 1)), input, out_dim, c.bias)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            linears,
            act: Activation::from_name(&c.hidden_act)?,
        })
    }

    pub fn forward(&self, features: &Tensor) -> Result<Tensor> {
        let mut x = features.clone();
        for (i, linear) in self.linears.iter().enumerate() {
            if i > 0 {
                x = self.act.forward(&x)?;
            }
            x = linear.forward(&x)?;
        }
        Ok(x)
    }
}
