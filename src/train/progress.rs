//! Rank 0's line per step, each starting with its UTC time stamp.
use super::metrics::StepRow;
use crate::units::gib;

/// Now in UTC to the second, as in `2026-12-01T20:35:50Z`.
pub(crate) fn now() -> String {
    jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// "  disk X GiB" when some rank kept activations on disk this step, else nothing.
fn disk(r: &StepRow) -> String {
    let peak = r.peak_disk.iter().copied().max().unwrap_or(0);
    if peak > 0 {
        format!("  disk {:.1} GiB", gib(peak))
    } else {
        String::new()
    }
}

pub fn print_progress(r: &StepRow, steps: usize, secs_per_step: f64) {
    let eta = secs_per_step * (steps as u64 - r.step) as f64;
    // GPU runs also show the ALST-convention rate and the worst rank's peak GPU and host memory.
    let peak_gpu = r.peak_gpu_mem.iter().copied().max().unwrap_or(0);
    let per = if peak_gpu > 0 { "GPU" } else { "rank" };
    let gpu = if peak_gpu > 0 {
        let peak_host = r.peak_host_mem.iter().copied().max().unwrap_or(0);
        format!(
            "  ALST {} TFLOP/s/GPU  peak {:.1} GiB  host {:.1} GiB{}",
            sig3(r.tflops_alst),
            gib(peak_gpu),
            gib(peak_host),
            disk(r)
        )
    } else {
        disk(r)
    };
    // MFU only against a known peak (NaN otherwise: CPU runs, unknown GPUs).
    let mfu = if r.mfu.is_finite() { format!("  MFU {}%", sig3(100.0 * r.mfu)) } else { String::new() };
    println!(
        "{}  step {:>5}/{steps}  loss {:.4}  lr {:.2e}  grad_norm {:.3}  {:.1} tok/s  {:.2} s/step  {} TFLOP/s/{per}{mfu}{gpu}  eta {}",
        now(),
        r.step,
        r.loss,
        r.lr,
        r.grad_norm,
        r.tokens_per_s,
        r.step_time,
        sig3(r.tflops),
        eta_text(eta)
    );
}

/// A memory-fit run's line: what it proves (the step's memory), never a speed.
pub fn print_memory_fit(r: &StepRow, steps: usize) {
    println!(
        "{}  memory-fit step {}/{steps} completed (attention in the last layer only: not a speed or loss figure)  peak GPU {:.1} GiB  peak host {:.1} GiB/rank{}",
        now(),
        r.step,
        gib(r.peak_gpu_mem.iter().copied().max().unwrap_or(0)),
        gib(r.peak_host_mem.iter().copied().max().unwrap_or(0)),
        disk(r),
    );
}

/// The synchronised time split of a profiled step (`[metrics] time_split_every`).
pub fn print_time_split(step: usize, s: &super::profile::TimeSplit) {
    println!(
        "{}  step {step:>5} time split (synchronised): attention {:.2} s  other compute {:.2} s  communication {:.2} s  waiting {:.2} s",
        now(),
        s.attention, s.compute, s.comm, s.wait
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

/// Three significant digits: 412, 41.2, 4.12, 0.00412 (a CPU run's TFLOP/s is not 0.0).
pub(crate) fn sig3(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let decimals = (2 - v.abs().log10().floor() as i32).max(0) as usize;
    format!("{v:.decimals$}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eta_and_three_digits() {
        assert_eq!(eta_text(42.4), "42 s");
        assert_eq!(eta_text(3725.0), "62m05s");
        assert_eq!(eta_text(7300.0), "2h01m");
        assert_eq!(sig3(412.34), "412");
        assert_eq!(sig3(4.1234), "4.12");
        assert_eq!(sig3(0.0041234), "0.00412");
        assert_eq!(sig3(0.0), "0");
    }
}
