//! Times the vision tower + projector (`get_image_features`, CPU) with its weights in
//! `gemm_layout` and as stored, from two copies of the model loaded side by side and run
//! alternately, so that both see the same noise on a shared machine. Checks that the two give
//! the same features. With `bf16` on a CPU without AMX, "as stored" keeps the weights bf16 and
//! widens them on every call.
//! `cargo run --release -p llava-model --example gemm_layout_probe -- CHECKPOINT_DIR [N] [f32|bf16]`
use llava_model::nn::Mode;
use llava_model::{Checkpoint, DType, Device, Llava, Tensor};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn load(dir: &str, stored: bool, dtype: DType) -> Result<Llava> {
    // SAFETY: set before any other thread exists that reads the environment.
    unsafe {
        if stored {
            std::env::set_var("LLAVA_NO_GEMM_LAYOUT", "1");
        } else {
            std::env::remove_var("LLAVA_NO_GEMM_LAYOUT");
        }
    }
    Ok(Llava::from_checkpoint(
        &Checkpoint::open(dir, None)?,
        dtype,
        None,
        &Device::Cpu,
        None,
    )?)
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .ok_or("usage: gemm_layout_probe CHECKPOINT_DIR [N] [f32|bf16]")?;
    let n: usize = args.next().map_or(Ok(6), |s| s.parse())?;
    let dtype = match args.next().as_deref() {
        None | Some("f32") => DType::F32,
        Some("bf16") => DType::BF16,
        Some(other) => return Err(format!("dtype {other}: f32 or bf16").into()),
    };
    // Load times are not compared here: the second copy loads under the first one's memory.
    let stored = load(&dir, true, dtype)?;
    let layout = load(&dir, false, dtype)?;
    let size = layout.config.vision_config.image_size;
    let pixels = Tensor::randn(0f32, 1.0, (1, 3, size, size), &Device::Cpu)?;
    let mut times = [Vec::new(), Vec::new()];
    for _ in 0..n {
        for (model, t) in [&layout, &stored].into_iter().zip(times.iter_mut()) {
            let start = std::time::Instant::now();
            model.get_image_features(&pixels, Mode::Infer)?;
            t.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    for (name, t) in ["gemm_layout", "as stored"].iter().zip(times.iter_mut()) {
        t.sort_by(f64::total_cmp);
        println!(
            "vision, {name}: best {:.0} ms, median {:.0} ms of {n}",
            t[0],
            t[t.len() / 2]
        );
    }
    let a = layout.get_image_features(&pixels, Mode::Infer)?;
    let b = stored.get_image_features(&pixels, Mode::Infer)?;
    let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    println!("largest difference between the two: {diff:e}");
    Ok(())
}
