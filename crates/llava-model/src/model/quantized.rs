//! 8- and 4-bit decoder weights: the original LLaVA's `--load-8bit` and `--load-4bit`.
//!
//! The original quantizes the language model's linear layers with bitsandbytes (int8 and NF4),
//! which runs on NVIDIA GPUs only. Here the same layers are stored in blocks of 8- or 4-bit
//! values with per-block scales, which a decoded token reads 3.6 to 7 times fewer bytes of than
//! f32: decoding is bound by reading the weights, so it speeds up (1.8–1.9× on the dev box,
//! BENCHMARKS.md), and a 7B decoder fits in about 4–7 GB.
//! - 8-bit: blocks of 32 int8 weights with one f32 scale ([`crate::kernels::q8`]; ggml's `Q8_0` with a
//!   wider scale), multiplied by our own integer products with the activations rounded to
//!   8 bits in blocks, as llama.cpp's.
//! - 4-bit: `Q4_K`, super-blocks of 256 with 6-bit scales and minimums; a layer whose input
//!   width is not a multiple of 256 (only toy shapes) takes `Q4_0`, blocks of 32.
//!
//! The decoder's projections are quantized, as in the original, and for inference `lm_head`
//! too, as llama.cpp does (`Q8_0` for 8 bits, `Q6_K` for 4): it is the widest matrix a
//! decoded token reads; the embedding rows are held in 8 bits
//! ([`crate::model::language_model::Embeddings`]). The projector keeps the checkpoint's
//! precision, and the vision tower runs in bf16 unless asked otherwise (`Llava::from_checkpoint`).
//! For inference, a `Q4_K` layer holds only the repacked copy candle's products read
//! ([`QLinear::for_inference`]). QLoRA training (`llava train --bits`) keeps `lm_head` and the
//! embeddings dense, as bitsandbytes does. The numbers are not
//! bitsandbytes' (the formats differ), so a quantized model is not token-exact with any
//! reference; `tests/quantized.rs` measures how far it is from f32.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Module, Shape, Tensor};

use crate::error::{ModelError, Result};
use crate::kernels::q8::Q8Weight;
pub use crate::load::precision::Quantize;
use crate::load::weights::WeightsView;
use crate::model::lora::Lora;
use crate::model::nn::Linear;

/// The block format for a layer whose rows are `in_dim` long, or `None` when no block fits.
fn block_format(quantize: Quantize, in_dim: usize) -> Option<GgmlDType> {
    let format = match quantize {
        Quantize::Bits8 => GgmlDType::Q8_0,
        Quantize::Bits4 if in_dim.is_multiple_of(GgmlDType::Q4K.block_size()) => GgmlDType::Q4K,
        Quantize::Bits4 => GgmlDType::Q4_0,
    };
    in_dim.is_multiple_of(format.block_size()).then_some(format)
}

/// `nn.Linear` with its weight in a block format.
#[derive(Debug, Clone)]
pub struct QLinear {
    /// Shared, so that a clone (the training graph keeps one per product) copies no weights.
    weight: Arc<Blocks>,
    bias: Option<Tensor>,
    out_dim: usize,
}

#[derive(Debug, Clone)]
enum Blocks {
    /// 8 bits: our integer products ([`crate::kernels::q8`]), for decoding and prefill.
    Q8(Q8Weight),
    /// 4 bits: candle's kernels, whose blocked `Q4_K` product is as fast as the f32 GEMM in
    /// prefill (BENCHMARKS.md).
    Candle(QMatMul),
}

impl QLinear {
    /// Quantizes `weight` (`[out, in]`, any float dtype, on the CPU).
    pub fn new(weight: &Tensor, bias: Option<Tensor>, quantize: Quantize) -> Result<Self> {
        Self::quantize(weight, bias, quantize, false)
    }

    /// [`Self::new`] for a model that only runs inference: where candle's products read a
    /// repacked copy of the blocks for every row count (`Q4_K` on x86 with AVX2 or better), the
    /// copy is made now and the blocks are freed, so the weight is held once (0.59 bytes a
    /// weight instead of 1.15). Nothing can dequantize such a layer afterwards, which only
    /// training's input gradient does.
    pub fn for_inference(
        weight: &Tensor,
        bias: Option<Tensor>,
        quantize: Quantize,
    ) -> Result<Self> {
        Self::quantize(weight, bias, quantize, true)
    }

