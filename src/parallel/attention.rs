//! Which attention kernel runs, and why, in one place:
//! - the fused kernels libtorch's SDPA may pick from (`allow_sdp_kernels`, from
//!   `parallel.attention`);
//! - each layer's path (`AttentionPath`): the fused kernel's output kept for backward, attention
//!   recomputed in backward, or skipped by a memory-fit run, as the memory plan placed it;
//! - with packed documents, the kernel that attends within them (`document_kernel`), decided once
//!   at start with a small trial of the masked kernel on this device at the run's head counts
//!   (`trial`).
use crate::config::{AttentionBackend, Experiment, FusedAttention};
use crate::data::{Documents, PackedDocuments};
use crate::ffi::attention as fused;
use crate::ffi::cuda::set_sdp_backends;
use crate::ffi::ShimError;
use crate::model::llama::AttentionCore;
use crate::model::mask::{dense_mask, DocumentMask, MaskedAttention};
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

/// The kernel that attends within documents, or None when the run ignores them. On CUDA the
/// kernel `parallel.attention` names is tried on two small documents with the head counts each
/// rank attends with after the all-to-all, and its results checked (`trial`); with "auto", a
/// cuDNN that refuses them or gets them wrong gives way to flash varlen (logged), otherwise that
/// ends the run with the reason.
pub fn document_kernel(
    exp: &Experiment,
    spec: &ModelSpec,
    world: usize,
    kind: Kind,
    device: Device,
) -> Result<Option<FusedAttention>> {
    if exp.data.documents == PackedDocuments::Ignore {
        return Ok(None);
    }
    let p = &exp.parallel;
    let first = p.fused_attention().ok_or_else(|| {
        anyhow!("data.documents = \"mask\" needs parallel.attention = \"auto\", \"cudnn\" or \"flash\"")
    })?;
    if !device.is_cuda() {
        return Ok(Some(first));
    }
    let plan = Plan::new(p, exp.data.seq_len, spec, world);
    let heads = (plan.q_heads_local, plan.kv_heads_local, spec.head_dim);
    match (trial(first, heads, kind, device), first, p.attention) {
        (Ok(()), _, _) => Ok(Some(first)),
        (Err(e), FusedAttention::Cudnn, AttentionBackend::Auto) => {
            log::warn!(
                "cuDNN varlen attention cannot be used for {} query / {} KV heads of {} ({e}); using flash varlen",
                heads.0,
                heads.1,
                heads.2
            );
            trial(FusedAttention::Flash, heads, kind, device)
                .map_err(|e| anyhow!("flash varlen attention cannot be used for the run's heads either: {e}"))?;
            Ok(Some(FusedAttention::Flash))
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
    let mask = DocumentMask::new(&docs, kernel, kind, device).expect("three documents make a mask");
    tch::manual_seed(7);
    let t = |heads| Tensor::randn([2, 256, heads, d], (kind, device));
    let (q, k, v, g) = (t(n_q), t(n_kv), t(n_kv), t(n_q));
    let got = tch::no_grad(|| -> Result<[Tensor; 4], ShimError> {
        let (out, saved) = fused::forward_masked(&mask, &q, &k, &v)?;
        let (dq, dk, dv) = fused::backward_masked(&mask, &g, &q, &k, &v, &out, &saved)?;
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
