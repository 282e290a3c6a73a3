//! `ulysses data prepare`: text to shards, streaming. Documents are tokenized one at a time
//! (plain text: one piece of a line at a time), each ended by EOS (and begun by BOS with
//! `--bos`), and either packed back to back into fixed-length sequences or started each in a
//! sequence of its own with the rest padded; only the current partial sequence and the shard's
//! write buffer stay in memory.
use super::documents::LengthStats;
use super::format::{claim_output_dir, shard_name, ShardMeta, ShardWriter};
use super::tokenizer::TextTokenizer;
use super::DataError;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// Longest piece of a plain-text line tokenized at once, so a file without newlines still
/// streams.
const PIECE_BYTES: u64 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum InputFormat {
    /// `.jsonl` / `.json` files are JSONL, anything else plain text.
    Auto,
    /// One JSON object per line; the text field is one document.
    Jsonl,
    /// Each file is one document.
    Text,
}

/// How documents become fixed-length sequences.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Layout {
    /// Back to back: a sequence holds the end of one document and the starts of the next ones;
    /// the last partial sequence is dropped.
    #[default]
    Pack,
    /// Each document starts a sequence; the rest of its last sequence is padding (EOS ids, never
    /// a target: `docs/pad_start`). A document longer than a sequence continues in the next.
    Pad,
}

pub struct PrepareOptions {
    pub inputs: Vec<PathBuf>,
    pub format: InputFormat,
    /// Field of a JSONL object holding the document text.
    pub text_field: String,
    pub seq_len: usize,
    /// Target shard size in MiB; a shard holds at least one sequence.
    pub shard_mib: f64,
    pub out: PathBuf,
    /// Replace `shard-*.h5` files already in `out`.
    pub force: bool,
    pub layout: Layout,
    /// Begin every document with this BOS id (None: no BOS).
    pub bos: Option<i32>,
}

#[derive(Debug, Default, PartialEq)]
pub struct PrepareSummary {
    pub documents: u64,
    /// Tokens produced, EOS separators (and BOS) included, padding excluded.
    pub tokens: u64,
    pub sequences: u64,
    /// Tokens of the last, incomplete sequence (not written; `Layout::Pack`).
    pub dropped_tokens: u64,
    /// Padding tokens written (`Layout::Pad`).
    pub padding_tokens: u64,
    /// Documents that cross from one sequence into the next.
    pub split_documents: u64,
    /// Document lengths in tokens (with their EOS and BOS).
    pub lengths: LengthStats,
    pub shards: Vec<PathBuf>,
}

/// Tokenizes `opts.inputs` into shards under `opts.out`; `progress` is told how many input
/// bytes were consumed, as they are.
pub fn prepare(
    opts: &PrepareOptions,
    tokenizer: &TextTokenizer,
    progress: &mut dyn FnMut(u64),
) -> Result<PrepareSummary, DataError> {
    if opts.seq_len == 0 || !(opts.shard_mib > 0.0) {
        return Err(DataError::Usage(format!(
            "--seq-len {} and --shard-mib {} must be positive",
            opts.seq_len, opts.shard_mib
        )));
    }
    for input in &opts.inputs {
        if input.is_dir() {
            let hint = format!("{} is a folder; pass its files (e.g. {0}/*.jsonl)", input.display());
            return Err(DataError::Usage(hint));
        }
        if !input.is_file() {
            return Err(DataError::NotFound { path: input.clone() });
        }
    }
    claim_output_dir(&opts.out, opts.force)?;
    let per_shard = (opts.shard_mib * (1 << 20) as f64 / (opts.seq_len * 4) as f64) as usize;
    let mut packer = Packer::new(opts, tokenizer.shard_meta("text"), per_shard.max(1), tokenizer.eos_id());
    for input in &opts.inputs {
        let file = std::fs::File::open(input).map_err(|e| DataError::io(input, e))?;
        let reader = BufReader::with_capacity(1 << 16, file);
        let jsonl = match opts.format {
            InputFormat::Auto => input.extension().is_some_and(|e| e == "jsonl" || e == "json"),
            InputFormat::Jsonl => true,
            InputFormat::Text => false,
        };
        if jsonl {
            read_jsonl(input, reader, &opts.text_field, tokenizer, &mut packer, progress)?;
        } else {
            read_text(input, reader, tokenizer, &mut packer, progress)?;
        }
    }
    let summary = packer.finish()?;
    if summary.sequences == 0 {
        return Err(DataError::Usage(format!(
            "the input holds {} tokens, not enough for one sequence of --seq-len {}; give more text or a shorter --seq-len",
            summary.tokens, opts.seq_len
        )));
    }
    Ok(summary)
}

