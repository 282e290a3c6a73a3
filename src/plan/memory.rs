//! Per-rank memory estimate of a CUDA training step, by component (`Estimate`, from `PlanInputs`);
//! where the model state and each layer's kept tensors wait between forward and backward
//! (`Estimate::placement`, within a `Budget`), and what each place then holds (`MemoryPlan`); and
//! the longest sequence that fits. Bytes of torch's caching allocator (like `torch.cuda.max_memory_allocated`;
//! the CUDA context and NCCL buffers come on top, see `budget::GPU_RESERVE`). The layer's
//! working set is calibrated on measured runs (bench/RESULTS.md, 2026-11-26, 2×H100, sp = 2:
//! Llama-3.1-8B's dimensions with 4 layers at 64K to 512K tokens per rank, peaks read per phase
//! of the backward), where the estimate lands within 2% of the measured peaks.
mod budget;
mod report;

pub use budget::{gpu_name, Budget, BudgetError, DISK_RESERVE, GPU_RESERVE, HOST_RESERVE_PER_RANK};
pub use report::{refusal, summary, table, DoesNotFit};

use crate::config::{
    ActivationPlacement, CheckpointConfig, DeviceKind, Dtype, Experiment, LoraConfig, ParallelConfig, StatePlacement,
    TrainConfig, ZeroStage,
};
use crate::model::spec::adapter::{full_module_shapes, layer_adapter_shapes};
use crate::model::spec::{ModelSpec, UnitId};
use crate::units::bytes;

/// Bytes per token of one layer's recompute in backward, in units of `hidden × 2 B`: it peaks
/// while segment 1 (norm, q/k/v, RoPE) is backpropagated, holding the layer input's gradient,
/// q/k/v's gradients, segment 1's graph and their gradients' temporaries; attention's backward
/// comes close (its output, the output's gradient, the head shards, their gradients and the
/// kernel's workspace). Measured: 8.8 to 9.35 per token at 64K to 512K tokens per rank, beyond
/// the layer input itself (a kept tensor) and the copies in flight (`MemoryPlan::staging`).
const LAYER_WORKING_SET_PER_TOKEN: f64 = 9.5;
/// What a LoRA layer's backward holds beyond that, in the same units: the adapters' share of the
/// input gradient ([tokens, hidden]) before autograd adds it to the base's. Reasoned, not yet
/// measured (`LORA=16 bench/run.sh` reports the peak to calibrate it); the rank-r products
/// themselves are negligible.
const LORA_WORKING_SET_PER_TOKEN: f64 = 1.0;

/// What LoRA's dropout adds to a layer's backward, bytes. The recompute's graphs leave the
/// dropped branches out (`train::layer::Cut`, `LayerAdapters::deferring`): they keep no mask or
/// dropped input, only each branch's leaf `dropout(x)·Aᵀ` and later its gradient (r values a
/// token each, three branches at most: q, k, v; or o beside an MLP tile's gate and up), and the
/// masks are drawn again when the branches are settled by hand, their shares of the input's
/// gradient added in place. So beyond those leaves and a mask's token keys (int64 a token), only
/// one mask tile (`model::dropout::TILE_ELEMENTS`): two int64 temporaries, the bool mask and three
/// tiles in the compute dtype (the dropped input, the share and its masked copy). Reasoned, not
/// measured (tests/gpu/run.sh PARTS=lora prints the peak with and without dropout). Nothing
/// without dropout.
fn dropout_working_set(lora: &LoraConfig, tokens: f64, elt: f64) -> f64 {
    if lora.dropout == 0.0 {
        return 0.0;
    }
    let leaves = 3.0 * 2.0 * lora.rank as f64 * elt * tokens;
    leaves + 8.0 * tokens + crate::model::dropout::TILE_ELEMENTS as f64 * (17.0 + 3.0 * elt)
}

/// fp32 elements per state of one read-update-write chunk of a unit whose state is on disk
/// (`parallel::tiers`): 64 MiB each of master, gradient and the two moments.
pub const DISK_CHUNK: i64 = 16 << 20;
/// Chunks a disk unit's update holds at once: one being read, one updated, one written back.
pub const DISK_CHUNKS_IN_FLIGHT: i64 = 3;

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

