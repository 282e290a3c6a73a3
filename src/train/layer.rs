//! One decoder layer of the training step: its forward without a graph and its backward by
//! recompute, across the Ulysses all-to-alls.
//!
//! The forward keeps only what backward needs, in the activation store where the memory plan put
//! it: the layer's input and, on the kept-attention path, attention's head-sharded output and its
//! log-sum-exp. Backward recomputes the layer in three segments that end at the all-to-alls, each
//! with its own autograd graph, and moves gradients across the all-to-alls in reverse between
//! them:
//!
//! ```text
//!   segment 1  pre-attention   RMSNorm, q/k/v, RoPE (+ KV replication)   [b, s/sp, H, d]  sequence-sharded
//!              seq_to_heads    all-to-all                                 [b, s, H/sp, d]  head-sharded
//!   segment 2  attention       kept (fused backward), recomputed, or skipped
//!              heads_to_seq    all-to-all                                 [b, s/sp, H, d]
//!   segment 3  post-attention  O projection + residual, MLP tile by tile  [b, s/sp, h]
//! ```
//!
//! Backward runs segment 3 first (it needs only attention's output), then attention, then
//! segment 1, so that no two segments' graphs exist at once.
//!
//! With a ring (`parallel.ring` > 1) segment 2 is ring attention (`parallel::ring`) over the ring
//! group after the Ulysses all-to-all: kept (output and merged log-sum-exp kept, the ring backward
//! from them) or recomputed (the ring forward again in backward, then the ring backward).
//!
//! With packed documents (`data.documents = "mask"`) a micro batch whose samples hold more than
//! one document brings a `DocumentMask`: attention then runs the masked kernel on both paths,
//! kept (output and log-sum-exp kept, fused backward) and recomputed (the masked forward again in
//! backward, then its fused backward). A micro batch of single-document samples has no mask and
//! takes exactly the path of unpacked data.
//!
//! With LoRA's dropout (`lora.dropout` > 0) the graphs of segments 1 and 3 leave the adapters'
//! dropped branches out and settle them by hand after their backward (`Cut`), so no graph keeps a
//! mask or a dropped input; the masks are drawn again from the tokens' positions.
use super::store::{ActivationStore, Key};
use crate::comm::Collective;
use crate::config::LoraTarget;
use crate::ffi::attention::{self as fused, KernelCall, Saved};
use crate::ffi::autograd;
use crate::ffi::elementwise;
use crate::metrics::profile::Profiler;
use crate::model::adapter::Deferred;
use crate::model::llama::{self, seq_tiles, AttentionCore, LayerWeights, LocalAttention};
use crate::model::mask::DocumentMask;
use crate::model::rope::{rotate, Rope, Turn};
use crate::model::spec::ModelSpec;
use crate::parallel::attention::AttentionPath;
use crate::parallel::blocks;
use crate::parallel::ring::Ring;
use crate::parallel::ulysses::{heads_to_seq, replicate_kv, seq_to_heads};
use crate::plan::memory::Place;
use crate::units::gib;
use anyhow::{anyhow, Result};
use tch::{Device, Kind, Tensor};

/// What every layer's segments share in one micro batch.
pub struct Segments<'a> {
    pub spec: &'a ModelSpec,
    /// The SP group the all-to-alls run over.
    pub sp: &'a dyn Collective,
    /// RoPE at this micro batch's global positions.
    pub rope: &'a Rope,
    pub profiler: &'a Profiler,
    /// Tokens per MLP tile (0: untiled).
    pub mlp_tile: usize,
    pub device: Device,
    /// This micro batch's documents, when attention stays within them and some sample holds more
    /// than one (None: plain causal attention).
    pub mask: Option<&'a DocumentMask>,
    /// Ring attention over the ring group (`parallel.ring` > 1), else None.
    pub ring: Option<Ring<'a>>,
}

/// One decoder layer of the step: where its input waits and how its attention is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecoderLayer {
    pub index: usize,
    pub input: Place,
    pub attention: AttentionPath,
    /// With attention kept: run segment 1 once in backward and keep its graph through attention's
    /// backward (the memory plan's `Placement::qkv_once`), instead of a graph-free pass for the
    /// head shards and a second pass with a graph after.
    pub qkv_once: bool,
    /// Keep the MLP's gate and up projections from the forward (on the GPU), so backward does
    /// not recompute them (the memory plan's `Placement::mlp`).
    pub keep_mlp: bool,
}

