//! What libtorch offers that tch 0.24 does not expose, reached through the C++ shim (shim/*.cpp):
//! every `extern "C"` declaration of the crate lives in this folder, one file per subject (attention,
//! autograd, the communication stream, CUDA, the fused elementwise kernels, the optimizer, the
//! profiler, transfers; shim.cpp serves several of them), and every shim call reports failure the same way, as a [`ShimError`].
//! Beside them, kernels of our own where libtorch takes many passes (`nvrtc`: compiled at run time
//! by NVRTC through cudarc): the loss tile's softmax cross-entropy (`cross_entropy`) and the
//! log-sum-exp merge of attention in query blocks (`lse_merge`).
//!
//! The protocol: a shim function returns null on success, or a message (the C++ exception's
//! `what()`, copied with `strdup`) that [`check`] turns into an error and frees. Tensors cross as
//! tch's handles (`torch::Tensor*`), borrowed for the call; new tensors come back as handles the
//! caller owns.
pub mod attention;
pub mod autograd;
pub mod comm_stream;
pub mod cross_entropy;
pub mod cuda;
pub mod elementwise;
pub mod lse_merge;
pub mod nvrtc;
pub mod optim;
pub mod profiler;
pub mod transfer;

use std::ffi::{c_char, CStr};

/// A libtorch call through the shim failed: what was attempted and libtorch's message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{op}: {message}")]
pub struct ShimError {
    pub op: &'static str,
    pub message: String,
}

/// A shim call's outcome: null is success, else a malloc'ed C string, which is freed here.
pub(crate) fn check(op: &'static str, err: *mut c_char) -> Result<(), ShimError> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: non-null means a NUL-terminated string from strdup.
    let message = unsafe { CStr::from_ptr(err) }.to_string_lossy().into_owned();
    // SAFETY: allocated by strdup (malloc) in the shim, freed once here.
    unsafe { libc::free(err as *mut libc::c_void) };
    Err(ShimError { op, message })
}
