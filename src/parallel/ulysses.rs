//! DeepSpeed-Ulysses attention: an all-to-all turns "my chunk of the sequence, all heads" into
//! "the whole sequence, my share of the heads", attention runs locally, and a second all-to-all
//! turns it back. With sp = 1 the all-to-alls are copies and this is plain local attention.
use crate::comm::{Collective, CommError};
use crate::model::llama::{AttentionCore, LocalAttention};
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
/// sequence, all-to-all back. `q [b, s/sp, n_q, d]`, `k, v [b, s/sp, n_kv, d]` -> `[b, s/sp, n_q, d]`.
pub fn attend(group: &dyn Collective, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor, CommError> {
    let sp = group.size();
    let qh = seq_to_heads(group, q)?;
    let kh = seq_to_heads(group, &replicate_kv(k, sp))?;
    let vh = seq_to_heads(group, &replicate_kv(v, sp))?;
    heads_to_seq(group, &LocalAttention.attend(&qh, &kh, &vh))
}

/// The Ulysses core behind the model's attention seam (forward passes: evaluation, inference).
pub struct UlyssesAttention<'a> {
    pub group: &'a dyn Collective,
}

impl AttentionCore for UlyssesAttention<'_> {
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        // The seam returns a tensor. Shapes were validated with the config (sp divides the heads),
        // so an error here is a dead peer or a broken invariant: the launcher's panic hook then
        // aborts every rank instead of leaving them in a collective.
        attend(self.group, q, k, v).unwrap_or_else(|e| panic!("Ulysses attention: {e}"))
    }
}
