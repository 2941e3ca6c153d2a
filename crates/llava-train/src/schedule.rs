//! Learning-rate schedules as transformers defines them (`get_cosine_schedule_with_warmup`,
//! `get_constant_schedule_with_warmup`): linear warmup from 0, then cosine decay to 0 or flat.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    Cosine,
    Constant,
}

/// The learning rate for optimizer step `step` (0-based, as transformers' `LambdaLR` sees it).
pub fn lr_at(
    schedule: Schedule,
    base_lr: f64,
    step: u64,
    warmup_steps: u64,
    total_steps: u64,
) -> f64 {
    if step < warmup_steps {
        return base_lr * step as f64 / warmup_steps.max(1) as f64;
    }
    match schedule {
        Schedule::Constant => base_lr,
        Schedule::Cosine => {
            let progress = (step - warmup_steps) as f64
                / (total_steps.saturating_sub(warmup_steps)).max(1) as f64;
            base_lr * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
        }
    }
}

/// `ceil(ratio × total)`, as transformers' `get_warmup_steps` computes `--warmup-ratio`.
pub fn warmup_steps(ratio: f64, total_steps: u64) -> u64 {
    (ratio * total_steps as f64).ceil() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_with_warmup_matches_transformers() {
        // Values of transformers' get_cosine_schedule_with_warmup(opt, 3, 100) at lr 2e-3.
        let lr = |s| lr_at(Schedule::Cosine, 2e-3, s, 3, 100);
        assert_eq!(lr(0), 0.0);
        assert!((lr(1) - 2e-3 / 3.0).abs() < 1e-15);
        assert_eq!(lr(3), 2e-3);
        // Halfway through the decay the cosine factor is 0.5.
        let mid = 3 + (100 - 3) / 2;
        let expected =
            2e-3 * 0.5 * (1.0 + (std::f64::consts::PI * ((mid - 3) as f64 / 97.0)).cos());
        assert!((lr(mid) - expected).abs() < 1e-15);
        assert!(lr(100).abs() < 1e-18);
        assert_eq!(lr_at(Schedule::Constant, 2e-5, 50, 3, 100), 2e-5);
        assert_eq!(warmup_steps(0.03, 1000), 30);
        assert_eq!(warmup_steps(0.03, 10), 1);
    }
}