/// What a layer's forward left for its backward.
pub struct SavedLayer {
    input: Key,
    attention: Option<KeptAttention>,
    /// The MLP's gate and up projections, when kept.
    mlp: Option<(Key, Key)>,
}

/// A layer's kept attention: the head-sharded output, its log-sum-exp and the kernel calls'
/// extras.
struct KeptAttention {
    out: Key,
    lse: Key,
    calls: Vec<KernelCall>,
}

impl SavedLayer {
    /// Frees what the forward kept, after a forward that has no backward (validation).
    pub fn release(self, store: &mut ActivationStore) -> Result<()> {
        let mut keys = vec![self.input];
        if let Some(k) = self.attention {
            keys.extend([k.out, k.lse]);
        }
        if let Some((gate, up)) = self.mlp {
            keys.extend([gate, up]);
        }
        for key in keys {
            drop(store.take(key)?);
        }
        Ok(())
    }

    /// Starts bringing this layer's kept tensors back to the GPU, so the copies overlap the
    /// compute of the layer after it in backward.
    pub fn prefetch(&self, store: &mut ActivationStore) -> Result<()> {
        store.prefetch(&self.input)?;
        if let Some(k) = &self.attention {
            store.prefetch(&k.out)?;
            store.prefetch(&k.lse)?;
        }
        Ok(())
    }
}

impl DecoderLayer {
    /// This layer for a forward without backward (validation): the same attention kernel, but
    /// whatever it keeps stays on the device (no copies to host memory or disk), to be released
    /// as soon as the layer is done.
    pub fn forward_only(self) -> DecoderLayer {
        let attention = match self.attention {
            AttentionPath::Kept { kernel, .. } => AttentionPath::Kept { kernel, place: Place::Device },
            AttentionPath::Skipped { keep } => AttentionPath::Skipped { keep: keep.map(|_| Place::Device) },
            AttentionPath::Recomputed => AttentionPath::Recomputed,
        };
        DecoderLayer { input: Place::Device, attention, keep_mlp: false, ..self }
    }

    /// The layer's output for input `x` (no graph), and what its backward needs: `x` itself and,
    /// on the kept path, attention's output and log-sum-exp, stored where the plan placed them.
    pub fn forward(
        &self,
        seg: &Segments,
        w: &LayerWeights,
        x: Tensor,
        store: &mut ActivationStore,
    ) -> Result<(Tensor, SavedLayer)> {
        let prof = seg.profiler;
        let (y, attention, mlp) = tch::no_grad(|| -> Result<_> {
            // Each activation is dropped as soon as the next one exists (sequence-long tensors).
            let [qh, kh, vh] = prof.phase(format_args!("pre-attention"), || self.head_shards(seg, w, &x))?;
            let (oh, saved) = prof.phase(format_args!("attention"), || self.attention_forward(seg, &qh, &kh, &vh))?;
            let attention = match (self.attention.keeps(), saved) {
                (Some(place), Some(saved)) => Some(KeptAttention {
                    out: store.put(oh.shallow_clone(), place)?,
                    lse: store.put(saved.lse, place)?,
                    calls: saved.calls,
                }),
                _ => None,
            };
            drop((qh, kh, vh));
            prof.phase(format_args!("post-attention"), || {
                let o = to_seq(seg, &oh)?;
                drop(oh);
                let (y, mlp) = llama::post_attention_no_grad(
                    seg.spec,
                    w,
                    &x,
                    &o,
                    seg.mlp_tile,
                    self.keep_mlp,
                    elementwise::swiglu_into_gate,
                )?;
                let mlp = match mlp {
                    Some((gate, up)) => Some((store.put(gate, Place::Device)?, store.put(up, Place::Device)?)),
                    None => None,
                };
                Ok((y, attention, mlp))
            })
        })?;
        let input = store.put(x, self.input)?;
        Ok((y, SavedLayer { input, attention, mlp }))
    }

