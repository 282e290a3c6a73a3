//! metrics.h5: one row per optimizer step, written by rank 0 and flushed every step so a crash
//! loses at most the step in flight; per-position loss every M steps; the time split of measured
//! steps. Schema (version 5) in docs/metrics.md; every dataset also carries its meaning and unit
//! in a `description` attribute.
//!
//! The file is written in HDF5's SWMR mode (single writer, multiple readers): every dataset and
//! attribute exists before the first step, rows are only appended, and readers that open it in
//! SWMR mode (`h5py.File(path, "r", swmr=True)`, `ulysses report`) see a consistent file while the
//! run writes it, with HDF5's file locking left on. The same rows can also go to TensorBoard event
//! files (`metrics.tensorboard`, `super::tensorboard`).
use super::profile::{KernelSplit, StepProfile};
use super::row::StepRow;
use super::tensorboard::Events;
use crate::h5::{append_1d, append_row, append_rows, open_live, write_scalar_attr, write_text_attr};
use anyhow::{Context, Result};
use hdf5::file::LibraryVersion;
use hdf5::types::VarLenUnicode;
use ndarray::{s, Array2};
use std::path::{Path, PathBuf};

pub const SCHEMA_VERSION: u32 = 5;

/// (name, description) of the float64 columns of /steps, in `f64_values` order.
pub const F64_COLUMNS: &[(&str, &str)] = &[
    ("loss", "mean cross-entropy over every valid label of the step (all ranks), nats"),
    (
        "eval_loss",
        "mean cross-entropy over the held-out set's valid labels after this step's update (data.eval_paths, \
         train.eval_every), nats; NaN on steps without one",
    ),
    ("lr", "learning rate used by this step"),
    ("grad_norm", "global L2 norm of the gradient before clipping"),
    ("step_time", "wall time of the step, seconds (checkpoint saves excluded)"),
    ("tokens_per_s", "tokens / step_time, whole job"),
    (
        "tflops",
        "causal model TFLOP/s per rank (Megatron convention: 6·N·T + causal attention within documents, no recompute)",
    ),
    ("mfu", "tflops / the device's peak dense bf16 TFLOP/s (attribute peak_tflops); NaN when no peak is known"),
    ("tflops_alst", "TFLOP/s per rank in the ALST-paper convention (8·N·T + 16·L·h·s², non-causal, recompute)"),
    ("mfu_alst", "tflops_alst / peak_tflops; NaN when no peak is known"),
    ("time_data", "seconds waiting for data"),
    ("time_forward", "seconds in the forward (with the tiled loss and its backward)"),
    ("time_backward", "seconds in the layer-wise backward"),
    ("time_optimizer", "seconds in grad norm, clipping and AdamW"),
    ("time_eval", "seconds evaluating the held-out set after the update (not in step_time; 0 if none)"),
    (
        "time_checkpoint",
        "seconds the step waited for checkpoints after its update: a save (an asynchronous one: its staging copy), \
         waiting for and publishing an earlier asynchronous save, the final export (0 if none)",
    ),
];
pub const U64_COLUMNS: &[(&str, &str)] = &[
    ("step", "optimizer step, 1-based"),
    ("tokens", "tokens processed in the step, whole job"),
    ("trained_tokens", "labels the step's loss was taken over (not ignored), whole job"),
    ("eval_tokens", "valid labels of the held-out set when it was evaluated at this step, else 0"),
    ("documents", "documents attention ran over in the step, whole job (samples when data.documents = \"ignore\")"),
];
pub const RANK_COLUMNS: &[(&str, &str)] = &[
    (
        "peak_host_mem",
        "[step, rank] peak resident host memory (VmHWM) of each rank so far, bytes; 0 = no such rank in this row",
    ),
    ("peak_gpu_mem", "[step, rank] peak allocated GPU memory of each rank so far, bytes; 0 on CPU runs"),
];

fn f64_values(r: &StepRow) -> [f64; 16] {
    let t = &r.times;
    [
        r.loss,
        r.eval_loss,
        r.lr,
        r.grad_norm,
        r.step_time,
        r.tokens_per_s,
        r.tflops,
        r.mfu,
        r.tflops_alst,
        r.mfu_alst,
        t.data,
        t.forward,
        t.backward,
        t.optimizer,
        t.eval,
        r.checkpoint_time,
    ]
}

