//! Peak memory of this rank, for the metrics file.
use std::sync::atomic::{AtomicU64, Ordering};

static PEAK_HOST: AtomicU64 = AtomicU64::new(0);
/// The step's peak GPU allocation before the allocator's peak was last reset by `phase_peak_gpu`.
static PEAK_GPU_EARLIER: AtomicU64 = AtomicU64::new(0);

/// Peak resident set size of this process so far in bytes (VmHWM in /proc/self/status); 0 where
/// the kernel does not report it. The kernel updates its high-water mark lazily, so VmHWM can
/// read lower than an earlier reading; the running maximum here never does.
pub fn peak_host_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let now = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024);
    PEAK_HOST.fetch_max(now, Ordering::Relaxed).max(now)
}

/// (VmRSS, VmHWM) of this process now, bytes: resident and peak resident memory.
pub fn host_resident_and_peak() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Resets the kernel's peak resident memory (VmHWM) of this process to what is resident now, so
/// the peak of one operation can be measured (`echo 5 > /proc/self/clear_refs`). `peak_host_bytes`
/// keeps its own running maximum, so the metrics' peaks do not drop.
pub fn reset_host_peak() -> std::io::Result<()> {
    std::fs::write("/proc/self/clear_refs", "5")
}

/// Peak GPU memory allocated by this rank's caching allocator in bytes since the last
/// `reset_peak_gpu` (torch.cuda.max_memory_allocated); 0 on CPU runs.
pub fn peak_gpu_bytes(device: tch::Device) -> u64 {
    allocator_peak(device).max(PEAK_GPU_EARLIER.load(Ordering::Relaxed))
}

fn allocator_peak(device: tch::Device) -> u64 {
    match device {
        tch::Device::Cuda(i) => crate::ffi::cuda::memory(i).map_or(0, |m| m.peak_allocated as u64),
        _ => 0,
    }
}

/// Starts a new peak window (each step reports its own peak).
pub fn reset_peak_gpu(device: tch::Device) {
    if let tch::Device::Cuda(i) = device {
        PEAK_GPU_EARLIER.store(0, Ordering::Relaxed);
        crate::ffi::cuda::reset_peak(i);
    }
}

/// (peak since the last phase ended, allocated now) in bytes, and a new phase begins; the step's
/// peak (`peak_gpu_bytes`) still covers every phase. Where the working set peaks, for debugging
/// and for calibrating the memory plan. (0, 0) on CPU runs.
pub fn phase_peak_gpu(device: tch::Device) -> (u64, u64) {
    let tch::Device::Cuda(i) = device else { return (0, 0) };
    let Some(m) = crate::ffi::cuda::memory(i) else { return (0, 0) };
    PEAK_GPU_EARLIER.fetch_max(m.peak_allocated as u64, Ordering::Relaxed);
    crate::ffi::cuda::reset_peak(i);
    (m.peak_allocated as u64, m.allocated as u64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn peak_rss_is_reported_on_linux() {
        let before = super::peak_host_bytes();
        let v = vec![1u8; 64 << 20];
        assert!(v.iter().map(|&b| b as u64).sum::<u64>() == 64 << 20);
        let after = super::peak_host_bytes();
        assert!(before > 0 && after >= before + (32 << 20), "{before} -> {after}");
    }
}
