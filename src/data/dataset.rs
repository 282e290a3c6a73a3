//! The read side: several shard files seen as one dataset of fixed-length sequences. Every shard
//! is checked when opened (see shard.rs) and every span is range-checked when read, so a bad file
//! fails loudly instead of feeding wrong tokens.
use super::documents::{check_starts, Documents};
use super::format::{LOSS_MASK, PAD_START, TOKENS};
use super::shard::{invalid, shard_files, Shard};
use super::DataError;
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

pub struct Dataset {
    shards: Vec<Shard>,
    /// Global index of each shard's first sequence.
    first_index: Vec<usize>,
    len: usize,
    seq_len: usize,
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
        for f in &files {
            let shard = Shard::open(f, seq_len)?;
            if let Some(first) = shards.first() {
                agree(&shard, first)?;
            }
            first_index.push(len);
            len += shard.len;
            shards.push(shard);
        }
        let dataset = Dataset { shards, first_index, len, seq_len };
        for s in 0..dataset.shards.len() {
            dataset.check_documents(s)?;
        }
        Ok(dataset)
    }

    /// Every sequence's document starts in shard `s`, read in two pieces and checked now: a bad
    /// one stops a run before it trains, not when its sequence comes up hours later.
    fn check_documents(&self, s: usize) -> Result<(), DataError> {
        let shard = &self.shards[s];
        if !shard.file.link_exists("docs") {
            return Ok(());
        }
        let offsets = shard.read_1d::<i64>("docs/offsets", 0..shard.len + 1)?;
        let total = starts_len(shard)?;
        let starts = shard.read_1d::<i32>("docs/starts", 0..total as usize)?;
        for row in 0..shard.len {
            let o = [offsets[row], offsets[row + 1]];
            check_offsets(shard, row, o, total)?;
            let raw: Vec<i64> = starts[o[0] as usize..o[1] as usize].iter().map(|&v| i64::from(v)).collect();
            check_row(shard, row, self.first_index[s] + row, &raw, self.seq_len)?;
        }
        Ok(())
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
        self.shards[0].vocab_size
    }

    pub fn eos_id(&self) -> i64 {
        self.shards[0].eos_id
    }

    /// Tokenizer identity shared by all shards (`byte` or `huggingface fnv1a64:...`).
    pub fn tokenizer(&self) -> &str {
        &self.shards[0].tokenizer
    }

    pub fn shard_paths(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }

    /// The file that holds sequence `index`.
    pub fn shard_path(&self, index: usize) -> Result<&Path, DataError> {
        Ok(self.locate(index)?.0.path.as_path())
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
        let vocab_size = shard.vocab_size;
        if let Some(i) = span.iter().position(|&t| t < 0 || t as i64 >= vocab_size) {
            let (path, position, value) = (shard.path.clone(), start + i, span[i]);
            return Err(DataError::TokenOutOfRange { path, index, row, position, value, vocab_size });
        }
        Ok(span)
    }

    /// Per-sequence passkey metadata, if the shard has a `passkey` group.
    pub fn passkey(&self, index: usize) -> Result<Option<PasskeyInfo>, DataError> {
        let (shard, row) = self.locate(index)?;
        if !shard.file.link_exists("passkey") {
            return Ok(None);
        }
        let one = |name: &str| shard.read_1d::<i64>(&format!("passkey/{name}"), row..row + 1);
        let (key, needle_start, answer_start) = (one("key")?[0], one("needle_start")?[0], one("answer_start")?[0]);
        let answer_len = one("answer_len")?[0];
        let depth = shard.read_1d::<f32>("passkey/depth", row..row + 1)?[0];
        let name = "passkey/answer_tokens";
        let answers = shard.file.dataset(name).map_err(|e| DataError::read(&shard.path, name, e))?;
        let width = answers.shape().get(1).copied().unwrap_or(0);
        if !(0..=width as i64).contains(&answer_len) {
            let found = format!("= {answer_len} for sequence {row}");
            return Err(invalid(&shard.path, "dataset", "passkey/answer_len", found, &format!("0..={width}")));
        }
        let answer = answers.read_slice_1d::<i32, _>(s![row, ..answer_len as usize]);
        let answer_tokens = answer.map_err(|e| DataError::read(&shard.path, name, e))?.to_vec();
        Ok(Some(PasskeyInfo {
            depth,
            key: key as u64,
            needle_start: needle_start as usize,
            answer_start: answer_start as usize,
            answer_tokens,
        }))
    }

    /// The documents of sequence `index` over its whole sequence, if its shard records their
    /// starts (`docs` group: `ulysses data prepare`, `data synth --doc-len`).
    pub fn documents(&self, index: usize) -> Result<Option<Documents>, DataError> {
        Ok(self.doc_starts(index)?.map(|starts| Documents::from_starts(&starts, self.seq_len)))
    }

    /// Positions where a document begins in sequence `index`, as its shard records them (None:
    /// no `docs` group). Every start is checked: a bad one is an error naming the file, the
    /// sequence and the value.
    pub fn doc_starts(&self, index: usize) -> Result<Option<Vec<usize>>, DataError> {
        let (shard, row) = self.locate(index)?;
        if !shard.file.link_exists("docs") {
            return Ok(None);
        }
        let o = shard.read_1d::<i64>("docs/offsets", row..row + 2)?;
        check_offsets(shard, row, [o[0], o[1]], starts_len(shard)?)?;
        let raw: Vec<i64> =
            shard.read_1d::<i32>("docs/starts", o[0] as usize..o[1] as usize)?.into_iter().map(i64::from).collect();
        check_row(shard, row, index, &raw, self.seq_len)?;
        Ok(Some(raw.into_iter().map(|s| s as usize).collect()))
    }

    /// Where padding begins in sequence `index` (`docs/pad_start`, written by `data prepare
    /// --layout pad`); None: no padding. Padding is never a target: its labels, and the label
    /// of the position before it, are -100.
    pub fn pad_start(&self, index: usize) -> Result<Option<usize>, DataError> {
        let (shard, row) = self.locate(index)?;
        if !shard.has_padding {
            return Ok(None);
        }
        let p = shard.read_1d::<i64>(PAD_START, row..row + 1)?[0];
        if p < 1 || p as u64 > self.seq_len as u64 {
            let found = format!("= {p} for sequence {row} (global index {index})");
            let expected = format!("a position in 1..={} (seq_len: no padding)", self.seq_len);
            return Err(invalid(&shard.path, "dataset", PAD_START, found, &expected));
        }
        Ok(((p as usize) < self.seq_len).then_some(p as usize))
    }

    /// Entries `[start, end)` of sequence `index`'s loss mask (1: the token is a target), if its
    /// shard records one (`loss_mask`); every entry is checked to be 0 or 1.
    pub fn loss_mask(&self, index: usize, start: usize, end: usize) -> Result<Option<Vec<u8>>, DataError> {
        if start > end || end > self.seq_len {
            return Err(DataError::SpanOutOfRange { start, end, seq_len: self.seq_len });
        }
        let (shard, row) = self.locate(index)?;
        let Some(mask) = &shard.loss_mask else { return Ok(None) };
        let span = mask.read_slice_1d::<u8, _>(s![row, start..end]).map_err(|e| {
            DataError::read(&shard.path, LOSS_MASK, format!("sequence {row}, tokens {start}..{end}: {e}"))
        })?;
        let span = span.into_raw_vec_and_offset().0;
        if let Some(i) = span.iter().position(|&m| m > 1) {
            let found = format!("holds {} at sequence {row} (global index {index}) position {}", span[i], start + i);
            return Err(invalid(&shard.path, "dataset", LOSS_MASK, found, "0 (not trained) or 1 (trained)"));
        }
        Ok(Some(span))
    }

    /// Whether any shard records a loss mask.
    pub fn has_loss_mask(&self) -> bool {
        self.shards.iter().any(|s| s.loss_mask.is_some())
    }

    /// The first shard that records no document boundaries, if any.
    pub fn shard_without_documents(&self) -> Option<&Path> {
        self.shards.iter().find(|s| !s.file.link_exists("docs")).map(|s| s.path.as_path())
    }
}

