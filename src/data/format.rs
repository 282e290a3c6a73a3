//! The shard format (docs/data.md is the spec) and its writer. One shard is one HDF5 file:
//! `tokens` int32 [num_sequences, seq_len], chunked along the sequence so that one rank's slice is
//! a cheap hyperslab read, plus root attributes naming the format and the tokenizer. Optional:
//! `loss_mask` (which tokens are trained, from version 2), the groups `docs` (document starts of
//! packed text) and `passkey` (task metadata from synth).
use super::DataError;
use ndarray::{s, Array1, ArrayView2};
use std::path::{Path, PathBuf};

pub const FORMAT_NAME: &str = "ulysses-tokens";
/// Version 2 added the optional `loss_mask`; version 1 shards (no mask) read as before.
pub const FORMAT_VERSION: i64 = 2;
pub const TOKENS: &str = "tokens";
/// uint8 `[num_sequences, seq_len]`, laid out as `tokens`: 1 where the token is a target (the
/// label of the position before it counts in the loss), 0 where it is not.
pub const LOSS_MASK: &str = "loss_mask";
/// Where padding begins in each sequence (`data prepare --layout pad`); seq_len: none.
pub const PAD_START: &str = "docs/pad_start";
/// Tokens per chunk along the sequence (256 KiB of int32): a rank of an SP group reads its slice
/// plus at most one extra chunk, and the chunk index stays small for multi-million-token samples.
pub const CHUNK_TOKENS: usize = 65536;
/// Sequences are buffered up to this many tokens before one write, so small sequences do not
/// cost one HDF5 call each.
const WRITE_BUFFER_TOKENS: usize = 1 << 20;

/// What every shard records about its tokens; shards of one dataset must agree on all of it.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardMeta {
    pub vocab_size: i64,
    pub eos_id: i64,
    /// Identity of the tokenizer: `byte` or `huggingface fnv1a64:<hash of tokenizer.json>`.
    pub tokenizer: String,
    /// Where the tokenizer came from (informational: a path or `built-in`).
    pub tokenizer_source: String,
    /// `text`, `passkey` or `random` (informational).
    pub task: String,
}

pub(crate) fn write_str_attr(loc: &hdf5::Location, path: &Path, name: &str, value: &str) -> Result<(), DataError> {
    crate::h5::write_text_attr(loc, name, value).map_err(|e| DataError::write(path, name, e))
}

pub(crate) fn write_i64_attr(loc: &hdf5::Location, path: &Path, name: &str, value: i64) -> Result<(), DataError> {
    crate::h5::write_scalar_attr(loc, name, &value).map_err(|e| DataError::write(path, name, e))
}

/// A growable `[rows, seq_len]` dataset of per-token values (`tokens`, `loss_mask`), chunked
/// along the sequence, with Fletcher-32 checksums per chunk: a corrupt chunk fails the read
/// instead of yielding wrong values (h5py reads it without plugins).
fn create_rows<T: hdf5::H5Type>(
    file: &hdf5::File,
    path: &Path,
    name: &str,
    seq_len: usize,
) -> Result<hdf5::Dataset, DataError> {
    let chunk = seq_len.clamp(1, CHUNK_TOKENS);
    let builder = file.new_dataset::<T>().chunk((1, chunk)).fletcher32().shape((0.., seq_len));
    builder.create(name).map_err(|e| DataError::write(path, name, e))
}

/// A growable 1-D dataset (chunked, unlimited length), appended to while streaming.
fn create_1d<T: hdf5::H5Type>(group: &hdf5::Group, path: &Path, name: &str) -> Result<hdf5::Dataset, DataError> {
    group.new_dataset::<T>().chunk(4096).shape(0..).create(name).map_err(|e| DataError::write(path, name, e))
}

fn append_1d<T: hdf5::H5Type + Clone>(ds: &hdf5::Dataset, path: &Path, data: &[T]) -> Result<(), DataError> {
    crate::h5::append_1d(ds, data).map_err(|e| DataError::write(path, &ds.name(), e))
}

/// Writes one shard, streaming: sequences are appended to a resizable `tokens` dataset. The file
/// is written under `<name>.partial` and renamed when complete, so a crashed run never leaves a
/// shard that looks valid.
pub struct ShardWriter {
    path: PathBuf,
    partial: PathBuf,
    file: hdf5::File,
    tokens: hdf5::Dataset,
    seq_len: usize,
    rows: usize,
    buffer: Vec<i32>,
    docs: Option<DocsBuffer>,
    /// `loss_mask` and its rows not yet written, buffered with the tokens.
    mask: Option<(hdf5::Dataset, Vec<u8>)>,
}

