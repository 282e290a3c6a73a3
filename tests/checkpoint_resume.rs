//! Exact resume (real mpirun jobs, CPU, fp32): a run stopped at a checkpoint and resumed has the
//! uninterrupted run's loss sequence, bit for bit in the same layout and within 1e-6 relative in
//! another (1, 2, 4 and 8 ranks; sp, dp, ZeRO stage and micro batch all change; sharded sums add
//! in another order). A kill -9 during a synchronous or an asynchronous save, or at any of two
//! dozen random moments, leaves every complete checkpoint loadable, `resume = "auto"` resumes
//! from the newest, and every step's metrics row ends up in metrics.h5 exactly once; a damaged
//! newest checkpoint is skipped with a warning. SIGTERM saves at the next step boundary, waits
//! for an asynchronous save in flight, and exits 75 (preempted: resume me).
mod ckpt_common;
mod common;
use ckpt_common::*;
use std::time::{Duration, Instant};

fn assert_losses(what: &str, reference: &[f64], got: &[f64], rel_tol: f64) {
    assert_eq!(reference.len(), got.len(), "{what}: {got:?} vs {reference:?}");
    for (i, (a, b)) in reference.iter().zip(got).enumerate() {
        let rel = (a - b).abs() / a.abs();
        assert!(rel <= rel_tol, "{what}: loss {i} is {b}, uninterrupted {a} (relative {rel:.2e})");
    }
}

#[test]
fn resume_continues_exactly_in_any_layout() {
    let dir = tempfile::tempdir().unwrap();
    let (dir, data) = (dir.path(), synth(dir.path()));
    // Saved asynchronously: what the background writer publishes is the state of its step.
    let full = Exp { asynchronous: Some(true), ..Exp::new("full", 2, 2, 6, 2) };
    full.train(dir, &data);
    let (steps, reference) = losses(&full.run_dir(dir));
    assert_eq!(steps, (1..=6).collect::<Vec<u64>>());
    assert!(reference[5] < reference[0], "the run must learn: {reference:?}");
    assert_eq!(checkpoint_names(&full.run_dir(dir)), ["step-000002", "step-000004", "step-000006"]);

    // Same layout: the run as it was after a stop between steps 5 and 6 (checkpoint 6 never
    // written); metrics rows after step 4 are dropped and recomputed.
    let same = Exp::new("same", 2, 2, 6, 2);
    copy_dir(&full.run_dir(dir), &same.run_dir(dir));
    std::fs::remove_dir_all(same.run_dir(dir).join("checkpoints/step-000006")).unwrap();
    let out = same.train(dir, &data);
    assert!(out.contains("resuming from") && out.contains("step-000004"), "{out}");
    let (steps, got) = losses(&same.run_dir(dir));
    assert_eq!(steps, (1..=6).collect::<Vec<u64>>());
    assert_losses("same layout", &reference, &got, 0.0);

    // Other layouts start from a copy of checkpoint 4 alone.
    for (name, sp, dp, zero, micro_batch) in [
        ("sp1dp1z0mb2", 1, 1, 0, 2),
        ("sp4dp1z3mb2", 4, 1, 3, 2),
        ("sp1dp2z3mb1", 1, 2, 3, 1),
        ("sp4dp2z3mb1", 4, 2, 3, 1),
    ] {
        let exp = Exp { zero, micro_batch, ..Exp::new(name, sp, dp, 6, 2) };
        copy_dir(&full.run_dir(dir).join("checkpoints/step-000004"), &exp.run_dir(dir).join("checkpoints/step-000004"));
        let out = exp.train(dir, &data);
        assert!(out.contains("written by a 4-rank sp=2 dp=2 job"), "{out}");
        let (steps, got) = losses(&exp.run_dir(dir));
        assert_eq!(steps, vec![5, 6], "{name}");
        assert_losses(name, &reference[4..], &got, 1e-6);
    }

    // With the old metrics.h5 too: 2 ranks continue a file of 4 ranks' rows, which keeps its
    // width; the ranks that no longer exist read 0.
    let narrower = Exp::new("narrower", 1, 2, 6, 2);
    copy_dir(&full.run_dir(dir), &narrower.run_dir(dir));
    std::fs::remove_dir_all(narrower.run_dir(dir).join("checkpoints/step-000006")).unwrap();
    narrower.train(dir, &data);
    let (steps, got) = losses(&narrower.run_dir(dir));
    assert_eq!(steps, (1..=6).collect::<Vec<u64>>());
    assert_losses("narrower", &reference, &got, 1e-6);
    let f = hdf5::File::open(narrower.run_dir(dir).join("metrics.h5")).unwrap();
    let host = f.dataset("steps/peak_host_mem").unwrap().read_2d::<u64>().unwrap();
    assert_eq!(host.shape(), [6, 4]);
    assert!(
        host.row(3).iter().all(|&b| b > 0) && host[[5, 1]] > 0 && host[[5, 2]] == 0 && host[[5, 3]] == 0,
        "{host:?}"
    );
}