/// The plan's per-unit and per-layer decisions.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    /// Where each ZeRO unit's fp32 state (master, gradient, Adam moments) lives, in the order of
    /// `UnitId::all` (embedding, the layers, the head). `Device` on a CPU run:
    /// in memory.
    pub state: Vec<Place>,
    /// Where layer l's input is kept.
    pub inputs: Vec<Place>,
    /// Where layer l's attention output and log-sum-exp are kept so backward skips recomputing
    /// the attention forward; None: recompute it.
    pub attention: Vec<Option<Place>>,
    /// Whether a kept-attention layer's backward runs segment 1 (norm, q/k/v, RoPE) once and
    /// keeps its graph through attention's backward, instead of running it twice (once without a
    /// graph for the head shards, once with one after attention's gradients exist): faster, for
    /// `MemoryPlan::qkv_graph` more GPU memory. Chosen when everything fits on the GPU anyway.
    pub qkv_once: bool,
    /// Whether layer l's forward keeps the MLP's gate and up projections on the GPU, so its
    /// backward does not recompute them (`Estimate::mlp_per_layer` each). Given, last layers
    /// first, to the GPU room that is left when everything else fits on it.
    pub mlp: Vec<bool>,
}

impl Placement {
    /// Units whose state lives in `place`.
    pub fn state_in(&self, place: Place) -> usize {
        self.state.iter().filter(|&&p| p == place).count()
    }

    /// Layers whose input waits in `place`.
    pub fn inputs_in(&self, place: Place) -> usize {
        self.inputs.iter().filter(|&&p| p == place).count()
    }

    /// Layers whose attention output waits in `place` (None: layers that recompute it).
    pub fn attention_in(&self, place: Option<Place>) -> usize {
        self.attention.iter().filter(|&&p| p == place).count()
    }
}

/// Why no placement fits the budget (bytes per rank).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Shortfall {
    #[error(
        "{}the optimizer state on the GPU and the largest working set (with two layers' kept tensors in flight from host memory or disk) need {} of GPU memory but the budget is {}",
        if *frozen > 0.0 { format!("the frozen base ({}), ", bytes(*frozen)) } else { String::new() },
        bytes(*needed),
        bytes(*budget)
    )]
    Gpu { needed: f64, frozen: f64, budget: f64 },
    #[error(
        "{} need{} {} of host memory but the budget is {} per rank",
        host_parts(*optimizer, *staging, *state_staging),
        if [*optimizer, *staging, *state_staging].iter().filter(|&&b| b > 0.0).count() > 1 { "" } else { "s" },
        bytes(optimizer + staging + state_staging),
        bytes(*budget)
    )]
    Host { optimizer: f64, staging: f64, state_staging: f64, budget: f64 },
    #[error(
        "the optimizer state on disk needs {} in memory.offload_dir but the budget is {} per rank",
        bytes(*needed),
        bytes(*budget)
    )]
    Disk { needed: f64, budget: f64 },
    #[error(
        "the layer inputs need {} but {} leave{} {}",
        bytes(*needed),
        where_inputs_may_go(*allowed),
        if *allowed == ActivationPlacement::Auto { "" } else { "s" },
        bytes(*room)
    )]
    Inputs { needed: f64, room: f64, allowed: ActivationPlacement },
}

/// What takes host memory before any layer input: the offloaded optimizer state, the staging
/// of asynchronous checkpoints, the staging of the state off the GPU.
fn host_parts(optimizer: f64, staging: f64, state_staging: f64) -> String {
    let mut parts = Vec::new();
    if optimizer > 0.0 {
        parts.push(format!("the offloaded optimizer state ({})", bytes(optimizer)));
    }
    if staging > 0.0 {
        parts.push(format!("the host staging of asynchronous checkpoints ({})", bytes(staging)));
    }
    if state_staging > 0.0 {
        parts.push(format!("the staging of the state off the GPU ({})", bytes(state_staging)));
    }
    parts.join(" and ")
}

/// Where `parallel.activations` lets layer inputs wait, with what comes before them there.
fn where_inputs_may_go(a: ActivationPlacement) -> &'static str {
    match a {
        ActivationPlacement::Auto => "the GPU, host memory and disk together",
        ActivationPlacement::Device => "the GPU (after the optimizer state and the working set)",
        ActivationPlacement::Host => "host memory (after any offloaded optimizer state and checkpoint staging)",
        ActivationPlacement::Disk => "the disk",
    }
}

/// What a memory plan is computed from: the config sections it reads, the model, the number of
/// ranks and the sequence length.
#[derive(Debug, Clone, Copy)]
pub struct PlanInputs<'a> {
    pub parallel: &'a ParallelConfig,
    pub train: &'a TrainConfig,
    pub checkpoint: &'a CheckpointConfig,
    /// `[lora]`: the base frozen in the compute dtype, the adapters the state.
    pub lora: Option<&'a LoraConfig>,
    pub spec: &'a ModelSpec,
    pub world: usize,
    pub seq_len: usize,
}

