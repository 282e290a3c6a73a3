//! metrics.h5: one row per optimizer step, written by rank 0 and flushed every step so a crash
//! loses at most the step in flight; per-position loss every M steps; the time split of measured
//! steps. Schema (version 4) in docs/metrics.md; every dataset also carries its meaning and unit
//! in a `description` attribute.
use crate::h5::{append_1d, append_row, write_scalar_attr, write_text_attr};
use crate::train::profile::{KernelSplit, StepProfile};
use anyhow::{Context, Result};
use hdf5::types::VarLenUnicode;
use std::path::Path;

pub const SCHEMA_VERSION: u32 = 4;

/// Wall time of one optimizer step's parts, in seconds. On GPU each part ends with a device
/// synchronize, or kernels still running are billed to the next part.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepTimes {
    /// Waiting for the loader (its prefetch thread should make this ~0).
    pub data: f64,
    /// Embedding, layers and the tiled loss with its own backward (interleaved tile by tile).
    pub forward: f64,
    /// Layer-wise backward with recompute, all-to-alls and gradient reduce-scatters.
    pub backward: f64,
    /// Gradient norm, clipping and AdamW on the local shards.
    pub optimizer: f64,
}

pub struct StepRow {
    pub step: u64,
    pub tokens: u64,
    /// Documents attention ran over in the step, whole job (one per sample when the boundaries
    /// are ignored).
    pub documents: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub step_time: f64,
    pub tokens_per_s: f64,
    pub tflops: f64,
    pub mfu: f64,
    pub tflops_alst: f64,
    pub mfu_alst: f64,
    pub times: StepTimes,
    pub checkpoint_time: f64,
    /// One entry per world rank, bytes.
    pub peak_host_mem: Vec<u64>,
    pub peak_gpu_mem: Vec<u64>,
    /// Activation-store files on local disk, at peak (printed, not in metrics.h5).
    pub peak_disk: Vec<u64>,
}

/// (name, description) of the float64 columns of /steps, in `f64_values` order.
pub const F64_COLUMNS: &[(&str, &str)] = &[
    ("loss", "mean cross-entropy over every valid label of the step (all ranks), nats"),
    ("lr", "learning rate used by this step"),
    ("grad_norm", "global L2 norm of the gradient before clipping"),
    ("step_time", "wall time of the step, seconds (checkpoint saves excluded)"),
    ("tokens_per_s", "tokens / step_time, whole job"),
    (
        "tflops",
        "causal model TFLOP/s per rank (Megatron convention: 6·N·T + causal attention within documents, no recompute)",
    ),
    ("mfu", "tflops / peak dense bf16 TFLOP/s (attribute peak_tflops)"),
    ("tflops_alst", "TFLOP/s per rank in the ALST-paper convention (8·N·T + 16·L·h·s², non-causal, recompute)"),
    ("mfu_alst", "tflops_alst / peak_tflops"),
    ("time_data", "seconds waiting for data"),
    ("time_forward", "seconds in the forward (with the tiled loss and its backward)"),
    ("time_backward", "seconds in the layer-wise backward"),
    ("time_optimizer", "seconds in grad norm, clipping and AdamW"),
    (
        "time_checkpoint",
        "seconds the step waited for checkpoints after its update: a save (an asynchronous one: its staging copy), \
         waiting for and publishing an earlier asynchronous save, the final export (0 if none)",
    ),
];
pub const U64_COLUMNS: &[(&str, &str)] = &[
    ("step", "optimizer step, 1-based"),
    ("tokens", "tokens processed in the step, whole job"),
    ("documents", "documents attention ran over in the step, whole job (samples when data.documents = \"ignore\")"),
];
pub const RANK_COLUMNS: &[(&str, &str)] = &[
    (
        "peak_host_mem",
        "[step, rank] peak resident host memory (VmHWM) of each rank so far, bytes; 0 = no such rank in this row",
    ),
    ("peak_gpu_mem", "[step, rank] peak allocated GPU memory of each rank so far, bytes; 0 on CPU runs"),
];

