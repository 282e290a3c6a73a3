//! Causal attention that keeps what its backward needs. The forward returns the output and the
//! softmax log-sum-exp; with both kept, backward calls the fused attention backward directly
//! instead of recomputing the attention forward (at long sequences a quarter of all work). The
//! kernels are libtorch's (shim/attention.cpp, since tch 0.24 lacks these forwards); which one a
//! run uses is plain configuration ([`FusedAttention`]), decided with the memory plan. The
//! `_masked` forms attend within the documents of packed samples (`model::mask::DocumentMask`):
//! one kernel call per stretch of documents, the causal kernel on a batch of equal-length long
//! documents (a view of the micro batch), cuDNN or flash in their varlen form (cumulative
//! sequence lengths) on a run of short ones, the CPU flash kernel with a dense mask.
use super::{check, ShimError};
use crate::config::DocumentKernels;
pub use crate::config::FusedAttention;
use crate::model::mask::{Call, DocumentMask};
use std::ffi::{c_char, c_int};
use std::ptr;
use tch::Tensor;
use torch_sys::C_tensor;

extern "C" {
    fn ulysses_attention_forward(
        kernel: c_int,
        causal: c_int,
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
        causal: c_int,
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
    /// Softmax log-sum-exp per query row (fp32); of several kernel calls (attention within
    /// documents), theirs flattened and laid end to end.
    pub lse: Tensor,
    /// What else each kernel call's backward needs, in call order.
    pub calls: Vec<KernelCall>,
}

/// One kernel call's share of `Saved`.
pub struct KernelCall {
    /// The shape of its log-sum-exp (the kernels differ).
    lse_shape: Vec<i64>,
    /// Kernel-specific (cuDNN: philox seed and offset; flash: RNG state); tiny.
    aux: [Tensor; 2],
}

impl Saved {
    /// One kernel call's output.
    fn one(lse: Tensor, aux: [Tensor; 2]) -> Saved {
        Saved { calls: vec![KernelCall { lse_shape: lse.size(), aux }], lse }
    }

    /// One call's extras with another log-sum-exp in the shape that call gave its own: ring
    /// attention's merged one over every block, or some of its rows.
    pub fn with_lse(&self, lse: Tensor) -> Saved {
        Saved::one(lse, self.calls[0].aux.each_ref().map(|t| t.shallow_clone()))
    }

    /// Several calls' outputs, their log-sum-exps laid end to end (one: as it is).
    fn join(mut parts: Vec<Saved>) -> Saved {
        if parts.len() == 1 {
            return parts.remove(0);
        }
        let lse = Tensor::cat(&parts.iter().map(|p| p.lse.reshape([-1])).collect::<Vec<_>>(), 0);
        Saved { lse, calls: parts.into_iter().flat_map(|p| p.calls).collect() }
    }

    /// The inverse of `join`: each call's own log-sum-exp (views of `lse`) and extras.
    fn split(&self) -> Vec<(Tensor, &[Tensor; 2])> {
        if let [call] = &self.calls[..] {
            return vec![(self.lse.shallow_clone(), &call.aux)];
        }
        let mut at = 0;
        self.calls
            .iter()
            .map(|c| {
                let n: i64 = c.lse_shape.iter().product();
                let lse = self.lse.narrow(0, at, n).view(c.lse_shape.as_slice());
                at += n;
                (lse, &c.aux)
            })
            .collect()
    }
}

/// Causal attention, `q [b, s, n_q, d]`, `k, v [b, s, n_kv, d]` (GQA when n_kv < n_q) ->
/// `[b, s, n_q, d]` and what `backward` needs.
pub fn forward(kernel: FusedAttention, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Saved), ShimError> {
    forward_block(kernel, true, q, k, v)
}

/// `forward`, or with `causal` false attention where every query sees every key (ring
/// attention's blocks of keys wholly before the queries); then `q [b, s_q, n_q, d]` and
/// `k, v [b, s_k, n_kv, d]` may differ in length.
pub fn forward_block(
    kernel: FusedAttention,
    causal: bool,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Result<(Tensor, Saved), ShimError> {
    // [b, s, heads, d] -> [b, heads, s, d]
    let (q, k, v) = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2));
    let mut outs = [ptr::null_mut(); 4];
    let [o, l, a0, a1] = &mut outs;
    // SAFETY: live tch handles borrowed for the call; on success the shim sets four new
    // `at::Tensor*` that we own from here on (wrapped once each).
    check("fused attention forward", unsafe {
        ulysses_attention_forward(code(kernel), causal as c_int, q.as_ptr(), k.as_ptr(), v.as_ptr(), o, l, a0, a1)
    })?;
    let [out, lse, aux0, aux1] = outs.map(|p| unsafe { Tensor::from_ptr(p) });
    // The kernels lay the output out like q ([b, s, heads, d] in memory), so this is contiguous.
    Ok((out.transpose(1, 2), Saved::one(lse, [aux0, aux1])))
}

