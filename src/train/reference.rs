//! The single-rank training reference, the role llm.c's CPU file plays: the whole model as one
//! autograd graph on unsharded fp32 weights, then cross-entropy, backward, gradient clipping and
//! AdamW written out operation by operation. Nothing here is sharded, tiled, recomputed, kept,
//! offloaded or fused (packed documents: SDPA with a dense mask), so it is slow and easy to check
//! by reading; the layer-wise sharded step
//! (`step`, `parallel::zero`, `optim`) must give the same losses and parameters, and the tests
//! compare the two (tests/step_reference.rs, tests/train_equivalence.rs).
use super::step::MicroBatch;
use crate::config::LoraConfig;
use crate::data::IGNORE_INDEX;
use crate::model::dropout::Draw;
use crate::model::llama::{forward_logits, AttentionCore, LocalAttention, ModelWeights};
use crate::model::lora;
use crate::model::mask::{dense_mask, MaskedAttention};
use crate::model::spec::ModelSpec;
use crate::optim::AdamW;
use tch::{Kind, Reduction, Tensor};

/// Unsharded fp32 parameters and their Adam moments, by Hugging Face name.
pub struct Reference {
    spec: ModelSpec,
    params: Vec<(String, Tensor)>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    /// Optimizer steps done (Adam's bias correction depends on it).
    steps: i64,
    /// With LoRA: the section and the frozen base weights (fp32, no gradient); `params` are then
    /// the adapters and the modules trained in full.
    lora: Option<(LoraConfig, Vec<(String, Tensor)>)>,
    /// The run's seed, which LoRA's dropout masks are drawn from.
    seed: u64,
}

impl Reference {
    /// Starts from `named`: every parameter of `spec`'s model (fp32), as `ModelWeights` names them.
    pub fn new(spec: &ModelSpec, named: Vec<(String, Tensor)>) -> Reference {
        let params: Vec<(String, Tensor)> = named
            .into_iter()
            .map(|(n, t)| (n, t.to_kind(Kind::Float).detach().copy().set_requires_grad(true)))
            .collect();
        let zeros = |p: &[(String, Tensor)]| p.iter().map(|(_, t)| t.zeros_like()).collect();
        Reference {
            spec: spec.clone(),
            exp_avg: zeros(&params),
            exp_avg_sq: zeros(&params),
            params,
            steps: 0,
            lora: None,
            seed: 0,
        }
    }

    /// LoRA on a frozen base: `base` is every weight of `spec`'s model, `trainable` the adapters
    /// and modules trained in full (`adapter::trainable_shapes`), which alone get gradients and
    /// optimizer steps. With `lora.dropout` > 0 the adapters' inputs drop with the masks of a run
    /// seeded `seed` (each micro batch's step, samples and positions: `model::dropout`).
    pub fn with_lora(
        spec: &ModelSpec,
        lora: &LoraConfig,
        seed: u64,
        base: Vec<(String, Tensor)>,
        trainable: Vec<(String, Tensor)>,
    ) -> Reference {
        let frozen = base.into_iter().map(|(n, t)| (n, t.to_kind(Kind::Float).detach())).collect();
        Reference { lora: Some((lora.clone(), frozen)), seed, ..Reference::new(spec, trainable) }
    }

    /// The model the parameters make: all of it, or the frozen base with the adapters attached.
    pub fn weights(&self) -> ModelWeights {
        let clone = |p: &[(String, Tensor)]| p.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
        match &self.lora {
            None => ModelWeights::from_named(&self.spec, clone(&self.params)),
            Some((lora, base)) => ModelWeights::from_named(&self.spec, clone(base)).map(|mut w| {
                lora::attach(&mut w, &self.spec, lora, &self.params);
                w
            }),
        }
        .expect("the reference holds every parameter of its spec")
    }

    pub fn named(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// The optimizer step's loss, the sum of every token's cross-entropy over `batches` divided by
    /// their valid labels (the token-weighted mean), and its gradient for each parameter.
    pub fn loss_and_grads(&self, batches: &[MicroBatch]) -> (f64, Vec<Tensor>) {
        let mut w = self.weights();
        let valid: i64 = batches.iter().map(MicroBatch::valid_labels).sum();
        let mut loss = Tensor::zeros([], (Kind::Float, self.params[0].1.device()));
        for b in batches {
            // Packed samples attend within their documents: SDPA with the dense block-diagonal
            // causal mask (the micro batch holds whole samples here).
            let mask = b
                .documents
                .iter()
                .any(|d| d.count() > 1)
                .then(|| dense_mask(&b.documents, Kind::Float, b.input_ids.device()));
            let core: &dyn AttentionCore = match &mask {
                Some(mask) => &MaskedAttention { mask },
                None => &LocalAttention,
            };
            // LoRA's dropout: every adapter's input masked as the micro batch draws it.
            if let Some((lora, _)) = self.lora.as_ref().filter(|(l, _)| l.dropout > 0.0) {
                let draw = Draw::new(lora.dropout, self.seed, b.step, &b.samples, b.token_positions());
                for (l, layer) in w.layers.iter_mut().enumerate() {
                    layer.adapters.dropout = Some(draw.layer(l));
                }
            }
            let logits = forward_logits(&self.spec, &w, &b.input_ids, &b.position_ids, core);
            // [b, s, V] -> [b*s, V]; labels [b, s] -> [b*s]
            let flat = logits.view([-1, self.spec.vocab_size]);
            loss =
                loss + flat.cross_entropy_loss::<Tensor>(&b.labels.view([-1]), None, Reduction::Sum, IGNORE_INDEX, 0.0);
        }
        let loss = loss / valid.max(1) as f64;
        let grads =
            Tensor::run_backward(&[&loss], &self.params.iter().map(|(_, t)| t).collect::<Vec<_>>(), false, false);
        (loss.double_value(&[]), grads)
    }

    /// One optimizer step on `batches` at learning rate `lr`: the gradient, clipped to a global
    /// norm of `max_norm` (0: no clipping) as `torch.nn.utils.clip_grad_norm_` does, then
    /// torch.optim.AdamW's update with weight decay on the matrices only. Returns the loss and
    /// the gradient norm before clipping.
    pub fn step(&mut self, batches: &[MicroBatch], h: &AdamW, lr: f64, max_norm: f64) -> (f64, f64) {
        let (loss, grads) = self.loss_and_grads(batches);
        let norm = grads.iter().map(|g| g.square().sum(Kind::Double).double_value(&[])).sum::<f64>().sqrt();
        let scale = if max_norm > 0.0 && norm > max_norm { max_norm / (norm + 1e-6) } else { 1.0 };
        self.steps += 1;
        let t = self.steps as f64;
        let (bias1, bias2) = (1.0 - h.beta1.powf(t), 1.0 - h.beta2.powf(t));
        tch::no_grad(|| {
            for (i, g) in grads.iter().enumerate() {
                let g = g * scale;
                let p = &self.params[i].1;
                if h.weight_decay > 0.0 && p.dim() >= 2 {
                    p.shallow_clone().copy_(&(p * (1.0 - lr * h.weight_decay)));
                }
                self.exp_avg[i] = &self.exp_avg[i] * h.beta1 + &g * (1.0 - h.beta1);
                self.exp_avg_sq[i] = &self.exp_avg_sq[i] * h.beta2 + &g * &g * (1.0 - h.beta2);
                let denom = self.exp_avg_sq[i].sqrt() / bias2.sqrt() + h.eps;
                p.shallow_clone().copy_(&(p - &self.exp_avg[i] / denom * (lr / bias1)));
            }
        });
        (loss, norm)
    }
}
