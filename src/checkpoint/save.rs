//! Writing checkpoints (format 2). Every rank writes its own slice of every unit's fp32 master
//! weights and Adam moments to its own file, all ranks at once; no rank ever holds more than its
//! shard and its staging. The commit protocol, for a checkpoint of step N:
//!
//! 1. rank 0 clears leftovers and creates `step-N.tmp-<job>/`; a barrier;
//! 2. every rank writes `rank-R-of-W.safetensors` there and fsyncs it (rank 0 also the run
//!    state, the experiment and config.json);
//! 3. when every rank is done (a barrier, or for an asynchronous save an all-reduce at a later
//!    step boundary), the ranks gather what each writer saw: its file's CRC-32 and the non-finite
//!    values of each unit and state. A state with any is refused on every rank (a checkpoint is
//!    the resume point: a poisoned one would stop every relaunch at the same step). Otherwise rank
//!    0 checks every file's size, writes `index.json` with the checksums, `COMPLETE`, renames the
//!    folder to `step-N` and deletes the checkpoints beyond `keep`.
//!
//! Synchronous (`checkpoint.async = false`): the step waits for all of it; shard state on the
//! GPU passes through one 256 MiB pinned block, state in host memory is written where it is.
//! Asynchronous: the step waits only while the rank's slice of GPU state is copied into pinned
//! host staging (held for the whole run, counted by the memory plan); a background thread writes
//! and fsyncs it, and step boundaries check (one all-reduce) whether every rank is done, to
//! commit. State already in host memory (an offloaded optimizer, a CPU run) is not copied: the
//! writer reads it where it lies, and the next optimizer step waits until it has (its forward
//! and backward overlap the write). A save waits
//! for the one before it, and so do the end of the run and a preemption (`finish`). A write
//! that fails stops the run at the next step boundary; nothing earlier is touched.
use super::commit::{prepare_dir, prune, publish, write_synced};
use super::index::{rank_file_name, rank_layout, saved_range, Index, INDEX};
use super::tensor_file::{Layout, Writer, Written};
use super::*;
use crate::comm::{all_reduce_f64, broadcast_i64, Collective};
use crate::ffi::transfer;
use crate::model::spec::ModelSpec;
use crate::model::weights::copy_tokenizer_files;
use crate::parallel::tiers::DiskShard;
use crate::parallel::zero::UnitId;
use crate::parallel::zero::{ShardedParams, State, Unit};
use crate::units::bytes;
use std::thread::JoinHandle;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Elements of one staging block (256 MiB of fp32): a power of two, so that torch's pinned host
/// allocator, which rounds every block up to one, wastes nothing.
const BLOCK: i64 = 64 << 20;

/// Host memory a rank's slice passes through on its way to its file.
struct Staging {
    blocks: Vec<Tensor>,
}

impl Staging {
    /// Blocks covering `elements` fp32 values, pinned when `pinned` (state on a GPU: the copy to
    /// pinned memory runs at the link's full speed).
    fn new(elements: i64, pinned: bool) -> Result<Staging, CheckpointError> {
        let mut blocks = Vec::new();
        let mut left = elements;
        while left > 0 {
            let n = left.min(BLOCK);
            // An expanded scalar gives the shape without allocating it.
            let like = Tensor::zeros([1], (Kind::Float, Device::Cpu)).expand([n], false);
            let block = if pinned {
                transfer::empty_pinned_like(&like).map_err(|e| CheckpointError::Staging(e.to_string()))?
            } else {
                // Touched now, at the start of the run: the first save would otherwise wait for
                // the page faults of every staging page.
                Tensor::zeros([n], (Kind::Float, Device::Cpu))
            };
            blocks.push(block);
            left -= n;
        }
        Ok(Staging { blocks })
    }

    fn bytes(&self) -> u64 {
        self.blocks.iter().map(|b| b.numel() as u64 * 4).sum()
    }
}

/// One slice a rank saves: state `state` of unit `unit`, elements `[offset, offset + len)` of
/// its local shard tensor. In file order (`rank_layout`).
fn slices(units: &[Unit], params: &ShardedParams, rank: usize, world: usize) -> Vec<(UnitSlice, State)> {
    State::ALL
        .into_iter()
        .flat_map(|state| {
            units.iter().map(move |u| {
                let (start, len) = saved_range(u.numel, rank, world);
                let (shard_start, _) = params.shard_range(u.id);
                (UnitSlice { id: u.id, offset: start - shard_start, len }, state)
            })
        })
        .collect()
}

