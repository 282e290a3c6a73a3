//! The LM head and cross-entropy of one loss tile, forward and backward by hand, outside autograd.
//!
//! Why by hand: the [tile, V] part is pure memory traffic. Under autograd a tile costs a bf16 ->
//! fp32 copy of the logits, an fp32 log-softmax, nll backward's zero-filled fp32 [tile, V], the
//! log-softmax backward and the cast of its gradient back to bf16 (~36 bytes per logit), and the
//! LM head's gradient comes as a new [V, h] tensor per tile that autograd adds to the last. Here a
//! tile turns the bf16 logits into each row's loss and the logits' gradient `softmax - onehot` in
//! bf16 (`LogitsLoss`: op by op ~20 bytes per logit, as a GPU kernel 6 bytes, written over the
//! logits), and the LM head's gradient is accumulated by the GEMM into one buffer. The final
//! RMSNorm stays under autograd: the caller backpropagates `grad_xn` through it.
use super::llama::IGNORE_INDEX;
use tch::{Kind, Tensor};

/// One tile's forward results and the gradient of its input.
pub struct TileLoss {
    /// Cross-entropy of each token, [b, tile] fp32 (0 where the label is `IGNORE_INDEX`).
    pub token_loss: Tensor,
    /// Gradient of `scale` × the tile's summed loss with respect to `xn`, [b, tile, h].
    pub grad_xn: Tensor,
}

/// The [n, V] part of a tile, the seam where a GPU kernel may take over (`ffi::cross_entropy`):
/// from the logits (compute dtype, consumed: an implementation may overwrite them) and each row's
/// target column in [0, V), each row's cross-entropy `lse - logit[target]` (fp32, [n]) and the
/// logits' gradient `softmax - onehot(target)` in the logits' dtype, [n, V].
pub trait LogitsLoss {
    fn loss_and_grad(&self, logits: Tensor, target: &Tensor) -> (Tensor, Tensor);
}

/// `LogitsLoss` in libtorch operations, on any device: the bf16 logits copied to fp32, their
/// fp32 log-softmax, its exp written in the compute dtype as the gradient (cast on write), and the
/// target column corrected to p_t - 1 (from fp32) on a [n] vector. Each buffer is dropped as soon
/// as the next exists (the copy is a no-op in fp32).
pub struct OpByOp;

impl LogitsLoss for OpByOp {
    fn loss_and_grad(&self, logits: Tensor, target: &Tensor) -> (Tensor, Tensor) {
        let kind = logits.kind();
        let logits = logits.to_kind(Kind::Float);
        let logp = logits.log_softmax(-1, None);
        drop(logits);
        // [n] -> [n, 1]
        let target = target.unsqueeze(1);
        // [n, V] -> [n, 1] fp32
        let logp_target = logp.gather(1, &target, false);
        let mut grad_logits = logp.exp_out(&Tensor::empty(logp.size(), (kind, logp.device())));
        drop(logp);
        let target_grad = (logp_target.exp() - 1.0).to_kind(grad_logits.kind());
        let _ = grad_logits.scatter_(1, &target, &target_grad);
        (logp_target.neg().squeeze_dim(1), grad_logits)
    }
}

