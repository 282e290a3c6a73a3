//! The per-position loss curve over a held-out set of shards: mean next-token loss in bins of
//! positions. A model that uses far context has lower loss late in the sequence than early; a
//! curve that flattens (or rises) past some position shows where it stops using it. On packed
//! data the position can be the one within the token's document (`--by document`), and the
//! experiment's `data.documents` / `data.positions` say how the model saw documents in training
//! (attention within them, positions restarting): the eval sees them the same way.
//! Sequences are dealt to the DP groups round-robin; each SP rank reads and scores only its chunk
//! (plus the one token after it, its last label), and one sum over the world gathers the bins.
use super::forward::Evaluator;
use super::EvalError;
use crate::comm::{Collective, Mesh};
use crate::config::PositionBy;
use crate::data::format::TOKENS;
use crate::data::{
    mask_targets, sample_documents, sample_targets, shard_files, DataError, Dataset, Packing, IGNORE_INDEX,
};
use std::path::PathBuf;
use tch::Tensor;

pub struct LossSpec {
    /// Shard files or folders of them (held out from training).
    pub paths: Vec<PathBuf>,
    /// Number of position bins (at most one per labelled position).
    pub bins: usize,
    /// Evaluate at most this many sequences (None: all).
    pub max_sequences: Option<usize>,
    /// The position a token is binned by: in the sequence, or within its document.
    pub by: PositionBy,
    /// How the model saw packed documents in training (`data.documents`, `data.positions`).
    pub packing: Packing,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LossResult {
    pub seq_len: usize,
    pub sequences: usize,
    pub by: PositionBy,
    /// Bin b covers the predictions made at positions `[bin_start[b], bin_end[b])` (in the
    /// sequence or within the document, as `by` says).
    pub bin_start: Vec<usize>,
    pub bin_end: Vec<usize>,
    /// Mean next-token loss (nats) in each bin.
    pub loss: Vec<f64>,
    /// Tokens scored in each bin.
    pub tokens: Vec<i64>,
}

/// Sequence length of the shards (read from the first one; `Dataset::open` checks the rest).
pub fn shard_seq_len(paths: &[PathBuf]) -> Result<usize, EvalError> {
    let files = shard_files(paths)?;
    let first = files
        .first()
        .ok_or_else(|| EvalError::Usage("--data lists no shards; give HDF5 shard files or folders of them".into()))?;
    let file = hdf5::File::open(first).map_err(|e| DataError::Open { path: first.clone(), detail: e.to_string() })?;
    let tokens = file.dataset(TOKENS).map_err(|_| DataError::Missing {
        path: first.clone(),
        what: "dataset",
        name: TOKENS.into(),
    })?;
    Ok(tokens.shape().get(1).copied().unwrap_or(0))
}

/// Evaluates the curve. Collective over the world: every rank calls it with the same spec.
pub fn run_loss(ev: &Evaluator, spec: &LossSpec, mesh: &Mesh, world: &dyn Collective) -> Result<LossResult, EvalError> {
    let seq_len = shard_seq_len(&spec.paths)?;
    ev.spec.check_seq_len(seq_len).map_err(|e| EvalError::Usage(format!("--data: {e}")))?;
    let dataset = Dataset::open(&spec.paths, seq_len)?;
    if dataset.vocab_size() > ev.spec.vocab_size {
        return Err(EvalError::Usage(format!(
            "--data: the shards' vocabulary has {} tokens but the model's has {}; use shards made with the model's tokenizer",
            dataset.vocab_size(),
            ev.spec.vocab_size
        )));
    }
    if seq_len < 2 || spec.bins == 0 {
        return Err(EvalError::Usage(format!(
            "need sequences of at least 2 tokens (found {seq_len}) and at least one bin (--bins {})",
            spec.bins
        )));
    }
    if spec.by == PositionBy::Document && !spec.packing.reads_documents() {
        return Err(EvalError::Usage(
            "--by document needs the experiment's data.documents = \"mask\", which reads the shards' document boundaries".into(),
        ));
    }
    crate::data::check_packing(&spec.packing, &dataset)?;
    let (start, end) = ev.chunk(seq_len)?;
    let sequences = spec.max_sequences.map_or(dataset.len(), |m| m.min(dataset.len()));
    if sequences == 0 {
        return Err(EvalError::Usage("--data holds no sequences (or --samples is 0)".into()));
    }
    // Positions [0, L-1) have a label; split them into `bins` near-equal ranges.
    let labelled = seq_len - 1;
    let bins = spec.bins.min(labelled);
    let bin_start: Vec<usize> = (0..bins).map(|b| b * labelled / bins).collect();
    let bin_end: Vec<usize> = (1..=bins).map(|b| b * labelled / bins).collect();

    let mut loss_sum = vec![0f64; bins];
    let mut tokens = vec![0i64; bins];
    for index in (mesh.dp_rank..sequences).step_by(mesh.dp) {
        let span = dataset.read_span(index, start, (end + 1).min(seq_len))?;
        let docs = sample_documents(&dataset, &spec.packing, index)?;
        let mut labels: Vec<i64> = span[1..].iter().map(|&t| t as i64).collect();
        labels.resize(end - start, IGNORE_INDEX);
        // Chat data scores the tokens training trains (the shard's loss mask), as the held-out
        // loss of a run does.
        mask_targets(&dataset, index, start, (end + 1).min(seq_len), &mut labels)?;
        let positions = sample_targets(&docs, &spec.packing, dataset.pad_start(index)?, start, &mut labels);
        let losses = ev.position_losses(&span[..end - start], &labels, &positions, &docs)?;
        for (i, loss) in losses.iter().enumerate().filter(|(_, l)| l.is_finite()) {
            let p = start + i;
            let at = match spec.by {
                PositionBy::Sequence => p,
                PositionBy::Document => p - docs.start_of(p),
            };
            let b = bin_start.partition_point(|&s| s <= at) - 1;
            loss_sum[b] += f64::from(*loss);
            tokens[b] += 1;
        }
    }
    // Host values travel on the group's device (NCCL groups take CUDA tensors only).
    let sum = |t: Tensor| -> Result<Tensor, EvalError> {
        Ok(world.all_reduce(&t.to_device(world.device()))?.to_device(tch::Device::Cpu))
    };
    let loss_sum = Vec::<f64>::try_from(sum(Tensor::from_slice(&loss_sum))?)?;
    let tokens = Vec::<i64>::try_from(sum(Tensor::from_slice(&tokens))?)?;
    let loss = loss_sum.iter().zip(&tokens).map(|(&s, &n)| if n > 0 { s / n as f64 } else { f64::NAN }).collect();
    Ok(LossResult { seq_len, sequences, by: spec.by, bin_start, bin_end, loss, tokens })
}
