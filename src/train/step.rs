//! One micro batch of training: embed → decoder layers forward → tiled LM head and loss → decoder
//! layers backward → embedding backward, with each parameter unit gathered (ZeRO-3) just before
//! use and its gradient reduce-scattered just after.
//!
//! Why backward is layer-wise recompute and not autograd through a wrapped attention: libtorch's
//! autograd cannot cross the all-to-alls (tch has no custom autograd function), and one graph of
//! the whole model would hold every layer's activations at once. So the forward runs without a
//! graph, keeping each layer's input (and, where the memory plan has room, attention's output);
//! backward rebuilds one layer at a time in segments that end at the all-to-alls
//! (`layer::DecoderLayer::backward`) and carries the gradient across them by hand. The readable
//! single-rank reference this is tested against is `train::reference`.
use super::layer::{backprop, grad, leaf, log_phase, DecoderLayer, SavedLayer, Segments};
use super::store::ActivationStore;
use crate::comm::Groups;
use crate::config::{DocumentKernels, FusedAttention, LoraConfig, PositionBy};
use crate::data::{Batch, Documents, IGNORE_INDEX};
use crate::ffi::cross_entropy::FusedLogitsLoss;
use crate::metrics::position::PositionLoss;
use crate::metrics::profile::Profiler;
use crate::metrics::StepTimes;
use crate::model::adapter::LayerAdapters;
use crate::model::dropout::Draw;
use crate::model::head;
use crate::model::llama::{self, seq_tiles, LayerWeights};
use crate::model::mask::DocumentMask;
use crate::model::rope::Rope;
use crate::model::spec::ModelSpec;
use crate::parallel::attention::{document_mask, AttentionPath};
use crate::parallel::frozen::FrozenParams;
use crate::parallel::ring::Ring;
use crate::parallel::zero::{ShardedParams, UnitId};
use crate::plan::memory::Placement;
use anyhow::Result;
use std::rc::Rc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// What a step needs besides the parameters and the batch, decided once per run.
pub struct StepContext<'a> {
    pub spec: &'a ModelSpec,
    pub groups: &'a Groups,
    /// Compute dtype of weights and activations (fp32 on CPU, bf16 on GPU).
    pub kind: Kind,
    pub device: Device,
    pub mlp_tile: usize,
    pub loss_tile: usize,
    pub profiler: &'a Profiler,
    /// Each decoder layer: where its input waits and how its attention is done.
    pub layers: Vec<DecoderLayer>,
    /// With `data.documents = "mask"`: the kernels that attend within documents, for micro
    /// batches where some sample holds more than one; None: plain causal.
    pub documents: Option<DocumentKernels>,
    /// With `parallel.ring` > 1: the kernel ring attention's hops run (over `groups.ring`).
    pub ring: Option<FusedAttention>,
    /// A LoRA run's frozen base (the parameters the step gets are then the adapters and the
    /// modules trained in full); None: every parameter trains.
    pub frozen: Option<Frozen<'a>>,
}

/// The frozen base of a LoRA run and its `[lora]` section.
#[derive(Clone, Copy)]
pub struct Frozen<'a> {
    pub base: &'a FrozenParams,
    pub lora: &'a LoraConfig,
    /// The run's seed (`run.seed`): the adapters' dropout masks are drawn from it.
    pub seed: u64,
}

impl StepContext<'_> {
    /// The decoder layers of a run as the memory plan placed them: each layer keeps attention
    /// with `kernel` where `placement` has room; a memory-fit run (`memory_fit`) skips the
    /// attention kernels of all layers but the last.
    pub fn layers(placement: &Placement, kernel: Option<FusedAttention>, memory_fit: bool) -> Vec<DecoderLayer> {
        let n = placement.inputs.len();
        (0..n)
            .map(|l| DecoderLayer {
                index: l,
                input: placement.inputs[l],
                attention: AttentionPath::choose(kernel, placement.attention[l], memory_fit && l + 1 < n),
                qkv_once: placement.qkv_once,
                keep_mlp: placement.mlp[l],
            })
            .collect()
    }
}

