//! Causal attention's forward over a long sequence in query blocks: block i's queries attend to
//! their own block causally and to every key before it without a mask, two fused kernel calls
//! merged by the log-sum-exp update (`ring::merge`), the same math ring attention does across
//! ranks. Why: cuDNN's causal forward kernel slows down with length, and blocks of 64K tokens keep
//! its shorter-sequence rate. On one H100 (cuDNN 9.19, 32 query / 8 KV heads of 128, bf16,
//! `bench/attention_blocks.py`, 2026-12-06) the forward took 0.2564 s whole and 0.2313 s in 64K
//! blocks at 128K tokens (1.11×), 1.0596 s and 0.9235 s at 256K (1.15×). Its backward gained
//! nothing from blocks (0.99-1.01×) and would round dk/dv once per block, so the backward stays
//! one call over the whole sequence, given the merged output and log-sum-exp: those of one call,
//! up to rounding.
use super::ring::{kernel_lse, lse3, merge};
use crate::config::FusedAttention;
use crate::ffi::attention::{self as fused, forward_block, Saved};
use crate::ffi::lse_merge;
use crate::ffi::ShimError;
use tch::{Kind, Tensor};

/// Query heads merged at a time: bounds the merge's fp32 temporaries to a few head-slices of one
/// block (8 of 32 heads of 128 over 64K tokens: 256 MiB each). With the two kernel outputs of a
/// block (0.5 GiB each at 64K × 32 heads) that is about 2 GiB at most whatever the length, below
/// the layer backward's working set the memory plan holds room for (LAYER_WORKING_SET_PER_TOKEN).
const MERGE_HEADS: i64 = 8;

/// Causal attention as `fused::forward` computes it (`q [b, s, n_q, d]`, `k, v [b, s, n_kv, d]`),
/// in query blocks of `FusedAttention::forward_blocks`'s length where that wins, else in one call; what it saves is
/// what `fused::backward` takes for the whole sequence.
pub fn forward(kernel: FusedAttention, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Saved), ShimError> {
    match kernel.forward_blocks(q.size()[1] as usize) {
        Some(block) => forward_in_blocks(kernel, block as i64, q, k, v),
        None => fused::forward(kernel, q, k, v),
    }
}

/// `forward` in query blocks of `block` tokens (the last may be shorter).
pub fn forward_in_blocks(
    kernel: FusedAttention,
    block: i64,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Result<(Tensor, Saved), ShimError> {
    let (b, s, h, _) = q.size4().expect("attention tensors are [b, s, heads, d]");
    let out = q.empty_like();
    let lse = Tensor::empty([b, h, s], (Kind::Float, q.device()));
    let mut first: Option<Saved> = None;
    for start in (0..s).step_by(block as usize) {
        let len = block.min(s - start);
        let rows = |t: &Tensor| t.narrow(1, start, len);
        let (qb, mut out_b, mut lse_b) = (rows(q), rows(&out), lse.narrow(2, start, len));
        let (o, saved) = forward_block(kernel, true, &qb, &rows(k), &rows(v))?;
        let lse_o = lse3(&saved.lse, &o);
        if start == 0 {
            out_b.copy_(&o);
            lse_b.copy_(&lse_o);
            first = Some(saved);
            continue;
        }
        let (p, saved_p) = forward_block(kernel, false, &qb, &k.narrow(1, 0, start), &v.narrow(1, 0, start))?;
        let lse_p = lse3(&saved_p.lse, &p);
        // One kernel on the GPU (`ffi::lse_merge`); else `ring::merge` op by op, a few heads at a
        // time.
        if lse_merge::merge_into(&out_b, &lse_b, &o, &lse_o, &p, &lse_p) {
            continue;
        }
        for h0 in (0..h).step_by(MERGE_HEADS as usize) {
            let n = MERGE_HEADS.min(h - h0);
            let heads = |t: &Tensor, dim: i64| t.narrow(dim, h0, n);
            let mut acc = heads(&o, 2).to_kind(Kind::Float);
            let mut acc_lse = heads(&lse_o, 1).copy();
            merge(&mut acc, &mut acc_lse, &heads(&p, 2), &heads(&lse_p, 1));
            heads(&out_b, 2).copy_(&acc);
            heads(&lse_b, 1).copy_(&acc_lse);
        }
    }
    let first = first.expect("a sequence has at least one block");
    let merged = kernel_lse(&lse, first.lse.dim());
    Ok((out, first.with_lse(merged)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::attention::Backward;
    use tch::Device;

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    /// Blocks of 8 over 20 tokens (the last block short), GQA, two samples: the output, the
    /// saved log-sum-exp and the whole-sequence backward's gradients equal one call's (fp32).
    #[test]
    fn blocks_equal_one_call_forward_and_backward() {
        tch::manual_seed(11);
        let opts = (Kind::Float, Device::Cpu);
        let t = |heads| Tensor::randn([2, 20, heads, 16], opts);
        let (q, k, v, g) = (t(4), t(2), t(2), t(4));
        let kernel = FusedAttention::CpuFlash;
        let (whole, saved_whole) = fused::forward(kernel, &q, &k, &v).unwrap();
        let (blocked, saved) = forward_in_blocks(kernel, 8, &q, &k, &v).unwrap();
        assert!(max_diff(&blocked, &whole) < 1e-6, "output differs by {}", max_diff(&blocked, &whole));
        assert_eq!(saved.lse.size(), saved_whole.lse.size());
        assert!(max_diff(&saved.lse, &saved_whole.lse) < 1e-5, "log-sum-exp");
        let grads = |out: &Tensor, saved: &Saved| {
            fused::backward(kernel, Backward { grad_out: &g, q: &q, k: &k, v: &v, out, saved }).unwrap()
        };
        let (a, b) = (grads(&whole, &saved_whole), grads(&blocked, &saved));
        for (name, x, y) in [("dq", &a.0, &b.0), ("dk", &a.1, &b.1), ("dv", &a.2, &b.2)] {
            assert!(max_diff(x, y) < 1e-5, "{name} differs by {}", max_diff(x, y));
        }
    }

    #[test]
    fn only_cudnn_past_one_block_is_cut() {
        assert_eq!(FusedAttention::Cudnn.forward_blocks(131072), Some(65536));
        assert_eq!(FusedAttention::Cudnn.forward_blocks(65536), None);
        assert_eq!(FusedAttention::Flash.forward_blocks(131072), None);
        assert_eq!(FusedAttention::CpuFlash.forward_blocks(131072), None);
    }
}
