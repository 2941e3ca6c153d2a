//! Times the CPU products in the shapes LLaVA's vision tower, prefill and decode use.
//! - f32: candle's matmul with the weight as stored (`x · Wᵀ` through a transposed view), as
//!   `(W · xᵀ)ᵀ`, and pre-transposed to a contiguous `Wᵀ`.
//! - bf16 weights under f32 activations: `bf16_linear` (AMX or AVX512-BF16, whichever this CPU
//!   has, for more than `gemv::MAX_ROWS` rows) against the path without it, the weight widened
//!   per call into `gemm_layout` and multiplied by the f32 GEMM.
//!
//! `cargo run --release -p llava-model --example matmul_probe`
use candle_core::{DType, Device, Tensor};
use llava_model::{bf16_linear, gemm_layout};

type Product = Result<Tensor, Box<dyn std::error::Error>>;

fn time(
    label: &str,
    flops: f64,
    reps: usize,
    f: impl Fn() -> Product,
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
        (1, 2048, 5632),
    ] {
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?;
        let wt = w.t()?.contiguous()?;
        let flops = 2.0 * (m * k * n) as f64;
        let reps = if m == 1 { 50 } else { 5 };
        time(
            &format!("[{m}x{k}]·[{n}x{k}]ᵀ view"),
            flops,
            reps,
            || Ok(x.matmul(&w.t()?)?),
        )?;
        let xt = x.t()?;
        time(
            &format!("([{n}x{k}]·[{m}x{k}]ᵀ)ᵀ"),
            flops,
            reps,
            || Ok(w.matmul(&xt)?.t()?.contiguous()?),
        )?;
        time(
            &format!("[{m}x{k}]·[{k}x{n}] contiguous"),
            flops,
            reps,
            || Ok(x.matmul(&wt)?),
        )?;
        let w16 = w.to_dtype(DType::BF16)?;
        if bf16_linear::applies(&x, &w16, None) {
            time(
                &format!("[{m}x{k}]·[{n}x{k}]ᵀ bf16, bf16_linear"),
                flops,
                reps,
                || Ok(bf16_linear::linear(&x, &w16, None)?),
            )?;
        }
        time(
            &format!("[{m}x{k}]·[{n}x{k}]ᵀ bf16, widened per call"),
            flops,
            reps,
            || {
                let wide = gemm_layout::widened(&w16)?.ok_or("not bf16")?;
                Ok(x.matmul(&wide.t()?)?)
            },
        )?;
    }
    Ok(())
}
