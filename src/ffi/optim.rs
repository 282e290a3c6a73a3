//! torch's fused AdamW kernel (`torch._fused_adamw_`) on one flat fp32 shard; shim/shim.cpp.
use super::{check, ShimError};
use std::ffi::c_char;
use tch::Tensor;
use torch_sys::C_tensor;

extern "C" {
    fn ulysses_fused_adamw(
        param: *const C_tensor,
        grad: *const C_tensor,
        exp_avg: *const C_tensor,
        exp_avg_sq: *const C_tensor,
        step: f64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
    ) -> *mut c_char;
}

/// One AdamW update without weight decay, in place: a vectorized, multi-threaded pass over the
/// four fp32 vectors (libtorch's CPU kernel, or its CUDA kernel for GPU tensors). `step` is the
/// 1-based step of the bias corrections.
#[allow(clippy::too_many_arguments)]
pub fn fused_adamw(
    param: &Tensor,
    grad: &Tensor,
    exp_avg: &Tensor,
    exp_avg_sq: &Tensor,
    step: f64,
    lr: f64,
    betas: (f64, f64),
    eps: f64,
) -> Result<(), ShimError> {
    // SAFETY: live tch handles (torch::Tensor*) borrowed for the call; the kernel updates the
    // tensors in place; the shim returns null or a malloc'ed message.
    check("AdamW", unsafe {
        ulysses_fused_adamw(
            param.as_ptr(),
            grad.as_ptr(),
            exp_avg.as_ptr(),
            exp_avg_sq.as_ptr(),
            step,
            lr,
            betas.0,
            betas.1,
            eps,
        )
    })
}
