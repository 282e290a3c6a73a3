//! One micro batch: layer-wise forward without a graph (keeping each layer's input, and where the
//! memory plan allows, attention's output and log-sum-exp), the loss, then layer-wise backward
//! with recompute. libtorch has no Rust custom autograd, so each layer is recomputed in segments
//! that end at the all-to-alls (pre-attention, attention, post-attention), each with its own
//! graph; a segment is backpropagated from its incoming gradient (`torch.autograd.backward(out,
//! grad_out)` through the shim), and the gradient crosses the all-to-all in the reverse
//! direction. A layer whose attention output was kept skips the attention forward in backward and
//! calls the fused attention backward directly.
use super::profile::Profiler;
use super::store::{ActivationStore, Key};
use crate::comm::Groups;
use crate::memory_plan::Placement;
use crate::model::kept_attention::{self, Kernel, Saved};
use crate::model::llama::{self, seq_tiles, AttentionCore, LayerWeights, LocalAttention};
use crate::model::rope::Rope;
use crate::model::spec::ModelSpec;
use crate::parallel::ulysses::{heads_to_seq, replicate_kv, seq_to_heads};
use crate::parallel::zero::ShardedParams;
use crate::plan::gib;
use crate::train::metrics::StepTimes;
use crate::train::position::PositionLoss;
use anyhow::{anyhow, Result};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// What a step needs besides the parameters and the batch.
pub struct StepContext<'a> {
    pub spec: &'a ModelSpec,
    pub groups: &'a Groups,
    /// Compute dtype of weights and activations (fp32 on CPU, bf16 on GPU).
    pub kind: Kind,
    pub device: Device,
    pub mlp_tile: usize,
    pub loss_tile: usize,
    pub profiler: &'a Profiler,
    /// Where each layer's input and kept attention wait for the backward pass.
    pub placement: &'a Placement,
    /// The fused kernel that keeps attention's log-sum-exp; None: every layer recomputes.
    pub kernel: Option<Kernel>,
    /// Memory-fit run (`train.memory_fit`): attention only in the last layer, zeros elsewhere.
    pub memory_fit: bool,
}

impl StepContext<'_> {
    /// Whether layer `l` of `layers` skips its attention kernels (memory-fit runs).
    fn skips_attention(&self, l: usize, layers: usize) -> bool {
        self.memory_fit && l + 1 < layers
    }
}

/// At debug level on a GPU: this phase's peak and what stays allocated after it (GiB), so that a
/// run shows where its working set peaks (`RUST_LOG=info,ulysses::train::step=debug`).
fn log_phase(ctx: &StepContext, phase: std::fmt::Arguments) {
    if log::log_enabled!(log::Level::Debug) && ctx.device.is_cuda() {
        let (peak, now) = crate::train::memory::phase_peak_gpu(ctx.device);
        log::debug!("{phase}: peak {:.2} GiB, then {:.2} GiB allocated", gib(peak), gib(now));
    }
}

/// A memory-fit run's stand-in for attention's output and log-sum-exp: same sizes, zeros.
fn zero_attention(qh: &Tensor) -> (Tensor, Option<Saved>) {
    let (b, s, heads, _) = qh.size4().expect("attention tensors are [b, s, heads, d]");
    let lse = Tensor::zeros([b, heads, s], (Kind::Float, qh.device()));
    (qh.zeros_like(), Some(Saved { lse, aux: [Tensor::new(), Tensor::new()] }))
}

/// A layer's kept attention: the head-sharded output, its log-sum-exp and the kernel's extras.
struct KeptLayer {
    out: Key,
    lse: Key,
    aux: [Tensor; 2],
}

/// One rank's micro batch as tensors `[b, s_local]` (i64) on the compute device.
pub struct MicroBatch {
    pub input_ids: Tensor,
    pub labels: Tensor,
    pub position_ids: Tensor,
}