/// What an attention backward takes: the output's gradient `grad_out` `[b, s, n_q, d]`, the
/// forward's `q, k, v` (shapes as in `forward`) and its kept `out` and `saved`.
#[derive(Clone, Copy)]
pub struct Backward<'a> {
    pub grad_out: &'a Tensor,
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub out: &'a Tensor,
    pub saved: &'a Saved,
}

/// Gradients of `q, k, v` of `forward`.
pub fn backward(kernel: FusedAttention, x: Backward) -> Result<(Tensor, Tensor, Tensor), ShimError> {
    backward_block(kernel, true, x)
}

/// `backward` of `forward_block`. Ring attention passes the whole row's merged output and
/// log-sum-exp for `out` and `saved.lse`, which gives this block's share of the gradients.
pub fn backward_block(
    kernel: FusedAttention,
    causal: bool,
    x: Backward,
) -> Result<(Tensor, Tensor, Tensor), ShimError> {
    let Backward { grad_out, q, k, v, out, saved } = x;
    let t = |x: &Tensor| x.transpose(1, 2);
    // The kernels expect the output's gradient laid out like the output.
    let (g, o) = (t(&grad_out.contiguous()), t(&out.contiguous()));
    let (q, k, v) = (t(q), t(k), t(v));
    let [(lse, aux)] = &saved.split()[..] else {
        let message = format!("{} kernel calls saved, one expected", saved.calls.len());
        return Err(ShimError { op: "fused attention backward", message });
    };
    let mut outs = [ptr::null_mut(); 3];
    let [dq, dk, dv] = &mut outs;
    // SAFETY: as in `forward`; three new tensors on success.
    check("fused attention backward", unsafe {
        ulysses_attention_backward(
            code(kernel),
            causal as c_int,
            g.as_ptr(),
            q.as_ptr(),
            k.as_ptr(),
            v.as_ptr(),
            o.as_ptr(),
            lse.as_ptr(),
            aux[0].as_ptr(),
            aux[1].as_ptr(),
            dq,
            dk,
            dv,
        )
    })?;
    let [dq, dk, dv] = outs.map(|p| t(&unsafe { Tensor::from_ptr(p) }));
    Ok((dq, dk, dv))
}

/// `[b, s, heads, d]` -> `[b·s, heads, d]`: the micro batch's samples end to end, as the
/// calls of a `DocumentMask` index it.
fn flat(t: &Tensor) -> Tensor {
    let (b, s, heads, d) = t.size4().expect("attention tensors are [b, s, heads, d]");
    t.reshape([b * s, heads, d])
}

/// The tokens of `call` of flat `t` `[b·s, heads, d]`, as its kernel takes them: `[count, len,
/// heads, d]` for the causal kernel, `[tokens, heads, d]` for varlen, `[1, heads, tokens, d]`
/// for the CPU flash kernel with its dense mask.
fn part(call: &Call, varlen: FusedAttention, t: &Tensor) -> Tensor {
    let (heads, d) = (t.size()[1], t.size()[2]);
    match *call {
        Call::Causal { start, count, len } => t.narrow(0, start, count * len).view([count, len, heads, d]),
        Call::Varlen { start, tokens, .. } => {
            let t = t.narrow(0, start, tokens);
            match varlen {
                // [tokens, heads, d] -> [1, heads, tokens, d]
                FusedAttention::CpuFlash => t.unsqueeze(0).transpose(1, 2),
                FusedAttention::Cudnn | FusedAttention::Flash => t,
            }
        }
    }
}