    fn quantize(
        weight: &Tensor,
        bias: Option<Tensor>,
        quantize: Quantize,
        free_blocks: bool,
    ) -> Result<Self> {
        let (out_dim, in_dim) = weight.dims2()?;
        let format = block_format(quantize, in_dim).ok_or_else(|| {
            ModelError::Input(format!(
                "a linear layer of input width {in_dim} cannot be quantized: the width must be a multiple of 32"
            ))
        })?;
        let weight = weight.to_dtype(DType::F32)?;
        let weight = match format {
            GgmlDType::Q8_0 => Blocks::Q8(Q8Weight::quantize_tensor(&weight)?),
            _ => {
                let mut blocks = QMatMul::from_qtensor(QTensor::quantize(&weight, format)?)?;
                if let (true, QMatMul::QTensor(q)) = (free_blocks, &mut blocks)
                    && let Some(q) = Arc::get_mut(q)
                {
                    q.repack_and_free_blocks()?;
                }
                Blocks::Candle(blocks)
            }
        };
        Ok(Self {
            weight: Arc::new(weight),
            bias,
            out_dim,
        })
    }

    /// `lm_head` in `quantize`'s precision, as llama.cpp's mixes hold `output.weight`: `Q8_0`
    /// for 8 bits, and `Q6_K` for 4 bits (its `Q4_K_M`), since the logits' error matters more
    /// than one projection's. `Q4_0`/`Q8_0` where a width does not fit the 256-wide blocks.
    pub fn lm_head(weight: &Tensor, quantize: Quantize) -> Result<Self> {
        let (out_dim, in_dim) = weight.dims2()?;
        if quantize == Quantize::Bits4 && in_dim.is_multiple_of(GgmlDType::Q6K.block_size()) {
            let weight = weight.to_dtype(DType::F32)?;
            let blocks = QMatMul::from_qtensor(QTensor::quantize(&weight, GgmlDType::Q6K)?)?;
            return Ok(Self {
                weight: Arc::new(Blocks::Candle(blocks)),
                bias: None,
                out_dim,
            });
        }
        Self::new(weight, None, quantize)
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// The product. Where `x` carries a graph (QLoRA training: a LoRA pair or the projector
    /// below this layer trains), the product is taken without one and an op carries the
    /// gradient with respect to `x` back: the incoming gradient times the dequantized weight.
    /// The quantized weight itself is frozen and gets none.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !x.track_op() {
            return self.product(x);
        }
        let y = self.product(&x.detach())?.contiguous()?;
        let op = InputGradient {
            layer: self.clone(),
        };
        Ok(x.apply_op2_arc(&y, Arc::new(Box::new(op)))?)
    }

    /// The weight `[out, in]` in f32, as the blocks hold it.
    pub fn dequantized(&self, device: &Device) -> Result<Tensor> {
        Ok(match self.weight.as_ref() {
            Blocks::Q8(q) => Tensor::from_vec(q.dequantize(), (q.n, q.k), device)?,
            Blocks::Candle(QMatMul::QTensor(q)) => q.dequantize(device)?,
            Blocks::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                t.to_dtype(DType::F32)?.to_device(device)?
            }
        })
    }

    fn product(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let in_dim = dims[dims.len() - 1];
        let lead: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((lead, in_dim))?.to_dtype(DType::F32)?;
        let y = match self.weight.as_ref() {
            Blocks::Q8(q) => add_bias(q.matmul_t_tensor(&x2)?, &self.bias)?,
            // The kernels take f32 rows (quantized on the fly for the integer dot products).
            Blocks::Candle(w) => add_bias(w.forward(&x2)?, &self.bias)?,
        };
        let mut out_dims = dims.to_vec();
        out_dims[dims.len() - 1] = self.out_dim;
        Ok(y.to_dtype(x.dtype())?.reshape(out_dims)?)
    }
}

/// The op of [`QLinear::forward`] in training: arguments (input, the product computed without a
/// graph); the output is the product, and the input's gradient is `grad · W`, with `W`
/// dequantized for this one multiplication.
struct InputGradient {
    layer: QLinear,
}

impl CustomOp2 for InputGradient {
    fn name(&self) -> &'static str {
        "quantized-linear-input-gradient"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        product: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((product.try_clone(layout)?, layout.shape().clone()))
    }

    fn bwd(
        &self,
        input: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let weight = self
            .layer
            .dequantized(input.device())
            .map_err(candle_core::Error::wrap)?;
        let out_dim = weight.dim(0)?;
        let lead = grad.elem_count() / out_dim;
        let g = grad
            .reshape((lead, out_dim))?
            .to_dtype(DType::F32)?
            .matmul(&weight)?;
        Ok((
            Some(g.reshape(input.shape())?.to_dtype(input.dtype())?),
            None,
        ))
    }
}

