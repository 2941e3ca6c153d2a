//! How much each 4-bit and 8-bit format loses (issue 27: "NF4 with double quantization, as
//! bitsandbytes' default QLoRA, or a block format at least as accurate; measure and state the
//! error"). For a weight `W` drawn from a distribution, the relative RMS error of the
//! dequantized weight, `‖Ŵ − W‖ / ‖W‖`, and of a product with Gaussian activations,
//! `‖x Ŵᵀ − x Wᵀ‖ / ‖x Wᵀ‖`, for:
//! - `Q4_K` (candle's, what `--bits 4` and `--load-4bit` hold) and `Q4_0` (its fallback where a
//!   width is not a multiple of 256);
//! - NF4 as bitsandbytes' QLoRA defines it: blocks of 64 scaled by their absmax onto the 16
//!   normal-quantile code values of the QLoRA paper, absmax in f32;
//! - NF4 with double quantization: the absmax values, less their mean, stored in 8 bits per
//!   block of 256. bitsandbytes uses its dynamic 8-bit map there; this probe uses a linear
//!   absmax map, a stand-in whose error is of the same order and small beside the 4-bit codes';
//! - the 8-bit blocks of `--bits 8` / `--load-8bit` (`q8.rs`).
//!
//! Two weight distributions: Gaussian (the shape of a trained linear layer's bulk, std 0.02) and
//! Student-t with 3 degrees of freedom (heavy tails, as the outliers of real checkpoints).
//!
//! `cargo run --release -p llava-model --example quant_error_probe`
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use llava_model::q8::Q8Weight;
use rand::{Rng, SeedableRng};

/// The NF4 code values (QLoRA, Dettmers et al. 2023, appendix E): quantiles of N(0, 1) scaled
/// to [-1, 1], with an exact zero.
const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];
const NF4_BLOCK: usize = 64;
const DQ_BLOCK: usize = 256;

fn gaussian(rng: &mut impl Rng) -> f32 {
    // Box-Muller.
    let (u, v): (f32, f32) = (rng.random_range(f32::EPSILON..1.0), rng.random());
    (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
}

fn student_t3(rng: &mut impl Rng) -> f32 {
    let chi2: f32 = (0..3).map(|_| gaussian(rng).powi(2)).sum();
    gaussian(rng) / (chi2 / 3.0).sqrt()
}

/// NF4 round trip of `w`, block by block; with `double`, the block scales go through 8 bits.
fn nf4(w: &[f32], double: bool) -> Vec<f32> {
    let mut absmax: Vec<f32> = w
        .chunks(NF4_BLOCK)
        .map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs())))
        .collect();
    if double {
        let mean = absmax.iter().sum::<f32>() / absmax.len() as f32;
        for group in absmax.chunks_mut(DQ_BLOCK) {
            let scale = group.iter().fold(0f32, |m, a| m.max((a - mean).abs())) / 127.0;
            for a in group.iter_mut() {
                let q = if scale > 0.0 {
                    ((*a - mean) / scale).round().clamp(-127.0, 127.0)
                } else {
                    0.0
                };
                *a = q * scale + mean;
            }
        }
    }
    let mut out = Vec::with_capacity(w.len());
    for (block, &scale) in w.chunks(NF4_BLOCK).zip(&absmax) {
        for &v in block {
            let x = if scale > 0.0 { v / scale } else { 0.0 };
            let code = NF4
                .iter()
                .min_by(|a, b| (*a - x).abs().total_cmp(&(*b - x).abs()))
                .copied()
                .unwrap_or(0.0);
            out.push(code * scale);
        }
    }
    out
}

fn relative(approx: &[f32], exact: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (a, e) in approx.iter().zip(exact) {
        num += ((a - e) as f64).powi(2);
        den += (*e as f64).powi(2);
    }
    (num / den).sqrt()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (n, k, rows) = (2048, 2048, 64);
    let dev = Device::Cpu;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let x: Vec<f32> = (0..rows * k).map(|_| gaussian(&mut rng)).collect();
    let x = Tensor::from_vec(x, (rows, k), &dev)?;
    println!(
        "{:28} {:>14} {:>12} {:>12}",
        "format", "bits/weight", "weight err", "product err"
    );
    for (name, draw) in [
        ("Gaussian", gaussian as fn(&mut rand::rngs::StdRng) -> f32),
        ("Student-t, 3 dof", student_t3),
    ] {
        println!("{name} weights, {n} x {k}, products with {rows} Gaussian rows:");
        let w: Vec<f32> = (0..n * k).map(|_| 0.02 * draw(&mut rng)).collect();
        let wt = Tensor::from_vec(w.clone(), (n, k), &dev)?;
        let exact = x.matmul(&wt.t()?)?.flatten_all()?.to_vec1::<f32>()?;
        let product = |approx: &[f32]| -> Result<f64, Box<dyn std::error::Error>> {
            let a = Tensor::from_vec(approx.to_vec(), (n, k), &dev)?;
            let y = x.matmul(&a.t()?)?.flatten_all()?.to_vec1::<f32>()?;
            Ok(relative(&y, &exact))
        };
        let candle = |dtype: GgmlDType| -> Result<Vec<f32>, Box<dyn std::error::Error>> {
            let q = QTensor::quantize(&wt, dtype)?;
            Ok(q.dequantize(&dev)?.flatten_all()?.to_vec1::<f32>()?)
        };
        let q8 = Q8Weight::quantize_tensor(&wt)?.dequantize();
        let rows_out = [
            ("Q4_K (--bits 4)", 4.5, candle(GgmlDType::Q4K)?),
            ("Q4_0", 4.5, candle(GgmlDType::Q4_0)?),
            ("NF4, f32 absmax", 4.5, nf4(&w, false)),
            (
                "NF4, double-quantized",
                4.0 + 8.0 / 64.0 + 32.0 / (64.0 * 256.0),
                nf4(&w, true),
            ),
            // 32 int8 values and one f32 scale per block.
            ("8-bit blocks (--bits 8)", 9.0, q8),
        ];
        for (label, bits, approx) in rows_out {
            println!(
                "  {label:26} {bits:>14.3} {:>12.5} {:>12.5}",
                relative(&approx, &w),
                product(&approx)?
            );
        }
    }
    Ok(())
}
