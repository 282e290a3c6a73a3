//! TensorBoard event files (`metrics.tensorboard = true`): the numbers of metrics.h5 for people who
//! watch runs in TensorBoard, as with DeepSpeed, HF Trainer or torchtitan. Written with
//! `syntaxdot-summary` (TFRecord framing, CRC32C and the Event protobuf, checked byte for byte
//! against TensorFlow's writer), flushed after every event, so `tensorboard --logdir runs` shows a
//! run while it trains. Tags (docs/metrics.md):
//! - every step: `train/loss`, `eval/loss` (the held-out loss, on the steps that evaluate it), `train/lr`, `train/grad_norm`, `perf/*` (throughput, TFLOP/s, MFU
//!   when a peak is known), `time/*` (the time split) and `memory/*` (largest rank, GiB);
//! - every `metrics.position_loss_every` steps: `position_loss/P`, the mean loss of the bin that
//!   starts at position P, one chart per bin over training steps;
//! - `ulysses eval` (in `eval/`): `eval/TASK/...` at the checkpoint's step.
use super::row::StepRow;
use crate::units::gib;
use std::fs::File;
use std::io::BufWriter;
use std::path::Path;
use syntaxdot_summary::SummaryWriter;

pub struct Events {
    writer: SummaryWriter<BufWriter<File>>,
}

impl Events {
    /// A new event file `DIR/NAME.out.tfevents.<time>.<host>` (a resumed run starts its own file;
    /// TensorBoard reads the folder's files in order and drops the steps a resume recomputes).
    pub fn create(dir: &Path, name: &str) -> std::io::Result<Events> {
        Ok(Events { writer: SummaryWriter::from_prefix(dir.join(name))? })
    }

    /// One scalar; NaN values (MFU without a known peak, an empty bin) are left out.
    pub fn scalar(&mut self, tag: &str, step: u64, value: f64) -> std::io::Result<()> {
        if value.is_finite() {
            self.writer.write_scalar(tag, step as i64, value as f32)?;
        }
        Ok(())
    }

    /// A step's row: its float columns (named as in metrics.h5) and the largest rank's memory.
    pub fn step<'a>(&mut self, r: &StepRow, columns: impl Iterator<Item = (&'a str, f64)>) -> std::io::Result<()> {
        for (name, value) in columns {
            self.scalar(&column_tag(name), r.step, value)?;
        }
        self.scalar("perf/tokens", r.step, r.tokens as f64)?;
        let largest = |v: &[u64]| v.iter().copied().max().unwrap_or(0);
        self.scalar("memory/peak_host_gib", r.step, gib(largest(&r.peak_host_mem)))?;
        if largest(&r.peak_gpu_mem) > 0 {
            self.scalar("memory/peak_gpu_gib", r.step, gib(largest(&r.peak_gpu_mem)))?;
        }
        Ok(())
    }

    /// The per-position loss of `step`: one scalar per bin, tagged with the bin's first position.
    pub fn positions(&mut self, step: u64, bin_starts: &[u64], loss: &[f64]) -> std::io::Result<()> {
        let digits = bin_starts.last().map_or(1, |p| p.to_string().len());
        for (start, &value) in bin_starts.iter().zip(loss) {
            self.scalar(&format!("position_loss/{start:0digits$}"), step, value)?;
        }
        Ok(())
    }
}

/// `loss` -> `train/loss`, `tokens_per_s` -> `perf/tokens_per_s`, `time_forward` -> `time/forward`.
fn column_tag(name: &str) -> String {
    match name {
        "loss" | "lr" | "grad_norm" => format!("train/{name}"),
        // The held-out loss beside `ulysses eval`'s `eval/...` tags.
        "eval_loss" => "eval/loss".into(),
        _ => match name.strip_prefix("time_") {
            Some(part) => format!("time/{part}"),
            None => format!("perf/{name}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::column_tag;

    #[test]
    fn columns_are_grouped() {
        assert_eq!(column_tag("loss"), "train/loss");
        assert_eq!(column_tag("eval_loss"), "eval/loss");
        assert_eq!(column_tag("mfu"), "perf/mfu");
        assert_eq!(column_tag("step_time"), "perf/step_time");
        assert_eq!(column_tag("time_checkpoint"), "time/checkpoint");
    }
}
