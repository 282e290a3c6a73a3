//! `ulysses report RUN_DIR`: a summary table of a run's metrics.h5 on stdout and PNG plots in
//! RUN_DIR/plots/, or (`--csv`) the steps as CSV. Reads only the file (schema in docs/metrics.md),
//! in SWMR mode, so it works on a laptop with no MPI job and on a run still writing it.
mod plots;

use crate::metrics::progress::sig3;
use hdf5::types::VarLenUnicode;
use ndarray::Array2;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{path}: {message}")]
    Read { path: String, message: String },
    #[error("{path}: the run has no steps yet; nothing to report")]
    Empty { path: String },
    #[error("writing plot {path}: {message}")]
    Plot { path: String, message: String },
}

/// The columns of metrics.h5 that the report uses.
pub struct Metrics {
    pub step: Vec<u64>,
    pub loss: Vec<f64>,
    pub lr: Vec<f64>,
    pub tokens_per_s: Vec<f64>,
    pub step_time: Vec<f64>,
    pub mfu: Vec<f64>,
    pub mfu_alst: Vec<f64>,
    pub tflops: Vec<f64>,
    pub grad_norm: Vec<f64>,
    pub tokens: Vec<u64>,
    /// (name, seconds per step) of the time split, checkpoint saves last.
    pub times: Vec<(&'static str, Vec<f64>)>,
    /// [step, rank] bytes.
    pub peak_host_mem: Array2<u64>,
    pub peak_gpu_mem: Array2<u64>,
    pub position_step: Vec<u64>,
    pub position_loss: Array2<f64>,
    pub bin_start: Vec<u64>,
    /// Tokens per sample (`data.seq_len` of the recorded experiment): the position axis.
    pub seq_len: u64,
    pub world_size: u64,
    pub versions: String,
}

impl Metrics {
    pub fn read(path: &Path) -> Result<Metrics, ReportError> {
        let err = |e: hdf5::Error| ReportError::Read { path: path.display().to_string(), message: e.to_string() };
        if !path.exists() {
            return Err(ReportError::Read {
                path: path.display().to_string(),
                message:
                    "no such file; a run writes it in RUN_DIR (run.output_dir/run.name) once its first step is done"
                        .into(),
            });
        }
        let f = crate::h5::open_live(path).map_err(err)?;
        let version: u32 = f.attr("schema_version").and_then(|a| a.read_scalar()).map_err(err)?;
        // Versions 3 to 5 added what the report does not read (/time_split, steps/documents, the
        // trained tokens and the held-out loss).
        if !(2..=crate::metrics::SCHEMA_VERSION).contains(&version) {
            return Err(ReportError::Read {
                path: path.display().to_string(),
                message: format!(
                    "schema version {version}; this ulysses reads versions 2 to {}",
                    crate::metrics::SCHEMA_VERSION
                ),
            });
        }
        let col = |name: &str| f.dataset(&format!("steps/{name}")).and_then(|d| d.read_raw::<f64>()).map_err(err);
        let text = |name: &str| {
            f.attr(name).and_then(|a| a.read_scalar::<VarLenUnicode>()).map(|v| v.to_string()).map_err(err)
        };
        let mut m = Metrics {
            step: f.dataset("steps/step").and_then(|d| d.read_raw()).map_err(err)?,
            loss: col("loss")?,
            lr: col("lr")?,
            tokens_per_s: col("tokens_per_s")?,
            step_time: col("step_time")?,
            mfu: col("mfu")?,
            mfu_alst: col("mfu_alst")?,
            tflops: col("tflops")?,
            grad_norm: col("grad_norm")?,
            tokens: f.dataset("steps/tokens").and_then(|d| d.read_raw()).map_err(err)?,
            times: vec![
                ("data", col("time_data")?),
                ("forward", col("time_forward")?),
                ("backward", col("time_backward")?),
                ("optimizer", col("time_optimizer")?),
                ("checkpoint", col("time_checkpoint")?),
            ],
            peak_host_mem: f.dataset("steps/peak_host_mem").and_then(|d| d.read_2d()).map_err(err)?,
            peak_gpu_mem: f.dataset("steps/peak_gpu_mem").and_then(|d| d.read_2d()).map_err(err)?,
            position_step: f.dataset("position_loss/step").and_then(|d| d.read_raw()).map_err(err)?,
            position_loss: f.dataset("position_loss/loss").and_then(|d| d.read_2d()).map_err(err)?,
            bin_start: f.dataset("position_loss/bin_start").and_then(|d| d.read_raw()).map_err(err)?,
            seq_len: text("config_toml").ok().and_then(|t| recorded_seq_len(&t)).unwrap_or(0),
            world_size: f.attr("world_size").and_then(|a| a.read_scalar()).map_err(err)?,
            versions: format!("ulysses {}, libtorch {}", text("ulysses_version")?, text("libtorch_version")?),
        };
        m.whole_rows();
        if m.seq_len == 0 {
            m.seq_len = m.bin_start.last().map_or(1, |&b| b + 1);
        }
        if m.step.is_empty() {
            return Err(ReportError::Empty { path: path.display().to_string() });
        }
        Ok(m)
    }

