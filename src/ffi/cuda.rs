//! libtorch's CUDA device and current stream, through the C++ shim (tch 0.24 exposes neither).
//! NCCL work goes on torch's current stream so it is ordered with torch kernels without host syncs.
use std::ffi::{c_int, c_void};

extern "C" {
    fn ulysses_set_sdp_backends(flash: c_int, mem_efficient: c_int, math: c_int, cudnn: c_int);
    fn ulysses_cuda_set_device(idx: c_int) -> c_int;
    fn ulysses_cuda_current_stream(idx: c_int) -> *mut c_void;
}

/// Which fused attention kernels SDPA may choose from (torch.backends.cuda.enable_*_sdp).
pub fn set_sdp_backends(flash: bool, mem_efficient: bool, math: bool, cudnn: bool) {
    // SAFETY: plain setters on libtorch's global context.
    unsafe { ulysses_set_sdp_backends(flash as c_int, mem_efficient as c_int, math as c_int, cudnn as c_int) };
}

/// GPUs torch sees in this process (0 without a driver or with a CPU-only libtorch).
pub fn device_count() -> usize {
    tch::Cuda::device_count().max(0) as usize
}

/// torch.cuda.set_device(idx): later allocations and NCCL communicators bind to this GPU.
/// False when torch cannot select it.
pub fn set_device(idx: usize) -> bool {
    // SAFETY: the shim catches every C++ exception and reports failure as -1.
    unsafe { ulysses_cuda_set_device(idx as c_int) == 0 }
}

/// The native `cudaStream_t` of torch's current stream on GPU `idx` (null is the legacy default
/// stream, a valid stream); None when CUDA is unavailable.
pub fn current_stream(idx: usize) -> Option<*mut c_void> {
    // SAFETY: the shim catches every C++ exception and reports failure as (void*)-1.
    let s = unsafe { ulysses_cuda_current_stream(idx as c_int) };
    (s as isize != -1).then_some(s)
}

extern "C" {
    fn ulysses_cuda_memory(dev: c_int, allocated: *mut i64, peak_allocated: *mut i64, peak_reserved: *mut i64)
        -> c_int;
    fn ulysses_cuda_reset_peak(dev: c_int) -> c_int;
}

/// torch's caching-allocator view of one GPU, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MemoryStats {
    pub allocated: i64,
    pub peak_allocated: i64,
    pub peak_reserved: i64,
}

/// Memory statistics of GPU `idx` since the last `reset_peak` (None without CUDA).
pub fn memory(idx: usize) -> Option<MemoryStats> {
    let mut m = MemoryStats::default();
    // SAFETY: the shim writes the three out-parameters or returns -1, catching every exception.
    let rc =
        unsafe { ulysses_cuda_memory(idx as c_int, &mut m.allocated, &mut m.peak_allocated, &mut m.peak_reserved) };
    (rc == 0).then_some(m)
}

/// Starts a new peak-memory window on GPU `idx`.
pub fn reset_peak(idx: usize) {
    // SAFETY: the shim catches every exception.
    unsafe { ulysses_cuda_reset_peak(idx as c_int) };
}

/// The CUDA context current on this thread for driver-API calls on GPU `gpu`: libtorch has made
/// the GPU's primary context current on the training thread by now (the plan's collectives ran
/// there); where it has not, the primary context is made current, as torch uses the same one.
pub(crate) fn current_context(gpu: usize) -> Result<cudarc::driver::sys::CUcontext, String> {
    use cudarc::driver::result;
    if let Some(ctx) = result::ctx::get_current().map_err(|e| e.to_string())? {
        return Ok(ctx);
    }
    let device = result::device::get(gpu as c_int).map_err(|e| format!("cuDeviceGet: {e}"))?;
    // SAFETY: `device` came from cuDeviceGet; the primary context is retained for the process
    // (torch uses the same one).
    unsafe {
        let ctx = result::primary_ctx::retain(device).map_err(|e| format!("cuDevicePrimaryCtxRetain: {e}"))?;
        result::ctx::set_current(ctx).map_err(|e| format!("cuCtxSetCurrent: {e}"))?;
        Ok(ctx)
    }
}

/// A CUDA stream of GPU `gpu` (`raw` is its `cudaStream_t`; null is the legacy default stream).
#[derive(Debug, Clone, Copy)]
pub struct Stream {
    pub gpu: usize,
    pub raw: *mut c_void,
}

