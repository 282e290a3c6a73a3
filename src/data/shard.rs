//! Opening one shard: everything that can be checked without reading the tokens is checked here
//! (format, version, attributes, dtype, rank, seq_len, per-sequence metadata), so a bad file is
//! refused before training starts.
use super::format::{FORMAT_NAME, FORMAT_VERSION, LOSS_MASK, PAD_START, TOKENS};
use super::DataError;
use hdf5::types::{IntSize, TypeDescriptor, VarLenUnicode};
use ndarray::s;
use std::ops::Range;
use std::path::{Path, PathBuf};

pub(crate) struct Shard {
    pub path: PathBuf,
    /// Kept open for the optional `docs` and `passkey` groups (and because closing the file
    /// would invalidate the dataset handle).
    pub file: hdf5::File,
    pub tokens: hdf5::Dataset,
    pub len: usize,
    pub vocab_size: i64,
    pub eos_id: i64,
    pub tokenizer: String,
    /// The shard records where padding begins in each sequence (`docs/pad_start`).
    pub has_padding: bool,
    /// Which tokens are trained (`loss_mask`, format version 2), checked to match `tokens`.
    pub loss_mask: Option<hdf5::Dataset>,
}

/// `paths` may name shard files or folders of `*.h5` shards (taken in name order).
pub fn shard_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, DataError> {
    let mut files = Vec::new();
    for p in paths {
        if !p.exists() {
            return Err(DataError::NotFound { path: p.clone() });
        }
        if !p.is_dir() {
            files.push(p.clone());
            continue;
        }
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
    }
    Ok(files)
}

fn missing(path: &Path, what: &'static str, name: &str) -> DataError {
    DataError::Missing { path: path.into(), what, name: name.into() }
}

pub(crate) fn invalid(path: &Path, what: &'static str, name: &str, found: String, expected: &str) -> DataError {
    let (name, expected) = (name.into(), expected.into());
    DataError::Invalid { path: path.into(), what, name, found, expected }
}

pub(crate) fn read_i64_attr(loc: &hdf5::Location, path: &Path, name: &str) -> Result<i64, DataError> {
    let attr = loc.attr(name).map_err(|_| missing(path, "attribute", name))?;
    attr.read_scalar::<i64>().map_err(|e| {
        let found = format!("cannot be read as an integer ({e})");
        invalid(path, "attribute", name, found, "a scalar integer")
    })
}

pub(crate) fn read_str_attr(loc: &hdf5::Location, path: &Path, name: &str) -> Result<String, DataError> {
    let attr = loc.attr(name).map_err(|_| missing(path, "attribute", name))?;
    match attr.read_scalar::<VarLenUnicode>() {
        Ok(s) => Ok(s.as_str().to_string()),
        Err(e) => {
            let found = format!("cannot be read as a string ({e})");
            Err(invalid(path, "attribute", name, found, "a variable-length UTF-8 string"))
        }
    }
}

impl Shard {
    pub fn open(path: &Path, seq_len: usize) -> Result<Shard, DataError> {
        let file = hdf5::File::open(path).map_err(|e| DataError::Open { path: path.into(), detail: e.to_string() })?;
        let format = read_str_attr(&file, path, "format")?;
        if format != FORMAT_NAME {
            let (found, expected) = (format!("= \"{format}\""), format!("\"{FORMAT_NAME}\""));
            return Err(invalid(path, "attribute", "format", found, &expected));
        }
        let version = read_i64_attr(&file, path, "format_version")?;
        if !(1..=FORMAT_VERSION).contains(&version) {
            let expected = format!(
                "1 to {FORMAT_VERSION} (the versions this build reads; re-create the shard or upgrade ulysses)"
            );
            return Err(invalid(path, "attribute", "format_version", format!("= {version}"), &expected));
        }
        let vocab_size = read_i64_attr(&file, path, "vocab_size")?;
        if vocab_size <= 0 || vocab_size > i32::MAX as i64 {
            let found = format!("= {vocab_size}");
            return Err(invalid(path, "attribute", "vocab_size", found, "a positive number below 2^31"));
        }
        let eos_id = read_i64_attr(&file, path, "eos_id")?;
        if !(0..vocab_size).contains(&eos_id) {
            let expected = format!("an id in [0, vocab_size = {vocab_size})");
            return Err(invalid(path, "attribute", "eos_id", format!("= {eos_id}"), &expected));
        }
        let tokenizer = read_str_attr(&file, path, "tokenizer")?;

        let tokens = file.dataset(TOKENS).map_err(|_| missing(path, "dataset", TOKENS))?;
        let dtype = tokens.dtype().and_then(|t| t.to_descriptor());
        let dtype = dtype.map_err(|e| DataError::read(path, TOKENS, e))?;
        if dtype != TypeDescriptor::Integer(IntSize::U4) {
            let found = format!("has dtype {dtype}");
            return Err(invalid(path, "dataset", TOKENS, found, "int32 token ids"));
        }
        let shape = tokens.shape();
        if shape.len() != 2 {
            let found = format!("has rank {} (shape {shape:?})", shape.len());
            return Err(invalid(path, "dataset", TOKENS, found, "rank 2: [num_sequences, seq_len]"));
        }
        if shape[1] != seq_len {
            return Err(DataError::SeqLen { path: path.into(), found: shape[1], expected: seq_len });
        }
        let len = shape[0];
        check_per_sequence(&file, path, len)?;
        let has_padding = file.link_exists("docs") && file.link_exists(PAD_START);
        let loss_mask = open_loss_mask(&file, path, version, &shape)?;
        Ok(Shard { path: path.into(), file, tokens, len, vocab_size, eos_id, tokenizer, has_padding, loss_mask })
    }

