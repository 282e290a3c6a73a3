//! Rank 0's line per step, each starting with its UTC time stamp.
use super::profile::{KernelSplit, PhaseSplit, StepProfile};
use super::row::StepRow;
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
    // The held-out loss on the steps that evaluate it (`train.eval_every`).
    let eval = if r.eval_loss.is_finite() { format!("  eval_loss {:.4}", r.eval_loss) } else { String::new() };
    // MFU only against a known peak (NaN otherwise: CPU runs, unknown GPUs).
    let mfu = if r.mfu.is_finite() { format!("  MFU {}%", sig3(100.0 * r.mfu)) } else { String::new() };
    println!(
        "{}  step {:>5}/{steps}  loss {:.4}{eval}  lr {:.2e}  grad_norm {:.3}  {:.1} tok/s  {:.2} s/step  {} TFLOP/s/{per}{mfu}{gpu}  eta {}",
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

/// What a measured step found (`[metrics] time_split_every`): the synchronised split by region,
/// and on a GPU the kernel time by kind, overall and per phase summed over the layers (each
/// layer's own rows at debug level), and the longest kernels by name.
pub fn print_time_split(step: usize, p: &StepProfile) {
    let s = &p.split;
    println!(
        "{}  step {step:>5} time split (synchronised): attention {:.2} s  other compute {:.2} s  communication {:.2} s  waiting {:.2} s",
        now(),
        s.attention, s.compute, s.comm, s.wait
    );
    let Some(k) = &p.kernels else { return };
    println!(
        "step {step:>5} GPU kernels: matmul {:.2} s  attention {:.2} s  elementwise {:.2} s  copies {:.2} s  NCCL {:.2} s",
        k.matmul, k.attention, k.elementwise, k.copy, k.comm
    );
    println!(
        "           {:<44} {:>5} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "phase (summed over layers)", "n", "wall s", "matmul", "attn", "elemwise", "copies", "NCCL"
    );
    for (phase, n, wall, k) in by_layerless_phase(&p.phases) {
        println!(
            "           {phase:<44} {n:>5} {wall:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3}",
            k.matmul, k.attention, k.elementwise, k.copy, k.comm
        );
    }
    for k in p.by_name.iter().take(TOP_KERNELS) {
        println!(
            "step {step:>5} kernel {:>8.3} s {:>7} calls  {:<11} {}",
            k.secs,
            k.calls,
            k.kind,
            short_kernel_name(&k.name)
        );
    }
    for x in &p.phases {
        let k = &x.kernels;
        log::debug!(
            "step {step} phase {}: wall {:.4} s, matmul {:.4}, attention {:.4}, elementwise {:.4}, copies {:.4}, NCCL {:.4}",
            x.phase, x.wall, k.matmul, k.attention, k.elementwise, k.copy, k.comm
        );
    }
}

/// How many kernels by name a measured step prints (the rest are each a small share).
const TOP_KERNELS: usize = 30;

/// A kernel's name on one line: CUDA's template names run to hundreds of characters; the
/// return type goes and the rest is cut where the functor that tells kernels apart has shown.
fn short_kernel_name(name: &str) -> String {
    let name = name.strip_prefix("void ").unwrap_or(name);
    name.chars().take(160).collect()
}

/// Phases with the layer number taken out ("forward layer 3 / attention" -> "forward layer * /
/// attention"), summed, in order of first appearance: (phase, count, wall, kernels).
fn by_layerless_phase(phases: &[PhaseSplit]) -> Vec<(String, usize, f64, KernelSplit)> {
    let mut out: Vec<(String, usize, f64, KernelSplit)> = Vec::new();
    for x in phases {
        let key = layerless(&x.phase);
        let i = match out.iter().position(|(k, ..)| *k == key) {
            Some(i) => i,
            None => {
                out.push((key, 0, 0.0, KernelSplit::default()));
                out.len() - 1
            }
        };
        let (_, n, wall, k) = &mut out[i];
        *n += 1;
        *wall += x.wall;
        k.matmul += x.kernels.matmul;
        k.attention += x.kernels.attention;
        k.elementwise += x.kernels.elementwise;
        k.copy += x.kernels.copy;
        k.comm += x.kernels.comm;
    }
    out
}

fn layerless(phase: &str) -> String {
    let mut out = String::new();
    let mut rest = phase;
    while let Some(i) = rest.find("layer ") {
        out.push_str(&rest[..i + "layer ".len()]);
        rest = rest[i + "layer ".len()..].trim_start_matches(|c: char| c.is_ascii_digit());
        out.push('*');
    }
    out + rest
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
    fn phases_are_summed_over_layers() {
        let phase = |name: &str, wall: f64| PhaseSplit {
            phase: name.into(),
            wall,
            kernels: KernelSplit { matmul: wall / 2.0, ..KernelSplit::default() },
        };
        let rows = by_layerless_phase(&[
            phase("forward layer 0 / attention", 1.0),
            phase("forward layer 1 / attention", 2.0),
            phase("head and loss", 4.0),
            phase("backward layer 12 / attention", 8.0),
        ]);
        let summary: Vec<(&str, usize, f64)> = rows.iter().map(|(p, n, w, _)| (p.as_str(), *n, *w)).collect();
        assert_eq!(
            summary,
            [
                ("forward layer * / attention", 2, 3.0),
                ("head and loss", 1, 4.0),
                ("backward layer * / attention", 1, 8.0)
            ]
        );
        assert_eq!(rows[0].3.matmul, 1.5);
    }

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