fn add_bias(y: Tensor, bias: &Option<Tensor>) -> Result<Tensor> {
    Ok(match bias {
        Some(b) => y.broadcast_add(&b.to_dtype(DType::F32)?)?,
        None => y,
    })
}

/// Whether quantized products keep the repacked copy of each weight that candle's fastest CPU
/// kernels read (from its `Q4_K`, `Q4_0` and `Q6_K` blocks; our own 8-bit blocks have none).
/// Kept (the default), it is a second copy of the frozen base beside the blocks: for `Q4_K`,
/// 0.59 bytes a weight beside the blocks' 0.56, 3.8 GB on a 7B decoder. Inference keeps it,
/// since repacking at every decoding step would cost more than the step. QLoRA training turns
/// it off: each product repacks its weight and frees the copy, which costs less than the
/// kernels gain.
pub fn keep_repacked_weights(keep: bool) {
    candle_core::quantized::repack::set_keep_packed(keep);
}

/// A decoder projection: its base weight dense, or quantized when the weights are loaded with
/// a [`Quantize`]; plus a trainable LoRA pair where the loader hands one out (`llava train
/// --lora`).
#[derive(Debug, Clone)]
pub struct Projection {
    pub base: Base,
    pub lora: Option<Lora>,
}

#[derive(Debug, Clone)]
pub enum Base {
    Dense(Linear),
    Quantized(QLinear),
}

impl Projection {
    /// Whether the base product runs on candle's barrier pool (4 bits) rather than rayon's.
    pub fn on_candle_pool(&self) -> bool {
        matches!(&self.base, Base::Quantized(q) if matches!(*q.weight, Blocks::Candle(_)))
    }

    pub fn load(w: &WeightsView, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let dense = Linear::load(w, in_dim, out_dim, bias)?;
        let base = match w.quantize() {
            Some(q) if w.inference_only() => {
                Base::Quantized(QLinear::for_inference(&dense.weight, dense.bias, q)?)
            }
            Some(q) => Base::Quantized(QLinear::new(&dense.weight, dense.bias, q)?),
            None => Base::Dense(dense),
        };
        let lora = w.lora_pair(in_dim, out_dim)?.map(Lora::new);
        Ok(Self { base, lora })
    }

    /// A dense layer as a projection (no pair).
    pub fn dense(linear: Linear) -> Self {
        Self {
            base: Base::Dense(linear),
            lora: None,
        }
    }