impl<'a> PlanInputs<'a> {
    /// `exp` on `world` ranks at its `data.seq_len`.
    pub fn new(exp: &'a Experiment, spec: &'a ModelSpec, world: usize) -> PlanInputs<'a> {
        PlanInputs {
            parallel: &exp.parallel,
            train: &exp.train,
            checkpoint: &exp.checkpoint,
            lora: exp.lora.as_ref(),
            spec,
            world,
            seq_len: exp.data.seq_len,
        }
    }

    /// The same at `seq_len` tokens.
    pub fn at(self, seq_len: usize) -> PlanInputs<'a> {
        PlanInputs { seq_len, ..self }
    }

    /// The same training every parameter (no `[lora]`).
    pub fn full(self) -> PlanInputs<'a> {
        PlanInputs { lora: None, ..self }
    }
}

/// Parameters of the embedding, of one decoder layer and of the head that train (hold ZeRO
/// state): all of them, or under `[lora]` the layer's adapters and the modules trained in full.
fn trained_params(spec: &ModelSpec, lora: Option<&LoraConfig>) -> [i64; 3] {
    let embedding = spec.vocab_size * spec.hidden_size;
    let head = spec.hidden_size + if spec.tie_word_embeddings { 0 } else { embedding };
    let Some(lora) = lora else { return [embedding, spec.layer_params(), head] };
    let numel = |shapes: &[(String, Vec<i64>)], name: Option<&str>| -> i64 {
        shapes.iter().filter(|(n, _)| name.is_none_or(|m| n == m)).map(|(_, s)| s.iter().product::<i64>()).sum()
    };
    let full = full_module_shapes(spec, lora);
    [
        numel(&full, Some("model.embed_tokens.weight")),
        numel(&layer_adapter_shapes(spec, lora), None),
        numel(&full, Some("lm_head.weight")),
    ]
}

/// What each piece of a step takes per rank, wherever it is placed, and the policy a placement
/// follows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// fp32 master weights, gradient buffer and Adam moments of this rank's shard of one unit
    /// (16 bytes a parameter of what trains): the embedding, a decoder layer, the head. Under
    /// `[lora]`: a layer's adapters, and the embedding or head only when trained in full.
    pub state_embedding: f64,
    pub state_layer: f64,
    pub state_head: f64,
    /// A LoRA run's frozen base: this rank's shards of every unit in the compute dtype (2 bytes a
    /// parameter in bf16) and nothing else, on the GPU of a GPU run (`parallel::frozen`); 0
    /// without `[lora]`.
    pub frozen: f64,
    /// `MemoryPlan::checkpoint_staging` per byte of state on the GPU (0: no asynchronous saves).
    pub checkpoint_staging_per_state: f64,
    /// `parallel.offload_optimizer`, and whether the state may leave the GPU under "auto"
    /// (only ZeRO-3 shards can).
    pub state: StatePlacement,
    pub sharded: bool,
    /// Whether gradients accumulate over several micro batches (`train.grad_accum` > 1).
    pub accumulates: bool,
    /// Backward of one layer: gathered bf16 weights and gradients, the fp32 gradient buffer, and
    /// the recompute's activations, and the ring's buffers (`plan::ring`) when there is one.
    pub layer_working: f64,
    /// Head: gathered LM head and its gradients, two loss tiles of fp32 logits.
    pub head_working: f64,
    pub layers: usize,
    /// One layer's input, kept for backward.
    pub input_per_layer: f64,
    /// One layer's attention output (head-sharded) and log-sum-exp (fp32), when kept.
    pub attention_per_layer: f64,
    /// Segment 1's graph (the normed input, q, k and v before RoPE), kept through attention's
    /// backward by a placement that runs segment 1 once (`Placement::qkv_once`).
    pub qkv_graph_once: f64,
    /// One layer's MLP gate and up projections, when kept (`Placement::mlp`).
    pub mlp_per_layer: f64,
    /// The policy `placement` follows (`parallel.activations`, `keep_attention`, `device`).
    pub activations: ActivationPlacement,
    pub keep_attention: bool,
    pub device: DeviceKind,
}

/// Where the model state is (`Placement::state`) and what that costs, per rank.
#[derive(Debug, Clone, Copy, PartialEq)]
struct StateTotals {
    optimizer_gpu: f64,
    optimizer_host: f64,
    optimizer_disk: f64,
    checkpoint_staging: f64,
    state_staging: f64,
}

