//! The decoder forward of every family (Llama's layer; Qwen3's q/k norms and Qwen2's biases are
//! switches of the spec), cut into the segments the parallel step recomputes one at a time:
//! `pre_attention` (RMSNorm, QKV, q/k norms, RoPE) | attention core | `post_attention` (O, residual, RMSNorm,
//! SwiGLU MLP, residual); then `head_loss`. Sequence parallelism enters only through the
//! `AttentionCore` the caller passes: every function here sees just the rank's local tokens, with
//! their global positions. `forward_logits` composes it all as the readable reference.
use super::rope::{apply_rope, Rope};
use super::spec::ModelSpec;
use crate::config::lora::LoraTarget;
pub use crate::data::IGNORE_INDEX;
use tch::{Kind, Reduction, Tensor};

pub use super::params::{LayerWeights, ModelWeights};

/// LlamaRMSNorm, normalizing in fp32: libtorch's `rms_norm`, on CUDA one fused kernel whose
/// backward keeps just the input and each token's fp32 reciprocal RMS (the op-by-op form kept an
/// fp32 copy of the input and the normalized input too: three hidden-sized bf16 tensors per
/// token more in every recomputed segment, and more again in its backward). It scales by the
/// weight before casting back to the input dtype where transformers casts first: the same in
/// fp32, one bf16 rounding fewer in bf16.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let hidden = *x.size().last().expect("activations have a hidden dimension");
    x.rms_norm([hidden], Some(weight), eps)
}

/// Pre-attention segment: RMSNorm -> q, k, v projections (with the family's biases) -> per-head
/// RMSNorm of q and k (Qwen3) -> RoPE at the global positions of `rope`. Everything here is per
/// token and per head, so a rank holding a chunk of the sequence computes exactly its rows of the
/// unsharded result, before any all-to-all. Returns (q [b, s, n_q, d], k [b, s, n_kv, d],
/// v [b, s, n_kv, d]).
pub fn pre_attention(spec: &ModelSpec, w: &LayerWeights, x: &Tensor, rope: &Rope) -> (Tensor, Tensor, Tensor) {
    let (q, k, v) = qkv_projections(spec, w, x);
    (apply_rope(&q, rope), apply_rope(&k, rope), v)
}

/// `pre_attention` up to RoPE: q and k not yet rotated. The step rotates them itself
/// (`rope::rotate`), and their gradients back, outside the graph.
pub fn qkv_projections(spec: &ModelSpec, w: &LayerWeights, x: &Tensor) -> (Tensor, Tensor, Tensor) {
    qkv_of_normed(spec, w, &rms_norm(x, &w.attn_norm, spec.rms_norm_eps))
}

/// `qkv_projections` after the norm: from `xn = RMSNorm(x)`.
pub fn qkv_of_normed(spec: &ModelSpec, w: &LayerWeights, xn: &Tensor) -> (Tensor, Tensor, Tensor) {
    let (b, s) = (xn.size()[0], xn.size()[1]);
    let (n_q, n_kv, d) = (spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim);
    // [b, s, h] -> [b, s, n_q*d] -> [b, s, n_q, d]
    let q = w.project(LoraTarget::Q, xn).view([b, s, n_q, d]);
    // [b, s, h] -> [b, s, n_kv*d] -> [b, s, n_kv, d], for k and v
    let k = w.project(LoraTarget::K, xn).view([b, s, n_kv, d]);
    let v = w.project(LoraTarget::V, xn).view([b, s, n_kv, d]);
    // Qwen3: RMSNorm over each head's d values (weights [d], shared by the heads).
    match (&w.q_norm, &w.k_norm) {
        (Some(qn), Some(kn)) => (rms_norm(&q, qn, spec.rms_norm_eps), rms_norm(&k, kn, spec.rms_norm_eps), v),
        _ => (q, k, v),
    }
}

