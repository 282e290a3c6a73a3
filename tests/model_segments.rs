//! The seams the parallel step relies on: segments compose to the layer; the layer-wise backward
//! with recompute (each segment its own graph, backpropagating `(out * grad_out).sum()`) gives the
//! gradients of full autograd; RoPE depends only on global positions; LocalAttention (GQA through
//! enable_gqa) equals plain causal softmax attention.
mod model_support;

use model_support::{assert_close, layer_leaves, leaves, positions, scaled_weights, tiny};
use tch::{Device, Kind, Tensor};
use ulysses::model::llama::{
    embed, forward_logits, head_loss, layer_forward, post_attention, pre_attention, AttentionCore, LayerWeights,
    LocalAttention, ModelWeights,
};
use ulysses::model::rope::{apply_rope, rotate, Rope, Turn};

const F32: (Kind, Device) = (Kind::Float, Device::Cpu);

#[test]
fn segments_compose_to_layer_forward() {
    let spec = tiny(false);
    let w = scaled_weights(&spec, 1);
    let x = Tensor::randn([2, 19, spec.hidden_size], F32);
    let rope = Rope::new(&spec, &positions(2, 5, 19), Kind::Float);
    let whole = layer_forward(&spec, &w.layers[0], &x, &rope, &LocalAttention, 0);
    let (q, k, v) = pre_attention(&spec, &w.layers[0], &x, &rope);
    assert_eq!(q.size(), [2, 19, spec.num_attention_heads, spec.head_dim]);
    assert_eq!(k.size(), [2, 19, spec.num_key_value_heads, spec.head_dim]);
    assert_eq!(v.size(), k.size());
    let attn = LocalAttention.attend(&q, &k, &v);
    assert_eq!(attn.size(), q.size());
    let parts = post_attention(&spec, &w.layers[0], &x, &attn, 0);
    assert!(parts.equal(&whole), "pre_attention + attend + post_attention != layer_forward");
}

/// Gradient contributions of one layer recomputed segment by segment, as the parallel step does
/// it: returns (grad w.r.t. the layer input, grads of the layer's nine tensors in NAMES order).
fn layer_backward(
    spec: &ulysses::model::spec::ModelSpec,
    w: &LayerWeights,
    x_in: &Tensor,
    rope: &Rope,
    grad_out: &Tensor,
) -> (Tensor, Vec<Tensor>) {
    let weights: Vec<&Tensor> = w.tensors().into_iter().map(|(_, t)| t).collect();
    // Forward without graphs, keeping the segment boundaries (the all-to-all points).
    let (q, k, v) = tch::no_grad(|| pre_attention(spec, w, x_in, rope));
    let attn = tch::no_grad(|| LocalAttention.attend(&q, &k, &v));
    // Post-attention segment: inputs x and attn, weights o, mlp norm, gate, up, down.
    let x = x_in.detach().set_requires_grad(true);
    let a = attn.detach().set_requires_grad(true);
    let out = post_attention(spec, w, &x, &a, 7);
    let mut inputs = vec![&x, &a];
    inputs.extend(&weights[4..]);
    let g_post = Tensor::run_backward(&[(&out * grad_out).sum(Kind::Float)], &inputs, false, false);
    // Attention segment.
    let (q, k, v) = (q.set_requires_grad(true), k.set_requires_grad(true), v.set_requires_grad(true));
    let out = LocalAttention.attend(&q, &k, &v);
    let g_attn = Tensor::run_backward(&[(&out * &g_post[1]).sum(Kind::Float)], &[&q, &k, &v], false, false);
    // Pre-attention segment: input x, weights attn norm, q, k, v.
    let x2 = x_in.detach().set_requires_grad(true);
    let (q, k, v) = pre_attention(spec, w, &x2, rope);
    let scalar =
        (&q * &g_attn[0]).sum(Kind::Float) + (&k * &g_attn[1]).sum(Kind::Float) + (&v * &g_attn[2]).sum(Kind::Float);
    let mut inputs = vec![&x2];
    inputs.extend(&weights[..4]);
    let g_pre = Tensor::run_backward(&[scalar], &inputs, false, false);
    let grad_x = &g_post[0] + &g_pre[0];
    (grad_x, g_pre[1..].iter().chain(&g_post[2..]).map(|t| t.shallow_clone()).collect())
}

