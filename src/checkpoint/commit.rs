//! The file-system side of the commit protocol: a checkpoint becomes visible by one rename of a
//! folder that is already complete on disk, and stops being visible (before any of it is
//! deleted) by one rename out of the way. So `kill -9` at any moment leaves every published
//! checkpoint whole, and nothing half-written or half-deleted ever looks complete.
use super::{checkpoints_dir, io_err, list_complete, CheckpointError, COMPLETE};
use std::fs::File;
use std::path::Path;

/// Flushes a file or folder to disk, so that what is written after it cannot reach the disk first.
pub fn fsync(path: &Path) -> Result<(), CheckpointError> {
    File::open(path).and_then(|f| f.sync_all()).map_err(io_err(path))
}

/// Writes a small file and flushes it to disk.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    crate::files::write(path, bytes).map_err(io_err(path))?;
    fsync(path)
}

/// Whether a checkpoints folder entry is a leftover: a save that did not finish (`.tmp-`), a
/// checkpoint replaced or being deleted (`.old-`).
fn is_leftover(name: &str) -> bool {
    name.starts_with("step-") && (name.contains(".tmp-") || name.contains(".old-"))
}

/// Removes the leftovers of saves and deletions that were interrupted. Only one job writes a run
/// directory at a time, so at the start of a save they are all stale.
pub fn remove_stale(dir: &Path) -> Result<(), CheckpointError> {
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        if is_leftover(&name) {
            log::info!("removing {} (left by a save or deletion that did not finish)", path.display());
            std::fs::remove_dir_all(&path).map_err(io_err(&path))?;
        }
    }
    Ok(())
}

/// Marks `tmp` (whose files are already on disk) complete and renames it to `dest`. A
/// checkpoint already at `dest` (a run resumed from an earlier one reaching the same step) is
/// moved aside first and deleted after.
pub fn publish(tmp: &Path, dest: &Path) -> Result<(), CheckpointError> {
    fsync(tmp)?;
    write_synced(&tmp.join(COMPLETE), b"complete\n")?;
    fsync(tmp)?;
    let parent = dest.parent().unwrap_or(Path::new("."));
    let old = retire_path(dest);
    if dest.exists() {
        std::fs::rename(dest, &old).map_err(io_err(dest))?;
    }
    std::fs::rename(tmp, dest).map_err(io_err(dest))?;
    fsync(parent)?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
    }
    Ok(())
}

/// Where a published folder goes while it is deleted: a name no reader takes for a checkpoint.
fn retire_path(dest: &Path) -> std::path::PathBuf {
    let name = dest.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    dest.with_file_name(format!("{name}.old-{}", std::process::id()))
}

/// Deletes a published checkpoint: first renamed out of the way (and that rename flushed), so a
/// crash in the middle of the deletion leaves a leftover, never a damaged "complete" checkpoint.
pub fn retire(path: &Path) -> Result<(), CheckpointError> {
    let old = retire_path(path);
    std::fs::rename(path, &old).map_err(io_err(path))?;
    fsync(path.parent().unwrap_or(Path::new(".")))?;
    std::fs::remove_dir_all(&old).map_err(io_err(&old))
}

/// Keeps the newest `keep` complete checkpoints up to `step`, the one just written. Any of a
/// later step belongs to an earlier run that this one replaced (`resume = "none"`, or a resume
/// from an older checkpoint): left there, `resume = "auto"` would pick it up, so it goes too.
pub fn prune(run_dir: &Path, keep: usize, step: u64) -> Result<(), CheckpointError> {
    let (ours, replaced): (Vec<_>, Vec<_>) = list_complete(run_dir)?.into_iter().partition(|(s, _)| *s <= step);
    for (_, path) in &replaced {
        log::warn!("removing {}: written by an earlier run that this one replaced", path.display());
    }
    let old = ours.len().saturating_sub(keep);
    for (_, path) in ours.iter().take(old).chain(&replaced) {
        retire(path)?;
    }
    Ok(())
}

/// Creates the checkpoints folder and clears the leftovers in it (rank 0, before a save).
pub fn prepare_dir(run_dir: &Path) -> Result<(), CheckpointError> {
    let dir = checkpoints_dir(run_dir);
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    remove_stale(&dir)
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use super::*;

    #[test]
    fn incomplete_and_stale_folders_are_ignored_then_cleaned() {
        let run = tempfile::tempdir().unwrap();
        let dir = checkpoints_dir(run.path());
        for name in ["step-000010", "step-000020", "step-000030.tmp-5", "step-000040", "step-000050.old-9"] {
            std::fs::create_dir_all(dir.join(name)).unwrap();
        }
        for name in ["step-000010", "step-000020", "step-000030.tmp-5", "step-000050.old-9"] {
            std::fs::write(dir.join(name).join(COMPLETE), "").unwrap();
        }
        let steps: Vec<u64> = list_complete(run.path()).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![10, 20], "step-000040 has no marker, the .tmp-/.old- folders are unpublished");
        remove_stale(&dir).unwrap();
        assert!(!dir.join("step-000030.tmp-5").exists() && !dir.join("step-000050.old-9").exists());
        prune(run.path(), 1, 20).unwrap();
        assert!(!dir.join("step-000010").exists() && dir.join("step-000020").exists());
        std::fs::write(dir.join("step-000040").join(COMPLETE), "").unwrap();
        std::fs::create_dir_all(dir.join("step-000010")).unwrap();
        std::fs::write(dir.join("step-000010").join(COMPLETE), "").unwrap();
        prune(run.path(), 2, 10).unwrap();
        let steps: Vec<u64> = list_complete(run.path()).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![10], "a run restarted at step 10 drops the later steps of the run it replaced");
        let left: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
        assert_eq!(left, vec!["step-000010"], "deleted checkpoints leave nothing behind");
    }

    #[test]
    fn publishing_replaces_a_checkpoint_of_the_same_step() {
        let run = tempfile::tempdir().unwrap();
        let dir = checkpoints_dir(run.path());
        let (tmp, dest) = (dir.join("step-000002.tmp-1"), dir.join("step-000002"));
        for (folder, text) in [(&dest, "old"), (&tmp, "new")] {
            std::fs::create_dir_all(folder).unwrap();
            std::fs::write(folder.join("x"), text).unwrap();
        }
        publish(&tmp, &dest).unwrap();
        assert_eq!(std::fs::read_to_string(dest.join("x")).unwrap(), "new");
        assert!(dest.join(COMPLETE).exists() && !tmp.exists());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    }
}
