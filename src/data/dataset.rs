//! The read side: several shard files seen as one dataset of fixed-length sequences. Every shard
//! is checked when opened (format, dtype, rank, seq_len, tokenizer agreement) and every span is
//! range-checked when read, so a bad file fails loudly instead of feeding wrong tokens.
use super::format::{FORMAT_NAME, FORMAT_VERSION, TOKENS};
use super::DataError;
use hdf5::types::{IntSize, TypeDescriptor, VarLenUnicode};
use ndarray::s;
use std::path::{Path, PathBuf};

/// Task metadata of one passkey-retrieval sequence (written by `ulysses data synth`).
#[derive(Clone, Debug, PartialEq)]
pub struct PasskeyInfo {
    /// Requested depth of the needle as a fraction of the filler (0 = start, 1 = end).
    pub depth: f32,
    pub key: u64,
    /// Position of the needle sentence's first token.
    pub needle_start: usize,
    /// Position of the answer's first token; the answer ends the sequence.
    pub answer_start: usize,
    pub answer_tokens: Vec<i32>,
}

struct Shard {
    path: PathBuf,
    /// Kept open for the optional `docs` and `passkey` groups (and because closing the file
    /// would invalidate the dataset handle).
    file: hdf5::File,
    tokens: hdf5::Dataset,
    len: usize,
}

pub struct Dataset {
    shards: Vec<Shard>,
    /// Global index of each shard's first sequence.
    first_index: Vec<usize>,
    len: usize,
    seq_len: usize,
    vocab_size: i64,
    eos_id: i64,
    tokenizer: String,
}

/// `paths` may name shard files or folders of `*.h5` shards (taken in name order).
pub fn shard_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, DataError> {
    let mut files = Vec::new();
    for p in paths {
        if !p.exists() {
            return Err(DataError::NotFound { path: p.clone() });
        }
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| DataError::io(p, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.is_file() && f.extension().is_some_and(|x| x == "h5"))
                .collect();
            if found.is_empty() {
                return Err(DataError::NoShards { path: p.clone() });
            }
            found.sort();
            files.extend(found);
        } else {
            files.push(p.clone());
        }
    }
    Ok(files)
}

pub(crate) fn read_i64_attr(loc: &hdf5::Location, path: &Path, name: &str) -> Result<i64, DataError> {
    let attr = loc.attr(name).map_err(|_| DataError::Missing { path: path.into(), what: "attribute", name: name.into() })?;
    attr.read_scalar::<i64>().map_err(|e| invalid(path, "attribute", name, format!("cannot be read as an integer ({e})"), "a scalar integer"))
}

pub(crate) fn read_str_attr(loc: &hdf5::Location, path: &Path, name: &str) -> Result<String, DataError> {
    let attr = loc.attr(name).map_err(|_| DataError::Missing { path: path.into(), what: "attribute", name: name.into() })?;
    let v = attr.read_scalar::<VarLenUnicode>();
    v.map(|s| s.as_str().to_string())
        .map_err(|e| invalid(path, "attribute", name, format!("cannot be read as a string ({e})"), "a variable-length UTF-8 string"))
}

fn invalid(path: &Path, what: &'static str, name: &str, found: String, expected: &str) -> DataError {
    DataError::Invalid { path: path.into(), what, name: name.into(), found, expected: expected.into() }
}

/// Opens one shard and checks everything that can be checked without reading the tokens.
fn open_shard(path: &Path, seq_len: usize) -> Result<(Shard, i64, i64, String), DataError> {
    let file = hdf5::File::open(path).map_err(|e| DataError::Open { path: path.into(), detail: e.to_string() })?;
    let format = read_str_attr(&file, path, "format")?;
    if format != FORMAT_NAME {
        return Err(invalid(path, "attribute", "format", format!("= \"{format}\""), &format!("\"{FORMAT_NAME}\"")));
    }
    let version = read_i64_attr(&file, path, "format_version")?;
    if version != FORMAT_VERSION {
        let expected = format!("{FORMAT_VERSION} (this build reads version {FORMAT_VERSION}; re-create the shard or upgrade ulysses)");
        return Err(invalid(path, "attribute", "format_version", format!("= {version}"), &expected));
    }
    let vocab_size = read_i64_attr(&file, path, "vocab_size")?;
    if vocab_size <= 0 || vocab_size > i32::MAX as i64 {
        return Err(invalid(path, "attribute", "vocab_size", format!("= {vocab_size}"), "a positive number below 2^31"));
    }
    let eos_id = read_i64_attr(&file, path, "eos_id")?;
    if !(0..vocab_size).contains(&eos_id) {
        return Err(invalid(path, "attribute", "eos_id", format!("= {eos_id}"), &format!("an id in [0, vocab_size = {vocab_size})")));
    }
    let tokenizer = read_str_attr(&file, path, "tokenizer")?;

    let tokens = file.dataset(TOKENS).map_err(|_| DataError::Missing { path: path.into(), what: "dataset", name: TOKENS.into() })?;
    let dtype = tokens.dtype().and_then(|t| t.to_descriptor()).map_err(|e| DataError::read(path, TOKENS, e))?;
    if dtype != TypeDescriptor::Integer(IntSize::U4) {
        return Err(invalid(path, "dataset", TOKENS, format!("has dtype {dtype}"), "int32 token ids"));
    }
    let shape = tokens.shape();
    if shape.len() != 2 {
        return Err(invalid(path, "dataset", TOKENS, format!("has rank {} (shape {shape:?})", shape.len()), "rank 2: [num_sequences, seq_len]"));
    }
    if shape[1] != seq_len {
        return Err(DataError::SeqLen { path: path.into(), found: shape[1], expected: seq_len });
    }
    let len = shape[0];
    check_per_sequence(&file, path, len)?;
    Ok((Shard { path: path.into(), file, tokens, len }, vocab_size, eos_id, tokenizer))
}