/// Entries of a shard's `docs/starts`.
fn starts_len(shard: &Shard) -> Result<i64, DataError> {
    let starts = shard.file.dataset("docs/starts").map_err(|e| DataError::read(&shard.path, "docs/starts", e))?;
    Ok(starts.shape().first().copied().unwrap_or(0) as i64)
}

/// Sequence `row`'s range `o` of `docs/starts` must lie inside its `total` entries.
fn check_offsets(shard: &Shard, row: usize, o: [i64; 2], total: i64) -> Result<(), DataError> {
    if o[0] < 0 || o[0] > o[1] || o[1] > total {
        let found = format!("= [{}, {}] for sequence {row}", o[0], o[1]);
        let expected = format!("a range inside docs/starts (0..={total})");
        return Err(invalid(&shard.path, "dataset", "docs/offsets", found, &expected));
    }
    Ok(())
}

/// Sequence `row` (global `index`)'s document starts `raw` (`check_starts`).
fn check_row(shard: &Shard, row: usize, index: usize, raw: &[i64], seq_len: usize) -> Result<(), DataError> {
    check_starts(raw, seq_len).map_err(|bad| DataError::BadDocStart {
        path: shard.path.clone(),
        row,
        index,
        entry: bad.entry,
        value: bad.value,
        problem: bad.problem,
        seq_len,
    })
}

/// Shards of one dataset must share the vocabulary, the EOS id and the tokenizer.
fn agree(shard: &Shard, first: &Shard) -> Result<(), DataError> {
    let checks = [
        ("vocab_size", shard.vocab_size.to_string(), first.vocab_size.to_string()),
        ("eos_id", shard.eos_id.to_string(), first.eos_id.to_string()),
        ("tokenizer", format!("\"{}\"", shard.tokenizer), format!("\"{}\"", first.tokenizer)),
    ];
    match checks.into_iter().find(|(_, found, expected)| found != expected) {
        None => Ok(()),
        Some((name, found, expected)) => {
            let (path, first) = (shard.path.clone(), first.path.clone());
            Err(DataError::Inconsistent { path, name, found, expected, first })
        }
    }
}