/// (name, description) of the float64 columns of /time_split (one row per measured step), in
/// `split_values` order.
pub const SPLIT_COLUMNS: &[(&str, &str)] = &[
    ("attention", "seconds in attention kernels (synchronised wall clock)"),
    ("compute", "seconds in other compute (synchronised wall clock)"),
    ("comm", "seconds moving data in collectives (synchronised wall clock)"),
    ("wait", "seconds waiting for the slowest rank before collectives"),
    ("kernel_matmul", "GPU seconds in matrix-product kernels (libtorch's profiler; NaN on CPU)"),
    ("kernel_attention", "GPU seconds in fused attention kernels (NaN on CPU)"),
    ("kernel_elementwise", "GPU seconds in other compute kernels: element-wise, norms, reductions, loss (NaN on CPU)"),
    ("kernel_copy", "GPU seconds in copies and memsets (NaN on CPU)"),
    ("kernel_comm", "GPU seconds in NCCL kernels (NaN on CPU)"),
];

/// (name, description) of the float64 columns of /time_split/phases (one row per phase of each
/// measured step).
pub const PHASE_COLUMNS: &[(&str, &str)] = &[
    ("wall", "seconds from the phase's start to its end (synchronised)"),
    ("matmul", "GPU seconds in matrix-product kernels"),
    ("attention", "GPU seconds in fused attention kernels"),
    ("elementwise", "GPU seconds in other compute kernels"),
    ("copy", "GPU seconds in copies and memsets"),
    ("comm", "GPU seconds in NCCL kernels"),
];

fn split_values(p: &StepProfile) -> [f64; 9] {
    let s = &p.split;
    let k = p.kernels.unwrap_or(KernelSplit {
        matmul: f64::NAN,
        attention: f64::NAN,
        elementwise: f64::NAN,
        copy: f64::NAN,
        comm: f64::NAN,
    });
    [s.attention, s.compute, s.comm, s.wait, k.matmul, k.attention, k.elementwise, k.copy, k.comm]
}

/// What the file records about the run.
pub struct RunInfo<'a> {
    /// The resolved experiment (`Experiment::to_toml`).
    pub config_toml: &'a str,
    pub world_size: usize,
    /// The MFU denominator, when the device's peak is known (`flops::peak_tflops`).
    pub peak_tflops: Option<f64>,
    pub bin_starts: &'a [u64],
    /// Folder for TensorBoard event files, when `metrics.tensorboard` is on.
    pub tensorboard: Option<PathBuf>,
    /// What the per-position loss bins by.
    pub position_by: crate::config::PositionBy,
}

pub struct MetricsWriter {
    file: hdf5::File,
    path: PathBuf,
    world: usize,
    events: Option<Events>,
    bin_starts: Vec<u64>,
}

fn describe(ds: &hdf5::Dataset, what: &str) -> Result<()> {
    Ok(write_text_attr(ds, "description", what)?)
}

impl MetricsWriter {
    /// A new file, or, when resuming after step `resume_step`, a new file holding the old one's
    /// rows up to that step (the later ones are about to be recomputed), which then replaces it.
    /// An unreadable old file (a crash mid-write) is moved aside to `metrics.h5.broken`.
    pub fn open(path: &Path, info: &RunInfo, resume_step: Option<u64>) -> Result<MetricsWriter> {
        let kept = match (resume_step, path.exists()) {
            (Some(step), true) => match Kept::read(path, step, info.bin_starts.len()) {
                Ok(kept) => Some(kept),
                Err(e) => {
                    let aside = path.with_extension("h5.broken");
                    log::warn!(
                        "cannot continue {} ({e:#}); moving it to {} and starting a new file",
                        path.display(),
                        aside.display()
                    );
                    std::fs::rename(path, &aside).with_context(|| format!("moving {} aside", path.display()))?;
                    None
                }
            },
            _ => None,
        };
        let (file, world) = Self::create(path, info, kept.as_ref())?;
        let events = match &info.tensorboard {
            Some(dir) => {
                Some(Events::create(dir, "train").with_context(|| format!("TensorBoard events in {}", dir.display()))?)
            }
            None => None,
        };
        Ok(MetricsWriter { file, path: path.to_path_buf(), world, events, bin_starts: info.bin_starts.to_vec() })
    }

