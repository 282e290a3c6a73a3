//! Per-rank memory estimate of a CUDA training step, by component, and the longest sequence that
//! fits. Bytes of torch's caching allocator (like `torch.cuda.max_memory_allocated`; the CUDA
//! context and NCCL buffers come on top). The two working-set terms are calibrated on measured
//! runs (bench/RESULTS.md, 2026-11-26, 4×H100: Llama-3.1-8B at 32K/128K/256K and Llama-3.2-1B at
//! 16K, sp = 4), where the estimate lands within 3% of the measured peaks.
use crate::config::{ActivationPlacement, Experiment};
use crate::model::spec::ModelSpec;

/// Bytes per token of one layer's recompute in backward, in units of `hidden × 2 B` (the layer
/// input, q/k/v and their head shards, attention output, residuals and their gradients).
const LAYER_WORKING_SET_PER_TOKEN: f64 = 26.0;

/// Where one kept tensor waits between forward and backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// The compute device's memory (on a CPU run: just kept).
    Device,
    /// Pinned host memory.
    Host,
    /// A file in `memory.offload_dir`.
    Disk,
}

/// The plan's per-layer decisions for one micro batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    /// Where layer l's input is kept.
    pub inputs: Vec<Place>,
    /// Where layer l's attention output and log-sum-exp are kept so backward skips recomputing
    /// the attention forward; None: recompute it.
    pub attention: Vec<Option<Place>>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryPlan {
    /// fp32 master weights, gradients and Adam moments of this rank's shard.
    pub optimizer_gpu: f64,
    pub optimizer_host: f64,
    /// Layer inputs kept for backward.
    pub activations_gpu: f64,
    pub activations_host: f64,
    /// Backward of one layer: gathered bf16 weights and gradients, the fp32 gradient buffer, and
    /// the recompute's activations.
    pub layer_working: f64,
    /// Head: gathered LM head and its gradients, two loss tiles of fp32 logits.
    pub head_working: f64,
}

impl MemoryPlan {
    pub fn new(exp: &Experiment, spec: &ModelSpec, world: usize, seq_len: usize) -> MemoryPlan {
        let p = &exp.parallel;
        let tokens = (seq_len / p.sp * exp.train.micro_batch) as f64;
        let h = spec.hidden_size as f64;
        let shards = if p.zero_stage == 3 { world as f64 } else { 1.0 };
        let state = spec.total_params() as f64 / shards * 16.0;
        let acts = spec.num_hidden_layers as f64 * tokens * h * 2.0;
        let (optimizer_gpu, optimizer_host) = if p.offload_optimizer { (0.0, state) } else { (state, 0.0) };
        let (activations_gpu, activations_host) =
            if p.activations == ActivationPlacement::Device { (acts, 0.0) } else { (0.0, acts) };
        let head_params = (spec.vocab_size * spec.hidden_size) as f64;
        let loss_tile = if p.loss_tile == 0 { tokens } else { (p.loss_tile as f64).min(tokens) };
        MemoryPlan {
            optimizer_gpu,
            optimizer_host,
            activations_gpu,
            activations_host,
            layer_working: spec.layer_params() as f64 * 8.0 + LAYER_WORKING_SET_PER_TOKEN * tokens * h * 2.0,
            head_working: head_params * 8.0 + 2.0 * loss_tile * spec.vocab_size as f64 * 4.0 + 3.0 * tokens * h * 2.0,
        }
    }

    pub fn gpu_peak(&self) -> f64 {
        self.optimizer_gpu + self.activations_gpu + self.layer_working.max(self.head_working)
    }

    pub fn host(&self) -> f64 {
        self.optimizer_host + self.activations_host
    }
}

/// The longest sequence (a multiple of `sp × 1024` tokens) whose estimate fits `gpu_bytes` per
/// GPU and `host_bytes` per node (`ranks_per_node` ranks share it); None when even the shortest
/// does not.
pub fn longest_fit(
    exp: &Experiment,
    spec: &ModelSpec,
    world: usize,
    gpu_bytes: f64,
    host_bytes: f64,
    ranks_per_node: usize,
) -> Option<usize> {
    let step = exp.parallel.sp * 1024;
    let fits = |s: usize| {
        let m = MemoryPlan::new(exp, spec, world, s);
        m.gpu_peak() <= gpu_bytes && m.host() * ranks_per_node as f64 <= host_bytes
    };
    let mut s = step;
    if !fits(s) {
        return None;
    }
    while fits(s * 2) {
        s *= 2;
    }
    let (mut lo, mut hi) = (s, s * 2);
    while hi - lo > step {
        let mid = (lo + hi) / 2 / step * step;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(lo)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bench(seq: usize) -> (Experiment, ModelSpec) {
        let toml = format!(
            "[model]\npreset = \"llama3.1-8b\"\n[parallel]\nsp = 4\ndevice = \"cuda\"\nmlp_tile = 16384\nloss_tile = 2048\n[data]\npaths = [\"x\"]\nseq_len = {seq}\n[train]\ndtype = \"bf16\"\n"
        );
        let exp = Experiment::parse(&toml, "bench").unwrap();
        let spec = ModelSpec::preset("llama3.1-8b").unwrap();
        (exp, spec)
    }

    #[test]
    fn matches_the_measured_peaks_within_ten_percent() {
        // bench/RESULTS.md, 2026-11-26, nvidia-h100-x4: peak allocated GiB per GPU.
        for (seq, measured) in [(32768, 37.1), (131072, 45.3), (262144, 59.8)] {
            let (exp, spec) = bench(seq);
            let est = MemoryPlan::new(&exp, &spec, 4, seq).gpu_peak() / (1u64 << 30) as f64;
            assert!((est / measured - 1.0).abs() < 0.10, "{seq}: estimate {est:.1} GiB, measured {measured}");
        }
    }

    #[test]
    fn offloading_moves_memory_to_the_host_and_lengthens_the_fit() {
        let (mut exp, spec) = bench(262144);
        let gpu = 76.0 * (1u64 << 30) as f64;
        let host = 480.0 * (1u64 << 30) as f64;
        let on_gpu = longest_fit(&exp, &spec, 4, gpu, host, 4).unwrap();
        exp.parallel.activations = ActivationPlacement::Host;
        exp.parallel.offload_optimizer = true;
        let offloaded = longest_fit(&exp, &spec, 4, gpu, host, 4).unwrap();
        assert!(offloaded > 2 * on_gpu, "{on_gpu} -> {offloaded}");
        let m = MemoryPlan::new(&exp, &spec, 4, 262144);
        assert_eq!(m.activations_gpu + m.optimizer_gpu, 0.0);
        assert!(m.host() > 40.0 * (1u64 << 30) as f64);
    }
}
