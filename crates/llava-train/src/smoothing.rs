//! TensorBoard's smoothing of a scalar curve, for `loss.png`: spikes from batches of different
//! kinds are averaged away, and the line still starts on the first value.

/// The smoothing weight for `n` points: TensorBoard's slider, set so that the average spans
/// about a thirtieth of the run (0.6, TensorBoard's default, for short runs; at most 0.99).
pub fn smoothing_weight(n: usize) -> f64 {
    (1.0 - 30.0 / n.max(1) as f64).clamp(0.6, 0.99)
}

/// TensorBoard's smoothing: an exponential moving average with weight `weight` on the past,
/// debiased for its zero start (`last / (1 - weight^k)` after k values) so that the line starts
/// on the first value rather than near zero. Non-finite values pass through unsmoothed.
pub fn ema(values: &[f64], weight: f64) -> Vec<f64> {
    let mut last = 0.0;
    let mut count = 0i32;
    values
        .iter()
        .map(|&v| {
            if !v.is_finite() {
                return v;
            }
            last = last * weight + (1.0 - weight) * v;
            count += 1;
            let debias = 1.0 - weight.powi(count);
            if debias > 0.0 { last / debias } else { v }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ema_is_tensorboards_debiased_average() {
        // weight 0.5: 0.5·1 / (1 - 0.5) = 1; (0.25 + 0.5·3) / (1 - 0.25) = 7/3.
        let s = ema(&[1.0, 3.0, f64::NAN, 3.0], 0.5);
        assert!((s[0] - 1.0).abs() < 1e-12);
        assert!((s[1] - 7.0 / 3.0).abs() < 1e-12);
        assert!(s[2].is_nan());
        // The NaN is passed over: (1.75·0.5 + 0.5·3) / (1 - 0.5³) = 2.375 / 0.875.
        assert!((s[3] - 2.375 / 0.875).abs() < 1e-12);
    }

    #[test]
    fn smoothing_weight_follows_the_run_length() {
        assert_eq!(smoothing_weight(10), 0.6);
        assert!((smoothing_weight(300) - 0.9).abs() < 1e-12);
        assert_eq!(smoothing_weight(100_000), 0.99);
    }
}
