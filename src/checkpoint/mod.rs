//! Checkpoints: every rank's shard of the fp32 master weights and Adam moments plus the state an
//! exact resume needs, written by all ranks at once and published so that a crash or `kill -9`
//! at any moment leaves every earlier checkpoint intact (docs/checkpoints.md).
//!
//! ```text
//! RUN_DIR/checkpoints/step-000020/            format 2
//!   rank-00000-of-00004.safetensors ...       rank r's slice of every unit: master, exp_avg, exp_avg_sq
//!   index.json                                units, their tensors (names, shapes, flat offsets), slices
//!   run_state.json  experiment.toml  config.json
//!   COMPLETE                                  written last, before the folder is renamed into place
//! RUN_DIR/final/                              the last step exported for Hugging Face (export.rs), or a
//!                                             LoRA run's adapters as a PEFT folder (adapters.rs)
//! ```
//! A unit's slices do not depend on sp, dp or the ZeRO stage (rank r of W saves the r-th of W
//! equal slices of each flat unit), and a job of any layout reads the byte ranges of its own
//! shards (`index::Source`). Format-1 checkpoints (whole tensors in Hugging Face files, written
//! by rank 0) load the same way.
pub mod adapters;
pub mod bench;
mod commit;
pub mod export;
pub mod format1;
mod index;
mod load;
mod save;
mod state;
mod tensor_file;

pub use index::Source;
pub use load::{load_params, load_trained, load_weights, read_state, resolve_and_load, restore_loader_state, Resumed};
pub use save::Checkpointer;
pub use state::{DataPosition, Layout, RunState, Versions, FORMAT};

use crate::comm::CommError;
use crate::model::weights::WeightsError;
use std::path::{Path, PathBuf};

pub const CHECKPOINTS: &str = "checkpoints";
pub const COMPLETE: &str = "COMPLETE";
pub const RUN_STATE: &str = "run_state.json";
pub const EXPERIMENT: &str = "experiment.toml";
pub const CONFIG: &str = "config.json";
/// The run's finished model, in Hugging Face layout: `RUN_DIR/final`.
pub const FINAL: &str = "final";
/// Format 1's Adam moments, in `optimizer/` next to the Hugging Face model files.
pub const OPTIMIZER: &str = "optimizer";
pub const EXP_AVG: &str = "exp_avg.safetensors";
pub const EXP_AVG_SQ: &str = "exp_avg_sq.safetensors";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path} is not a complete checkpoint (no {COMPLETE} marker: its save did not finish); resume from an earlier one, or use checkpoint.resume = \"auto\"")]
    Incomplete { path: String },
    #[error("{path} is not a readable safetensors file (truncated or corrupt?): {message}")]
    Corrupt { path: String, message: String },
    #[error("{path}: {message}")]
    RunState { path: String, message: String },
    #[error("{path}: has format {found}; this ulysses reads formats 1 and 2 (a newer ulysses wrote it?)")]
    Format { path: String, found: String },
    #[error("{path}: its CRC-32 is {found:08x}, but the checkpoint's index says {expected:08x}: the file was changed or damaged after it was written (or is another rank's file)")]
    Checksum { path: String, expected: u32, found: u32 },
    #[error("{path}: {count} non-finite value(s) in {what}; a checkpoint must hold finite numbers (this one was saved by a ulysses that did not check them, or changed since): resume from an earlier checkpoint")]
    NonFiniteState { path: String, what: String, count: i64 },
    #[error("{0}")]
    NonFinite(String),
    #[error("{path}: {message}")]
    Mismatch { path: String, message: String },
    #[error("checkpoint staging: {0}")]
    Staging(String),
    #[error("the checkpoint of step {step} could not be written: {source}")]
    Failed { step: u64, source: Box<CheckpointError> },
    #[error("{0}")]
    Final(String),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error(transparent)]
    Zero(#[from] crate::parallel::zero::ZeroError),
    #[error(transparent)]
    Disk(#[from] crate::parallel::tiers::DiskError),
}

impl CheckpointError {
    /// Whether the checkpoint itself is unusable (missing, truncated, corrupt or changed files,
    /// non-finite numbers), as
    /// opposed to readable but not for this experiment (another model, seed or format): with
    /// `resume = "auto"` the first kind is skipped for an older checkpoint, the second stops.
    pub fn is_damage(&self) -> bool {
        match self {
            CheckpointError::Io { .. }
            | CheckpointError::Corrupt { .. }
            | CheckpointError::RunState { .. }
            | CheckpointError::Checksum { .. }
            | CheckpointError::NonFiniteState { .. } => true,
            CheckpointError::Weights(w) => matches!(
                w,
                WeightsError::Io { .. }
                    | WeightsError::Corrupt { .. }
                    | WeightsError::NotFound { .. }
                    | WeightsError::Index { .. }
            ),
            _ => false,
        }
    }
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io { path: path.display().to_string(), source }
}

pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join(CHECKPOINTS)
}

pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:06}")
}

/// The step of a published checkpoint folder name (`step-000020`); None for anything else.
fn parse_step(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok())?
}

/// Complete checkpoints of a run, oldest first.
pub fn list_complete(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    let dir = checkpoints_dir(run_dir);
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
        let path = entry.map_err(io_err(&dir))?.path();
        let step = path.file_name().and_then(|n| n.to_str()).and_then(parse_step);
        if let Some(step) = step.filter(|_| path.join(COMPLETE).is_file()) {
            out.push((step, path));
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_published_names_parse() {
        assert_eq!(parse_step("step-000020"), Some(20));
        assert_eq!(parse_step("step-1234567"), Some(1234567));
        assert_eq!(parse_step("step-000020.tmp-77"), None);
        assert_eq!(parse_step("step-000020.old-77"), None);
        assert_eq!(parse_step("step-"), None);
        assert_eq!(parse_step("final"), None);
        assert_eq!(step_dir_name(20), "step-000020");
    }
}
