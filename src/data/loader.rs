//! The training reader: each rank reads only its slice of its dp rank's samples, builds inputs,
//! pre-shifted labels and global position ids, and prefetches the next micro batch on a
//! background thread. The state (epoch, position) fully determines what comes next, so a
//! resumed run sees exactly the data it would have seen.
use super::order::{epoch_order, micro_batch_indices, steps_per_epoch};
use super::{DataError, Dataset};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

/// The label that contributes no loss (PyTorch's and transformers' `ignore_index`): positions without
/// a next token, and every label outside the answer with `data.loss_on = "answer"`.
pub const IGNORE_INDEX: i64 = -100;

/// Which next-token labels count in the loss.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossOn {
    /// Every position (plain language modelling).
    #[default]
    All,
    /// Only the recorded answer of a passkey sample (`ulysses data synth --task passkey`); every
    /// other label is -100, so SP ranks that hold no answer token have no valid label at all.
    Answer,
}

#[derive(Clone, Copy, Debug)]
pub struct LoaderSpec {
    pub seed: u64,
    pub shuffle: bool,
    pub dp: usize,
    pub dp_rank: usize,
    pub sp: usize,
    pub sp_rank: usize,
    pub micro_batch: usize,
    pub loss_on: LossOn,
}

/// One rank's micro batch: row-major [micro_batch, chunk_len] (chunk_len = seq_len / sp).
/// `labels[i]` is the token after `input_ids[i]`, also across the chunk boundary; in packed text
/// the label after a document's EOS is the next document's first token (plain next-token
/// prediction; document starts are recorded in the shard but not masked).
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
    pub position_ids: Vec<i64>,
    pub micro_batch: usize,
    pub chunk_len: usize,
    /// Global sequence index of each row (the same on every SP rank of a dp group).
    pub sample_indices: Vec<usize>,
}

/// Position in the data stream: `position` = micro batches consumed in this epoch (per dp rank).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LoaderState {
    pub epoch: u64,
    pub position: u64,
}

impl LoaderState {
    /// The same point in the stream with `position` inside the epoch (a saved state may point
    /// just past an epoch's last step).
    fn normalized(&self, steps: u64) -> LoaderState {
        LoaderState { epoch: self.epoch + self.position / steps, position: self.position % steps }
    }
}

pub struct Loader {
    rx: Receiver<Result<Batch, DataError>>,
    next: LoaderState,
    steps: u64,
}

impl Loader {
    /// `state` = `LoaderState::default()` for a fresh run, or a saved `state()` to resume.
    pub fn new(dataset: Dataset, spec: LoaderSpec, state: LoaderState) -> Result<Loader, DataError> {
        check_spec(&spec, &dataset)?;
        let steps = steps_per_epoch(dataset.len(), spec.dp, spec.micro_batch) as u64;
        let next = state.normalized(steps);
        // Capacity 1: the worker reads micro batch k+1 while the trainer computes on k.
        let (tx, rx) = sync_channel(1);
        let start = next.clone();
        std::thread::Builder::new()
            .name(format!("loader-dp{}-sp{}", spec.dp_rank, spec.sp_rank))
            .spawn(move || prefetch(dataset, spec, start, steps, tx))
            .map_err(|e| DataError::Spec(format!("cannot start the prefetch thread: {e}")))?;
        Ok(Loader { rx, next, steps })
    }

    /// Blocks only if the prefetch has not finished.
    pub fn next_batch(&mut self) -> Result<Batch, DataError> {
        let batch = self.rx.recv().map_err(|_| DataError::LoaderStopped)??;
        self.next = LoaderState { epoch: self.next.epoch, position: self.next.position + 1 }.normalized(self.steps);
        Ok(batch)
    }

    /// The state that yields the batch the next `next_batch()` returns.
    pub fn state(&self) -> LoaderState {
        self.next.clone()
    }

    /// Micro batches per dp rank per epoch.
    pub fn steps_per_epoch(&self) -> u64 {
        self.steps
    }
}

