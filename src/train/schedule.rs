//! Learning-rate schedule: linear warmup from 0, then constant or cosine decay to `min_lr`.
use crate::config::{LrSchedule, TrainConfig};
use std::f64::consts::PI;

/// Learning rate of optimizer step `step` (1-based).
pub fn lr_at(t: &TrainConfig, step: usize) -> f64 {
    if t.warmup_steps > 0 && step <= t.warmup_steps {
        return t.lr * step as f64 / t.warmup_steps as f64;
    }
    match t.schedule {
        LrSchedule::Constant => t.lr,
        LrSchedule::Cosine => {
            let span = (t.steps - t.warmup_steps).max(1) as f64;
            let progress = ((step - t.warmup_steps) as f64 / span).clamp(0.0, 1.0);
            t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + (PI * progress).cos())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_min() {
        let t = TrainConfig { steps: 10, warmup_steps: 2, lr: 1.0, min_lr: 0.1, ..Default::default() };
        assert_eq!(lr_at(&t, 1), 0.5);
        assert_eq!(lr_at(&t, 2), 1.0);
        assert!((lr_at(&t, 6) - 0.55).abs() < 1e-12, "halfway through the decay is the midpoint");
        assert!((lr_at(&t, 10) - 0.1).abs() < 1e-12);
        assert!(lr_at(&t, 3) < 1.0 && lr_at(&t, 3) > lr_at(&t, 4));
    }

    #[test]
    fn constant_after_warmup() {
        let t =
            TrainConfig { steps: 5, warmup_steps: 0, lr: 0.3, schedule: LrSchedule::Constant, ..Default::default() };
        assert!((1..=5).all(|s| lr_at(&t, s) == 0.3));
    }
}
