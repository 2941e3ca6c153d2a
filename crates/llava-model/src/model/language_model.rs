//! The LLaMA/Vicuna decoder `f_φ`: RMSNorm, rotary position embeddings, grouped-query
//! attention, SwiGLU MLP, and a KV cache for decoding.

use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};

use crate::config::LlamaConfig;
use crate::config::rope::Rope;
use crate::error::{ModelError, Result};
use crate::kernels::attention;
use crate::kernels::cuda_kernels;
use crate::kernels::decode_attention;
use crate::kernels::q8::{self, Q8Weight};
use crate::load::weights::WeightsView;
pub use crate::model::kv_cache::KvCache;
use crate::model::kv_cache::LayerKv;
use crate::model::nn::{Activation, Linear, Mode, RmsNorm, rope, softmax_last_dim};
use crate::model::quantized::{Base, Projection, QLinear, Quantize};
use crate::model::recompute::{self, GradientCheckpointing};

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Projection,
    k_proj: Projection,
    v_proj: Projection,
    o_proj: Projection,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(w: &WeightsView, c: &LlamaConfig) -> Result<Self> {
        let (h, d) = (c.hidden_size, c.head_dim());
        let (nh, nkv) = (c.num_attention_heads, c.num_kv_heads());
        let bias = c.attention_bias;
        Ok(Self {
            q_proj: Projection::load(&w.pp("q_proj"), h, nh * d, bias)?,
            k_proj: Projection::load(&w.pp("k_proj"), h, nkv * d, bias)?,
            v_proj: Projection::load(&w.pp("v_proj"), h, nkv * d, bias)?,
            o_proj: Projection::load(&w.pp("o_proj"), nh * d, h, bias)?,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: d,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        bias: &AttentionBias,
        cache: &mut Option<LayerKv>,
        mode: Mode,
    ) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = self
            .q_proj
            .forward(x)?
            .reshape((b, s, nh, d))?
            .transpose(1, 2)?;
        let k = self
            .k_proj
            .forward(x)?
            .reshape((b, s, nkv, d))?
            .transpose(1, 2)?;
        let v = self
            .v_proj
            .forward(x)?
            .reshape((b, s, nkv, d))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = rope(&q, cos, sin, mode)?;
        let k = rope(&k, cos, sin, mode)?;
        let (k, v) = match cache {
            Some(layer) => layer.append(&k, &v, mode == Mode::Infer)?,
            None => {
                *cache = Some(LayerKv::new(k.clone(), v.clone())?);
                (k, v)
            }
        };
        let t = k.dim(2)?;
        let q = (q.contiguous()? * (d as f64).powf(-0.5))?;
        if mode == Mode::Infer && decode_attention::applies(&q, &k, &v) {
            let threads = if self.q_proj.on_candle_pool() {
                decode_attention::Threads::Candle
            } else {
                decode_attention::Threads::Rayon
            };
            let out = decode_attention::attention(&q, &k, &v, bias.full.as_ref(), threads)?;
            return self.o_proj.forward(&out.reshape((b, s, nh * d))?);
        }
        if mode == Mode::Infer && attention::applies(&q, &k, &v) {
            // The kernel applies the causal mask itself; the bias only for padding or a window.
            let extra = bias.full.as_ref().filter(|_| bias.beyond_causal);
            let out = attention::attention(&q, &k, &v, extra, true)?;
            return self
                .o_proj
                .forward(&out.transpose(1, 2)?.reshape((b, s, nh * d))?);
        }
        // Grouped-query attention without copying K/V: the n_rep query heads that share a KV
        // head are stacked along the sequence axis (head h reads KV head h / n_rep, as HF's
        // repeat_kv does).
        let n_rep = nh / nkv;
        let q = q.reshape((b, nkv, n_rep * s, d))?;
        let scores = q.matmul(&k.t()?)?.reshape((b, nh, s, t))?;
        let probs = if bias.by_position {
            let mask = cuda_kernels::Mask {
                past: t - s,
                keys: bias.keys.as_ref(),
            };
            cuda_kernels::softmax_last_dim(&scores, Some(mask))?
        } else {
            let scores = match &bias.full {
                Some(m) => scores.to_dtype(DType::F32)?.broadcast_add(m)?,
                None => scores,
            };
            softmax_last_dim(&scores, mode)?.to_dtype(v.dtype())?
        };
        let out = probs
            .reshape((b, nkv, n_rep * s, t))?
            .matmul(&v)?
            .reshape((b, nh, s, d))?;
        let out = out.transpose(1, 2)?.reshape((b, s, nh * d))?;
        self.o_proj.forward(&out)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Projection,
    up_proj: Projection,
    down_proj: Projection,
}

impl Mlp {
    fn load(w: &WeightsView, c: &LlamaConfig) -> Result<Self> {
        let (h, i, bias) = (c.hidden_size, c.intermediate_size, c.mlp_bias);
        Ok(Self {
            gate_proj: Projection::load(&w.pp("gate_proj"), h, i, bias)?,
            up_proj: Projection::load(&w.pp("up_proj"), h, i, bias)?,
            down_proj: Projection::load(&w.pp("down_proj"), i, h, bias)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = Activation::Silu.forward(&self.gate_proj.forward(x)?)?;
        self.down_proj.forward(&(gate * self.up_proj.forward(x)?)?)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn forward(
        &self,
        x: &Tensor,
        rotary: (&Tensor, &Tensor),
        bias: &AttentionBias,
        kv: &mut Option<LayerKv>,
        mode: Mode,
    ) -> Result<Tensor> {
        let h = self.input_layernorm.forward(x, mode)?;
        let h = self.self_attn.forward(&h, rotary, bias, kv, mode)?;
        let x1 = (x + h)?;
        let h = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x1, mode)?)?;
        Ok((x1 + h)?)
    }

    fn load(w: &WeightsView, c: &LlamaConfig) -> Result<Self> {
        Ok(Self {
            self_attn: Attention::load(&w.pp("self_attn"), c)?,
            mlp: Mlp::load(&w.pp("mlp"), c)?,
            input_layernorm: RmsNorm::load(
                &w.pp("input_layernorm"),
                c.hidden_size,
                c.rms_norm_eps,
            )?,
            post_attention_layernorm: RmsNorm::load(
                &w.pp("post_attention_layernorm"),
                c.hidden_size,
                c.rms_norm_eps,
            )?,
        })
    }
}

/// One decoder layer with what its training forward reads, for gradient checkpointing.
struct LayerStep {
    layer: DecoderLayer,
    rotary: (Tensor, Tensor),
    bias: Arc<AttentionBias>,
}

impl recompute::Layer for LayerStep {
    fn forward_train(&self, x: &Tensor) -> Result<Tensor> {
        let (cos, sin) = &self.rotary;
        self.layer
            .forward(x, (cos, sin), &self.bias, &mut None, Mode::Train)
    }
}

/// The word embeddings: the checkpoint's matrix, or its rows in 8-bit blocks for inference
/// with `--load-8bit`/`--load-4bit` (a lookup reads one row, so only memory changes).
#[derive(Debug, Clone)]
pub enum Embeddings {
    Dense(Tensor),
    Q8 {
        rows: Arc<Q8Weight>,
        dtype: DType,
        device: Device,
    },
}

impl Embeddings {
    /// The checkpoint's matrix, or its rows in 8-bit blocks when the vocabulary is quantized
    /// and the width fits the blocks. Taking `dense` by value frees it here once quantized.
    fn new(dense: Tensor, quantize_vocab: Option<Quantize>) -> Result<Self> {
        let hidden = dense.dim(1)?;
        Ok(match quantize_vocab {
            Some(_) if hidden.is_multiple_of(q8::BLOCK) => Embeddings::Q8 {
                rows: Arc::new(Q8Weight::quantize_tensor(&dense)?),
                dtype: dense.dtype(),
                device: dense.device().clone(),
            },
            _ => Embeddings::Dense(dense),
        })
    }

    /// Rows `ids` (each below the vocabulary size), `[ids.len(), hidden]`.
    fn lookup(&self, ids: Vec<u32>) -> Result<Tensor> {
        Ok(match self {
            Embeddings::Dense(t) => {
                let n = ids.len();
                t.index_select(&Tensor::from_vec(ids, n, t.device())?, 0)?
            }
            Embeddings::Q8 {
                rows,
                dtype,
                device,
            } => {
                Tensor::from_vec(rows.rows(&ids), (ids.len(), rows.k), device)?.to_dtype(*dtype)?
            }
        })
    }

    fn device(&self) -> &Device {
        match self {
            Embeddings::Dense(t) => t.device(),
            Embeddings::Q8 { device, .. } => device,
        }
    }
}

#[derive(Debug, Clone)]
pub struct LlamaModel {
    pub embed_tokens: Embeddings,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// Dense, or quantized for inference with `--load-8bit`/`--load-4bit`.
    pub lm_head: Projection,
    /// The rotary embedding's inverse frequencies `[1, head_dim / 2]` (f32) within the trained
    /// context, made once and not at every decoded token.
    inv_freq: Tensor,
    rope: Rope,
    pub config: LlamaConfig,
    /// The activations' dtype, which the embeddings are cast to (the embedding matrix may be
    /// an f32 master under mixed precision).
    dtype: DType,
    /// Set for training with gradient checkpointing ([`Self::enable_gradient_checkpointing`]).
    gradient_checkpointing: Option<GradientCheckpointing>,
}

impl LlamaModel {
    /// `w` is the decoder (`language_model`); `lm_head` sits beside it in every layout.
    pub fn load(w: &WeightsView, lm_head: &WeightsView, c: &LlamaConfig) -> Result<Self> {
        // The request order (embeddings, layers, `lm_head`) is also the order in which a random
        // init draws its values (`Weights::random`), so it stays as it was.
        let dense_embed = w.get("embed_tokens.weight", &[c.vocab_size, c.hidden_size])?;
        let quantize_vocab = lm_head.quantize_vocab();
        let tied_head = (c.tie_word_embeddings && !lm_head.contains("weight")).then(|| Linear {
            weight: dense_embed.clone(),
            bias: None,
        });
        let device = dense_embed.device().clone();
        // Quantized as soon as they are read, so that their dense copy (263 MB in f32 at
        // tiny-1b's 32k × 2048) is gone before the layers load; a tied `lm_head` still holds it.
        let embed_tokens = Embeddings::new(dense_embed, quantize_vocab)?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| DecoderLayer::load(&w.pp(format!("layers.{i}")), c))
            .collect::<Result<Vec<_>>>()?;
        let lm_head = match tied_head {
            Some(tied) => tied,
            None => Linear::load(lm_head, c.hidden_size, c.vocab_size, false)?,
        };
        let lm_head = match quantize_vocab {
            Some(q) => Projection {
                base: Base::Quantized(QLinear::lm_head(&lm_head.weight, q)?),
                lora: None,
            },
            None => Projection::dense(lm_head),
        };
        let half = c.head_dim() / 2;
        let rope = c.rope().map_err(ModelError::Input)?;
        let inv_freq = Tensor::from_vec(rope.inv_freq(c.head_dim()), (1, half), &device)?;
        cuda_kernels::prepare(&device)?;
        Ok(Self {
            embed_tokens,
            layers,
            norm: RmsNorm::load(&w.pp("norm"), c.hidden_size, c.rms_norm_eps)?,
            lm_head,
            inv_freq,
            rope,
            config: c.clone(),
            dtype: w.activation_dtype(),
            gradient_checkpointing: None,
        })
    }

    /// From now on a `Mode::Train` forward keeps only each layer's input and recomputes the
    /// layer in backward. The layers' weight gradients then arrive through
    /// [`Self::add_recomputed_grads`], not in what `backward()` returns.
    pub fn enable_gradient_checkpointing(&mut self) -> Result<()> {
        if self.gradient_checkpointing.is_none() {
            self.gradient_checkpointing = Some(GradientCheckpointing::new(self.device())?);
        }
        Ok(())
    }

    pub fn gradient_checkpointing(&self) -> bool {
        self.gradient_checkpointing.is_some()
    }

    /// Adds the weight gradients that the layers' recomputations found during the last
    /// `backward()` to its `grads`; nothing without gradient checkpointing.
    pub fn add_recomputed_grads(&self, grads: &mut GradStore) -> Result<()> {
        match &self.gradient_checkpointing {
            Some(checkpointing) => checkpointing.add_grads_to(grads),
            None => Ok(()),
        }
    }

    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// The longest sequence this decoder runs, from the rope made at load: the decoder asks
    /// at every decoded token, so the config's rope is not parsed again.
    pub fn context_len(&self) -> usize {
        self.rope.context_len(self.config.max_position_embeddings)
    }

    /// Word embeddings for `ids` (`[batch, seq]`); ids outside the vocabulary (image
    /// placeholders) embed as token 0, since the caller overwrites those positions.
    pub fn embed(&self, ids: &[Vec<u32>]) -> Result<Tensor> {
        let b = ids.len();
        let s = ids.first().map(Vec::len).unwrap_or(0);
        let vocab = self.config.vocab_size as u32;
        let flat: Vec<u32> = ids
            .iter()
            .flatten()
            .map(|&i| if i < vocab { i } else { 0 })
            .collect();
        Ok(self
            .embed_tokens
            .lookup(flat)?
            .to_dtype(self.dtype)?
            .reshape((b, s, self.config.hidden_size))?)
    }

    /// cos/sin for slots `past..past+len`, computed in f32 as transformers does: `[len, d/2]`
    /// at positions equal to the slots, or `[batch, len, d/2]` for a left-padded batch (padding
    /// slots take position 0, as in transformers). With dynamic NTK rope the frequencies
    /// depend on this pass's furthest position, as transformers recomputes them per pass.
    fn rotary(
        &self,
        past: usize,
        len: usize,
        left_pad: &[usize],
        dtype: DType,
    ) -> Result<(Tensor, Tensor)> {
        let slots = past..past + len;
        let (pos, shape): (Vec<f32>, Vec<usize>) = if left_pad.is_empty() {
            (slots.map(|p| p as f32).collect(), vec![len, 1])
        } else {
            let pos = left_pad
                .iter()
                .flat_map(|&pad| slots.clone().map(move |j| j.saturating_sub(pad) as f32))
                .collect();
            (pos, vec![left_pad.len(), len, 1])
        };
        let seq_len = past + len - left_pad.iter().copied().min().unwrap_or(0);
        let head_dim = self.config.head_dim();
        let inv_freq = match self.rope.inv_freq_for(head_dim, seq_len) {
            Some(f) => Tensor::from_vec(f, (1, head_dim / 2), self.device())?,
            None => self.inv_freq.clone(),
        };
        let pos = Tensor::from_vec(pos, shape, self.device())?;
        let freqs = pos.broadcast_mul(&inv_freq)?;
        let (cos, sin) = (freqs.cos()?, freqs.sin()?);
        let a = self.rope.attention_factor();
        let (cos, sin) = if a == 1.0 {
            (cos, sin)
        } else {
            (cos.affine(a, 0.0)?, sin.affine(a, 0.0)?)
        };
        Ok((cos.to_dtype(dtype)?, sin.to_dtype(dtype)?))
    }

    /// Runs the decoder over `embeds` (`[batch, seq, hidden]`) after the cached positions.
    ///
    /// `attention_mask` (`[batch, seq]`, 1 = token, 0 = padding) covers the new positions; the
    /// cache remembers earlier ones. Returns the final-normed hidden states.
    pub fn forward(
        &self,
        embeds: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
        mode: Mode,
    ) -> Result<Tensor> {
        let (b, s, _) = embeds.dims3()?;
        let past = cache.seq_len();
        if past + s > self.context_len() {
            return Err(ModelError::Input(format!(
                "the sequence ({} tokens) is longer than the model's context, {}",
                past + s,
                self.config.context_text()
            )));
        }
        if !cache.left_pad.is_empty() && (cache.left_pad.len() != b || mode == Mode::Train) {
            return Err(ModelError::Input(format!(
                "a left-padded cache of {} rows takes inference batches of that size, not {b} rows in {mode:?} mode",
                cache.left_pad.len()
            )));
        }
        if cache.layers.len() != self.layers.len() {
            cache.layers = vec![None; self.layers.len()];
        }
        let full_mask = match (attention_mask, cache.mask.take()) {
            (Some(m), Some(prev)) => Some(Tensor::cat(&[&prev, &m.to_dtype(DType::U8)?], 1)?),
            (Some(m), None) => Some(m.to_dtype(DType::U8)?),
            (None, Some(prev)) => Some(Tensor::cat(
                &[&prev, &Tensor::ones((b, s), DType::U8, self.device())?],
                1,
            )?),
            (None, None) => None,
        };
        // The CUDA softmax masks from positions and needs no bias tensor. The scores have the
        // activations' device and dtype, so this is the test the softmax itself would make.
        let by_position = mode == Mode::Infer && cuda_kernels::applies(&[embeds]);
        let bias = attention_bias(
            (b, s, past),
            full_mask.as_ref(),
            self.config.attention_window(),
            by_position,
            self.device(),
        )?;
        cache.mask = full_mask;
        let (cos, sin) = self.rotary(past, s, &cache.left_pad, embeds.dtype())?;
        let mut x = embeds.clone();
        match &self.gradient_checkpointing {
            Some(checkpointing) if mode == Mode::Train => {
                let bias = Arc::new(bias);
                for layer in &self.layers {
                    let step = LayerStep {
                        layer: layer.clone(),
                        rotary: (cos.clone(), sin.clone()),
                        bias: bias.clone(),
                    };
                    x = checkpointing.run(Arc::new(step), &x)?;
                }
            }
            _ => {
                for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
                    x = layer.forward(&x, (&cos, &sin), &bias, kv, mode)?;
                }
            }
        }
        self.norm.forward(&x, mode)
    }

    /// The dtype the decoder's activations flow in.
    pub fn activation_dtype(&self) -> DType {
        self.dtype
    }

    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)
    }
}

