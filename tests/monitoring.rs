//! Watching a run: h5py and `ulysses report` read metrics.h5 while the job writes it (SWMR, with
//! HDF5's file locking on, as on a fresh machine); TensorBoard's own reader parses the event files
//! of a run and of its eval with the right steps; `report --csv`; commands that print end quietly
//! when their reader goes away.
mod ckpt_common;
mod common;
use ckpt_common::*;
use common::*;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Stdio};

/// Rows of metrics.h5 as h5py sees them in SWMR mode: (steps, loss rows, position rows).
const H5PY_LIVE: &str = r#"
import h5py, sys
with h5py.File(sys.argv[1], "r", swmr=True) as f:
    print(len(f["steps/step"]), len(f["steps/loss"]), len(f["position_loss/step"]), f["steps/step"][0])
"#;

/// The scalars TensorBoard's EventAccumulator finds in a folder: {tag: [[step, value], ...]}.
const TB_SCALARS: &str = r#"
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
acc.Reload()
print(json.dumps({t: [[e.step, e.value] for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}))
"#;

fn python(script: &str, args: &[&str]) -> std::process::Output {
    let mut c = Command::new(PYTHON);
    c.args(["-c", script]).args(args).env_remove("HDF5_USE_FILE_LOCKING");
    run_with_timeout(c, std::time::Duration::from_secs(120))
}

#[test]
fn h5py_and_report_read_metrics_while_the_run_writes_them() {
    let dir = tempfile::tempdir().unwrap();
    let (dir, data) = (dir.path(), synth(dir.path()));
    // Long enough (300 steps) that the job is still running when the readers come.
    let exp = Exp::new("live", 1, 2, 300, 0);
    let toml = exp.write(dir, &data);
    let log = std::fs::File::create(dir.join("live.log")).unwrap();
    // HDF5's file locking stays on (scripts/env.sh turns it off for the build; users have it on).
    let mut job = Command::new(MPIRUN);
    job.args(["-n", "2", BIN, "train", toml.to_str().unwrap()]).current_dir(dir);
    job.env("OMP_NUM_THREADS", "1").env_remove("HDF5_USE_FILE_LOCKING").process_group(0);
    let mut job = job.stdout(Stdio::from(log.try_clone().unwrap())).stderr(Stdio::from(log)).spawn().unwrap();
    wait_for("step 5", || exp.log(dir).contains("step     5/300"));

    let file = exp.run_dir(dir).join("metrics.h5");
    let o = python(H5PY_LIVE, &[file.to_str().unwrap()]);
    let running = job.try_wait().unwrap().is_none();
    assert!(o.status.success(), "h5py mid-run: {}", text(&o));
    let seen: Vec<u64> = String::from_utf8_lossy(&o.stdout).split_whitespace().map(|v| v.parse().unwrap()).collect();
    assert!(running, "the job ended before the mid-run read; make it longer");
    assert!(seen[0] >= 4 && seen[0] < 300, "h5py saw {} rows mid-run", seen[0]);
    assert!(seen[1] + 1 >= seen[0] && seen[1] <= seen[0] + 1, "columns differ by more than a row in flight: {seen:?}");
    assert_eq!(seen[3], 1, "the first row is step 1");

    let mut report = Command::new(BIN);
    report.args(["report", exp.run_dir(dir).to_str().unwrap()]).env_remove("HDF5_USE_FILE_LOCKING");
    let o = run_with_timeout(report, std::time::Duration::from_secs(120));
    assert!(o.status.success(), "report mid-run: {}", text(&o));
    assert!(text(&o).contains("(steps 1.."), "{}", text(&o));

    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = job.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > std::time::Duration::from_secs(600) {
            kill_group(&job, libc::SIGKILL);
            panic!("the job did not end within 10 minutes:\n{}", exp.log(dir));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(status.success(), "{}", exp.log(dir));
    // Closed, the file opens the ordinary way too, with every row.
    let (steps, loss) = losses(&exp.run_dir(dir));
    assert_eq!((steps.len(), loss.len()), (300, 300));
    assert!(!exp.run_dir(dir).join("metrics.h5.new").exists());
}

#[test]
fn tensorboard_files_parse_with_every_step_and_eval_result() {
    let dir = tempfile::tempdir().unwrap();
    let (dir, data) = (dir.path(), synth(dir.path()));
    let exp = Exp::new("tb", 2, 1, 6, 0);
    let toml = exp.write(dir, &data);
    // The training data stands in for a held-out set: the held-out loss at steps 3 and 6.
    let held_out = format!("data.eval_paths=[\"{}\"]", data.display());
    let sets = ["--set", "metrics.tensorboard=true", "--set", &held_out, "--set", "train.eval_every=3"];
    let o = mpirun(2, &[&["train", toml.to_str().unwrap()][..], &sets].concat(), dir, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let args = ["eval", toml.to_str().unwrap(), "--task", "passkey", "--lengths", "128", "--samples", "2"];
    let o = ulysses(&[&args[..], &["--depths", "0,1", "--set", "metrics.tensorboard=true"]].concat(), dir);
    assert!(o.status.success(), "{}", text(&o));

    let events = exp.run_dir(dir).join("tensorboard");
    let o = python(TB_SCALARS, &[events.to_str().unwrap()]);
    assert!(o.status.success(), "tensorboard: {}", text(&o));
    let scalars: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let steps = |tag: &str| -> Vec<u64> {
        scalars[tag]
            .as_array()
            .unwrap_or_else(|| panic!("no {tag} in {scalars}"))
            .iter()
            .map(|e| e[0].as_u64().unwrap())
            .collect()
    };
    assert_eq!(steps("train/loss"), [1, 2, 3, 4, 5, 6]);
    for tag in
        ["train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/tflops", "time/forward", "memory/peak_host_gib"]
    {
        assert_eq!(steps(tag).len(), 6, "{tag}");
    }
    assert!(scalars.get("perf/mfu").is_none(), "a CPU run has no MFU");
    let (_, h5_loss) = losses(&exp.run_dir(dir));
    let first = scalars["train/loss"][0][1].as_f64().unwrap();
    assert!((first - h5_loss[0]).abs() < 1e-5 * h5_loss[0], "TensorBoard {first} vs metrics.h5 {}", h5_loss[0]);
    assert_eq!(steps("eval/loss"), [3, 6]);
    let f = hdf5::File::open(exp.run_dir(dir).join("metrics.h5")).unwrap();
    let h5_eval: Vec<f64> = f.dataset("steps/eval_loss").unwrap().read_raw().unwrap();
    let last = scalars["eval/loss"][1][1].as_f64().unwrap();
    assert!((last - h5_eval[5]).abs() < 1e-5 * h5_eval[5], "TensorBoard eval/loss {last} vs metrics.h5 {}", h5_eval[5]);
    assert_eq!(steps("time/eval").len(), 6, "time/eval every step (0 without a held-out loss)");
    // position_loss_every = 2 and 8 bins over 128 tokens: 8 tags at steps 2, 4, 6.
    let bins: Vec<&String> = scalars.as_object().unwrap().keys().filter(|t| t.starts_with("position_loss/")).collect();
    assert_eq!(bins.len(), 8, "{bins:?}");
    assert_eq!(steps("position_loss/000"), [2, 4, 6]);
    assert_eq!(steps("position_loss/112"), [2, 4, 6]);

    let eval = python(TB_SCALARS, &[events.join("eval").to_str().unwrap()]);
    assert!(eval.status.success(), "tensorboard: {}", text(&eval));
    let eval: serde_json::Value = serde_json::from_slice(&eval.stdout).unwrap();
    for tag in ["eval/passkey/exact_match/len_128", "eval/passkey/token_accuracy/len_128"] {
        let e = eval[tag].as_array().unwrap_or_else(|| panic!("no {tag} in {eval}"));
        assert_eq!(e.len(), 1, "{tag}");
        assert_eq!(e[0][0], 6, "{tag}: at the checkpoint's step");
        assert!((0.0..=1.0).contains(&e[0][1].as_f64().unwrap()), "{tag}");
    }
}

#[test]
fn report_prints_csv_and_printing_commands_end_quietly_on_a_closed_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let (dir, data) = (dir.path(), synth(dir.path()));
    let exp = Exp::new("csv", 1, 1, 3, 0);
    exp.train(dir, &data);
    let run = exp.run_dir(dir);
    let o = ulysses(&["report", run.to_str().unwrap(), "--csv"], dir);
    assert!(o.status.success(), "{}", text(&o));
    let csv = String::from_utf8_lossy(&o.stdout).to_string();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 4, "header and 3 steps:\n{csv}");
    let header: Vec<&str> = lines[0].split(',').collect();
    assert_eq!(&header[..3], ["step", "tokens", "loss"]);
    assert!(header.contains(&"mfu") && header.contains(&"peak_host_mem_max"), "{header:?}");
    let (steps, loss) = losses(&run);
    for (i, line) in lines[1..].iter().enumerate() {
        let cells: Vec<&str> = line.split(',').collect();
        assert_eq!(cells.len(), header.len(), "{line}");
        assert_eq!(cells[0].parse::<u64>().unwrap(), steps[i]);
        assert_eq!(cells[2].parse::<f64>().unwrap(), loss[i], "the CSV keeps every digit");
        assert_eq!(cells[header.iter().position(|h| *h == "mfu").unwrap()], "", "no MFU on CPU: empty cell");
    }

    // `ulysses report RUN | head -1` and the like: the reader is gone before the first write.
    let experiment = dir.join("csv.toml");
    let shard = data.join("shard-00000.h5");
    let commands: [&[&str]; 4] = [
        &["report", run.to_str().unwrap()],
        &["report", run.to_str().unwrap(), "--csv"],
        &["check", experiment.to_str().unwrap()],
        &["data", "inspect", shard.to_str().unwrap()],
    ];
    for args in commands {
        let mut c = Command::new(BIN);
        c.args(args).current_dir(dir).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        drop(child.stdout.take());
        let o = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!stderr.contains("panicked") && o.status.code() != Some(101), "{args:?}: {:?}\n{stderr}", o.status);
        assert!(o.status.success() || o.status.signal() == Some(libc::SIGPIPE), "{args:?}: {:?}\n{stderr}", o.status);
    }
}

#[test]
fn mfu_is_left_out_on_cpu_and_step_lines_carry_a_time_stamp() {
    let dir = tempfile::tempdir().unwrap();
    let (dir, data) = (dir.path(), synth(dir.path()));
    let out = Exp::new("stamp", 1, 1, 2, 0).train(dir, &data);
    let line = out.lines().find(|l| l.contains("step     1/2")).unwrap_or_else(|| panic!("no step line:\n{out}"));
    let stamp = line.split_whitespace().next().unwrap();
    // 2026-12-01T20:35:50Z
    assert!(stamp.len() == 20 && stamp.ends_with('Z') && stamp.as_bytes()[10] == b'T', "{line}");
    assert!(line.contains("TFLOP/s/rank") && !line.contains("MFU"), "{line}");
    assert!(out.contains("no MFU on CPU"), "{out}");
    let report = ulysses(&["report", Path::new(&dir).join("runs/stamp").to_str().unwrap()], dir);
    assert!(text(&report).contains("MFU                not computed"), "{}", text(&report));
}
