//! The communication stream: one CUDA stream per GPU beside the compute stream (torch's current
//! one), so that a transfer runs while kernels compute (ring attention's next K/V block during
//! this hop's attention). Reached through shim/transfer.cpp.
//!
//! Ordering and memory, for work on it that reads and writes GPU tensors: [`after_current`] makes
//! the stream wait for the work queued on the compute stream so far (the tensors sent have been
//! produced, and the memory received into is no longer used by its previous tenant), and
//! [`done`] marks the tensors as used on the communication stream (torch's caching allocator then
//! reuses none of their memory before the stream is past the work, whenever they are dropped)
//! and returns an event the compute stream waits on ([`CopyEvent::wait`]) before reading what
//! arrived. Nothing may write the tensors in place before that event.
use super::transfer::{event, CopyEvent, TransferError};
use super::{check, ShimError};
use std::ffi::{c_char, c_int, c_void};
use tch::Tensor;
use torch_sys::C_tensor;

extern "C" {
    fn ulysses_comm_stream(dev: c_int, stream: *mut *mut c_void) -> *mut c_char;
    fn ulysses_comm_stream_after_current(dev: c_int, stream: *mut *mut c_void) -> *mut c_char;
    fn ulysses_comm_stream_done(
        dev: c_int,
        tensors: *const *const C_tensor,
        n: c_int,
        event: *mut *mut c_void,
    ) -> *mut c_char;
}

/// GPU `gpu`'s communication stream (`cudaStream_t`), after the work queued on this thread's
/// compute stream so far.
pub fn after_current(gpu: usize) -> Result<*mut c_void, TransferError> {
    let op = "ordering the communication stream";
    // SAFETY: the shim writes the out-parameter or returns an error, catching every exception.
    native(op, |stream| unsafe { ulysses_comm_stream_after_current(gpu as c_int, stream) })
}

/// GPU `gpu`'s communication stream (`cudaStream_t`), ordered after nothing new: for following
/// the work already queued there.
pub fn current(gpu: usize) -> Result<*mut c_void, TransferError> {
    // SAFETY: the shim writes the out-parameter or returns an error, catching every exception.
    native("reading the communication stream", |stream| unsafe { ulysses_comm_stream(gpu as c_int, stream) })
}

/// The stream a shim call `call` writes through its out-parameter, or its error.
fn native(op: &'static str, call: impl FnOnce(*mut *mut c_void) -> *mut c_char) -> Result<*mut c_void, TransferError> {
    let mut stream = std::ptr::null_mut();
    check(op, call(&mut stream))?;
    if stream.is_null() {
        return Err(ShimError { op, message: "torch gave no native stream".to_string() }.into());
    }
    Ok(stream)
}

/// After work enqueued on GPU `gpu`'s communication stream that uses `tensors` (on that GPU):
/// their memory marked as used there, and the event that completes with the work.
pub fn done(gpu: usize, tensors: &[&Tensor]) -> Result<CopyEvent, TransferError> {
    let op = "recording the communication stream";
    let handles: Vec<*const C_tensor> = tensors.iter().map(|t| t.as_ptr() as *const C_tensor).collect();
    let mut raw = std::ptr::null_mut();
    // SAFETY: `handles` are live tch handles borrowed for the call; the shim writes `raw` or
    // returns an error, catching every exception.
    check(op, unsafe { ulysses_comm_stream_done(gpu as c_int, handles.as_ptr(), handles.len() as c_int, &mut raw) })?;
    event(op, raw, gpu)
}