    /// Writes the complete file next to `path`, switches it to SWMR writing and moves it into
    /// place, so a reader finds either the old file or the new one, never a half-made one.
    fn create(path: &Path, info: &RunInfo, kept: Option<&Kept>) -> Result<(hdf5::File, usize)> {
        let fresh = path.with_extension("h5.new");
        crate::files::clear(&fresh).with_context(|| format!("removing {}", fresh.display()))?;
        // SWMR needs the HDF5 1.10 file format; capping it there keeps the file readable by every
        // h5py and HDF5 tool from 1.10 on.
        let file = hdf5::File::with_options()
            .with_fapl(|p| p.libver_bounds(LibraryVersion::V110, LibraryVersion::V110))
            .create_excl(&fresh)
            .with_context(|| format!("creating {}", fresh.display()))?;
        let steps = file.create_group("steps")?;
        for (name, what) in F64_COLUMNS {
            describe(&steps.new_dataset::<f64>().chunk(256).shape(0..).create(*name)?, what)?;
        }
        for (name, what) in U64_COLUMNS {
            describe(&steps.new_dataset::<u64>().chunk(256).shape(0..).create(*name)?, what)?;
        }
        let w = info.world_size.max(kept.map_or(1, Kept::width));
        for (name, what) in RANK_COLUMNS {
            describe(&steps.new_dataset::<u64>().chunk((64, w)).shape((0.., 0..)).create(*name)?, what)?;
        }
        let pos = file.create_group("position_loss")?;
        let bins = info.bin_starts.len();
        describe(
            &pos.new_dataset::<u64>().chunk(64).shape(0..).create("step")?,
            "steps at which the per-position loss was measured",
        )?;
        describe(
            &pos.new_dataset::<f64>().chunk((16, bins)).shape((0.., bins)).create("loss")?,
            "[row, bin] mean token loss of the bin over all ranks; NaN = no valid label",
        )?;
        describe(
            &pos.new_dataset::<u64>().chunk((16, bins)).shape((0.., bins)).create("tokens")?,
            "[row, bin] valid labels in the bin",
        )?;
        describe(
            &pos.new_dataset_builder().with_data(info.bin_starts).create("bin_start")?,
            "first position of each bin (in the sample, or in the document: attribute position_by)",
        )?;
        let split = file.create_group("time_split")?;
        describe(
            &split.new_dataset::<u64>().chunk(64).shape(0..).create("step")?,
            "measured steps (metrics.time_split_every)",
        )?;
        for (name, what) in SPLIT_COLUMNS {
            describe(&split.new_dataset::<f64>().chunk(64).shape(0..).create(*name)?, what)?;
        }
        let phases = split.create_group("phases")?;
        describe(&phases.new_dataset::<u64>().chunk(256).shape(0..).create("step")?, "the measured step")?;
        describe(
            &phases.new_dataset::<VarLenUnicode>().chunk(256).shape(0..).create("phase")?,
            "the phase: \"forward layer 3 / attention\", \"head and loss\", ... (nested phases joined by ' / ')",
        )?;
        for (name, what) in PHASE_COLUMNS {
            describe(&phases.new_dataset::<f64>().chunk(256).shape(0..).create(*name)?, what)?;
        }
        if let Some(kept) = kept {
            kept.write(&file, w)?;
        }

        let versions = crate::versions::Versions::current();
        write_text_attr(&file, "config_toml", info.config_toml)?;
        write_text_attr(&file, "ulysses_version", &versions.ulysses)?;
        write_text_attr(&file, "tch_version", &versions.tch)?;
        write_text_attr(&file, "libtorch_version", &versions.libtorch)?;
        write_scalar_attr(&file, "schema_version", &SCHEMA_VERSION)?;
        write_scalar_attr(&file, "world_size", &(info.world_size as u64))?;
        write_scalar_attr(&file, "peak_tflops", &info.peak_tflops.unwrap_or(f64::NAN))?;
        write_text_attr(&file, "position_by", info.position_by.name())?;
        file.flush()?;
        // From here on rows are only appended: no new datasets or attributes (SWMR's rule).
        file.start_swmr().with_context(|| format!("starting SWMR writing of {}", fresh.display()))?;
        std::fs::rename(&fresh, path).with_context(|| format!("moving {} to {}", fresh.display(), path.display()))?;
        Ok((file, w))
    }

