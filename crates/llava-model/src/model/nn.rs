//! Building blocks shared by the vision tower, projector and language model.
//!
//! candle's fused `softmax_last_dim`, `rms_norm`, `layer_norm` and `rope` kernels are fast but
//! have no backward pass: on a trainable path they silently cut the gradient. Every block here
//! therefore takes a [`Mode`]; `Mode::Train` picks a formulation that autograd can
//! differentiate (our own fused f32 CPU kernels in [`crate::kernels::fused`], else the composite
//! formula), `Mode::Infer` candle's fused kernel.

use candle_core::{D, DType, Tensor};

use crate::error::{ModelError, Result};
use crate::kernels::bf16_linear;
use crate::kernels::cuda_kernels;
use crate::kernels::fused;
use crate::kernels::gemm_layout;
use crate::kernels::gemv;
use crate::load::weights::WeightsView;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Infer,
    Train,
}

/// `nn.Linear`: `y = x Wᵀ + b`, for inputs of any rank.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn load(w: &WeightsView, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = w.get("weight", &[out_dim, in_dim])?;
        Self::with_weight(w, weight, out_dim, bias)
    }

    /// As [`Linear::load`], for a layer that only ever multiplies many rows at once (the vision
    /// tower's patches, the projector's features): where it only serves inference, its weight
    /// is read into [`crate::kernels::gemm_layout`]. The decoder's layers keep the stored layout, which
    /// the decode GEMV streams.
    pub fn load_for_rows(
        w: &WeightsView,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = w.get_linear("weight", &[out_dim, in_dim])?;
        Self::with_weight(w, weight, out_dim, bias)
    }

    fn with_weight(w: &WeightsView, weight: Tensor, out_dim: usize, bias: bool) -> Result<Self> {
        let bias = if bias {
            Some(w.get_elementwise("bias", &[out_dim])?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // One 2-D matmul over all leading dims: faster than a broadcast batched matmul.
        let dims = x.dims();
        let in_dim = dims[dims.len() - 1];
        let lead: usize = dims[..dims.len() - 1].iter().product();
        let x = x.reshape((lead, in_dim))?;
        let y = if bf16_linear::applies(&x, &self.weight, self.bias.as_ref()) {
            bf16_linear::linear(&x, &self.weight, self.bias.as_ref())?
        } else {
            let y = if gemv::applies(&x, &self.weight) {
                gemv::matmul_t(&x, &self.weight)?
            } else if x.dtype() == DType::F32
                && !self.weight.is_variable()
                && let Some(w) = gemm_layout::widened(&self.weight)?
            {
                // bf16 weights under f32 activations without bf16 products (the decoder's, in prefill):
                // widened in parallel into `gemm_layout`. A trainable weight takes the path
                // below, which keeps its gradient.
                x.matmul(&w.t()?)?
            } else {
                // An f32 weight in `gemm_layout` makes `.t()` the contiguous `Wᵀ` gemm wants.
                x.matmul(&self.weight.to_dtype(x.dtype())?.t()?)?
            };
            match &self.bias {
                Some(b) if fused::applies(&[&y, b]) => fused::add_bias(&y, b)?,
                // The kernel has no backward: where a gradient flows, broadcast_add.
                Some(b) if cuda_kernels::applies(&[&y, b]) && !b.track_op() && !y.track_op() => {
                    cuda_kernels::add_bias(&y, b)?
                }
                // A trainable bias under mixed precision is an f32 master: cast at use.
                Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
                None => y,
            }
        };
        let mut out_dims = dims.to_vec();
        out_dims[dims.len() - 1] = self.weight.dim(0)?;
        Ok(y.reshape(out_dims)?)
    }
}

/// `LlamaRMSNorm`: normalised in f32, scaled in the input dtype, as transformers does.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn load(w: &WeightsView, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.get_elementwise("weight", &[dim])?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        match mode {
            Mode::Infer => Ok(candle_nn::ops::rms_norm(
                &x.contiguous()?,
                &self.weight,
                self.eps as f32,
            )?),
            Mode::Train if fused::applies(&[x, &self.weight]) => {
                Ok(fused::rms_norm(x, &self.weight, self.eps)?)
            }
            Mode::Train => {
                let dtype = x.dtype();
                let xf = x.to_dtype(DType::F32)?;
                let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
                let normed = xf.broadcast_div(&(var + self.eps)?.sqrt()?)?;
                // The scale cast at use: a trainable one under mixed precision is f32.
                let weight = self.weight.to_dtype(dtype)?;
                Ok(normed.to_dtype(dtype)?.broadcast_mul(&weight)?)
            }
        }
    }
}

