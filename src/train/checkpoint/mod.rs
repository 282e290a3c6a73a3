//! Checkpoints: the model in Hugging Face layout plus the state an exact resume needs, written
//! so that a crash or `kill -9` at any moment leaves every earlier checkpoint intact.
//!
//! ```text
//! RUN_DIR/checkpoints/step-000020/
//!   config.json, model.safetensors | model-0000k-of-0000n.safetensors + index   (fp32, HF names)
//!   optimizer/exp_avg.safetensors, optimizer/exp_avg_sq.safetensors             (fp32, HF names)
//!   run_state.json   experiment.toml   COMPLETE (written last)
//! ```
//! Tensors are saved whole, by Hugging Face name, so the files do not depend on sp, dp or the
//! ZeRO stage; loading re-shards them for whatever layout the resumed job has. A save goes to
//! `step-000020.tmp-<pid>/`, is fsynced, gets its `COMPLETE` marker, and only then is renamed to
//! its final name: a folder without the marker, or with a `.tmp-` name, is never loaded.
mod load;
mod save;
mod state;

pub use load::{load_params, read_state, resolve, restore_loader_state};
pub use save::save;
pub use state::{DataPosition, Layout, RunState, Versions, FORMAT};

use crate::comm::CommError;
use crate::model::weights::WeightsError;
use std::fs::File;
use std::path::{Path, PathBuf};

pub const CHECKPOINTS: &str = "checkpoints";
pub const COMPLETE: &str = "COMPLETE";
pub const RUN_STATE: &str = "run_state.json";
pub const EXPERIMENT: &str = "experiment.toml";
pub const OPTIMIZER: &str = "optimizer";
pub const EXP_AVG: &str = "exp_avg.safetensors";
pub const EXP_AVG_SQ: &str = "exp_avg_sq.safetensors";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path} is not a complete checkpoint (no {COMPLETE} marker: its save did not finish); resume from an earlier one, or use checkpoint.resume = \"auto\"")]
    Incomplete { path: String },
    #[error("{path}: {message}")]
    RunState { path: String, message: String },
    #[error("{path}: {message}")]
    Mismatch { path: String, message: String },
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Comm(#[from] CommError),
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

/// Leftovers of saves that were killed (`.tmp-`) or of a replaced checkpoint (`.old-`). Only
/// one job writes a run directory at a time, so at the start of a save they are all stale.
fn remove_stale(dir: &Path) -> Result<(), CheckpointError> {
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        if name.starts_with("step-") && (name.contains(".tmp-") || name.contains(".old-")) {
            log::info!("removing {} (left by a save that did not finish)", path.display());
            std::fs::remove_dir_all(&path).map_err(io_err(&path))?;
        }
    }
    Ok(())
}

/// Flushes a file or folder to disk, so the marker written after it cannot reach the disk first.
fn fsync(path: &Path) -> Result<(), CheckpointError> {
    File::open(path).and_then(|f| f.sync_all()).map_err(io_err(path))
}

fn fsync_tree(dir: &Path) -> Result<(), CheckpointError> {
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        if path.is_dir() {
            fsync_tree(&path)?;
        } else {
            fsync(&path)?;
        }
    }
    fsync(dir)
}

/// Marks `tmp` complete and renames it to `dest`. A checkpoint already at `dest` (a run resumed
/// from an earlier one reaching the same step) is moved aside first and removed after.
fn publish(tmp: &Path, dest: &Path) -> Result<(), CheckpointError> {
    fsync_tree(tmp)?;
    let marker = tmp.join(COMPLETE);
    std::fs::write(&marker, b"complete\n").map_err(io_err(&marker))?;
    fsync(&marker)?;
    fsync(tmp)?;
    let old = dest.with_extension(format!("old-{}", std::process::id()));
    if dest.exists() {
        std::fs::rename(dest, &old).map_err(io_err(dest))?;
    }
    std::fs::rename(tmp, dest).map_err(io_err(dest))?;
    let parent = dest.parent().unwrap_or(Path::new("."));
    fsync(parent)?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
    }
    Ok(())
}

/// Keeps the newest `keep` complete checkpoints up to `step`, the one just written. Any of a
/// later step belongs to an earlier run that this one replaced (`resume = "none"`, or a resume
/// from an older checkpoint): left there, `resume = "auto"` would pick it up, so it goes too.
fn prune(run_dir: &Path, keep: usize, step: u64) -> Result<(), CheckpointError> {
    let (ours, replaced): (Vec<_>, Vec<_>) = list_complete(run_dir)?.into_iter().partition(|(s, _)| *s <= step);
    for (_, path) in &replaced {
        log::warn!("removing {}: written by an earlier run that this one replaced", path.display());
    }
    let old = ours.len().saturating_sub(keep);
    for (_, path) in ours.iter().take(old).chain(&replaced) {
        std::fs::remove_dir_all(path).map_err(io_err(path))?;
    }
    Ok(())
}

/// Points `RUN_DIR/final` at the checkpoint of the last step (a relative symlink, replaced
/// atomically), so the finished model has a stable path without a second copy.
pub fn link_final(run_dir: &Path, checkpoint: &Path) -> Result<(), CheckpointError> {
    let target = Path::new(CHECKPOINTS).join(checkpoint.file_name().unwrap_or_default());
    let link = run_dir.join("final");
    let tmp = run_dir.join(format!("final.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&target, &tmp).map_err(io_err(&tmp))?;
    if link.is_dir() && !link.is_symlink() {
        // A folder left by an older ulysses, which saved a copy there.
        std::fs::remove_dir_all(&link).map_err(io_err(&link))?;
    }
    std::fs::rename(&tmp, &link).map_err(io_err(&link))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_published_names_parse() {
        assert_eq!(parse_step("step-000020"), Some(20));
        assert_eq!(parse_step("step-1234567"), Some(1234567));
        assert_eq!(parse_step("step-000020.tmp-77"), None);
        assert_eq!(parse_step("step-"), None);
        assert_eq!(parse_step("final"), None);
        assert_eq!(step_dir_name(20), "step-000020");
    }

    #[test]
    fn incomplete_and_stale_folders_are_ignored_then_cleaned() {
        let run = tempfile::tempdir().unwrap();
        let dir = checkpoints_dir(run.path());
        for name in ["step-000010", "step-000020", "step-000030.tmp-5", "step-000040"] {
            std::fs::create_dir_all(dir.join(name)).unwrap();
        }
        std::fs::write(dir.join("step-000010").join(COMPLETE), "").unwrap();
        std::fs::write(dir.join("step-000020").join(COMPLETE), "").unwrap();
        std::fs::write(dir.join("step-000030.tmp-5").join(COMPLETE), "").unwrap();
        let steps: Vec<u64> = list_complete(run.path()).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![10, 20], "step-000040 has no marker, the .tmp- folder is unpublished");
        remove_stale(&dir).unwrap();
        assert!(!dir.join("step-000030.tmp-5").exists());
        prune(run.path(), 1, 20).unwrap();
        assert!(!dir.join("step-000010").exists() && dir.join("step-000020").exists());
        std::fs::write(dir.join("step-000040").join(COMPLETE), "").unwrap();
        std::fs::create_dir_all(dir.join("step-000010")).unwrap();
        std::fs::write(dir.join("step-000010").join(COMPLETE), "").unwrap();
        prune(run.path(), 2, 10).unwrap();
        let steps: Vec<u64> = list_complete(run.path()).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![10], "a run restarted at step 10 drops the later steps of the run it replaced");
    }
}