#[test]
fn kill_9_during_a_save_keeps_the_previous_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (dir, data) = (dir.path(), synth(dir.path()));
    let reference = Exp::new("reference", 2, 1, 6, 2);
    reference.train(dir, &data);
    let (_, expected) = losses(&reference.run_dir(dir));

    for (name, asynchronous) in [("killed_sync", false), ("killed_async", true)] {
        let exp = Exp { asynchronous: Some(asynchronous), ..Exp::new(name, 2, 1, 6, 2) };
        let run_dir = exp.run_dir(dir);
        // Every rank pauses 4 s inside every save, after writing its file and before its fsync:
        // kill the job while it is in the save of step 4 (in the background when asynchronous),
        // the save of step 2 having been published.
        let mut job = exp.spawn(dir, &data, &[("ULYSSES_TEST_SLOW_SAVE_MS", "4000")]);
        wait_for("the save of step 4 to write its files", || {
            let names = checkpoint_names(&run_dir);
            names.contains(&"step-000002".to_string())
                && names.iter().any(|n| {
                    let tmp = run_dir.join("checkpoints").join(n);
                    n.starts_with("step-000004.tmp-")
                        && (0..2).all(|r| tmp.join(format!("rank-0000{r}-of-00002.safetensors")).exists())
                })
        });
        kill_group(&job, libc::SIGKILL);
        wait_exit(&mut job);
        let names = checkpoint_names(&run_dir);
        assert_eq!(names.len(), 2, "{name}: {names:?}");
        assert!(names[0] == "step-000002" && names[1].starts_with("step-000004.tmp-"), "{name}: {names:?}");
        assert_eq!(load_every_complete(&run_dir), [2], "{name}: the previous checkpoint loads");

        let out = exp.train(dir, &data);
        assert!(out.contains("resuming from") && out.contains("step-000002"), "{name}: {out}");
        assert_eq!(
            checkpoint_names(&run_dir),
            ["step-000002", "step-000004", "step-000006"],
            "{name}: the stale .tmp- folder is removed"
        );
        let (steps, got) = losses(&run_dir);
        assert_eq!(steps, (1..=6).collect::<Vec<u64>>(), "{name}");
        assert_losses(name, &expected, &got, 0.0);
    }
}

/// The steps of metrics.h5's rows: each once, in order from 1.
fn assert_rows_once(run_dir: &std::path::Path, what: &str) -> u64 {
    if !run_dir.join("metrics.h5").exists() {
        return 0;
    }
    let (steps, _) = losses(run_dir);
    let last = steps.len() as u64;
    assert_eq!(steps, (1..=last).collect::<Vec<u64>>(), "{what}: metrics.h5 rows");
    last
}

