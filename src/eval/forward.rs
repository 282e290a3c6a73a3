//! The forward pass of evaluation. Every rank holds the whole model (`load_weights`) and a contiguous
//! chunk of the sequence: SP rank r of a group of sp holds tokens `[r·L/sp, (r+1)·L/sp)` at their
//! global positions, and attention crosses chunks through the Ulysses all-to-alls, so the hidden
//! state of a token is the same as in a single-device forward over the whole sequence. Logits are
//! computed only at the positions a rank scores; the caller sums the scores over the SP group.
use super::EvalError;
use crate::comm::Collective;
use crate::config::DocumentKernels;
use crate::data::{Documents, IGNORE_INDEX};
use crate::model::llama::{self, ModelWeights};
use crate::model::rope::Rope;
use crate::model::spec::ModelSpec;
use crate::parallel::attention::document_mask;
use crate::parallel::ulysses::UlyssesAttention;
use tch::{Device, Kind, Tensor};

pub struct Evaluator<'a> {
    pub spec: &'a ModelSpec,
    pub weights: &'a ModelWeights,
    /// The SP group: the ranks that share one sequence.
    pub sp: &'a dyn Collective,
    pub device: Device,
    /// Tokens per MLP tile and per LM-head tile (0: untiled), as in training.
    pub mlp_tile: usize,
    pub loss_tile: usize,
    /// With `data.documents = "mask"`: the kernels that attend within documents (None: the
    /// sequence is one causal attention, whatever documents it holds).
    pub documents: Option<DocumentKernels>,
}

/// One rank's share of the score of one answer: sum these over the SP group.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AnswerScore {
    /// Sum of log p(answer token | prefix) over the answer tokens this rank predicts (nats).
    pub logprob: f64,
    /// Answer tokens this rank predicts whose greedy (argmax) prediction is the answer token.
    pub correct: i64,
}

