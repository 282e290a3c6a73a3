//! Held-out loss during training (`data.eval_paths`, `train.eval_every`). Each dp group reads its
//! share of the held-out sequences as the loader reads training data (`data::build_batch`: the
//! same SP slices, pre-shifted labels, loss masks and packing) and runs the step's forward
//! without its backward (`step::forward_loss`); the loss is the token-weighted mean over every
//! rank's trained labels, as training's is. Every held-out sequence counts exactly once: the
//! last round's rows past the end repeat a sequence with every label ignored, so that all ranks
//! run the same number of forwards (each one gathers the ZeRO shards over the whole job).
use super::step::{forward_loss, MicroBatch, StepContext};
use super::store::ActivationStore;
use crate::comm::{all_reduce_f64s, Collective};
use crate::data::{build_batch, Dataset, LoaderSpec, IGNORE_INDEX};
use crate::parallel::zero::ShardedParams;
use anyhow::{Context, Result};
use tch::Device;

pub struct Validation {
    dataset: Dataset,
    /// The training loader's spec (mesh slice, micro batch, loss masking, packing).
    spec: LoaderSpec,
    every: usize,
}

/// One evaluation of the held-out set.
#[derive(Debug, Clone, Copy)]
pub struct HeldOut {
    /// Mean loss over the trained labels of the held-out set (NaN: it has none), nats.
    pub loss: f64,
    /// Its trained labels, whole job.
    pub tokens: u64,
    pub seconds: f64,
}

impl Validation {
    /// The held-out set `paths`, read with the training loader's `spec`, evaluated every `every`
    /// steps; None without one (`every` = 0).
    pub fn open(paths: &[std::path::PathBuf], seq_len: usize, spec: LoaderSpec, every: usize) -> Result<Option<Self>> {
        if every == 0 {
            return Ok(None);
        }
        let dataset = Dataset::open(paths, seq_len).context("data.eval_paths")?;
        crate::data::check_packing(&spec.packing, &dataset).context("data.eval_paths")?;
        Ok(Some(Validation { dataset, spec, every }))
    }

    pub fn vocab_size(&self) -> i64 {
        self.dataset.vocab_size()
    }

    /// Held-out sequences.
    pub fn len(&self) -> usize {
        self.dataset.len()
    }

    /// Whether step `step` of `steps` is evaluated: every `every` steps, and the last.
    pub fn due(&self, step: usize, steps: usize) -> bool {
        step % self.every == 0 || step == steps
    }

    /// Evaluates the held-out set (collective over the world).
    pub fn run(
        &self,
        ctx: &StepContext,
        params: &mut ShardedParams,
        store: &mut ActivationStore,
        world: &dyn Collective,
        device: Device,
    ) -> Result<HeldOut> {
        let started = std::time::Instant::now();
        let (n, dp, mb) = (self.dataset.len(), self.spec.dp, self.spec.micro_batch);
        let rounds = n.div_ceil(dp * mb);
        let (mut loss, mut tokens) = (0.0, 0i64);
        for round in 0..rounds {
            let first = (round * dp + self.spec.dp_rank) * mb;
            let wanted: Vec<usize> = (first..first + mb).collect();
            let indices: Vec<usize> = wanted.iter().map(|&i| i % n).collect();
            let mut batch = build_batch(&self.dataset, &self.spec, &indices).context("data.eval_paths")?;
            // A row past the end stands in for no sequence: it trains nothing.
            for (row, _) in wanted.iter().enumerate().filter(|(_, &i)| i >= n) {
                batch.labels[row * batch.chunk_len..(row + 1) * batch.chunk_len].fill(IGNORE_INDEX);
            }
            let batch = MicroBatch::from_batch(&batch, device);
            tokens += batch.valid_labels();
            loss += forward_loss(ctx, params, store, &batch)?;
        }
        let [loss, tokens] = all_reduce_f64s(world, &[loss, tokens as f64])?[..] else {
            unreachable!("two values summed")
        };
        Ok(HeldOut { loss: loss / tokens, tokens: tokens as u64, seconds: started.elapsed().as_secs_f64() })
    }
}