impl StateTotals {
    /// Host memory taken before any layer input: state, checkpoint and disk-tier staging.
    fn host_fixed(&self) -> f64 {
        self.optimizer_host + self.checkpoint_staging + self.state_staging
    }
}

/// An estimate placed: what each place holds per rank (`Estimate::with_placement`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryPlan {
    pub estimate: Estimate,
    /// A LoRA run's frozen base (`Estimate::frozen`): on the GPU, or in memory on a CPU run.
    pub frozen_gpu: f64,
    pub frozen_host: f64,
    /// The state of this rank's shards by tier.
    pub optimizer_gpu: f64,
    pub optimizer_host: f64,
    pub optimizer_disk: f64,
    /// Pinned host memory holding this rank's slice of the checkpointed GPU state (fp32 master
    /// weights and Adam moments) while an asynchronous save writes it (`checkpoint.async` with
    /// `checkpoint.every` > 0, for the units whose state is on the GPU); kept for the whole run.
    pub checkpoint_staging: f64,
    /// Host memory the state off the GPU passes through: the pinned buffers its gradients land
    /// in, and for units on disk (`parallel::tiers`) the update's chunks in flight and the
    /// master weights a gather reads.
    pub state_staging: f64,
    /// Layer inputs kept for backward, by place.
    pub activations_gpu: f64,
    pub activations_host: f64,
    pub activations_disk: f64,
    /// Kept attention outputs, by place (never on disk).
    pub attention_gpu: f64,
    pub attention_host: f64,
    /// Kept tensors waiting off the GPU that are on it during a layer's backward beyond the GPU
    /// room that earlier layers' kept tensors freed: the layer's own and the next layer's
    /// (fetched one layer ahead).
    pub staging: f64,
    /// `Estimate::qkv_graph_once` when the placement runs segment 1 once; else 0.
    pub qkv_graph: f64,
    /// Kept MLP projections, all on the GPU.
    pub mlp_gpu: f64,
}

impl MemoryPlan {
    /// The larger of one layer's backward (with the copies in flight then) and the head's: only
    /// one runs at a time.
    pub fn working(&self) -> f64 {
        (self.estimate.layer_working + self.staging + self.qkv_graph).max(self.estimate.head_working)
    }

    pub fn gpu_peak(&self) -> f64 {
        self.frozen_gpu + self.optimizer_gpu + self.activations_gpu + self.attention_gpu + self.mlp_gpu + self.working()
    }

    pub fn host(&self) -> f64 {
        self.frozen_host
            + self.optimizer_host
            + self.checkpoint_staging
            + self.state_staging
            + self.activations_host
            + self.attention_host
    }

    pub fn disk(&self) -> f64 {
        self.optimizer_disk + self.activations_disk
    }
}

