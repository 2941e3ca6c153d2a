//! The vendored candle-core's bf16 adds (`vendor/README.md`): on a CPU with AVX512-BF16 they take
//! 16 values per instruction. Whatever path the CPU takes, a bf16 sum is the f32 sum of the two
//! values rounded once to nearest-even, which is what this checks, for lengths with and without a
//! tail past the 16-value steps.

use llava_model::{DType, Device, Tensor};

fn values(len: usize, seed: u64) -> Tensor {
    Tensor::rand(-3f32, 3., len, &Device::Cpu)
        .and_then(|t| t.affine(1.0 + seed as f64 * 0.1, 0.0))
        .and_then(|t| t.to_dtype(DType::BF16))
        .expect("values")
}

fn bits(t: &Tensor) -> Vec<u16> {
    t.to_vec1::<half::bf16>()
        .expect("bf16")
        .into_iter()
        .map(|v| v.to_bits())
        .collect()
}

#[test]
fn bf16_adds_are_the_f32_sums_rounded_once() {
    for len in [1, 15, 16, 33, 1000] {
        let (a, b) = (values(len, 1), values(len, 2));
        let sum = (&a + &b).expect("add");
        let wide = (a.to_dtype(DType::F32).expect("f32") + b.to_dtype(DType::F32).expect("f32"))
            .and_then(|t| t.to_dtype(DType::BF16))
            .expect("reference");
        assert_eq!(bits(&sum), bits(&wide), "a + b, {len} values");
        // One side broadcast from a single value: candle's scalar-add path.
        let s = Tensor::new(&[half::bf16::from_f32(0.7)], &Device::Cpu).expect("scalar");
        let shifted = a.broadcast_add(&s).expect("broadcast add");
        let wide = a
            .to_dtype(DType::F32)
            .and_then(|t| t.broadcast_add(&s.to_dtype(DType::F32)?))
            .and_then(|t| t.to_dtype(DType::BF16))
            .expect("reference");
        assert_eq!(bits(&shifted), bits(&wide), "a + s, {len} values");
    }
}
