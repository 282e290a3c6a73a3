//! The optimizer state on every tier (`parallel.offload_optimizer`): a run whose ZeRO units' state
//! is split between memory and disk, or all on disk, trains bit-identically to the run that keeps
//! it all in memory (fp32, clipping on, two micro batches a step, dp = 2); resuming with state on
//! disk, or from a checkpoint the disk tier wrote, is exact; an offload folder that cannot hold
//! the state stops the job before training with one message that names it.
mod ckpt_common;
mod common;
use ckpt_common::*;
use common::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use tch::Tensor;

/// Four steps on sp = 1 × dp = 2, a checkpoint every two, clipping at 0.5 (the tiny model's
/// gradient norm is ~3: every step clips) and two micro batches a step.
fn exp(name: &'static str) -> Exp {
    Exp::new(name, 1, 2, 4, 2)
}

/// The state placements compared, as `--set` overrides (with the shared ones).
fn sets(dir: &Path, tier: &[&str]) -> Vec<String> {
    let off = dir.join("off");
    let mut s: Vec<String> = ["train.clip_grad_norm=0.5", "train.grad_accum=2"].map(String::from).to_vec();
    s.push(format!("memory.offload_dir=\"{}\"", off.display()));
    s.extend(tier.iter().map(|t| t.to_string()));
    s
}