impl Estimate {
    /// The sizes at `inputs.seq_len` tokens.
    pub fn new(inputs: &PlanInputs) -> Estimate {
        let PlanInputs { parallel: p, train: t, checkpoint: c, lora, spec, world, seq_len } = *inputs;
        let tokens = (seq_len / p.sp * t.micro_batch) as f64;
        let h = spec.hidden_size as f64;
        let elt = match t.dtype {
            Dtype::Bf16 => 2.0,
            Dtype::Fp32 => 4.0,
        };
        let shards = p.shards(world) as f64;
        // Each unit's shard, padded like `parallel::zero::Unit`: 16 bytes a trained parameter,
        // the compute dtype's for a frozen one.
        let shard = |params: i64, per_param: f64| (params as f64 / shards).ceil() * per_param;
        let shard_state = |params: i64| shard(params, 16.0);
        let embedding = spec.vocab_size * spec.hidden_size;
        let head = spec.hidden_size + if spec.tie_word_embeddings { 0 } else { embedding };
        let [trained_embedding, trained_layer, trained_head] = trained_params(spec, lora);
        let frozen = match lora {
            Some(_) => {
                shard(embedding, elt)
                    + spec.num_hidden_layers as f64 * shard(spec.layer_params(), elt)
                    + shard(head, elt)
            }
            None => 0.0,
        };
        // Backward gathers a unit's weights in the compute dtype; a trained one also gets their
        // gradients (compute dtype) and the fp32 gradient buffer: 8 bytes a parameter in bf16.
        let gathered = |params: i64, trained: i64| match lora {
            Some(_) => params as f64 * elt + trained as f64 * 8.0,
            None => params as f64 * 8.0,
        };
        // The LM head's matmul weight trains with the head, or (tied) with the embedding.
        let head_trains = if spec.tie_word_embeddings { trained_embedding > 0 } else { trained_head > 0 };
        let lora_working = if lora.is_some() { LORA_WORKING_SET_PER_TOKEN * tokens * h * 2.0 } else { 0.0 };
        let dropout_working = lora.map_or(0.0, |l| dropout_working_set(l, tokens, elt));
        // Every rank saves a 1/world slice of each unit's master weights and two moments (12 of
        // the 16 bytes), at either ZeRO stage; only state on the GPU is staged (state in host
        // memory or on disk is written where it lies, the next optimizer step waiting for the
        // write).
        let staged = c.is_async(p.device) && c.every > 0 && p.device == DeviceKind::Cuda;
        let checkpoint_staging_per_state = if staged { shards / world as f64 * 12.0 / 16.0 } else { 0.0 };
        let head_params = spec.vocab_size * spec.hidden_size;
        let loss_tile = if p.loss_tile == 0 { tokens } else { (p.loss_tile as f64).min(tokens) };
        let heads = spec.num_attention_heads as f64;
        // Qwen3's per-head q/k norms keep their inputs (q and k before the norm) and each head's
        // fp32 reciprocal RMS in segment 1's graph, beyond the Llama layer the constant measures.
        let qk_norm = if spec.qk_norm {
            tokens * (heads + spec.num_key_value_heads as f64) * (spec.head_dim as f64 * elt + 4.0)
        } else {
            0.0
        };
        Estimate {
            state_embedding: shard_state(trained_embedding),
            state_layer: shard_state(trained_layer),
            state_head: shard_state(trained_head),
            frozen,
            checkpoint_staging_per_state,
            state: p.offload_optimizer,
            sharded: p.zero_stage == ZeroStage::Sharded,
            accumulates: t.grad_accum > 1,
            layer_working: gathered(spec.layer_params(), trained_layer)
                + LAYER_WORKING_SET_PER_TOKEN * tokens * h * 2.0
                + lora_working
                + dropout_working
                + qk_norm
                + super::ring::RingCost::new(p, spec, seq_len, t.micro_batch, t.dtype).map_or(0.0, |r| r.buffers),
            head_working: gathered(head_params, if head_trains { head_params } else { 0 })
                + 2.0 * loss_tile * spec.vocab_size as f64 * 4.0
                + 3.0 * tokens * h * 2.0,
            layers: spec.num_hidden_layers as usize,
            input_per_layer: tokens * h * elt,
            attention_per_layer: tokens * (heads * spec.head_dim as f64 * elt + heads * 4.0),
            qkv_graph_once: tokens
                * (spec.hidden_size + (spec.num_attention_heads + 2 * spec.num_key_value_heads) * spec.head_dim) as f64
                * elt,
            mlp_per_layer: tokens * 2.0 * spec.intermediate_size as f64 * elt,
            activations: p.activations,
            keep_attention: p.keep_attention && p.fused_attention().is_some(),
            device: p.device,
        }
    }

    /// This estimate placed as the config asks when nothing limits it: with "auto", everything on
    /// the GPU, segment 1 run twice in backward and no MLP projections kept (a placement with
    /// room to spare does those, `Placement::qkv_once` and `mlp`, and `with_placement` adds what
    /// they cost).
    pub fn as_configured(&self) -> MemoryPlan {
        let unlimited = self.placement(&Budget::UNLIMITED).expect("an unlimited budget holds every placement");
        self.with_placement(&Placement { qkv_once: false, mlp: vec![false; self.layers], ..unlimited })
    }

    /// Bytes on the GPU beyond the placed totals while layer l's backward runs, at most over the
    /// layers: its own and layer l - 1's kept tensors that wait off the GPU are there then,
    /// while the GPU-resident ones of layers after l are already freed.
    fn staging_of(&self, placement: &Placement) -> f64 {
        // Bytes of layer l's kept tensors that wait on the GPU (`on_gpu`) or off it.
        let kept = |l: usize, on_gpu: bool| {
            let input = if (placement.inputs[l] == Place::Device) == on_gpu { self.input_per_layer } else { 0.0 };
            let attention = match placement.attention[l] {
                Some(place) if (place == Place::Device) == on_gpu => self.attention_per_layer,
                _ => 0.0,
            };
            input + attention
        };
        let (mut worst, mut freed) = (0.0f64, 0.0);
        for l in (0..self.layers).rev() {
            let in_flight = kept(l, false) + if l > 0 { kept(l - 1, false) } else { 0.0 };
            worst = worst.max(in_flight - freed);
            freed += kept(l, true);
        }
        worst
    }