    /// The gradient of the layer's input from `grad_y`, the gradient of its output; the weight
    /// gradients accumulate into `w`'s leaves.
    pub fn backward(
        &self,
        seg: &Segments,
        w: &LayerWeights,
        saved: SavedLayer,
        grad_y: Tensor,
        store: &mut ActivationStore,
    ) -> Result<Tensor> {
        let (l, prof) = (self.index, seg.profiler);
        let x = leaf(&store.take(saved.input)?);
        // Segment 2's inputs: the kept output (the head shards are needed only after segment 3),
        // or the attention forward recomputed: with a graph on the head shards as leaves, or,
        // within documents, by the masked kernel, whose fused backward then takes its output.
        let (oh, kept, shards) = match saved.attention {
            Some(k) => {
                let kept = Saved { lse: store.take(k.lse)?, calls: k.calls };
                (store.take(k.out)?, Some(kept), None)
            }
            None => prof.phase(format_args!("attention forward (recompute)"), || -> Result<_> {
                Ok(match (self.attention, seg.mask) {
                    (AttentionPath::Skipped { .. }, _) => {
                        let [qh, kh, vh] = self.head_shards(seg, w, &x)?;
                        (qh.zeros_like(), None, Some([qh, kh, vh]))
                    }
                    (_, _) if seg.ring.is_some() => {
                        let ring = seg.ring.expect("checked");
                        let [qh, kh, vh] = self.head_shards(seg, w, &x)?;
                        let (oh, kept) = prof.attention(|| ring.forward(&qh, &kh, &vh))?;
                        (oh, Some(kept), Some([qh, kh, vh]))
                    }
                    (_, Some(mask)) => {
                        let [qh, kh, vh] = self.head_shards(seg, w, &x)?;
                        let (oh, kept) = prof.attention(|| fused::forward_masked(mask, &qh, &kh, &vh))?;
                        (oh, Some(kept), Some([qh, kh, vh]))
                    }
                    (_, None) => {
                        let [qh, kh, vh] = self.head_shards(seg, w, &x)?.map(|t| leaf(&t));
                        let oh = prof.attention(|| LocalAttention.attend(&qh, &kh, &vh));
                        (oh, None, Some([qh, kh, vh]))
                    }
                })
            })?,
        };
        let mlp = match saved.mlp {
            Some((gate, up)) => Some((store.take(gate)?, store.take(up)?)),
            None => None,
        };
        let grad_oh =
            prof.phase(format_args!("post-attention"), || self.post_attention_backward(seg, w, &x, &oh, mlp, grad_y))?;
        log_phase(seg, format_args!("backward layer {l}: post-attention"));
        // Segment 1 with its graph now, when it runs once: its head shards feed the fused backward.
        let qkv = (self.qkv_once && kept.is_some() && shards.is_none())
            .then(|| prof.phase(format_args!("pre-attention recompute"), || self.qkv_graph(seg, w, &x)));
        let (gq, gk, gv) = prof.phase(format_args!("attention"), || -> Result<_> {
            let [qh, kh, vh] = match (shards, &qkv) {
                (Some(shards), _) => shards,
                (None, Some(Qkv { q, k, v, .. })) => tch::no_grad(|| -> Result<_> {
                    let (q, k) = rotated(seg, q, k, Turn::Forward);
                    Ok([to_heads(seg, &q)?, to_heads(seg, &k)?, to_heads(seg, v)?])
                })?,
                (None, None) => self.head_shards(seg, w, &x)?,
            };
            let kept = kept.as_ref().map(|saved| fused::Backward {
                grad_out: &grad_oh,
                q: &qh,
                k: &kh,
                v: &vh,
                out: &oh,
                saved,
            });
            let g = match (self.attention, kept, seg.mask) {
                (AttentionPath::Skipped { .. }, _, _) => (qh.zeros_like(), kh.zeros_like(), vh.zeros_like()),
                (_, Some(inputs), _) if seg.ring.is_some() => {
                    let ring = seg.ring.expect("checked");
                    prof.attention(|| tch::no_grad(|| ring.backward(inputs)))?
                }
                (_, Some(inputs), Some(mask)) => {
                    prof.attention(|| tch::no_grad(|| fused::backward_masked(mask, inputs)))?
                }
                (AttentionPath::Kept { kernel, .. }, Some(inputs), None) => {
                    prof.attention(|| tch::no_grad(|| fused::backward(kernel, inputs)))?
                }
                _ => {
                    prof.attention(|| backprop(&[(&oh, &grad_oh)]))?;
                    (qh.grad(), kh.grad(), vh.grad())
                }
            };
            drop((qh, kh, vh, oh, grad_oh));
            Ok(g)
        })?;
        log_phase(seg, format_args!("backward layer {l}: attention"));
        prof.phase(format_args!("pre-attention"), || self.pre_attention_backward(seg, w, &x, qkv, [gq, gk, gv]))?;
        log_phase(seg, format_args!("backward layer {l}: pre-attention"));
        Ok(grad(&x))
    }