/// The inverse of `part`: a call's result -> `[tokens, heads, d]`.
fn unpart(call: &Call, varlen: FusedAttention, t: Tensor) -> Tensor {
    let (heads, d) = match (call, varlen) {
        (Call::Causal { .. }, _) => (t.size()[2], t.size()[3]),
        (Call::Varlen { .. }, FusedAttention::CpuFlash) => (t.size()[1], t.size()[3]),
        (Call::Varlen { .. }, _) => return t,
    };
    match call {
        // [count, len, heads, d] -> [count·len, heads, d]
        Call::Causal { .. } => t.reshape([-1, heads, d]),
        // [1, heads, tokens, d] -> [tokens, heads, d]
        Call::Varlen { .. } => t.transpose(1, 2).reshape([-1, heads, d]),
    }
}

/// The calls' results, `[tokens, heads, d]` each, laid into one `[b, s, heads, d]` tensor shaped
/// like `like` as they come, so that no more than one call's result exists beside the whole
/// (sequence-long tensors); the result of a mask's only call is the whole as it is.
struct Joined<'a> {
    like: &'a Tensor,
    calls: usize,
    whole: Option<Tensor>,
}

impl<'a> Joined<'a> {
    fn new(mask: &DocumentMask, like: &'a Tensor) -> Joined<'a> {
        Joined { like, calls: mask.calls.len(), whole: None }
    }

    fn put(&mut self, call: &Call, part: Tensor) {
        if self.calls == 1 {
            self.whole = Some(part);
            return;
        }
        let (b, s, heads, d) = self.like.size4().expect("attention tensors are [b, s, heads, d]");
        let whole = self.whole.get_or_insert_with(|| Tensor::empty([b * s, heads, d], (part.kind(), part.device())));
        whole.narrow(0, call.start(), part.size()[0]).copy_(&part);
    }

    fn finish(self) -> Tensor {
        let (b, s, _, d) = self.like.size4().expect("attention tensors are [b, s, heads, d]");
        self.whole.expect("a mask has calls").reshape([b, s, -1, d])
    }
}

/// One varlen call's forward through the shim.
fn varlen_forward(
    kernel: FusedAttention,
    call: &Call,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Result<(Tensor, Saved), ShimError> {
    let Call::Varlen { cu_seqlens, max_len, dense, .. } = call else { unreachable!("a varlen call") };
    let mut outs = [ptr::null_mut(); 4];
    let [o, l, a0, a1] = &mut outs;
    // SAFETY: live tch handles borrowed for the call (an undefined `dense` is a valid handle the
    // varlen kernels never read); on success the shim sets four new tensors that we own.
    check("masked attention forward", unsafe {
        ulysses_attention_forward_docs(
            code(kernel),
            q.as_ptr(),
            k.as_ptr(),
            v.as_ptr(),
            cu_seqlens.as_ptr(),
            *max_len,
            dense.as_ptr(),
            o,
            l,
            a0,
            a1,
        )
    })?;
    let [out, lse, aux0, aux1] = outs.map(|p| unsafe { Tensor::from_ptr(p) });
    Ok((out, Saved::one(lse, [aux0, aux1])))
}

/// `forward` within the documents of `mask` (block-diagonal causal): shapes as in `forward`.
/// Each of the mask's calls attends its stretch of tokens; the outputs are laid end to end.
pub fn forward_masked(mask: &DocumentMask, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Saved), ShimError> {
    let DocumentKernels { varlen, causal, .. } = mask.kernels;
    let (qf, kf, vf) = (flat(q), flat(k), flat(v));
    let (mut outs, mut saved) = (Joined::new(mask, q), Vec::new());
    for call in &mask.calls {
        let (qc, kc, vc) = (part(call, varlen, &qf), part(call, varlen, &kf), part(call, varlen, &vf));
        let (out, s) = match call {
            Call::Causal { .. } => forward(causal, &qc, &kc, &vc)?,
            Call::Varlen { .. } => varlen_forward(varlen, call, &qc, &kc, &vc)?,
        };
        outs.put(call, unpart(call, varlen, out));
        saved.push(s);
    }
    Ok((outs.finish(), Saved::join(saved)))
}

/// One varlen call's backward through the shim; `g` has `o`'s layout.
fn varlen_backward(
    kernel: FusedAttention,
    call: &Call,
    [g, q, k, v, o]: [&Tensor; 5],
    lse: &Tensor,
    aux: &[Tensor; 2],
) -> Result<(Tensor, Tensor, Tensor), ShimError> {
    let Call::Varlen { cu_seqlens, max_len, dense, .. } = call else { unreachable!("a varlen call") };
    let mut outs = [ptr::null_mut(); 3];
    let [dq, dk, dv] = &mut outs;
    // SAFETY: as in `varlen_forward`; three new tensors on success.
    check("masked attention backward", unsafe {
        ulysses_attention_backward_docs(
            code(kernel),
            g.as_ptr(),
            q.as_ptr(),
            k.as_ptr(),
            v.as_ptr(),
            o.as_ptr(),
            lse.as_ptr(),
            aux[0].as_ptr(),
            aux[1].as_ptr(),
            cu_seqlens.as_ptr(),
            *max_len,
            dense.as_ptr(),
            dq,
            dk,
            dv,
        )
    })?;
    let [dq, dk, dv] = outs.map(|p| unsafe { Tensor::from_ptr(p) });
    Ok((dq, dk, dv))
}

/// `backward` of `forward_masked`, with the same `mask`.
pub fn backward_masked(mask: &DocumentMask, x: Backward) -> Result<(Tensor, Tensor, Tensor), ShimError> {
    let Backward { grad_out, q, k, v, out, saved } = x;
    let DocumentKernels { varlen, causal, .. } = mask.kernels;
    let kept = saved.split();
    if kept.len() != mask.calls.len() {
        let message = format!("{} kernel calls saved, the documents make {}", kept.len(), mask.calls.len());
        return Err(ShimError { op: "masked attention backward", message });
    }
    // The kernels expect the output's gradient laid out like the output.
    let (g, o) = (flat(&grad_out.contiguous()), flat(&out.contiguous()));
    let (qf, kf, vf) = (flat(q), flat(k), flat(v));
    let (mut dqs, mut dks, mut dvs) = (Joined::new(mask, q), Joined::new(mask, k), Joined::new(mask, v));
    for (call, (lse, aux)) in mask.calls.iter().zip(kept) {
        let [gc, qc, kc, vc, oc] = [&g, &qf, &kf, &vf, &o].map(|t| part(call, varlen, t));
        let (dq, dk, dv) = match call {
            Call::Causal { .. } => {
                let one = Saved::one(lse, [aux[0].shallow_clone(), aux[1].shallow_clone()]);
                backward(causal, Backward { grad_out: &gc, q: &qc, k: &kc, v: &vc, out: &oc, saved: &one })?
            }
            Call::Varlen { .. } => varlen_backward(varlen, call, [&gc, &qc, &kc, &vc, &oc], &lse, aux)?,
        };
        dqs.put(call, unpart(call, varlen, dq));
        dks.put(call, unpart(call, varlen, dk));
        dvs.put(call, unpart(call, varlen, dv));
    }
    Ok((dqs.finish(), dks.finish(), dvs.finish()))
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
        let x = Backward { grad_out: &grad_out, q: &q, k: &k, v: &v, out: &out, saved: &saved };
        let (dq, dk, dv) = backward(FusedAttention::CpuFlash, x).unwrap();
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