/// `docs/starts` (appended with the tokens), `docs/offsets` (one entry per sequence plus a
/// leading 0) and, for padded sequences, `docs/pad_start` (one per sequence); the last two are
/// kept in memory (8 bytes per sequence each) and written at `finish`.
struct DocsBuffer {
    starts: hdf5::Dataset,
    pending: Vec<i32>,
    offsets: Vec<i64>,
    pad_starts: Option<Vec<i64>>,
}

impl ShardWriter {
    pub fn create(path: &Path, seq_len: usize, meta: &ShardMeta, with_docs: bool) -> Result<ShardWriter, DataError> {
        let partial = PathBuf::from(format!("{}.partial", path.display()));
        let file = hdf5::File::create(&partial)
            .map_err(|e| DataError::Open { path: partial.clone(), detail: e.to_string() })?;
        let tokens = create_rows::<i32>(&file, &partial, TOKENS, seq_len)?;
        write_str_attr(&file, &partial, "format", FORMAT_NAME)?;
        write_i64_attr(&file, &partial, "format_version", FORMAT_VERSION)?;
        write_i64_attr(&file, &partial, "vocab_size", meta.vocab_size)?;
        write_i64_attr(&file, &partial, "eos_id", meta.eos_id)?;
        write_str_attr(&file, &partial, "tokenizer", &meta.tokenizer)?;
        write_str_attr(&file, &partial, "tokenizer_source", &meta.tokenizer_source)?;
        write_str_attr(&file, &partial, "task", &meta.task)?;
        let docs = if with_docs {
            let group = file.create_group("docs").map_err(|e| DataError::write(&partial, "docs", e))?;
            Some(DocsBuffer {
                starts: create_1d::<i32>(&group, &partial, "starts")?,
                pending: Vec::new(),
                offsets: vec![0],
                pad_starts: None,
            })
        } else {
            None
        };
        let (path, buffer) = (path.to_path_buf(), Vec::new());
        Ok(ShardWriter { path, partial, file, tokens, seq_len, rows: 0, buffer, docs, mask: None })
    }

    /// Also records which tokens are trained (`loss_mask`; see `push_masked`).
    pub fn with_loss_mask(mut self) -> Result<ShardWriter, DataError> {
        self.mask = Some((create_rows::<u8>(&self.file, &self.partial, LOSS_MASK, self.seq_len)?, Vec::new()));
        Ok(self)
    }

    /// Also records where padding begins in each sequence (`docs/pad_start`; needs `with_docs`).
    pub fn with_padding(mut self) -> ShardWriter {
        if let Some(docs) = &mut self.docs {
            docs.pad_starts = Some(Vec::new());
        }
        self
    }

    /// Sequences written or buffered so far.
    pub fn rows(&self) -> usize {
        self.rows + self.buffer.len() / self.seq_len
    }

    /// The open file, for task metadata written next to the tokens (synth's `passkey` group).
    pub fn file(&self) -> &hdf5::File {
        &self.file
    }

    pub fn partial_path(&self) -> &Path {
        &self.partial
    }

    /// Appends one sequence; `doc_starts` are the positions where a document begins in it
    /// (required when the shard was created `with_docs`).
    pub fn push(&mut self, seq: &[i32], doc_starts: &[i32]) -> Result<(), DataError> {
        self.push_padded(seq, doc_starts, self.seq_len)
    }

    /// `push` for a sequence whose positions from `pad_start` on are padding (a shard made
    /// `with_padding`; `pad_start` = seq_len: none).
    pub fn push_padded(&mut self, seq: &[i32], doc_starts: &[i32], pad_start: usize) -> Result<(), DataError> {
        self.push_masked(seq, None, doc_starts, pad_start)
    }