    /// Segment 1 up to RoPE: norm and q/k/v projections on the rank's chunk, with KV heads
    /// replicated when there are fewer than SP ranks (inside any graph, so their gradients sum
    /// back). q and k are rotated by `rotated` outside any graph, and their gradients turned back
    /// by `unrotated` (RoPE is a rotation: its backward is the inverse rotation; the same per
    /// head, so it commutes with the replication).
    fn qkv(&self, seg: &Segments, w: &LayerWeights, x: &Tensor) -> (Tensor, Tensor, Tensor) {
        let (q, k, v) = llama::qkv_projections(seg.spec, w, x);
        (q, replicate_kv(&k, seg.sp.size()), replicate_kv(&v, seg.sp.size()))
    }

    /// `qkv` with a graph from x, for backward. With dropping adapters the graph is cut at the
    /// normalized input: its projections start from a leaf copy of it and leave the dropped
    /// branches out (`LayerAdapters::deferring`), which `pre_attention_backward` settles by hand.
    fn qkv_graph(&self, seg: &Segments, w: &LayerWeights, x: &Tensor) -> Qkv {
        if w.adapters.dropout.is_none() {
            let (q, k, v) = self.qkv(seg, w, x);
            return Qkv { q, k, v, cut: None };
        }
        let xn = llama::rms_norm(x, &w.attn_norm, seg.spec.rms_norm_eps);
        let ((q, k, v), cut) = Cut::at(w, xn, |xn| llama::qkv_of_normed(seg.spec, w, xn));
        let (k, v) = (replicate_kv(&k, seg.sp.size()), replicate_kv(&v, seg.sp.size()));
        Qkv { q, k, v, cut: Some(cut) }
    }

    /// Segment 1 without a graph, moved to head shards: `[b, s/sp, H, d] -> [b, s, H/sp, d]`.
    fn head_shards(&self, seg: &Segments, w: &LayerWeights, x: &Tensor) -> Result<[Tensor; 3]> {
        tch::no_grad(|| {
            let (q, k, v) = self.qkv(seg, w, x);
            let (q, k) = rotated(seg, &q, &k, Turn::Forward);
            Ok([to_heads(seg, &q)?, to_heads(seg, &k)?, to_heads(seg, &v)?])
        })
    }

    /// Segment 2 forward without a graph: attention's output `[b, s, H/sp, d]` and, from the fused
    /// kernel (or its memory-fit stand-in), what its backward needs.
    fn attention_forward(
        &self,
        seg: &Segments,
        qh: &Tensor,
        kh: &Tensor,
        vh: &Tensor,
    ) -> Result<(Tensor, Option<Saved>)> {
        Ok(match (self.attention, seg.mask) {
            (AttentionPath::Kept { .. } | AttentionPath::Recomputed, _) if seg.ring.is_some() => {
                let ring = seg.ring.expect("checked");
                let (oh, saved) = seg.profiler.attention(|| ring.forward(qh, kh, vh))?;
                (oh, self.attention.keeps().map(|_| saved))
            }
            (AttentionPath::Kept { .. }, Some(mask)) => {
                let (oh, saved) = seg.profiler.attention(|| fused::forward_masked(mask, qh, kh, vh))?;
                (oh, Some(saved))
            }
            (AttentionPath::Kept { kernel, .. }, None) => {
                let (oh, saved) = seg.profiler.attention(|| blocks::forward(kernel, qh, kh, vh))?;
                (oh, Some(saved))
            }
            (AttentionPath::Recomputed, Some(mask)) => {
                (seg.profiler.attention(|| fused::forward_masked(mask, qh, kh, vh))?.0, None)
            }
            (AttentionPath::Recomputed, None) => (seg.profiler.attention(|| LocalAttention.attend(qh, kh, vh)), None),
            (AttentionPath::Skipped { keep: Some(_) }, _) => zero_attention(qh),
            (AttentionPath::Skipped { keep: None }, _) => (qh.zeros_like(), None),
        })
    }

