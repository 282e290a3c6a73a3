//! What the memory plan may use on one rank: `[memory]` when set, else measured at start (the GPU's
//! size through the CUDA driver, MemAvailable, the offload folder's free space), less reserves.
use crate::config::MemoryConfig;
use crate::units::GIB;
use std::path::{Path, PathBuf};

/// GPU memory outside what the estimate counts: the CUDA context with libtorch's cuBLAS and cuDNN
/// handles and workspaces (about 1 GiB on an H100 with CUDA 13), NCCL's buffers for the world, sp
/// and dp communicators (up to about 1 GiB), and slack for the caching allocator, which holds
/// more than it has allocated (the estimate counts allocated bytes).
pub const GPU_RESERVE: f64 = 3.0 * GIB;
/// Host memory each rank needs beyond the plan and does not hold yet when it measures
/// MemAvailable: the data loader's prefetch, MPI's and NCCL's host buffers, pinned staging, and
/// the growth of libtorch's and CUDA's own allocations. Measured: 5.9 GiB of peak resident memory
/// beyond the plan's host items (Llama-3.1-8B, sp = 2, optimizer in host memory, 2026-11-26).
pub const HOST_RESERVE_PER_RANK: f64 = 8.0 * GIB;
/// Free space left on the offload folder's file system (per node) for everything else that
/// writes there.
pub const DISK_RESERVE: f64 = 2.0 * GIB;

/// Bytes one rank may use; `f64::INFINITY` where nothing limits (a CPU run, or a file system
/// whose free space cannot be read).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// torch's allocator on this rank's GPU.
    pub gpu: f64,
    /// Host memory for this rank's offloaded state (its share of the node's).
    pub host: f64,
    /// Disk space in `memory.offload_dir` for this rank's offloaded layer inputs.
    pub disk: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    #[error("cannot read the size of GPU {gpu} through the CUDA driver ({message}); set memory.gpu_gib (GiB per GPU)")]
    Gpu { gpu: usize, message: String },
    #[error("cannot read MemAvailable from /proc/meminfo ({message}); set memory.host_gib (GiB per node)")]
    Host { message: String },
}

impl Budget {
    pub const UNLIMITED: Budget = Budget { gpu: f64::INFINITY, host: f64::INFINITY, disk: f64::INFINITY };

    /// `gpu_gib` per GPU; host and disk GiB per node, shared by `ranks_per_node` ranks (disk None:
    /// unlimited). No reserves: the numbers are what the plan may use.
    pub fn from_gib(gpu_gib: f64, host_gib: f64, disk_gib: Option<f64>, ranks_per_node: usize) -> Budget {
        let ranks = ranks_per_node.max(1) as f64;
        Budget {
            gpu: gpu_gib * GIB,
            host: host_gib * GIB / ranks,
            disk: disk_gib.map_or(f64::INFINITY, |d| d * GIB / ranks),
        }
    }

    /// The budget of a rank on GPU `gpu` (None: a CPU run, which has none) among `ranks_per_node`
    /// ranks of its node, `ranks_per_gpu` of them on its GPU (`ULYSSES_RANKS_PER_GPU`; 1 for one
    /// rank per GPU): `memory.gpu_gib` or the GPU's total memory less one `GPU_RESERVE` per rank
    /// on it, shared by those ranks;
    /// `memory.host_gib` per node or MemAvailable now, shared by the node's ranks, less
    /// `HOST_RESERVE_PER_RANK`; the free space of `memory.offload_dir` (the system temp folder
    /// when empty) less `DISK_RESERVE`, shared likewise, or unlimited when it cannot be read.
    ///
    /// A CPU run has no GPU and its working memory is unplanned; only its model state is
    /// placed: in memory, within `memory.host_gib` when that is set, the rest in the offload
    /// folder, within its free space.
    pub fn measure(
        memory: &MemoryConfig,
        gpu: Option<usize>,
        ranks_per_node: usize,
        ranks_per_gpu: usize,
    ) -> Result<Budget, BudgetError> {
        let ranks = ranks_per_node.max(1) as f64;
        let sharing = ranks_per_gpu.max(1) as f64;
        let disk =
            free_disk_bytes(&memory.offload_dir()).map_or(f64::INFINITY, |free| (free - DISK_RESERVE).max(0.0) / ranks);
        let Some(gpu) = gpu else {
            let host = if memory.host_gib > 0.0 { memory.host_gib * GIB / ranks } else { f64::INFINITY };
            return Ok(Budget { gpu: f64::INFINITY, host, disk });
        };
        // Each rank sharing the GPU has its own CUDA context, NCCL buffers and allocator slack.
        let gpu_bytes = if memory.gpu_gib > 0.0 {
            memory.gpu_gib * GIB / sharing
        } else {
            let total = gpu_total_bytes(gpu)?;
            log::info!(
                "memory budget: GPU {gpu} has {:.1} GiB; {:.1} GiB of it stay outside the plan (CUDA context, NCCL, allocator slack{})",
                total / GIB,
                sharing * GPU_RESERVE / GIB,
                if ranks_per_gpu > 1 { format!(" of each of its {ranks_per_gpu} ranks") } else { String::new() }
            );
            (total - sharing * GPU_RESERVE).max(0.0) / sharing
        };
        if ranks_per_gpu > 1 {
            log::info!(
                "memory budget: {ranks_per_gpu} ranks share GPU {gpu}: {:.1} GiB of it for each rank's plan",
                gpu_bytes / GIB
            );
        }
        let host = if memory.host_gib > 0.0 {
            memory.host_gib * GIB / ranks
        } else {
            let available = mem_available_bytes()?;
            log::info!(
                "memory budget: MemAvailable {:.1} GiB on this node, shared by {ranks_per_node} rank(s), each keeping {:.1} GiB for itself",
                available / GIB,
                HOST_RESERVE_PER_RANK / GIB
            );
            (available / ranks - HOST_RESERVE_PER_RANK).max(0.0)
        };
        Ok(Budget { gpu: gpu_bytes, host, disk })
    }

