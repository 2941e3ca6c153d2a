//! Times the fused CPU attention (`llava_model::attention`) against the three tensor products it
//! replaces (`Q Kᵀ`, softmax, `P V`, as the model computes them where the kernel does not
//! apply), alternately in one process, at the shapes of the benchmark: the vision tower's (16
//! heads, 577 positions, unmasked) and the decoder's prefill (32 query heads on 4 KV heads, 617
//! positions, causal). Checks that the two agree.
//! `RAYON_NUM_THREADS=2 cargo run --release -p llava-model --example attention_probe [N]`
use llava_model::{Device, Tensor};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> Result<()> {
    let n: usize = std::env::args().nth(1).map_or(Ok(15), |s| s.parse())?;
    let dev = Device::Cpu;
    let d = 64;
    for (name, heads, kv_heads, s, causal) in [
        ("vision (16 heads, 577)", 16, 16, 577, false),
        ("prefill (32/4 heads, 617, causal)", 32, 4, 617, true),
    ] {
        let q = (Tensor::randn(0f32, 1.0, (1, heads, s, d), &dev)? * 0.125)?;
        let k = Tensor::randn(0f32, 1.0, (1, kv_heads, s, d), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (1, kv_heads, s, d), &dev)?;
        let mask: Vec<f32> = (0..s)
            .flat_map(|i| (0..s).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (1, 1, s, s), &dev)?;
        // The decoder's fallback: query heads that share a KV head stacked along the sequence.
        let three = || -> Result<Tensor> {
            let rep = heads / kv_heads;
            let scores = q
                .reshape((1, kv_heads, rep * s, d))?
                .matmul(&k.t()?)?
                .reshape((1, heads, s, s))?;
            let scores = if causal {
                scores.broadcast_add(&mask)?
            } else {
                scores
            };
            let p = llava_model::fused::softmax_last_dim(&scores)?;
            Ok(p.reshape((1, kv_heads, rep * s, s))?
                .matmul(&v)?
                .reshape((1, heads, s, d))?)
        };
        let fused = || llava_model::attention::attention(&q, &k, &v, None, causal);
        if !llava_model::attention::applies(&q, &k, &v) {
            println!("{name}: the fused kernel does not run on this CPU");
            continue;
        }
        let diff = (three()? - fused()?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        let mut times = [Vec::new(), Vec::new()];
        for _ in 0..n {
            let start = std::time::Instant::now();
            three()?;
            times[0].push(start.elapsed().as_secs_f64() * 1e3);
            let start = std::time::Instant::now();
            fused()?;
            times[1].push(start.elapsed().as_secs_f64() * 1e3);
        }
        for t in times.iter_mut() {
            t.sort_by(f64::total_cmp);
        }
        println!(
            "{name}: three products best {:.1} / median {:.1} ms, fused best {:.1} / median {:.1} ms of {n}; largest difference {diff:e}",
            times[0][0],
            times[0][n / 2],
            times[1][0],
            times[1][n / 2]
        );
    }
    Ok(())
}
