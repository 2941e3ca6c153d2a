//! Times the bf16 products of prefill and the vision tower: `bf16_linear` (AMX or AVX512-BF16,
//! whichever this CPU has) against the path without it, the bf16 weight widened per call into
//! `gemm_layout` and multiplied by candle's f32 GEMM, and against f32 weights stored as `Wᵀ`.
//! `cargo run --release -p llava-model --example bf16_linear_probe`
use candle_core::{DType, Device, Tensor};
use llava_model::{bf16_linear, gemm_layout};

fn time(
    label: &str,
    flops: f64,
    reps: usize,
    f: impl Fn() -> Result<Tensor, Box<dyn std::error::Error>>,
) -> Result<(), Box<dyn std::error::Error>> {
    f()?;
    let t = std::time::Instant::now();
    for _ in 0..reps {
        f()?;
    }
    let s = t.elapsed().as_secs_f64() / reps as f64;
    println!(
        "{label:44} {:8.2} ms  {:7.1} GFLOP/s",
        s * 1e3,
        flops / s / 1e9
    );
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    println!("bf16 backend: {:?}", bf16_linear::backend());
    for (m, k, n) in [
        (577, 1024, 1024),
        (577, 1024, 4096),
        (577, 4096, 1024),
        (617, 2048, 2048),
        (617, 2048, 256),
        (617, 2048, 5632),
        (617, 5632, 2048),
    ] {
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?.to_dtype(DType::BF16)?;
        let wt = w.to_dtype(DType::F32)?.t()?.contiguous()?;
        let flops = 2.0 * (m * k * n) as f64;
        if bf16_linear::applies(&x, &w, None) {
            time(
                &format!("[{m}x{k}]·[{n}x{k}]ᵀ bf16_linear"),
                flops,
                5,
                || Ok(bf16_linear::linear(&x, &w, None)?),
            )?;
        }
        time(
            &format!("[{m}x{k}]·[{n}x{k}]ᵀ widened per call"),
            flops,
            5,
            || {
                let wide = gemm_layout::widened(&w)?.ok_or("not bf16")?;
                Ok(x.matmul(&wide.t()?)?)
            },
        )?;
        time(&format!("[{m}x{k}]·[{k}x{n}] f32 Wᵀ"), flops, 5, || {
            Ok(x.matmul(&wt)?)
        })?;
    }
    Ok(())
}
