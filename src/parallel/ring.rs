//! Ring attention over the ring group (`parallel.ring` > 1): after the Ulysses all-to-all each
//! rank holds its ring rank's two zigzag chunks (`layout::ring_chunks`) with its share of the
//! heads; the ring's K/V blocks pass from rank to rank, and at each hop the local queries attend
//! to the visiting block through a fused kernel that returns the log-sum-exp, merged in fp32.
//!
//! With chunks r and 2R−1−r on ring rank r, the block of ring rank j is, for r's queries:
//! - j = r: the diagonal, causal over the two chunks laid end to end;
//! - j < r: its first chunk lies before both of r's chunks, its second after both: every query
//!   sees the first half of the block, none the second;
//! - j > r: both of its chunks lie after r's first chunk and before r's second: the second half of
//!   the queries sees the whole block, the first half none of it.
//!
//! So every hop but the diagonal is one non-causal block of half the work, the same on every rank.
//! Backward runs the same hops with the final merged output and log-sum-exp (each block's fused
//! backward then yields that block's share of the gradients): dq accumulates here in fp32, and
//! dk/dv accumulate in fp32 buffers that travel the ring with their K/V and are home after R
//! shifts. Only the KV heads circulate (GQA kernels), never copies repeated per query head.
//!
//! Each hop starts the next K/V shift before its own attention, and the dk/dv shift of the
//! previous hop is in flight while its attention backward runs: on CUDA (NCCL) the shifts run on
//! the communication stream while the kernels run on the compute stream, ordered by events
//! (`Collective::ring_shift_start`); on CPU (MPI) each shift completes before the hop computes.
use crate::comm::{Collective, CommError, Shift};
use crate::config::FusedAttention;
use crate::ffi::attention::{backward_block, forward_block, Backward, Saved};
use crate::ffi::ShimError;
use tch::{Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("ring attention: {0}")]
    Comm(#[from] CommError),
    #[error("ring attention: {0}")]
    Kernel(#[from] ShimError),
}

/// A training rank's ring: its group and the fused kernel every hop runs (one that returns the
/// log-sum-exp; `parallel.attention` picks it on CUDA, the CPU flash kernel on CPU).
#[derive(Clone, Copy)]
pub struct Ring<'a> {
    pub group: &'a dyn Collective,
    pub kernel: FusedAttention,
}

impl Ring<'_> {
    /// `forward` over this ring.
    pub fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Saved), RingError> {
        forward(self.group, self.kernel, q, k, v)
    }

    /// `backward` over this ring.
    pub fn backward(&self, x: Backward) -> Result<(Tensor, Tensor, Tensor), RingError> {
        backward(self.group, self.kernel, x)
    }
}

/// What the local queries attend at one hop (see the module comment): the rows of the queries
/// and of the visiting block's keys, as (start, length) along the sequence of `s` tokens, and
/// whether causally (the diagonal block).
struct Hop {
    causal: bool,
    queries: (i64, i64),
    keys: (i64, i64),
}

impl Hop {
    fn new(rank: usize, size: usize, hop: usize, s: i64) -> Hop {
        let (all, first, last) = ((0, s), (0, s / 2), (s / 2, s / 2));
        // The block a rank holds at hop `hop` came from `hop` ranks back.
        let owner = (rank + size - hop % size) % size;
        match owner.cmp(&rank) {
            std::cmp::Ordering::Equal => Hop { causal: true, queries: all, keys: all },
            // Every query, the first half of the keys.
            std::cmp::Ordering::Less => Hop { causal: false, queries: all, keys: first },
            // The second half of the queries, every key.
            std::cmp::Ordering::Greater => Hop { causal: false, queries: last, keys: all },
        }
    }
}

/// Rows `(start, len)` of `t` along dimension `dim`.
fn rows(t: &Tensor, dim: i64, (start, len): (i64, i64)) -> Tensor {
    t.narrow(dim, start, len)
}

/// The log-sum-exp as `[b, heads, s]` fp32, whatever trailing unit dimension the kernel adds.
pub(super) fn lse3(lse: &Tensor, like_out: &Tensor) -> Tensor {
    let (b, s, h, _) = like_out.size4().expect("attention outputs are [b, s, heads, d]");
    lse.reshape([b, h, s]).to_kind(Kind::Float)
}