/// Trains `e` with the overrides; returns the job's output.
fn train(e: &Exp, dir: &Path, data: &Path, overrides: &[String]) -> String {
    let file = e.write(dir, data);
    let mut args = vec![file.to_str().unwrap().to_string()];
    for o in overrides {
        args.push("--set".into());
        args.push(o.clone());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = mpirun(e.ranks(), &args, dir, &[("OMP_NUM_THREADS", "1")]);
    assert!(o.status.success(), "{}: {}", e.name, text(&o));
    text(&o)
}

/// Every tensor of a run's final/ model.
fn final_tensors(run_dir: &Path) -> BTreeMap<String, Tensor> {
    let mut out = BTreeMap::new();
    for f in std::fs::read_dir(run_dir.join("final")).unwrap().flatten() {
        if f.path().extension().is_some_and(|e| e == "safetensors") {
            out.extend(Tensor::read_safetensors(f.path()).unwrap());
        }
    }
    assert!(!out.is_empty(), "no weights in {}", run_dir.join("final").display());
    out
}

fn assert_same_model(a: &Path, b: &Path) {
    let (ta, tb) = (final_tensors(a), final_tensors(b));
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
    for (name, t) in &ta {
        assert!(t.equal(&tb[name]), "{name} differs between {} and {}", a.display(), b.display());
    }
    assert_eq!(losses(a), losses(b), "losses of {} and {}", a.display(), b.display());
}

/// The counts of the run's memory-plan line: (units in memory, units on disk).
fn state_counts(log: &str) -> (usize, usize) {
    let line = log.lines().find(|l| l.contains("memory plan: optimizer state of")).unwrap_or_else(|| panic!("{log}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "units").unwrap();
    let on_disk = words.iter().position(|w| *w == "on").unwrap();
    (words[at - 3].parse().unwrap(), words[on_disk - 1].parse().unwrap())
}

/// The state file's units are made in the offload folder and gone at once (unlinked).
fn assert_no_state_files(dir: &Path) {
    let left: Vec<_> =
        std::fs::read_dir(dir.join("off")).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.iter().all(|p| !p.to_string_lossy().contains("ulysses-state")), "left behind: {left:?}");
}

#[test]
fn state_split_between_memory_and_disk_trains_and_resumes_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    let memory = exp("memory");
    let log = train(&memory, dir.path(), &data, &sets(dir.path(), &[]));
    assert_eq!(state_counts(&log), (4, 0), "{log}");
    // 1 MiB for the node, half a MiB a rank: the last units in memory, the first on disk.
    let split = exp("split");
    let log = train(&split, dir.path(), &data, &sets(dir.path(), &["memory.host_gib=0.001"]));
    let (in_memory, on_disk) = state_counts(&log);
    assert!(in_memory > 0 && on_disk > 0, "{log}");
    let disk = exp("disk");
    let log = train(&disk, dir.path(), &data, &sets(dir.path(), &["parallel.offload_optimizer=\"disk\""]));
    assert_eq!(state_counts(&log), (0, 4), "{log}");
    assert_no_state_files(dir.path());
    for e in [&split, &disk] {
        assert_same_model(&memory.run_dir(dir.path()), &e.run_dir(dir.path()));
    }

    // Resumes at step 2: from the disk run's checkpoint with the state split, and from the
    // memory run's with the state on disk.
    for (from, tier) in [(&disk, "memory.host_gib=0.001"), (&memory, "parallel.offload_optimizer=\"disk\"")] {
        let run = from.run_dir(dir.path());
        std::fs::remove_dir_all(run.join("checkpoints").join("step-000004")).unwrap();
        std::fs::remove_dir_all(run.join("final")).unwrap();
        let log = train(from, dir.path(), &data, &sets(dir.path(), &[tier]));
        assert!(log.contains("resuming from") && log.contains("step-000002"), "{log}");
        assert_same_model(&memory.run_dir(dir.path()), &run);
    }
}

#[test]
fn an_offload_folder_that_cannot_hold_the_state_stops_the_job_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    let e = exp("nowhere");
    // A regular file where the folder should be.
    std::fs::write(dir.path().join("off"), "not a folder").unwrap();
    let file = e.write(dir.path(), &data);
    let disk = "parallel.offload_optimizer=\"disk\"";
    let off = format!("memory.offload_dir=\"{}\"", dir.path().join("off").join("state").display());
    let o = mpirun(2, &[file.to_str().unwrap(), "--set", disk, "--set", &off], dir.path(), &[]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert_eq!(t.matches("error:").count(), 1, "one message\n{t}");
    assert!(t.contains("cannot make the optimizer state file") && t.contains("off/state"), "{t}");
    assert!(t.contains("set memory.offload_dir to a writable folder with room"), "{t}");
    assert!(!t.contains("step     1/"), "stopped before training\n{t}");

    assert_no_state_files(dir.path());
}

/// In the child that `a_full_offload_folder_is_an_error_at_start` starts: every file limited to
/// 64 KiB (RLIMIT_FSIZE fails the space's allocation with EFBIG, as a full disk fails it with
/// ENOSPC), the tiny model's shards made on disk as a run makes them; prints the error as the
/// binary would.
fn make_state_on_a_full_disk(dir: &Path) {
    use ulysses::config::ZeroStage;
    use ulysses::model::spec::{ModelSpec, Preset};
    use ulysses::parallel::zero::{ShardedParams, StateTiers};
    use ulysses::plan::memory::Place;
    let limit = libc::rlimit { rlim_cur: 64 << 10, rlim_max: 64 << 10 };
    // SAFETY: plain syscalls on this (single-test) child process; with SIGXFSZ ignored the
    // allocation fails instead of killing the process.
    unsafe {
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let spec = ModelSpec::preset(Preset::Tiny);
    let units = spec.num_hidden_layers as usize + 2;
    let state = StateTiers { places: Some(vec![Place::Disk; units]), device: tch::Device::Cpu, dir: dir.join("off") };
    match ShardedParams::zeroed(&spec, ZeroStage::Sharded, &ulysses::comm::solo::Solo, state) {
        Ok(_) => panic!("the tiny model's state fits in 64 KiB files"),
        Err(e) => println!("error: {}", ulysses::launch::render_error(&anyhow::Error::from(e))),
    }
}

#[test]
fn a_full_offload_folder_is_an_error_at_start() {
    if let Some(dir) = std::env::var_os("ULYSSES_TEST_FULL_STATE") {
        return make_state_on_a_full_disk(Path::new(&dir));
    }
    let dir = tempfile::tempdir().unwrap();
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", "a_full_offload_folder_is_an_error_at_start", "--nocapture"]);
    c.env("ULYSSES_TEST_FULL_STATE", dir.path());
    let o = c.output().unwrap();
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    let line = t.lines().find(|l| l.starts_with("error: ")).unwrap_or_else(|| panic!("{t}"));
    let file = dir.path().join("off").join("ulysses-state-");
    assert!(line.starts_with(&format!("error: cannot make the optimizer state file {}", file.display())), "{line}");
    assert!(line.contains("File too large (os error 27)"), "says what happened: {line}");
    assert!(line.contains("set memory.offload_dir to a writable folder with room"), "what would help: {line}");
    assert_no_state_files(dir.path());
}
