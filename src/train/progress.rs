//! Rank 0's line per step.
use super::metrics::StepRow;

pub fn print_progress(r: &StepRow, steps: usize, secs_per_step: f64) {
    let eta = secs_per_step * (steps as u64 - r.step) as f64;
    println!(
        "step {:>5}/{steps}  loss {:.4}  lr {:.2e}  grad_norm {:.3}  {:.1} tok/s  {:.2} s/step  {:.1} TFLOP/s  MFU {:.2}%  eta {}",
        r.step,
        r.loss,
        r.lr,
        r.grad_norm,
        r.tokens_per_s,
        r.step_time,
        r.tflops,
        100.0 * r.mfu,
        eta_text(eta)
    );
}

fn eta_text(secs: f64) -> String {
    let s = secs.round() as u64;
    match s {
        0..=99 => format!("{s} s"),
        100..=5999 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s / 60 % 60),
    }
}
