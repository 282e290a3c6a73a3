//! A job that cannot go on ends whole and says why once: a stopped rank is found by the collective
//! watchdog, an error every rank hits is printed by rank 0 alone in whole lines, and a metrics.h5
//! that cannot be written is reported as what happened to which file, not as HDF5's stack.
//! A link planted at a name the run writes is replaced, never followed.
mod ckpt_common;
mod common;
use ckpt_common::*;
use common::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// The pid of rank `rank` of the job running in `dir` (its environment names the rank).
fn rank_pid(dir: &Path, rank: usize) -> i32 {
    let want = format!("PMI_RANK={rank}");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let exe = std::fs::read_link(entry.path().join("exe")).ok();
        let cwd = std::fs::read_link(entry.path().join("cwd")).ok();
        if exe.as_deref() != Some(Path::new(BIN)) || cwd.as_deref() != Some(dir) {
            continue;
        }
        let env = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        if env.split(|&b| b == 0).any(|v| v == want.as_bytes()) {
            found.push(pid);
        }
    }
    assert_eq!(found.len(), 1, "one process of rank {rank} in {}: {found:?}", dir.display());
    found[0]
}

fn alive(pid: i32) -> bool {
    // A zombie has ended; only its exit status waits for its parent.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
}

#[test]
fn a_stopped_rank_ends_the_job_within_the_timeout_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().canonicalize().unwrap();
    let data = synth(&dir);
    let exp = Exp::new("stopped", 2, 2, 100_000, 100_000);
    let timeout = 4;
    let mut job = exp.spawn_with(&dir, &data, &[], &["--set", &format!("parallel.collective_timeout_s={timeout}")]);
    wait_for("step 3", || exp.log(&dir).contains("step     3/"));
    let stopped = rank_pid(&dir, 3);
    // SAFETY: a signal to a process of this test's own job.
    assert_eq!(unsafe { libc::kill(stopped, libc::SIGSTOP) }, 0);
    let t0 = Instant::now();
    let status = wait_exit(&mut job);
    let took = t0.elapsed();
    let log = exp.log(&dir);
    let still_there = (0..40).all(|_| {
        std::thread::sleep(Duration::from_millis(50));
        alive(stopped)
    });
    if still_there {
        // SAFETY: as above; the test must not leave a stopped process behind.
        unsafe { libc::kill(stopped, libc::SIGKILL) };
    }
    assert!(!status.success(), "{log}");
    assert!(!still_there, "the stopped rank outlived the job\n{log}");
    assert!(took < Duration::from_secs(timeout + 10), "the job took {took:?} to end\n{log}");
    assert_eq!(log.matches("collective watchdog: no progress for").count(), 1, "printed once\n{log}");
    assert!(log.contains("(parallel.collective_timeout_s = 4)"), "{log}");
    assert!(log.contains("rank 3: did not arrive, and sent no report"), "{log}");
    let waiting = log.lines().find(|l| l.contains(": waiting in ")).unwrap_or_else(|| panic!("{log}"));
    assert!(waiting.contains("ranks ") && waiting.contains(" group (its call "), "{waiting}");
}

#[test]
fn an_error_every_rank_hits_is_printed_once_in_whole_lines() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let missing = dir.join("no-such-data");
    let exp = Exp::new("no_data", 2, 2, 4, 4);
    let path = exp.write(dir, &missing);
    let o = mpirun(4, &[path.to_str().unwrap()], dir, &[]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert_eq!(t.matches("error:").count(), 1, "one error message\n{t}");
    assert!(t.contains("[rank 0] error:") && t.contains("no-such-data"), "{t}");
    assert_eq!(t.matches("no-such-data").count(), 1, "the path said once\n{t}");
    for line in t.lines().filter(|l| l.contains("[rank")) {
        assert!(line.starts_with("[rank ") && line.matches("[rank").count() == 1, "a whole line: {line}\n{t}");
    }
}

