//! Copies between GPU memory and pinned host memory on a side stream (one per GPU, from torch's
//! stream pool), so offloading activations overlaps the kernels on the current ("compute") stream.
//! Reached through shim/transfer.cpp; tch 0.24 exposes neither streams nor events.
//!
//! Ordering: a copy starts after the work queued on the compute stream when it was issued (an event
//! recorded there, waited on by the side stream), and returns a [`CopyEvent`] recorded on the side
//! stream after it. [`CopyEvent::wait`] makes the compute stream wait for it (no host sync);
//! [`CopyEvent::synchronize`] makes the host wait (before reading the bytes on the CPU). Memory:
//! the GPU buffer and the pinned buffer of a copy are both marked as used by the side stream, so
//! torch's caching allocators do not reuse either until the copy is done, even when the caller
//! drops its tensors at once. The caller must not modify either tensor in place before the copy's
//! event has completed. On a CPU device every function is a plain no-op move.
use super::{check, ShimError};
use std::ffi::{c_char, c_int, c_void};
use tch::kind::Element;
use tch::{Device, Tensor};
use torch_sys::C_tensor;

extern "C" {
    fn ulysses_event_record_current(dev: c_int, event: *mut *mut c_void) -> *mut c_char;
    fn ulysses_event_block_current(event: *mut c_void, dev: c_int) -> *mut c_char;
    fn ulysses_event_synchronize(event: *mut c_void, dev: c_int) -> *mut c_char;
    fn ulysses_event_query(event: *mut c_void, dev: c_int, done: *mut c_int) -> *mut c_char;
    fn ulysses_event_destroy(event: *mut c_void, dev: c_int);
    fn ulysses_empty_pinned_like(like: *const C_tensor, out: *mut *mut C_tensor) -> *mut c_char;
    fn ulysses_side_copy(
        dst: *const C_tensor,
        src: *const C_tensor,
        after: *mut c_void,
        dev: c_int,
        done: *mut *mut c_void,
    ) -> *mut c_char;
}

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error(transparent)]
    Shim(#[from] ShimError),
    #[error("{op}: expected {expected}, found {found}")]
    Mismatch { op: &'static str, expected: String, found: String },
}

/// A libtorch failure of `op` reported without the shim (a tch call, or a result the shim left empty).
fn torch(op: &'static str, message: impl ToString) -> TransferError {
    TransferError::Shim(ShimError { op, message: message.to_string() })
}

/// A recorded event from the shim; null would mean it failed without a message (strdup failing).
pub(super) fn event(op: &'static str, raw: *mut c_void, dev: usize) -> Result<CopyEvent, TransferError> {
    if raw.is_null() {
        return Err(torch(op, "the shim returned no event"));
    }
    Ok(CopyEvent { raw, device: dev as c_int })
}

/// Completion of a copy (or any point on a GPU stream): a CUDA event, destroyed on drop. On a
/// CPU device there is nothing to wait for and every method returns at once.
#[derive(Debug)]
pub struct CopyEvent {
    /// cudaEvent_t; null: already complete.
    raw: *mut c_void,
    device: c_int,
}

// SAFETY: a CUDA event may be waited on, queried and destroyed from any thread; the shim selects
// the event's device before each call, and `CopyEvent` is not Clone, so it is destroyed once.
unsafe impl Send for CopyEvent {}

impl CopyEvent {
    /// An event that has already completed.
    pub fn complete() -> CopyEvent {
        CopyEvent { raw: std::ptr::null_mut(), device: -1 }
    }

    /// An event after all work queued so far on this thread's current stream of `device`.
    pub fn record_current(device: Device) -> Result<CopyEvent, TransferError> {
        let Device::Cuda(idx) = device else { return Ok(CopyEvent::complete()) };
        let mut raw = std::ptr::null_mut();
        // SAFETY: the shim writes the out-parameter or returns an error, catching every exception.
        check("recording an event", unsafe { ulysses_event_record_current(idx as c_int, &mut raw) })?;
        event("recording an event", raw, idx)
    }

    /// Makes this thread's current stream of the event's device wait for it, on the device: later
    /// kernels there see the copied bytes. The host does not wait.
    pub fn wait(&self) -> Result<(), TransferError> {
        if self.raw.is_null() {
            return Ok(());
        }
        // SAFETY: `raw` is a live event of `device` (destroyed only in Drop).
        Ok(check("waiting on a copy", unsafe { ulysses_event_block_current(self.raw, self.device) })?)
    }

    /// Blocks the calling thread until the event has completed (e.g. before writing the copied
    /// host bytes to a file).
    pub fn synchronize(&self) -> Result<(), TransferError> {
        if self.raw.is_null() {
            return Ok(());
        }
        // SAFETY: as in `wait`.
        Ok(check("synchronizing on a copy", unsafe { ulysses_event_synchronize(self.raw, self.device) })?)
    }

    /// Whether the event has completed, without waiting.
    pub fn is_complete(&self) -> Result<bool, TransferError> {
        if self.raw.is_null() {
            return Ok(true);
        }
        let mut done: c_int = 0;
        // SAFETY: as in `wait`; the shim writes `done` or returns an error.
        check("querying a copy", unsafe { ulysses_event_query(self.raw, self.device, &mut done) })?;
        Ok(done != 0)
    }
}

impl Drop for CopyEvent {
    fn drop(&mut self) {
        if !self.raw.is_null() {
            // SAFETY: `raw` was created by the shim for `device` and is destroyed only here. CUDA
            // defers the release while queued work still records or waits on it.
            unsafe { ulysses_event_destroy(self.raw, self.device) };
        }
    }
}

/// A new contiguous tensor in pinned host memory with the shape and kind of `like` (any device).
/// Needs CUDA.
pub fn empty_pinned_like(like: &Tensor) -> Result<Tensor, TransferError> {
    let op = "allocating pinned host memory";
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: `like` is a live tch handle (torch::Tensor*) borrowed for the call; on success the
    // shim returns a new heap-allocated torch::Tensor that we own.
    check(op, unsafe { ulysses_empty_pinned_like(like.as_ptr(), &mut out) })?;
    if out.is_null() {
        return Err(torch(op, "the shim returned no tensor"));
    }
    // SAFETY: `out` is a valid torch::Tensor* created with `new`, owned by the returned Tensor.
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// `dst.copy_(src)` on the side stream of the GPU that one of them lives on, after `after` (if
/// given); returns the event that completes with the copy. Both must be contiguous, of the same
/// shape and kind, one on a GPU and the other in host memory (pinned, for the copy to be
/// asynchronous). With both on the CPU the copy is done at once.
pub fn side_copy(dst: &Tensor, src: &Tensor, after: Option<&CopyEvent>) -> Result<CopyEvent, TransferError> {
    let op = "copy on the side stream";
    let mismatch = |expected: String, found: String| TransferError::Mismatch { op, expected, found };
    if dst.size() != src.size() || dst.kind() != src.kind() {
        return Err(mismatch(
            format!("the same shape and kind as the source {:?} {:?}", src.size(), src.kind()),
            format!("{:?} {:?}", dst.size(), dst.kind()),
        ));
    }
    if !dst.is_contiguous() || !src.is_contiguous() {
        return Err(mismatch("contiguous tensors".into(), "a strided one".into()));
    }
    let dev = match (dst.device(), src.device()) {
        (Device::Cpu, Device::Cpu) => {
            tch::no_grad(|| dst.shallow_clone().f_copy_(src)).map_err(|e| torch(op, e))?;
            return Ok(CopyEvent::complete());
        }
        (Device::Cuda(i), Device::Cpu) | (Device::Cpu, Device::Cuda(i)) => i,
        (d, s) => return Err(mismatch("one GPU and one host tensor".into(), format!("{d:?} and {s:?}"))),
    };
    let after = after.map_or(std::ptr::null_mut(), |e| e.raw);
    let mut raw = std::ptr::null_mut();
    // SAFETY: `dst` and `src` are live tch handles borrowed for the call; `after` is null or a live
    // event (borrowed, not destroyed by the shim); the shim writes `raw` or returns an error.
    check(op, unsafe { ulysses_side_copy(dst.as_ptr(), src.as_ptr(), after, dev as c_int, &mut raw) })?;
    event(op, raw, dev)
}

/// Starts copying GPU tensor `t` into new pinned host memory (contiguous, same shape and kind),
/// after the work already queued on the compute stream. A CPU tensor comes back as is.
pub fn to_host(t: &Tensor) -> Result<(Tensor, CopyEvent), TransferError> {
    let Device::Cuda(_) = t.device() else { return Ok((t.shallow_clone(), CopyEvent::complete())) };
    // A strided input becomes contiguous on the compute stream, before the event below.
    let src = tch::no_grad(|| t.f_contiguous()).map_err(|e| torch("copy to host", e))?;
    let host = empty_pinned_like(&src)?;
    let ready = CopyEvent::record_current(t.device())?;
    let done = side_copy(&host, &src, Some(&ready))?;
    Ok((host, done))
}

/// Starts copying host tensor `t` (pinned, for the copy to overlap) to a new tensor on GPU
/// `device`. The destination is allocated on the compute stream, and the side stream first waits
/// for the work already queued there (which may still use that memory's previous tenant). With
/// `device` the CPU, `t` comes back as is.
pub fn to_device(t: &Tensor, device: Device) -> Result<(Tensor, CopyEvent), TransferError> {
    if device == Device::Cpu && t.device() == Device::Cpu {
        return Ok((t.shallow_clone(), CopyEvent::complete()));
    }
    if t.device() != Device::Cpu {
        return Err(TransferError::Mismatch {
            op: "copy to device",
            expected: "a host tensor".into(),
            found: format!("{:?}", t.device()),
        });
    }
    let src = t.f_contiguous().map_err(|e| torch("copy to device", e))?;
    let dst = Tensor::f_empty(src.size(), (src.kind(), device)).map_err(|e| torch("copy to device", e))?;
    let ready = CopyEvent::record_current(device)?;
    let done = side_copy(&dst, &src, Some(&ready))?;
    Ok((dst, done))
}

/// The bytes of a contiguous host tensor.
pub fn host_bytes(t: &Tensor) -> &[u8] {
    assert!(t.device() == Device::Cpu && t.is_contiguous(), "host_bytes of a strided or device tensor");
    let n = t.numel() * t.kind().elt_size_in_bytes();
    if n == 0 {
        return &[];
    }
    // SAFETY: a contiguous CPU tensor's storage holds `numel × element size` bytes from
    // `data_ptr`, and it stays alive (and in place) while `t` is borrowed.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, n) }
}

/// The values of a contiguous host tensor of `T`'s kind.
pub fn host_values<T: Element>(t: &Tensor) -> &[T] {
    assert!(t.kind() == T::KIND, "host_values::<{:?}> of a {:?} tensor", T::KIND, t.kind());
    let bytes = host_bytes(t);
    if bytes.is_empty() {
        return &[];
    }
    // SAFETY: a tensor of T's kind holds `bytes.len() / size_of::<T>()` of them, aligned for T
    // (libtorch allocates 64-byte aligned blocks and views start on element boundaries).
    unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, bytes.len() / std::mem::size_of::<T>()) }
}

/// The values of a contiguous host tensor of `T`'s kind, to fill in place (as `host_bytes_mut`).
pub fn host_values_mut<T: Element>(t: &mut Tensor) -> &mut [T] {
    assert!(t.kind() == T::KIND, "host_values_mut::<{:?}> of a {:?} tensor", T::KIND, t.kind());
    let bytes = host_bytes_mut(t);
    if bytes.is_empty() {
        return &mut [];
    }
    // SAFETY: as in `host_values`; the exclusive borrow stands for exclusive use of the memory.
    unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr() as *mut T, bytes.len() / std::mem::size_of::<T>()) }
}

/// The bytes of a contiguous host tensor, to fill in place. The caller must hold the only use of
/// the tensor's memory for the borrow (no other thread reads or writes it meanwhile).
pub fn host_bytes_mut(t: &mut Tensor) -> &mut [u8] {
    assert!(t.device() == Device::Cpu && t.is_contiguous(), "host_bytes_mut of a strided or device tensor");
    let n = t.numel() * t.kind().elt_size_in_bytes();
    if n == 0 {
        return &mut [];
    }
    // SAFETY: as in `host_bytes`; the exclusive borrow of `t` stands for exclusive use of its memory.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut u8, n) }
}