fn f64_values(r: &StepRow) -> [f64; 14] {
    let t = &r.times;
    [
        r.loss,
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
    pub peak_tflops: f64,
    pub bin_starts: &'a [u64],
    /// What the per-position loss bins by.
    pub position_by: crate::config::PositionBy,
}

pub struct MetricsWriter {
    file: hdf5::File,
    path: std::path::PathBuf,
    world: usize,
}

fn describe(ds: &hdf5::Dataset, what: &str) -> Result<()> {
    Ok(write_text_attr(ds, "description", what)?)
}

impl MetricsWriter {
    /// A new file, or, when resuming after step `resume_step`, the existing one with the rows
    /// after that step removed (they are about to be recomputed). An unreadable old file (a
    /// crash mid-write) is moved aside to `metrics.h5.broken`.
    pub fn open(path: &Path, info: &RunInfo, resume_step: Option<u64>) -> Result<MetricsWriter> {
        if let (Some(step), true) = (resume_step, path.exists()) {
            match Self::reopen(path, info.world_size, step) {
                Ok(w) => return Ok(w),
                Err(e) => {
                    let aside = path.with_extension("h5.broken");
                    log::warn!(
                        "cannot continue {} ({e:#}); moving it to {} and starting a new file",
                        path.display(),
                        aside.display()
                    );
                    std::fs::rename(path, &aside).with_context(|| format!("moving {} aside", path.display()))?;
                }
            }
        }
        Self::create(path, info)
    }

    fn create(path: &Path, info: &RunInfo) -> Result<MetricsWriter> {
        let file = hdf5::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let steps = file.create_group("steps")?;
        for (name, what) in F64_COLUMNS {
            describe(&steps.new_dataset::<f64>().chunk(256).shape(0..).create(*name)?, what)?;
        }
        for (name, what) in U64_COLUMNS {
            describe(&steps.new_dataset::<u64>().chunk(256).shape(0..).create(*name)?, what)?;
        }
        let w = info.world_size.max(1);
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

        let versions = crate::train::checkpoint::Versions::current();
        write_text_attr(&file, "config_toml", info.config_toml)?;
        write_text_attr(&file, "ulysses_version", &versions.ulysses)?;
        write_text_attr(&file, "tch_version", &versions.tch)?;
        write_text_attr(&file, "libtorch_version", &versions.libtorch)?;
        write_scalar_attr(&file, "schema_version", &SCHEMA_VERSION)?;
        write_scalar_attr(&file, "world_size", &(info.world_size as u64))?;
        write_scalar_attr(&file, "peak_tflops", &info.peak_tflops)?;
        write_text_attr(&file, "position_by", info.position_by.name())?;
        file.flush()?;
        Ok(MetricsWriter { file, path: path.to_path_buf(), world: w })
    }

    fn reopen(path: &Path, world: usize, resume_step: u64) -> Result<MetricsWriter> {
        let file = hdf5::File::open_rw(path)?;
        let version: u32 = file.attr("schema_version")?.read_scalar()?;
        anyhow::ensure!(version == SCHEMA_VERSION, "schema version {version}, not {SCHEMA_VERSION}");
        let keep = |group: &str| -> Result<usize> {
            let steps: Vec<u64> = file.dataset(&format!("{group}/step"))?.read_raw()?;
            Ok(steps.iter().take_while(|&&s| s <= resume_step).count())
        };
        let (rows, position_rows) = (keep("steps")?, keep("position_loss")?);
        let (split_rows, phase_rows) = (keep("time_split")?, keep("time_split/phases")?);
        let split = file.group("time_split")?;
        for name in std::iter::once("step").chain(SPLIT_COLUMNS.iter().map(|(n, _)| *n)) {
            split.dataset(name)?.resize(split_rows)?;
        }
        let phases = split.group("phases")?;
        for name in ["step", "phase"].into_iter().chain(PHASE_COLUMNS.iter().map(|(n, _)| *n)) {
            phases.dataset(name)?.resize(phase_rows)?;
        }
        let steps = file.group("steps")?;
        for (name, _) in F64_COLUMNS.iter().chain(U64_COLUMNS) {
            steps.dataset(name)?.resize(rows)?;
        }
        let mut width = world;
        for (name, _) in RANK_COLUMNS {
            let ds = steps.dataset(name)?;
            width = width.max(ds.shape()[1]);
            ds.resize((rows, width))?;
        }
        let pos = file.group("position_loss")?;
        pos.dataset("step")?.resize(position_rows)?;
        for name in ["loss", "tokens"] {
            let ds = pos.dataset(name)?;
            ds.resize((position_rows, ds.shape()[1]))?;
        }
        file.flush()?;
        Ok(MetricsWriter { file, path: path.to_path_buf(), world: width })
    }

    pub fn append(&mut self, r: &StepRow) -> Result<()> {
        let steps = self.file.group("steps")?;
        for ((name, _), v) in F64_COLUMNS.iter().zip(f64_values(r)) {
            append_1d(&steps.dataset(name)?, &[v])?;
        }
        append_1d(&steps.dataset("step")?, &[r.step])?;
        append_1d(&steps.dataset("tokens")?, &[r.tokens])?;
        append_1d(&steps.dataset("documents")?, &[r.documents])?;
        for ((name, _), per_rank) in RANK_COLUMNS.iter().zip([&r.peak_host_mem, &r.peak_gpu_mem]) {
            let mut row = vec![0u64; self.world];
            for (slot, &v) in row.iter_mut().zip(per_rank.iter()) {
                *slot = v;
            }
            append_row(&steps.dataset(name)?, row)?;
        }
        self.file.flush()?;
        Ok(())
    }

    /// The time split of measured step `step`, and its phases.
    pub fn append_time_split(&mut self, step: u64, p: &StepProfile) -> Result<()> {
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
        let column = |f: fn(&crate::train::profile::PhaseSplit) -> f64| p.phases.iter().map(f).collect::<Vec<f64>>();
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
        self.file.flush()?;
        std::fs::File::open(&self.path)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("flushing {} to disk", self.path.display()))
    }

    /// Sets `time_checkpoint` of the last row, which is step `step`'s (the row is written before
    /// the step's checkpoint, so that it is on disk first).
    pub fn set_checkpoint_time(&mut self, step: u64, seconds: f64) -> Result<()> {
        let steps = self.file.group("steps")?;
        let rows = steps.dataset("step")?.shape()[0];
        let last: Vec<u64> =
            if rows > 0 { steps.dataset("step")?.read_slice_1d(rows - 1..rows)?.to_vec() } else { Vec::new() };
        anyhow::ensure!(last == [step], "{}: the last row is not step {step}", self.path.display());
        steps.dataset("time_checkpoint")?.write_slice(&[seconds], rows - 1..rows)?;
        self.file.flush()?;
        Ok(())
    }

    pub fn append_positions(&mut self, step: u64, bins: &crate::train::position::PositionBins) -> Result<()> {
        let pos = self.file.group("position_loss")?;
        append_1d(&pos.dataset("step")?, &[step])?;
        append_row(&pos.dataset("loss")?, bins.loss.clone())?;
        append_row(&pos.dataset("tokens")?, bins.tokens.clone())?;
        self.file.flush()?;
        Ok(())
    }
}