/// One rank's micro batch as tensors `[b, s_local]` (i64) on the compute device.
pub struct MicroBatch {
    pub input_ids: Tensor,
    pub labels: Tensor,
    /// RoPE positions (global, or within the document).
    pub position_ids: Tensor,
    /// Each sample's documents over the whole sequence (the same on every SP rank).
    pub documents: Vec<Documents>,
    /// The global token ranges the rank holds, in order (two zigzag pieces at most with a ring).
    pub spans: Vec<std::ops::Range<usize>>,
    /// Each row's sample (its index in the data set) and the optimizer step the micro batch
    /// belongs to: with the token positions, where the adapters' dropout masks are drawn.
    pub samples: Vec<u64>,
    pub step: u64,
}

impl MicroBatch {
    /// The loader's batch on `device`.
    pub fn from_batch(b: &Batch, device: Device) -> MicroBatch {
        let shape = [b.micro_batch as i64, b.chunk_len as i64];
        let t = |v: &[i64]| Tensor::from_slice(v).view(shape).to_device(device);
        MicroBatch {
            input_ids: t(&b.input_ids),
            labels: t(&b.labels),
            position_ids: t(&b.position_ids),
            documents: b.documents.clone(),
            spans: b.spans.clone(),
            samples: b.sample_indices.iter().map(|&i| i as u64).collect(),
            step: 0,
        }
    }

    /// A micro batch of unpacked samples (each one document) starting at position 0.
    pub fn unpacked(input_ids: Tensor, labels: Tensor, position_ids: Tensor) -> MicroBatch {
        let (b, s) = (input_ids.size()[0] as usize, input_ids.size()[1] as usize);
        MicroBatch {
            input_ids,
            labels,
            position_ids,
            documents: vec![Documents::whole(s); b],
            spans: vec![0..s],
            samples: (0..b as u64).collect(),
            step: 0,
        }
    }

    pub fn valid_labels(&self) -> i64 {
        self.labels.ne(IGNORE_INDEX).sum(Kind::Int64).int64_value(&[])
    }

    /// The global positions of the rank's tokens, in the order it holds them.
    fn positions(&self) -> impl Iterator<Item = usize> + Clone + '_ {
        self.spans.iter().flat_map(|r| r.clone())
    }

    /// Each token's position in its sample, `[b, s_local]`.
    pub fn sequence_positions(&self) -> Tensor {
        let b = self.input_ids.size()[0];
        self.token_positions().unsqueeze(0).repeat([b, 1])
    }

    /// The position in the sample of each token the rank holds, `[s_local]` (every row's).
    pub fn token_positions(&self) -> Tensor {
        let p: Vec<i64> = self.positions().map(|p| p as i64).collect();
        Tensor::from_slice(&p).to_device(self.input_ids.device())
    }

    /// The adapters' dropout of this micro batch in training (`lora.dropout` > 0), else None.
    fn dropout(&self, ctx: &StepContext) -> Option<Rc<Draw>> {
        let f = ctx.frozen.filter(|f| f.lora.dropout > 0.0)?;
        Some(Draw::new(f.lora.dropout, f.seed, self.step, &self.samples, self.token_positions()))
    }

    /// Each token's position within its document, `[b, s_local]`.
    pub fn document_positions(&self) -> Tensor {
        let s_local = self.input_ids.size()[1] as usize;
        let v: Vec<i64> =
            self.documents.iter().flat_map(|d| self.positions().map(move |p| (p - d.start_of(p)) as i64)).collect();
        Tensor::from_slice(&v).view([self.documents.len() as i64, s_local as i64]).to_device(self.input_ids.device())
    }
}

