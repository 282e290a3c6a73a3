//! Exact resume (real mpirun jobs, CPU, fp32): a run stopped at a checkpoint and resumed has the
//! uninterrupted run's loss sequence, bit for bit in the same layout and within 1e-6 relative in
//! another (sp, dp, ZeRO stage and micro batch all change; sharded sums add in another order).
//! A kill -9 during a save leaves the previous checkpoint loadable and `resume = "auto"` uses it;
//! SIGTERM saves at the next step boundary and exits 0.
mod ckpt_common;
mod common;
use ckpt_common::*;
use ulysses::model::spec::{ModelSpec, Preset};

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
    let full = Exp::new("full", 2, 2, 6, 2);
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
    for (name, sp, dp, zero, micro_batch) in
        [("sp1dp1z0mb2", 1, 1, 0, 2), ("sp4dp1z3mb2", 4, 1, 3, 2), ("sp1dp2z3mb1", 1, 2, 3, 1)]
    {
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

    let exp = Exp::new("killed", 2, 1, 6, 2);
    let run_dir = exp.run_dir(dir);
    // Rank 0 pauses 4 s inside every save, after the model files: kill the job while it is in
    // the save of step 4, the save of step 2 having been published.
    let mut job = exp.spawn(dir, &data, &[("ULYSSES_TEST_SLOW_SAVE_MS", "4000")]);
    wait_for("the save of step 4 to start", || {
        let names = checkpoint_names(&run_dir);
        names.contains(&"step-000002".to_string())
            && names.iter().any(|n| {
                n.starts_with("step-000004.tmp-")
                    && run_dir.join("checkpoints").join(n).join("model.safetensors").exists()
            })
    });
    kill_group(&job, libc::SIGKILL);
    wait_exit(&mut job);
    let names = checkpoint_names(&run_dir);
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names[0] == "step-000002" && names[1].starts_with("step-000004.tmp-"), "{names:?}");
    let spec = ModelSpec::preset(Preset::Tiny);
    ulysses::model::weights::load_hf(
        &run_dir.join("checkpoints/step-000002"),
        &spec,
        tch::Kind::Float,
        tch::Device::Cpu,
    )
    .expect("the previous checkpoint loads");

    let out = exp.train(dir, &data);
    assert!(out.contains("resuming from") && out.contains("step-000002"), "{out}");
    assert_eq!(
        checkpoint_names(&run_dir),
        ["step-000002", "step-000004", "step-000006"],
        "the stale .tmp- folder is removed"
    );
    let (steps, got) = losses(&run_dir);
    assert_eq!(steps, (1..=6).collect::<Vec<u64>>());
    assert_losses("killed and resumed", &expected, &got, 0.0);
}

#[test]
fn sigterm_saves_at_the_next_step_and_exits_zero() {
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
    assert!(status.success(), "exit {status}: {log}");
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