    /// Appends the step's row (and its TensorBoard scalars) and flushes.
    pub fn append(&mut self, r: &StepRow) -> Result<()> {
        self.write_row(r).with_context(|| format!("writing step {}'s row to {}", r.step, self.path.display()))
    }

    fn write_row(&mut self, r: &StepRow) -> Result<()> {
        let steps = self.file.group("steps")?;
        for ((name, _), v) in F64_COLUMNS.iter().zip(f64_values(r)) {
            append_1d(&steps.dataset(name)?, &[v])?;
        }
        append_1d(&steps.dataset("step")?, &[r.step])?;
        append_1d(&steps.dataset("tokens")?, &[r.tokens])?;
        append_1d(&steps.dataset("trained_tokens")?, &[r.trained_tokens])?;
        append_1d(&steps.dataset("eval_tokens")?, &[r.eval_tokens])?;
        append_1d(&steps.dataset("documents")?, &[r.documents])?;
        for ((name, _), per_rank) in RANK_COLUMNS.iter().zip([&r.peak_host_mem, &r.peak_gpu_mem]) {
            let mut row = vec![0u64; self.world];
            for (slot, &v) in row.iter_mut().zip(per_rank.iter()) {
                *slot = v;
            }
            append_row(&steps.dataset(name)?, row)?;
        }
        self.file.flush()?;
        if let Some(events) = self.events.as_mut() {
            events.step(r, F64_COLUMNS.iter().map(|(name, _)| *name).zip(f64_values(r)))?;
        }
        Ok(())
    }

    /// The time split of measured step `step`, and its phases.
    pub fn append_time_split(&mut self, step: u64, p: &StepProfile) -> Result<()> {
        self.write_time_split(step, p)
            .with_context(|| format!("writing step {step}'s time split to {}", self.path.display()))
    }

    fn write_time_split(&mut self, step: u64, p: &StepProfile) -> Result<()> {
        let split = self.file.group("time_split")?;
        append_1d(&split.dataset("step")?, &[step])?;
        for ((name, _), v) in SPLIT_COLUMNS.iter().zip(split_values(p)) {
            append_1d(&split.dataset(name)?, &[v])?;
        }
        let phases = split.group("phases")?;
        append_1d(&phases.dataset("step")?, &vec![step; p.phases.len()])?;
        let names: Vec<VarLenUnicode> =
            p.phases.iter().map(|x| x.phase.parse().map_err(|e| anyhow::anyhow!("{e}"))).collect::<Result<_>>()?;
        append_1d(&phases.dataset("phase")?, &names)?;
        let column = |f: fn(&super::profile::PhaseSplit) -> f64| p.phases.iter().map(f).collect::<Vec<f64>>();
        let columns = [
            column(|x| x.wall),
            column(|x| x.kernels.matmul),
            column(|x| x.kernels.attention),
            column(|x| x.kernels.elementwise),
            column(|x| x.kernels.copy),
            column(|x| x.kernels.comm),
        ];
        for ((name, _), values) in PHASE_COLUMNS.iter().zip(columns) {
            append_1d(&phases.dataset(name)?, &values)?;
        }
        self.file.flush()?;
        Ok(())
    }