/// The attention seam. `attend(q [b, s, n_q, d], k [b, s, n_kv, d], v [b, s, n_kv, d])` returns
/// [b, s, n_q, d], causal over the sequence it is given. The Ulysses core wraps a local core with
/// the all-to-alls; the model never learns how the sequence is split.
pub trait AttentionCore {
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor;
}

/// Causal scaled-dot-product attention on one device (softmax scale 1/sqrt(d), as in Llama).
/// Grouped-query attention goes through `enable_gqa`, which libtorch's CPU (math) kernel and the
/// flash and cuDNN GPU kernels accept, instead of materializing repeated KV heads.
pub struct LocalAttention;

impl AttentionCore for LocalAttention {
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let gqa = q.size()[2] != k.size()[2];
        // [b, s, heads, d] -> [b, heads, s, d]
        let (q, k, v) = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2));
        let out = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, true, None, gqa);
        // [b, n_q, s, d] -> [b, s, n_q, d]
        out.transpose(1, 2)
    }
}

/// Post-attention segment: o-projection + residual, then RMSNorm -> SwiGLU MLP + residual. The
/// MLP runs over tiles of `mlp_tile` tokens (0: all at once) so that, without autograd, its
/// [tokens, intermediate] activations exist for one tile at a time; the result does not depend
/// on the tiling. With autograd every tile's activations stay in the graph: to keep the memory
/// win in backward, backpropagate `mlp_residual` tile by tile instead.
pub fn post_attention(spec: &ModelSpec, w: &LayerWeights, x: &Tensor, attn: &Tensor, mlp_tile: usize) -> Tensor {
    let h = attention_residual(spec, w, x, attn);
    let s = h.size()[1];
    let tiles: Vec<Tensor> = seq_tiles(s, mlp_tile)
        // [b, s, h] -> [b, tile, h]
        .map(|(start, len)| {
            let tile_w = w.tokens(start, len);
            mlp_residual(spec, tile_w.as_ref().unwrap_or(w), &h.narrow(1, start, len))
        })
        .collect();
    // [b, tile, h] x n -> [b, s, h]
    Tensor::cat(&tiles, 1)
}

/// `post_attention` without autograd and without a second sequence-long tensor: each MLP tile's
/// down projection is added in place to its own tile of the residual stream (a tile's output
/// depends only on that tile, computed whole before the write). For the step's forward pass,
/// which keeps no graph.
/// `swiglu(gate, up)` is the SwiGLU, free to reuse gate's memory: a seam like `AttentionCore`, so
/// the step can pass a fused GPU kernel; `swiglu_in_place` is the op-by-op one.
/// With `keep_mlp` it also returns the MLP's gate and up projections of every token
/// (`[b, s, intermediate]` each), for a backward that does not recompute them.
pub fn post_attention_no_grad<E>(
    spec: &ModelSpec,
    w: &LayerWeights,
    x: &Tensor,
    attn: &Tensor,
    mlp_tile: usize,
    keep_mlp: bool,
    swiglu: impl Fn(Tensor, &Tensor) -> Result<Tensor, E>,
) -> Result<(Tensor, Option<(Tensor, Tensor)>), E> {
    tch::no_grad(|| {
        let h = attention_residual(spec, w, x, attn);
        let (b, s) = (h.size()[0], h.size()[1]);
        let kept = keep_mlp.then(|| {
            let empty = || Tensor::empty([b, s, spec.intermediate_size], (h.kind(), h.device()));
            (empty(), empty())
        });
        for (start, len) in seq_tiles(s, mlp_tile) {
            let mut tile = h.narrow(1, start, len);
            let tile_w = w.tokens(start, len);
            let w = tile_w.as_ref().unwrap_or(w);
            let (gate, up) = mlp_projections(spec, w, &tile);
            if let Some((g, u)) = &kept {
                g.narrow(1, start, len).copy_(&gate);
                u.narrow(1, start, len).copy_(&up);
            }
            let act = swiglu(gate, &up)?;
            drop(up);
            let _ = tile.g_add_(&w.project(LoraTarget::Down, &act));
        }
        Ok((h, kept))
    })
}