    /// The smaller of each part.
    pub fn min(self, other: Budget) -> Budget {
        Budget { gpu: self.gpu.min(other.gpu), host: self.host.min(other.host), disk: self.disk.min(other.disk) }
    }
}

/// The driver's handle of GPU `gpu` (the ordinal torch uses: both see CUDA_VISIBLE_DEVICES).
fn cuda_device(gpu: usize) -> Result<cudarc::driver::sys::CUdevice, BudgetError> {
    use cudarc::driver::{result, sys};
    let failed = |message: String| BudgetError::Gpu { gpu, message };
    // cudarc panics when it cannot dlopen libcuda, and the launcher turns a panic into an
    // MPI_Abort without this message; so ask first.
    // SAFETY: only tries to dlopen the driver library's names and closes what it opened.
    if !unsafe { sys::is_culib_present() } {
        return Err(failed("cannot load the CUDA driver library libcuda.so".into()));
    }
    result::init().map_err(|e| failed(format!("cuInit: {e}")))?;
    result::device::get(gpu as std::ffi::c_int).map_err(|e| failed(format!("cuDeviceGet: {e}")))
}

/// The name CUDA reports for GPU `gpu` ("NVIDIA H100 80GB HBM3"), for the MFU peak.
pub fn gpu_name(gpu: usize) -> Result<String, BudgetError> {
    let device = cuda_device(gpu)?;
    cudarc::driver::result::device::get_name(device)
        .map_err(|e| BudgetError::Gpu { gpu, message: format!("cuDeviceGetName: {e}") })
}

/// cuDeviceTotalMem of GPU `gpu`.
fn gpu_total_bytes(gpu: usize) -> Result<f64, BudgetError> {
    use cudarc::driver::result;
    let failed = |message: String| BudgetError::Gpu { gpu, message };
    let device = cuda_device(gpu)?;
    // SAFETY: `device` came from cuDeviceGet after cuInit.
    let total = unsafe { result::device::total_mem(device) }.map_err(|e| failed(format!("cuDeviceTotalMem: {e}")))?;
    Ok(total as f64)
}

fn mem_available_bytes() -> Result<f64, BudgetError> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").map_err(|e| BudgetError::Host { message: e.to_string() })?;
    parse_mem_available(&meminfo).ok_or_else(|| BudgetError::Host { message: "no MemAvailable line".into() })
}

/// The `MemAvailable:  123456 kB` line of /proc/meminfo, in bytes.
fn parse_mem_available(meminfo: &str) -> Option<f64> {
    let kb = meminfo.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?.trim().strip_suffix("kB")?.trim();
    kb.parse::<u64>().ok().map(|kb| kb as f64 * 1024.0)
}

/// Bytes an unprivileged process may still write on the file system holding `dir` (or its
/// nearest existing ancestor: the folder may be made later); None when statvfs cannot tell.
pub fn free_disk_bytes(dir: &Path) -> Option<f64> {
    use std::os::unix::ffi::OsStrExt;
    let absolute = if dir.is_absolute() { dir.to_path_buf() } else { std::env::current_dir().ok()?.join(dir) };
    let existing: PathBuf = absolute.ancestors().find(|p| p.exists())?.to_path_buf();
    let path = std::ffi::CString::new(existing.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `path` is NUL-terminated and `stat` is writable memory of the struct statvfs fills.
    if unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled `stat` (which started zeroed anyway).
    let stat = unsafe { stat.assume_init() };
    Some(stat.f_bavail as f64 * stat.f_frsize as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_available_is_read_in_bytes() {
        let meminfo = "MemTotal:       16303204 kB\nMemFree:         1000 kB\nMemAvailable:    2048 kB\n";
        assert_eq!(parse_mem_available(meminfo), Some(2048.0 * 1024.0));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn measured_budgets_are_shared_by_the_node_and_cpu_runs_have_none() {
        let cpu = Budget::measure(&MemoryConfig::default(), None, 8, 1).unwrap();
        assert_eq!((cpu.gpu, cpu.host), (f64::INFINITY, f64::INFINITY));
        let cpu = Budget::measure(&MemoryConfig { host_gib: 16.0, ..MemoryConfig::default() }, None, 8, 1).unwrap();
        assert_eq!(cpu.host, 2.0 * GIB);
        let set = MemoryConfig { gpu_gib: 70.0, host_gib: 400.0, offload_dir: "/".into() };
        let b = Budget::measure(&set, Some(0), 8, 1).unwrap();
        assert_eq!((b.gpu, b.host), (70.0 * GIB, 50.0 * GIB));
        // Ranks sharing a GPU (ULYSSES_RANKS_PER_GPU) share its budget; the node's host budget
        // was already shared by all of its ranks.
        let shared = Budget::measure(&set, Some(0), 8, 4).unwrap();
        assert_eq!((shared.gpu, shared.host), (17.5 * GIB, 50.0 * GIB));
        let free = free_disk_bytes(Path::new("/")).unwrap();
        // The reserve is kept back first; a nearly full disk (CI machines have had < 1 GiB free)
        // leaves nothing, never a negative budget.
        let expected = (free - DISK_RESERVE).max(0.0) / 8.0;
        assert!(b.disk >= 0.0 && (b.disk - expected).abs() * 8.0 < GIB, "{b:?}, {free} B free");
        // A folder not made yet is measured on its nearest existing ancestor.
        assert!(free_disk_bytes(Path::new("/tmp/no/such/folder/yet")).is_some());
    }
}