/// The whole backward of the design (forward keeping only layer inputs; head loss; layers in
/// reverse with segment recompute; embedding last) against full autograd, for every weight.
fn check_layerwise_backward(tied: bool) {
    let spec = tiny(tied);
    let named = leaves(&scaled_weights(&spec, 2));
    let w =
        ModelWeights::from_named(&spec, named.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()).unwrap();
    let (b, s) = (2, 23);
    tch::manual_seed(3);
    let ids = Tensor::randint(spec.vocab_size, [b, s], (Kind::Int64, Device::Cpu));
    let labels = Tensor::randint(spec.vocab_size, [b, s], (Kind::Int64, Device::Cpu));
    // Global positions of a chunk that does not start at 0, as on sp rank > 0.
    let rope = Rope::new(&spec, &positions(b, 1000, s), Kind::Float);

    // Reference: one graph through everything.
    let x = w.layers.iter().fold(embed(&w, &ids), |x, l| layer_forward(&spec, l, &x, &rope, &LocalAttention, 0));
    let (loss, _) = head_loss(&spec, &w, &x, &labels, 0);
    let params: Vec<&Tensor> = named.iter().map(|(_, t)| t).collect();
    let reference = Tensor::run_backward(&[&loss], &params, false, false);

    // Layer-wise: forward with no graph, keeping each layer's input.
    let mut inputs = vec![tch::no_grad(|| embed(&w, &ids))];
    for l in &w.layers {
        let next = tch::no_grad(|| layer_forward(&spec, l, inputs.last().unwrap(), &rope, &LocalAttention, 0));
        inputs.push(next);
    }
    let x_last = inputs.pop().unwrap().set_requires_grad(true);
    let (loss2, _) = head_loss(&spec, &w, &x_last, &labels, 5);
    assert_close("loss", &loss2, &loss, 1e-6);
    let head_params: Vec<&Tensor> = if tied { vec![&w.norm, &w.embed] } else { vec![&w.norm, w.lm_head()] };
    let mut head_inputs = vec![&x_last];
    head_inputs.extend(head_params);
    let g_head = Tensor::run_backward(&[&loss2], &head_inputs, false, false);
    let mut grad = g_head[0].shallow_clone();
    let mut layer_grads: Vec<Vec<Tensor>> = (0..w.layers.len()).map(|_| Vec::new()).collect();
    for (i, l) in w.layers.iter().enumerate().rev() {
        let (g_x, g_w) = layer_backward(&spec, l, &inputs[i], &rope, &grad);
        grad = g_x;
        layer_grads[i] = g_w;
    }
    let embed_leaf = w.embed.detach().set_requires_grad(true);
    let e = Tensor::embedding(&embed_leaf, &ids, -1, false, false);
    let g_embed = Tensor::run_backward(&[(&e * &grad).sum(Kind::Float)], &[&embed_leaf], false, false).remove(0);

    // Assemble in named_tensors() order; a tied embedding sums its input and LM-head gradients.
    let mut ours = vec![if tied { &g_embed + &g_head[2] } else { g_embed }];
    ours.extend(layer_grads.into_iter().flatten());
    ours.push(g_head[1].shallow_clone());
    if !tied {
        ours.push(g_head[2].shallow_clone());
    }
    assert_eq!(ours.len(), reference.len());
    for (((name, _), g), g_ref) in named.iter().zip(&ours).zip(&reference) {
        assert!(g_ref.abs().max().double_value(&[]) > 0.0, "{name}: zero reference gradient");
        assert_close(&format!("grad {name} (tied {tied})"), g, g_ref, 1e-5);
    }
}

#[test]
fn layerwise_backward_with_recompute_matches_autograd() {
    check_layerwise_backward(false);
}

#[test]
fn layerwise_backward_with_recompute_matches_autograd_tied() {
    check_layerwise_backward(true);
}