fn check_spec(spec: &LoaderSpec, dataset: &Dataset) -> Result<(), DataError> {
    let LoaderSpec { dp, dp_rank, sp, sp_rank, micro_batch, .. } = *spec;
    if sp == 0 || dp == 0 || micro_batch == 0 {
        return Err(DataError::Spec(format!(
            "sp = {sp}, dp = {dp}, micro_batch = {micro_batch}; each must be at least 1"
        )));
    }
    if sp_rank >= sp || dp_rank >= dp {
        return Err(DataError::Spec(format!(
            "rank (dp_rank {dp_rank}, sp_rank {sp_rank}) is outside the mesh dp = {dp} × sp = {sp}"
        )));
    }
    if dataset.seq_len() % sp != 0 {
        return Err(DataError::Indivisible { seq_len: dataset.seq_len(), sp });
    }
    if steps_per_epoch(dataset.len(), dp, micro_batch) == 0 {
        return Err(DataError::TooFewSequences { sequences: dataset.len(), dp, micro_batch });
    }
    Ok(())
}

/// Worker loop: produces micro batches in order from `state` until the loader is dropped or a
/// read fails (the error is delivered, then the worker stops).
fn prefetch(
    dataset: Dataset,
    spec: LoaderSpec,
    mut state: LoaderState,
    steps: u64,
    tx: SyncSender<Result<Batch, DataError>>,
) {
    let mut order: Option<(u64, Vec<usize>)> = None;
    loop {
        if order.as_ref().is_none_or(|(epoch, _)| *epoch != state.epoch) {
            order = Some((state.epoch, epoch_order(dataset.len(), spec.seed, state.epoch, spec.shuffle)));
        }
        let (_, perm) = order.as_ref().expect("order was just computed");
        let indices = micro_batch_indices(perm, state.position as usize, spec.dp, spec.dp_rank, spec.micro_batch);
        let batch = build_batch(&dataset, &spec, indices);
        let failed = batch.is_err();
        if tx.send(batch).is_err() || failed {
            return;
        }
        state = LoaderState { epoch: state.epoch, position: state.position + 1 }.normalized(steps);
    }
}

/// SP rank r reads its chunk `[r·c, (r+1)·c)` of each sample (`layout::sp_chunk`) and one token
/// more (none for the last rank): inputs are the chunk, labels the same span shifted by one,
/// -100 past the end.
pub fn build_batch(dataset: &Dataset, spec: &LoaderSpec, indices: &[usize]) -> Result<Batch, DataError> {
    let chunk = crate::layout::sp_chunk(dataset.seq_len(), spec.sp, spec.sp_rank);
    let (start, chunk_len) = (chunk.start, chunk.len());
    let end = (chunk.end + 1).min(dataset.seq_len());
    let n = indices.len() * chunk_len;
    let (mut input_ids, mut labels, mut position_ids) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    for &index in indices {
        let span = dataset.read_span(index, start, end)?;
        input_ids.extend(span[..chunk_len].iter().map(|&t| t as i64));
        let row = labels.len();
        labels.extend(span[1..].iter().map(|&t| t as i64));
        labels.resize(input_ids.len(), IGNORE_INDEX);
        if spec.loss_on == LossOn::Answer {
            let info = dataset.passkey(index)?.ok_or_else(|| {
                DataError::Spec(format!(
                    "data.loss_on = \"answer\" needs passkey metadata, but sequence {index} of {} has none (make such data with `ulysses data synth --task passkey`)",
                    dataset.shard_paths().iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
                ))
            })?;
            let answer = info.answer_start..info.answer_start + info.answer_tokens.len();
            // Position p's label is token p + 1.
            for (i, label) in labels[row..].iter_mut().enumerate() {
                if !answer.contains(&(start + i + 1)) {
                    *label = IGNORE_INDEX;
                }
            }
        }
        position_ids.extend((start..start + chunk_len).map(|p| p as i64));
    }
    Ok(Batch {
        input_ids,
        labels,
        position_ids,
        micro_batch: indices.len(),
        chunk_len,
        sample_indices: indices.to_vec(),
    })
}
