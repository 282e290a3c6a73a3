//! DeepSpeed-Ulysses attention: an all-to-all turns "my chunk of the sequence, all heads" into
//! "the whole sequence, my share of the heads", attention runs locally, and a second all-to-all
//! turns it back. With sp = 1 the all-to-alls are copies and this is plain local attention.
use crate::comm::{Collective, CommError};
use crate::ffi::attention::forward_masked;
use crate::model::llama::{AttentionCore, LocalAttention};
use crate::model::mask::DocumentMask;
use tch::Tensor;

/// `[b, s/sp, H, d]` (sequence-sharded) -> `[b, s, H/sp, d]` (head-sharded).
pub fn seq_to_heads(c: &dyn Collective, x: &Tensor) -> Result<Tensor, CommError> {
    let sp = c.size() as i64;
    let (b, s_local, heads, d) = x.size4().expect("attention tensors are [b, s, heads, d]");
    let heads_local = heads / sp;
    // [b, s/sp, H, d] -> [sp, b, s/sp, H/sp, d]: block p holds the heads rank p will own.
    let send = x.view([b, s_local, sp, heads_local, d]).permute([2, 0, 1, 3, 4]).contiguous();
    // Block p of the result came from rank p: its chunk of the sequence, our heads.
    let recv = c.all_to_all(&send)?;
    // [sp, b, s/sp, H/sp, d] -> [b, s, H/sp, d] (source-rank order is sequence order)
    Ok(recv.permute([1, 0, 2, 3, 4]).reshape([b, sp * s_local, heads_local, d]))
}

/// `[b, s, H/sp, d]` (head-sharded) -> `[b, s/sp, H, d]` (sequence-sharded); inverse of `seq_to_heads`.
pub fn heads_to_seq(c: &dyn Collective, x: &Tensor) -> Result<Tensor, CommError> {
    let sp = c.size() as i64;
    let (b, s, heads_local, d) = x.size4().expect("attention tensors are [b, s, heads, d]");
    let s_local = s / sp;
    // [b, s, H/sp, d] -> [sp, b, s/sp, H/sp, d]: block p is rank p's chunk of the sequence.
    let send = x.view([b, sp, s_local, heads_local, d]).permute([1, 0, 2, 3, 4]).contiguous();
    // Block p of the result holds head group p of our chunk.
    let recv = c.all_to_all(&send)?;
    // [sp, b, s/sp, H/sp, d] -> [b, s/sp, sp·H/sp, d]
    Ok(recv.permute([1, 2, 0, 3, 4]).reshape([b, s_local, sp * heads_local, d]))
}

/// KV heads each rank needs: when there are fewer KV heads than SP ranks, every KV head is
/// repeated so that rank p receives the head its query heads attend with.
/// `[b, s, n_kv, d] -> [b, s, max(n_kv, sp), d]`.
pub fn replicate_kv(k: &Tensor, sp: usize) -> Tensor {
    let n_kv = k.size()[2] as usize;
    if n_kv >= sp {
        return k.shallow_clone();
    }
    k.repeat_interleave_self_int((sp / n_kv) as i64, Some(2), None)
}

/// Attention over the SP group: all-to-all q, k, v to head shards, causal attention over the whole
/// sequence (within its documents when `mask` is given), all-to-all back. `q [b, s/sp, n_q, d]`,
/// `k, v [b, s/sp, n_kv, d]` -> `[b, s/sp, n_q, d]`. No autograd through the masked kernel.
pub fn attend(
    group: &dyn Collective,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&DocumentMask>,
) -> Result<Tensor, String> {
    let sp = group.size();
    let heads = |t: &Tensor| seq_to_heads(group, t).map_err(|e| e.to_string());
    let (qh, kh, vh) = (heads(q)?, heads(&replicate_kv(k, sp))?, heads(&replicate_kv(v, sp))?);
    let oh = match mask {
        Some(mask) => forward_masked(mask, &qh, &kh, &vh).map_err(|e| e.to_string())?.0,
        None => LocalAttention.attend(&qh, &kh, &vh),
    };
    heads_to_seq(group, &oh).map_err(|e| e.to_string())
}

