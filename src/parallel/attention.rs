//! Which attention kernel runs, and why, in one place:
//! - the fused kernels libtorch's SDPA may pick from (`allow_sdp_kernels`, from
//!   `parallel.attention`);
//! - each layer's path (`AttentionPath`): the fused kernel's output kept for backward, attention
//!   recomputed in backward, or skipped by a memory-fit run, as the memory plan placed it;
//! - with packed documents, the kernels that attend within them (`document_kernels`), decided
//!   once at start with a small trial of the varlen kernel on this device at the run's head counts
//!   (`trial`), and which of them attends which documents of a micro batch (`pieces`): the causal
//!   kernel on long documents, the varlen kernel on runs of short ones (`document_mask`).
use crate::config::{AttentionBackend, DocumentKernels, Experiment, FusedAttention};
use crate::data::{Documents, PackedDocuments};
use crate::ffi::attention as fused;
use crate::ffi::cuda::set_sdp_backends;
use crate::ffi::ShimError;
use crate::model::llama::AttentionCore;
use crate::model::mask::{dense_mask, DocumentMask, MaskedAttention, Piece};
use crate::model::spec::ModelSpec;
use crate::plan::memory::Place;
use crate::plan::Plan;
use anyhow::{anyhow, bail, Result};
use tch::{Device, Kind, Tensor};
/// Which fused kernels libtorch's SDPA may pick from, as `parallel.attention` says.
pub fn allow_sdp_kernels(backend: AttentionBackend) {
    let (flash, efficient, math, cudnn) = match backend {
        AttentionBackend::Auto => (true, true, true, true),
        AttentionBackend::Cudnn => (false, false, false, true),
        AttentionBackend::Flash => (true, false, false, false),
        AttentionBackend::Efficient => (false, true, false, false),
        AttentionBackend::Math => (false, false, true, false),
    };
    set_sdp_backends(flash, efficient, math, cudnn);
}

/// How a layer's attention is done, decided once per layer from the memory plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionPath {
    /// The fused kernel's output and log-sum-exp wait in `place`; backward calls the fused
    /// attention backward without recomputing the attention forward.
    Kept { kernel: FusedAttention, place: Place },
    /// Backward recomputes the attention forward with a graph (no room to keep it, or no fused
    /// kernel with a log-sum-exp).
    Recomputed,
    /// A memory-fit run (`train.memory_fit`): no attention kernel at all, zeros of the same sizes
    /// instead, kept in `keep` where the real run would keep them, so that every allocation of
    /// the real step still happens.
    Skipped { keep: Option<Place> },
}

impl AttentionPath {
    /// The path for a layer the plan gives `kept` (where its attention output waits, None: no
    /// room), with the run's fused kernel; `skip` for the layers a memory-fit run skips.
    pub fn choose(kernel: Option<FusedAttention>, kept: Option<Place>, skip: bool) -> AttentionPath {
        match (kernel.zip(kept), skip) {
            (keep, true) => AttentionPath::Skipped { keep: keep.map(|(_, place)| place) },
            (Some((kernel, place)), false) => AttentionPath::Kept { kernel, place },
            (None, false) => AttentionPath::Recomputed,
        }
    }

    /// Where the attention output waits between forward and backward, if anywhere.
    pub(crate) fn keeps(self) -> Option<Place> {
        match self {
            AttentionPath::Kept { place, .. } | AttentionPath::Skipped { keep: Some(place) } => Some(place),
            AttentionPath::Recomputed | AttentionPath::Skipped { keep: None } => None,
        }
    }
}

