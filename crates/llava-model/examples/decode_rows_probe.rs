//! Times one decode step's linear layers of a TinyLlama-1.1B-shaped decoder (the tiny-1b
//! checkpoint's) for a batch of `m` rows, as `llava serve` runs them: through `nn::Linear`'s
//! dispatch (the GEMV up to `gemv::MAX_ROWS` rows) and through the GEMM path that larger
//! batches take (bf16 weights widened to f32 for it on a CPU without AMX).
//! `cargo run --release -p llava-model --example decode_rows_probe`
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use llava_model::gemm_layout;
use llava_model::gemv;

/// [out, in] of one layer's projections (q, k, v, o, gate, up, down), 22 layers, and lm_head.
const LAYER: [(usize, usize); 7] = [
    (2048, 2048),
    (256, 2048),
    (256, 2048),
    (2048, 2048),
    (5632, 2048),
    (5632, 2048),
    (2048, 5632),
];
const LAYERS: usize = 22;
const LM_HEAD: (usize, usize) = (32064, 2048);

fn step(
    weights: &[Tensor],
    xs: &[Tensor],
    f: &dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<f64> {
    let t = Instant::now();
    for (w, x) in weights.iter().zip(xs) {
        f(x, w)?;
    }
    Ok(t.elapsed().as_secs_f64())
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for dtype in [DType::BF16, DType::F32] {
        // One layer's weights stand for all 22 (the time is scaled), plus lm_head.
        let shapes: Vec<(usize, usize)> = LAYER.iter().copied().chain([LM_HEAD]).collect();
        let weights: Vec<Tensor> = shapes
            .iter()
            .map(|&(n, k)| Tensor::randn(0f32, 0.02, (n, k), &dev)?.to_dtype(dtype))
            .collect::<candle_core::Result<_>>()?;
        for m in [1, 2, 4, 5, 8, 12, 16] {
            let xs: Vec<Tensor> = shapes
                .iter()
                .map(|&(_, k)| Tensor::randn(0f32, 1.0, (m, k), &dev))
                .collect::<candle_core::Result<_>>()?;
            let gemv_path = |x: &Tensor, w: &Tensor| {
                gemv::matmul_t(x, w).map_err(|e| candle_core::Error::Msg(e.to_string()))
            };
            let gemm_path = |x: &Tensor, w: &Tensor| match gemm_layout::widened(w)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?
            {
                Some(wide) => x.matmul(&wide.t()?),
                None => x.matmul(&w.t()?),
            };
            let mut best = [f64::MAX; 2];
            for _ in 0..3 {
                for (b, f) in best.iter_mut().zip([
                    &gemv_path as &dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
                    &gemm_path,
                ]) {
                    // The layer's seven products count 22 times, lm_head once.
                    let layer = step(&weights[..7], &xs[..7], f)?;
                    let head = step(&weights[7..], &xs[7..], f)?;
                    *b = b.min(layer * LAYERS as f64 + head);
                }
            }
            println!(
                "{dtype:?} weights, m = {m:2}: GEMV {:7.1} ms/step ({:6.1} rows/s), GEMM {:7.1} ms/step ({:6.1} rows/s)",
                best[0] * 1e3,
                m as f64 / best[0],
                best[1] * 1e3,
                m as f64 / best[1]
            );
        }
    }
    Ok(())
}
