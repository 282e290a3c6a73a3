//! Helpers for tests that run the real binary, alone or under mpirun.
#![allow(dead_code)]
pub mod reference;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_ulysses");
pub const MPIRUN: &str = env!("ULYSSES_MPIRUN");
pub const PYTHON: &str = env!("ULYSSES_PYTHON");

/// Runs a command with a deadline; a test never hangs (a hang is a failure with the output so far).
/// Its output is read while it runs: a pipe left unread blocks the child once 64 KiB are waiting
/// (a long training run prints more than that).
pub fn run_with_timeout(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .env("OMP_NUM_THREADS", "1")
        .spawn()
        .expect("spawn");
    let stdout = drain(child.stdout.take().expect("piped stdout"));
    let stderr = drain(child.stderr.take().expect("piped stderr"));
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return Output { status, stdout: collect(stdout), stderr: collect(stderr) };
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "command timed out after {limit:?} (a hang)\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&collect(stdout)),
                String::from_utf8_lossy(&collect(stderr))
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads `pipe` to its end on a thread of its own.
fn drain(mut pipe: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<Vec<u8>> {
    let (send, receive) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        let _ = send.send(bytes);
    });
    receive
}

/// What `drain` read; after a grace period, nothing, should a killed job's orphaned ranks still
/// hold the pipe open.
fn collect(output: std::sync::mpsc::Receiver<Vec<u8>>) -> Vec<u8> {
    output.recv_timeout(Duration::from_secs(30)).unwrap_or_default()
}

pub fn ulysses(args: &[&str], dir: &Path) -> Output {
    let mut c = Command::new(BIN);
    c.args(args).current_dir(dir);
    run_with_timeout(c, Duration::from_secs(300))
}

/// `mpirun -n N ulysses ARGS` in `dir`.
pub fn mpirun(n: usize, args: &[&str], dir: &Path, envs: &[(&str, &str)]) -> Output {
    mpirun_within(n, args, dir, envs, Duration::from_secs(600))
}

/// `mpirun` with a deadline of its own, for the few runs that train for minutes on purpose.
pub fn mpirun_within(n: usize, args: &[&str], dir: &Path, envs: &[(&str, &str)], limit: Duration) -> Output {
    let mut c = Command::new(MPIRUN);
    c.arg("-n").arg(n.to_string()).arg(BIN).args(args).current_dir(dir);
    for (k, v) in envs {
        c.env(k, v);
    }
    run_with_timeout(c, limit)
}

pub fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A user-facing failure: non-zero exit, no panic backtrace.
pub fn assert_clean_failure(o: &Output) -> String {
    let t = text(o);
    assert!(!o.status.success(), "expected failure, got success:\n{t}");
    assert!(!t.contains("panicked at") && !t.contains("RUST_BACKTRACE"), "panic instead of a clear error:\n{t}");
    t
}

/// What a training run left: its loss per step (metrics.h5) and its final parameters by name.
pub type RunOutputs = (Vec<f64>, std::collections::BTreeMap<String, tch::Tensor>);

/// The losses of `run_dir`'s metrics.h5 and the tensors of its `final` checkpoint.
pub fn run_outputs(run_dir: &Path) -> RunOutputs {
    let f = hdf5::File::open(run_dir.join("metrics.h5")).unwrap();
    let losses: Vec<f64> = f.dataset("steps/loss").unwrap().read_raw().unwrap();
    let mut params = std::collections::BTreeMap::new();
    for e in std::fs::read_dir(run_dir.join("final")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            params.extend(tch::Tensor::read_safetensors(&p).unwrap());
        }
    }
    (losses, params)
}

/// Column `name` of metrics.h5's per-step table (`steps/NAME`) in `run_dir`.
pub fn column<T: hdf5::H5Type>(run_dir: &Path, name: &str) -> Vec<T> {
    let f = hdf5::File::open(run_dir.join("metrics.h5")).unwrap();
    f.dataset(&format!("steps/{name}")).unwrap().read_raw().unwrap()
}

/// Sharded equals unsharded: every step's loss within 1e-6 relative and every parameter within
/// 1e-5 of `reference`, which must have trained (its loss went down), so that a run that did
/// nothing cannot pass by accident.
pub fn assert_same_run(what: &str, reference: &RunOutputs, got: &RunOutputs) {
    assert_eq!(reference.0.len(), got.0.len(), "{what}: steps");
    for (step, (a, b)) in reference.0.iter().zip(&got.0).enumerate() {
        let rel = (a - b).abs() / a.abs().max(1e-12);
        assert!(rel <= 1e-6, "{what}: step {} loss {b} vs reference {a} (relative {rel:.2e})", step + 1);
    }
    assert_eq!(reference.1.keys().collect::<Vec<_>>(), got.1.keys().collect::<Vec<_>>(), "{what}: parameter names");
    for (name, a) in &reference.1 {
        let diff = (a - &got.1[name]).abs().max().double_value(&[]);
        assert!(diff <= 1e-5, "{what}: {name} differs by {diff:.2e}");
    }
    let last = reference.0.len() - 1;
    assert!(
        reference.0[0].is_finite() && reference.0[last] < reference.0[0],
        "{what}: loss did not go down: {:?}",
        reference.0
    );
}

/// The readable single-rank trainer (`train::reference`) on the run `exp` describes, from the
/// parameters `initial` (by name): the same samples in the same order, schedule, clipping and
/// weight decay as the binary's single-rank run.
pub fn reference_run(exp: &ulysses::config::Experiment, initial: Vec<(String, tch::Tensor)>) -> RunOutputs {
    let spec = ulysses::config::validate(exp, Some(1)).unwrap();
    train_reference(exp, ulysses::train::reference::Reference::new(&spec, initial))
}

/// `reference_run` of a reference already set up (e.g. `Reference::with_lora`).
pub fn train_reference(
    exp: &ulysses::config::Experiment,
    mut reference: ulysses::train::reference::Reference,
) -> RunOutputs {
    use ulysses::optim::AdamW;
    use ulysses::train::{schedule::lr_at, step::MicroBatch};
    let mut loader = reference::loader(exp);
    let t = &exp.train;
    let mut losses = Vec::new();
    for step in 1..=t.steps {
        let batches: Vec<MicroBatch> = (0..t.grad_accum)
            .map(|_| MicroBatch {
                step: step as u64,
                ..MicroBatch::from_batch(&loader.next_batch().unwrap(), tch::Device::Cpu)
            })
            .collect();
        losses.push(reference.step(&batches, &AdamW::new(t), lr_at(t, step), t.clip_grad_norm).0);
    }
    (losses, reference.named().iter().map(|(n, t)| (n.clone(), t.detach().copy())).collect())
}