    /// The GPU room `placement` keeps for kept tensors in flight when not everything fits on the
    /// GPU: two layers' inputs unless forced onto the GPU, and two attention outputs when kept
    /// (they may wait in host memory).
    pub fn staging_reserve(&self) -> f64 {
        let input = if self.activations == ActivationPlacement::Device { 0.0 } else { self.input_per_layer };
        let attention = if self.keep_attention { self.attention_per_layer } else { 0.0 };
        2.0 * (input + attention)
    }

    /// The frozen base on the GPU (a GPU run) and in host memory (a CPU run's memory).
    fn frozen_split(&self) -> (f64, f64) {
        match self.device {
            DeviceKind::Cuda => (self.frozen, 0.0),
            DeviceKind::Cpu => (0.0, self.frozen),
        }
    }

    /// Bytes of a unit's state on this rank.
    pub fn unit_state(&self, id: UnitId) -> f64 {
        match id {
            UnitId::Embedding => self.state_embedding,
            UnitId::Layer(_) => self.state_layer,
            UnitId::Head => self.state_head,
        }
    }

    /// The state of each unit where `state` says, and what that costs in staging.
    fn state_totals(&self, state: &[Place]) -> StateTotals {
        let units = || UnitId::all(self.layers).zip(state);
        let total =
            |place| units().filter(|(_, p)| **p == place).map(|(id, _)| self.unit_state(id)).fold(0.0, |a, b| a + b);
        let largest = |tiers: &[Place]| {
            units().filter(|(_, p)| tiers.contains(p)).map(|(id, _)| self.unit_state(id)).fold(0.0, f64::max)
        };
        // A GPU run's gradients for a unit on disk, or for one in host memory whose gradient
        // accumulates over micro batches, land in pinned buffers: two units at most at once,
        // each up to twice its size (torch's pinned allocator rounds to a power of two). A
        // cleared gradient in host memory takes its copy directly. A unit on disk also passes
        // its update's chunks of four fp32 vectors through host memory, and its master weights
        // (a quarter of its state) when a gather reads them.
        let staged = if self.accumulates { &[Place::Host, Place::Disk][..] } else { &[Place::Disk][..] };
        let landing = if self.device == DeviceKind::Cpu { 0.0 } else { largest(staged) };
        let on_disk = largest(&[Place::Disk]);
        let mut state_staging = 2.0 * 2.0 * landing / 4.0;
        if on_disk > 0.0 {
            state_staging += (DISK_CHUNKS_IN_FLIGHT * DISK_CHUNK * 4 * 4) as f64 + on_disk / 4.0;
        }
        let optimizer_gpu = if self.device == DeviceKind::Cpu { 0.0 } else { total(Place::Device) };
        StateTotals {
            optimizer_gpu,
            optimizer_host: total(Place::Host)
                + if self.device == DeviceKind::Cpu { total(Place::Device) } else { 0.0 },
            optimizer_disk: total(Place::Disk),
            checkpoint_staging: optimizer_gpu * self.checkpoint_staging_per_state,
            state_staging,
        }
    }

    /// This estimate with `placement`'s totals by place.
    pub fn with_placement(&self, placement: &Placement) -> MemoryPlan {
        let inputs = |p| placement.inputs_in(p) as f64 * self.input_per_layer;
        let attention = |p| placement.attention_in(Some(p)) as f64 * self.attention_per_layer;
        let StateTotals { optimizer_gpu, optimizer_host, optimizer_disk, checkpoint_staging, state_staging } =
            self.state_totals(&placement.state);
        let (frozen_gpu, frozen_host) = self.frozen_split();
        MemoryPlan {
            estimate: *self,
            frozen_gpu,
            frozen_host,
            optimizer_gpu,
            optimizer_host,
            optimizer_disk,
            checkpoint_staging,
            state_staging,
            activations_gpu: inputs(Place::Device),
            activations_host: inputs(Place::Host),
            activations_disk: inputs(Place::Disk),
            attention_gpu: attention(Place::Device),
            attention_host: attention(Place::Host),
            staging: self.staging_of(placement),
            qkv_graph: if placement.qkv_once { self.qkv_graph_once } else { 0.0 },
            mlp_gpu: placement.mlp.iter().filter(|&&k| k).count() as f64 * self.mlp_per_layer,
        }
    }

