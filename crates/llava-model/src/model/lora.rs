//! A LoRA pair on a frozen projection, as peft's `lora.Linear` computes it:
//! `y = base(x) + scaling · (dropout(x) · Aᵀ) · Bᵀ`, with `A` `[r, in]` and `B` `[out, r]`.
//! The loader hands out the pair ([`crate::load::weights::LoraPair`]); the base stays frozen,
//! dense or quantized.
//!
//! Dropout draws its mask from the shared [`DropoutKey`] that the trainer sets per micro-batch,
//! mixed with the layer's own salt, so a resumed run draws the masks the uninterrupted run drew.

use candle_core::Tensor;
use rand::{Rng, SeedableRng};

use crate::error::Result;
use crate::load::lora::DropoutKey;
use crate::load::weights::LoraPair;
use crate::model::nn::Linear;

#[derive(Debug, Clone)]
pub struct Lora {
    a: Linear,
    b: Linear,
    scaling: f64,
    dropout: f64,
    dropout_key: DropoutKey,
    salt: u64,
}

impl Lora {
    pub fn new(pair: LoraPair) -> Self {
        Self {
            a: Linear {
                weight: pair.a,
                bias: None,
            },
            b: Linear {
                weight: pair.b,
                bias: None,
            },
            scaling: pair.scaling,
            dropout: pair.dropout,
            dropout_key: pair.dropout_key,
            salt: pair.salt,
        }
    }

    /// `scaling · B A dropout(x)`, the term added to the base's output. The scale is applied to
    /// the `r`-wide product, which costs less than scaling the output (peft scales the output;
    /// the two differ by rounding only).
    pub fn delta(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.dropout(x)?;
        let h = self.a.forward(&x)?.affine(self.scaling, 0.0)?;
        self.b.forward(&h)
    }

    /// Inverted dropout (`nn.Dropout` in training): each element kept with probability `1 - p`
    /// and scaled by `1 / (1 - p)`. Off without a key.
    fn dropout(&self, x: &Tensor) -> Result<Tensor> {
        let Some(key) = self.dropout_key.get().filter(|_| self.dropout > 0.0) else {
            return Ok(x.clone());
        };
        let p = self.dropout;
        let keep = (1.0 / (1.0 - p)) as f32;
        let mut rng = rand::rngs::StdRng::seed_from_u64(key ^ self.salt);
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| if rng.random::<f64>() < p { 0.0 } else { keep })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        Ok((x * mask)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn pair(dropout: f64, key: &DropoutKey) -> LoraPair {
        let cpu = Device::Cpu;
        let a = Tensor::arange(0f32, 12.0, &cpu)
            .unwrap()
            .reshape((2, 6))
            .unwrap();
        let b = Tensor::arange(0f32, 8.0, &cpu)
            .unwrap()
            .reshape((4, 2))
            .unwrap();
        LoraPair {
            a,
            b,
            scaling: 0.5,
            dropout,
            dropout_key: key.clone(),
            salt: 7,
        }
    }

    #[test]
    fn the_delta_is_peft_s_scaled_product() {
        let key = DropoutKey::default();
        let lora = Lora::new(pair(0.0, &key));
        let x = Tensor::ones((1, 3, 6), DType::F32, &Device::Cpu).unwrap();
        let got = lora.delta(&x).unwrap();
        let p = pair(0.0, &key);
        let want = (x
            .reshape((3, 6))
            .unwrap()
            .matmul(&p.a.t().unwrap())
            .unwrap()
            .matmul(&p.b.t().unwrap())
            .unwrap()
            * 0.5)
            .unwrap();
        assert_eq!(
            got.reshape((3, 4)).unwrap().to_vec2::<f32>().unwrap(),
            want.to_vec2::<f32>().unwrap()
        );
    }

    /// The frozen base gets no gradient, only the pair: backward neither computes nor keeps
    /// one (vendor/candle-core's second change), which under LoRA would be as much memory as
    /// the base.
    #[test]
    fn only_the_pair_gets_a_gradient() {
        let key = DropoutKey::default();
        let p = pair(0.0, &key);
        let (a, b) = (
            candle_core::Var::from_tensor(&p.a).unwrap(),
            candle_core::Var::from_tensor(&p.b).unwrap(),
        );
        let lora = Lora::new(LoraPair {
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            ..p
        });
        let base = Linear {
            weight: Tensor::ones((4, 6), DType::F32, &Device::Cpu).unwrap(),
            bias: None,
        };
        let x = Tensor::ones((3, 6), DType::F32, &Device::Cpu).unwrap();
        let y = (base.forward(&x).unwrap() + lora.delta(&x).unwrap()).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(a.as_tensor()).is_some() && grads.get(b.as_tensor()).is_some());
        assert!(
            grads.get(&base.weight).is_none(),
            "the frozen base got a gradient"
        );
        assert!(grads.get(&x).is_none(), "the input got a gradient");
    }

    #[test]
    fn dropout_follows_the_key_and_keeps_the_mean() {
        let key = DropoutKey::default();
        let lora = Lora::new(pair(0.25, &key));
        let x = Tensor::ones((64, 64), DType::F32, &Device::Cpu).unwrap();
        let off = lora.dropout(&x).unwrap().to_vec2::<f32>().unwrap();
        assert!(
            off.iter().flatten().all(|&v| v == 1.0),
            "no key, no dropout"
        );
        key.set(Some(3));
        let first = lora.dropout(&x).unwrap().to_vec2::<f32>().unwrap();
        let again = lora.dropout(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(first, again, "one key, one mask");
        key.set(Some(4));
        assert_ne!(first, lora.dropout(&x).unwrap().to_vec2::<f32>().unwrap());
        let values: Vec<f32> = first.into_iter().flatten().collect();
        let dropped = values.iter().filter(|&&v| v == 0.0).count() as f64 / values.len() as f64;
        assert!((dropped - 0.25).abs() < 0.03, "dropped {dropped}");
        assert!(
            values
                .iter()
                .all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6)
        );
    }
}
