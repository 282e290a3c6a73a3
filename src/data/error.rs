//! Every way a shard, an input file or a loader request can be wrong. Each message names the file,
//! the dataset or attribute, the value found and what would be valid, so the user can fix it
//! without reading the code.
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: no such file or folder; make shards with `ulysses data prepare` or `ulysses data synth`", .path.display())]
    NotFound { path: PathBuf },
    #[error("{}: folder holds no *.h5 shards; make some with `ulysses data prepare` or `ulysses data synth`", .path.display())]
    NoShards { path: PathBuf },
    #[error("{}: cannot open as HDF5 ({detail}); the file is truncated, corrupt or not an HDF5 shard", .path.display())]
    Open { path: PathBuf, detail: String },
    #[error("{}: has no {what} `{name}`; a ulysses shard needs it (see docs/data.md)", .path.display())]
    Missing { path: PathBuf, what: &'static str, name: String },
    #[error("{}: {what} `{name}` {found}; expected {expected}", .path.display())]
    Invalid { path: PathBuf, what: &'static str, name: String, found: String, expected: String },
    #[error("{}: dataset `tokens` holds sequences of {found} tokens but data.seq_len = {expected}; set data.seq_len = {found} or use shards made for {expected}", .path.display())]
    SeqLen { path: PathBuf, found: usize, expected: usize },
    #[error("{}: attribute `{name}` = {found} differs from {} in {}; all shards of one dataset must share one tokenizer", .path.display(), .expected, .first.display())]
    Inconsistent { path: PathBuf, name: &'static str, found: String, expected: String, first: PathBuf },
    #[error("{}: dataset `tokens` sequence {row} (global index {index}) position {position} holds token id {value}, outside [0, vocab_size = {vocab_size}); the shard is corrupt or was made with another tokenizer", .path.display())]
    TokenOutOfRange { path: PathBuf, index: usize, row: usize, position: usize, value: i32, vocab_size: i64 },
    #[error("{}: dataset `docs/starts` of sequence {row} (global index {index}): document start {value} (entry {entry} of the sequence) {problem}; starts must be positions in [0, seq_len = {seq_len}), strictly increasing; re-create the shard with `ulysses data prepare`", .path.display())]
    BadDocStart { path: PathBuf, row: usize, index: usize, entry: usize, value: i64, problem: String, seq_len: usize },
    #[error("{}: records no document boundaries (`docs/*`), but data.documents = \"mask\" needs them; make shards with `ulysses data prepare` or `ulysses data synth --task random --doc-len N`, or set data.documents = \"ignore\"", .path.display())]
    NoDocuments { path: PathBuf },
    #[error("{}: reading dataset `{dataset}` failed ({detail}); the file is truncated or corrupt", .path.display())]
    Read { path: PathBuf, dataset: String, detail: String },
    #[error("{}: writing dataset `{dataset}` failed ({detail})", .path.display())]
    Write { path: PathBuf, dataset: String, detail: String },
    #[error("sequence index {index} is outside the dataset's {len} sequences")]
    IndexOutOfRange { index: usize, len: usize },
    #[error("token span [{start}, {end}) is outside a sequence of {seq_len} tokens")]
    SpanOutOfRange { start: usize, end: usize, seq_len: usize },
    #[error("data.seq_len = {seq_len} is not divisible by parallel.sp = {sp}; use a multiple of {sp}")]
    Indivisible { seq_len: usize, sp: usize },
    #[error("loader: {0}")]
    Spec(String),
    #[error("the dataset has {sequences} sequences, fewer than dp × micro_batch = {dp} × {micro_batch}; one step needs at least {}", .dp * .micro_batch)]
    TooFewSequences { sequences: usize, dp: usize, micro_batch: usize },
    #[error("the loader's prefetch thread stopped after an earlier error")]
    LoaderStopped,
    #[error("{}: {source}", .path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: line {line}: {message}", .path.display())]
    Input { path: PathBuf, line: u64, message: String },
    #[error("{}: record {record}, field `{field}`: {message}", .path.display())]
    Record { path: PathBuf, record: u64, field: String, message: String },
    #[error("tokenizer {}: {message}", .path.display())]
    Tokenizer { path: PathBuf, message: String },
    #[error("{0}")]
    Usage(String),
}

impl DataError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> DataError {
        DataError::Io { path: path.to_path_buf(), source }
    }

    pub(crate) fn read(path: &Path, dataset: &str, e: impl std::fmt::Display) -> DataError {
        DataError::Read { path: path.to_path_buf(), dataset: dataset.into(), detail: e.to_string() }
    }

    pub(crate) fn write(path: &Path, dataset: &str, e: impl std::fmt::Display) -> DataError {
        DataError::Write { path: path.to_path_buf(), dataset: dataset.into(), detail: e.to_string() }
    }
}