fn read_jsonl(
    path: &Path,
    mut reader: impl BufRead,
    field: &str,
    tokenizer: &TextTokenizer,
    packer: &mut Packer,
    progress: &mut dyn FnMut(u64),
) -> Result<(), DataError> {
    let mut buf = Vec::new();
    let mut line = 0;
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf).map_err(|e| DataError::io(path, e))?;
        if n == 0 {
            return Ok(());
        }
        progress(n as u64);
        line += 1;
        let bytes = buf.trim_ascii();
        if bytes.is_empty() {
            continue;
        }
        let input_err = |message: String| DataError::Input { path: path.into(), line, message };
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| input_err(format!("not valid JSON ({e})")))?;
        let text = value.get(field).and_then(|t| t.as_str()).ok_or_else(|| {
            input_err(format!("has no string field \"{field}\"; name the text field with --text-field"))
        })?;
        packer.begin_doc();
        packer.push(&tokenizer.encode(text)?)?;
        packer.end_doc()?;
    }
}

fn read_text(
    path: &Path,
    mut reader: impl BufRead,
    tokenizer: &TextTokenizer,
    packer: &mut Packer,
    progress: &mut dyn FnMut(u64),
) -> Result<(), DataError> {
    let mut buf = Vec::new();
    let mut line = 1;
    packer.begin_doc();
    loop {
        let n = reader.by_ref().take(PIECE_BYTES).read_until(b'\n', &mut buf).map_err(|e| DataError::io(path, e))?;
        progress(n as u64);
        // A UTF-8 character cut at the piece end waits in `buf` for the rest of its bytes.
        let valid = match std::str::from_utf8(&buf) {
            Ok(s) => s.len(),
            Err(e) if e.error_len().is_none() && n > 0 => e.valid_up_to(),
            Err(e) => {
                let message =
                    format!("invalid UTF-8 at byte {} of the line; convert the file to UTF-8", e.valid_up_to());
                return Err(DataError::Input { path: path.into(), line, message });
            }
        };
        let text = String::from_utf8_lossy(&buf[..valid]);
        packer.push(&tokenizer.encode(&text)?)?;
        line += text.matches('\n').count() as u64;
        buf.drain(..valid);
        if n == 0 {
            return packer.end_doc();
        }
    }
}

/// Ends documents with EOS (begins them with BOS when asked) and cuts the stream into
/// sequences, packed or one document per sequence with padding, rolling over to a new shard every
/// `per_shard` sequences. Records where each document starts inside a sequence.
struct Packer<'a> {
    opts: &'a PrepareOptions,
    meta: ShardMeta,
    per_shard: usize,
    eos: i32,
    current: Vec<i32>,
    doc_starts: Vec<i32>,
    /// A document began and its first token has not been placed yet.
    doc_pending: bool,
    /// Tokens of the current document so far (BOS included, EOS not yet).
    doc_tokens: u64,
    /// Sequences emitted when the current document's first token was placed.
    doc_first_sequence: u64,
    writer: Option<ShardWriter>,
    summary: PrepareSummary,
}

