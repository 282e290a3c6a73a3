//! Block-diagonal causal attention over the documents of packed samples: a token attends only to
//! the earlier tokens of its own document. [`DocumentMask`] is one micro batch's documents in the
//! form a masked kernel takes them (`ffi::attention::forward_masked`); [`MaskedAttention`] is the
//! readable reference behind the attention seam, SDPA with a dense mask. Both are built from the
//! same plain `data::Documents`, identical on every SP rank: after the all-to-all each rank
//! attends over the whole sequence, so each needs the whole sample's boundaries.
use super::llama::AttentionCore;
use crate::config::FusedAttention;
use crate::data::Documents;
use tch::{Device, Kind, Tensor};

/// One micro batch's documents as `kernel` takes them. Built only when some sample holds more
/// than one document: a micro batch of single-document samples runs the plain causal kernel,
/// bit for bit the path without documents.
pub struct DocumentMask {
    /// The masked kernel it is built for: cuDNN and flash varlen take the cumulative lengths, the
    /// CPU flash kernel the dense mask.
    pub kernel: FusedAttention,
    /// int32 `[documents + 1]` on the device: where each document begins in the micro batch's
    /// samples laid end to end (sample i's positions start at `i·s`), then the total.
    pub cu_seqlens: Tensor,
    /// The longest document.
    pub max_len: i64,
    /// CPU flash only (undefined otherwise): additive `[b, 1, s, s]` in the compute dtype.
    pub dense: Tensor,
}

impl DocumentMask {
    /// None when every sample of `docs` is one document.
    pub fn new(docs: &[Documents], kernel: FusedAttention, kind: Kind, device: Device) -> Option<DocumentMask> {
        if docs.iter().all(|d| d.count() == 1) {
            return None;
        }
        let mut cu = Vec::with_capacity(docs.iter().map(Documents::count).sum::<usize>() + 1);
        let mut offset = 0;
        for d in docs {
            cu.extend(d.starts().iter().map(|&s| (offset + s) as i32));
            offset += d.seq_len();
        }
        cu.push(offset as i32);
        let max_len = docs.iter().map(Documents::max_len).max().unwrap_or(0) as i64;
        let dense = match kernel {
            FusedAttention::CpuFlash => dense_mask(docs, kind, device),
            FusedAttention::Cudnn | FusedAttention::Flash => Tensor::new(),
        };
        Some(DocumentMask { kernel, cu_seqlens: Tensor::from_slice(&cu).to_device(device), max_len, dense })
    }
}

/// The additive block-diagonal causal mask `[b, 1, s, s]` of `docs` (one entry per sample):
/// 0 where query i may attend key j (same document, j ≤ i), -inf elsewhere. s² entries per
/// sample: the CPU's kernels and tests, never a long sequence on a GPU.
pub fn dense_mask(docs: &[Documents], kind: Kind, device: Device) -> Tensor {
    let s = docs.first().map_or(0, Documents::seq_len) as i64;
    // Each position's document index, [b, s].
    let ids: Vec<i64> = docs
        .iter()
        .flat_map(|d| d.lens().enumerate().flat_map(|(j, len)| std::iter::repeat_n(j as i64, len)))
        .collect();
    let doc = Tensor::from_slice(&ids).view([docs.len() as i64, s]).to_device(device);
    // [b, s, 1] == [b, 1, s] -> [b, s, s], and j <= i
    let same = doc.unsqueeze(2).eq_tensor(&doc.unsqueeze(1));
    let causal = Tensor::ones([s, s], (Kind::Bool, device)).tril(0);
    let allowed = same.logical_and(&causal).unsqueeze(1);
    Tensor::zeros(allowed.size(), (kind, device)).masked_fill(&allowed.logical_not(), f64::NEG_INFINITY)
}

/// Block-diagonal causal attention by SDPA with a dense mask (`dense_mask`): the readable
/// reference, with autograd, for `train::reference` and CPU forward passes.
pub struct MaskedAttention<'a> {
    /// `[b, 1, s, s]` additive, as `dense_mask` builds it.
    pub mask: &'a Tensor,
}

impl AttentionCore for MaskedAttention<'_> {
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let gqa = q.size()[2] != k.size()[2];
        // [b, s, heads, d] -> [b, heads, s, d]
        let (q, k, v) = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2));
        let out = Tensor::scaled_dot_product_attention(&q, &k, &v, Some(self.mask), 0.0, false, None, gqa);
        // [b, n_q, s, d] -> [b, s, n_q, d]
        out.transpose(1, 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::llama::LocalAttention;

    #[test]
    fn masked_attention_equals_attention_over_each_document_alone() {
        tch::manual_seed(4);
        let opts = (Kind::Float, Device::Cpu);
        let (s, n_q, n_kv, d) = (11, 4, 2, 8);
        let docs = [Documents::from_starts(&[0, 4, 5], s as usize), Documents::whole(s as usize)];
        let (q, k, v) = (
            Tensor::randn([2, s, n_q, d], opts),
            Tensor::randn([2, s, n_kv, d], opts),
            Tensor::randn([2, s, n_kv, d], opts),
        );
        let mask = dense_mask(&docs, Kind::Float, Device::Cpu);
        let out = MaskedAttention { mask: &mask }.attend(&q, &k, &v);
        for (b, doc) in docs.iter().enumerate() {
            for (&start, len) in doc.starts().iter().zip(doc.lens()) {
                let part = |t: &Tensor| t.narrow(0, b as i64, 1).narrow(1, start as i64, len as i64);
                let alone = LocalAttention.attend(&part(&q), &part(&k), &part(&v));
                let diff = (alone - part(&out)).abs().max().double_value(&[]);
                assert!(diff < 1e-6, "sample {b}, document at {start}: {diff}");
            }
        }
    }

    #[test]
    fn the_kernels_mask_lists_every_document_of_the_micro_batch() {
        let docs = [Documents::from_starts(&[3], 8), Documents::whole(8)];
        let m = DocumentMask::new(&docs, FusedAttention::Flash, Kind::Float, Device::Cpu).unwrap();
        assert_eq!(Vec::<i32>::try_from(&m.cu_seqlens).unwrap(), vec![0, 3, 8, 16]);
        assert_eq!((m.max_len, m.dense.defined()), (8, false));
        let cpu = DocumentMask::new(&docs, FusedAttention::CpuFlash, Kind::Float, Device::Cpu).unwrap();
        assert_eq!(cpu.dense.size(), [2, 1, 8, 8]);
        assert!(DocumentMask::new(&[Documents::whole(8)], FusedAttention::CpuFlash, Kind::Float, Device::Cpu).is_none());
    }
}
