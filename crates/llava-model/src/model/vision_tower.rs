//! The CLIP ViT vision tower `g` (`CLIPVisionTransformer`): patch + class + position
//! embeddings, a pre-layernorm, and pre-LN encoder layers.
//!
//! Hidden states are indexed as in transformers: index 0 is the embeddings output (after
//! `pre_layrnorm`), index i the output of encoder layer i. LLaVA reads index -2, the input of
//! the last layer, so layers past the deepest requested index are never run.

use candle_core::{D, Tensor};

use crate::config::ClipVisionConfig;
use crate::error::{ModelError, Result};
use crate::kernels::attention;
use crate::load::weights::WeightsView;
use crate::model::nn::{Activation, LayerNorm, Linear, Mode, softmax_last_dim};

#[derive(Debug, Clone)]
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl ClipAttention {
    fn load(w: &WeightsView, c: &ClipVisionConfig) -> Result<Self> {
        let h = c.hidden_size;
        Ok(Self {
            q_proj: Linear::load_for_rows(&w.pp("q_proj"), h, h, true)?,
            k_proj: Linear::load_for_rows(&w.pp("k_proj"), h, h, true)?,
            v_proj: Linear::load_for_rows(&w.pp("v_proj"), h, h, true)?,
            out_proj: Linear::load_for_rows(&w.pp("out_proj"), h, h, true)?,
            num_heads: c.num_attention_heads,
            head_dim: c.head_dim(),
        })
    }

    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let (b, s, h) = x.dims3()?;
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, s, self.num_heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let scale = (self.head_dim as f64).powf(-0.5);
        let q = split((self.q_proj.forward(x)? * scale)?)?;
        let k = split(self.k_proj.forward(x)?)?;
        let v = split(self.v_proj.forward(x)?)?;
        let out = if mode == Mode::Infer && attention::applies(&q, &k, &v) {
            attention::attention(&q, &k, &v, None, false)?
        } else {
            let scores = q.matmul(&k.t()?)?;
            softmax_last_dim(&scores, mode)?.matmul(&v)?
        };
        let out = out.transpose(1, 2)?.reshape((b, s, h))?;
        self.out_proj.forward(&out)
    }
}

#[derive(Debug, Clone)]
struct ClipEncoderLayer {
    self_attn: ClipAttention,
    layer_norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
    layer_norm2: LayerNorm,
}

impl ClipEncoderLayer {
    fn load(w: &WeightsView, c: &ClipVisionConfig) -> Result<Self> {
        let eps = c.layer_norm_eps;
        Ok(Self {
            self_attn: ClipAttention::load(&w.pp("self_attn"), c)?,
            layer_norm1: LayerNorm::load(&w.pp("layer_norm1"), c.hidden_size, eps)?,
            fc1: Linear::load_for_rows(&w.pp("mlp.fc1"), c.hidden_size, c.intermediate_size, true)?,
            fc2: Linear::load_for_rows(&w.pp("mlp.fc2"), c.intermediate_size, c.hidden_size, true)?,
            act: Activation::from_name(&c.hidden_act)?,
            layer_norm2: LayerNorm::load(&w.pp("layer_norm2"), c.hidden_size, eps)?,
        })
    }

    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let h = (x + self
            .self_attn
            .forward(&self.layer_norm1.forward(x, mode)?, mode)?)?;
        let m = self.fc2.forward(
            &self
                .act
                .forward(&self.fc1.forward(&self.layer_norm2.forward(&h, mode)?)?)?,
        )?;
        Ok((h + m)?)
    }
}

#[derive(Debug, Clone)]
pub struct ClipVisionTower {
    /// Conv2d(3, hidden, patch, stride=patch, bias=False) weight, flattened to a matmul.
    /// The patch convolution as a bias-free linear layer over flattened patches.
    patch_embedding: Linear,
    class_embedding: Tensor,
    position_embedding: Tensor,
    /// The activations' dtype (the pixels are cast to it): not read from the embeddings,
    /// which a trainable tower holds as f32 masters under mixed precision.
    dtype: candle_core::DType,
    pre_layrnorm: LayerNorm,
    layers: Vec<ClipEncoderLayer>,
    config: ClipVisionConfig,
}

