//! The report of `ulysses check` for a valid experiment: the plan and, for a GPU run, the memory
//! estimate placed within the budgets the flags (or `[memory]`) give, and the longest sequence
//! that fits them.
use super::memory::{self, longest_fit, Budget, Estimate, PlanInputs};
use super::ring::RingCost;
use super::Plan;
use crate::config::{AttentionBackend, DeviceKind, DocumentKernels, Experiment, FusedAttention, LoraConfig};
use crate::data::documents::{spread, summarize};
use crate::data::{Dataset, PackedDocuments, Positions};
use crate::model::spec::adapter::param_counts;
use crate::model::spec::ModelSpec;
use crate::plan::flops::attention_forward;
use std::fmt::Write;

/// Sequences `ulysses check` reads to describe the documents of a typical sample.
const SAMPLED_SEQUENCES: usize = 256;

/// `ulysses check`'s memory flags; None: the experiment's `[memory]` value, else the default.
pub struct CheckBudget {
    pub gpu_gib: Option<f64>,
    pub host_gib: Option<f64>,
    pub disk_gib: Option<f64>,
    pub ranks_per_node: usize,
}

/// GPU memory per GPU when neither the flag nor `memory.gpu_gib` says: an 80 GB H100 less the
/// CUDA context and NCCL.
const DEFAULT_GPU_GIB: f64 = 76.0;
/// Host memory per node when neither the flag nor `memory.host_gib` says.
const DEFAULT_HOST_GIB: f64 = 480.0;

/// The whole report for `exp` on `world` ranks.
pub fn report(exp: &Experiment, spec: &ModelSpec, world: usize, flags: &CheckBudget) -> String {
    let mut s = Plan::new(&exp.parallel, exp.data.seq_len, spec, world).render(
        &exp.model.name(),
        spec,
        &exp.train,
        exp.lora.as_ref(),
    );
    s += &attention_report(exp, spec);
    if let Some(ring) = RingCost::new(&exp.parallel, spec, exp.data.seq_len, exp.train.micro_batch, exp.train.dtype) {
        s += &ring.render();
    }
    if let Some(lora) = &exp.lora {
        s += &lora_report(lora, spec);
    }
    if exp.parallel.device != DeviceKind::Cuda {
        return s;
    }
    let set =
        |flag: Option<f64>, config: f64, default: f64| flag.unwrap_or(if config > 0.0 { config } else { default });
    let gpu_gib = set(flags.gpu_gib, exp.memory.gpu_gib, DEFAULT_GPU_GIB);
    let host_gib = set(flags.host_gib, exp.memory.host_gib, DEFAULT_HOST_GIB);
    let per_node = flags.ranks_per_node.min(world).max(1);
    let budget = Budget::from_gib(gpu_gib, host_gib, flags.disk_gib, per_node);
    s += &memory_report(exp, spec, world, &budget);
    let disk = flags.disk_gib.map_or("unlimited disk".into(), |d| format!("{d} GiB of disk"));
    let with = format!("{gpu_gib} GiB per GPU, {host_gib} GiB of host memory and {disk} per node ({per_node} ranks)");
    // `check` plans for stated budgets, not for the machine it runs on (often a login node).
    let defaults: Vec<&str> = [
        (flags.gpu_gib.is_none() && exp.memory.gpu_gib <= 0.0, "--gpu-mem-gib (memory.gpu_gib)"),
        (flags.host_gib.is_none() && exp.memory.host_gib <= 0.0, "--host-mem-gib (memory.host_gib)"),
        (flags.disk_gib.is_none(), "--disk-gib"),
    ]
    .into_iter()
    .filter_map(|(default, name)| default.then_some(name))
    .collect();
    if !defaults.is_empty() {
        let _ = writeln!(s, "budgets    defaults, not this machine's, where not given: {}", defaults.join(", "));
    }
    let inputs = PlanInputs::new(exp, spec, world);
    let fit = |inputs: &PlanInputs| match longest_fit(inputs, &budget) {
        Some(fit) => format!("up to {fit} tokens"),
        None => format!("nothing: even {} tokens exceed the budgets", exp.parallel.sp * 1024),
    };
    let _ = writeln!(s, "fits       {} with {with}", fit(&inputs));
    if let Some(lora) = &exp.lora {
        // What the frozen base frees, side by side with the same run training every parameter.
        let _ = writeln!(
            s,
            "           that is with [lora] (rank {}, the base frozen); without it (every parameter trains): {}",
            lora.rank,
            fit(&inputs.full())
        );
    }
    s
}

