//! Causal attention that keeps what its backward needs. The forward returns the output and the
//! softmax log-sum-exp; with both kept, backward calls the fused attention backward directly
//! instead of recomputing the attention forward (at long sequences a quarter of all work). The
//! kernels are libtorch's (shim/attention.cpp, since tch 0.24 lacks these forwards); which one a
//! run uses is plain configuration ([`FusedAttention`]), decided with the memory plan. The
//! `_masked` forms attend within the documents of packed samples (`model::mask::DocumentMask`):
//! cuDNN and flash in their varlen form (cumulative sequence lengths), the CPU flash kernel with
//! a dense mask.
use super::{check, ShimError};
pub use crate::config::FusedAttention;
use crate::model::mask::DocumentMask;
use std::ffi::{c_char, c_int};
use std::ptr;
use tch::Tensor;
use torch_sys::C_tensor;

extern "C" {
    fn ulysses_attention_forward(
        kernel: c_int,
        q: *const C_tensor,
        k: *const C_tensor,
        v: *const C_tensor,
        out: *mut *mut C_tensor,
        lse: *mut *mut C_tensor,
        aux0: *mut *mut C_tensor,
        aux1: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn ulysses_attention_backward(
        kernel: c_int,
        grad_out: *const C_tensor,
        q: *const C_tensor,
        k: *const C_tensor,
        v: *const C_tensor,
        out: *const C_tensor,
        lse: *const C_tensor,
        aux0: *const C_tensor,
        aux1: *const C_tensor,
        dq: *mut *mut C_tensor,
        dk: *mut *mut C_tensor,
        dv: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn ulysses_attention_forward_docs(
        kernel: c_int,
        q: *const C_tensor,
        k: *const C_tensor,
        v: *const C_tensor,
        cu_seqlens: *const C_tensor,
        max_len: i64,
        mask: *const C_tensor,
        out: *mut *mut C_tensor,
        lse: *mut *mut C_tensor,
        aux0: *mut *mut C_tensor,
        aux1: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn ulysses_attention_backward_docs(
        kernel: c_int,
        grad_out: *const C_tensor,
        q: *const C_tensor,
        k: *const C_tensor,
        v: *const C_tensor,
        out: *const C_tensor,
        lse: *const C_tensor,
        aux0: *const C_tensor,
        aux1: *const C_tensor,
        cu_seqlens: *const C_tensor,
        max_len: i64,
        mask: *const C_tensor,
        dq: *mut *mut C_tensor,
        dk: *mut *mut C_tensor,
        dv: *mut *mut C_tensor,
    ) -> *mut c_char;
}

/// The shim's number for each kernel.
fn code(kernel: FusedAttention) -> c_int {
    match kernel {
        FusedAttention::Cudnn => 0,
        FusedAttention::Flash => 1,
        FusedAttention::CpuFlash => 2,
    }
}

/// What the backward needs besides q, k, v and the output.
pub struct Saved {
    /// Softmax log-sum-exp per query row (fp32).
    pub lse: Tensor,
    /// Kernel-specific (cuDNN: philox seed and offset; flash: RNG state); tiny.
    pub aux: [Tensor; 2],
}

/// Causal attention, `q [b, s, n_q, d]`, `k, v [b, s, n_kv, d]` (GQA when n_kv < n_q) ->
/// `[b, s, n_q, d]` and what `backward` needs.
pub fn forward(kernel: FusedAttention, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Saved), ShimError> {
    // [b, s, heads, d] -> [b, heads, s, d]
    let (q, k, v) = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2));
    let mut outs = [ptr::null_mut(); 4];
    let [o, l, a0, a1] = &mut outs;
    // SAFETY: live tch handles borrowed for the call; on success the shim sets four new
    // `at::Tensor*` that we own from here on (wrapped once each).
    check("fused attention forward", unsafe {
        ulysses_attention_forward(code(kernel), q.as_ptr(), k.as_ptr(), v.as_ptr(), o, l, a0, a1)
    })?;
    let [out, lse, aux0, aux1] = outs.map(|p| unsafe { Tensor::from_ptr(p) });
    // The kernels lay the output out like q ([b, s, heads, d] in memory), so this is contiguous.
    Ok((out.transpose(1, 2), Saved { lse, aux: [aux0, aux1] }))
}

/// Gradients of `q, k, v` (shapes as in `forward`) from the output's gradient `grad_out`
/// `[b, s, n_q, d]` and the kept `out` and `saved`.
pub fn backward(
    kernel: FusedAttention,
    grad_out: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    saved: &Saved,
) -> Result<(Tensor, Tensor, Tensor), ShimError> {
    let t = |x: &Tensor| x.transpose(1, 2);
    // The kernels expect the output's gradient laid out like the output.
    let (g, o) = (t(&grad_out.contiguous()), t(&out.contiguous()));
    let (q, k, v) = (t(q), t(k), t(v));
    let mut outs = [ptr::null_mut(); 3];
    let [dq, dk, dv] = &mut outs;
    // SAFETY: as in `forward`; three new tensors on success.
    check("fused attention backward", unsafe {
        ulysses_attention_backward(
            code(kernel),
            g.as_ptr(),
            q.as_ptr(),
            k.as_ptr(),
            v.as_ptr(),
            o.as_ptr(),
            saved.lse.as_ptr(),
            saved.aux[0].as_ptr(),
            saved.aux[1].as_ptr(),
            dq,
            dk,
            dv,
        )
    })?;
    let [dq, dk, dv] = outs.map(|p| t(&unsafe { Tensor::from_ptr(p) }));
    Ok((dq, dk, dv))
}

/// The layout a masked kernel takes: `[b, s, heads, d]` -> `[b·s, heads, d]` for the varlen
/// kernels (samples end to end), `[b, heads, s, d]` for the CPU flash kernel.
fn to_kernel(kernel: FusedAttention, t: &Tensor) -> Tensor {
    match kernel {
        FusedAttention::CpuFlash => t.transpose(1, 2),
        FusedAttention::Cudnn | FusedAttention::Flash => {
            let (b, s, heads, d) = t.size4().expect("attention tensors are [b, s, heads, d]");
            t.reshape([b * s, heads, d])
        }
    }
}

/// The inverse of `to_kernel` for a tensor of `like`'s shape `[b, s, heads, d]`.
fn from_kernel(kernel: FusedAttention, t: Tensor, like: &Tensor) -> Tensor {
    match kernel {
        FusedAttention::CpuFlash => t.transpose(1, 2),
        FusedAttention::Cudnn | FusedAttention::Flash => {
            let (b, s, _, d) = like.size4().expect("attention tensors are [b, s, heads, d]");
            t.view([b, s, -1, d])
        }
    }
}

/// `forward` within the documents of `mask` (block-diagonal causal): shapes as in `forward`.
pub fn forward_masked(mask: &DocumentMask, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Saved), ShimError> {
    let kernel = mask.kernel;
    let (qk, kk, vk) = (to_kernel(kernel, q), to_kernel(kernel, k), to_kernel(kernel, v));
    let mut outs = [ptr::null_mut(); 4];
    let [o, l, a0, a1] = &mut outs;
    // SAFETY: live tch handles borrowed for the call (an undefined `dense` is a valid handle the
    // varlen kernels never read); on success the shim sets four new tensors that we own.
    check("masked attention forward", unsafe {
        ulysses_attention_forward_docs(
            code(kernel),
            qk.as_ptr(),
            kk.as_ptr(),
            vk.as_ptr(),
            mask.cu_seqlens.as_ptr(),
            mask.max_len,
            mask.dense.as_ptr(),
            o,
            l,
            a0,
            a1,
        )
    })?;
    let [out, lse, aux0, aux1] = outs.map(|p| unsafe { Tensor::from_ptr(p) });
    Ok((from_kernel(kernel, out, q), Saved { lse, aux: [aux0, aux1] }))
}

/// `backward` of `forward_masked`, with the same `mask`.
pub fn backward_masked(
    mask: &DocumentMask,
    grad_out: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    saved: &Saved,
) -> Result<(Tensor, Tensor, Tensor), ShimError> {
    let kernel = mask.kernel;
    let t = |x: &Tensor| to_kernel(kernel, x);
    // The kernels expect the output's gradient laid out like the output.
    let (g, o) = (t(&grad_out.contiguous()), t(&out.contiguous()));
    let (qk, kk, vk) = (t(q), t(k), t(v));
    let mut outs = [ptr::null_mut(); 3];
    let [dq, dk, dv] = &mut outs;
    // SAFETY: as in `forward_masked`; three new tensors on success.
    check("masked attention backward", unsafe {
        ulysses_attention_backward_docs(
            code(kernel),
            g.as_ptr(),
            qk.as_ptr(),
            kk.as_ptr(),
            vk.as_ptr(),
            o.as_ptr(),
            saved.lse.as_ptr(),
            saved.aux[0].as_ptr(),
            saved.aux[1].as_ptr(),
            mask.cu_seqlens.as_ptr(),
            mask.max_len,
            mask.dense.as_ptr(),
            dq,
            dk,
            dv,
        )
    })?;
    let [dq, dk, dv] = outs.map(|p| unsafe { Tensor::from_ptr(p) });
    Ok((from_kernel(kernel, dq, q), from_kernel(kernel, dk, k), from_kernel(kernel, dv, v)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::llama::{AttentionCore, LocalAttention};
    use tch::{Device, Kind};

    #[test]
    fn matches_autograd_through_sdpa_with_gqa() {
        tch::manual_seed(3);
        let opts = (Kind::Float, Device::Cpu);
        let (b, s, n_q, n_kv, d) = (2, 37, 8, 2, 16);
        let q = Tensor::randn([b, s, n_q, d], opts).set_requires_grad(true);
        let k = Tensor::randn([b, s, n_kv, d], opts).set_requires_grad(true);
        let v = Tensor::randn([b, s, n_kv, d], opts).set_requires_grad(true);
        let grad_out = Tensor::randn([b, s, n_q, d], opts);
        let reference = LocalAttention.attend(&q, &k, &v);
        (&reference * &grad_out).sum(Kind::Float).backward();

        let (out, saved) = tch::no_grad(|| forward(FusedAttention::CpuFlash, &q, &k, &v)).unwrap();
        let (dq, dk, dv) = backward(FusedAttention::CpuFlash, &grad_out, &q, &k, &v, &out, &saved).unwrap();
        let close = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]) < 1e-5;
        assert_eq!(out.size(), [b, s, n_q, d]);
        assert!(close(&out, &reference.detach()));
        assert!(close(&dq, &q.grad()) && close(&dk, &k.grad()) && close(&dv, &v.grad()));
        assert_eq!(dk.size(), [b, s, n_kv, d]);
    }

    #[test]
    fn reports_bad_shapes_as_an_error() {
        let t = Tensor::zeros([1, 4, 2, 8], (Kind::Float, Device::Cpu));
        let wrong = Tensor::zeros([1, 4, 3, 5], (Kind::Float, Device::Cpu));
        assert!(forward(FusedAttention::CpuFlash, &t, &wrong, &wrong).is_err());
    }
}
