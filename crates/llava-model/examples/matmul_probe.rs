//! Times candle's CPU f32 matmul in the shapes LLaVA's vision tower, prefill and decode use,
//! with the weight as stored (`x · Wᵀ` through a transposed view), as `(W · xᵀ)ᵀ`, and
//! pre-transposed to a contiguous `Wᵀ`.
//! `cargo run --release -p llava-model --example matmul_probe`
use candle_core::{Device, Tensor};

fn time(
    label: &str,
    flops: f64,
    reps: usize,
    f: impl Fn() -> candle_core::Result<Tensor>,
) -> candle_core::Result<()> {
    f()?;
    let t = std::time::Instant::now();
    for _ in 0..reps {
        f()?;
    }
    let s = t.elapsed().as_secs_f64() / reps as f64;
    println!(
        "{label:40} {:8.2} ms  {:7.1} GFLOP/s",
        s * 1e3,
        flops / s / 1e9
    );
    Ok(())
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for (m, k, n) in [
        (577, 1024, 1024),
        (577, 1024, 4096),
        (577, 4096, 1024),
        (617, 2048, 2048),
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
            || x.matmul(&w.t()?),
        )?;
        let xt = x.t()?;
        time(
            &format!("([{n}x{k}]·[{m}x{k}]ᵀ)ᵀ"),
            flops,
            reps,
            || w.matmul(&xt)?.t()?.contiguous(),
        )?;
        time(
            &format!("[{m}x{k}]·[{k}x{n}] contiguous"),
            flops,
            reps,
            || x.matmul(&wt),
        )?;
    }
    Ok(())
}