    /// Segment 3 recomputed and backpropagated: the O projection and residual, then the MLP one
    /// tile of tokens at a time so its wide activations exist for one tile. The MLP's gate and up
    /// projections come from `mlp` when the forward kept them, else they are recomputed. Returns
    /// the gradient of attention's head-sharded output; its tensors and `grad_y` are gone when it
    /// returns.
    fn post_attention_backward(
        &self,
        seg: &Segments,
        w: &LayerWeights,
        x: &Tensor,
        oh: &Tensor,
        mlp: Option<(Tensor, Tensor)>,
        grad_y: Tensor,
    ) -> Result<Tensor> {
        let o = leaf(&to_seq(seg, oh)?);
        // The O projection's dropped branch, if any, is left out of the graph and settled below.
        let deferred = {
            let (h, deferred) = w.adapters.deferring(|| llama::attention_residual(seg.spec, w, x, &o));
            // h's gradient is the residual's `grad_y` plus the MLP's, which each tile adds in place
            // to its own tokens of `grad_y`: a tile's leaf is a view of h's values, so its gradient
            // is tile-sized (a leaf for all of h would get each tile's gradient padded with zeros
            // to the whole sequence and summed, three sequence-long passes per tile).
            let grad_h = grad_y;
            for (start, len) in seq_tiles(h.size()[1], seg.mlp_tile) {
                let (mut g, h_tile) = (grad_h.narrow(1, start, len), leaf(&h.narrow(1, start, len)));
                // The adapters' dropout masks follow the tile's tokens.
                let tile_w = w.tokens(start, len);
                let w = tile_w.as_ref().unwrap_or(w);
                let kept = mlp.as_ref().map(|(gate, up)| (gate.narrow(1, start, len), up.narrow(1, start, len)));
                match kept {
                    None if w.adapters.dropout.is_some() => self.cut_mlp_backward(seg, w, &h_tile, &g)?,
                    kept => mlp_tile_backward(seg.spec, w, &h_tile, kept, &g)?,
                }
                let _ = g.g_add_(&grad(&h_tile));
            }
            drop(mlp);
            backprop(&[(&h, &grad_h)])?;
            deferred
        };
        let mut grads = Vec::new();
        let mut grad_o = o.grad();
        if !deferred.is_empty() {
            // The dropped branch's input is o as [b, s, heads·d] (o's gradient has o's strides,
            // which after an all-to-all need not be contiguous).
            grad_o = grad_o.contiguous();
            let (b, s) = (grad_o.size()[0], grad_o.size()[1]);
            w.adapters.settle(deferred, &mut grads, &mut grad_o.view([b, s, -1]));
        }
        if !grads.is_empty() {
            backprop(&grads.iter().map(|(t, g)| (*t, g)).collect::<Vec<_>>())?;
        }
        to_heads(seg, &grad_o)
    }

    /// `mlp_tile_backward` with adapters that drop: the graph is cut at the normalized input
    /// (`Cut`), and `act = silu(gate) * up` is recomputed with a graph from there (autograd
    /// backpropagates the SwiGLU); the down projection by hand as there.
    fn cut_mlp_backward(&self, seg: &Segments, w: &LayerWeights, h: &Tensor, g: &Tensor) -> Result<()> {
        let hn = llama::rms_norm(h, &w.mlp_norm, seg.spec.rms_norm_eps);
        let ((gate, up), cut) = Cut::at(w, hn, |hn| llama::mlp_projections_of_normed(w, hn));
        let act = gate.silu() * up;
        let mut grads = Vec::new();
        let grad_act = tch::no_grad(|| project_backward(w, LoraTarget::Down, &act, g, &mut grads));
        grads.push((&act, grad_act));
        backprop(&grads.iter().map(|(t, g)| (*t, g)).collect::<Vec<_>>())?;
        drop(grads);
        drop(act);
        cut.settle(w)
    }