/// The kernels that attend within documents, or None when the run ignores them: the run's causal
/// kernel on documents of at least `parallel.per_document_min_len` tokens, and the varlen kernel.
/// On CUDA the varlen kernel `parallel.attention` names is tried on two small documents with the
/// head counts each rank attends with after the all-to-all, and its results checked (`trial`);
/// with "auto", a cuDNN that refuses them or gets them wrong gives way to flash varlen (logged),
/// otherwise that ends the run with the reason.
pub fn document_kernels(
    exp: &Experiment,
    spec: &ModelSpec,
    world: usize,
    kind: Kind,
    device: Device,
) -> Result<Option<DocumentKernels>> {
    if exp.data.documents == PackedDocuments::Ignore {
        return Ok(None);
    }
    let p = &exp.parallel;
    let first = p.fused_attention().ok_or_else(|| {
        anyhow!("data.documents = \"mask\" needs parallel.attention = \"auto\", \"cudnn\" or \"flash\"")
    })?;
    let kernels = |varlen| Some(DocumentKernels { varlen, causal: first, min_len: p.per_document_min_len });
    if !device.is_cuda() {
        return Ok(kernels(first));
    }
    let plan = Plan::new(p, exp.data.seq_len, spec, world);
    let heads = (plan.q_heads_local, plan.kv_heads_local, spec.head_dim);
    match (trial(first, heads, kind, device), first, p.attention) {
        (Ok(()), _, _) => Ok(kernels(first)),
        (Err(e), FusedAttention::Cudnn, AttentionBackend::Auto) => {
            log::warn!(
                "cuDNN varlen attention cannot be used for {} query / {} KV heads of {} ({e}); using flash varlen",
                heads.0,
                heads.1,
                heads.2
            );
            trial(FusedAttention::Flash, heads, kind, device)
                .map_err(|e| anyhow!("flash varlen attention cannot be used for the run's heads either: {e}"))?;
            Ok(kernels(FusedAttention::Flash))
        }
        (Err(e), kernel, _) => {
            let other = if kernel == FusedAttention::Flash { "\"cudnn\"" } else { "\"flash\" or \"auto\"" };
            bail!(
                "data.documents = \"mask\": {} cannot be used for {} query / {} KV heads of {}: {e}; try parallel.attention = {other}",
                kernel.describe(true),
                heads.0,
                heads.1,
                heads.2
            )
        }
    }
}

/// How a micro batch's documents (`docs`, one entry per sample, laid end to end) are attended,
/// in token order: each run of consecutive documents of one length of at least `min_len` tokens
/// by the causal kernel in one call (documents as its batch), each run of shorter ones by the
/// varlen kernel in one call (`min_len` 0: every document by varlen, one call). The causal kernel
/// is the faster on long documents (cuDNN's causal at 465 TFLOP/s in a 128K step against flash
/// varlen's 277 on 32K-token documents, one H100, 2026-12-06), while one varlen call beats
/// thousands of tiny causal ones and takes any length.
pub fn pieces(docs: &[Documents], min_len: usize) -> Vec<Piece> {
    let mut pieces: Vec<Piece> = Vec::new();
    let mut start = 0;
    for len in docs.iter().flat_map(Documents::lens) {
        let long = min_len > 0 && len >= min_len;
        match pieces.last_mut() {
            Some(Piece::Causal { count, len: l, .. }) if long && *l == len => *count += 1,
            Some(Piece::Varlen { lens, .. }) if !long => lens.push(len),
            _ if long => pieces.push(Piece::Causal { start, count: 1, len }),
            _ => pieces.push(Piece::Varlen { start, lens: vec![len] }),
        }
        start += len;
    }
    pieces
}

/// The micro batch's `DocumentMask` for `docs` by `kernels`' rule (`pieces`); None when every
/// sample is one document.
pub fn document_mask(docs: &[Documents], kernels: DocumentKernels, kind: Kind, device: Device) -> Option<DocumentMask> {
    if docs.iter().all(|d| d.count() == 1) {
        return None;
    }
    let pieces = pieces(docs, kernels.min_len);
    if log::log_enabled!(log::Level::Debug) {
        let causal: usize = pieces.iter().map(|p| if let Piece::Causal { count, .. } = p { *count } else { 0 }).sum();
        let all: usize = docs.iter().map(Documents::count).sum();
        log::debug!(
            "micro batch of {all} documents: {causal} by {}, {} by {}, in {} kernel calls",
            kernels.causal.describe(false),
            all - causal,
            kernels.varlen.describe(true),
            pieces.len()
        );
    }
    DocumentMask::new(docs, &pieces, kernels, kind, device)
}