/// Forward and backward of one micro batch; gradients (of the sum of this rank's token losses
/// divided by `n_total`, the valid labels of the whole optimizer step over all ranks) go into
/// `params`. Returns this rank's summed token loss; adds the forward and backward wall times to
/// `times`, and each token's loss to `positions` when given.
pub fn micro_step(
    ctx: &StepContext,
    params: &mut ShardedParams,
    store: &mut ActivationStore,
    batch: &MicroBatch,
    n_total: f64,
    times: &mut StepTimes,
    positions: Option<&mut PositionLoss>,
) -> Result<f64> {
    let started = Instant::now();
    let rope = Rope::new(ctx.spec, &batch.position_ids, ctx.kind);
    let mask = ctx.documents.and_then(|kernels| document_mask(&batch.documents, kernels, ctx.kind, ctx.device));
    let seg = segments(ctx, &rope, mask.as_ref());
    let prof = ctx.profiler;
    let dropout = batch.dropout(ctx);
    let (x, mut saved) = layers_forward(ctx, &seg, params, store, batch, &ctx.layers, false, dropout.as_ref())?;
    let head =
        prof.phase(format_args!("head and loss"), || head_and_loss(ctx, params, x, batch, n_total, positions))?;
    let mut grad_x = head.grad_x;
    log_phase(&seg, format_args!("head and loss"));
    let backward_from = Instant::now();
    times.forward += (backward_from - started).as_secs_f64();

    // Last layer first; the next layer's kept tensors are fetched one layer ahead so their
    // copies overlap this layer's compute.
    if let Some(last) = saved.last() {
        last.prefetch(store)?;
    }
    for layer in ctx.layers.iter().rev() {
        let s = saved.pop().expect("one saved layer per layer");
        if let Some(next) = saved.last() {
            next.prefetch(store)?;
        }
        let id = UnitId::Layer(layer.index);
        grad_x = prof.phase(format_args!("backward layer {}", layer.index), || -> Result<_> {
            let (lw, trained) = layer_weights(ctx, params, layer.index, true, dropout.as_ref())?;
            let grad_x = layer.backward(&seg, &lw, s, grad_x, store)?;
            accumulate(ctx, params, id, &grads(&trained))?;
            Ok(grad_x)
        })?;
        log_phase(&seg, format_args!("backward layer {}: gradient reduce-scatter", layer.index));
    }

    // The embedding's gradient, plus the LM head's when the two are tied (none when it is frozen).
    if !params.has(UnitId::Embedding) {
        times.backward += backward_from.elapsed().as_secs_f64();
        return Ok(head.loss);
    }
    prof.phase(format_args!("embedding backward"), || -> Result<()> {
        let embedding = leaf(&gather(ctx, params, UnitId::Embedding)?[0]);
        let e = Tensor::embedding(&embedding, &batch.input_ids, -1, false, false);
        backprop(&[(&e, &grad_x)])?;
        let g = match head.tied_grad {
            Some(tied) => grad(&embedding) + tied,
            None => grad(&embedding),
        };
        accumulate(ctx, params, UnitId::Embedding, &[g])
    })?;
    times.backward += backward_from.elapsed().as_secs_f64();
    Ok(head.loss)
}

/// This rank's summed token loss of a micro batch by the step's forward without its backward
/// (validation): the same embedding, layers and tiled LM head and cross-entropy as `micro_step`,
/// each layer's kept tensors released as soon as it is done, no graph, no gradient and no
/// dropout.
pub fn forward_loss(
    ctx: &StepContext,
    params: &mut ShardedParams,
    store: &mut ActivationStore,
    batch: &MicroBatch,
) -> Result<f64> {
    let rope = Rope::new(ctx.spec, &batch.position_ids, ctx.kind);
    let mask = ctx.documents.and_then(|kernels| document_mask(&batch.documents, kernels, ctx.kind, ctx.device));
    let seg = segments(ctx, &rope, mask.as_ref());
    let layers: Vec<DecoderLayer> = ctx.layers.iter().map(|l| l.forward_only()).collect();
    let (x, _) = layers_forward(ctx, &seg, params, store, batch, &layers, true, None)?;
    let (norm, lm_head) = head_weights(ctx, params)?;
    let (norm, lm_head) = (&norm, &lm_head);
    tch::no_grad(|| {
        let mut loss = 0.0;
        for (start, len) in seq_tiles(x.size()[1], ctx.loss_tile) {
            let labels = batch.labels.narrow(1, start, len);
            // [b, tile] fp32 losses
            let token_loss = llama::head_token_losses(ctx.spec, norm, lm_head, &x.narrow(1, start, len), &labels);
            loss += token_loss.sum(Kind::Float).double_value(&[]);
        }
        Ok(loss)
    })
}

