//! The results file of `ulysses eval` (schema in docs/eval.md): written by rank 0, read back by
//! the plots, `ulysses report` and the tests.
use super::grid::{GridResult, GridSpec};
use super::loss::LossResult;
use super::{EvalError, EvalTask};
use crate::config::PositionBy;
use hdf5::types::VarLenUnicode;
use hdf5::{H5Type, Location};
use ndarray::{Array1, Array3, Dimension};
use std::path::{Path, PathBuf};

pub const SCHEMA_VERSION: i64 = 1;

/// Where the numbers came from; stored as attributes of the file's root.
pub struct Provenance<'a> {
    pub checkpoint: &'a Path,
    /// The resolved experiment TOML.
    pub config_toml: &'a str,
    /// The command line that made the file.
    pub command: &'a str,
    pub sp: usize,
    pub dp: usize,
}

/// What a results file holds.
#[derive(Clone, Debug, PartialEq)]
pub enum EvalResults {
    /// passkey or niah.
    Grid {
        task: EvalTask,
        result: Box<GridResult>,
    },
    Loss(LossResult),
}

fn text_attr(loc: &Location, path: &Path, name: &str, value: &str) -> Result<(), EvalError> {
    crate::h5::write_text_attr(loc, name, value).map_err(|e| EvalError::results(path, "writing an attribute", e))
}

fn int_attr(loc: &Location, path: &Path, name: &str, value: i64) -> Result<(), EvalError> {
    crate::h5::write_scalar_attr(loc, name, &value).map_err(|e| EvalError::results(path, "writing an attribute", e))
}

fn dataset<T: H5Type, D: Dimension>(
    loc: &hdf5::Group,
    path: &Path,
    name: &str,
    data: &ndarray::Array<T, D>,
) -> Result<(), EvalError> {
    loc.new_dataset_builder()
        .with_data(data)
        .create(name)
        .map(|_| ())
        .map_err(|e| EvalError::results(path, "writing a dataset", format!("{name}: {e}")))
}

fn to_i64(v: &[usize]) -> Array1<i64> {
    v.iter().map(|&x| x as i64).collect()
}

/// Creates the file (replacing one already there) with the attributes common to every task.
fn create(path: &Path, task: EvalTask, p: &Provenance) -> Result<hdf5::File, EvalError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| EvalError::results(dir, "creating the folder", e))?;
    }
    crate::files::clear(path).map_err(|e| EvalError::results(path, "replacing the file", e))?;
    let file = hdf5::File::create_excl(path).map_err(|e| EvalError::results(path, "creating the file", e))?;
    text_attr(&file, path, "task", task.name())?;
    text_attr(&file, path, "checkpoint", &p.checkpoint.display().to_string())?;
    text_attr(&file, path, "config_toml", p.config_toml)?;
    text_attr(&file, path, "command", p.command)?;
    text_attr(&file, path, "ulysses_version", env!("CARGO_PKG_VERSION"))?;
    int_attr(&file, path, "schema_version", SCHEMA_VERSION)?;
    int_attr(&file, path, "sp", p.sp as i64)?;
    int_attr(&file, path, "dp", p.dp as i64)?;
    Ok(file)
}

/// `task`: passkey or niah, the task `grid` was made for; `tokenizer`: the name of the tokenizer
/// its text went through (`TextTokenizer::name`).
pub fn write_grid(
    path: &Path,
    task: EvalTask,
    p: &Provenance,
    grid: &GridSpec,
    tokenizer: &str,
    r: &GridResult,
) -> Result<(), EvalError> {
    let file = create(path, task, p)?;
    text_attr(&file, path, "tokenizer", tokenizer)?;
    int_attr(&file, path, "key_digits", i64::from(grid.key_digits))?;
    int_attr(&file, path, "seed", grid.seed as i64)?;
    dataset(&file, path, "lengths", &to_i64(&r.lengths))?;
    dataset(&file, path, "depths", &Array1::from(r.depths.clone()))?;
    dataset(&file, path, "accuracy", &r.accuracy())?;
    dataset(&file, path, "token_accuracy", &r.token_accuracy())?;
    dataset(&file, path, "answer_logprob", &r.mean_logprob())?;
    let samples = r.accuracy().mapv(|_| r.logprob.shape()[2] as i64);
    dataset(&file, path, "samples", &samples)?;
    let group = file.create_group("sample").map_err(|e| EvalError::results(path, "creating group sample", e))?;
    dataset(&group, path, "logprob", &r.logprob)?;
    dataset(&group, path, "correct_tokens", &r.correct_tokens)?;
    dataset(&group, path, "answer_tokens", &r.answer_tokens)?;
    dataset(&group, path, "needle_start", &r.needle_start)?;
    dataset(&group, path, "key", &r.key)?;
    file.flush().map_err(|e| EvalError::results(path, "flushing", e))
}