/// What a `[lora]` section trains: the adapters, and the parameters that train and stay frozen.
fn lora_report(lora: &LoraConfig, spec: &ModelSpec) -> String {
    let (trained, frozen) = param_counts(spec, lora);
    let targets: Vec<&str> = lora.targets.iter().map(|t| t.peft_name()).collect();
    let full: Vec<&str> = lora.train_fully.iter().map(|m| m.peft_name()).collect();
    let full = if full.is_empty() { String::new() } else { format!(", {} in full", full.join(", ")) };
    let pct = 100.0 * trained as f64 / (trained + frozen) as f64;
    format!(
        "lora       rank {}, alpha {} (scale {}) on {}{full}\n           trainable {} parameters ({pct:.2}%), frozen {}\n",
        lora.rank,
        lora.alpha,
        lora.scale(),
        targets.join(", "),
        crate::units::count(trained),
        crate::units::count(frozen),
    )
}

/// The attention kernel and what attention costs per sample: full causal, and within the
/// documents of the data when `data.documents = "mask"` and the shards can be read here.
fn attention_report(exp: &Experiment, spec: &ModelSpec) -> String {
    let mut s = String::new();
    let d = &exp.data;
    let seq = d.seq_len as f64;
    // Forward + backward (3 × the forward), the model-FLOP convention of train::flops.
    let full = 3.0 * attention_forward(spec, seq * seq);
    let causal = match exp.parallel.fused_attention() {
        Some(k) => match k.forward_blocks(d.seq_len) {
            Some(b) if exp.parallel.ring <= 1 && exp.parallel.keep_attention => {
                format!("{}, its forward in query blocks of {b} tokens (parallel::blocks)", k.describe(false))
            }
            _ => k.describe(false).to_string(),
        },
        None => format!("libtorch SDPA (parallel.attention = {:?})", exp.parallel.attention).to_lowercase(),
    };
    let masked = d.documents == PackedDocuments::Mask;
    let kernel = match exp.parallel.fused_attention() {
        Some(k) if masked => {
            let fallback = k == FusedAttention::Cudnn && exp.parallel.attention == AttentionBackend::Auto;
            let fallback =
                if fallback { " (flash varlen if cuDNN varlen refuses the heads when the run starts)" } else { "" };
            let rule = DocumentKernels { varlen: k, causal: k, min_len: exp.parallel.per_document_min_len };
            format!("{}{fallback}; {causal} on single-document samples", rule.describe())
        }
        _ => causal,
    };
    let _ = writeln!(s, "kernel     {kernel}");
    let positions = match d.positions {
        Positions::Global => "RoPE positions run on across documents",
        Positions::Document => "RoPE positions restart at each document",
    };
    let what = if masked {
        "\"mask\": attention within each document (block-diagonal causal), no label across a boundary"
    } else {
        "\"ignore\": attention runs across documents (full causal)"
    };
    let _ = writeln!(s, "documents  data.documents = {what}; {positions}");
    let _ = write!(s, "flops      attention per sample, forward + backward: {full:.3e} FLOP at full causal");
    if !masked {
        let _ = writeln!(s);
        return s;
    }
    let summary = Dataset::open(&d.paths, d.seq_len).map_err(|e| e.to_string()).and_then(|ds| {
        summarize(&ds, &spread(ds.len(), SAMPLED_SEQUENCES)).map(|sum| (ds.len(), sum)).map_err(|e| e.to_string())
    });
    match summary {
        Ok((len, Some(sum))) => {
            let (lo, hi) = sum.lengths.median_range().unwrap_or((0, 0));
            let _ = writeln!(
                s,
                "; within the documents of {} of the {len} sequences ({:.1} documents each, median length in [{lo}, {hi})): {:.3e} FLOP, {:.1}% of full causal",
                sum.sequences,
                sum.per_sequence.mean(),
                full * sum.attention_share,
                100.0 * sum.attention_share
            );
        }
        Ok((_, None)) => {
            let _ = writeln!(s, "; the shards record no document boundaries (training would refuse them)");
        }
        Err(e) => {
            let _ = writeln!(s, "; within documents: less, by Σ len² / seq_len² (the data cannot be read here: {e})");
        }
    }
    s
}

/// The memory estimate of a GPU run placed within `budget` (per rank), or why it does not fit.
fn memory_report(exp: &Experiment, spec: &ModelSpec, world: usize, budget: &Budget) -> String {
    let mut s = String::new();
    let inputs = PlanInputs::new(exp, spec, world);
    let estimate = Estimate::new(&inputs);
    match estimate.placement(budget) {
        Ok(placement) => {
            let placed = estimate.with_placement(&placement);
            let _ = writeln!(
                s,
                "memory     per rank at {} tokens (estimate, torch allocator; CUDA context and NCCL come on top):",
                exp.data.seq_len
            );
            for line in memory::table(&placed, budget).lines() {
                let _ = writeln!(s, "           {line}");
            }
            let _ = writeln!(s, "placement  {}", memory::summary(&placed, &placement, budget));
        }
        Err(shortfall) => {
            let refusal = memory::refusal(&inputs, budget, &shortfall, &exp.memory.offload_dir());
            let _ = writeln!(s, "placement  {}", refusal.replace('\n', "\n           "));
        }
    }
    s
}