fn segments<'a>(ctx: &StepContext<'a>, rope: &'a Rope, mask: Option<&'a DocumentMask>) -> Segments<'a> {
    Segments {
        spec: ctx.spec,
        sp: ctx.groups.sp.as_ref(),
        rope,
        profiler: ctx.profiler,
        mlp_tile: ctx.mlp_tile,
        device: ctx.device,
        mask,
        ring: ctx.ring.map(|kernel| Ring { group: ctx.groups.ring.as_ref(), kernel }),
    }
}

/// The embedding of the micro batch's tokens and `layers` forward without a graph, each layer's
/// weights gathered just before it runs: the last layer's output and what each layer kept for
/// backward (nothing with `release`: each layer's kept tensors are freed when it is done). The
/// adapters drop their inputs with `dropout` (training only).
fn layers_forward(
    ctx: &StepContext,
    seg: &Segments,
    params: &mut ShardedParams,
    store: &mut ActivationStore,
    batch: &MicroBatch,
    layers: &[DecoderLayer],
    release: bool,
    dropout: Option<&Rc<Draw>>,
) -> Result<(Tensor, Vec<SavedLayer>)> {
    let prof = ctx.profiler;
    let mut x = prof.phase(format_args!("embedding"), || -> Result<_> {
        let embedding = embedding(ctx, params)?;
        Ok(tch::no_grad(|| Tensor::embedding(&embedding, &batch.input_ids, -1, false, false)))
    })?;
    let mut saved = Vec::with_capacity(layers.len());
    for layer in layers {
        let (y, s) = prof.phase(format_args!("forward layer {}", layer.index), || -> Result<_> {
            let (w, _) = layer_weights(ctx, params, layer.index, false, dropout)?;
            layer.forward(seg, &w, x, store)
        })?;
        if release {
            s.release(store)?;
        } else {
            saved.push(s);
        }
        x = y;
        log_phase(seg, format_args!("forward layer {}", layer.index));
    }
    Ok((x, saved))
}

/// The LM head's forward and backward.
struct HeadResult {
    /// This rank's summed token loss.
    loss: f64,
    /// Gradient of the last layer's output.
    grad_x: Tensor,
    /// With tied embeddings: the LM head's gradient, which belongs to the embedding's unit.
    tied_grad: Option<Tensor>,
}