/// Optional per-sequence datasets must have one entry per sequence, or their lookups would
/// silently describe another sequence.
fn check_per_sequence(file: &hdf5::File, path: &Path, len: usize) -> Result<(), DataError> {
    let mut expect = Vec::new();
    if file.link_exists("docs") {
        expect.push(("docs/offsets".to_string(), len + 1));
    }
    if file.link_exists("passkey") {
        for name in ["depth", "key", "needle_start", "answer_start", "answer_len", "answer_tokens"] {
            expect.push((format!("passkey/{name}"), len));
        }
    }
    for (name, rows) in expect {
        let ds = file.dataset(&name).map_err(|_| DataError::Missing { path: path.into(), what: "dataset", name: name.clone() })?;
        let found = ds.shape().first().copied().unwrap_or(0);
        if found != rows {
            return Err(invalid(path, "dataset", &name, format!("has {found} rows"), &format!("{rows} (one per sequence of `tokens`)")));
        }
    }
    Ok(())
}

impl Dataset {
    /// paths: shard files or folders holding `*.h5` shards (sorted by name). Checks every shard:
    /// format version, dataset exists, dtype int32, rank 2, seq_len == expected, and that all
    /// shards share vocab size, EOS id and tokenizer.
    pub fn open(paths: &[PathBuf], seq_len: usize) -> Result<Dataset, DataError> {
        if seq_len == 0 {
            return Err(DataError::Usage("data.seq_len is 0; must be a positive number of tokens".into()));
        }
        let files = shard_files(paths)?;
        if files.is_empty() {
            return Err(DataError::Usage("no data paths given; list shard files or folders of them".into()));
        }
        let mut shards: Vec<Shard> = Vec::new();
        let (mut first_index, mut len) = (Vec::new(), 0);
        let mut meta: Option<(i64, i64, String)> = None;
        for f in &files {
            let (shard, vocab, eos, tok) = open_shard(f, seq_len)?;
            if let Some((v0, e0, t0)) = &meta {
                let first = &shards[0].path;
                let mismatch = |name, found: String, expected: String| DataError::Inconsistent { path: f.clone(), name, found, expected, first: first.clone() };
                if vocab != *v0 {
                    return Err(mismatch("vocab_size", vocab.to_string(), v0.to_string()));
                }
                if eos != *e0 {
                    return Err(mismatch("eos_id", eos.to_string(), e0.to_string()));
                }
                if tok != *t0 {
                    return Err(mismatch("tokenizer", format!("\"{tok}\""), format!("\"{t0}\"")));
                }
            } else {
                meta = Some((vocab, eos, tok));
            }
            first_index.push(len);
            len += shard.len;
            shards.push(shard);
        }
        let (vocab_size, eos_id, tokenizer) = meta.expect("at least one shard was opened");
        Ok(Dataset { shards, first_index, len, seq_len, vocab_size, eos_id, tokenizer })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    pub fn vocab_size(&self) -> i64 {
        self.vocab_size
    }

    pub fn eos_id(&self) -> i64 {
        self.eos_id
    }

    /// Tokenizer identity shared by all shards (`byte` or `huggingface fnv1a64:...`).
    pub fn tokenizer(&self) -> &str {
        &self.tokenizer
    }

    pub fn shard_paths(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }

    /// The shard holding global sequence `index`, and the row inside it.
    fn locate(&self, index: usize) -> Result<(&Shard, usize), DataError> {
        if index >= self.len {
            return Err(DataError::IndexOutOfRange { index, len: self.len });
        }
        let k = self.first_index.partition_point(|&first| first <= index) - 1;
        Ok((&self.shards[k], index - self.first_index[k]))
    }

    /// Tokens [start, end) of sequence `index` (global over shards): one hyperslab read, every
    /// id checked against the vocabulary.
    pub fn read_span(&self, index: usize, start: usize, end: usize) -> Result<Vec<i32>, DataError> {
        if start > end || end > self.seq_len {
            return Err(DataError::SpanOutOfRange { start, end, seq_len: self.seq_len });
        }
        let (shard, row) = self.locate(index)?;
        let span = shard
            .tokens
            .read_slice_1d::<i32, _>(s![row, start..end])
            .map_err(|e| DataError::read(&shard.path, TOKENS, format!("sequence {row}, tokens {start}..{end}: {e}")))?;
        let span = span.into_raw_vec_and_offset().0;
        if let Some((i, &value)) = span.iter().enumerate().find(|(_, &t)| t < 0 || t as i64 >= self.vocab_size) {
            let path = shard.path.clone();
            return Err(DataError::TokenOutOfRange { path, index, row, position: start + i, value, vocab_size: self.vocab_size });
        }
        Ok(span)
    }

    /// Per-sequence passkey metadata, if the shard has a `passkey` group.
    pub fn passkey(&self, index: usize) -> Result<Option<PasskeyInfo>, DataError> {
        let (shard, row) = self.locate(index)?;
        if !shard.file.link_exists("passkey") {
            return Ok(None);
        }
        let p = &shard.path;
        let read_i64 = |name: &str| -> Result<i64, DataError> {
            let full = format!("passkey/{name}");
            let ds = shard.file.dataset(&full).map_err(|e| DataError::read(p, &full, e))?;
            ds.read_slice_1d::<i64, _>(s![row..row + 1]).map(|a| a[0]).map_err(|e| DataError::read(p, &full, e))
        };
        let depth_ds = shard.file.dataset("passkey/depth").map_err(|e| DataError::read(p, "passkey/depth", e))?;
        let depth = depth_ds.read_slice_1d::<f32, _>(s![row..row + 1]).map_err(|e| DataError::read(p, "passkey/depth", e))?[0];
        let answer_len = read_i64("answer_len")?;
        let tokens_ds = shard.file.dataset("passkey/answer_tokens").map_err(|e| DataError::read(p, "passkey/answer_tokens", e))?;
        let width = tokens_ds.shape().get(1).copied().unwrap_or(0);
        if answer_len < 0 || answer_len as usize > width {
            return Err(invalid(p, "dataset", "passkey/answer_len", format!("= {answer_len} for sequence {row}"), &format!("0..={width}")));
        }
        let answer = tokens_ds
            .read_slice_1d::<i32, _>(s![row, ..answer_len as usize])
            .map_err(|e| DataError::read(p, "passkey/answer_tokens", e))?;
        Ok(Some(PasskeyInfo {
            depth,
            key: read_i64("key")? as u64,
            needle_start: read_i64("needle_start")? as usize,
            answer_start: read_i64("answer_start")? as usize,
            answer_tokens: answer.to_vec(),
        }))
    }

    /// Positions where a document begins in sequence `index`, if the shard records them
    /// (`docs` group, written by `ulysses data prepare`).
    pub fn doc_starts(&self, index: usize) -> Result<Option<Vec<usize>>, DataError> {
        let (shard, row) = self.locate(index)?;
        if !shard.file.link_exists("docs") {
            return Ok(None);
        }
        let p = &shard.path;
        let offsets = shard.file.dataset("docs/offsets").map_err(|e| DataError::read(p, "docs/offsets", e))?;
        let o = offsets.read_slice_1d::<i64, _>(s![row..row + 2]).map_err(|e| DataError::read(p, "docs/offsets", e))?;
        let starts = shard.file.dataset("docs/starts").map_err(|e| DataError::read(p, "docs/starts", e))?;
        let total = starts.shape().first().copied().unwrap_or(0) as i64;
        if o[0] < 0 || o[0] > o[1] || o[1] > total {
            return Err(invalid(p, "dataset", "docs/offsets", format!("= [{}, {}] for sequence {row}", o[0], o[1]), &format!("a range inside docs/starts (0..={total})")));
        }
        let v = starts
            .read_slice_1d::<i32, _>(s![o[0] as usize..o[1] as usize])
            .map_err(|e| DataError::read(p, "docs/starts", e))?;
        Ok(Some(v.iter().map(|&x| x as usize).collect()))
    }
}