/// Forward and backward of `scale · Σ cross_entropy(xn · lm_headᵀ, labels)` over one tile:
/// xn [b, tile, h] (the final norm's output, compute dtype), lm_head [V, h], labels [b, tile]
/// (valid ones in [0, V)), the [n, V] part by `logits_loss`. When `grad_lm_head` ([V, h],
/// lm_head's dtype) is given, the LM head's gradient is added into it. Op by op, two [tile, V]
/// tensors exist at a time, 8 bytes per logit at most with bf16 (the memory plan's two fp32
/// tiles): the logits and their fp32 copy, then the copy and the log-probabilities, then these
/// and the gradient (in the compute dtype).
pub fn tile_loss(
    xn: &Tensor,
    lm_head: &Tensor,
    labels: &Tensor,
    scale: f64,
    grad_lm_head: Option<&mut Tensor>,
    logits_loss: &dyn LogitsLoss,
) -> TileLoss {
    tch::no_grad(|| {
        let (b, t, h) = xn.size3().expect("xn is [b, tile, h]");
        // [b, tile, h] -> [n, h]; [b, tile] -> [n]
        let xn = xn.reshape([b * t, h]);
        let labels = labels.reshape([b * t]);
        let ignored = labels.eq(IGNORE_INDEX);
        // An ignored row points at column 0; its loss and gradients are zeroed.
        let target = labels.masked_fill(&ignored, 0);

        // [n, h] x [h, V] -> [n, V] in the compute dtype
        let (row_loss, grad_logits) = logits_loss.loss_and_grad(xn.mm(&lm_head.tr()), &target);
        let token_loss = row_loss.masked_fill(&ignored, 0.0);

        // Ignored rows are zeroed on the [n, h] side (the gradient of row r only reaches row r of
        // dX and, through xn's row r, dW), and the loss scale is folded in there too, so the
        // [n, V] buffer is never touched again. [n] -> [n, 1] fp32
        let row_scale = ignored.logical_not().to_kind(Kind::Float).unsqueeze(1) * scale;
        if let Some(grad_w) = grad_lm_head {
            // [V, n] x [n, h] accumulated into [V, h]
            let xn_scaled = (&xn * &row_scale).to_kind(xn.kind());
            let _ = grad_w.addmm_(&grad_logits.tr(), &xn_scaled);
        }
        // [1, n, V] x [1, V, h] -> [1, n, h], scaled inside the GEMM (one rounding), ignored rows
        // zeroed after.
        let zero = Tensor::zeros([1], (xn.kind(), xn.device()));
        let grad_xn = zero
            .baddbmm(&grad_logits.unsqueeze(0), &lm_head.unsqueeze(0), 0.0, scale)
            .squeeze_dim(0)
            .masked_fill(&ignored.unsqueeze(1), 0.0);
        // [n] -> [b, tile]; [n, h] -> [b, tile, h]
        TileLoss { token_loss: token_loss.view([b, t]), grad_xn: grad_xn.view([b, t, h]) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::llama::{head_token_losses, rms_norm, seq_tiles};
    use crate::model::spec::{ModelSpec, Preset};
    use tch::Device;

    fn leaf(t: &Tensor) -> Tensor {
        t.detach().set_requires_grad(true)
    }

    /// One head input: x0 [b, s, h], the LM head w [V, h], the final norm's weight, labels
    /// [b, s]; with `ids` [b, s] the embeddings are tied: the head's input is x0 plus the
    /// embedding of `ids` by w itself, and w's gradient includes the embedding's part.
    struct Case<'a> {
        spec: &'a ModelSpec,
        x0: &'a Tensor,
        w: &'a Tensor,
        norm: &'a Tensor,
        labels: &'a Tensor,
        ids: Option<&'a Tensor>,
    }

    impl Case<'_> {
        /// The head's input from `x` and the (leaf) LM head `w`.
        fn input(&self, w: &Tensor, x: &Tensor) -> Tensor {
            match self.ids {
                Some(ids) => Tensor::embedding(w, ids, -1, false, false) + x,
                None => x.shallow_clone(),
            }
        }

        /// (loss sum, dx, d norm, d w) of `Σ loss / n` by autograd through the reference
        /// `head_token_losses`.
        fn reference(&self) -> [Tensor; 4] {
            let (x, w, norm) = (leaf(self.x0), leaf(self.w), leaf(self.norm));
            let input = self.input(&w, &x);
            let n = self.labels.ne(IGNORE_INDEX).sum(Kind::Float);
            let loss = head_token_losses(self.spec, &norm, &w, &input, self.labels).sum(Kind::Float);
            (&loss / &n).backward();
            [loss.detach(), x.grad(), norm.grad(), w.grad()]
        }

        /// The same by `tile_loss` over tiles of 3 tokens, as the training step does it.
        fn by_tiles(&self) -> [Tensor; 4] {
            let (norm, w_embed) = (leaf(self.norm), leaf(self.w));
            let input = self.input(&w_embed, self.x0);
            let scale = 1.0 / self.labels.ne(IGNORE_INDEX).sum(Kind::Float).double_value(&[]);
            let mut grad_w = self.w.zeros_like();
            let grad_input = input.zeros_like();
            let mut loss = Tensor::zeros([], (Kind::Float, Device::Cpu));
            for (start, len) in seq_tiles(input.size()[1], 3) {
                let x_tile = leaf(&input.narrow(1, start, len).detach());
                let xn = rms_norm(&x_tile, &norm, self.spec.rms_norm_eps);
                let labels = self.labels.narrow(1, start, len);
                let tile = tile_loss(&xn.detach(), self.w, &labels, scale, Some(&mut grad_w), &OpByOp);
                (&xn * &tile.grad_xn).sum(Kind::Float).backward();
                grad_input.narrow(1, start, len).copy_(&x_tile.grad());
                loss += tile.token_loss.sum(Kind::Float);
            }
            if self.ids.is_some() {
                (&input * &grad_input).sum(Kind::Float).backward();
                grad_w += w_embed.grad();
            }
            [loss, grad_input, norm.grad(), grad_w]
        }
    }

    /// fp32 on CPU: loss, dx, d norm and d lm_head equal autograd's to 1e-5 relative to each
    /// tensor's largest magnitude (only the summation order differs), untied and tied, with
    /// ignored labels and a last tile shorter than the others.
    #[test]
    fn tile_loss_matches_autograd() {
        tch::manual_seed(7);
        let mut spec = ModelSpec::preset(Preset::Tiny);
        spec.vocab_size = 37;
        let h = spec.hidden_size;
        let x = Tensor::randn([2, 8, h], (Kind::Float, Device::Cpu));
        let w = Tensor::randn([37, h], (Kind::Float, Device::Cpu)) * 0.5;
        let norm = Tensor::rand([h], (Kind::Float, Device::Cpu)) + 0.5;
        let labels = Tensor::randint(37, [2, 8], (Kind::Int64, Device::Cpu));
        for (r, c) in [(0, 0), (0, 5), (1, 3), (1, 4), (1, 7)] {
            let _ = labels.get(r).get(c).fill_(IGNORE_INDEX);
        }
        let ids = Tensor::randint(37, [2, 8], (Kind::Int64, Device::Cpu));
        for tied in [None, Some(&ids)] {
            let case = Case { spec: &spec, x0: &x, w: &w, norm: &norm, labels: &labels, ids: tied };
            let (want, got) = (case.reference(), case.by_tiles());
            for (name, (a, b)) in ["loss", "dx", "d norm", "d lm_head"].iter().zip(want.iter().zip(got.iter())) {
                let err = (a - b).abs().max().double_value(&[]);
                let size = a.abs().max().double_value(&[]);
                assert!(size > 0.0, "{name}: the reference is all zeros");
                assert!(err <= 1e-5 * size, "{name} (tied: {}): max error {err} vs magnitude {size}", tied.is_some());
            }
            // Ignored positions get no gradient.
            assert_eq!(got[1].get(1).get(3).abs().max().double_value(&[]), 0.0);
        }
    }
}
