//! Rotary position embeddings: the inverse frequency of each pair of a head's dimensions, and
//! how a `rope_scaling` stretches them past the context the decoder was trained on.
//!
//! Every formula follows transformers' `modeling_rope_utils.py` in its own order of operations
//! and precision (f32 where it computes on tensors, f64 where on Python floats), since the
//! positions multiply any rounding.

use std::f64::consts::PI;

/// The rotary embedding's base and how its frequencies are rescaled for longer contexts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub scaling: RopeScaling,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    None,
    /// Linear position interpolation: every frequency is divided by the factor.
    Linear(f64),
    /// Llama 3.1's: wavelengths longer than `original / low_freq_factor` are divided by
    /// `factor`, shorter than `original / high_freq_factor` kept, and the band between blended.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// Dynamic NTK: within `max_position_embeddings` the frequencies are the plain ones; past
    /// it, the base grows with the length of the sequence being run, so every forward pass
    /// over a longer sequence sees slightly slower frequencies.
    Dynamic {
        factor: f64,
        max_position_embeddings: usize,
    },
    /// YaRN: fast frequencies (many turns within the original context) are kept, slow ones
    /// interpolated by `factor`, the dimensions between on a linear ramp; cos and sin are then
    /// scaled by `attention_factor`, which sharpens the attention's softmax.
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        beta_fast: f64,
        beta_slow: f64,
        /// Rounds the ramp's ends to whole dimensions (transformers' default).
        truncate: bool,
        attention_factor: f64,
    },
}

