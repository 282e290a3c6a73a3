//! Backpropagation from given output gradients (`torch.autograd.backward(outputs, grads)`), which
//! tch 0.24 does not expose; shim/shim.cpp.
use super::{check, ShimError};
use std::ffi::{c_char, c_int};
use tch::Tensor;
use torch_sys::C_tensor;

extern "C" {
    fn ulysses_backward(outputs: *const *const C_tensor, grads: *const *const C_tensor, n: c_int) -> *mut c_char;
}

/// Backpropagates each `(output, grad_output)` pair; gradients accumulate into the leaves.
pub fn backward(pairs: &[(&Tensor, &Tensor)]) -> Result<(), ShimError> {
    let outs: Vec<*const C_tensor> = pairs.iter().map(|(o, _)| o.as_ptr()).collect();
    let grads: Vec<*const C_tensor> = pairs.iter().map(|(_, g)| g.as_ptr()).collect();
    // SAFETY: the pointers are live tch handles (torch::Tensor*) borrowed for the call; the shim
    // copies the tensors (refcounted) and returns null or a malloc'ed C string.
    check("backward", unsafe { ulysses_backward(outs.as_ptr(), grads.as_ptr(), pairs.len() as c_int) })
}
