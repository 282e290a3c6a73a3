//! Block-diagonal causal attention over the documents of packed samples: a token attends only to
//! the earlier tokens of its own document. [`DocumentMask`] is one micro batch's documents as the
//! kernel calls that attend within them (`ffi::attention::forward_masked`): the causal kernel on
//! long documents, a varlen kernel on runs of short ones ([`Piece`]); [`MaskedAttention`] is the
//! readable reference behind the attention seam, SDPA with a dense mask. Both are built from the
//! same plain `data::Documents`, identical on every SP rank: after the all-to-all each rank
//! attends over the whole sequence, so each needs the whole sample's boundaries.
use super::llama::AttentionCore;
use crate::config::{DocumentKernels, FusedAttention};
use crate::data::Documents;
use tch::{Device, Kind, Tensor};

/// A stretch of a micro batch's tokens (its samples laid end to end) and the kernel call that
/// attends within its documents; `parallel::attention::pieces` cuts a micro batch into these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// `count` consecutive documents of `len` tokens each from token `start`: the causal kernel,
    /// one call with the documents as its batch (a view, no copy).
    Causal { start: usize, count: usize, len: usize },
    /// The consecutive documents of lengths `lens` from token `start`: one varlen call.
    Varlen { start: usize, lens: Vec<usize> },
}

impl Piece {
    /// Its tokens.
    pub fn tokens(&self) -> usize {
        match self {
            Piece::Causal { count, len, .. } => count * len,
            Piece::Varlen { lens, .. } => lens.iter().sum(),
        }
    }
}

/// One kernel call of a `DocumentMask`, in the form the kernel takes it.
pub enum Call {
    /// `count` documents of `len` tokens from token `start`, by the causal kernel.
    Causal { start: i64, count: i64, len: i64 },
    /// `tokens` tokens from `start` by the varlen kernel.
    Varlen {
        start: i64,
        tokens: i64,
        /// int32 `[documents + 1]` on the device: where each document of the stretch begins,
        /// then its length (cuDNN and flash varlen).
        cu_seqlens: Tensor,
        /// The stretch's longest document.
        max_len: i64,
        /// CPU flash only (undefined otherwise): additive `[1, 1, tokens, tokens]` in the compute
        /// dtype.
        dense: Tensor,
    },
}

impl Call {
    /// Its first token in the micro batch.
    pub fn start(&self) -> i64 {
        match self {
            Call::Causal { start, .. } | Call::Varlen { start, .. } => *start,
        }
    }
}

/// One micro batch's documents as the kernels take them. Built only when some sample holds more
/// than one document: a micro batch of single-document samples runs the plain causal kernel,
/// bit for bit the path without documents.
pub struct DocumentMask {
    pub kernels: DocumentKernels,
    /// The kernel calls, in token order; together they cover the micro batch.
    pub calls: Vec<Call>,
}

impl DocumentMask {
    /// None when every sample of `docs` is one document; else the calls of `pieces`, which
    /// cover `docs`' samples laid end to end.
    pub fn new(
        docs: &[Documents],
        pieces: &[Piece],
        kernels: DocumentKernels,
        kind: Kind,
        device: Device,
    ) -> Option<DocumentMask> {
        if docs.iter().all(|d| d.count() == 1) {
            return None;
        }
        let calls = pieces
            .iter()
            .map(|piece| match piece {
                &Piece::Causal { start, count, len } => {
                    Call::Causal { start: start as i64, count: count as i64, len: len as i64 }
                }
                Piece::Varlen { start, lens } => {
                    let mut cu = vec![0i32];
                    cu.extend(lens.iter().scan(0, |end, &l| {
                        *end += l;
                        Some(*end as i32)
                    }));
                    let tokens = piece.tokens();
                    let dense = match kernels.varlen {
                        FusedAttention::CpuFlash => {
                            let starts: Vec<usize> = cu[..lens.len()].iter().map(|&c| c as usize).collect();
                            dense_mask(&[Documents::from_starts(&starts, tokens)], kind, device)
                        }
                        FusedAttention::Cudnn | FusedAttention::Flash => Tensor::new(),
                    };
                    Call::Varlen {
                        start: *start as i64,
                        tokens: tokens as i64,
                        cu_seqlens: Tensor::from_slice(&cu).to_device(device),
                        max_len: lens.iter().copied().max().unwrap_or(0) as i64,
                        dense,
                    }
                }
            })
            .collect();
        Some(DocumentMask { kernels, calls })
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
    fn the_kernels_mask_lists_every_document_of_each_varlen_call() {
        let docs = [Documents::from_starts(&[3], 8), Documents::whole(8)];
        let pieces = [Piece::Varlen { start: 0, lens: vec![3, 5] }, Piece::Causal { start: 8, count: 1, len: 8 }];
        let kernels = |varlen| DocumentKernels { varlen, causal: FusedAttention::CpuFlash, min_len: 8 };
        let m = DocumentMask::new(&docs, &pieces, kernels(FusedAttention::Flash), Kind::Float, Device::Cpu).unwrap();
        match &m.calls[..] {
            [Call::Varlen { start: 0, tokens: 8, cu_seqlens, max_len: 5, dense }, Call::Causal { start: 8, count: 1, len: 8 }] =>
            {
                assert_eq!(Vec::<i32>::try_from(cu_seqlens).unwrap(), vec![0, 3, 8]);
                assert!(!dense.defined());
            }
            _ => panic!("two calls: varlen over the first sample, causal over the second"),
        }
        let cpu =
            DocumentMask::new(&docs, &pieces, kernels(FusedAttention::CpuFlash), Kind::Float, Device::Cpu).unwrap();
        match &cpu.calls[0] {
            Call::Varlen { dense, .. } => assert_eq!(dense.size(), [1, 1, 8, 8]),
            Call::Causal { .. } => panic!("the first call is varlen"),
        }
        let whole = [Documents::whole(8)];
        let one = [Piece::Causal { start: 0, count: 1, len: 8 }];
        assert!(DocumentMask::new(&whole, &one, kernels(FusedAttention::CpuFlash), Kind::Float, Device::Cpu).is_none());
    }
}
