//! The training reader: each rank reads only its slice of its dp rank's samples, builds inputs,
//! pre-shifted labels and global position ids, and prefetches the next micro batch on a
//! background thread. The state (epoch, position) fully determines what comes next, so a
//! resumed run sees exactly the data it would have seen.
use super::order::{epoch_order, micro_batch_indices, steps_per_epoch};
use super::{DataError, Dataset, Documents};
use std::ops::Range;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

/// The label that contributes no loss (PyTorch's and transformers' `ignore_index`): positions without
/// a next token, tokens the shard's `loss_mask` does not train, and every label outside the answer
/// with `data.loss_on = "answer"`.
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

/// What training does with the document boundaries of packed samples (`data.documents`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PackedDocuments {
    /// Attention runs causally over the whole sequence, across documents, and the label after a
    /// document's last token is the next document's first (plain next-token prediction).
    #[default]
    Ignore,
    /// Attention is block-diagonal causal: a token attends only to earlier tokens of its own
    /// document; the label at a document's last position (before another document) is -100.
    Mask,
}

/// The RoPE position of each token (`data.positions`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Positions {
    /// Its position in the sequence.
    #[default]
    Global,
    /// Its position in its document: positions restart at 0 where a document begins.
    Document,
}

/// How packed documents are trained on: `data.documents` and `data.positions`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Packing {
    pub documents: PackedDocuments,
    pub positions: Positions,
}

impl Packing {
    /// Whether the document boundaries are read at all (not for the default, which ignores them).
    pub fn reads_documents(&self) -> bool {
        self.documents == PackedDocuments::Mask
    }

    /// Positions that restart while attention runs across documents would put an earlier
    /// document's tokens at later positions than the token attending to them.
    pub fn problem(&self) -> Option<&'static str> {
        (self.positions == Positions::Document && self.documents == PackedDocuments::Ignore).then_some(
            "data.positions = \"document\" needs data.documents = \"mask\": positions that restart while attention runs across documents put an earlier document's tokens at later positions",
        )
    }
}

#[derive(Clone, Copy, Debug)]
pub struct LoaderSpec {
    pub seed: u64,
    pub shuffle: bool,
    pub dp: usize,
    pub dp_rank: usize,
    pub sp: usize,
    pub sp_rank: usize,
    /// Ring attention's degree (`parallel.ring`): 1, or the zigzag layout over sp = ulysses × ring
    /// (`layout::sp_spans`).
    pub ring: usize,
    pub micro_batch: usize,
    pub loss_on: LossOn,
    pub packing: Packing,
}