    /// Segment 1 backpropagated from the head shards' gradients (moved back to the
    /// sequence-sharded layout): through `qkv`'s graph when it ran once, else recomputed with a
    /// graph here. The input's gradient lands in `x.grad()`.
    fn pre_attention_backward(
        &self,
        seg: &Segments,
        w: &LayerWeights,
        x: &Tensor,
        qkv: Option<Qkv>,
        g: [Tensor; 3],
    ) -> Result<()> {
        let [gq, gk, gv] = g;
        let (gq, gk, gv) = (to_seq(seg, &gq)?, to_seq(seg, &gk)?, to_seq(seg, &gv)?);
        // The gradients of q and k before RoPE.
        let (gq, gk) = tch::no_grad(|| rotated(seg, &gq, &gk, Turn::Inverse));
        let Qkv { q, k, v, cut } = qkv.unwrap_or_else(|| self.qkv_graph(seg, w, x));
        backprop(&[(&q, &gq), (&k, &gk), (&v, &gv)])?;
        drop((q, k, v, gq, gk, gv));
        cut.map_or(Ok(()), |cut| cut.settle(w))
    }
}

/// Segment 1's q, k and v with a graph, for backward.
struct Qkv {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// With dropping adapters: where the graph is cut (`DecoderLayer::qkv_graph`).
    cut: Option<Cut>,
}

/// A graph cut at a normalized input (segment 1's, or an MLP tile's) for adapters that drop:
/// `xn` with the norm's graph from the layer's tensor, the leaf the projections start from, and
/// their dropped branches left out of the graph (`LayerAdapters::deferring`), so that it keeps no
/// mask or dropped input.
struct Cut {
    xn: Tensor,
    xn_leaf: Tensor,
    deferred: Vec<Deferred>,
}

impl Cut {
    /// `build` from a leaf copy of `xn`, its dropped branches deferred.
    fn at<T>(w: &LayerWeights, xn: Tensor, build: impl FnOnce(&Tensor) -> T) -> (T, Cut) {
        let xn_leaf = leaf(&xn);
        let (out, deferred) = w.adapters.deferring(|| build(&xn_leaf));
        (out, Cut { xn, xn_leaf, deferred })
    }

    /// After the backward of what `at` built: the dropped branches by hand (A's gradients and
    /// their share of xn's), then the norm's backward from xn's whole gradient.
    fn settle(self, w: &LayerWeights) -> Result<()> {
        let mut grads = Vec::new();
        let mut grad_xn = grad(&self.xn_leaf);
        w.adapters.settle(self.deferred, &mut grads, &mut grad_xn);
        grads.push((&self.xn, grad_xn));
        backprop(&grads.iter().map(|(t, g)| (*t, g)).collect::<Vec<_>>())
    }
}

/// q and k (`[b, s/sp, heads, d]`) rotated by RoPE at this micro batch's positions, or back.
fn rotated(seg: &Segments, q: &Tensor, k: &Tensor, turn: Turn) -> (Tensor, Tensor) {
    (rotate(q, seg.rope, turn), rotate(k, seg.rope, turn))
}

/// `[b, s/sp, H, d] -> [b, s, H/sp, d]` over the SP group; with one rank, the tensor itself.
fn to_heads(seg: &Segments, t: &Tensor) -> Result<Tensor> {
    if seg.sp.size() == 1 {
        return Ok(t.shallow_clone());
    }
    Ok(seg.profiler.comm(seg.sp, || seq_to_heads(seg.sp, t))?)
}

/// `[b, s, H/sp, d] -> [b, s/sp, H, d]` over the SP group; with one rank, the tensor itself.
fn to_seq(seg: &Segments, t: &Tensor) -> Result<Tensor> {
    if seg.sp.size() == 1 {
        return Ok(t.shallow_clone());
    }
    Ok(seg.profiler.comm(seg.sp, || heads_to_seq(seg.sp, t))?)
}

/// A projection of `w` backpropagated by hand from its input `x` [b, t, in] and its output's
/// gradient `g` [b, t, out]: returns x's gradient, and pushes (leaf, gradient) for the base
/// weight when it trains (a frozen base costs no weight-gradient matmul) and for its adapter.
fn project_backward<'w>(
    w: &'w LayerWeights,
    target: LoraTarget,
    x: &Tensor,
    g: &Tensor,
    grads: &mut Vec<(&'w Tensor, Tensor)>,
) -> Tensor {
    let weight = w.weight(target).0;
    // [b, t, out] @ [out, in] -> [b, t, in]
    let mut grad_x = g.matmul(weight);
    if weight.requires_grad() {
        grads.push((weight, transposed_mm(g, x)));
    }
    if let Some(adapter_grads) = w.adapters.backward(target, x, g, &mut grad_x) {
        grads.extend(adapter_grads);
    }
    grad_x
}