impl Evaluator<'_> {
    /// Tokens `[start, end)` of a sequence of `seq_len` this rank holds. The eval pads nothing, so
    /// the length must split evenly.
    pub fn chunk(&self, seq_len: usize) -> Result<(usize, usize), EvalError> {
        let sp = self.sp.size();
        if seq_len == 0 || seq_len % sp != 0 {
            let lo = (seq_len / sp * sp).max(sp);
            return Err(EvalError::Usage(format!(
                "length {seq_len} is not a positive multiple of sp = {sp} (the eval pads nothing); use e.g. {lo} or {}",
                lo + sp
            )));
        }
        let chunk = crate::layout::sp_chunk(seq_len, sp, self.sp.rank());
        Ok((chunk.start, chunk.end))
    }

    /// Final hidden states `[1, c, h]` of the chunk `ids` that starts at global position `start`.
    /// Collective: every rank of the SP group calls it for its chunk of the same sequence.
    fn hidden(&self, ids: &[i32], start: usize) -> Tensor {
        let c = ids.len() as i64;
        let positions: Vec<i64> = (start as i64..start as i64 + c).collect();
        self.hidden_at(ids, &positions, None)
    }

    /// `hidden` at RoPE `positions` (one per token), attending within `docs` (the sequence's
    /// documents) when the evaluator masks documents.
    fn hidden_at(&self, ids: &[i32], positions: &[i64], docs: Option<&Documents>) -> Tensor {
        let c = ids.len() as i64;
        let ids: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
        // [c] -> [1, c]
        let ids = Tensor::from_slice(&ids).view([1, c]).to_device(self.device);
        let positions = Tensor::from_slice(positions).view([1, c]).to_device(self.device);
        let kind = self.weights.embed.kind();
        let rope = Rope::new(self.spec, &positions, kind);
        let mask = match (self.documents, docs) {
            (Some(kernels), Some(docs)) => document_mask(std::slice::from_ref(docs), kernels, kind, self.device),
            _ => None,
        };
        let core = UlyssesAttention { group: self.sp, mask: mask.as_ref() };
        tch::no_grad(|| {
            let x = llama::embed(self.weights, &ids);
            self.weights
                .layers
                .iter()
                .fold(x, |x, layer| llama::layer_forward(self.spec, layer, &x, &rope, &core, self.mlp_tile))
        })
    }

    /// Scores the answer `seq[answer_start..]` (it ends the sequence) teacher-forced: one forward
    /// over the whole sequence, where position t predicts token t + 1. Exact match of the greedy
    /// answer = every answer token argmax-correct: greedy decoding from the question would feed
    /// back exactly these tokens as long as each is correct, so the two agree on whether the
    /// whole answer comes out right. Collective over the SP group; returns this rank's share.
    pub fn answer_score(&self, seq: &[i32], answer_start: usize) -> Result<AnswerScore, EvalError> {
        if answer_start == 0 || answer_start >= seq.len() {
            return Err(EvalError::Usage(format!(
                "answer start {answer_start} must lie in 1..{} (inside the sequence, after a prompt)",
                seq.len()
            )));
        }
        let (start, end) = self.chunk(seq.len())?;
        let h = self.hidden(&seq[start..end], start);
        // The answer is predicted at [answer_start - 1, len - 1); score the part held here.
        let (lo, hi) = ((answer_start - 1).max(start), (seq.len() - 1).min(end));
        if lo >= hi {
            return Ok(AnswerScore::default());
        }
        let n = (hi - lo) as i64;
        let targets: Vec<i64> = seq[lo + 1..hi + 1].iter().map(|&t| t as i64).collect();
        let targets = Tensor::from_slice(&targets).to_device(self.device);
        tch::no_grad(|| {
            // [1, c, h] -> [1, n, h] -> [1, n, V] -> [n, V]
            let x = h.narrow(1, (lo - start) as i64, n);
            let logp =
                llama::logits(self.spec, self.weights, &x).view([n, self.spec.vocab_size]).log_softmax(-1, Kind::Float);
            // [n, V] gathered at [n, 1] -> [n, 1]
            let picked = logp.gather(1, &targets.unsqueeze(1), false);
            let correct = logp.argmax(-1, false).eq_tensor(&targets);
            Ok(AnswerScore {
                logprob: picked.sum(Kind::Double).double_value(&[]),
                correct: correct.sum(Kind::Int64).int64_value(&[]),
            })
        })
    }

    /// Next-token cross-entropy (nats) at each position of this rank's chunk `ids`, whose labels
    /// and RoPE positions are given (one each per token; `data::sample_targets` makes them), in a
    /// sequence of documents `docs`; NaN where the label is -100. Collective over the SP group.
    pub fn position_losses(
        &self,
        ids: &[i32],
        labels: &[i64],
        positions: &[i64],
        docs: &Documents,
    ) -> Result<Vec<f32>, EvalError> {
        let seq_len = docs.seq_len();
        let (start, end) = self.chunk(seq_len)?;
        let c = end - start;
        if ids.len() != c || labels.len() != c || positions.len() != c {
            return Err(EvalError::Usage(format!(
                "position_losses: got {} tokens, {} labels and {} positions; this rank holds {c}",
                ids.len(),
                labels.len(),
                positions.len()
            )));
        }
        let h = self.hidden_at(ids, positions, Some(docs));
        // [c] -> [1, c]
        let labels_t = Tensor::from_slice(labels).view([1, c as i64]).to_device(self.device);
        let losses = tch::no_grad(|| llama::token_losses(self.spec, self.weights, &h, &labels_t, self.loss_tile));
        // [1, c] -> [c]
        let mut out = Vec::<f32>::try_from(losses.view([c as i64]).to_device(Device::Cpu))?;
        for (loss, &label) in out.iter_mut().zip(labels) {
            if label == IGNORE_INDEX {
                *loss = f32::NAN;
            }
        }
        Ok(out)
    }
}