/// In the child that `a_metrics_file_that_cannot_grow_is_reported_as_what_happened` starts:
/// every file limited to 64 KiB (RLIMIT_FSIZE: EFBIG, the same failed write as a full disk),
/// rows appended to a new metrics.h5 until one fails; prints the error as the binary would.
fn grow_metrics_until_it_fails(dir: &Path) {
    use ulysses::metrics::{MetricsWriter, RunInfo, StepRow, StepTimes};
    let limit = libc::rlimit { rlim_cur: 64 << 10, rlim_max: 64 << 10 };
    // SAFETY: a plain syscall on this (single-test) child process.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &limit) }, 0);
    // SAFETY: the default disposition of SIGXFSZ kills the process; ignored, the write fails.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let info = RunInfo {
        config_toml: "",
        world_size: 1,
        peak_tflops: None,
        bin_starts: &[0],
        tensorboard: None,
        position_by: Default::default(),
    };
    let mut w = MetricsWriter::open(&dir.join("metrics.h5"), &info, None).unwrap();
    for step in 1..100_000 {
        let row = StepRow {
            step,
            tokens: 128,
            documents: 1,
            loss: 1.0,
            trained_tokens: 127,
            eval_loss: f64::NAN,
            eval_tokens: 0,
            lr: 1e-3,
            grad_norm: 1.0,
            step_time: 0.1,
            tokens_per_s: 1280.0,
            tflops: 0.0,
            mfu: f64::NAN,
            tflops_alst: 0.0,
            mfu_alst: f64::NAN,
            times: StepTimes::default(),
            checkpoint_time: 0.0,
            peak_host_mem: vec![0],
            peak_gpu_mem: vec![0],
            peak_disk: vec![0],
        };
        if let Err(e) = w.append(&row) {
            println!("error: {}", ulysses::launch::render_error(&e));
            return;
        }
    }
    panic!("100,000 rows fit in 64 KiB");
}

#[test]
fn a_metrics_file_that_cannot_grow_is_reported_as_what_happened() {
    if let Some(dir) = std::env::var_os("ULYSSES_TEST_GROW_METRICS") {
        return grow_metrics_until_it_fails(Path::new(&dir));
    }
    let dir = tempfile::tempdir().unwrap();
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", "a_metrics_file_that_cannot_grow_is_reported_as_what_happened", "--nocapture"]);
    c.env("ULYSSES_TEST_GROW_METRICS", dir.path());
    let o = run_with_timeout(c, Duration::from_secs(120));
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    let line = t.lines().find(|l| l.starts_with("error: ")).unwrap_or_else(|| panic!("{t}"));
    let metrics = dir.path().join("metrics.h5");
    assert!(line.starts_with(&format!("error: writing step ")), "says what it was doing: {line}");
    assert!(line.contains(&format!("'s row to {}: ", metrics.display())), "names the file: {line}");
    assert!(line.ends_with(": File too large (os error 27)"), "says what happened: {line}");
    for raw in ["file descriptor", "errno =", "H5FD", "buf ="] {
        assert!(!t.contains(raw), "no HDF5 internals ({raw}): {t}");
    }
}

#[test]
fn links_planted_at_the_names_a_run_writes_are_never_followed() {
    let dir = tempfile::tempdir().unwrap();
    let (dir, data) = (dir.path(), synth(dir.path()));
    let outside = dir.join("outside");
    std::fs::create_dir_all(outside.join("folder")).unwrap();
    let (victim, victim_dir) = (outside.join("victim"), outside.join("folder"));
    std::fs::write(&victim, "not the run's").unwrap();
    let exp = Exp::new("planted", 1, 2, 4, 2);
    let run = exp.run_dir(dir);
    let files = ["metrics.h5", "metrics.h5.new", "plots/loss.png", "plots/memory.png", "plots/throughput.png"];
    let folders = ["checkpoints/step-000002.tmp-1", "checkpoints/step-000004.tmp-1", "final.tmp-1"];
    for (names, target) in [(&files[..], &victim), (&folders[..], &victim_dir)] {
        for name in names {
            let link = run.join(name);
            std::fs::create_dir_all(link.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(target, &link).unwrap();
        }
    }
    exp.train(dir, &data);
    let o = ulysses(&["report", run.to_str().unwrap()], dir);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "not the run's", "a file outside the run was written");
    assert_eq!(std::fs::read_dir(&victim_dir).unwrap().count(), 0, "a folder outside the run was written");
    for name in ["metrics.h5", "plots/loss.png", "checkpoints/step-000004/index.json", "final/config.json"] {
        let m = std::fs::symlink_metadata(run.join(name)).unwrap();
        assert!(m.file_type().is_file(), "{name} is the run's own file");
    }
    assert_eq!(losses(&run).0, vec![1, 2, 3, 4]);
}

