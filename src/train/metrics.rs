//! metrics.h5: one row per optimizer step, written by rank 0 and flushed every step so a crash
//! loses at most the step in flight. Schema in docs/metrics.md.
use crate::config::Experiment;
use anyhow::{Context, Result};
use hdf5::types::VarLenUnicode;
use std::path::Path;

pub struct StepRow {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: u64,
    pub step_time: f64,
    pub tokens_per_s: f64,
}

pub struct MetricsWriter {
    file: hdf5::File,
    rows: usize,
}

const F64_COLUMNS: &[&str] = &["loss", "lr", "grad_norm", "step_time", "tokens_per_s"];
const U64_COLUMNS: &[&str] = &["step", "tokens"];

impl MetricsWriter {
    pub fn create(path: &Path, exp: &Experiment) -> Result<MetricsWriter> {
        let file = hdf5::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let steps = file.create_group("steps")?;
        for name in F64_COLUMNS {
            steps.new_dataset::<f64>().chunk(256).shape(0..).create(*name)?;
        }
        for name in U64_COLUMNS {
            steps.new_dataset::<u64>().chunk(256).shape(0..).create(*name)?;
        }
        let text = |s: &str| -> Result<VarLenUnicode> { Ok(s.parse::<VarLenUnicode>().map_err(|e| anyhow::anyhow!("{e}"))?) };
        file.new_attr::<VarLenUnicode>().create("config_toml")?.write_scalar(&text(&exp.to_toml())?)?;
        file.new_attr::<VarLenUnicode>().create("ulysses_version")?.write_scalar(&text(env!("CARGO_PKG_VERSION"))?)?;
        file.new_attr::<u32>().create("schema_version")?.write_scalar(&1u32)?;
        file.flush()?;
        Ok(MetricsWriter { file, rows: 0 })
    }

    pub fn append(&mut self, r: &StepRow) -> Result<()> {
        let n = self.rows;
        let steps = self.file.group("steps")?;
        let put_f = |name: &str, v: f64| -> Result<()> {
            let ds = steps.dataset(name)?;
            ds.resize(n + 1)?;
            ds.write_slice(&[v], n..n + 1)?;
            Ok(())
        };
        let put_u = |name: &str, v: u64| -> Result<()> {
            let ds = steps.dataset(name)?;
            ds.resize(n + 1)?;
            ds.write_slice(&[v], n..n + 1)?;
            Ok(())
        };
        put_u("step", r.step)?;
        put_u("tokens", r.tokens)?;
        put_f("loss", r.loss)?;
        put_f("lr", r.lr)?;
        put_f("grad_norm", r.grad_norm)?;
        put_f("step_time", r.step_time)?;
        put_f("tokens_per_s", r.tokens_per_s)?;
        self.file.flush()?;
        self.rows += 1;
        Ok(())
    }
}