/// First part of `post_attention`: `x + o_proj(attn)`, attn [b, s, n_q, d] -> [b, s, h].
pub fn attention_residual(spec: &ModelSpec, w: &LayerWeights, x: &Tensor, attn: &Tensor) -> Tensor {
    let (b, s) = (x.size()[0], x.size()[1]);
    // [b, s, n_q, d] -> [b, s, n_q*d]
    let attn = attn.reshape([b, s, spec.num_attention_heads * spec.head_dim]);
    x + w.project(LoraTarget::O, &attn)
}

/// Second part of `post_attention`, per token: `h + down(silu(gate(n)) * up(n))` with
/// `n = RMSNorm(h)`, h [b, tokens, h] -> [b, tokens, h]. Any tile of tokens can run alone.
pub fn mlp_residual(spec: &ModelSpec, w: &LayerWeights, h: &Tensor) -> Tensor {
    h + w.project(LoraTarget::Down, &mlp_activation(spec, w, h))
}

/// `mlp_residual` up to the down projection's input: `silu(gate(n)) * up(n)`, h [b, tokens, h] ->
/// [b, tokens, intermediate]. A backward that has the output's gradient needs this, not the down
/// projection's output.
pub fn mlp_activation(spec: &ModelSpec, w: &LayerWeights, h: &Tensor) -> Tensor {
    let (gate, up) = mlp_projections(spec, w, h);
    gate.silu() * up
}

/// The MLP's gate and up projections of `n = RMSNorm(h)`, each [b, tokens, intermediate].
pub fn mlp_projections(spec: &ModelSpec, w: &LayerWeights, h: &Tensor) -> (Tensor, Tensor) {
    mlp_projections_of_normed(w, &rms_norm(h, &w.mlp_norm, spec.rms_norm_eps))
}

/// `mlp_projections` after the norm: from `hn = RMSNorm(h)`.
pub fn mlp_projections_of_normed(w: &LayerWeights, hn: &Tensor) -> (Tensor, Tensor) {
    (w.project(LoraTarget::Gate, hn), w.project(LoraTarget::Up, hn))
}

/// `silu(gate) * up` in gate's memory, without autograd: no tile-sized temporary.
pub fn swiglu_in_place(mut gate: Tensor, up: &Tensor) -> Tensor {
    gate.silu_().g_mul_(up)
}

/// The gradients of the gate and up projections' outputs from the gradient of
/// `silu(gate) * up`: `(g · up · silu'(gate), g · silu(gate))`.
pub fn swiglu_backward(gate: &Tensor, up: &Tensor, grad_act: &Tensor) -> (Tensor, Tensor) {
    (gate.silu_backward(&(grad_act * up)), grad_act * gate.silu())
}

/// One decoder layer: `pre_attention` -> `core.attend` -> `post_attention`.
pub fn layer_forward(
    spec: &ModelSpec,
    w: &LayerWeights,
    x: &Tensor,
    rope: &Rope,
    core: &dyn AttentionCore,
    mlp_tile: usize,
) -> Tensor {
    let (q, k, v) = pre_attention(spec, w, x, rope);
    let attn = core.attend(&q, &k, &v);
    post_attention(spec, w, x, &attn, mlp_tile)
}

/// Token embeddings: ids [b, s] (i64) -> [b, s, h].
pub fn embed(w: &ModelWeights, ids: &Tensor) -> Tensor {
    Tensor::embedding(&w.embed, ids, -1, false, false)
}

/// Final RMSNorm and LM head: x [b, s, h] -> logits [b, s, V] in fp32. The matmul runs in the
/// weights' dtype and the logits are upcast, as transformers does before its loss.
pub fn logits(spec: &ModelSpec, w: &ModelWeights, x: &Tensor) -> Tensor {
    head_logits(spec, &w.norm, w.lm_head(), x)
}

/// `logits` from the two tensors it needs (the parallel step gathers just these).
pub fn head_logits(spec: &ModelSpec, norm: &Tensor, lm_head: &Tensor, x: &Tensor) -> Tensor {
    let xn = rms_norm(x, norm, spec.rms_norm_eps);
    xn.linear(lm_head, None::<Tensor>).to_kind(Kind::Float)
}