/// Forward and backward of `kernel`'s masked form on a micro batch of two samples of 256 tokens
/// (documents of 1, 95 and 160 tokens; one whole sample), against block-diagonal causal attention
/// by SDPA with a dense mask in fp32 on the same inputs. A kernel that refuses the heads, or that
/// runs but computes something else, is not used: cuDNN varlen did the latter on one H200 with
/// libtorch 2.11 and cuDNN 9.19 (2026-12-01, tests/masked_attention.rs: differences of 1e35 on
/// several samples per micro batch).
pub fn trial(
    kernel: FusedAttention,
    (n_q, n_kv, d): (i64, i64, i64),
    kind: Kind,
    device: Device,
) -> Result<(), String> {
    let docs = [Documents::from_starts(&[0, 1, 96], 256), Documents::whole(256)];
    // Every document by the varlen kernel: it is the one on trial.
    let kernels = DocumentKernels { varlen: kernel, causal: kernel, min_len: 0 };
    let mask = document_mask(&docs, kernels, kind, device).expect("three documents make a mask");
    tch::manual_seed(7);
    let t = |heads| Tensor::randn([2, 256, heads, d], (kind, device));
    let (q, k, v, g) = (t(n_q), t(n_kv), t(n_kv), t(n_q));
    let got = tch::no_grad(|| -> Result<[Tensor; 4], ShimError> {
        let (out, saved) = fused::forward_masked(&mask, &q, &k, &v)?;
        let (dq, dk, dv) = fused::backward_masked(
            &mask,
            fused::Backward { grad_out: &g, q: &q, k: &k, v: &v, out: &out, saved: &saved },
        )?;
        Ok([out, dq, dk, dv])
    })
    .map_err(|e| e.to_string())?;
    let leaf = |x: &Tensor| x.to_kind(Kind::Float).detach().set_requires_grad(true);
    let (qf, kf, vf) = (leaf(&q), leaf(&k), leaf(&v));
    let dense = dense_mask(&docs, Kind::Float, device);
    let out = MaskedAttention { mask: &dense }.attend(&qf, &kf, &vf);
    (&out * g.to_kind(Kind::Float)).sum(Kind::Float).backward();
    // bf16 keeps 8 bits of mantissa: 2e-2 of the largest entry, as the GPU tests hold the kernels.
    let tolerance = if kind == Kind::Float { 1e-4 } else { 2e-2 };
    for (name, got, want) in [
        ("output", &got[0], out.detach()),
        ("dq", &got[1], qf.grad()),
        ("dk", &got[2], kf.grad()),
        ("dv", &got[3], vf.grad()),
    ] {
        let scale = want.abs().max().double_value(&[]).max(1e-12);
        let diff = (got.to_kind(Kind::Float) - &want).abs().max().double_value(&[]) / scale;
        if !(diff <= tolerance) {
            return Err(format!("its {name} differs from attention within each document by {diff:.2e} of the largest entry (tolerance {tolerance:.0e})"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_documents_go_to_the_causal_kernel_in_runs_of_equal_length() {
        // Sample 1: 3, 1, 8, 8 tokens; sample 2: 8, 8, 4, 4, 8 — laid end to end.
        let docs = [Documents::from_starts(&[0, 3, 4, 12], 20), Documents::from_starts(&[0, 8, 16, 20, 24], 32)];
        let causal = |start, count, len| Piece::Causal { start, count, len };
        let varlen = |start, lens: &[usize]| Piece::Varlen { start, lens: lens.to_vec() };
        assert_eq!(
            pieces(&docs, 8),
            [varlen(0, &[3, 1]), causal(4, 4, 8), varlen(36, &[4, 4]), causal(44, 1, 8)],
            "equal long documents batch across the samples' boundary"
        );
        assert_eq!(pieces(&docs, 4), [varlen(0, &[3, 1]), causal(4, 4, 8), causal(36, 2, 4), causal(44, 1, 8)]);
        assert_eq!(pieces(&docs, 0), [varlen(0, &[3, 1, 8, 8, 8, 8, 4, 4, 8])], "0: everything by varlen");
        assert_eq!(pieces(&docs, 9), [varlen(0, &[3, 1, 8, 8, 8, 8, 4, 4, 8])]);
        assert!(pieces(&docs, 3).iter().map(Piece::tokens).sum::<usize>() == 52);
    }
}