impl Rope {
    /// The frequencies for sequences within the trained context: the only ones, except with
    /// [`RopeScaling::Dynamic`] (see [`Rope::inv_freq_for`]).
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f32> {
        let plain = |i: usize| plain_inv_freq(self.theta as f32, i, head_dim);
        match self.scaling {
            RopeScaling::None | RopeScaling::Dynamic { .. } => {
                (0..head_dim / 2).map(plain).collect()
            }
            RopeScaling::Linear(factor) => (0..head_dim / 2)
                .map(|i| plain(i) / factor as f32)
                .collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: original,
            } => {
                let (factor, low, high) = (factor as f32, low as f32, high as f32);
                let original = original as f32;
                (0..head_dim / 2)
                    .map(|i| {
                        let f = plain(i);
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < original / high {
                            f
                        } else if wavelen > original / low {
                            f / factor
                        } else {
                            let smooth = (original / wavelen - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original,
                beta_fast,
                beta_slow,
                truncate,
                ..
            } => {
                let (low, width) = yarn_ramp(
                    self.theta, head_dim, original, beta_fast, beta_slow, truncate,
                );
                (0..head_dim / 2)
                    .map(|i| {
                        let pos_freq = (self.theta as f32).powf((2 * i) as f32 / head_dim as f32);
                        let extrapolation = 1.0 / pos_freq;
                        let interpolation = 1.0 / (factor as f32 * pos_freq);
                        let ramp = ((i as f32 - low) / width).clamp(0.0, 1.0);
                        let keep = 1.0 - ramp;
                        interpolation * (1.0 - keep) + extrapolation * keep
                    })
                    .collect()
            }
        }
    }

    /// The frequencies for a forward pass whose furthest position is `seq_len - 1`: with
    /// dynamic NTK past the trained context, a base grown for that length, computed as
    /// transformers does on that pass; `None` where they are [`Rope::inv_freq`]'s.
    pub fn inv_freq_for(&self, head_dim: usize, seq_len: usize) -> Option<Vec<f32>> {
        let RopeScaling::Dynamic {
            factor,
            max_position_embeddings: max,
        } = self.scaling
        else {
            return None;
        };
        if seq_len <= max {
            return None;
        }
        let grow = (factor as f32 * seq_len as f32 / max as f32 - (factor - 1.0) as f32)
            .powf((head_dim as f64 / (head_dim as f64 - 2.0)) as f32);
        let base = self.theta as f32 * grow;
        Some(
            (0..head_dim / 2)
                .map(|i| plain_inv_freq(base, i, head_dim))
                .collect(),
        )
    }

    /// The longest sequence a decoder trained on `max_position_embeddings` runs with this
    /// rope: that, or with dynamic NTK that times its factor, the length the scaling is made
    /// for. (transformers itself stops nowhere.)
    pub fn context_len(&self, max_position_embeddings: usize) -> usize {
        match self.scaling {
            RopeScaling::Dynamic { factor, .. } => {
                (max_position_embeddings as f64 * factor) as usize
            }
            _ => max_position_embeddings,
        }
    }

    /// The factor on cos and sin: YaRN's attention temperature, 1 otherwise.
    pub fn attention_factor(&self) -> f64 {
        match self.scaling {
            RopeScaling::Yarn {
                attention_factor, ..
            } => attention_factor,
            _ => 1.0,
        }
    }

    /// The longest sequence whose every key a later, longer pass rotates the same way; `None`
    /// where the frequencies never depend on the length. Keys cached past it (dynamic NTK)
    /// are not those a fresh run of a longer prompt computes.
    pub fn stable_len(&self) -> Option<usize> {
        match self.scaling {
            RopeScaling::Dynamic {
                max_position_embeddings,
                ..
            } => Some(max_position_embeddings),
            _ => None,
        }
    }
}

/// The unscaled frequency of pair `i`: `1 / theta^(2i / d)`, in f32 as transformers computes it.
fn plain_inv_freq(theta: f32, i: usize, head_dim: usize) -> f32 {
    1.0 / theta.powf((2 * i) as f32 / head_dim as f32)
}

/// YaRN's ramp over the frequency pairs: `(low, high - low)`, from the pair where
/// interpolation starts to where it is complete, found from the dimensions at which a wavelength turns `beta_fast` and
/// `beta_slow` times within the original context.
fn yarn_ramp(
    theta: f64,
    head_dim: usize,
    original: usize,
    beta_fast: f64,
    beta_slow: f64,
    truncate: bool,
) -> (f32, f32) {
    let dim = head_dim as f64;
    let correction_dim =
        |turns: f64| dim * (original as f64 / (turns * 2.0 * PI)).ln() / (2.0 * theta.ln());
    let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
    if truncate {
        low = low.floor();
        high = high.ceil();
    }
    let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
    if low == high {
        // transformers' guard against a zero-width ramp.
        high += 0.001;
    }
    (low as f32, (high - low) as f32)
}

/// YaRN's default attention factor from the scale: `0.1 · mscale · ln(scale) + 1`.
pub fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yarn(factor: f64, original: usize) -> Rope {
        Rope {
            theta: 10000.0,
            scaling: RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original,
                beta_fast: 32.0,
                beta_slow: 1.0,
                truncate: true,
                attention_factor: yarn_mscale(factor, 1.0),
            },
        }
    }

    /// The fastest pairs keep their frequency, the slowest are divided by the factor.
    #[test]
    fn yarn_keeps_fast_and_interpolates_slow_frequencies() {
        let plain = Rope {
            theta: 10000.0,
            scaling: RopeScaling::None,
        }
        .inv_freq(128);
        let scaled = yarn(4.0, 4096).inv_freq(128);
        assert_eq!(scaled[0], plain[0]);
        assert!((scaled[63] - plain[63] / 4.0).abs() <= 1e-6 * plain[63]);
        assert!(scaled.iter().zip(&plain).all(|(s, p)| s <= p));
        assert!((yarn(4.0, 4096).attention_factor() - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-12);
    }

    /// Within the trained context dynamic NTK is the plain rope; past it every pair but the
    /// first slows down, more for a longer sequence.
    #[test]
    fn dynamic_frequencies_grow_with_the_sequence() {
        let rope = Rope {
            theta: 10000.0,
            scaling: RopeScaling::Dynamic {
                factor: 2.0,
                max_position_embeddings: 64,
            },
        };
        assert_eq!(rope.inv_freq_for(16, 64), None);
        let plain = rope.inv_freq(16);
        let at_100 = rope.inv_freq_for(16, 100).expect("past the context");
        let at_200 = rope.inv_freq_for(16, 200).expect("past the context");
        assert_eq!(at_100[0], 1.0);
        for i in 1..8 {
            assert!(at_200[i] < at_100[i] && at_100[i] < plain[i], "pair {i}");
        }
        assert_eq!(rope.stable_len(), Some(64));
    }
}
