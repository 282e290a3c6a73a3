//! Backpropagation from given output gradients (`torch.autograd.backward(outputs, grads)`), which
//! tch 0.24 does not expose; reached through shim/shim.cpp.
use std::ffi::{c_char, c_int, CStr};
use tch::Tensor;
use torch_sys::C_tensor;

extern "C" {
    fn ulysses_backward(outputs: *const *const C_tensor, grads: *const *const C_tensor, n: c_int) -> *mut c_char;
}

/// Backpropagates each `(output, grad_output)` pair; gradients accumulate into the leaves.
pub fn backward(pairs: &[(&Tensor, &Tensor)]) -> Result<(), String> {
    let outs: Vec<*const C_tensor> = pairs.iter().map(|(o, _)| o.as_ptr()).collect();
    let grads: Vec<*const C_tensor> = pairs.iter().map(|(_, g)| g.as_ptr()).collect();
    // SAFETY: the pointers are live tch handles (torch::Tensor*) borrowed for the call; the shim
    // copies the tensors (refcounted) and returns null or a malloc'ed C string that we free.
    let err = unsafe { ulysses_backward(outs.as_ptr(), grads.as_ptr(), pairs.len() as c_int) };
    shim_result(err)
}

/// A shim call's outcome: null is success, else a malloc'ed C string (the C++ exception's
/// message), which is freed here.
pub(crate) fn shim_result(err: *mut c_char) -> Result<(), String> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: non-null means a NUL-terminated string from strdup.
    let msg = unsafe { CStr::from_ptr(err) }.to_string_lossy().into_owned();
    // SAFETY: allocated by strdup (malloc) in the shim.
    unsafe { libc::free(err as *mut libc::c_void) };
    Err(msg)
}