impl MicroBatch {
    pub fn valid_labels(&self) -> i64 {
        self.labels.ne(-100).sum(Kind::Int64).int64_value(&[])
    }
}

fn leaf(t: &Tensor) -> Tensor {
    t.detach().set_requires_grad(true)
}

/// Gradients of leaves; a leaf no loss reached (a rank with no valid label) has none: zeros.
fn grad(t: &Tensor) -> Tensor {
    let g = t.grad();
    if g.defined() {
        g
    } else {
        t.zeros_like()
    }
}

fn grads(ts: &[Tensor]) -> Vec<Tensor> {
    ts.iter().map(grad).collect()
}

/// Backpropagates each `grad_out` into its `out`'s graph (gradients accumulate into the leaves).
fn backprop(pairs: &[(&Tensor, &Tensor)]) -> Result<()> {
    crate::autograd::backward(pairs).map_err(|e| anyhow!("backward: {e}"))
}

fn fused(e: String) -> anyhow::Error {
    anyhow!("fused attention: {e}")
}

/// A decoder layer's weights from its unit's tensors (in `ModelSpec::layer_shapes` order).
fn layer(spec: &ModelSpec, tensors: Vec<Tensor>) -> Result<LayerWeights> {
    let named = spec.layer_shapes().into_iter().zip(tensors).map(|((n, _), t)| (n.to_string(), t)).collect();
    Ok(LayerWeights::from_tensors(spec, named)?)
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
    mut positions: Option<&mut PositionLoss>,
) -> Result<f64> {
    let started = Instant::now();
    let (spec, world, sp, prof) = (ctx.spec, ctx.groups.world.as_ref(), ctx.groups.sp.as_ref(), ctx.profiler);
    let layers = spec.num_hidden_layers as usize;
    let head_unit = layers + 1;
    let rope = Rope::new(spec, &batch.position_ids, ctx.kind);
    let gather =
        |params: &ShardedParams, unit: usize| prof.comm(world, || params.gather(world, unit, ctx.kind, ctx.device));
    // [b, s/sp, H, d] <-> [b, s, H/sp, d] over the SP group.
    let to_heads = |t: &Tensor| prof.comm(sp, || seq_to_heads(sp, t));
    let to_seq = |t: &Tensor| prof.comm(sp, || heads_to_seq(sp, t));
    // Segment 1 (pre-attention: norm, q/k/v projections, RoPE), with KV heads replicated when
    // there are fewer than SP ranks (inside any graph, so their gradients sum back).
    let qkv = |w: &LayerWeights, x: &Tensor| {
        let (q, k, v) = llama::pre_attention(spec, w, x, &rope);
        (q, replicate_kv(&k, sp.size()), replicate_kv(&v, sp.size()))
    };

    // Forward, no graph: keep each layer's input (and attention output where planned).
    let mut inputs: Vec<Key> = Vec::with_capacity(layers);
    let mut kept: Vec<Option<KeptLayer>> = Vec::with_capacity(layers);
    let embed = gather(params, 0)?.remove(0);
    let mut x = tch::no_grad(|| Tensor::embedding(&embed, &batch.input_ids, -1, false, false));
    drop(embed);
    for l in 0..layers {
        let w = layer(spec, gather(params, 1 + l)?)?;
        let keep = ctx.kernel.zip(ctx.placement.attention[l]);
        let y = tch::no_grad(|| -> Result<Tensor> {
            // Each activation is dropped as soon as the next one exists (sequence-long tensors).
            let (qh, kh, vh) = {
                let (q, k, v) = qkv(&w, &x);
                (to_heads(&q)?, to_heads(&k)?, to_heads(&v)?)
            };
            let (oh, saved) = match keep {
                Some(_) if ctx.skips_attention(l, layers) => zero_attention(&qh),
                Some((kernel, _)) => {
                    let (oh, saved) =
                        prof.attention(|| kept_attention::forward(kernel, &qh, &kh, &vh)).map_err(fused)?;
                    (oh, Some(saved))
                }
                None if ctx.skips_attention(l, layers) => (qh.zeros_like(), None),
                None => (prof.attention(|| LocalAttention.attend(&qh, &kh, &vh)), None),
            };
            kept.push(match (keep, saved) {
                (Some((_, place)), Some(saved)) => {
                    let out = store.put(oh.shallow_clone(), place)?;
                    Some(KeptLayer { out, lse: store.put(saved.lse, place)?, aux: saved.aux })
                }
                _ => None,
            });
            drop((qh, kh, vh));
            let o = to_seq(&oh)?;
            drop(oh);
            Ok(llama::post_attention_no_grad(spec, &w, &x, &o, ctx.mlp_tile))
        })?;
        inputs.push(store.put(std::mem::replace(&mut x, y), ctx.placement.inputs[l])?);
        log_phase(ctx, format_args!("forward layer {l}"));
    }

    // Head: final norm, LM head, cross-entropy (fp32), with a graph.
    let head = gather(params, head_unit)?.iter().map(leaf).collect::<Vec<_>>();
    let tied = if spec.tie_word_embeddings { Some(leaf(&gather(params, 0)?[0])) } else { None };
    let x_last = leaf(&x);
    let (norm, lm_head) = (&head[0], tied.as_ref().unwrap_or_else(|| &head[1]));
    // Backpropagate tile by tile so only one tile's fp32 logits exist at a time; the gradients
    // of the weights and of `x_last` accumulate over the tiles.
    let mut loss_local = 0.0;
    for (start, len) in seq_tiles(x_last.size()[1], ctx.loss_tile) {
        let labels = batch.labels.narrow(1, start, len);
        // [b, tile] fp32 losses; their sum is `head_loss`.
        let token_loss = llama::head_token_losses(spec, norm, lm_head, &x_last.narrow(1, start, len), &labels);
        if let Some(p) = positions.as_deref_mut() {
            p.add(&token_loss, &labels, &batch.position_ids.narrow(1, start, len));
        }
        let loss_tile = token_loss.sum(Kind::Float);
        if loss_tile.requires_grad() {
            (&loss_tile / n_total).backward();
        }
        loss_local += loss_tile.double_value(&[]);
    }
    prof.comm(world, || params.accumulate(world, head_unit, &grads(&head)))?;
    let mut grad_x = grad(&x_last);
    drop((head, x_last, x));
    log_phase(ctx, format_args!("head and loss"));
    let backward_from = Instant::now();
    times.forward += (backward_from - started).as_secs_f64();

    // Backward, last layer first: recompute each layer in three segments. The next layer's kept
    // tensors are fetched one layer ahead so their copies overlap this layer's compute.
    let prefetch = |store: &mut ActivationStore, input: Option<&Key>, kept: Option<&Option<KeptLayer>>| -> Result<()> {
        if let Some(key) = input {
            store.prefetch(key)?;
        }
        if let Some(Some(k)) = kept {
            store.prefetch(&k.out)?;
            store.prefetch(&k.lse)?;
        }
        Ok(())
    };
    prefetch(store, inputs.last(), kept.last())?;
    for l in (0..layers).rev() {
        let (input, kept_layer) = (inputs.pop().expect("one input per layer"), kept.pop().expect("one per layer"));
        prefetch(store, inputs.last(), kept.last())?;
        let w: Vec<Tensor> = gather(params, 1 + l)?.iter().map(leaf).collect();
        let lw = layer(spec, w.iter().map(|t| t.shallow_clone()).collect())?;
        let x_in = leaf(&store.take(input)?);
        // Segment 1 runs twice. First without a graph, for the head shards
        // [b, s/sp, H, d] -> [b, s, H/sp, d] that attention needs; then, once attention's
        // gradients exist, with a graph to backpropagate them. Its graph (the normed input, q/k/v
        // before and after RoPE) thus never coexists with attention's backward, for the price of
        // one more norm and q/k/v projection.
        let heads = || -> Result<[Tensor; 3]> {
            tch::no_grad(|| {
                let (q, k, v) = qkv(&lw, &x_in);
                Ok([to_heads(&q)?, to_heads(&k)?, to_heads(&v)?])
            })
        };
        // Segment 2 (attention): the kept output, whose layer needs the head shards only after
        // segment 3; or the attention forward recomputed with a graph on the shards as leaves.
        let skip = ctx.skips_attention(l, layers);
        let (oh, saved, early) = match kept_layer {
            Some(kl) => {
                let saved = Saved { lse: store.take(kl.lse)?, aux: kl.aux };
                (store.take(kl.out)?, Some(saved), None)
            }
            None => {
                let [qh, kh, vh] = heads()?.map(|t| leaf(&t));
                let oh = if skip { qh.zeros_like() } else { prof.attention(|| LocalAttention.attend(&qh, &kh, &vh)) };
                (oh, None, Some([qh, kh, vh]))
            }
        };
        // Segment 3 (post-attention): O projection and residual, then the MLP, recomputed and
        // backpropagated one tile of tokens at a time so its wide activations exist for one tile.
        // Its tensors and the layer's output gradient are dropped as soon as it is done.
        let grad_y = std::mem::replace(&mut grad_x, Tensor::new());
        let o = leaf(&to_seq(&oh)?);
        {
            let h = llama::attention_residual(spec, &lw, &x_in, &o);
            let h_leaf = leaf(&h);
            for (start, len) in seq_tiles(h.size()[1], ctx.mlp_tile) {
                let y = llama::mlp_residual(spec, &lw, &h_leaf.narrow(1, start, len));
                backprop(&[(&y, &grad_y.narrow(1, start, len))])?;
            }
            backprop(&[(&h, &grad(&h_leaf))])?;
        }
        drop(grad_y);
        let grad_oh = to_heads(&o.grad())?;
        drop(o);
        log_phase(ctx, format_args!("backward layer {l}: post-attention"));
        let [qh, kh, vh] = match early {
            Some(shards) => shards,
            None => heads()?,
        };
        let (gq, gk, gv) = match (saved, ctx.kernel) {
            _ if skip => (qh.zeros_like(), kh.zeros_like(), vh.zeros_like()),
            (Some(saved), Some(kernel)) => prof
                .attention(|| tch::no_grad(|| kept_attention::backward(kernel, &grad_oh, &qh, &kh, &vh, &oh, &saved)))
                .map_err(fused)?,
            _ => {
                prof.attention(|| backprop(&[(&oh, &grad_oh)]))?;
                (qh.grad(), kh.grad(), vh.grad())
            }
        };
        drop((qh, kh, vh, oh, grad_oh));
        log_phase(ctx, format_args!("backward layer {l}: attention"));
        let (gq, gk, gv) = (to_seq(&gq)?, to_seq(&gk)?, to_seq(&gv)?);
        let (q, k, v) = qkv(&lw, &x_in);
        backprop(&[(&q, &gq), (&k, &gk), (&v, &gv)])?;
        drop((q, k, v, gq, gk, gv));
        log_phase(ctx, format_args!("backward layer {l}: pre-attention"));
        grad_x = grad(&x_in);
        prof.comm(world, || params.accumulate(world, 1 + l, &grads(&w)))?;
        log_phase(ctx, format_args!("backward layer {l}: gradient reduce-scatter"));
    }

    // Embedding (plus the LM head's gradient when the two are tied).
    let embed = leaf(&gather(params, 0)?[0]);
    let e = Tensor::embedding(&embed, &batch.input_ids, -1, false, false);
    backprop(&[(&e, &grad_x)])?;
    let mut g = grad(&embed);
    if let Some(t) = tied {
        g = g + grad(&t);
    }
    prof.comm(world, || params.accumulate(world, 0, &[g]))?;
    times.backward += backward_from.elapsed().as_secs_f64();
    Ok(loss_local)
}