/// `nn.LayerNorm` with affine weight and bias.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(w: &WeightsView, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.get_elementwise("weight", &[dim])?,
            bias: w.get_elementwise("bias", &[dim])?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        match mode {
            Mode::Infer => Ok(candle_nn::ops::layer_norm(
                &x.contiguous()?,
                &self.weight,
                &self.bias,
                self.eps as f32,
            )?),
            Mode::Train if fused::applies(&[x, &self.weight, &self.bias]) => {
                Ok(fused::layer_norm(x, &self.weight, &self.bias, self.eps)?)
            }
            Mode::Train => {
                let dtype = x.dtype();
                let xf = x.to_dtype(DType::F32)?;
                let mean = xf.mean_keepdim(D::Minus1)?;
                let centred = xf.broadcast_sub(&mean)?;
                let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
                let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
                Ok(normed
                    .to_dtype(dtype)?
                    .broadcast_mul(&self.weight.to_dtype(dtype)?)?
                    .broadcast_add(&self.bias.to_dtype(dtype)?)?)
            }
        }
    }
}

/// Softmax over the last dim, computed in f32 as transformers' attention does.
pub fn softmax_last_dim(x: &Tensor, mode: Mode) -> Result<Tensor> {
    if mode == Mode::Infer && cuda_kernels::applies(&[x]) {
        // f32 sums inside, in and out in x's dtype: no widened copy.
        return cuda_kernels::softmax_last_dim(x, None);
    }
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    // Ours on the CPU in both modes: its exp vectorises, where candle's calls libm per value.
    let y = match mode {
        _ if fused::applies(&[&xf]) => fused::softmax_last_dim(&xf)?,
        Mode::Infer => candle_nn::ops::softmax_last_dim(&xf.contiguous()?)?,
        Mode::Train => candle_nn::ops::softmax(&xf, D::Minus1)?,
    };
    Ok(y.to_dtype(dtype)?)
}

/// Rotary embedding, "rotate half" convention (LLaMA in HF layout). `cos`/`sin`: `[seq, dim/2]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, mode: Mode) -> Result<Tensor> {
    match mode {
        Mode::Infer => Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)?),
        Mode::Train if fused::applies(&[x, cos, sin]) => Ok(fused::rope(x, cos, sin)?),
        Mode::Train => Ok(candle_nn::rotary_emb::rope_slow(x, cos, sin)?),
    }
}

/// The activations named in configs (`hidden_act`, `projector_hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact erf GELU: transformers' `gelu`.
    Gelu,
    /// tanh approximation: `gelu_new` / `gelu_pytorch_tanh`.
    GeluTanh,
    QuickGelu,
    Silu,
    Relu,
}

impl Activation {
    pub fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Self::GeluTanh,
            "quick_gelu" => Self::QuickGelu,
            "silu" | "swish" => Self::Silu,
            "relu" => Self::Relu,
            other => {
                return Err(ModelError::Input(format!(
                    "activation `{other}` is not supported"
                )));
            }
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Gelu => x.gelu_erf()?,
            Self::GeluTanh => x.gelu()?,
            Self::QuickGelu | Self::Silu if fused::gate_applies(x) => {
                let alpha = if *self == Self::Silu { 1.0 } else { 1.702 };
                fused::sigmoid_gate(x, alpha)?
            }
            // x·σ(1.702x), written out so that it has a backward pass.
            Self::QuickGelu => (x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?,
            Self::Silu => x.silu()?,
            Self::Relu => x.relu()?,
        })
    }
}
