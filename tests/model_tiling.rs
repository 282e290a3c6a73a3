//! MLP and loss tiling change memory, never results: tiled == untiled in values and in gradients
//! with respect to the input and every weight, with an uneven last tile.
mod model_support;

use model_support::{assert_close, layer_leaves, leaves, scaled_weights, tiny};
use std::convert::Infallible;
use tch::{Device, Kind, Tensor};
use ulysses::model::llama::{
    head_loss, mlp_residual, post_attention, post_attention_no_grad, swiglu_in_place, token_losses, LayerWeights,
    ModelWeights, IGNORE_INDEX,
};
use ulysses::model::spec::ModelSpec;

const B: i64 = 2;
const S: i64 = 37; // tiles of 10 leave a last tile of 7

/// `post_attention_no_grad` with the op-by-op SwiGLU.
fn forward_no_grad(
    spec: &ModelSpec,
    w: &LayerWeights,
    x: &Tensor,
    attn: &Tensor,
    tile: usize,
    keep_mlp: bool,
) -> (Tensor, Option<(Tensor, Tensor)>) {
    let swiglu = |gate, up: &Tensor| Ok::<_, Infallible>(swiglu_in_place(gate, up));
    post_attention_no_grad(spec, w, x, attn, tile, keep_mlp, swiglu).unwrap_or_else(|e| match e {})
}

fn grads(out: &Tensor, inputs: &[&Tensor]) -> Vec<Tensor> {
    Tensor::run_backward(&[out], inputs, false, false)
}