/// `[b, heads, s]` back in the shape the kernel gave its log-sum-exp (`dims` dimensions: some
/// kernels add a trailing unit dimension), which its backward takes.
pub(super) fn kernel_lse(lse: &Tensor, dims: usize) -> Tensor {
    match dims {
        4 => lse.unsqueeze(-1).contiguous(),
        _ => lse.contiguous(),
    }
}

/// Merges a block's attention into the running one, in place, by the log-sum-exp update:
/// `lse' = log(e^lse + e^lse_b)`, `out' = out·e^(lse−lse') + out_b·e^(lse_b−lse')`.
/// `out [b, s, h, d]` and `lse [b, h, s]` are fp32; `out_b` any dtype, `lse_b [b, h, s]`. A row
/// with no key in either (lse = −inf) stays 0 with lse −inf, and a row with none in the block
/// ignores the block's output (whatever the kernel wrote there: 0 or NaN).
pub fn merge(out: &mut Tensor, lse: &mut Tensor, out_b: &Tensor, lse_b: &Tensor) {
    let lse_b = lse_b.to_kind(Kind::Float);
    let neg_inf = f64::NEG_INFINITY;
    let finite_or_zero = |t: &Tensor| t.masked_fill(&t.eq(neg_inf), 0.0);
    let m = finite_or_zero(&lse.maximum(&lse_b));
    let new = &m + ((&*lse - &m).exp() + (&lse_b - &m).exp()).log();
    let base = finite_or_zero(&new);
    // [b, h, s] -> [b, s, h, 1], the weights of each row's two parts.
    let weight = |l: &Tensor| (l - &base).exp().transpose(1, 2).unsqueeze(-1);
    let (w_a, w_b) = (weight(lse), weight(&lse_b));
    let part_b = (out_b.to_kind(Kind::Float) * &w_b).masked_fill(&w_b.eq(0.0), 0.0);
    let merged = &*out * w_a + part_b;
    out.copy_(&merged);
    lse.copy_(&new);
}

/// K and V of one block stacked for one shift: `[2, b, s, kv, d]`.
fn stack_kv(k: &Tensor, v: &Tensor) -> Tensor {
    Tensor::stack(&[k, v], 0)
}