/// A CUDA event without timing (the cheapest kind), recorded on a stream to learn from another
/// thread, without waiting, whether the stream has reached it.
pub struct Event {
    raw: cudarc::driver::sys::CUevent,
    /// The context it was made in: a thread that asks must have it current.
    ctx: cudarc::driver::sys::CUcontext,
}

// SAFETY: an event and its context are driver handles usable from any thread (the watchdog asks
// from its own); `done` makes the context current on the asking thread first.
unsafe impl Send for Event {}

impl Event {
    pub fn new(gpu: usize) -> Result<Event, String> {
        use cudarc::driver::{result, sys::CUevent_flags};
        let ctx = current_context(gpu)?;
        let raw =
            result::event::create(CUevent_flags::CU_EVENT_DISABLE_TIMING).map_err(|e| format!("cuEventCreate: {e}"))?;
        Ok(Event { raw, ctx })
    }

    /// Marks the point `stream` has reached in its queue (again, for a reused event).
    pub fn record(&mut self, stream: Stream) -> Result<(), String> {
        // SAFETY: `raw` is a live event of this stream's context; a recorded event may be
        // recorded again (the newer record replaces the older).
        unsafe { cudarc::driver::result::event::record(self.raw, stream.raw as _) }
            .map_err(|e| format!("cuEventRecord: {e}"))
    }

    /// Whether the stream has run past the last record (never waits). A thread without a current
    /// context (the watchdog's) takes the event's. An error (a context broken by a fault) counts
    /// as not done: the GPU never confirmed the work.
    pub fn done(&self) -> bool {
        use cudarc::driver::result;
        if matches!(result::ctx::get_current(), Ok(None)) {
            // SAFETY: `ctx` is the retained primary context the event was made in.
            let _ = unsafe { result::ctx::set_current(self.ctx) };
        }
        // SAFETY: `raw` is a live event.
        unsafe { result::event::query(self.raw) }.is_ok()
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: `raw` came from cuEventCreate and is destroyed once, here; the driver releases
        // it when work recorded on it is done.
        let _ = unsafe { cudarc::driver::result::event::destroy(self.raw) };
    }
}

/// A fp32 CPU tensor of zeros page-locked for GPU `gpu`'s DMA engines (cuMemHostRegister), so
/// that copies between it and the GPU run at full PCIe speed instead of through the driver's
/// pageable staging. The model state in host memory (`parallel::zero`) is registered rather
/// than allocated pinned: torch's pinned allocator rounds every block up to a power of two,
/// which would nearly double a large unit. The tensor lies on whole pages of an allocation of
/// its own (a view two pages into a slightly larger one), and only those pages are registered:
/// two registrations never share a page, which the driver refuses. The registration must be
/// dropped before the tensor.
pub fn pinned_zeros(len: i64, gpu: usize) -> Result<(tch::Tensor, HostRegistration), String> {
    const PAGE: usize = 4096;
    let padded = tch::Tensor::zeros([len + 2 * (PAGE / 4) as i64], (tch::Kind::Float, tch::Device::Cpu));
    let skip = (PAGE - padded.data_ptr() as usize % PAGE) % PAGE / 4;
    let t = padded.narrow(0, skip as i64, len);
    let bytes = (len as usize * 4).div_ceil(PAGE) * PAGE;
    let registration = HostRegistration::register(t.data_ptr(), bytes, gpu)?;
    Ok((t, registration))
}

/// A page-locked range of host memory; unregistered on drop.
pub struct HostRegistration {
    ptr: *mut c_void,
}

// SAFETY: the registration is a handle to a driver-side record; unregistering it from another
// thread is allowed by the driver API.
unsafe impl Send for HostRegistration {}

impl HostRegistration {
    /// Page-locks `bytes` bytes at `ptr` (whole pages) for GPU `gpu`.
    fn register(ptr: *mut c_void, bytes: usize, gpu: usize) -> Result<HostRegistration, String> {
        use cudarc::driver::sys;
        current_context(gpu)?;
        // SAFETY: the caller owns `bytes` bytes at `ptr` and keeps them allocated until this
        // registration is dropped.
        unsafe { sys::cuMemHostRegister_v2(ptr, bytes, 0) }
            .result()
            .map_err(|e| format!("cuMemHostRegister of {} MiB: {e}", bytes >> 20))?;
        Ok(HostRegistration { ptr })
    }
}

impl Drop for HostRegistration {
    fn drop(&mut self) {
        // SAFETY: `ptr` was registered by `register` and is still allocated.
        let _ = unsafe { cudarc::driver::sys::cuMemHostUnregister(self.ptr) };
    }
}