impl<'a> Packer<'a> {
    fn new(opts: &'a PrepareOptions, meta: ShardMeta, per_shard: usize, eos: i32) -> Packer<'a> {
        let current = Vec::with_capacity(opts.seq_len);
        let summary = PrepareSummary::default();
        Packer {
            opts,
            meta,
            per_shard,
            eos,
            current,
            doc_starts: Vec::new(),
            doc_pending: false,
            doc_tokens: 0,
            doc_first_sequence: 0,
            writer: None,
            summary,
        }
    }

    fn begin_doc(&mut self) {
        self.doc_pending = true;
        self.doc_tokens = 0;
    }

    /// Ends the document with EOS; an empty document is skipped.
    fn end_doc(&mut self) -> Result<(), DataError> {
        if self.doc_tokens == 0 {
            self.doc_pending = false;
            return Ok(());
        }
        self.summary.documents += 1;
        self.push(&[self.eos])?;
        self.summary.lengths.add(self.doc_tokens);
        // A document that ended exactly at a sequence's end did not cross into the next one.
        let last = self.summary.sequences - u64::from(self.current.is_empty());
        if last > self.doc_first_sequence {
            self.summary.split_documents += 1;
        }
        Ok(())
    }

    fn push(&mut self, tokens: &[i32]) -> Result<(), DataError> {
        if tokens.is_empty() {
            return Ok(());
        }
        if self.doc_pending {
            self.doc_pending = false;
            if self.opts.layout == Layout::Pad && !self.current.is_empty() {
                self.emit_padded()?;
            }
            // `current` is never full here (it is emitted as soon as it fills).
            self.doc_starts.push(self.current.len() as i32);
            self.doc_first_sequence = self.summary.sequences;
            if let Some(bos) = self.opts.bos {
                self.place(&[bos])?;
            }
        }
        self.place(tokens)
    }

    fn place(&mut self, mut tokens: &[i32]) -> Result<(), DataError> {
        self.doc_tokens += tokens.len() as u64;
        self.summary.tokens += tokens.len() as u64;
        while !tokens.is_empty() {
            let take = (self.opts.seq_len - self.current.len()).min(tokens.len());
            self.current.extend_from_slice(&tokens[..take]);
            tokens = &tokens[take..];
            if self.current.len() == self.opts.seq_len {
                self.emit(self.opts.seq_len)?;
            }
        }
        Ok(())
    }

    /// Fills the current sequence with padding and emits it. The padding is a document of its
    /// own, so that with `data.documents = "mask"` attention spends nothing on it.
    fn emit_padded(&mut self) -> Result<(), DataError> {
        let pad_start = self.current.len();
        self.doc_starts.push(pad_start as i32);
        self.summary.padding_tokens += (self.opts.seq_len - pad_start) as u64;
        self.current.resize(self.opts.seq_len, self.eos);
        self.emit(pad_start)
    }

    fn emit(&mut self, pad_start: usize) -> Result<(), DataError> {
        if self.writer.is_none() {
            let path = self.opts.out.join(shard_name(self.summary.shards.len()));
            let writer = ShardWriter::create(&path, self.opts.seq_len, &self.meta, true)?;
            self.writer = Some(if self.opts.layout == Layout::Pad { writer.with_padding() } else { writer });
        }
        let writer = self.writer.as_mut().expect("created above");
        writer.push_padded(&self.current, &self.doc_starts, pad_start)?;
        self.summary.sequences += 1;
        self.current.clear();
        self.doc_starts.clear();
        if writer.rows() == self.per_shard {
            let done = self.writer.take().expect("a writer is open").finish()?;
            self.summary.shards.push(done);
        }
        Ok(())
    }

    fn finish(mut self) -> Result<PrepareSummary, DataError> {
        if self.opts.layout == Layout::Pad && !self.current.is_empty() {
            self.emit_padded()?;
        }
        if let Some(w) = self.writer.take() {
            self.summary.shards.push(w.finish()?);
        }
        self.summary.dropped_tokens = self.current.len() as u64;
        Ok(self.summary)
    }
}
