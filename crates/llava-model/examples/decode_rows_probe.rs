//! Times one decode step's linear layers of a TinyLlama-1.1B-shaped decoder (the tiny-1b
//! checkpoint's) for a batch of `m` rows, as `llava serve` runs them: through `nn::Linear`'s
//! dispatch (the GEMV up to `gemv::MAX_ROWS` rows) and through the GEMM path that larger
//! batches take (bf16 weights widened to f32 for it on a CPU without AMX).
//! `cargo run --release -p llava-model --example decode_rows_probe`
//!
//! With the argument `bandwidth`, it instead measures the one-row GEMV's draw on memory over
//! every weight of the step (22 layers' own, 2.1 GB in bf16) against a streaming read of the
//! same bytes, and the same step's `--load-8bit` products: `RAYON_NUM_THREADS=2 cargo run --release -p llava-model --example
//! decode_rows_probe -- bandwidth`.
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use llava_model::gemm_layout;
use llava_model::gemv;
use llava_model::q8::Q8Weight;
use rayon::prelude::*;

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
    if std::env::args().nth(1).as_deref() == Some("bandwidth") {
        return bandwidth();
    }
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

/// The GEMV's draw on memory against a plain streaming read of the same bytes: one decode
/// step's bf16 products, every weight its own (2.1 GB), one row, best of five, beside a
/// parallel sum over the same weights' bytes on as many threads.
fn bandwidth() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let shapes: Vec<(usize, usize)> = (0..LAYERS).flat_map(|_| LAYER).chain([LM_HEAD]).collect();
    let weights: Vec<Tensor> = shapes
        .iter()
        .map(|&(n, k)| Tensor::randn(0f32, 0.02, (n, k), &dev)?.to_dtype(DType::BF16))
        .collect::<candle_core::Result<_>>()?;
    let xs: Vec<Tensor> = shapes
        .iter()
        .map(|&(_, k)| Tensor::randn(0f32, 1.0, (1, k), &dev))
        .collect::<candle_core::Result<_>>()?;
    let bytes: usize = shapes.iter().map(|(n, k)| n * k * 2).sum();
    println!(
        "{} threads, {:.2} GB of bf16 weights",
        rayon::current_num_threads(),
        bytes as f64 / 1e9
    );
    let mut best = f64::MAX;
    let mut all = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        for (w, x) in weights.iter().zip(&xs) {
            gemv::matmul_t(x, w).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        }
        best = best.min(t.elapsed().as_secs_f64());
        all.push(format!("{:.1}", t.elapsed().as_secs_f64() * 1e3));
    }
    println!("GEMV passes (ms): {}", all.join(" "));
    println!(
        "GEMV, 1 row:     {:7.1} ms per step, {:5.1} GB/s",
        best * 1e3,
        bytes as f64 / best / 1e9
    );
    // The same step in `--load-8bit`'s blocks (1.125 bytes a weight), through the integer
    // products.
    let q8: Vec<Q8Weight> = weights
        .iter()
        .map(Q8Weight::quantize_tensor)
        .collect::<candle_core::Result<_>>()?;
    let rows: Vec<Vec<f32>> = xs
        .iter()
        .map(|x| x.flatten_all()?.to_vec1::<f32>())
        .collect::<candle_core::Result<_>>()?;
    let q8_bytes: usize = shapes.iter().map(|(n, k)| n * k * 9 / 8).sum();
    let mut best_q8 = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        for (w, x) in q8.iter().zip(&rows) {
            std::hint::black_box(w.matmul_t(x, 1));
        }
        best_q8 = best_q8.min(t.elapsed().as_secs_f64());
    }
    println!(
        "8-bit, 1 row:    {:7.1} ms per step, {:5.1} GB/s ({:.2} GB)",
        best_q8 * 1e3,
        q8_bytes as f64 / best_q8 / 1e9,
        q8_bytes as f64 / 1e9
    );
    drop(q8);
    let slices: Vec<Vec<u64>> = weights
        .iter()
        .map(|w| {
            let v = w.flatten_all()?.to_vec1::<half::bf16>()?;
            Ok(v.chunks_exact(4)
                .map(|c| {
                    c.iter()
                        .fold(0u64, |a, b| (a << 16) | u64::from(b.to_bits()))
                })
                .collect())
        })
        .collect::<candle_core::Result<_>>()?;
    let mut best = f64::MAX;
    let mut total = 0u64;
    for _ in 0..5 {
        let t = Instant::now();
        for s in &slices {
            total = total.wrapping_add(
                s.par_chunks(16 * 1024)
                    .map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b)))
                    .reduce(|| 0, u64::wrapping_add),
            );
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "streaming read:  {:7.1} ms per pass, {:5.1} GB/s (checksum {total:x})",
        best * 1e3,
        bytes as f64 / best / 1e9
    );
    Ok(())
}
