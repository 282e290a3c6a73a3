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
pub fn run_with_timeout(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .env("OMP_NUM_THREADS", "1")
        .spawn()
        .expect("spawn");
    let start = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "command timed out after {limit:?} (a hang)\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn ulysses(args: &[&str], dir: &Path) -> Output {
    let mut c = Command::new(BIN);
    c.args(args).current_dir(dir);
    run_with_timeout(c, Duration::from_secs(300))
}

/// `mpirun -n N ulysses ARGS` in `dir`.
pub fn mpirun(n: usize, args: &[&str], dir: &Path, envs: &[(&str, &str)]) -> Output {
    let mut c = Command::new(MPIRUN);
    c.arg("-n").arg(n.to_string()).arg(BIN).args(args).current_dir(dir);
    for (k, v) in envs {
        c.env(k, v);
    }
    run_with_timeout(c, Duration::from_secs(600))
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