pub fn write_loss(path: &Path, p: &Provenance, data: &[PathBuf], r: &LossResult) -> Result<(), EvalError> {
    let file = create(path, EvalTask::Loss, p)?;
    let data: Vec<String> = data.iter().map(|d| d.display().to_string()).collect();
    text_attr(&file, path, "data", &data.join("\n"))?;
    int_attr(&file, path, "seq_len", r.seq_len as i64)?;
    int_attr(&file, path, "sequences", r.sequences as i64)?;
    text_attr(&file, path, "position_by", r.by.name())?;
    dataset(&file, path, "bin_start", &to_i64(&r.bin_start))?;
    dataset(&file, path, "bin_end", &to_i64(&r.bin_end))?;
    dataset(&file, path, "loss", &Array1::from(r.loss.clone()))?;
    dataset(&file, path, "tokens", &Array1::from(r.tokens.clone()))?;
    file.flush().map_err(|e| EvalError::results(path, "flushing", e))
}

fn read_1d<T: H5Type>(file: &hdf5::File, path: &Path, name: &str) -> Result<Vec<T>, EvalError> {
    file.dataset(name)
        .and_then(|d| d.read_raw::<T>())
        .map_err(|e| EvalError::results(path, "reading", format!("{name}: {e}")))
}

fn read_3d<T: H5Type>(file: &hdf5::File, path: &Path, name: &str) -> Result<Array3<T>, EvalError> {
    file.dataset(name)
        .and_then(|d| d.read::<T, ndarray::Ix3>())
        .map_err(|e| EvalError::results(path, "reading", format!("{name}: {e}")))
}

fn read_int_attr(file: &hdf5::File, path: &Path, name: &str) -> Result<i64, EvalError> {
    file.attr(name)
        .and_then(|a| a.read_scalar::<i64>())
        .map_err(|e| EvalError::results(path, "reading", format!("attribute {name}: {e}")))
}

fn usizes(v: Vec<i64>) -> Vec<usize> {
    v.into_iter().map(|x| x.max(0) as usize).collect()
}

/// Reads a results file written by `write_grid` or `write_loss`.
pub fn read(path: &Path) -> Result<EvalResults, EvalError> {
    let file = hdf5::File::open(path)
        .map_err(|e| EvalError::results(path, "opening (is it a ulysses eval results file?)", e))?;
    let version = read_int_attr(&file, path, "schema_version")?;
    if version != SCHEMA_VERSION {
        return Err(EvalError::results(
            path,
            "reading",
            format!("schema_version {version}; this build reads {SCHEMA_VERSION}"),
        ));
    }
    let task = file
        .attr("task")
        .and_then(|a| a.read_scalar::<VarLenUnicode>())
        .map_err(|e| EvalError::results(path, "reading", format!("attribute task: {e}")))?;
    let task = match task.as_str() {
        "passkey" => EvalTask::Passkey,
        "niah" => EvalTask::Niah,
        "loss" => {
            let r = LossResult {
                seq_len: read_int_attr(&file, path, "seq_len")? as usize,
                sequences: read_int_attr(&file, path, "sequences")? as usize,
                // Files written before packed documents have no `position_by`: sequence positions.
                by: match file.attr("position_by").and_then(|a| a.read_scalar::<VarLenUnicode>()) {
                    Ok(v) if v.as_str() == "document" => PositionBy::Document,
                    _ => PositionBy::Sequence,
                },
                bin_start: usizes(read_1d(&file, path, "bin_start")?),
                bin_end: usizes(read_1d(&file, path, "bin_end")?),
                loss: read_1d(&file, path, "loss")?,
                tokens: read_1d(&file, path, "tokens")?,
            };
            let n = r.bin_start.len();
            if [r.bin_end.len(), r.loss.len(), r.tokens.len()].iter().any(|&m| m != n) {
                return Err(inconsistent(path, "bin_start, bin_end, loss and tokens differ in length"));
            }
            return Ok(EvalResults::Loss(r));
        }
        other => {
            return Err(EvalError::results(
                path,
                "reading",
                format!("unknown task \"{other}\"; expected passkey, niah or loss"),
            ))
        }
    };
    let result = GridResult {
        lengths: usizes(read_1d(&file, path, "lengths")?),
        depths: read_1d(&file, path, "depths")?,
        logprob: read_3d(&file, path, "sample/logprob")?,
        correct_tokens: read_3d(&file, path, "sample/correct_tokens")?,
        answer_tokens: read_3d(&file, path, "sample/answer_tokens")?,
        needle_start: read_3d(&file, path, "sample/needle_start")?,
        key: read_3d(&file, path, "sample/key")?,
    };
    let expected = [result.lengths.len(), result.depths.len(), result.logprob.shape()[2]];
    let arrays = [&result.correct_tokens, &result.answer_tokens, &result.needle_start, &result.key];
    if result.logprob.shape() != expected || arrays.iter().any(|a| a.shape() != expected) {
        return Err(inconsistent(path, "sample/* are not all [lengths, depths, samples]"));
    }
    Ok(EvalResults::Grid { task, result: Box::new(result) })
}

fn inconsistent(path: &Path, what: &str) -> EvalError {
    EvalError::results(path, "reading", format!("{what}; the file is not a complete results file"))
}