/// One layer alone: the segment-wise gradients of its input and all nine weights equal autograd
/// through `layer_forward`.
#[test]
fn single_layer_segment_gradients_match_autograd() {
    let spec = tiny(false);
    let w = scaled_weights(&spec, 4);
    let layer = layer_leaves(&spec, &w, 1);
    let x = Tensor::randn([1, 31, spec.hidden_size], F32).set_requires_grad(true);
    let grad_out = Tensor::randn([1, 31, spec.hidden_size], F32);
    let rope = Rope::new(&spec, &positions(1, 0, 31), Kind::Float);
    let out = layer_forward(&spec, &layer, &x, &rope, &LocalAttention, 0);
    let mut inputs = vec![&x];
    inputs.extend(layer.tensors().into_iter().map(|(_, t)| t));
    let reference = Tensor::run_backward(&[(&out * &grad_out).sum(Kind::Float)], &inputs, false, false);
    let (g_x, g_w) = layer_backward(&spec, &layer, &x.detach(), &rope, &grad_out);
    assert_close("grad x", &g_x, &reference[0], 1e-5);
    for (((name, _), g), g_ref) in layer.tensors().iter().zip(&g_w).zip(&reference[1..]) {
        assert_close(&format!("grad {name}"), g, g_ref, 1e-5);
    }
}

/// A chunk [c, 2c) rotated with its global positions equals that slice of the whole sequence.
#[test]
fn rope_at_global_positions_matches_full_sequence() {
    let spec = ulysses::model::spec::ModelSpec::preset(ulysses::model::spec::Preset::Llama31_8b);
    for (c, offset) in [(48, 0), (4096, 1 << 20)] {
        let x = Tensor::randn([2, 2 * c, 3, spec.head_dim], F32);
        let full = apply_rope(&x, &Rope::new(&spec, &positions(2, offset, 2 * c), Kind::Float));
        let chunk_rope = Rope::new(&spec, &positions(2, offset + c, c), Kind::Float);
        let chunk = apply_rope(&x.narrow(1, c, c), &chunk_rope);
        assert!(chunk.equal(&full.narrow(1, c, c)), "chunk of {c} at {} differs from the full sequence", offset + c);
        // Rotation keeps every (i, i + d/2) pair's length, so it keeps the norm of each head.
        assert_close(
            "norm",
            &chunk.square().sum_dim_intlist(-1, false, Kind::Float),
            &x.narrow(1, c, c).square().sum_dim_intlist(-1, false, Kind::Float),
            1e-5,
        );
        // And local positions would be wrong: the rotation really depends on the position.
        let local = apply_rope(&x.narrow(1, c, c), &Rope::new(&spec, &positions(2, 0, c), Kind::Float));
        assert!(!local.allclose(&chunk, 1e-3, 1e-3, false));
    }
}

/// The step's RoPE (`rotate`, out-variants into one tensor) is `apply_rope` bit for bit, and its
/// inverse is `apply_rope`'s autograd backward bit for bit, in fp32 and in bf16. Llama 3.1's scaled frequencies, positions far from 0,
/// non-contiguous gradients (as attention's backward may return them).
#[test]
fn step_rope_equals_apply_rope_and_its_backward() {
    let spec = ulysses::model::spec::ModelSpec::preset(ulysses::model::spec::Preset::Llama31_8b);
    let (b, s, heads, d) = (2, 37, 3, spec.head_dim);
    let rope = Rope::new(&spec, &positions(b, 70_000, s), Kind::Float);
    let x = Tensor::randn([b, s, heads, d], F32).set_requires_grad(true);
    let y = apply_rope(&x, &rope);
    let turned = tch::no_grad(|| rotate(&x, &rope, Turn::Forward));
    assert!(turned.equal(&y), "rotate != apply_rope: max diff {:e}", (&turned - &y).abs().max().double_value(&[]));
    // [b, heads, s, d] transposed to [b, s, heads, d]: strided like a kernel's gradient
    let g = Tensor::randn([b, heads, s, d], F32).transpose(1, 2);
    let reference = Tensor::run_backward(&[(&y * &g).sum(Kind::Float)], &[&x], false, false);
    let back = tch::no_grad(|| rotate(&g, &rope, Turn::Inverse));
    assert!(back.equal(&reference[0]), "inverse rotate != the backward of apply_rope");
    assert!(!back.allclose(&g, 1e-3, 1e-3, false), "the inverse really turns");
    // bf16, each product and the sum rounded to bf16 as in apply_rope.
    let rope16 = Rope::new(&spec, &positions(b, 70_000, s), Kind::BFloat16);
    let (x16, g16) = (x.detach().to_kind(Kind::BFloat16).set_requires_grad(true), g.to_kind(Kind::BFloat16));
    let y16 = apply_rope(&x16, &rope16);
    assert!(tch::no_grad(|| rotate(&x16, &rope16, Turn::Forward)).equal(&y16), "bf16 rotate != apply_rope");
    let reference16 = Tensor::run_backward(&[(&y16 * &g16).sum(Kind::Float)], &[&x16], false, false);
    assert!(tch::no_grad(|| rotate(&g16, &rope16, Turn::Inverse)).equal(&reference16[0]), "bf16 inverse rotate");
    assert_close("bf16 against fp32", &y16.to_kind(Kind::Float), &y.detach(), 2e-2);
}