    /// Flushes the file to disk (fsync): a checkpoint published after this cannot outlive the
    /// rows up to its step, even in a power cut.
    pub fn sync(&self) -> Result<()> {
        self.file.flush().with_context(|| format!("flushing {}", self.path.display()))?;
        std::fs::File::open(&self.path)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("flushing {} to disk", self.path.display()))
    }

    /// Sets `time_checkpoint` of the last row, which is step `step`'s (the row is written before
    /// the step's checkpoint, so that it is on disk first).
    pub fn set_checkpoint_time(&mut self, step: u64, seconds: f64) -> Result<()> {
        self.write_checkpoint_time(step, seconds)
            .with_context(|| format!("writing step {step}'s checkpoint time to {}", self.path.display()))
    }

    fn write_checkpoint_time(&mut self, step: u64, seconds: f64) -> Result<()> {
        let steps = self.file.group("steps")?;
        let rows = steps.dataset("step")?.shape()[0];
        let last: Vec<u64> =
            if rows > 0 { steps.dataset("step")?.read_slice_1d(rows - 1..rows)?.to_vec() } else { Vec::new() };
        anyhow::ensure!(last == [step], "the last row is not step {step}");
        steps.dataset("time_checkpoint")?.write_slice(&[seconds], rows - 1..rows)?;
        self.file.flush()?;
        Ok(())
    }

    pub fn append_positions(&mut self, step: u64, bins: &super::position::PositionBins) -> Result<()> {
        self.write_positions(step, bins)
            .with_context(|| format!("writing step {step}'s per-position loss to {}", self.path.display()))
    }

    fn write_positions(&mut self, step: u64, bins: &super::position::PositionBins) -> Result<()> {
        let pos = self.file.group("position_loss")?;
        append_1d(&pos.dataset("step")?, &[step])?;
        append_row(&pos.dataset("loss")?, bins.loss.clone())?;
        append_row(&pos.dataset("tokens")?, bins.tokens.clone())?;
        self.file.flush()?;
        if let Some(events) = self.events.as_mut() {
            events.positions(step, &self.bin_starts, &bins.loss)?;
        }
        Ok(())
    }
}

/// The rows of an earlier metrics.h5 that a resumed run keeps: those up to the checkpoint's step.
struct Kept {
    f64s: Vec<Vec<f64>>,
    u64s: Vec<Vec<u64>>,
    ranks: Vec<Array2<u64>>,
    position_step: Vec<u64>,
    position_loss: Array2<f64>,
    position_tokens: Array2<u64>,
    /// /time_split: its steps and SPLIT_COLUMNS; /time_split/phases: steps, names, PHASE_COLUMNS.
    split_step: Vec<u64>,
    split: Vec<Vec<f64>>,
    phase_step: Vec<u64>,
    phase: Vec<VarLenUnicode>,
    phases: Vec<Vec<f64>>,
}

