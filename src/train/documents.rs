//! Packed documents in a run: which kernel attends within them (decided once, at start, with a
//! small trial of the masked kernel on this device at the run's head counts), and what a step's
//! samples cost (documents and Σ len², for the FLOP count and metrics.h5).
use super::step::MicroBatch;
use crate::config::{AttentionBackend, Experiment, FusedAttention};
use crate::data::{Documents, PackedDocuments};
use crate::ffi::attention as fused;
use crate::ffi::ShimError;
use crate::model::mask::DocumentMask;
use crate::model::spec::ModelSpec;
use crate::plan::Plan;
use anyhow::{anyhow, bail, Result};
use tch::{Device, Kind, Tensor};

/// The kernel that attends within documents, or None when the run ignores them. On CUDA the
/// kernel `parallel.attention` names is tried on two small documents with the head counts each
/// rank attends with after the all-to-all; with "auto", a cuDNN that refuses them gives way to
/// flash varlen (logged), otherwise the refusal ends the run with libtorch's message.
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
                "cuDNN varlen attention refused {} query / {} KV heads of {} ({e}); using flash varlen",
                heads.0,
                heads.1,
                heads.2
            );
            trial(FusedAttention::Flash, heads, kind, device)
                .map_err(|e| anyhow!("flash varlen attention refused the run's heads too: {e}"))?;
            Ok(Some(FusedAttention::Flash))
        }
        (Err(e), kernel, _) => {
            let other = if kernel == FusedAttention::Flash { "\"cudnn\"" } else { "\"flash\" or \"auto\"" };
            bail!(
                "data.documents = \"mask\": {} refused {} query / {} KV heads of {}: {e}; try parallel.attention = {other}",
                kernel.describe(true),
                heads.0,
                heads.1,
                heads.2
            )
        }
    }
}

/// Forward and backward of `kernel`'s masked form on two documents of 96 and 160 tokens.
fn trial(kernel: FusedAttention, (n_q, n_kv, d): (i64, i64, i64), kind: Kind, device: Device) -> Result<(), ShimError> {
    let docs = [Documents::from_starts(&[0, 96], 256)];
    let mask = DocumentMask::new(&docs, kernel, kind, device).expect("two documents make a mask");
    let t = |heads| Tensor::randn([1, 256, heads, d], (kind, device));
    let (q, k, v) = (t(n_q), t(n_kv), t(n_kv));
    tch::no_grad(|| {
        let (out, saved) = fused::forward_masked(&mask, &q, &k, &v)?;
        fused::backward_masked(&mask, &out, &q, &k, &v, &out, &saved).map(drop)
    })
}

/// What a step's micro batches cost: the documents attention ran over and Σ len² over them.
pub fn step_cost(batches: &[MicroBatch]) -> (f64, f64) {
    let docs = batches.iter().flat_map(|b| &b.documents);
    docs.fold((0.0, 0.0), |(n, squares), d| (n + d.count() as f64, squares + d.square_sum()))
}