/// A small but complete tokenizer.json (word level).
const TOKENIZER_JSON: &str = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
"model":{"type":"WordLevel","vocab":{"hello":0,"world":1,"[UNK]":2},"unk_token":"[UNK]"}}"#;

#[test]
fn model_folder_tokenizer_files_are_parsed_at_start_and_copied_with_the_runs_modes() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (dir, data) = (dir.path(), synth(dir.path()));
    Exp::new("source", 1, 1, 1, 1).train(dir, &data);
    let model = dir.join("runs/source/final");
    let tokenizer = model.join("tokenizer.json");
    std::fs::write(&tokenizer, TOKENIZER_JSON).unwrap();
    std::fs::set_permissions(&tokenizer, std::fs::Permissions::from_mode(0o666)).unwrap();
    let from_folder = format!("path = \"{}\"", model.display());

    let exp = Exp { model: from_folder.clone(), ..Exp::new("carried", 1, 1, 1, 1) };
    exp.train(dir, &data);
    for copy in ["checkpoints/step-000001/tokenizer.json", "final/tokenizer.json"] {
        let copy = exp.run_dir(dir).join(copy);
        assert_eq!(std::fs::read_to_string(&copy).unwrap(), TOKENIZER_JSON);
        let mode = std::fs::metadata(&copy).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o022, 0, "{}: mode {mode:o}, the source's world-writable bits came along", copy.display());
    }

    // Truncated: refused at start, naming the file, before anything is trained or written.
    std::fs::write(&tokenizer, &TOKENIZER_JSON[..TOKENIZER_JSON.len() / 2]).unwrap();
    let exp = Exp { model: from_folder, ..Exp::new("truncated", 1, 1, 1, 1) };
    let o = mpirun(1, &[exp.write(dir, &data).to_str().unwrap()], dir, &[]);
    let out = assert_clean_failure(&o);
    assert!(out.contains(&tokenizer.display().to_string()) && out.contains("not a usable tokenizer"), "{out}");
    assert!(!exp.run_dir(dir).join("checkpoints").exists(), "{out}");
}

#[test]
fn cuda_out_of_memory_is_one_message_naming_the_phase_the_numbers_and_what_to_change() {
    let dir = tempfile::tempdir().unwrap();
    let (dir, data) = (dir.path(), synth(dir.path()));
    let exp = Exp::new("oom", 1, 2, 2, 0);
    // libtorch's own text, raised where a tch call would panic with it (src/oom.rs SAMPLE).
    let o = mpirun(2, &[exp.write(dir, &data).to_str().unwrap()], dir, &[("ULYSSES_TEST_CUDA_OOM", "step")]);
    let out = assert_clean_failure(&o);
    for want in [
        "error: CUDA out of memory in step 1, forward and backward",
        "asked for 20.00 GiB on GPU 0, 3.38 GiB free of its 79.19 GiB",
        "memory.gpu_gib",
        "parallel.activations = \"host\"",
        "parallel.offload_optimizer = \"host\"",
        "a shorter data.seq_len",
    ] {
        assert!(out.contains(want), "{want:?} not in:\n{out}");
    }
    assert!(!out.contains("frame #") && !out.contains("Exception raised from"), "libtorch's backtrace:\n{out}");
    assert_eq!(out.matches("CUDA out of memory").count(), 1, "said once:\n{out}");
}