#[test]
fn kill_9_at_random_moments_never_loses_a_step_or_a_checkpoint() {
    const STEPS: usize = 200;
    const TRIALS: usize = 24;
    let dir = tempfile::tempdir().unwrap();
    let (dir, data) = (dir.path(), synth(dir.path()));
    let reference = Exp::new("reference", 2, 1, STEPS, 0);
    reference.train(dir, &data);
    let (_, expected) = losses(&reference.run_dir(dir));

    let trials = Exp::new("trials", 2, 1, STEPS, 1);
    let run_dir = trials.run_dir(dir);
    let mut rng = ulysses::rng::SplitMix64::new(17);
    let (mut in_save, mut killed) = (0, 0);
    while killed < TRIALS {
        // Half the trials save synchronously, half asynchronously; saves pause 40 ms (before
        // their fsyncs) so that a good share of the kills land inside one.
        let exp = Exp { asynchronous: Some(killed % 2 == 1), ..trials.clone() };
        let mut job = exp.spawn(dir, &data, &[("ULYSSES_TEST_SLOW_SAVE_MS", "40")]);
        let start = Instant::now();
        while !exp.log(dir).contains(&format!("/{STEPS} ")) && job.try_wait().unwrap().is_none() {
            assert!(start.elapsed() < Duration::from_secs(120), "trial {killed}: no step:\n{}", exp.log(dir));
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(rng.below(400)));
        if job.try_wait().unwrap().is_some() {
            panic!("trial {killed}: the job ended before the kill (raise STEPS):\n{}", exp.log(dir));
        }
        kill_group(&job, libc::SIGKILL);
        wait_exit(&mut job);
        killed += 1;
        let names = checkpoint_names(&run_dir);
        in_save += names.iter().any(|n| n.contains(".tmp-")) as usize;
        let complete = load_every_complete(&run_dir);
        let rows = assert_rows_once(&run_dir, &format!("after kill {killed}"));
        // A checkpoint is published only after its step's row is on disk.
        assert!(
            complete.last().is_none_or(|&c| rows >= c),
            "kill {killed}: rows up to {rows}, checkpoints {complete:?}"
        );
    }
    assert!(in_save >= 4, "only {in_save} of {TRIALS} kills landed inside a save");
    trials.train(dir, &data);
    let (steps, got) = losses(&run_dir);
    assert_eq!(steps, (1..=STEPS as u64).collect::<Vec<u64>>());
    assert_losses("killed 24 times", &expected, &got, 0.0);
    println!("{killed} kills, {in_save} inside a save");
}

#[test]
fn auto_skips_a_damaged_checkpoint_and_says_when_it_starts_over() {
    let dir = tempfile::tempdir().unwrap();
    let (dir, data) = (dir.path(), synth(dir.path()));
    let exp = Exp::new("damaged", 2, 1, 4, 2);
    exp.train(dir, &data);
    let run_dir = exp.run_dir(dir);
    let (_, expected) = losses(&run_dir);
    let truncate = |step: &str| {
        let path = run_dir.join("checkpoints").join(step).join("rank-00001-of-00002.safetensors");
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(100).unwrap();
    };
    // The newest checkpoint still has its COMPLETE marker, but a file of it is truncated.
    truncate("step-000004");
    let out = exp.train(dir, &data);
    assert!(out.contains("cannot load checkpoint") && out.contains("rank-00001-of-00002.safetensors"), "{out}");
    assert!(out.contains("skipping") && out.contains("step-000004"), "{out}");
    assert!(out.contains("resuming from") && out.contains("step-000002 (step 2"), "{out}");
    let (steps, got) = losses(&run_dir);
    assert_eq!(steps, vec![1, 2, 3, 4]);
    assert_losses("resumed from the older checkpoint", &expected, &got, 0.0);

    // Every checkpoint damaged: the run starts over and says so.
    truncate("step-000002");
    truncate("step-000004");
    let out = exp.train(dir, &data);
    assert!(
        out.contains("no checkpoint in") && out.contains("can be read") && out.contains("starting from the beginning"),
        "{out}"
    );
    let (steps, got) = losses(&run_dir);
    assert_eq!(steps, vec![1, 2, 3, 4]);
    assert_losses("started over", &expected, &got, 0.0);

    // No checkpoint at all: said too.
    let fresh = Exp::new("fresh", 2, 1, 1, 0);
    let out = fresh.train(dir, &data);
    assert!(out.contains("no checkpoint in") && out.contains("starting from the beginning"), "{out}");
}