    /// `push_padded` with the sequence's loss mask (a shard made `with_loss_mask`: 1 = the token
    /// is a target); a sequence pushed without one trains on every token.
    pub fn push_masked(
        &mut self,
        seq: &[i32],
        mask: Option<&[u8]>,
        doc_starts: &[i32],
        pad_start: usize,
    ) -> Result<(), DataError> {
        debug_assert_eq!(seq.len(), self.seq_len);
        if let Some((_, buffer)) = &mut self.mask {
            match mask {
                Some(m) => {
                    debug_assert_eq!(m.len(), seq.len());
                    buffer.extend_from_slice(m)
                }
                None => buffer.resize(buffer.len() + seq.len(), 1),
            }
        }
        if let Some(pads) = self.docs.as_mut().and_then(|d| d.pad_starts.as_mut()) {
            pads.push(pad_start as i64);
        }
        self.buffer.extend_from_slice(seq);
        if let Some(docs) = &mut self.docs {
            docs.pending.extend_from_slice(doc_starts);
            docs.offsets.push(docs.offsets.last().copied().unwrap_or(0) + doc_starts.len() as i64);
        }
        if self.buffer.len() >= WRITE_BUFFER_TOKENS {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), DataError> {
        let k = self.buffer.len() / self.seq_len;
        if k == 0 {
            return Ok(());
        }
        let (n, path) = (self.rows, &self.partial);
        let view =
            ArrayView2::from_shape((k, self.seq_len), &self.buffer).map_err(|e| DataError::write(path, TOKENS, e))?;
        self.tokens.resize((n + k, self.seq_len)).map_err(|e| DataError::write(path, TOKENS, e))?;
        self.tokens.write_slice(view, s![n..n + k, ..]).map_err(|e| DataError::write(path, TOKENS, e))?;
        if let Some((mask, buffer)) = &mut self.mask {
            let view =
                ArrayView2::from_shape((k, self.seq_len), buffer).map_err(|e| DataError::write(path, LOSS_MASK, e))?;
            mask.resize((n + k, self.seq_len)).map_err(|e| DataError::write(path, LOSS_MASK, e))?;
            mask.write_slice(view, s![n..n + k, ..]).map_err(|e| DataError::write(path, LOSS_MASK, e))?;
            buffer.clear();
        }
        self.rows += k;
        self.buffer.clear();
        if let Some(docs) = &mut self.docs {
            append_1d(&docs.starts, path, &docs.pending)?;
            docs.pending.clear();
        }
        Ok(())
    }

    /// Flushes, writes `docs/offsets`, closes and renames the file to its final name.
    pub fn finish(mut self) -> Result<PathBuf, DataError> {
        self.flush()?;
        if let Some(docs) = &self.docs {
            let group = self.file.group("docs").map_err(|e| DataError::write(&self.partial, "docs", e))?;
            group
                .new_dataset_builder()
                .with_data(&Array1::from(docs.offsets.clone()))
                .create("offsets")
                .map_err(|e| DataError::write(&self.partial, "docs/offsets", e))?;
            if let Some(pads) = &docs.pad_starts {
                group
                    .new_dataset_builder()
                    .with_data(&Array1::from(pads.clone()))
                    .create("pad_start")
                    .map_err(|e| DataError::write(&self.partial, PAD_START, e))?;
            }
        }
        let ShardWriter { path, partial, file, tokens, docs, mask, .. } = self;
        drop((tokens, docs, mask));
        file.close().map_err(|e| DataError::write(&partial, TOKENS, e))?;
        std::fs::rename(&partial, &path).map_err(|e| DataError::io(&path, e))?;
        Ok(path)
    }
}

/// Removes the `shard-*.h5` files of an output folder (`--force`), or refuses to mix a new
/// dataset with old shards that would silently join it.
pub(crate) fn claim_output_dir(dir: &Path, force: bool) -> Result<(), DataError> {
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    let mut old = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let p = entry.map_err(|e| DataError::io(dir, e))?.path();
        if p.extension().is_some_and(|e| e == "h5") {
            old.push(p);
        }
    }
    let ours = |p: &PathBuf| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("shard-"));
    if old.is_empty() {
        return Ok(());
    }
    if !force || !old.iter().all(ours) {
        return Err(DataError::Usage(format!(
            "{} already holds {} .h5 file(s), which would join the new dataset; choose another \
             --out or pass --force (removes shard-*.h5 only)",
            dir.display(),
            old.len()
        )));
    }
    old.iter().try_for_each(|p| std::fs::remove_file(p).map_err(|e| DataError::io(p, e)))
}

/// Name of shard `k` inside an output folder.
pub fn shard_name(k: usize) -> String {
    format!("shard-{k:05}.h5")
}
