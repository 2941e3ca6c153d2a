//! Times the fused CPU attention (`llava_model::attention`) against the three tensor products it
//! replaces (`Q Kᵀ`, softmax, `P V`, as the model computes them where the kernel does not
//! apply), alternately in one process, at the shapes of the benchmark: the vision tower's (16
//! heads, 577 positions, unmasked) and the decoder's prefill (32 query heads on 4 KV heads, 617
//! positions, causal). Checks that the two agree.
//!
//! Then a decoded token's attention (`llava_model::decode_attention`, one query against the
//! cache's keys and values read in place from buffers with room) against the two products the
//! decoder ran before it, on contiguous keys and values, 22 layers' worth per timing.
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
    decode(n)
}

/// One decoded query per layer, tiny-1b's heads (32 on 4 KV heads of 64), at several depths.
fn decode(n: usize) -> Result<()> {
    use llava_model::decode_attention::{self, Threads};
    const LAYERS: usize = 22;
    let dev = Device::Cpu;
    let (heads, kv_heads, d) = (32, 4, 64);
    for t in [617, 2000] {
        let room = t + 100;
        let q: Vec<Tensor> = (0..LAYERS)
            .map(|_| Tensor::randn(0f32, 0.125, (1, heads, 1, d), &dev))
            .collect::<candle_core::Result<_>>()?;
        let kv = |_| -> Result<(Tensor, Tensor)> {
            let k = Tensor::randn(0f32, 1.0, (1, kv_heads, room, d), &dev)?;
            let v = Tensor::randn(0f32, 1.0, (1, kv_heads, room, d), &dev)?;
            Ok((k.narrow(2, 0, t)?, v.narrow(2, 0, t)?))
        };
        let views: Vec<(Tensor, Tensor)> = (0..LAYERS).map(kv).collect::<Result<_>>()?;
        let whole: Vec<(Tensor, Tensor)> = views
            .iter()
            .map(|(k, v)| Ok((k.contiguous()?, v.contiguous()?)))
            .collect::<Result<_>>()?;
        let products = |l: usize| -> Result<Tensor> {
            let (k, v) = &whole[l];
            let rep = heads / kv_heads;
            let scores = q[l].reshape((1, kv_heads, rep, d))?.matmul(&k.t()?)?;
            let p = llava_model::fused::softmax_last_dim(&scores)?;
            Ok(p.matmul(v)?.reshape((1, heads, 1, d))?)
        };
        let kernel = |l: usize, threads| -> Result<Tensor> {
            let (k, v) = &views[l];
            Ok(decode_attention::attention(&q[l], k, v, None, threads)?)
        };
        let diff = (products(0)? - kernel(0, Threads::Rayon)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        let mut times = [Vec::new(), Vec::new(), Vec::new()];
        for _ in 0..n {
            for (i, times) in times.iter_mut().enumerate() {
                let start = std::time::Instant::now();
                for l in 0..LAYERS {
                    match i {
                        0 => products(l)?,
                        1 => kernel(l, Threads::Rayon)?,
                        _ => kernel(l, Threads::Candle)?,
                    };
                }
                times.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
        for t in times.iter_mut() {
            t.sort_by(f64::total_cmp);
        }
        println!(
            "decode, one query at {t} positions × {LAYERS} layers: two products median {:.2} ms, kernel on rayon {:.2} ms, on candle's pool {:.2} ms (best {:.2} / {:.2} / {:.2}) of {n}; largest difference {diff:e}",
            times[0][n / 2],
            times[1][n / 2],
            times[2][n / 2],
            times[0][0],
            times[1][0],
            times[2][0]
        );
    }
    Ok(())
}