    /// Elements `range` of the 1-D dataset `name` (per-sequence metadata).
    pub fn read_1d<T: hdf5::H5Type>(&self, name: &str, range: Range<usize>) -> Result<Vec<T>, DataError> {
        let ds = self.file.dataset(name).map_err(|e| DataError::read(&self.path, name, e))?;
        let v = ds.read_slice_1d::<T, _>(s![range]).map_err(|e| DataError::read(&self.path, name, e))?;
        Ok(v.into_raw_vec_and_offset().0)
    }
}

/// The optional `loss_mask`: uint8, shaped as `tokens`, in a shard of version 2 or later (a
/// version 1 reader would train on every token of it without a word).
fn open_loss_mask(
    file: &hdf5::File,
    path: &Path,
    version: i64,
    shape: &[usize],
) -> Result<Option<hdf5::Dataset>, DataError> {
    if !file.link_exists(LOSS_MASK) {
        return Ok(None);
    }
    if version < 2 {
        let found = format!("= {version}, but the shard has a `{LOSS_MASK}`");
        return Err(invalid(path, "attribute", "format_version", found, "2 (the version that added the mask)"));
    }
    let mask = file.dataset(LOSS_MASK).map_err(|e| DataError::read(path, LOSS_MASK, e))?;
    let dtype = mask.dtype().and_then(|t| t.to_descriptor()).map_err(|e| DataError::read(path, LOSS_MASK, e))?;
    if dtype != TypeDescriptor::Unsigned(IntSize::U1) {
        let found = format!("has dtype {dtype}");
        return Err(invalid(path, "dataset", LOSS_MASK, found, "uint8 0/1 per token (numpy: mask.astype(np.uint8))"));
    }
    if mask.shape() != shape {
        let found = format!("has shape {:?}", mask.shape());
        return Err(invalid(path, "dataset", LOSS_MASK, found, &format!("the shape of `tokens`, {shape:?}")));
    }
    Ok(Some(mask))
}

/// Optional per-sequence datasets must have one entry per sequence, or their lookups would
/// silently describe another sequence.
fn check_per_sequence(file: &hdf5::File, path: &Path, len: usize) -> Result<(), DataError> {
    let mut expect = Vec::new();
    if file.link_exists("docs") {
        expect.push(("docs/offsets".to_string(), len + 1));
        if file.link_exists(PAD_START) {
            expect.push((PAD_START.to_string(), len));
        }
    }
    if file.link_exists("passkey") {
        let names = ["depth", "key", "needle_start", "answer_start", "answer_len", "answer_tokens"];
        expect.extend(names.iter().map(|n| (format!("passkey/{n}"), len)));
    }
    for (name, rows) in expect {
        let ds = file.dataset(&name).map_err(|_| missing(path, "dataset", &name))?;
        let found = ds.shape().first().copied().unwrap_or(0);
        if found != rows {
            let expected = format!("{rows} (one per sequence of `tokens`)");
            return Err(invalid(path, "dataset", &name, format!("has {found} rows"), &expected));
        }
    }
    Ok(())
}