/// The Ulysses core behind the model's attention seam (forward passes: evaluation, inference).
pub struct UlyssesAttention<'a> {
    pub group: &'a dyn Collective,
    /// The sequence's documents when attention stays within them.
    pub mask: Option<&'a DocumentMask>,
}

impl AttentionCore for UlyssesAttention<'_> {
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        // The seam returns a tensor. Shapes were validated with the config (sp divides the heads),
        // so an error here is a dead peer or a broken invariant: the launcher's panic hook then
        // aborts every rank instead of leaving them in a collective.
        attend(self.group, q, k, v, self.mask).unwrap_or_else(|e| panic!("Ulysses attention: {e}"))
    }
}

/// Checks the Ulysses core on this SP group against plain attention over the whole sequence:
/// every rank builds the same full q, k, v (GQA with 8 query and 2 KV heads, so an SP group of 4
/// replicates KV heads), attends over its chunk with the all-to-alls, backpropagates a fixed
/// output gradient through them, and compares output and q/k/v gradients with the same slice of
/// the local computation. Returns the largest relative difference.
pub fn check_against_local(group: &dyn Collective, device: tch::Device) -> Result<f64, CommError> {
    use tch::Kind;
    let (sp, rank) = (group.size() as i64, group.rank() as i64);
    let (b, s, n_q, n_kv, d) = (2, 12 * sp, 8, 2, 16);
    tch::manual_seed(17);
    let opts = (Kind::Float, device);
    let (q, k, v) = (
        Tensor::randn([b, s, n_q, d], opts),
        Tensor::randn([b, s, n_kv, d], opts),
        Tensor::randn([b, s, n_kv, d], opts),
    );
    let grad_out = Tensor::randn([b, s, n_q, d], opts);
    let leaf = |t: &Tensor| t.detach().set_requires_grad(true);

    // Reference: local attention over the whole sequence.
    let (qf, kf, vf) = (leaf(&q), leaf(&k), leaf(&v));
    let out = LocalAttention.attend(&qf, &kf, &vf);
    (&out * &grad_out).sum(Kind::Float).backward();

    // Ulysses: this rank's chunk [b, s/sp, heads, d], the same segments as the training step.
    let chunk = |t: &Tensor| t.narrow(1, rank * (s / sp), s / sp);
    let (qc, kc, vc) = (leaf(&chunk(&q)), leaf(&chunk(&k)), leaf(&chunk(&v)));
    let (kr, vr) = (replicate_kv(&kc, sp as usize), replicate_kv(&vc, sp as usize));
    let (qh, kh, vh) =
        (leaf(&seq_to_heads(group, &qc)?), leaf(&seq_to_heads(group, &kr)?), leaf(&seq_to_heads(group, &vr)?));
    let oh = LocalAttention.attend(&qh, &kh, &vh);
    let o = heads_to_seq(group, &oh.detach())?;
    (&oh * &seq_to_heads(group, &chunk(&grad_out).contiguous())?).sum(Kind::Float).backward();
    let (gq, gk, gv) =
        (heads_to_seq(group, &qh.grad())?, heads_to_seq(group, &kh.grad())?, heads_to_seq(group, &vh.grad())?);
    ((&qc * gq).sum(Kind::Float) + (&kr * gk).sum(Kind::Float) + (&vr * gv).sum(Kind::Float)).backward();

    let rel =
        |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[]).max(1e-12);
    Ok([
        rel(&o, &chunk(&out)),
        rel(&qc.grad(), &chunk(&qf.grad())),
        rel(&kc.grad(), &chunk(&kf.grad())),
        rel(&vc.grad(), &chunk(&vf.grad())),
    ]
    .into_iter()
    .fold(0.0, f64::max))
}