    /// The state placements `placement` tries, fastest first:
    /// - "device", "host", "disk": every unit there (a CPU run's "device" and "host" are both
    ///   its memory).
    /// - "auto": every unit on the GPU; then k units off it, for k = 1, 2, ... all, of which as
    ///   many as possible in host memory and the rest on disk. The first units take the slower
    ///   tiers, [disk | host | GPU] as with the layer inputs: the last units' gradients land
    ///   first and the first ones' updates are needed first by the next step, so neither end
    ///   waits on the slowest tier alone. Only ZeRO-3 shards leave the GPU. A CPU run keeps its
    ///   state in memory within `memory.host_gib` when that is set (its host budget), last
    ///   units first, and the first units on disk.
    fn state_candidates(&self, budget: &Budget) -> Vec<Vec<Place>> {
        let units = UnitId::count(self.layers);
        let every = |place| vec![vec![place; units]];
        let cpu = self.device == DeviceKind::Cpu;
        match self.state {
            StatePlacement::Device => every(Place::Device),
            StatePlacement::Host => every(if cpu { Place::Device } else { Place::Host }),
            StatePlacement::Disk => every(Place::Disk),
            StatePlacement::Auto if !self.sharded => every(Place::Device),
            StatePlacement::Auto if cpu => {
                let mut held = self.frozen;
                let mut state = vec![Place::Disk; units];
                for id in UnitId::all(self.layers).rev() {
                    held += self.unit_state(id);
                    if held > budget.host {
                        break;
                    }
                    state[id.index(self.layers)] = Place::Device;
                }
                vec![state]
            }
            StatePlacement::Auto => {
                let mut out = Vec::new();
                for off in 0..=units {
                    for host in (0..=off).rev() {
                        let mut state = vec![Place::Device; units];
                        state[..off - host].fill(Place::Disk);
                        state[off - host..off].fill(Place::Host);
                        out.push(state);
                    }
                }
                out
            }
        }
    }

    /// Where each layer's input and kept attention wait, following `parallel.activations` and
    /// `parallel.keep_attention` within `budget` (bytes per rank):
    /// - "device", "host", "disk": every layer input there; "auto": on the GPU while the budget
    ///   has room after the fixed parts (optimizer state on the GPU and the larger working set),
    ///   then in host memory, then on disk.
    /// - The GPU's room goes to kept attention first (it saves the attention forward's
    ///   recompute), but never so much that the inputs find no room; host memory goes to the
    ///   inputs first. Attention never waits on disk: a layer without room recomputes it.
    /// - Faster places take the last layers: backward needs those first, while the first layers'
    ///   copies have a whole forward and backward to travel.
    /// - Unless everything fits on the GPU, the GPU also keeps room for two layers' kept tensors
    ///   in flight from host memory or disk (`staging`).
    ///
    /// A CPU run has no budgets: everything stays in memory (`Device`), except that "disk" puts
    /// the inputs on disk so that the disk path runs on CPU too.
    ///
    /// The model state goes first (`state_candidates`): each unit's on the GPU while the rest
    /// still fits, then in host memory, then on disk; the layer inputs and attention are then
    /// placed around it. The first state placement with room for everything wins; the last
    /// one's shortfall is the refusal's.
    pub fn placement(&self, budget: &Budget) -> Result<Placement, Shortfall> {
        let mut shortfall = None;
        for state in self.state_candidates(budget) {
            match self.place_kept(budget, state) {
                Ok(placement) => return Ok(placement),
                Err(s) => shortfall = Some(s),
            }
        }
        Err(shortfall.expect("at least one state placement is tried"))
    }