struct UnitSlice {
    id: UnitId,
    offset: i64,
    len: i64,
}

/// A save whose files are being written by a background thread.
struct InFlight {
    step: u64,
    tmp: PathBuf,
    started: Instant,
    /// Seconds the step waited for the staging copy.
    blocked: f64,
    /// The writer reads state in host memory that the run keeps: the optimizer must wait.
    reads_live: bool,
    /// None once joined.
    writer: Option<JoinHandle<(Result<Written, CheckpointError>, Staging)>>,
    /// What the writer wrote, once joined.
    written: Option<Written>,
}

/// How a run saves: where, synchronously or not, and the staging it keeps for the run.
pub struct Checkpointer {
    run_dir: PathBuf,
    keep: usize,
    asynchronous: bool,
    /// Rank 0's process id, the same on every rank: names this job's temporary folders.
    job: i64,
    rank: usize,
    world: usize,
    /// The units' names and sizes (the index describes them).
    units: Vec<Unit>,
    /// Asynchronous saves: the rank's slice of GPU state; synchronous saves of GPU state: one
    /// block; host-resident state: none. Lent to the writer thread while a save is in flight.
    staging: Option<Staging>,
    staging_bytes: u64,
    in_flight: Option<InFlight>,
    /// The tokenizer files (path, name) every checkpoint carries beside config.json, so that an
    /// export of it serves as a Hugging Face model with its tokenizer.
    tokenizer: Vec<(PathBuf, &'static str)>,
}

impl Checkpointer {
    /// Collective. `asynchronous`: periodic saves stage and write in the background (the run
    /// passes `checkpoint.async` when it saves every N steps). Allocates the staging now, before
    /// training, so that a run that cannot hold it fails at once (the memory plan counted it:
    /// `MemoryPlan::checkpoint_staging`). `tokenizer`: the files (path, name) each checkpoint carries.
    pub fn new(
        run_dir: &Path,
        keep: usize,
        asynchronous: bool,
        tokenizer: Vec<(PathBuf, &'static str)>,
        params: &ShardedParams,
        world: &dyn Collective,
    ) -> Result<Checkpointer, CheckpointError> {
        let job = broadcast_i64(world, std::process::id() as i64, 0)?;
        let (rank, size) = (world.rank(), world.size());
        params.settle()?;
        // Only state on a GPU is staged; state in host memory is written where it lies.
        let on_gpu = staged_elements(params, &slices(params.units(), params, rank, size));
        let staging = match (asynchronous, on_gpu > 0) {
            (true, true) => Some(Staging::new(on_gpu, true)?),
            (false, true) => Some(Staging::new(on_gpu.min(BLOCK), true)?),
            (_, false) => None,
        };
        if let Some(s) = staging.as_ref().filter(|_| asynchronous && rank == 0) {
            log::info!("checkpoint.async: {} of host staging per rank", bytes(s.bytes() as f64));
        }
        Ok(Checkpointer {
            run_dir: run_dir.to_path_buf(),
            keep,
            asynchronous,
            job,
            rank,
            world: size,
            units: params.units().to_vec(),
            staging_bytes: staging.as_ref().map_or(0, Staging::bytes),
            staging,
            in_flight: None,
            tokenizer,
        })
    }

    /// Saves `params` with `state` as `checkpoints/step-<state.step>`, after waiting for the save
    /// before it. Collective. Synchronous, or when `wait` (the run ends after it, so staging it
    /// would only add a copy): returns when the checkpoint is published. Asynchronous: returns
    /// once this rank's slice is staged.
    pub fn save(
        &mut self,
        params: &ShardedParams,
        state: &RunState,
        spec: &ModelSpec,
        wait: bool,
        world: &dyn Collective,
    ) -> Result<(), CheckpointError> {
        self.finish(world)?;
        let started = Instant::now();
        // The state to save is the updated one: the update of host-memory units may still run.
        params.settle()?;
        let tmp = checkpoints_dir(&self.run_dir).join(format!("{}.tmp-{}", step_dir_name(state.step), self.job));
        if self.rank == 0 {
            prepare_dir(&self.run_dir)?;
            std::fs::create_dir(&tmp).map_err(io_err(&tmp))?;
        }
        world.barrier()?;
        // Every rank, for a shared file system that shows rank 0's new folder late.
        std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        if self.rank == 0 {
            write_run_files(&tmp, state, spec)?;
            copy_tokenizer_files(&self.tokenizer, &tmp)?;
        }
        let layout = rank_layout(&self.units, self.rank, self.world);
        let file = tmp.join(rank_file_name(self.rank, self.world));
        let slices = slices(&self.units, params, self.rank, self.world);
        if !self.asynchronous || wait {
            let written = write_now(params, &slices, &file, &layout, self.staging.as_ref())?;
            // Every rank's file is on disk when every rank has sent what it wrote.
            let all = gather_written(world, &written)?;
            self.commit(state.step, &tmp, started, None, &all)?;
            // No rank goes on (or exits, after a preemption) before the checkpoint is published.
            world.barrier()?;
            return Ok(());
        }
        let staging = self.staging.take().unwrap_or_else(|| Staging { blocks: Vec::new() });
        let parts = stage(params, &slices, &staging);
        let reads_live = parts.iter().any(|p| matches!(p, Part::Live(_) | Part::Disk(..)));
        let blocked = started.elapsed().as_secs_f64();
        let writer = std::thread::Builder::new()
            .name(format!("checkpoint-{}", state.step))
            .spawn(move || {
                let result = write_staged(&file, &layout, &staging, &parts);
                (result, staging)
            })
            .map_err(|e| CheckpointError::Staging(format!("cannot start the checkpoint writer thread: {e}")))?;
        self.in_flight =
            Some(InFlight { step: state.step, tmp, started, blocked, reads_live, writer: Some(writer), written: None });
        Ok(())
    }

    /// At a step boundary (collective): commits the asynchronous save in flight once every rank
    /// has written its file; fails if this rank's write failed.
    pub fn poll(&mut self, world: &dyn Collective) -> Result<(), CheckpointError> {
        if self.in_flight.is_none() {
            return Ok(());
        }
        let done = self.join(false)?;
        // Every rank's file is on disk when every rank reports done: the all-reduce is the barrier.
        if all_reduce_f64(world, if done { 0.0 } else { 1.0 })? == 0.0 {
            self.commit_in_flight(world)?;
        }
        Ok(())
    }

    /// Waits for the save in flight, if any, and commits it (collective): before the next save,
    /// at the end of the run, and before a preempted job exits.
    pub fn finish(&mut self, world: &dyn Collective) -> Result<(), CheckpointError> {
        if self.in_flight.is_none() {
            return Ok(());
        }
        self.join(true)?;
        self.commit_in_flight(world)?;
        // No rank goes on (or exits) before the checkpoint is published.
        world.barrier()?;
        Ok(())
    }

    /// Before the optimizer changes the state in place (collective-free): waits for an
    /// asynchronous save that writes host-resident state where it lies (an offloaded optimizer,
    /// a CPU run) to have written it. Returns the seconds waited; fails if the write failed.
    /// The forward and backward of the step after a save overlap the write.
    pub fn before_update(&mut self) -> Result<f64, CheckpointError> {
        if !self.in_flight.as_ref().is_some_and(|f| f.reads_live) {
            return Ok(0.0);
        }
        let t = Instant::now();
        self.join(true)?;
        Ok(t.elapsed().as_secs_f64())
    }

    /// Whether an asynchronous save is being written.
    pub fn in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Rank 0's process id (the same on every rank), which names this job's temporary folders.
    pub fn job(&self) -> i64 {
        self.job
    }

    /// The host staging this checkpointer holds for the run, bytes.
    pub fn staging_bytes(&self) -> u64 {
        self.staging_bytes
    }

    /// Whether the in-flight writer has finished (waiting for it when `block`); its error, if it
    /// failed. Takes the staging back.
    fn join(&mut self, block: bool) -> Result<bool, CheckpointError> {
        let Some(f) = self.in_flight.as_mut() else { return Ok(true) };
        let Some(writer) = f.writer.take_if(|w| block || w.is_finished()) else {
            return Ok(f.writer.is_none());
        };
        let (result, staging) =
            writer.join().map_err(|_| CheckpointError::Staging("the checkpoint writer thread panicked".into()))?;
        self.staging = Some(staging);
        f.written = Some(result.map_err(|e| CheckpointError::Failed { step: f.step, source: Box::new(e) })?);
        Ok(true)
    }

    /// Commits the joined save in flight (collective: every rank's writer is done).
    fn commit_in_flight(&mut self, world: &dyn Collective) -> Result<(), CheckpointError> {
        let f = self.in_flight.take().unwrap_or_else(|| unreachable!("called with a save in flight"));
        let written = f.written.unwrap_or_else(|| unreachable!("joined before its commit"));
        let all = gather_written(world, &written)?;
        self.commit(f.step, &f.tmp, f.started, Some(f.blocked), &all)
    }

    /// Once every rank's file is on disk, with what each rank's writer saw (`all`, by rank):
    /// every rank refuses a state with non-finite values; rank 0 checks the files' sizes, writes
    /// the index with their checksums, publishes and prunes. `blocked`: what an asynchronous save
    /// made the step wait.
    fn commit(
        &self,
        step: u64,
        tmp: &Path,
        started: Instant,
        blocked: Option<f64>,
        all: &[Written],
    ) -> Result<(), CheckpointError> {
        if let Err(e) = refuse_non_finite(step, all, &self.units, &checkpoints_dir(&self.run_dir)) {
            if self.rank == 0 {
                let _ = std::fs::remove_dir_all(tmp);
            }
            return Err(e);
        }
        if self.rank != 0 {
            return Ok(());
        }
        let mut index = Index::new(&self.units, self.world);
        for (f, w) in index.files.iter_mut().zip(all) {
            f.crc32 = Some(format!("{:08x}", w.crc32));
        }
        for f in &index.files {
            let path = tmp.join(&f.name);
            let len = std::fs::metadata(&path).map_err(io_err(&path))?.len();
            if len != f.bytes {
                return Err(CheckpointError::Corrupt {
                    path: path.display().to_string(),
                    message: format!("{len} bytes after its rank wrote it, expected {}", f.bytes),
                });
            }
        }
        let json = serde_json::to_string_pretty(&index).expect("an Index always serializes") + "\n";
        write_synced(&tmp.join(INDEX), json.as_bytes())?;
        let dest = checkpoints_dir(&self.run_dir).join(step_dir_name(step));
        publish(tmp, &dest)?;
        prune(&self.run_dir, self.keep, step)?;
        let total: u64 = index.files.iter().map(|f| f.bytes).sum();
        let seconds = started.elapsed().as_secs_f64();
        let waited = blocked.map_or(String::new(), |b| format!("; training waited {b:.2} s"));
        println!(
            "saved checkpoint {} ({} from {} rank(s) in {seconds:.2} s, {}/s{waited})",
            dest.display(),
            bytes(total as f64),
            self.world,
            bytes(total as f64 / seconds.max(1e-9))
        );
        Ok(())
    }
}

/// Rank 0's small files: the run state, the experiment, the model's config.json.
fn write_run_files(tmp: &Path, state: &RunState, spec: &ModelSpec) -> Result<(), CheckpointError> {
    let json = serde_json::to_string_pretty(state).expect("RunState always serializes") + "\n";
    write_synced(&tmp.join(RUN_STATE), json.as_bytes())?;
    write_synced(&tmp.join(EXPERIMENT), state.config_toml.as_bytes())?;
    let config = serde_json::to_string_pretty(&spec.to_hf_json()).expect("a config always serializes") + "\n";
    write_synced(&tmp.join(CONFIG), config.as_bytes())
}

/// Every rank's `Written` (collective), by rank: the CRC-32 and the non-finite counts.
fn gather_written(world: &dyn Collective, mine: &Written) -> Result<Vec<Written>, CheckpointError> {
    let mut row = vec![i64::from(mine.crc32)];
    row.extend(mine.non_finite.iter().map(|&n| n as i64));
    let n = row.len();
    let all = world.all_gather(&Tensor::from_slice(&row).to_device(world.device()))?;
    let all: Vec<i64> = Vec::try_from(all.to_device(Device::Cpu))
        .map_err(|e: tch::TchError| CheckpointError::Staging(e.to_string()))?;
    Ok(all
        .chunks(n)
        .map(|r| Written { bytes: 0, crc32: r[0] as u32, non_finite: r[1..].iter().map(|&v| v as u64).collect() })
        .collect())
}

/// An error when any rank's state to save holds NaN or infinity, naming the units and states.
/// Every rank's file has one tensor per state and unit, in `rank_layout`'s order.
fn refuse_non_finite(step: u64, all: &[Written], units: &[Unit], checkpoints: &Path) -> Result<(), CheckpointError> {
    let count = |k: usize| all.iter().map(|w| w.non_finite[k]).sum::<u64>();
    let total: u64 = (0..units.len() * State::ALL.len()).map(count).sum();
    if total == 0 {
        return Ok(());
    }
    let values: i64 = units.iter().map(|u| u.numel).sum::<i64>() * State::ALL.len() as i64;
    let mut found = Vec::new();
    for (s, state) in State::ALL.iter().enumerate() {
        for (i, u) in units.iter().enumerate() {
            let n = count(s * units.len() + i);
            if n > 0 {
                found.push(format!("{} {} {n} of {}", u.id.key(), state.name(), u.numel));
            }
        }
    }
    let listed = if found.len() > 6 { format!("{}, ...", found[..6].join(", ")) } else { found.join(", ") };
    Err(CheckpointError::NonFinite(format!(
        "step {step}: the state after the optimizer update holds {total} non-finite value(s) of {values} ({listed}); \
         it was not saved, and the newest checkpoint in {} stays the resume point. Usual causes: train.lr too high, \
         train.eps too small, train.weight_decay too large, no gradient clipping (train.clip_grad_norm)",
        checkpoints.display()
    )))
}

/// A synchronous save of this rank's slices: state in host memory is written where it lies,
/// state on a GPU passes through the staging block.
fn write_now(
    params: &ShardedParams,
    slices: &[(UnitSlice, State)],
    file: &Path,
    layout: &Layout,
    block: Option<&Staging>,
) -> Result<Written, CheckpointError> {
    let mut w = Writer::create(file, layout)?;
    for (s, state) in slices {
        let Some(src) = params.memory_state(s.id, *state) else {
            let disk = params.disk_shard(s.id).expect("a unit not in memory is on disk");
            disk.read_chunks(state.region(), s.offset, s.len, |t| w.write_tensor(t))?;
            continue;
        };
        let src = src.narrow(0, s.offset, s.len);
        if src.device() == Device::Cpu {
            w.write_tensor(&src)?;
            continue;
        }
        let block = &block.unwrap_or_else(|| unreachable!("GPU state has a staging block")).blocks[0];
        let mut at = 0;
        while at < s.len {
            let n = (s.len - at).min(block.numel() as i64);
            let mut part = block.narrow(0, 0, n);
            part.copy_(&src.narrow(0, at, n));
            w.write_tensor(&part)?;
            at += n;
        }
    }
    slow_save_for_tests();
    w.finish()
}

/// Where the background writer takes a slice from.
enum Part {
    /// Copied into the staging: pieces `(block, start, len)` of the blocks.
    Staged(Vec<(usize, i64, i64)>),
    /// Host memory the run keeps using: written where it lies, and the next optimizer step
    /// waits for the write (`Checkpointer::before_update`).
    Live(Tensor),
    /// A range `(at, len)` of a state on disk, read back in chunks as it is written (the next
    /// optimizer step waits for the write too).
    Disk(DiskShard, State, i64, i64),
}

/// Where the next slice goes in the staging blocks.
#[derive(Default)]
struct Cursor {
    block: usize,
    at: i64,
}

impl Cursor {
    /// Copies `src` (1-D, any device) into the blocks from here on; returns its pieces.
    fn copy(&mut self, src: &Tensor, blocks: &[Tensor]) -> Vec<(usize, i64, i64)> {
        let (len, mut done, mut pieces) = (src.numel() as i64, 0, Vec::new());
        while done < len {
            let block = &blocks[self.block];
            let n = (len - done).min(block.numel() as i64 - self.at);
            block.narrow(0, self.at, n).copy_(&src.narrow(0, done, n));
            pieces.push((self.block, self.at, n));
            (done, self.at) = (done + n, self.at + n);
            if self.at == block.numel() as i64 {
                (self.block, self.at) = (self.block + 1, 0);
            }
        }
        pieces
    }
}

/// Stages this rank's slices in file order: those on a GPU are copied into the staging blocks
/// (returning when the copies are done), those in host memory are taken as they are.
fn stage(params: &ShardedParams, slices: &[(UnitSlice, State)], staging: &Staging) -> Vec<Part> {
    let mut cursor = Cursor::default();
    slices
        .iter()
        .map(|(s, state)| {
            let Some(src) = params.memory_state(s.id, *state) else {
                let disk = params.disk_shard(s.id).expect("a unit not in memory is on disk");
                return Part::Disk(disk.reader(), *state, s.offset, s.len);
            };
            let src = src.narrow(0, s.offset, s.len);
            match src.device() {
                Device::Cpu => Part::Live(src),
                _ => Part::Staged(cursor.copy(&src, &staging.blocks)),
            }
        })
        .collect()
}

/// Elements of this rank's slices whose state is on a GPU: what an asynchronous save stages.
fn staged_elements(params: &ShardedParams, slices: &[(UnitSlice, State)]) -> i64 {
    slices
        .iter()
        .filter(|(s, state)| params.memory_state(s.id, *state).is_some_and(|t| t.device() != Device::Cpu))
        .map(|(s, _)| s.len)
        .sum()
}

/// The background writer of an asynchronous save: every part in file order, then fsync.
fn write_staged(file: &Path, layout: &Layout, staging: &Staging, parts: &[Part]) -> Result<Written, CheckpointError> {
    let mut w = Writer::create(file, layout)?;
    for part in parts {
        match part {
            Part::Staged(pieces) => {
                for &(b, start, len) in pieces {
                    w.write_tensor(&staging.blocks[b].narrow(0, start, len))?;
                }
            }
            Part::Live(t) => w.write_tensor(t)?,
            Part::Disk(disk, state, at, len) => disk.read_chunks(state.region(), *at, *len, |t| w.write_tensor(t))?,
        }
    }
    slow_save_for_tests();
    w.finish()
}

/// Test hook for the kill-during-save tests: `ULYSSES_TEST_SLOW_SAVE_MS` pauses every rank after
/// its file's data and before its fsync, so a test can kill the job in the middle of a save.
fn slow_save_for_tests() {
    if let Some(ms) = std::env::var("ULYSSES_TEST_SLOW_SAVE_MS").ok().and_then(|v| v.parse().ok()) {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::Dtype;

    #[test]
    fn staged_slices_span_blocks_and_every_part_is_written_in_file_order() {
        // Three blocks of 5, 5 and 2 elements (GPU state's staging); slices of 3, 6 and 3
        // elements go through them, one host slice is written where it lies.
        let staging =
            Staging { blocks: [5, 5, 2].into_iter().map(|n| Tensor::zeros([n], (Kind::Float, Device::Cpu))).collect() };
        let src = |n: i64, from: f64| Tensor::arange(n, (Kind::Float, Device::Cpu)) + from;
        let (a, b, live, c) = (src(3, 0.0), src(6, 10.0), src(4, 100.0), src(3, 20.0));
        let mut cursor = Cursor::default();
        let parts = vec![
            Part::Staged(cursor.copy(&a, &staging.blocks)),
            Part::Staged(cursor.copy(&b, &staging.blocks)),
            Part::Live(live.shallow_clone()),
            Part::Staged(cursor.copy(&c, &staging.blocks)),
        ];
        assert!(matches!(&parts[1], Part::Staged(p) if p == &[(0, 3, 2), (1, 0, 4)]), "b spans two blocks");
        assert!(matches!(&parts[3], Part::Staged(p) if p == &[(1, 4, 1), (2, 0, 2)]));
        let names = ["a", "b", "live", "c"];
        let layout = Layout::new(names.iter().zip([3, 6, 4, 3]).map(|(n, len)| (n.to_string(), Dtype::F32, vec![len])));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("rank.safetensors");
        assert_eq!(write_staged(&file, &layout, &staging, &parts).unwrap().bytes, layout.file_bytes());
        let back: std::collections::HashMap<String, Tensor> =
            Tensor::read_safetensors(&file).unwrap().into_iter().collect();
        for (name, t) in names.iter().zip([&a, &b, &live, &c]) {
            assert!(back[*name].equal(t), "{name}");
        }
    }
}