    /// The width of the output.
    pub fn out_dim(&self) -> Result<usize> {
        Ok(match &self.base {
            Base::Dense(l) => l.weight.dim(0)?,
            Base::Quantized(q) => q.out_dim(),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.base {
            Base::Dense(l) => l.forward(x)?,
            Base::Quantized(q) => q.forward(x)?,
        };
        match &self.lora {
            Some(lora) => Ok((y + lora.delta(x)?)?),
            None => Ok(y),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn random(shape: (usize, usize), seed: u64) -> Tensor {
        // A fixed pseudo-random fill, so that the measured errors are the same on every run.
        let n = shape.0 * shape.1;
        let mut s = seed;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
    }

    /// The tests that read or set the process-wide keep-repacked switch, one at a time.
    static KEEP_SWITCH: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// QLoRA training frees each repacked copy after its product; the products must be those
    /// of the kept copy, bit for bit. (Where the CPU has none of candle's repacked kernels,
    /// both runs take the plain block products.)
    #[test]
    fn products_are_the_same_with_the_repacked_copy_freed() {
        let _switch = KEEP_SWITCH.lock();
        let w = random((64, 512), 4);
        let x = random((40, 512), 5);
        let q = QLinear::new(&w, None, Quantize::Bits4).expect("quantizes");
        let kept = q
            .forward(&x)
            .expect("kept")
            .to_vec2::<f32>()
            .expect("values");
        let fresh = QLinear::new(&w, None, Quantize::Bits4).expect("quantizes");
        keep_repacked_weights(false);
        let freed = fresh.forward(&x).and_then(|y| Ok(y.to_vec2::<f32>()?));
        keep_repacked_weights(true);
        assert_eq!(kept, freed.expect("freed"));
    }

    /// An inference layer holds only the repacked copy where candle's tiles serve every row
    /// count (`Q4_K` on x86 with AVX2 and FMA): its products, one row (decoding) and many
    /// (prefill), are those of a layer that keeps its blocks, bit for bit, and reading the
    /// blocks is an error instead of a read of freed memory.
    #[test]
    fn an_inference_layer_frees_its_blocks_and_multiplies_the_same() {
        let _switch = KEEP_SWITCH.lock();
        let w = random((64, 512), 6);
        let bias = Some(random((1, 64), 8).flatten_all().expect("bias"));
        let both = QLinear::new(&w, bias.clone(), Quantize::Bits4).expect("quantizes");
        let tiles_only = QLinear::for_inference(&w, bias, Quantize::Bits4).expect("quantizes");
        for rows in [1, 40] {
            let x = random((rows, 512), 7);
            let product = |q: &QLinear| q.forward(&x).and_then(|y| Ok(y.to_vec2::<f32>()?));
            assert_eq!(
                product(&both).expect("kept"),
                product(&tiles_only).expect("tiles only")
            );
        }
        #[cfg(target_arch = "x86_64")]
        let tiles = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        #[cfg(not(target_arch = "x86_64"))]
        let tiles = false;
        let read = tiles_only.dequantized(&Device::Cpu);
        assert_eq!(read.is_err(), tiles, "blocks freed where the tiles serve");
        if let Err(e) = read {
            assert!(e.to_string().contains("freed"), "{e}");
        }
        // A later switch to repacking per product (QLoRA training in the same process) still
        // multiplies through the kept tiles.
        let x = random((40, 512), 7);
        let before = tiles_only.forward(&x).and_then(|y| Ok(y.to_vec2::<f32>()?));
        keep_repacked_weights(false);
        let after = tiles_only.forward(&x).and_then(|y| Ok(y.to_vec2::<f32>()?));
        keep_repacked_weights(true);
        assert_eq!(before.expect("kept"), after.expect("switched"));
        // 8 bits are our own blocks, which have no repacked copy: they stay.
        let q8 = QLinear::for_inference(&w, None, Quantize::Bits8).expect("quantizes");
        assert!(q8.dequantized(&Device::Cpu).is_ok());
    }

    /// The relative error of `x Wᵀ + b` with `W` quantized, against f32.
    fn relative_error(quantize: Quantize, in_dim: usize, rows: usize) -> f32 {
        let w = random((96, in_dim), 1);
        let b = random((1, 96), 2).flatten_all().expect("bias");
        let x = random((rows, in_dim), 3);
        let exact = x
            .matmul(&w.t().expect("t"))
            .and_then(|y| y.broadcast_add(&b))
            .expect("exact");
        let q = QLinear::new(&w, Some(b), quantize).expect("quantizes");
        let got = q.forward(&x).expect("forward");
        assert_eq!(got.dims(), &[rows, 96]);
        let err = (got - &exact)
            .and_then(|d| d.sqr()?.sum_all()?.sqrt())
            .and_then(|d| d.to_scalar::<f32>())
            .expect("err");
        let norm = exact
            .sqr()
            .and_then(|d| d.sum_all()?.sqrt()?.to_scalar::<f32>())
            .expect("norm");
        err / norm
    }

    #[test]
    fn quantized_products_stay_close_to_f32() {
        // Uniform weights: 8 bits keep ~0.5% of the signal's size as error, 4 bits ~8%.
        for rows in [1, 3, 7, 40] {
            let e8 = relative_error(Quantize::Bits8, 512, rows);
            let e4k = relative_error(Quantize::Bits4, 512, rows);
            let e40 = relative_error(Quantize::Bits4, 96, rows);
            eprintln!("rows {rows}: Q8_0 {e8:.4}, Q4_K {e4k:.4}, Q4_0 {e40:.4}");
            assert!(e8 < 0.01, "Q8_0 relative error {e8}");
            assert!(e4k < 0.1 && e4k > e8, "Q4_K relative error {e4k}");
            assert!(e40 < 0.15 && e40 > e8, "Q4_0 relative error {e40}");
        }
    }

    #[test]
    fn a_width_no_block_fits_is_refused() {
        let e = QLinear::new(&random((4, 40), 1), None, Quantize::Bits8)
            .expect_err("40 is not a multiple of 32");
        assert!(e.to_string().contains("multiple of 32"), "{e}");
    }

    #[test]
    fn the_input_gradient_flows_through_the_frozen_blocks() {
        // QLoRA's backward: with a graph on the input, the gradient is the incoming one times
        // the dequantized weight, as a dense layer holding that weight gives; without a graph
        // the product is the plain one.
        for (quantize, in_dim) in [
            (Quantize::Bits8, 64),
            (Quantize::Bits4, 256),
            (Quantize::Bits4, 96),
        ] {
            let q = QLinear::new(
                &random((24, in_dim), 3),
                Some(random((1, 24), 4).squeeze(0).expect("bias")),
                quantize,
            )
            .expect("quantize");
            let dense = Linear {
                weight: q.dequantized(&Device::Cpu).expect("dequantize"),
                bias: q.bias.clone(),
            };
            let x = candle_core::Var::from_tensor(
                &random((5, in_dim), 5).reshape((1, 5, in_dim)).expect("x"),
            )
            .expect("var");
            let upstream = random((5, 24), 6).reshape((1, 5, 24)).expect("g");
            let grad_of = |y: Tensor| {
                let grads = (y * &upstream)
                    .and_then(|p| p.sum_all())
                    .and_then(|l| l.backward())
                    .expect("backward");
                grads
                    .get(x.as_tensor())
                    .expect("a gradient reaches x")
                    .clone()
            };
            let yq = q.forward(x.as_tensor()).expect("forward");
            let plain = q.forward(&x.as_tensor().detach()).expect("plain");
            let same = (&yq - &plain)
                .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
                .expect("same");
            assert_eq!(same, 0.0, "the graph changes nothing in the product");
            let (gq, gd) = (
                grad_of(yq),
                grad_of(dense.forward(x.as_tensor()).expect("dense")),
            );
            let diff = (&gq - &gd)
                .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
                .expect("diff");
            let scale = gd
                .abs()
                .and_then(|d| d.max_all()?.to_scalar::<f32>())
                .expect("scale");
            assert!(
                scale > 0.0 && diff <= 1e-5 * scale,
                "{quantize:?}/{in_dim}: {diff} of {scale}"
            );
        }
    }

    /// The patched activation quantization of the 4-bit products (`BlockQ8K::from_float`,
    /// `vendor/README.md`) gives exactly what upstream's loop gave: the first value of the
    /// largest magnitude as the scale, and `round` (ties away from zero) of each value,
    /// clamped. Ties are made exact by a largest value of -127 (scale 1). A tie rounded the
    /// other way changes a dequantized value by the scale, so equal bits mean equal blocks.
    #[test]
    fn q8k_activations_round_as_upstream() {
        use candle_core::quantized::k_quants::{BlockQ8K, GgmlType, QK_K};
        // upstream's loop, dequantized as `to_float` does (the block's fields are private).
        fn upstream(xs: &[f32]) -> Vec<f32> {
            let (mut max, mut amax) = (0f32, 0f32);
            for &x in xs {
                if amax < x.abs() {
                    amax = x.abs();
                    max = x;
                }
            }
            if amax == 0.0 {
                return vec![0.0; QK_K];
            }
            let iscale = -127f32 / max;
            xs.iter()
                .map(|&x| (1.0 / iscale) * f32::from((iscale * x).round().clamp(-128., 127.) as i8))
                .collect()
        }
        let noise = random((4, QK_K), 7).to_vec2::<f32>().expect("values");
        let mut rows: Vec<Vec<f32>> = noise
            .iter()
            .map(|r| r.iter().map(|x| x * 3.0).collect())
            .collect();
        // Ties at every half, both signs, behind a first largest value of -127 (and a later
        // +127 that must not take its place).
        let mut ties: Vec<f32> = (0..QK_K).map(|i| (i as f32 - 128.0) / 2.0).collect();
        ties[0] = -127.0;
        ties[200] = 127.0;
        rows.push(ties);
        rows.push(vec![0.0; QK_K]);
        let mut nan = noise[0].clone();
        nan[5] = f32::NAN;
        rows.push(nan);
        for (i, row) in rows.iter().enumerate() {
            let mut block = [BlockQ8K::zeros()];
            BlockQ8K::from_float(row, &mut block);
            let mut got = vec![0f32; QK_K];
            BlockQ8K::to_float(&block, &mut got);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&upstream(row)), "row {i}");
        }
    }
}
