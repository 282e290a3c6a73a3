//! One micro batch: layer-wise forward without a graph (keeping only each layer's input), the
//! loss, then layer-wise backward with recompute. libtorch has no Rust custom autograd, so each
//! layer is recomputed in segments that end at the all-to-alls (pre-attention, attention,
//! post-attention), each with its own graph; a segment is backpropagated from the incoming
//! gradient through the scalar `(out · grad_out).sum()`, whose gradient w.r.t. `out` is exactly
//! `grad_out`, and the gradient crosses the all-to-all in the reverse direction.
use crate::comm::{Collective, Groups};
use crate::model::llama::{self, AttentionCore, LayerWeights, LocalAttention, ModelWeights};
use crate::model::rope::Rope;
use crate::model::spec::ModelSpec;
use crate::parallel::ulysses::{self, heads_to_seq, replicate_kv, seq_to_heads};
use crate::parallel::zero::ShardedParams;
use anyhow::Result;
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

fn grads(ts: &[Tensor]) -> Vec<Tensor> {
    ts.iter().map(|t| t.grad()).collect()
}

/// Backpropagates `grad_out` into `out`'s graph (gradients accumulate into its leaves).
fn backprop(pairs: &[(&Tensor, &Tensor)]) {
    let total = pairs.iter().map(|(o, g)| (*o * *g).sum(Kind::Float)).reduce(|a, b| a + b).expect("at least one pair");
    total.backward();
}

/// Forward and backward of one micro batch; gradients (of the sum of this rank's token losses
/// divided by `n_total`, the valid labels of the whole optimizer step over all ranks) go into
/// `params`. Returns this rank's summed token loss.
pub fn micro_step(ctx: &StepContext, params: &mut ShardedParams, batch: &MicroBatch, n_total: f64) -> Result<f64> {
    let (spec, world, sp) = (ctx.spec, ctx.groups.world.as_ref(), ctx.groups.sp.as_ref());
    let layers = spec.num_hidden_layers as usize;
    let head_unit = layers + 1;
    let rope = Rope::new(spec, &batch.position_ids, ctx.kind);

    // Forward, no graph: keep each layer's input.
    let mut inputs = Vec::with_capacity(layers + 1);
    let mut x = tch::no_grad(|| -> Result<Tensor> {
        let embed = params.gather(world, 0, ctx.kind, ctx.device)?.remove(0);
        Ok(Tensor::embedding(&embed, &batch.input_ids, -1, false, false))
    })?;
    for l in 0..layers {
        let w = LayerWeights::from_tensors(params.gather(world, 1 + l, ctx.kind, ctx.device)?);
        let y = tch::no_grad(|| -> Result<Tensor> {
            let (q, k, v) = llama::pre_attention(spec, &w, &x, &rope);
            let o = ulysses::attend(sp, &q, &k, &v)?;
            Ok(llama::post_attention(spec, &w, &x, &o, ctx.mlp_tile))
        })?;
        inputs.push(std::mem::replace(&mut x, y));
    }

    // Head: final norm, LM head, cross-entropy (fp32), with a graph.
    let head = params.gather(world, head_unit, ctx.kind, ctx.device)?.iter().map(leaf).collect::<Vec<_>>();
    let tied = if spec.tie_word_embeddings { Some(leaf(&params.gather(world, 0, ctx.kind, ctx.device)?[0])) } else { None };
    let x_last = leaf(&x);
    let head_weights = ModelWeights {
        embed: tied.as_ref().map_or_else(|| Tensor::zeros([0], (ctx.kind, ctx.device)), |t| t.shallow_clone()),
        layers: Vec::new(),
        norm: head[0].shallow_clone(),
        lm_head: head.get(1).map(|t| t.shallow_clone()),
    };
    let (loss_sum, _) = llama::head_loss(spec, &head_weights, &x_last, &batch.labels, ctx.loss_tile);
    (&loss_sum / n_total).backward();
    let loss_local = loss_sum.double_value(&[]);
    params.accumulate(world, head_unit, &grads(&head))?;
    let mut grad_x = x_last.grad();
    drop((head, head_weights, x_last, x));

    // Backward, last layer first: recompute each layer in three segments.
    for l in (0..layers).rev() {
        let w: Vec<Tensor> = params.gather(world, 1 + l, ctx.kind, ctx.device)?.iter().map(leaf).collect();
        let lw = LayerWeights::from_tensors(w.iter().map(|t| t.shallow_clone()).collect());
        let x_in = leaf(&inputs[l]);
        // Segment 1 (pre-attention): norm, q/k/v projections, RoPE; KV heads replicated when
        // there are fewer than SP ranks, inside the graph so their gradients sum back.
        let (q, k, v) = llama::pre_attention(spec, &lw, &x_in, &rope);
        let (k, v) = (replicate_kv(&k, sp.size()), replicate_kv(&v, sp.size()));
        // Segment 2 (attention) on head shards: [b, s/sp, H, d] -> [b, s, H/sp, d].
        let (qh, kh, vh) = (leaf(&seq_to_heads(sp, &q)?), leaf(&seq_to_heads(sp, &k)?), leaf(&seq_to_heads(sp, &v)?));
        let oh = LocalAttention.attend(&qh, &kh, &vh);
        // Segment 3 (post-attention): O projection, residual, MLP.
        let o = leaf(&heads_to_seq(sp, &oh)?);
        let y = llama::post_attention(spec, &lw, &x_in, &o, ctx.mlp_tile);
        backprop(&[(&y, &grad_x)]);
        backprop(&[(&oh, &seq_to_heads(sp, &o.grad())?)]);
        let (gq, gk, gv) = (heads_to_seq(sp, &qh.grad())?, heads_to_seq(sp, &kh.grad())?, heads_to_seq(sp, &vh.grad())?);
        backprop(&[(&q, &gq), (&k, &gk), (&v, &gv)]);
        grad_x = x_in.grad();
        params.accumulate(world, 1 + l, &grads(&w))?;
        inputs.truncate(l);
    }

    // Embedding (plus the LM head's gradient when the two are tied).
    let embed = leaf(&params.gather(world, 0, ctx.kind, ctx.device)?[0]);
    let e = Tensor::embedding(&embed, &batch.input_ids, -1, false, false);
    backprop(&[(&e, &grad_x)]);
    let mut g = embed.grad();
    if let Some(t) = tied {
        g = g + t.grad();
    }
    params.accumulate(world, 0, &[g])?;
    Ok(loss_local)
}

/// Sum of `x` over every rank.
pub fn sum_over(group: &dyn Collective, x: f64) -> Result<f64> {
    Ok(crate::comm::all_reduce_f64(group, x)?)
}