/// Final norm, LM head and cross-entropy (fp32) on the last layer's output `x`, forward and
/// backward tile by tile so that one tile's logits exist at a time (`model::head::tile_loss`, its
/// softmax cross-entropy by one kernel on the GPU, `ffi::cross_entropy`); the head's weight
/// gradients are reduce-scattered here.
fn head_and_loss(
    ctx: &StepContext,
    params: &mut ShardedParams,
    x: Tensor,
    batch: &MicroBatch,
    n_total: f64,
    mut positions: Option<&mut PositionLoss>,
) -> Result<HeadResult> {
    // The trained head's tensors as leaves: [norm, lm_head] (lm_head absent when tied); under
    // LoRA at most [lm_head], the rest from the frozen base.
    let head = match params.has(UnitId::Head) {
        true => gather(ctx, params, UnitId::Head)?.iter().map(leaf).collect::<Vec<_>>(),
        false => Vec::new(),
    };
    let tied = match (ctx.spec.tie_word_embeddings, params.has(UnitId::Embedding)) {
        (true, true) => Some(leaf(&gather(ctx, params, UnitId::Embedding)?[0])),
        _ => None,
    };
    let (norm, lm_head) = match ctx.frozen {
        None => (head[0].shallow_clone(), tied.as_ref().unwrap_or_else(|| &head[1]).shallow_clone()),
        Some(f) => {
            let world = ctx.groups.world.as_ref();
            let base = ctx.profiler.comm(world, || f.base.gather(world, UnitId::Head))?;
            let lm_head = match (&tied, ctx.spec.tie_word_embeddings, head.first()) {
                (Some(t), _, _) => t.shallow_clone(),
                (None, true, _) => embedding(ctx, params)?,
                (None, false, Some(trained)) => trained.shallow_clone(),
                (None, false, None) => base[1].shallow_clone(),
            };
            (base[0].shallow_clone(), lm_head)
        }
    };
    let (norm, lm_head) = (&norm, &lm_head);
    // The LM head's gradient when it trains (tied or not), accumulated tile by tile by the GEMM.
    let mut grad_lm_head = lm_head.requires_grad().then(|| lm_head.zeros_like());
    let scale = 1.0 / n_total;
    // Summed on the device, read once after the last tile (a read per tile would stall the GPU's
    // queue once per tile).
    let mut loss = Tensor::zeros([], (Kind::Float, x.device()));
    // The positions the per-position loss bins by, [b, s_local].
    let bin_positions = positions.as_ref().map(|p| match p.by() {
        PositionBy::Sequence => batch.sequence_positions(),
        PositionBy::Document => batch.document_positions(),
    });
    // The last layer's output gradient, written tile by tile. Each tile is its own leaf (a view of
    // x's values): with one leaf for all of x, every tile's gradient would be padded with zeros
    // to the whole sequence and summed into it, four sequence-long passes per tile.
    let grad_x = x.empty_like();
    for (start, len) in seq_tiles(x.size()[1], ctx.loss_tile) {
        let labels = batch.labels.narrow(1, start, len);
        let x_tile = leaf(&x.narrow(1, start, len));
        // The final norm under autograd; the LM head and the loss by hand (`model::head`).
        let xn = llama::rms_norm(&x_tile, norm, ctx.spec.rms_norm_eps);
        let tile = head::tile_loss(&xn.detach(), lm_head, &labels, scale, grad_lm_head.as_mut(), &FusedLogitsLoss);
        if let (Some(p), Some(at)) = (positions.as_deref_mut(), &bin_positions) {
            p.add(&tile.token_loss, &labels, &at.narrow(1, start, len));
        }
        backprop(&[(&xn, &tile.grad_xn)])?;
        grad_x.narrow(1, start, len).copy_(&grad(&x_tile));
        loss += tile.token_loss.sum(Kind::Float);
    }
    // The trained LM head's gradient is `grad_lm_head`, not its leaf's (autograd never saw it):
    // in the head unit when untied (the same tensor as one of `head`), else the embedding's.
    let is_lm_head = |t: &Tensor| t.data_ptr() == lm_head.data_ptr();
    if !head.is_empty() {
        let head_grads: Vec<Tensor> = head
            .iter()
            .map(|t| match &grad_lm_head {
                Some(g) if is_lm_head(t) => g.shallow_clone(),
                _ => grad(t),
            })
            .collect();
        accumulate(ctx, params, UnitId::Head, &head_grads)?;
    }
    let tied_grad = tied.map(|t| match grad_lm_head {
        Some(g) if is_lm_head(&t) => g,
        _ => grad(&t),
    });
    Ok(HeadResult { loss: loss.double_value(&[]), grad_x, tied_grad })
}