#[test]
fn sigterm_saves_at_the_next_step_and_exits_75() {
    let dir = tempfile::tempdir().unwrap();
    let (dir, data) = (dir.path(), synth(dir.path()));
    let reference = Exp::new("reference", 2, 1, 60, 0);
    reference.train(dir, &data);
    let (_, expected) = losses(&reference.run_dir(dir));

    let exp = Exp::new("preempted", 2, 1, 60, 0);
    let mut job = exp.spawn(dir, &data, &[]);
    wait_for("step 3", || exp.log(dir).contains("step     3/60"));
    // mpirun forwards SIGTERM (and SIGUSR1) to the ranks, as Slurm signals a job step's tasks.
    // SAFETY: plain syscall on the mpirun this test started.
    unsafe { libc::kill(job.id() as i32, libc::SIGTERM) };
    let status = wait_exit(&mut job);
    let log = exp.log(dir);
    // 75 (EX_TEMPFAIL): stopped at a checkpoint, to be resumed; 0 would say the run is complete.
    assert_eq!(status.code(), Some(75), "exit {status}: {log}");
    assert!(log.contains("preempted"), "{log}");
    let names = checkpoint_names(&exp.run_dir(dir));
    assert_eq!(names.len(), 1, "{names:?}");
    let stopped: u64 = names[0].trim_start_matches("step-").parse().unwrap();
    assert!((3..60).contains(&stopped), "stopped at step {stopped}");
    assert!(!exp.run_dir(dir).join("final").exists(), "an unfinished run has no final model");

    let out = exp.train(dir, &data);
    assert!(out.contains(&format!("step {:>5}/60", stopped + 1)), "{out}");
    let (steps, got) = losses(&exp.run_dir(dir));
    assert_eq!(steps, (1..=60).collect::<Vec<u64>>());
    assert_losses("preempted and resumed", &expected, &got, 0.0);
    assert!(exp.run_dir(dir).join("final/model.safetensors").exists());
}

#[test]
fn sigterm_waits_for_an_asynchronous_save_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let (dir, data) = (dir.path(), synth(dir.path()));
    let reference = Exp::new("reference", 2, 1, 40, 0);
    reference.train(dir, &data);
    let (_, expected) = losses(&reference.run_dir(dir));

    // Asynchronous saves every 2 steps that each take 1.5 s to write: one is in flight when the
    // signal comes.
    let exp = Exp { asynchronous: Some(true), ..Exp::new("preempted", 2, 1, 40, 2) };
    let mut job = exp.spawn(dir, &data, &[("ULYSSES_TEST_SLOW_SAVE_MS", "1500")]);
    let run_dir = exp.run_dir(dir);
    wait_for("an asynchronous save in flight", || {
        checkpoint_names(&run_dir).iter().any(|n| n.contains(".tmp-")) && exp.log(dir).contains("step     3/40")
    });
    // SAFETY: plain syscall on the mpirun this test started.
    unsafe { libc::kill(job.id() as i32, libc::SIGTERM) };
    let status = wait_exit(&mut job);
    let log = exp.log(dir);
    assert!(status.code() == Some(75) && log.contains("preempted"), "exit {status}: {log}");
    let names = checkpoint_names(&run_dir);
    assert!(names.iter().all(|n| !n.contains(".tmp-")), "every save finished before exit 0: {names:?}");
    let complete = load_every_complete(&run_dir);
    let stopped: u64 = log.split("stopped after step ").nth(1).unwrap().split(';').next().unwrap().parse().unwrap();
    assert_eq!(complete.last(), Some(&stopped), "{names:?}");
    assert!(complete.len() >= 2, "the save in flight was published too: {complete:?}");

    let out = exp.train(dir, &data);
    assert!(out.contains(&format!("step {:>5}/40", stopped + 1)), "{out}");
    let (steps, got) = losses(&run_dir);
    assert_eq!(steps, (1..=40).collect::<Vec<u64>>());
    assert_losses("preempted during an asynchronous save and resumed", &expected, &got, 0.0);
}
