//! The decoding GEMV's draw on memory against a plain streaming read of the same bytes: one
//! decode step's products of the tiny-1b decoder (22 layers' seven projections and `lm_head`,
//! every weight its own, 2.1 GB in bf16), one row, best of five, beside a parallel sum over
//! the same weights' bytes on as many threads.
//! `RAYON_NUM_THREADS=2 cargo run --release -p llava-model --example gemv_bandwidth_probe`
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use llava_model::gemv;
use rayon::prelude::*;

/// [out, in] of one layer's projections (q, k, v, o, gate, up, down).
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

fn main() -> candle_core::Result<()> {
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
    for _ in 0..5 {
        let t = Instant::now();
        for (w, x) in weights.iter().zip(&xs) {
            gemv::matmul_t(x, w).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "GEMV, 1 row:     {:7.1} ms per step, {:5.1} GB/s",
        best * 1e3,
        bytes as f64 / best / 1e9
    );
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