/// Ring attention forward: `q [b, s, h, d]`, `k, v [b, s, kv, d]` (this rank's two zigzag chunks,
/// end to end) -> the output `[b, s, h, d]` in q's dtype and the merged log-sum-exp in the shape
/// `kernel` gives it (with the diagonal block's kernel extras), which `backward` takes.
pub fn forward(
    ring: &dyn Collective,
    kernel: FusedAttention,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Result<(Tensor, Saved), RingError> {
    let (rank, size) = (ring.rank(), ring.size());
    let (b, s, h, _) = q.size4().expect("attention tensors are [b, s, heads, d]");
    let out = q.zeros_like().to_kind(Kind::Float);
    let lse = Tensor::full([b, h, s], f64::NEG_INFINITY, (Kind::Float, q.device()));
    let mut kv = stack_kv(k, v);
    let mut diagonal = None;
    for hop in 0..size {
        // The next block travels while this hop's attention runs (on CUDA: the shift on the
        // communication stream, the kernels on the compute stream).
        let next = if hop + 1 < size { Some(ring.ring_shift_start(&kv)?) } else { None };
        let at = Hop::new(rank, size, hop, s);
        let (kb, vb) = (rows(&kv.get(0), 1, at.keys), rows(&kv.get(1), 1, at.keys));
        let (o, saved) = forward_block(kernel, at.causal, &rows(q, 1, at.queries), &kb, &vb)?;
        merge(&mut rows(&out, 1, at.queries), &mut rows(&lse, 2, at.queries), &o, &lse3(&saved.lse, &o));
        if at.causal {
            diagonal = Some(saved);
        }
        if let Some(next) = next {
            kv = next.wait()?;
        }
    }
    let diagonal = diagonal.expect("hop 0 is the diagonal block");
    let merged = kernel_lse(&lse, diagonal.lse.dim());
    Ok((out.to_kind(q.kind()), diagonal.with_lse(merged)))
}

/// Ring attention backward from the output's gradient, the forward's inputs, the final merged
/// output and what `forward` saved: the gradients of q, k, v in their dtypes.
pub fn backward(
    ring: &dyn Collective,
    kernel: FusedAttention,
    x: Backward,
) -> Result<(Tensor, Tensor, Tensor), RingError> {
    let (rank, size) = (ring.rank(), ring.size());
    let s = x.q.size()[1];
    let lse = lse3(&x.saved.lse, x.out);
    // What the second half of the queries takes: their rows of the log-sum-exp.
    let last = x.saved.with_lse(kernel_lse(&rows(&lse, 2, (s / 2, s / 2)), x.saved.lse.dim()));
    let dq = x.q.zeros_like().to_kind(Kind::Float);
    let mut kv = stack_kv(x.k, x.v);
    // dk and dv of the visiting block, [2, b, s, kv, d] fp32, travelling the ring with it: the
    // shift of the previous hop's, in flight while this hop's kernel runs.
    let mut dkv: Option<Shift> = None;
    for hop in 0..size {
        let next = if hop + 1 < size { Some(ring.ring_shift_start(&kv)?) } else { None };
        let at = Hop::new(rank, size, hop, s);
        let q_rows = |t: &Tensor| rows(t, 1, at.queries);
        let (kb, vb) = (rows(&kv.get(0), 1, at.keys), rows(&kv.get(1), 1, at.keys));
        let saved = if at.queries.0 == 0 { x.saved } else { &last };
        let block =
            Backward { grad_out: &q_rows(x.grad_out), q: &q_rows(x.q), k: &kb, v: &vb, out: &q_rows(x.out), saved };
        let (gq, gk, gv) = backward_block(kernel, at.causal, block)?;
        let _ = q_rows(&dq).g_add_(&gq);
        // The block's dk/dv so far arrive (they travelled while the kernel ran), take this hop's
        // share and move on with the block; the last shift brings this rank's own home.
        let acc = match dkv.take() {
            Some(arriving) => arriving.wait()?,
            None => kv.zeros_like().to_kind(Kind::Float),
        };
        let _ = rows(&acc.get(0), 1, at.keys).g_add_(&gk);
        let _ = rows(&acc.get(1), 1, at.keys).g_add_(&gv);
        dkv = Some(ring.ring_shift_start(&acc)?);
        if let Some(next) = next {
            kv = next.wait()?;
        }
    }
    let dkv = dkv.expect("every hop shifts the gradients").wait()?;
    Ok((dq.to_kind(x.q.kind()), dkv.get(0).to_kind(x.k.kind()), dkv.get(1).to_kind(x.v.kind())))
}

/// Checks ring attention on this ring group against plain causal attention over the whole
/// sequence: every rank builds the same full q, k, v (GQA: 4 query and 2 KV heads), takes its
/// zigzag chunks, runs `forward` and `backward`, and compares output and q/k/v gradients with the
/// same rows of the local computation. Returns the largest relative difference and the tolerance
/// it must meet: fp32 with the CPU kernel, bf16 with flash on CUDA (which has no fp32 kernel;
/// 2e-2 of the largest entry, as the GPU tests hold the kernels).
pub fn check_against_local(ring: &dyn Collective, device: tch::Device) -> Result<(f64, f64), RingError> {
    use crate::model::llama::{AttentionCore, LocalAttention};
    let (size, rank) = (ring.size(), ring.rank());
    let (b, n_q, n_kv, d) = (2, 4, 2, 16);
    let s = 2 * size * 6;
    tch::manual_seed(23);
    let opts = (Kind::Float, device);
    let t = |heads| Tensor::randn([b, s as i64, heads, d], opts);
    let (q, k, v, g) = (t(n_q), t(n_kv), t(n_kv), t(n_q));
    let leaf = |t: &Tensor| t.detach().set_requires_grad(true);
    let (qf, kf, vf) = (leaf(&q), leaf(&k), leaf(&v));
    let reference = LocalAttention.attend(&qf, &kf, &vf);
    (&reference * &g).sum(Kind::Float).backward();

    // This rank's rows: its two zigzag chunks end to end.
    let [first, second] = crate::layout::ring_chunks(s, size, rank);
    let mine = |t: &Tensor| {
        let part = |r: &std::ops::Range<usize>| t.narrow(1, r.start as i64, r.len() as i64);
        Tensor::cat(&[part(&first), part(&second)], 1)
    };
    let (kernel, kind, tolerance) = match device {
        tch::Device::Cuda(_) => (FusedAttention::Flash, Kind::BFloat16, 2e-2),
        _ => (FusedAttention::CpuFlash, Kind::Float, 1e-5),
    };
    let mine = |t: &Tensor| mine(t).to_kind(kind);
    let (out, saved) = tch::no_grad(|| forward(ring, kernel, &mine(&q), &mine(&k), &mine(&v)))?;
    let (g, q, k, v) = (mine(&g), mine(&q), mine(&k), mine(&v));
    let x = Backward { grad_out: &g, q: &q, k: &k, v: &v, out: &out, saved: &saved };
    let (dq, dk, dv) = tch::no_grad(|| backward(ring, kernel, x))?;
    let rel = |a: &Tensor, b: &Tensor| {
        let a = a.to_kind(Kind::Float);
        (a - b.to_kind(Kind::Float)).abs().max().double_value(&[]) / b.abs().max().double_value(&[]).max(1e-12)
    };
    let worst = [
        rel(&out, &mine(&reference.detach())),
        rel(&dq, &mine(&qf.grad())),
        rel(&dk, &mine(&kf.grad())),
        rel(&dv, &mine(&vf.grad())),
    ]
    .into_iter()
    .fold(0.0, f64::max);
    Ok((worst, tolerance))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn close(a: &Tensor, b: &Tensor) -> bool {
        (a - b).abs().max().double_value(&[]) < 1e-6
    }

    #[test]
    fn merging_two_halves_of_the_keys_equals_attention_over_all_of_them() {
        tch::manual_seed(5);
        let opts = (Kind::Float, Device::Cpu);
        let (q, k, v) =
            (Tensor::randn([1, 6, 2, 8], opts), Tensor::randn([1, 10, 1, 8], opts), Tensor::randn([1, 10, 1, 8], opts));
        let kernel = FusedAttention::CpuFlash;
        let (whole, saved) = forward_block(kernel, false, &q, &k, &v).unwrap();
        let mut out = q.zeros_like();
        let mut lse = Tensor::full([1, 2, 6], f64::NEG_INFINITY, opts);
        for (start, len) in [(0, 4), (4, 6)] {
            let (o, s) = forward_block(kernel, false, &q, &k.narrow(1, start, len), &v.narrow(1, start, len)).unwrap();
            merge(&mut out, &mut lse, &o, &lse3(&s.lse, &o));
        }
        assert!(close(&out, &whole), "merged output");
        assert!(close(&lse, &lse3(&saved.lse, &whole)), "merged log-sum-exp");
    }

    #[test]
    fn rows_without_keys_merge_without_nan() {
        let opts = (Kind::Float, Device::Cpu);
        let inf = f64::NEG_INFINITY;
        // Row 0 has seen keys before; row 1 none so far. The block gives row 0 nothing (its
        // output NaN, as a kernel may write for an empty row) and row 1 one key.
        let mut out = Tensor::from_slice(&[2.0f32, 4.0, 0.0, 0.0]).view([1, 2, 1, 2]);
        let mut lse = Tensor::from_slice(&[0.5f32, inf as f32]).view([1, 1, 2]);
        let out_b = Tensor::from_slice(&[f32::NAN, f32::NAN, 3.0, -1.0]).view([1, 2, 1, 2]);
        let lse_b = Tensor::from_slice(&[inf as f32, 1.5]).view([1, 1, 2]);
        merge(&mut out, &mut lse, &out_b, &lse_b);
        assert_eq!(Vec::<f32>::try_from(out.flatten(0, -1)).unwrap(), [2.0, 4.0, 3.0, -1.0]);
        assert_eq!(Vec::<f32>::try_from(lse.flatten(0, -1)).unwrap(), [0.5, 1.5]);
        // A row with no key in either stays 0 with log-sum-exp −inf.
        let mut out = Tensor::zeros([1, 1, 1, 2], opts);
        let mut lse = Tensor::full([1, 1, 1], inf, opts);
        merge(&mut out, &mut lse, &Tensor::full([1, 1, 1, 2], f64::NAN, opts), &Tensor::full([1, 1, 1], inf, opts));
        assert_eq!(Vec::<f32>::try_from(out.flatten(0, -1)).unwrap(), [0.0, 0.0]);
        assert_eq!(lse.double_value(&[0, 0, 0]), inf);
    }

    #[test]
    fn a_ring_of_one_is_causal_attention() {
        let (err, tolerance) = check_against_local(&crate::comm::solo::Solo, Device::Cpu).unwrap();
        assert!(err < tolerance, "{err}");
    }
}