    /// `placement` for the layer inputs and kept attention, with the state placed (`state`).
    fn place_kept(&self, budget: &Budget, state: Vec<Place>) -> Result<Placement, Shortfall> {
        let n = self.layers;
        let totals = self.state_totals(&state);
        if totals.optimizer_disk > budget.disk {
            return Err(Shortfall::Disk { needed: totals.optimizer_disk, budget: budget.disk });
        }
        let disk_room = budget.disk - totals.optimizer_disk;
        if self.device == DeviceKind::Cpu {
            let input = if self.activations == ActivationPlacement::Disk { Place::Disk } else { Place::Device };
            return Ok(Placement {
                state,
                inputs: vec![input; n],
                attention: vec![self.keep_attention.then_some(Place::Device); n],
                qkv_once: true,
                mlp: vec![true; n],
            });
        }
        let host_fixed = totals.host_fixed();
        if host_fixed > budget.host {
            return Err(Shortfall::Host {
                optimizer: totals.optimizer_host,
                staging: totals.checkpoint_staging,
                state_staging: totals.state_staging,
                budget: budget.host,
            });
        }
        let allowed = |place| self.activations == ActivationPlacement::Auto || self.activations == place;
        if allowed(ActivationPlacement::Device) {
            // Everything on the GPU, with segment 1 run once if there is room for its graph too,
            // and the MLP projections kept in as many layers as the rest of the room holds.
            for qkv_once in [true, false] {
                let mut all = Placement {
                    state: state.clone(),
                    inputs: vec![Place::Device; n],
                    attention: vec![self.keep_attention.then_some(Place::Device); n],
                    qkv_once,
                    mlp: vec![false; n],
                };
                let peak = self.with_placement(&all).gpu_peak();
                if peak <= budget.gpu {
                    let kept = if self.mlp_per_layer > 0.0 {
                        ((budget.gpu - peak) / self.mlp_per_layer).floor().clamp(0.0, n as f64) as usize
                    } else {
                        n
                    };
                    all.mlp = (0..n).map(|l| l >= n - kept).collect();
                    return Ok(all);
                }
            }
        }
        let frozen_gpu = self.frozen_split().0;
        let fixed_gpu =
            frozen_gpu + totals.optimizer_gpu + (self.layer_working + self.staging_reserve()).max(self.head_working);
        if fixed_gpu > budget.gpu {
            return Err(Shortfall::Gpu { needed: fixed_gpu, frozen: frozen_gpu, budget: budget.gpu });
        }
        let (mut gpu, mut host) = (budget.gpu - fixed_gpu, budget.host - host_fixed);
        // Whole layers of `size` bytes that `room` holds, at most n.
        let fit =
            |room: f64, size: f64| if size > 0.0 { (room / size).floor().clamp(0.0, n as f64) as usize } else { n };
        let input = self.input_per_layer;
        let rooms = [
            (ActivationPlacement::Device, gpu),
            (ActivationPlacement::Host, host),
            (ActivationPlacement::Disk, disk_room),
        ];
        let [gpu_cap, host_cap, disk_cap] =
            rooms.map(|(place, room)| if allowed(place) { fit(room, input) } else { 0 });
        if gpu_cap + host_cap + disk_cap < n {
            let room = rooms.iter().filter(|(place, _)| allowed(*place)).map(|(_, room)| room).sum();
            return Err(Shortfall::Inputs { needed: n as f64 * input, room, allowed: self.activations });
        }
        // The GPU keeps room for the inputs that host memory and disk cannot take; kept attention
        // gets the rest first, then the inputs whatever attention leaves.
        let inputs_gpu_min = n.saturating_sub(host_cap + disk_cap);
        let attention = self.attention_per_layer;
        let attention_gpu = if self.keep_attention { fit(gpu - inputs_gpu_min as f64 * input, attention) } else { 0 };
        gpu -= attention_gpu as f64 * attention;
        let inputs_gpu = if allowed(ActivationPlacement::Device) { fit(gpu, input).max(inputs_gpu_min) } else { 0 };
        // The rest of the inputs, at most `disk_cap`, go to disk.
        let inputs_host = host_cap.min(n - inputs_gpu);
        host -= inputs_host as f64 * input;
        let attention_host = if self.keep_attention { fit(host, attention).min(n - attention_gpu) } else { 0 };
        // Counted from the last layer: [disk | host | GPU] for inputs, [none | host | GPU] for attention.
        let tier = |l: usize, gpu: usize, host: usize| match n - l {
            k if k <= gpu => 0,
            k if k <= gpu + host => 1,
            _ => 2,
        };
        Ok(Placement {
            state,
            inputs: (0..n)
                .map(|l| [Place::Device, Place::Host, Place::Disk][tier(l, inputs_gpu, inputs_host)])
                .collect(),
            attention: (0..n)
                .map(|l| [Some(Place::Device), Some(Place::Host), None][tier(l, attention_gpu, attention_host)])
                .collect(),
            qkv_once: false,
            mlp: vec![false; n],
        })
    }
}

/// The longest sequence (a multiple of `sp × 1024` tokens) for which `placement` finds room in
/// `budget` (bytes per rank), whatever `inputs.seq_len` is; None when even the shortest does not
/// fit.
pub fn longest_fit(inputs: &PlanInputs, budget: &Budget) -> Option<usize> {
    // A CPU run has no budgets; stop doubling somewhere.
    const MAX_TOKENS: usize = 1 << 34;
    let step = inputs.parallel.sp * 1024;
    let fits = |s: usize| Estimate::new(&inputs.at(s)).placement(budget).is_ok();
    let mut s = step;
    if !fits(s) {
        return None;
    }
    while s < MAX_TOKENS && fits(s * 2) {
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
mod tests;
