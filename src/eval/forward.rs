//! The forward pass of evaluation. Every rank holds the whole model (`load_weights`) and a contiguous
//! chunk of the sequence: SP rank r of a group of sp holds tokens `[r·L/sp, (r+1)·L/sp)` at their
//! global positions, and attention crosses chunks through the Ulysses all-to-alls, so the hidden
//! state of a token is the same as in a single-device forward over the whole sequence. Logits are
//! computed only at the positions a rank scores; the caller sums the scores over the SP group.
use super::EvalError;
use crate::comm::Collective;
use crate::data::IGNORE_INDEX;
use crate::model::llama::{self, ModelWeights};
use crate::model::rope::Rope;
use crate::model::spec::ModelSpec;
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
        let ids: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
        // [c] -> [1, c]
        let ids = Tensor::from_slice(&ids).view([1, c]).to_device(self.device);
        let start = start as i64;
        let positions = Tensor::arange_start(start, start + c, (Kind::Int64, self.device)).view([1, c]);
        let rope = Rope::new(self.spec, &positions, self.weights.embed.kind());
        let core = UlyssesAttention { group: self.sp };
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

    /// Next-token cross-entropy (nats) at each position of this rank's chunk. `span` holds the
    /// chunk's tokens followed by the next token when there is one (the label of the chunk's last
    /// position); the sequence's last position has no label and gets NaN. Collective over the
    /// SP group.
    pub fn position_losses(&self, span: &[i32], start: usize, seq_len: usize) -> Result<Vec<f32>, EvalError> {
        let (chunk_start, end) = self.chunk(seq_len)?;
        let c = end - chunk_start;
        let expected = c + usize::from(end < seq_len);
        if start != chunk_start || span.len() != expected {
            return Err(EvalError::Usage(format!(
                "position_losses: got {} tokens from {start}, this rank needs {expected} from {chunk_start}",
                span.len()
            )));
        }
        let h = self.hidden(&span[..c], start);
        let mut labels: Vec<i64> = span[1..].iter().map(|&t| t as i64).collect();
        labels.resize(c, IGNORE_INDEX);
        // [c] -> [1, c]
        let labels = Tensor::from_slice(&labels).view([1, c as i64]).to_device(self.device);
        let losses = tch::no_grad(|| llama::token_losses(self.spec, self.weights, &h, &labels, self.loss_tile));
        // [1, c] -> [c]
        let mut out = Vec::<f32>::try_from(losses.view([c as i64]).to_device(Device::Cpu))?;
        if end == seq_len {
            out[c - 1] = f32::NAN;
        }
        Ok(out)
    }
}