/// What the decoder's attention must mask.
struct AttentionBias {
    /// The additive bias `[batch, 1, seq, past+seq]` in f32: 0 where a query may look, a large
    /// negative number where the key is in its future, is padding, or has left the window.
    /// `None` when nothing is masked (a single new token without padding or window), and
    /// when the GPU softmax masks from positions (`by_position`).
    full: Option<Tensor>,
    /// The key mask `[batch, past+seq]` (u8, 0 = padding) when some key is padding.
    keys: Option<Tensor>,
    /// `full` masks more than the causal triangle: padding, or keys before a query's window.
    beyond_causal: bool,
    /// The CUDA softmax ([`cuda_kernels::softmax_last_dim`]) masks: `full` is never built.
    by_position: bool,
}

/// `window`: the decoder's sliding window (Mistral), where query `p` sees keys `p - window + 1
/// ..= p`. Only a sequence longer than the window is cut by it.
fn attention_bias(
    (b, s, past): (usize, usize, usize),
    mask: Option<&Tensor>,
    window: Option<usize>,
    by_position: bool,
    dev: &Device,
) -> Result<AttentionBias> {
    // Finite, so that a row that masks everything (a padding query) stays NaN-free.
    const NEG: f32 = -1e30;
    let t = past + s;
    let pad: Option<Vec<Vec<u8>>> = match mask {
        Some(m) => Some(m.to_vec2::<u8>()?),
        None => None,
    };
    let has_padding = pad
        .as_ref()
        .is_some_and(|p| p.iter().flatten().any(|&v| v == 0));
    let keys = mask.filter(|_| has_padding).cloned();
    let window = window.filter(|&w| t > w);
    // The CUDA softmax knows no window; a windowed sequence takes the bias instead.
    let by_position = by_position && window.is_none();
    let beyond_causal = has_padding || window.is_some();
    if by_position || (s == 1 && !beyond_causal) {
        return Ok(AttentionBias {
            full: None,
            keys,
            beyond_causal,
            by_position,
        });
    }
    let mut data = vec![0f32; b * s * t];
    for bi in 0..b {
        for i in 0..s {
            for j in 0..t {
                let future = j > past + i;
                let padded = pad.as_ref().is_some_and(|p| p[bi][j] == 0);
                let left_window = window.is_some_and(|w| j + w <= past + i);
                if future || padded || left_window {
                    data[(bi * s + i) * t + j] = NEG;
                }
            }
        }
    }
    Ok(AttentionBias {
        full: Some(Tensor::from_vec(data, (b, 1, s, t), dev)?),
        keys,
        beyond_causal,
        by_position,
    })
}