/// Cross-entropy of every token of `x` in one piece, [b, s] fp32 (0 where the label is
/// `IGNORE_INDEX`), from the final norm and the LM head alone.
pub fn head_token_losses(spec: &ModelSpec, norm: &Tensor, lm_head: &Tensor, x: &Tensor, labels: &Tensor) -> Tensor {
    let (b, s) = (x.size()[0], x.size()[1]);
    // [b, s, h] -> [b, s, V] -> [b*s, V]
    let lg = head_logits(spec, norm, lm_head, x).view([b * s, spec.vocab_size]);
    // [b, s] -> [b*s]
    let target = labels.reshape([b * s]);
    let loss = lg.cross_entropy_loss(&target, None::<Tensor>, Reduction::None, IGNORE_INDEX, 0.0);
    // [b*s] -> [b, s]
    loss.view([b, s])
}

/// Cross-entropy of every token, [b, s] fp32 (0 where the label is `IGNORE_INDEX`), computed over
/// tiles of `loss_tile` tokens (0: untiled) so the full [b, s, V] logits never exist at once.
/// `labels` [b, s] are already aligned with `x`: label t is the target of position t; valid
/// labels must lie in [0, V).
pub fn token_losses(spec: &ModelSpec, w: &ModelWeights, x: &Tensor, labels: &Tensor, loss_tile: usize) -> Tensor {
    let s = x.size()[1];
    let tiles: Vec<Tensor> = seq_tiles(s, loss_tile)
        // [b, s, h] -> [b, tile, h] -> [b, tile]
        .map(|(start, len)| {
            head_token_losses(spec, &w.norm, w.lm_head(), &x.narrow(1, start, len), &labels.narrow(1, start, len))
        })
        .collect();
    // [b, tile] x n -> [b, s]
    Tensor::cat(&tiles, 1)
}

/// Final RMSNorm, LM head and the cross-entropy SUM over labels != -100, in fp32, tiled like
/// `token_losses`. Returns (loss_sum, number of valid labels); the sum keeps its autograd graph
/// and is 0 (never NaN) when no label is valid, so the caller can divide by the global count.
/// Under autograd each tile's fp32 log-probabilities are saved for backward; to bound that
/// memory too, call it on tiles (`x.narrow(1, ..)`, same for labels) and backpropagate each
/// before the next.
pub fn head_loss(spec: &ModelSpec, w: &ModelWeights, x: &Tensor, labels: &Tensor, loss_tile: usize) -> (Tensor, i64) {
    let valid = labels.ne(IGNORE_INDEX).sum(Kind::Int64).int64_value(&[]);
    (token_losses(spec, w, x, labels, loss_tile).sum(Kind::Float), valid)
}

/// The readable reference: the whole forward with autograd, ids [b, s] at global `positions`
/// [b, s] -> logits [b, s, V] (fp32). Used for Hugging Face parity and as the sp = 1 reference.
pub fn forward_logits(
    spec: &ModelSpec,
    w: &ModelWeights,
    ids: &Tensor,
    positions: &Tensor,
    core: &dyn AttentionCore,
) -> Tensor {
    let rope = Rope::new(spec, positions, w.embed.kind());
    let x = w.layers.iter().fold(embed(w, ids), |x, layer| layer_forward(spec, layer, &x, &rope, core, 0));
    logits(spec, w, &x)
}

/// (start, len) of consecutive tiles of `tile` tokens covering `s` (the last may be shorter);
/// tile 0 means one tile of everything. An empty sequence still gets one (empty) tile, so the
/// concatenations above always have something to join.
pub fn seq_tiles(s: i64, tile: usize) -> impl Iterator<Item = (i64, i64)> {
    let tile = if tile == 0 { s.max(1) } else { tile as i64 };
    (0..s.max(1)).step_by(tile as usize).map(move |start| (start, tile.min(s - start)))
}