/// One MLP tile's backward, `y = h + act · W_downᵀ` with `act = silu(gate) * up`, `gate` and `up`
/// the projections of `hn = RMSNorm(h)`: only the norm is recomputed with a graph. The gate and up
/// projections come from the forward (`kept`, views of the layer's) or are recomputed without a
/// graph; the SwiGLU (fused on the GPU) and the three projections are backpropagated by hand, so
/// no graph keeps a tile-sized tensor and the down projection's output (a matmul's worth of work)
/// is never recomputed. h's gradient lands in `h.grad()` without the residual's share, which the
/// caller adds; the weights' gradients accumulate into `w`'s leaves.
pub fn mlp_tile_backward(
    spec: &ModelSpec,
    w: &LayerWeights,
    h: &Tensor,
    kept: Option<(Tensor, Tensor)>,
    g: &Tensor,
) -> Result<()> {
    let hn = llama::rms_norm(h, &w.mlp_norm, spec.rms_norm_eps);
    let mut grads = Vec::new();
    let grad_hn = tch::no_grad(|| -> Result<_> {
        let (gate, up) = kept.unwrap_or_else(|| llama::mlp_projections_of_normed(w, &hn));
        let act = elementwise::swiglu(&gate, &up)?;
        let grad_act = project_backward(w, LoraTarget::Down, &act, g, &mut grads);
        drop(act);
        let (grad_gate, grad_up) = elementwise::swiglu_backward(&gate, &up, &grad_act)?;
        drop((gate, up, grad_act));
        let grad_hn = project_backward(w, LoraTarget::Gate, &hn, &grad_gate, &mut grads);
        drop(grad_gate);
        Ok(grad_hn + project_backward(w, LoraTarget::Up, &hn, &grad_up, &mut grads))
    })?;
    grads.push((&hn, grad_hn));
    backprop(&grads.iter().map(|(t, g)| (*t, g)).collect::<Vec<_>>())
}

/// The weight gradient of a linear map from `input` to an output whose gradient is `grad`:
/// `gradᵀ · input`, `[b, t, out]` and `[b, t, in]` -> `[out, in]` (autograd's own formula).
fn transposed_mm(grad: &Tensor, input: &Tensor) -> Tensor {
    let (out, inp) = (*grad.size().last().expect("[b, t, out]"), *input.size().last().expect("[b, t, in]"));
    // [out, b·t] @ [b·t, in] -> [out, in]
    grad.reshape([-1, out]).tr().mm(&input.reshape([-1, inp]))
}

/// A memory-fit run's stand-in for attention's output and log-sum-exp: same sizes, zeros.
fn zero_attention(qh: &Tensor) -> (Tensor, Option<Saved>) {
    let (b, s, heads, _) = qh.size4().expect("attention tensors are [b, s, heads, d]");
    let lse = Tensor::zeros([b, heads, s], (Kind::Float, qh.device()));
    (qh.zeros_like(), Some(Saved { lse, calls: Vec::new() }))
}

/// A new leaf of the graph that starts at `t`.
pub(super) fn leaf(t: &Tensor) -> Tensor {
    t.detach().set_requires_grad(true)
}

/// Gradient of a leaf; a leaf no loss reached (a rank with no valid label) has none: zeros.
pub(super) fn grad(t: &Tensor) -> Tensor {
    let g = t.grad();
    if g.defined() {
        g
    } else {
        t.zeros_like()
    }
}

/// Backpropagates each `grad_out` into its `out`'s graph (gradients accumulate into the leaves).
pub(super) fn backprop(pairs: &[(&Tensor, &Tensor)]) -> Result<()> {
    autograd::backward(pairs).map_err(|e| anyhow!("{e}"))
}

/// The log target of the step's per-phase memory lines: `RUST_LOG=info,ulysses::train::step=debug`.
const PHASES: &str = "ulysses::train::step";

/// At debug level on a GPU: this phase's peak and what stays allocated after it (GiB), so that a
/// run shows where its working set peaks.
pub(super) fn log_phase(seg: &Segments, phase: std::fmt::Arguments) {
    if log::log_enabled!(target: PHASES, log::Level::Debug) && seg.device.is_cuda() {
        let (peak, now) = crate::metrics::memory::phase_peak_gpu(seg.device);
        log::debug!(target: PHASES, "{phase}: peak {:.2} GiB, then {:.2} GiB allocated", gib(peak), gib(now));
    }
}