impl ClipVisionTower {
    /// Loads the tower; `num_layers` may be fewer than the config's when deeper layers are unused.
    pub fn load(w: &WeightsView, c: &ClipVisionConfig, num_layers: usize) -> Result<Self> {
        let (h, p, ch) = (c.hidden_size, c.patch_size, c.num_channels);
        let patch = w.get("embeddings.patch_embedding.weight", &[h, ch, p, p])?;
        let layers = (0..num_layers)
            .map(|i| ClipEncoderLayer::load(&w.pp(format!("encoder.layers.{i}")), c))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            patch_embedding: Linear {
                weight: patch.reshape((h, ch * p * p))?,
                bias: None,
            },
            class_embedding: w.get_elementwise("embeddings.class_embedding", &[h])?,
            position_embedding: w.get_elementwise(
                "embeddings.position_embedding.weight",
                &[c.num_patches() + 1, h],
            )?,
            pre_layrnorm: LayerNorm::load(&w.pp("pre_layrnorm"), h, c.layer_norm_eps)?,
            dtype: w.activation_dtype(),
            layers,
            config: c.clone(),
        })
    }

    /// `pixel_values`: `[batch, channels, image_size, image_size]`.
    fn embeddings(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let (b, ch, hh, ww) = pixel_values.dims4()?;
        if ch != c.num_channels || hh != c.image_size || ww != c.image_size {
            return Err(ModelError::Input(format!(
                "pixel_values have shape [{b}, {ch}, {hh}, {ww}], but the vision tower expects [_, {}, {}, {}]",
                c.num_channels, c.image_size, c.image_size
            )));
        }
        let (p, g) = (c.patch_size, c.image_size / c.patch_size);
        // [b, ch, g, p, g, p] -> [b, g, g, ch, p, p]: each row is one patch, flattened like the
        // conv kernel, so the convolution is a single matmul.
        let patches = pixel_values
            .to_dtype(self.dtype)?
            .reshape((b, ch, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b * g * g, ch * p * p))?;
        let patch_embeds =
            self.patch_embedding
                .forward(&patches)?
                .reshape((b, g * g, c.hidden_size))?;
        let cls = self
            .class_embedding
            .to_dtype(self.dtype)?
            .reshape((1, 1, c.hidden_size))?
            .broadcast_as((b, 1, c.hidden_size))?;
        let embeds = Tensor::cat(&[&cls, &patch_embeds], 1)?;
        if crate::kernels::fused::applies(&[&embeds, &self.position_embedding]) {
            return Ok(crate::kernels::fused::add_bias(
                &embeds,
                &self.position_embedding,
            )?);
        }
        let position = self.position_embedding.to_dtype(self.dtype)?;
        Ok(embeds.broadcast_add(&position.unsqueeze(0)?)?)
    }

    /// Runs the tower and returns the requested hidden states (transformers' indexing, negative
    /// counts from the end of the *full* tower), concatenated on the feature dim.
    pub fn hidden_states(
        &self,
        pixel_values: &Tensor,
        layers: &[i64],
        mode: Mode,
    ) -> Result<Tensor> {
        let total = self.config.num_hidden_layers as i64;
        let wanted: Vec<usize> = layers
            .iter()
            .map(|&l| {
                if l < 0 {
                    (total + 1 + l) as usize
                } else {
                    l as usize
                }
            })
            .collect();
        let deepest = wanted.iter().copied().max().unwrap_or(0);
        if deepest > self.layers.len() {
            return Err(ModelError::Input(format!(
                "hidden state {deepest} needs {deepest} vision layers, but only {} were loaded",
                self.layers.len()
            )));
        }
        let mut states = Vec::with_capacity(deepest + 1);
        let mut x = self
            .pre_layrnorm
            .forward(&self.embeddings(pixel_values)?, mode)?;
        states.push(x.clone());
        for layer in &self.layers[..deepest] {
            x = layer.forward(&x, mode)?;
            states.push(x.clone());
        }
        let picked: Vec<&Tensor> = wanted.iter().map(|&i| &states[i]).collect();
        Ok(Tensor::cat(&picked, D::Minus1)?)
    }
}

/// How many encoder layers must be run (and loaded) to serve `layers`.
pub fn layers_needed(c: &ClipVisionConfig, layers: &[i64]) -> usize {
    let total = c.num_hidden_layers as i64;
    layers
        .iter()
        .map(|&l| if l < 0 { total + 1 + l } else { l })
        .max()
        .unwrap_or(total)
        .clamp(0, total) as usize
}
