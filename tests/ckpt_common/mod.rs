//! Shared by the checkpoint, preemption and metrics tests: synthetic data, experiment files,
//! reading metrics.h5, and jobs that run in their own process group so a test can signal or
//! kill -9 every rank.
#![allow(dead_code)]
use crate::common::*;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SEQ: usize = 128;

pub fn synth(dir: &Path) -> PathBuf {
    let out = dir.join("data");
    let args = ["data", "synth", "--task", "passkey", "--seq-len", "128", "--num", "32", "--seed", "3", "--out"];
    let o = ulysses(&[&args[..], &[out.to_str().unwrap()]].concat(), dir);
    assert!(o.status.success(), "{}", text(&o));
    out
}

#[derive(Clone)]
pub struct Exp {
    pub name: &'static str,
    pub sp: usize,
    pub dp: usize,
    pub zero: u8,
    pub micro_batch: usize,
    pub steps: usize,
    pub every: usize,
    pub resume: String,
    pub seed: u64,
    /// Extra TOML lines for [model] (e.g. `config = "..."` instead of the preset).
    pub model: String,
    /// `checkpoint.async` (None: the default, off on CPU).
    pub asynchronous: Option<bool>,
}

impl Exp {
    pub fn new(name: &'static str, sp: usize, dp: usize, steps: usize, every: usize) -> Exp {
        Exp {
            name,
            sp,
            dp,
            zero: 3,
            micro_batch: 1,
            steps,
            every,
            resume: "auto".into(),
            seed: 11,
            model: "preset = \"tiny\"".into(),
            asynchronous: None,
        }
    }

    pub fn ranks(&self) -> usize {
        self.sp * self.dp
    }

    /// Writes DIR/NAME.toml; its run directory is DIR/runs/NAME.
    pub fn write(&self, dir: &Path, data: &Path) -> PathBuf {
        let toml = format!(
            "[run]\nname = \"{}\"\noutput_dir = \"{}\"\nseed = {}\n[model]\n{}\n[parallel]\nsp = {}\ndp = {}\nzero_stage = {}\n\
             [data]\npaths = [\"{}\"]\nseq_len = {SEQ}\n[train]\nsteps = {}\nmicro_batch = {}\nlr = 2e-3\nmin_lr = 2e-4\n\
             warmup_steps = 1\nweight_decay = 0.1\n[checkpoint]\nevery = {}\nkeep = 3\nresume = \"{}\"\n{}\
             [metrics]\nposition_loss_every = 2\nposition_bins = 8\n",
            self.name,
            dir.join("runs").display(),
            self.seed,
            self.model,
            self.sp,
            self.dp,
            self.zero,
            data.display(),
            self.steps,
            self.micro_batch,
            self.every,
            self.resume,
            self.asynchronous.map_or(String::new(), |a| format!("async = {a}\n"))
        );
        let path = dir.join(format!("{}.toml", self.name));
        std::fs::write(&path, toml).unwrap();
        path
    }

    pub fn run_dir(&self, dir: &Path) -> PathBuf {
        dir.join("runs").join(self.name)
    }

    /// Runs the job to its end; panics with its output unless it succeeds.
    pub fn train(&self, dir: &Path, data: &Path) -> String {
        let exp = self.write(dir, data);
        let o = mpirun(self.ranks(), &[exp.to_str().unwrap()], dir, &[]);
        assert!(o.status.success(), "{}: {}", self.name, text(&o));
        text(&o)
    }

    /// Starts the job in its own process group with stdout and stderr in DIR/NAME.log.
    pub fn spawn(&self, dir: &Path, data: &Path, envs: &[(&str, &str)]) -> Child {
        self.spawn_with(dir, data, envs, &[])
    }

    /// `spawn`, with more arguments after the experiment (`--set KEY=VALUE`).
    pub fn spawn_with(&self, dir: &Path, data: &Path, envs: &[(&str, &str)], args: &[&str]) -> Child {
        let exp = self.write(dir, data);
        let log = std::fs::File::create(dir.join(format!("{}.log", self.name))).unwrap();
        let mut c = Command::new(MPIRUN);
        c.arg("-n").arg(self.ranks().to_string()).arg(BIN).arg(&exp).args(args).current_dir(dir);
        c.env("OMP_NUM_THREADS", "1").envs(envs.iter().copied()).process_group(0);
        c.stdout(Stdio::from(log.try_clone().unwrap())).stderr(Stdio::from(log)).spawn().unwrap()
    }

    pub fn log(&self, dir: &Path) -> String {
        std::fs::read_to_string(dir.join(format!("{}.log", self.name))).unwrap_or_default()
    }
}

/// Polls `ready` every 50 ms for up to two minutes.
pub fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(start.elapsed() < Duration::from_secs(120), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for a spawned job (two minutes at most) and returns its exit status.
pub fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > Duration::from_secs(120) {
            kill_group(child, libc::SIGKILL);
            panic!("job did not end within two minutes");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends `signal` to every process of the job's group (mpirun, its proxy, every rank).
pub fn kill_group(child: &Child, signal: i32) {
    // SAFETY: plain syscall on the process group this test created (process_group(0) above).
    unsafe { libc::killpg(child.id() as i32, signal) };
}

/// (step, loss) rows of a run's metrics.h5.
pub fn losses(run_dir: &Path) -> (Vec<u64>, Vec<f64>) {
    // Live: a job killed with -9 leaves the file marked as open for SWMR writing.
    let f = ulysses::h5::open_live(&run_dir.join("metrics.h5")).unwrap();
    (f.dataset("steps/step").unwrap().read_raw().unwrap(), f.dataset("steps/loss").unwrap().read_raw().unwrap())
}

pub fn checkpoint_names(run_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(run_dir.join("checkpoints"))
        .map(|d| d.map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dest = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &dest);
        } else {
            std::fs::copy(&p, &dest).unwrap();
        }
    }
}

/// Loads every complete checkpoint of a run in this process (one rank holding everything, so
/// every byte of every file is read), panicking with the one that does not load.
pub fn load_every_complete(run_dir: &Path) -> Vec<u64> {
    use ulysses::checkpoint;
    let solo = ulysses::comm::solo::Solo;
    let mut steps = Vec::new();
    for (step, dir) in checkpoint::list_complete(run_dir).unwrap() {
        let spec = ulysses::model::spec::ModelSpec::from_hf_config(&dir.join("config.json")).unwrap();
        let state = checkpoint::read_state(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        assert_eq!(state.step, step, "{}", dir.display());
        let zero = ulysses::config::ZeroStage::Sharded;
        checkpoint::load_params(&dir, state.format, &spec, zero, &solo, tch::Device::Cpu)
            .unwrap_or_else(|e| panic!("a complete checkpoint does not load: {}: {e}", dir.display()));
        steps.push(step);
    }
    steps
}