/// Causal softmax attention written out, with KV heads repeated for GQA.
fn naive_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
    let (s, n_q, d) = (q.size()[1], q.size()[2], q.size()[3]);
    let rep = n_q / k.size()[2];
    // [b, s, heads, d] -> [b, heads, s, d], KV heads repeated to n_q
    let q = q.transpose(1, 2);
    let k = k.repeat_interleave_self_int(rep, 2, None).transpose(1, 2);
    let v = v.repeat_interleave_self_int(rep, 2, None).transpose(1, 2);
    let scores = q.matmul(&k.transpose(2, 3)) / (d as f64).sqrt();
    let future = Tensor::ones([s, s], (Kind::Bool, Device::Cpu)).triu(1);
    let p = scores.masked_fill(&future, f64::NEG_INFINITY).softmax(-1, Kind::Float);
    // [b, heads, s, d] -> [b, s, heads, d]
    p.matmul(&v).transpose(1, 2)
}

#[test]
fn local_attention_is_causal_gqa_attention() {
    for (n_q, n_kv) in [(4, 2), (8, 1), (4, 4)] {
        let q = Tensor::randn([2, 17, n_q, 16], F32);
        let k = Tensor::randn([2, 17, n_kv, 16], F32);
        let v = Tensor::randn([2, 17, n_kv, 16], F32);
        let out = LocalAttention.attend(&q, &k, &v);
        assert_close(&format!("{n_q}/{n_kv} heads"), &out, &naive_attention(&q, &k, &v), 1e-5);
    }
}

/// forward_logits is the composition of the public pieces (what the parallel step reproduces).
#[test]
fn forward_logits_composes_the_segments() {
    let spec = tiny(false);
    let w = scaled_weights(&spec, 5);
    let ids = Tensor::randint(spec.vocab_size, [1, 29], (Kind::Int64, Device::Cpu));
    let pos = positions(1, 0, 29);
    let logits = forward_logits(&spec, &w, &ids, &pos, &LocalAttention);
    assert_eq!(logits.size(), [1, 29, spec.vocab_size]);
    assert_eq!(logits.kind(), Kind::Float);
    let rope = Rope::new(&spec, &pos, Kind::Float);
    let x = w.layers.iter().fold(embed(&w, &ids), |x, l| layer_forward(&spec, l, &x, &rope, &LocalAttention, 8));
    let manual = ulysses::model::llama::logits(&spec, &w, &x);
    assert_close("logits", &manual, &logits, 1e-5);
}

/// bf16 weights (the GPU training dtype) run the same code path: activations stay bf16, the norms
/// and the loss compute in fp32, and the logits track the fp32 model.
#[test]
fn bf16_forward_tracks_fp32() {
    let spec = tiny(false);
    let w32 = scaled_weights(&spec, 8);
    let named = w32.named_tensors().into_iter().map(|(n, t)| (n, t.to_kind(Kind::BFloat16)));
    let w16 = ModelWeights::from_named(&spec, named.collect()).unwrap();
    let ids = Tensor::randint(spec.vocab_size, [1, 33], (Kind::Int64, Device::Cpu));
    let pos = positions(1, 0, 33);
    let rope = Rope::new(&spec, &pos, Kind::BFloat16);
    let x = embed(&w16, &ids);
    let x = layer_forward(&spec, &w16.layers[0], &x, &rope, &LocalAttention, 8);
    assert_eq!(x.kind(), Kind::BFloat16);
    let (loss, n) = head_loss(&spec, &w16, &x, &ids, 8);
    assert_eq!((loss.kind(), n), (Kind::Float, 33));
    let l16 = forward_logits(&spec, &w16, &ids, &pos, &LocalAttention);
    let l32 = forward_logits(&spec, &w32, &ids, &pos, &LocalAttention);
    assert_eq!(l16.kind(), Kind::Float);
    assert_close("bf16 vs fp32 logits", &l16, &l32, 0.05);
}