#[test]
fn tiled_mlp_equals_untiled() {
    let spec = tiny(false);
    let w = scaled_weights(&spec, 1);
    tch::manual_seed(2);
    let layer = layer_leaves(&spec, &w, 0);
    let x = Tensor::randn([B, S, spec.hidden_size], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let attn = Tensor::randn([B, S, spec.num_attention_heads, spec.head_dim], (Kind::Float, Device::Cpu))
        .set_requires_grad(true);
    let grad_out = Tensor::randn([B, S, spec.hidden_size], (Kind::Float, Device::Cpu));
    // The weights post_attention uses (q, k, v and the attention norm belong to pre_attention).
    let post: Vec<(&str, &Tensor)> = layer.tensors().into_iter().skip(4).collect();
    assert_eq!(post[0].0, "self_attn.o_proj.weight");
    let mut inputs = vec![&x, &attn];
    inputs.extend(post.iter().map(|(_, t)| *t));

    let full = post_attention(&spec, &layer, &x, &attn, 0);
    let full_grads = grads(&(&full * &grad_out).sum(Kind::Float), &inputs);
    for tile in [10, 1, 36, 37, 100] {
        let (in_place, none) = forward_no_grad(&spec, &layer, &x, &attn, tile, false);
        assert_close(&format!("mlp_tile {tile}: in-place output"), &in_place, &full, 1e-6);
        assert!(none.is_none());
        // Keeping the MLP's gate and up projections changes nothing in the output.
        let (kept_out, kept) = forward_no_grad(&spec, &layer, &x, &attn, tile, true);
        assert!(kept_out.equal(&in_place), "mlp_tile {tile}: keeping the MLP changed the output");
        let (gate, up) = kept.unwrap();
        let h = ulysses::model::llama::attention_residual(&spec, &layer, &x, &attn);
        let (gate_ref, up_ref) = ulysses::model::llama::mlp_projections(&spec, &layer, &h);
        assert_close(&format!("mlp_tile {tile}: kept gate"), &gate, &gate_ref, 1e-6);
        assert_close(&format!("mlp_tile {tile}: kept up"), &up, &up_ref, 1e-6);
        let tiled = post_attention(&spec, &layer, &x, &attn, tile);
        assert_close(&format!("mlp_tile {tile}: output"), &tiled, &full, 1e-6);
        let tiled_grads = grads(&(&tiled * &grad_out).sum(Kind::Float), &inputs);
        let names = ["x", "attn"].into_iter().chain(post.iter().map(|(n, _)| *n));
        for ((name, g), g_ref) in names.zip(&tiled_grads).zip(&full_grads) {
            assert!(g_ref.abs().max().double_value(&[]) > 0.0, "{name}: zero reference gradient");
            assert_close(&format!("mlp_tile {tile}: grad {name}"), g, g_ref, 1e-5);
        }
    }
}

/// Labels with ignored positions, including a whole ignored tile (tokens 10..20).
fn labels(spec_vocab: i64) -> Tensor {
    tch::manual_seed(3);
    let labels = Tensor::randint(spec_vocab, [B, S], (Kind::Int64, Device::Cpu));
    let _ = labels.narrow(1, 10, 10).fill_(IGNORE_INDEX);
    let _ = labels.narrow(1, S - 1, 1).fill_(IGNORE_INDEX);
    labels
}

fn check_loss_tiling(tied: bool) {
    let spec = tiny(tied);
    let named = leaves(&scaled_weights(&spec, 4));
    let w =
        ModelWeights::from_named(&spec, named.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()).unwrap();
    tch::manual_seed(5);
    let x = Tensor::randn([B, S, spec.hidden_size], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let labels = labels(spec.vocab_size);
    // Only the head's weights take part: final norm and LM head (the embedding when tied).
    let head: Vec<&(String, Tensor)> = named
        .iter()
        .filter(|(n, _)| n == "model.norm.weight" || n == "lm_head.weight" || (tied && n.contains("embed")))
        .collect();
    assert_eq!(head.len(), 2);
    let mut inputs = vec![&x];
    inputs.extend(head.iter().map(|(_, t)| t));

    let (full, n_full) = head_loss(&spec, &w, &x, &labels, 0);
    assert_eq!(n_full, B * (S - 11));
    let full_grads = grads(&full, &inputs);
    for tile in [10, 7, 1, 37, 64] {
        let (tiled, n) = head_loss(&spec, &w, &x, &labels, tile);
        assert_eq!(n, n_full);
        assert_close(&format!("loss_tile {tile}: loss"), &tiled, &full, 1e-6);
        for ((name, g), g_ref) in ["x", &head[0].0, &head[1].0].iter().zip(grads(&tiled, &inputs)).zip(&full_grads) {
            assert!(g_ref.abs().max().double_value(&[]) > 0.0, "{name}: zero reference gradient");
            assert_close(&format!("loss_tile {tile} (tied {tied}): grad {name}"), &g, g_ref, 1e-5);
        }
    }
    // Token losses: zero exactly where the label is ignored, positive elsewhere.
    let tl = tch::no_grad(|| token_losses(&spec, &w, &x, &labels, 10));
    let ignored = labels.eq(IGNORE_INDEX);
    assert_eq!(tl.masked_select(&ignored).abs().max().double_value(&[]), 0.0);
    assert!(tl.masked_select(&ignored.logical_not()).min().double_value(&[]) > 0.0);
}

#[test]
fn tiled_loss_equals_untiled() {
    check_loss_tiling(false);
}

#[test]
fn tiled_loss_equals_untiled_tied() {
    check_loss_tiling(true);
}

/// A rank whose labels are all ignored contributes 0 and zero gradients, never NaN.
#[test]
fn all_ignored_labels_give_zero_not_nan() {
    let spec = tiny(false);
    let w = scaled_weights(&spec, 6);
    let x = Tensor::randn([B, S, spec.hidden_size], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let labels = Tensor::full([B, S], IGNORE_INDEX, (Kind::Int64, Device::Cpu));
    for tile in [0, 10] {
        let (loss, n) = head_loss(&spec, &w, &x, &labels, tile);
        assert_eq!(n, 0);
        assert_eq!(loss.double_value(&[]), 0.0, "loss_tile {tile}");
        let g = grads(&loss, &[&x]).remove(0);
        assert_eq!(g.abs().max().double_value(&[]), 0.0, "loss_tile {tile}: gradient must be 0");
    }
}

/// The memory-bounded backward the step can use: backpropagate `mlp_residual` and `head_loss`
/// one tile at a time (each tile its own graph), summing weight gradients over tiles.
#[test]
fn tile_by_tile_backward_equals_full_autograd() {
    let spec = tiny(false);
    let w = scaled_weights(&spec, 7);
    let layer = layer_leaves(&spec, &w, 0);
    let h = Tensor::randn([B, S, spec.hidden_size], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let grad_out = Tensor::randn([B, S, spec.hidden_size], (Kind::Float, Device::Cpu));
    let mlp: Vec<&Tensor> = [&layer.mlp_norm, &layer.w_gate, &layer.w_up, &layer.w_down].to_vec();
    let mut inputs = vec![&h];
    inputs.extend(&mlp);
    let full = mlp_residual(&spec, &layer, &h);
    let reference = grads(&(&full * &grad_out).sum(Kind::Float), &inputs);
    let mut weight_grads: Vec<Tensor> = mlp.iter().map(|t| t.zeros_like()).collect();
    let mut h_grad = Vec::new();
    for start in (0..S).step_by(10) {
        let len = 10.min(S - start);
        let tile = h.narrow(1, start, len).detach().set_requires_grad(true);
        let out = mlp_residual(&spec, &layer, &tile);
        let mut tile_inputs = vec![&tile];
        tile_inputs.extend(&mlp);
        let g = grads(&(&out * grad_out.narrow(1, start, len)).sum(Kind::Float), &tile_inputs);
        h_grad.push(g[0].shallow_clone());
        for (acc, g) in weight_grads.iter_mut().zip(&g[1..]) {
            *acc += g;
        }
    }
    assert_close("mlp: grad h", &Tensor::cat(&h_grad, 1), &reference[0], 1e-5);
    for (i, (g, g_ref)) in weight_grads.iter().zip(&reference[1..]).enumerate() {
        assert_close(&format!("mlp: grad weight {i}"), g, g_ref, 1e-5);
    }

    let named = leaves(&w);
    let w =
        ModelWeights::from_named(&spec, named.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()).unwrap();
    let labels = labels(spec.vocab_size);
    let head = [&w.norm, w.lm_head()];
    let (loss, n) = head_loss(&spec, &w, &h, &labels, 0);
    let mut inputs = vec![&h];
    inputs.extend(head);
    let reference = grads(&loss, &inputs);
    let (mut total, mut count) = (0.0, 0);
    let mut weight_grads: Vec<Tensor> = head.iter().map(|t| t.zeros_like()).collect();
    let mut x_grad = Vec::new();
    for start in (0..S).step_by(10) {
        let len = 10.min(S - start);
        let tile = h.narrow(1, start, len).detach().set_requires_grad(true);
        let (tile_loss, tile_n) = head_loss(&spec, &w, &tile, &labels.narrow(1, start, len), 0);
        let mut tile_inputs = vec![&tile];
        tile_inputs.extend(head);
        let g = grads(&tile_loss, &tile_inputs);
        (total, count) = (total + tile_loss.double_value(&[]), count + tile_n);
        x_grad.push(g[0].shallow_clone());
        for (acc, g) in weight_grads.iter_mut().zip(&g[1..]) {
            *acc += g;
        }
    }
    assert_eq!(count, n);
    assert!((total - loss.double_value(&[])).abs() < 1e-4 * loss.double_value(&[]).abs());
    assert_close("head: grad x", &Tensor::cat(&x_grad, 1), &reference[0], 1e-5);
    for (i, (g, g_ref)) in weight_grads.iter().zip(&reference[1..]).enumerate() {
        assert_close(&format!("head: grad weight {i}"), g, g_ref, 1e-5);
    }
}
