//! Packed documents in a run: which kernel attends within them (decided once, at start, with a
//! small trial of the masked kernel on this device at the run's head counts), and what a step's
//! samples cost (documents and Σ len², for the FLOP count and metrics.h5).
use super::step::MicroBatch;
use crate::config::{AttentionBackend, Experiment, FusedAttention};
use crate::data::{Documents, PackedDocuments};
use crate::ffi::attention as fused;
use crate::ffi::ShimError;
use crate::model::llama::AttentionCore;
use crate::model::mask::{dense_mask, DocumentMask, MaskedAttention};
use crate::model::spec::ModelSpec;
use crate::plan::Plan;
use anyhow::{anyhow, bail, Result};
use tch::{Device, Kind, Tensor};

/// The kernel that attends within documents, or None when the run ignores them. On CUDA the
/// kernel `parallel.attention` names is tried on two small documents with the head counts each
/// rank attends with after the all-to-all, and its results checked (`trial`); with "auto", a
/// cuDNN that refuses them or gets them wrong gives way to flash varlen (logged), otherwise that
/// ends the run with the reason.
pub fn kernel(
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

/// What a step's micro batches cost: the documents attention ran over and Σ len² over them.
pub fn step_cost(batches: &[MicroBatch]) -> (f64, f64) {
    let docs = batches.iter().flat_map(|b| &b.documents);
    docs.fold((0.0, 0.0), |(n, squares), d| (n + d.count() as f64, squares + d.square_sum()))
}