    /// While a run writes the file, a step in flight may have reached some columns and not yet
    /// others: keep the rows every column has.
    fn whole_rows(&mut self) {
        let mut n = self.step.len().min(self.tokens.len());
        n = n.min(self.peak_host_mem.nrows()).min(self.peak_gpu_mem.nrows());
        for c in [&self.loss, &self.lr, &self.tokens_per_s, &self.step_time, &self.mfu, &self.mfu_alst, &self.tflops]
            .into_iter()
            .chain([&self.grad_norm])
            .chain(self.times.iter().map(|(_, v)| v))
        {
            n = n.min(c.len());
        }
        for c in [&mut self.loss, &mut self.lr, &mut self.tokens_per_s, &mut self.step_time, &mut self.mfu]
            .into_iter()
            .chain([&mut self.mfu_alst, &mut self.tflops, &mut self.grad_norm])
            .chain(self.times.iter_mut().map(|(_, v)| v))
        {
            c.truncate(n);
        }
        self.step.truncate(n);
        self.tokens.truncate(n);
        self.peak_host_mem = self.peak_host_mem.slice(ndarray::s![..n, ..]).to_owned();
        self.peak_gpu_mem = self.peak_gpu_mem.slice(ndarray::s![..n, ..]).to_owned();
        let rows = self.position_step.len().min(self.position_loss.nrows());
        self.position_step.truncate(rows);
        self.position_loss = self.position_loss.slice(ndarray::s![..rows, ..]).to_owned();
    }
}

/// `data.seq_len` of the experiment recorded in the file.
fn recorded_seq_len(config_toml: &str) -> Option<u64> {
    let table: toml::Table = toml::from_str(config_toml).ok()?;
    table.get("data")?.get("seq_len")?.as_integer().map(|v| v as u64)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

pub fn bytes_text(b: u64) -> String {
    let gib = crate::units::gib(b);
    if gib >= 1.0 {
        format!("{gib:.2} GiB")
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

/// The largest entry of a [step, rank] table and its rank.
fn peak(table: &Array2<u64>) -> (u64, usize) {
    table.indexed_iter().map(|((_, r), &v)| (v, r)).max().unwrap_or((0, 0))
}

/// The summary table: one "name  value" line each.
pub fn summary(run_dir: &Path, m: &Metrics) -> String {
    let n = m.step.len();
    // The first step of a launch includes warm-up (allocations, first collectives).
    let steady = if n > 1 { 1 } else { 0 };
    let (min_i, min_loss) =
        m.loss.iter().enumerate().fold((0, f64::INFINITY), |a, (i, &l)| if l < a.1 { (i, l) } else { a });
    let (host, host_rank) = peak(&m.peak_host_mem);
    let (gpu, gpu_rank) = peak(&m.peak_gpu_mem);
    // The step time excludes checkpoint saves, so its split does too.
    let split: Vec<String> = m
        .times
        .iter()
        .filter(|(name, _)| *name != "checkpoint")
        .map(|(name, v)| format!("{name} {:.3}", mean(&v[steady..])))
        .collect();
    let checkpoints = crate::checkpoint::list_complete(run_dir)
        .map(|v| v.iter().map(|(s, _)| crate::checkpoint::step_dir_name(*s)).collect::<Vec<_>>().join(", "))
        .unwrap_or_default();
    let rows = [
        ("run", format!("{} ({} ranks; {})", run_dir.display(), m.world_size, m.versions)),
        ("steps", format!("{n} (steps {}..{})", m.step[0], m.step[n - 1])),
        (
            "loss",
            format!("first {:.4}, final {:.4}, min {min_loss:.4} at step {}", m.loss[0], m.loss[n - 1], m.step[min_i]),
        ),
        (
            "tokens/s",
            format!("{:.1} mean over steps {}..{}", mean(&m.tokens_per_s[steady..]), m.step[steady], m.step[n - 1]),
        ),
        ("TFLOP/s per rank", format!("{} (causal model FLOPs)", sig3(mean(&m.tflops[steady..])))),
        (
            "MFU",
            if mean(&m.mfu[steady..]).is_finite() {
                format!(
                    "{}% causal, {}% ALST convention",
                    sig3(100.0 * mean(&m.mfu[steady..])),
                    sig3(100.0 * mean(&m.mfu_alst[steady..]))
                )
            } else {
                "not computed: no known peak for this device (CPU run or unknown GPU; metrics.peak_tflops sets one)"
                    .into()
            },
        ),
        ("step time (s)", format!("{:.3} mean = {}", mean(&m.step_time[steady..]), split.join(" + "))),
        ("peak host memory", format!("{} (rank {host_rank})", bytes_text(host))),
        (
            "peak GPU memory",
            if gpu > 0 { format!("{} (rank {gpu_rank})", bytes_text(gpu)) } else { "not recorded (CPU run)".into() },
        ),
        ("checkpoints", if checkpoints.is_empty() { "none".into() } else { checkpoints }),
    ];
    rows.iter().map(|(k, v)| format!("{k:<18} {v}\n")).collect()
}

/// `ulysses report --csv`: one row per step on stdout, the /steps columns in docs/metrics.md's
/// order with memory as the largest rank's bytes, for a spreadsheet, pandas or `tail -f`-style
/// polling of a running job.
pub fn csv(run_dir: &Path) -> Result<(), ReportError> {
    use std::io::Write;
    let m = Metrics::read(&run_dir.join("metrics.h5"))?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut header = vec!["step", "tokens", "loss", "lr", "grad_norm", "step_time", "tokens_per_s", "tflops", "mfu"];
    header.extend(["mfu_alst"]);
    header.extend(m.times.iter().map(|(name, _)| match *name {
        "data" => "time_data",
        "forward" => "time_forward",
        "backward" => "time_backward",
        "optimizer" => "time_optimizer",
        _ => "time_checkpoint",
    }));
    header.extend(["peak_host_mem_max", "peak_gpu_mem_max"]);
    let write = |out: &mut dyn Write| -> std::io::Result<()> {
        writeln!(out, "{}", header.join(","))?;
        let largest = |t: &Array2<u64>, i: usize| t.row(i).iter().copied().max().unwrap_or(0);
        for i in 0..m.step.len() {
            let mut cells = vec![m.step[i].to_string(), m.tokens[i].to_string()];
            let floats = [m.loss[i], m.lr[i], m.grad_norm[i], m.step_time[i], m.tokens_per_s[i], m.tflops[i], m.mfu[i]];
            cells.extend(floats.iter().chain([&m.mfu_alst[i]]).map(|v| csv_number(*v)));
            cells.extend(m.times.iter().map(|(_, v)| csv_number(v[i])));
            cells.extend([largest(&m.peak_host_mem, i).to_string(), largest(&m.peak_gpu_mem, i).to_string()]);
            writeln!(out, "{}", cells.join(","))?;
        }
        out.flush()
    };
    write(&mut out).map_err(|e| ReportError::Read { path: "stdout".into(), message: e.to_string() })
}

/// A float as CSV: shortest round-trip digits, empty for NaN (no value).
fn csv_number(v: f64) -> String {
    if v.is_nan() {
        String::new()
    } else {
        format!("{v}")
    }
}

/// Prints the summary and writes the plots; returns the PNG paths.
pub fn report(run_dir: &Path) -> Result<Vec<PathBuf>, ReportError> {
    let m = Metrics::read(&run_dir.join("metrics.h5"))?;
    print!("{}", summary(run_dir, &m));
    let out = run_dir.join("plots");
    std::fs::create_dir_all(&out)
        .map_err(|e| ReportError::Plot { path: out.display().to_string(), message: e.to_string() })?;
    let mut written = plots::write_all(&m, &out)?;
    // Evaluation results of the run (`ulysses eval` writes RUN_DIR/eval/TASK.h5): heat maps and
    // the per-position loss curve next to the training plots.
    let eval_dir = run_dir.join("eval");
    let mut results: Vec<PathBuf> = std::fs::read_dir(&eval_dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "h5")).collect()
        })
        .unwrap_or_default();
    results.sort();
    for r in results {
        let plotted = crate::eval::plot::plot_eval(&r, &out)
            .map_err(|e| ReportError::Plot { path: r.display().to_string(), message: e.to_string() })?;
        written.extend(plotted);
    }
    for p in &written {
        println!("{:<18} {}", "plot", p.display());
    }
    Ok(written)
}