impl Kept {
    /// Reads them in SWMR mode, so a file left by a killed job (still marked as being written)
    /// opens too. Per-position rows of another bin count are dropped, with a warning.
    fn read(path: &Path, resume_step: u64, bins: usize) -> Result<Kept> {
        let file = open_live(path)?;
        let version: u32 = file.attr("schema_version")?.read_scalar()?;
        anyhow::ensure!(version == SCHEMA_VERSION, "schema version {version}, not {SCHEMA_VERSION}");
        let upto = |steps: &[u64]| steps.iter().take_while(|&&s| s <= resume_step).count();
        let steps: Vec<u64> = file.dataset("steps/step")?.read_raw()?;
        // A step in flight may have reached some columns and not others: keep whole rows only.
        let mut rows = upto(&steps);
        let column = |name: &str| file.dataset(&format!("steps/{name}"));
        for (name, _) in F64_COLUMNS.iter().chain(U64_COLUMNS).chain(RANK_COLUMNS) {
            rows = rows.min(column(name)?.shape()[0]);
        }
        let f64s = F64_COLUMNS
            .iter()
            .map(|(name, _)| Ok(column(name)?.read_raw::<f64>()?[..rows].to_vec()))
            .collect::<Result<_>>()?;
        let u64s = U64_COLUMNS
            .iter()
            .map(|(name, _)| Ok(column(name)?.read_raw::<u64>()?[..rows].to_vec()))
            .collect::<Result<_>>()?;
        let ranks = RANK_COLUMNS
            .iter()
            .map(|(name, _)| Ok(column(name)?.read_2d::<u64>()?.slice(s![..rows, ..]).to_owned()))
            .collect::<Result<_>>()?;
        let position_step: Vec<u64> = file.dataset("position_loss/step")?.read_raw()?;
        let mut position_loss: Array2<f64> = file.dataset("position_loss/loss")?.read_2d()?;
        let mut position_tokens: Array2<u64> = file.dataset("position_loss/tokens")?.read_2d()?;
        let mut keep = upto(&position_step).min(position_loss.nrows()).min(position_tokens.nrows());
        if position_loss.ncols() != bins {
            log::warn!(
                "{}: the per-position loss had {} bins and now has {bins}; its earlier rows are not kept",
                path.display(),
                position_loss.ncols()
            );
            keep = 0;
            position_loss = Array2::zeros((0, bins));
            position_tokens = Array2::zeros((0, bins));
        }
        // The time split's rows, whole rows only likewise.
        let table = |group: &str, columns: &[(&str, &str)]| -> Result<(Vec<u64>, usize)> {
            let steps: Vec<u64> = file.dataset(&format!("{group}/step"))?.read_raw()?;
            let mut rows = upto(&steps);
            for (name, _) in columns {
                rows = rows.min(file.dataset(&format!("{group}/{name}"))?.shape()[0]);
            }
            Ok((steps[..rows].to_vec(), rows))
        };
        let floats = |group: &str, columns: &[(&str, &str)], rows: usize| -> Result<Vec<Vec<f64>>> {
            columns
                .iter()
                .map(|(name, _)| Ok(file.dataset(&format!("{group}/{name}"))?.read_raw::<f64>()?[..rows].to_vec()))
                .collect()
        };
        let (split_step, split_rows) = table("time_split", SPLIT_COLUMNS)?;
        let (phase_step, phase_rows) = table("time_split/phases", PHASE_COLUMNS)?;
        let phase_rows = phase_rows.min(file.dataset("time_split/phases/phase")?.shape()[0]);
        Ok(Kept {
            f64s,
            u64s,
            ranks,
            position_step: position_step[..keep].to_vec(),
            position_loss: position_loss.slice(s![..keep, ..]).to_owned(),
            position_tokens: position_tokens.slice(s![..keep, ..]).to_owned(),
            split: floats("time_split", SPLIT_COLUMNS, split_rows)?,
            split_step,
            phases: floats("time_split/phases", PHASE_COLUMNS, phase_rows)?,
            phase: file.dataset("time_split/phases/phase")?.read_raw::<VarLenUnicode>()?[..phase_rows].to_vec(),
            phase_step: phase_step[..phase_rows].to_vec(),
        })
    }

    /// Ranks of the widest per-rank table.
    fn width(&self) -> usize {
        self.ranks.iter().map(Array2::ncols).max().unwrap_or(1)
    }

    /// Appends the kept rows to the new file's empty datasets; per-rank tables widen to `width`
    /// with 0 for ranks that did not exist then.
    fn write(&self, file: &hdf5::File, width: usize) -> Result<()> {
        let steps = file.group("steps")?;
        for ((name, _), values) in F64_COLUMNS.iter().zip(&self.f64s) {
            append_1d(&steps.dataset(name)?, values)?;
        }
        for ((name, _), values) in U64_COLUMNS.iter().zip(&self.u64s) {
            append_1d(&steps.dataset(name)?, values)?;
        }
        for ((name, _), table) in RANK_COLUMNS.iter().zip(&self.ranks) {
            let mut wide = Array2::zeros((table.nrows(), width));
            wide.slice_mut(s![.., ..table.ncols()]).assign(table);
            append_rows(&steps.dataset(name)?, wide.view())?;
        }
        let pos = file.group("position_loss")?;
        append_1d(&pos.dataset("step")?, &self.position_step)?;
        append_rows(&pos.dataset("loss")?, self.position_loss.view())?;
        append_rows(&pos.dataset("tokens")?, self.position_tokens.view())?;
        let split = file.group("time_split")?;
        append_1d(&split.dataset("step")?, &self.split_step)?;
        for ((name, _), values) in SPLIT_COLUMNS.iter().zip(&self.split) {
            append_1d(&split.dataset(name)?, values)?;
        }
        let phases = split.group("phases")?;
        append_1d(&phases.dataset("step")?, &self.phase_step)?;
        append_1d(&phases.dataset("phase")?, &self.phase)?;
        for ((name, _), values) in PHASE_COLUMNS.iter().zip(&self.phases) {
            append_1d(&phases.dataset(name)?, values)?;
        }
        Ok(())
    }
}