/// A unit's tensors, gathered in the compute dtype on the compute device (timed as communication).
fn gather(ctx: &StepContext, params: &ShardedParams, id: UnitId) -> Result<Vec<Tensor>> {
    let world = ctx.groups.world.as_ref();
    Ok(ctx.profiler.comm(world, || params.gather(world, id, ctx.kind, ctx.device))?)
}

/// Adds a unit's gradients into the shards (reduce-scatter; timed as communication).
fn accumulate(ctx: &StepContext, params: &mut ShardedParams, id: UnitId, grads: &[Tensor]) -> Result<()> {
    let world = ctx.groups.world.as_ref();
    Ok(ctx.profiler.comm(world, || params.accumulate(world, id, grads))?)
}

/// Decoder layer `l`'s weights, and its trained tensors (leaves of a graph when `train`), whose
/// gradients the caller reduce-scatters: every tensor of the layer, or under LoRA the adapters on
/// the frozen base (whose tensors are no leaves, so backward skips their gradients), dropping
/// their inputs with `dropout`.
fn layer_weights(
    ctx: &StepContext,
    params: &ShardedParams,
    l: usize,
    train: bool,
    dropout: Option<&Rc<Draw>>,
) -> Result<(LayerWeights, Vec<Tensor>)> {
    let id = UnitId::Layer(l);
    let trained: Vec<Tensor> =
        gather(ctx, params, id)?.iter().map(|t| if train { leaf(t) } else { t.shallow_clone() }).collect();
    let from = |tensors: Vec<Tensor>| -> Result<LayerWeights> {
        let named = ctx.spec.layer_shapes().into_iter().zip(tensors).map(|((n, _), t)| (n.to_string(), t)).collect();
        Ok(LayerWeights::from_tensors(ctx.spec, named)?)
    };
    let w = match ctx.frozen {
        None => from(trained.iter().map(Tensor::shallow_clone).collect())?,
        Some(f) => {
            let world = ctx.groups.world.as_ref();
            let mut w = from(ctx.profiler.comm(world, || f.base.gather(world, id))?)?;
            let adapters = trained.iter().map(Tensor::shallow_clone).collect();
            w.adapters = LayerAdapters::from_ordered(ctx.spec, f.lora, adapters);
            w.adapters.dropout = dropout.map(|d| d.layer(l));
            w
        }
    };
    Ok((w, trained))
}

/// The final norm and the LM head without a graph: trained, or the frozen base's.
fn head_weights(ctx: &StepContext, params: &ShardedParams) -> Result<(Tensor, Tensor)> {
    let tied = ctx.spec.tie_word_embeddings;
    let (norm, head) = match ctx.frozen {
        None => {
            let mut head = gather(ctx, params, UnitId::Head)?;
            (head.remove(0), head.pop())
        }
        Some(f) => {
            let world = ctx.groups.world.as_ref();
            let mut base = ctx.profiler.comm(world, || f.base.gather(world, UnitId::Head))?;
            let trained = if params.has(UnitId::Head) { gather(ctx, params, UnitId::Head)?.pop() } else { None };
            (base.remove(0), trained.or(base.pop()))
        }
    };
    let lm_head = match (tied, head) {
        (false, Some(h)) => h,
        _ => embedding(ctx, params)?,
    };
    Ok((norm, lm_head))
}

/// The token embedding [V, h]: trained, or the frozen base's.
fn embedding(ctx: &StepContext, params: &ShardedParams) -> Result<Tensor> {
    match ctx.frozen {
        Some(f) if !params.has(UnitId::Embedding) => {
            let world = ctx.groups.world.as_ref();
            Ok(ctx.profiler.comm(world, || f.base.gather(world, UnitId::Embedding))?.remove(0))
        }
        _ => Ok(gather(ctx, params, UnitId::Embedding)?.remove(0)),
    }
}

fn grads(ts: &[Tensor]) -> Vec<Tensor> {
    ts.iter().map(grad).collect()
}
