//! A save that cannot be written (a file-size limit, a full disk, an unwritable folder) stops
//! the run with a clear error naming the file and the reason, synchronously or asynchronously;
//! the checkpoint before it and metrics.h5 are untouched, and once the cause is gone the same
//! command resumes and finishes with every step exactly once.
mod ckpt_common;
mod common;
use ckpt_common::*;
use common::*;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

/// Runs the experiment under mpirun with every file it writes limited to `max_file` bytes
/// (RLIMIT_FSIZE, inherited by mpirun's proxies and the ranks).
fn train_with_file_limit(exp: &Exp, dir: &Path, data: &Path, max_file: u64) -> Output {
    let path = exp.write(dir, data);
    let mut c = Command::new(MPIRUN);
    c.arg("-n").arg(exp.ranks().to_string()).arg(BIN).arg(&path).current_dir(dir);
    // SAFETY: setrlimit is async-signal-safe, and the closure touches nothing else.
    unsafe {
        c.pre_exec(move || {
            let limit = libc::rlimit { rlim_cur: max_file, rlim_max: max_file };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    run_with_timeout(c, Duration::from_secs(300))
}

/// `run_dir` as the reference run was after step 2 (its metrics.h5 and checkpoint 2, not its
/// later checkpoints and final export): resumed, it drops the rows after step 2 and trains on.
fn as_after_step_2(reference: &Path, run_dir: &Path) {
    copy_dir(&reference.join("checkpoints/step-000002"), &run_dir.join("checkpoints/step-000002"));
    std::fs::copy(reference.join("metrics.h5"), run_dir.join("metrics.h5")).unwrap();
}

/// A model whose rank files (32 MB) are larger than the file-size limit MPI's shared-memory
/// transport needs at start-up (a few MB).
fn larger_model(dir: &Path) -> String {
    let config = serde_json::json!({
        "model_type": "llama", "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 704,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
        "tie_word_embeddings": false, "bos_token_id": 256, "eos_token_id": 257
    });
    std::fs::write(dir.join("larger.json"), config.to_string()).unwrap();
    format!("config = \"{}\"", dir.join("larger.json").display())
}

/// The state a failed save must leave: the checkpoint of step 2 complete and loadable, nothing
/// else published, and metrics.h5 readable with each step once.
fn assert_nothing_damaged(run_dir: &Path, what: &str) {
    assert_eq!(load_every_complete(run_dir), [2], "{what}");
    let (steps, _) = losses(run_dir);
    assert!(steps.len() >= 2 && steps == (1..=steps.len() as u64).collect::<Vec<_>>(), "{what}: {steps:?}");
}

#[test]
fn a_save_that_cannot_be_written_stops_the_run_and_damages_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (dir, data) = (dir.path(), synth(dir.path()));
    let model = larger_model(dir);
    let reference = Exp { model: model.clone(), ..Exp::new("reference", 2, 1, 6, 2) };
    reference.train(dir, &data);
    let (_, expected) = losses(&reference.run_dir(dir));
    let rank_file =
        std::fs::metadata(reference.run_dir(dir).join("checkpoints/step-000002/rank-00000-of-00002.safetensors"))
            .unwrap()
            .len();
    assert!(rank_file > 24 << 20, "{rank_file}");

    for (name, asynchronous) in [("limit_sync", false), ("limit_async", true)] {
        let exp = Exp { asynchronous: Some(asynchronous), model: model.clone(), ..Exp::new(name, 2, 1, 6, 2) };
        let run_dir = exp.run_dir(dir);
        as_after_step_2(&reference.run_dir(dir), &run_dir);
        // Every file may grow to half a rank file: the next save's files cannot be written.
        let o = train_with_file_limit(&exp, dir, &data, rank_file / 2);
        let out = assert_clean_failure(&o);
        assert!(
            out.contains("checkpoint of step 4") && out.contains("rank-0000") && out.contains("File too large"),
            "{name}: {out}"
        );
        assert_nothing_damaged(&run_dir, name);
        // The limit gone, the same command continues from step 2 and ends as the reference.
        let out = exp.train(dir, &data);
        assert!(out.contains("resuming from") && out.contains("step-000002"), "{name}: {out}");
        let (steps, got) = losses(&run_dir);
        assert_eq!(steps, (1..=6).collect::<Vec<u64>>(), "{name}");
        assert_eq!(got, expected, "{name}");
    }

    // An unwritable checkpoints folder (immutable: root ignores permission bits).
    let exp = Exp { model: model.clone(), ..Exp::new("unwritable", 2, 1, 6, 2) };
    let run_dir = exp.run_dir(dir);
    as_after_step_2(&reference.run_dir(dir), &run_dir);
    let folder = run_dir.join("checkpoints");
    set_writable(&folder, false);
    let o = mpirun(2, &[exp.write(dir, &data).to_str().unwrap()], dir, &[]);
    set_writable(&folder, true);
    let out = assert_clean_failure(&o);
    assert!(out.contains("checkpoint of step 4") && out.contains("step-000004.tmp-"), "{out}");
    assert!(out.contains("Operation not permitted") || out.contains("Permission denied"), "{out}");
    assert_nothing_damaged(&run_dir, "unwritable");
    exp.train(dir, &data);
    assert_eq!(losses(&run_dir).1, expected);
}

/// Makes `dir` unwritable even for root (chattr +i), or writable again; checks that it took.
fn set_writable(dir: &Path, writable: bool) {
    let flag = if writable { "-i" } else { "+i" };
    let chattr = Command::new("chattr").arg(flag).arg(dir).status().is_ok_and(|s| s.success());
    if !chattr {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(if writable { 0o755 } else { 0o555 })).unwrap();
    }
    let probe = dir.join(".probe");
    let can_write = std::fs::write(&probe, "").is_ok();
    let _ = std::fs::remove_file(&probe);
    assert_eq!(
        can_write,
        writable,
        "could not make {} {}writable here",
        dir.display(),
        if writable { "" } else { "un" }
    );
}

/// A full disk: the run folder on a small tmpfs (needs root, as the tests have here and in CI).
#[test]
fn a_full_disk_stops_the_run_and_damages_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (dir, data) = (dir.path(), synth(dir.path()));
    let reference = Exp::new("reference", 2, 1, 6, 2);
    reference.train(dir, &data);
    let (_, expected) = losses(&reference.run_dir(dir));
    let step2 = reference.run_dir(dir).join("checkpoints/step-000002");
    let used: u64 = std::fs::read_dir(&step2).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();

    let exp = Exp::new("full_disk", 2, 1, 6, 2);
    std::fs::create_dir_all(exp.run_dir(dir)).unwrap();
    // Room for checkpoint 2, metrics.h5 and a little more, not for a second checkpoint.
    let mount = TmpfsGuard::mount(&exp.run_dir(dir), used + used / 2);
    as_after_step_2(&reference.run_dir(dir), &exp.run_dir(dir));
    let o = mpirun(2, &[exp.write(dir, &data).to_str().unwrap()], dir, &[]);
    let out = assert_clean_failure(&o);
    assert!(out.contains("No space left on device") && out.contains("checkpoint of step 4"), "{out}");
    assert_nothing_damaged(&exp.run_dir(dir), "full disk");
    // Room again: copied out of the small disk, the run continues there.
    let saved = dir.join("saved");
    copy_dir(&exp.run_dir(dir), &saved);
    drop(mount);
    std::fs::remove_dir_all(exp.run_dir(dir)).unwrap();
    copy_dir(&saved, &exp.run_dir(dir));
    exp.train(dir, &data);
    assert_eq!(losses(&exp.run_dir(dir)).1, expected);
}

/// A tmpfs of `bytes` mounted on `dir`, unmounted on drop.
struct TmpfsGuard(std::path::PathBuf);

impl TmpfsGuard {
    fn mount(dir: &Path, bytes: u64) -> TmpfsGuard {
        let size = format!("size={}k", bytes.div_ceil(1024).max(64));
        let o = Command::new("mount").args(["-t", "tmpfs", "-o", &size, "tmpfs"]).arg(dir).output().unwrap();
        assert!(o.status.success(), "mounting a tmpfs (the tests run as root): {}", String::from_utf8_lossy(&o.stderr));
        TmpfsGuard(dir.to_path_buf())
    }
}

impl Drop for TmpfsGuard {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}
