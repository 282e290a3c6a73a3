//! Peak memory of this rank, for the metrics file.
use std::sync::atomic::{AtomicU64, Ordering};

static PEAK_HOST: AtomicU64 = AtomicU64::new(0);

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

/// Peak GPU memory allocated by this rank's caching allocator in bytes since the last
/// `reset_peak_gpu` (torch.cuda.max_memory_allocated); 0 on CPU runs.
pub fn peak_gpu_bytes(device: tch::Device) -> u64 {
    match device {
        tch::Device::Cuda(i) => crate::cuda::memory(i).map_or(0, |m| m.peak_allocated as u64),
        _ => 0,
    }
}

/// Starts a new peak window (each step reports its own peak).
pub fn reset_peak_gpu(device: tch::Device) {
    if let tch::Device::Cuda(i) = device {
        crate::cuda::reset_peak(i);
    }
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