/// One rank's micro batch: row-major [micro_batch, chunk_len] (chunk_len = seq_len / sp), the
/// tokens of `spans` end to end. `labels[i]` is the token after `input_ids[i]`, also across the
/// chunk boundary. With
/// `data.documents = "ignore"` the label after a document's EOS is the next document's first
/// token (plain next-token prediction); with "mask" it is -100. Padding is never a target, nor
/// is a token the shard's `loss_mask` marks 0 (chat data: everything but the assistant's turns).
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
    /// RoPE positions: global, or within the document (`data.positions`).
    pub position_ids: Vec<i64>,
    pub micro_batch: usize,
    pub chunk_len: usize,
    /// The global token ranges the rank holds, in order (one, or two zigzag pieces with a ring).
    pub spans: Vec<Range<usize>>,
    /// Global sequence index of each row (the same on every SP rank of a dp group).
    pub sample_indices: Vec<usize>,
    /// Each row's documents over the WHOLE sequence, the same on every SP rank of the dp group
    /// (after the all-to-all each rank attends over the whole sequence); one document per row
    /// when the boundaries are ignored.
    pub documents: Vec<Documents>,
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
    let LoaderSpec { dp, dp_rank, sp, sp_rank, ring, micro_batch, .. } = *spec;
    if sp == 0 || dp == 0 || micro_batch == 0 || ring == 0 || sp % ring != 0 {
        return Err(DataError::Spec(format!(
            "sp = {sp}, dp = {dp}, micro_batch = {micro_batch}, ring = {ring}; each must be at least 1 and ring must divide sp"
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
    // The zigzag layout cuts the sample into 2·ring chunks, each split over the Ulysses group.
    if ring > 1 && dataset.seq_len() % (2 * sp) != 0 {
        return Err(DataError::Spec(format!(
            "data.seq_len = {} is not divisible by 2 × parallel.sp = {} (the zigzag layout of parallel.ring = {ring}); use a multiple of {}",
            dataset.seq_len(),
            2 * sp,
            2 * sp
        )));
    }
    if steps_per_epoch(dataset.len(), dp, micro_batch) == 0 {
        return Err(DataError::TooFewSequences { sequences: dataset.len(), dp, micro_batch });
    }
    check_packing(&spec.packing, dataset)
}

/// The packing setting is consistent and the boundaries it needs are recorded in every shard.
pub fn check_packing(packing: &Packing, dataset: &Dataset) -> Result<(), DataError> {
    if let Some(problem) = packing.problem() {
        return Err(DataError::Spec(problem.into()));
    }
    match dataset.shard_without_documents() {
        Some(path) if packing.reads_documents() => Err(DataError::NoDocuments { path: path.to_path_buf() }),
        _ => Ok(()),
    }
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

/// SP rank r reads its span(s) of each sample (`layout::sp_spans`: its chunk `[r·c, (r+1)·c)`, or
/// its zigzag pieces with a ring) and one token more after each (none at the sample's end):
/// inputs are the spans end to end, labels each span shifted by one, -100 past the end; with
/// packing, the sample's documents over the whole sequence shape the labels and positions
/// (`sample_targets`). Labels and RoPE positions move with their tokens, so attention never
/// reorders anything.
pub fn build_batch(dataset: &Dataset, spec: &LoaderSpec, indices: &[usize]) -> Result<Batch, DataError> {
    let seq_len = dataset.seq_len();
    let spans = crate::layout::sp_spans(seq_len, spec.sp / spec.ring, spec.ring, spec.sp_rank);
    let chunk_len: usize = spans.iter().map(|r| r.len()).sum();
    let n = indices.len() * chunk_len;
    let (mut input_ids, mut labels, mut position_ids) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    let mut documents = Vec::with_capacity(indices.len());
    for &index in indices {
        let answer = match spec.loss_on {
            LossOn::Answer => {
                let info = dataset.passkey(index)?.ok_or_else(|| {
                    DataError::Spec(format!(
                        "data.loss_on = \"answer\" needs passkey metadata, but sequence {index} of {} has none (make such data with `ulysses data synth --task passkey`)",
                        dataset.shard_paths().iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
                    ))
                })?;
                Some(info.answer_start..info.answer_start + info.answer_tokens.len())
            }
            LossOn::All => None,
        };
        let docs = sample_documents(dataset, &spec.packing, index)?;
        let pad_start = dataset.pad_start(index)?;
        for span in &spans {
            let (start, end) = (span.start, (span.end + 1).min(seq_len));
            let span_tokens = dataset.read_span(index, start, end)?;
            input_ids.extend(span_tokens[..span.len()].iter().map(|&t| t as i64));
            let row = labels.len();
            labels.extend(span_tokens[1..].iter().map(|&t| t as i64));
            labels.resize(input_ids.len(), IGNORE_INDEX);
            let targets = &mut labels[row..];
            // Label i is the target of position start + i: token start + i + 1.
            mask_targets(dataset, index, start, end, targets)?;
            if let Some(answer) = &answer {
                keep_targets(targets, |i| answer.contains(&(start + i + 1)));
            }
            position_ids.extend(sample_targets(&docs, &spec.packing, pad_start, start, targets));
        }
        documents.push(docs);
    }
    Ok(Batch {
        input_ids,
        labels,
        position_ids,
        micro_batch: indices.len(),
        chunk_len,
        spans,
        sample_indices: indices.to_vec(),
        documents,
    })
}

/// Sets to -100 the labels of the chunk that starts at `start` whose target the shard's loss mask
/// does not train (label i is the target of position start + i: token start + i + 1; `end` is
/// the end of the span read, the chunk's end + 1 within the sequence). Training and
/// `eval --task loss` both mask through here.
pub fn mask_targets(
    dataset: &Dataset,
    index: usize,
    start: usize,
    end: usize,
    labels: &mut [i64],
) -> Result<(), DataError> {
    if let Some(mask) = dataset.loss_mask(index, start + 1, end)? {
        keep_targets(labels, |i| mask.get(i).is_some_and(|&m| m == 1));
    }
    Ok(())
}

/// Sets to -100 every label whose target is not trained: `trained(i)` says whether label i (the
/// token after the chunk's position i) is. The shard's loss mask and a passkey answer both go
/// through here; padding and document ends are applied after, by `sample_targets`.
fn keep_targets(labels: &mut [i64], trained: impl Fn(usize) -> bool) {
    for (i, label) in labels.iter_mut().enumerate() {
        if !trained(i) {
            *label = IGNORE_INDEX;
        }
    }
}

/// Sequence `index`'s documents as `packing` uses them: the recorded ones, or the whole sequence
/// as one when the boundaries are ignored.
pub fn sample_documents(dataset: &Dataset, packing: &Packing, index: usize) -> Result<Documents, DataError> {
    if !packing.reads_documents() {
        return Ok(Documents::whole(dataset.seq_len()));
    }
    match dataset.documents(index)? {
        Some(docs) => Ok(docs),
        None => Err(DataError::NoDocuments { path: dataset.shard_path(index)?.to_path_buf() }),
    }
}

/// Applies the sample's documents and padding to the labels of the chunk that starts at global
/// position `start` (label i is the target of position `start + i`), and returns the chunk's
/// RoPE positions. Padding (from `pad_start` on) is never a target, nor is the token that begins
/// another document when attention stays within documents.
pub fn sample_targets(
    docs: &Documents,
    packing: &Packing,
    pad_start: Option<usize>,
    start: usize,
    labels: &mut [i64],
) -> Vec<i64> {
    for (i, label) in labels.iter_mut().enumerate() {
        let p = start + i;
        let padded = pad_start.is_some_and(|pad| p + 1 >= pad);
        if padded || (packing.documents == PackedDocuments::Mask && docs.ends_before_next(p)) {
            *label = IGNORE_INDEX;
        }
    }
    let restart = packing.positions == Positions::Document;
    (start..start + labels.len()).map(|p| if restart { (p - docs.start_of(p)) as i64 } else { p as i64 }).collect()
}
