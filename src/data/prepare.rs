//! `ulysses data prepare`: text and conversations to shards, streaming. Each record is one
//! document: a text (tokenized, ended by EOS, begun by BOS with `--bos`), a conversation
//! (`messages`, rendered by the model's chat template, with a loss mask: chat.rs) or a
//! prompt/response pair (a two-message conversation). Documents are either packed back to back
//! into fixed-length sequences or started each in a sequence of its own with the rest padded;
//! only the current partial sequence and the shard's write buffer stay in memory. With `--split`
//! some documents go to a held-out set of shards in `OUT/heldout/` instead (split.rs).
use super::chat::{ChatRenderer, TrainOn};
use super::documents::LengthStats;
use super::format::{claim_output_dir, shard_name, ShardMeta, ShardWriter};
use super::records::{read_records, saved_dataset_files, Record, RecordFile};
use super::split::{Routed, Split, Splitter};
use super::tokenizer::TextTokenizer;
use super::DataError;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// Longest piece of a plain-text line tokenized at once, so a file without newlines still
/// streams.
const PIECE_BYTES: u64 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum InputFormat {
    /// Parquet and Arrow files by their first bytes, `.jsonl` / `.json` (also `.gz`, `.zst`) as
    /// JSONL, anything else plain text.
    Auto,
    /// One JSON object per line (one record).
    Jsonl,
    Parquet,
    /// Arrow IPC, file or stream format.
    Arrow,
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
    /// Field of a record holding a document's text.
    pub text_field: String,
    /// Field of a record holding a conversation (a list of {role, content}).
    pub messages_field: String,
    /// Fields of a prompt/response record (both or neither).
    pub pair_fields: Option<(String, String)>,
    /// Which tokens of a conversation are trained.
    pub train_on: TrainOn,
    pub seq_len: usize,
    /// Target shard size in MiB; a shard holds at least one sequence.
    pub shard_mib: f64,
    pub out: PathBuf,
    /// Replace `shard-*.h5` files already in `out`.
    pub force: bool,
    pub layout: Layout,
    /// Begin every document with this BOS id (None: no BOS).
    pub bos: Option<i32>,
    /// Documents held out into `out/heldout/` (for `data.eval_paths`).
    pub split: Option<Split>,
    /// Seed of the split.
    pub seed: u64,
}

/// Folder of the held-out shards under `--out`. The training folder's shards are the `.h5` files
/// directly in it, so a subfolder never joins them.
pub const HELD_OUT_DIR: &str = "heldout";

/// What `prepare` wrote.
#[derive(Debug)]
pub struct Prepared {
    pub train: PrepareSummary,
    /// The held-out set (`--split`).
    pub held_out: Option<PrepareSummary>,
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
    /// Of `tokens`, those that are targets (a loss mask's ones; every token of a text).
    pub trained_tokens: u64,
    pub shards: Vec<PathBuf>,
}

/// Tokenizes `opts.inputs` into shards under `opts.out` (and `opts.out/heldout` with a split);
/// `progress` is told how many input bytes were consumed, as they are.
pub fn prepare(
    opts: &PrepareOptions,
    tokenizer: &TextTokenizer,
    progress: &mut dyn FnMut(u64),
) -> Result<Prepared, DataError> {
    if opts.seq_len == 0 || !(opts.shard_mib > 0.0) {
        return Err(DataError::Usage(format!(
            "--seq-len {} and --shard-mib {} must be positive",
            opts.seq_len, opts.shard_mib
        )));
    }
    let inputs = input_files(&opts.inputs)?;
    claim_output_dir(&opts.out, opts.force)?;
    let per_shard = (opts.shard_mib * (1 << 20) as f64 / (opts.seq_len * 4) as f64) as usize;
    let packer =
        |out: PathBuf| Packer::new(opts, out, tokenizer.shard_meta("text"), per_shard.max(1), tokenizer.eos_id());
    let mut sets = Sets { train: packer(opts.out.clone()), held_out: None };
    if let Some(split) = opts.split {
        let dir = opts.out.join(HELD_OUT_DIR);
        claim_output_dir(&dir, opts.force)?;
        sets.held_out = Some((Splitter::new(split, opts.seed), packer(dir)));
    }
    let renderer = match tokenizer.chat_template() {
        Some(t) => Some(ChatRenderer::new(t, tokenizer).map_err(|message| DataError::Tokenizer {
            path: tokenizer.shard_meta("text").tokenizer_source.into(),
            message,
        })?),
        None => None,
    };
    let records = Records { opts, tokenizer, renderer: renderer.as_ref() };
    for input in &inputs {
        let kind = match opts.format {
            InputFormat::Auto => RecordFile::detect(input)?,
            InputFormat::Jsonl => Some(RecordFile::Jsonl),
            InputFormat::Parquet => Some(RecordFile::Parquet),
            InputFormat::Arrow => Some(RecordFile::Arrow),
            InputFormat::Text => None,
        };
        match kind {
            Some(kind) => {
                let fields = records.fields();
                read_records(input, kind, &fields, progress, &mut |record| {
                    let doc = records.of(input, &record)?;
                    sets.document(doc)
                })?
            }
            None => {
                let packer = sets.text_packer(input)?;
                let file = std::fs::File::open(input).map_err(|e| DataError::io(input, e))?;
                read_text(input, BufReader::with_capacity(1 << 16, file), tokenizer, packer, progress)?;
            }
        }
    }
    let prepared = sets.finish()?;
    if prepared.train.sequences == 0 {
        return Err(DataError::Usage(format!(
            "the input holds {} tokens, not enough for one sequence of --seq-len {}; give more text or a shorter --seq-len",
            prepared.train.tokens, opts.seq_len
        )));
    }
    if let Some(h) = prepared.held_out.as_ref().filter(|h| h.sequences == 0) {
        return Err(DataError::Usage(format!(
            "--split held out {} documents of {} tokens, not enough for one sequence of --seq-len {}; hold out more (a larger --split) or pass --layout pad (a sequence per document)",
            h.documents, h.tokens, opts.seq_len
        )));
    }
    Ok(prepared)
}

/// The training set's packer and, with `--split`, the held-out set's with its splitter.
struct Sets<'a> {
    train: Packer<'a>,
    held_out: Option<(Splitter<Document>, Packer<'a>)>,
}

impl<'a> Sets<'a> {
    fn document(&mut self, doc: Document) -> Result<(), DataError> {
        let Some((splitter, held_out)) = &mut self.held_out else {
            return self.train.document(&doc);
        };
        match splitter.route(doc) {
            Routed::Train(doc) => self.train.document(&doc),
            Routed::HeldOut(doc) => held_out.document(&doc),
            Routed::Kept => Ok(()),
        }
    }

    /// The packer a plain-text file (one document, streamed) goes to.
    fn text_packer(&mut self, path: &Path) -> Result<&mut Packer<'a>, DataError> {
        let Some((splitter, held_out)) = &mut self.held_out else {
            return Ok(&mut self.train);
        };
        match splitter.next_is_held_out() {
            Some(true) => Ok(held_out),
            Some(false) => Ok(&mut self.train),
            None => Err(DataError::Usage(format!(
                "{}: --split N keeps its N candidates in memory until the input ends, and a plain-text file is one document of any size; hold out a fraction instead (e.g. --split 0.01)",
                path.display()
            ))),
        }
    }

    fn finish(self) -> Result<Prepared, DataError> {
        let Some((splitter, mut held_out)) = self.held_out else {
            return Ok(Prepared { train: self.train.finish()?, held_out: None });
        };
        for doc in splitter.finish() {
            held_out.document(&doc)?;
        }
        Ok(Prepared { train: self.train.finish()?, held_out: Some(held_out.finish()?) })
    }
}

/// The files of `inputs`: files as given, folders written by `datasets.save_to_disk` as their
/// Arrow files.
fn input_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>, DataError> {
    let mut files = Vec::new();
    for input in inputs {
        if input.is_dir() {
            match saved_dataset_files(input)? {
                Some(arrow) => files.extend(arrow),
                None => {
                    let hint = format!(
                        "{} is a folder but not one written by datasets.save_to_disk (no state.json or dataset_info.json); pass its files (e.g. {0}/*.parquet)",
                        input.display()
                    );
                    return Err(DataError::Usage(hint));
                }
            }
        } else if input.is_file() {
            files.push(input.clone());
        } else {
            return Err(DataError::NotFound { path: input.clone() });
        }
    }
    Ok(files)
}

/// One record made into a document.
struct Document {
    tokens: Vec<i32>,
    /// 1 = trained; None: every token.
    mask: Option<Vec<u8>>,
    /// A text: the packer ends it with EOS (and begins it with BOS with `--bos`). A rendered
    /// conversation carries its own special tokens.
    text: bool,
}

/// Makes records into documents: which layout a record has, and the message that names the
/// file, the record and the field when it has none or a bad one.
struct Records<'a> {
    opts: &'a PrepareOptions,
    tokenizer: &'a TextTokenizer,
    renderer: Option<&'a ChatRenderer<'a>>,
}

impl Records<'_> {
    /// The fields a columnar file must give.
    fn fields(&self) -> Vec<&str> {
        match &self.opts.pair_fields {
            Some((prompt, response)) => vec![prompt.as_str(), response.as_str()],
            None => vec![self.opts.text_field.as_str(), self.opts.messages_field.as_str()],
        }
    }

    fn of(&self, path: &Path, record: &Record) -> Result<Document, DataError> {
        let err = |field: &str, message: String| DataError::Record {
            path: path.into(),
            record: record.number,
            field: field.into(),
            message,
        };
        let string = |field: &str| match record.fields.get(field) {
            Some(Value::String(s)) => Ok(s.as_str()),
            Some(other) => Err(err(field, format!("is {}, expected a string", short(other)))),
            None => Err(err(field, "is missing".into())),
        };
        if let Some((prompt_field, response_field)) = &self.opts.pair_fields {
            let (prompt, response) = (string(prompt_field)?, string(response_field)?);
            if self.renderer.is_none() {
                // No template: the prompt's tokens, then the response's and EOS, trained.
                let prompt = self.tokenizer.encode(prompt)?;
                let response = self.tokenizer.encode(response)?;
                let mut mask = vec![0u8; prompt.len()];
                mask.resize(prompt.len() + response.len(), 1);
                let tokens = [prompt, response].concat();
                return Ok(Document { tokens, mask: Some(mask), text: true });
            }
            let messages = json!([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]);
            return self.chat(&messages).map_err(|m| err(&format!("{prompt_field}/{response_field}"), m));
        }
        let messages_field = &self.opts.messages_field;
        if let Some(messages) = record.fields.get(messages_field) {
            return self.chat(messages).map_err(|m| err(messages_field, m));
        }
        match record.fields.get(&self.opts.text_field) {
            Some(_) => {
                let tokens = self.tokenizer.encode(string(&self.opts.text_field)?)?;
                Ok(Document { tokens, mask: None, text: true })
            }
            None => Err(err(
                messages_field,
                format!(
                    "is missing, and so is `{}`: a record is a conversation (`{messages_field}`: a list of {{role, content}}) or a text; name the fields with --messages-field, --text-field or --prompt-field/--response-field",
                    self.opts.text_field
                ),
            )),
        }
    }

    fn chat(&self, messages: &Value) -> Result<Document, String> {
        let renderer = self.renderer.ok_or_else(|| {
            "is a conversation, but the tokenizer has no chat template; pass --tokenizer a model folder whose tokenizer_config.json or chat_template.jinja has one".to_string()
        })?;
        let sample = renderer.sample(messages, self.opts.train_on)?;
        Ok(Document { tokens: sample.tokens, mask: sample.mask, text: false })
    }
}

/// A value named briefly in a message.
fn short(v: &Value) -> String {
    let text = v.to_string();
    match text.char_indices().nth(40) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text,
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
    /// The folder the shards go to.
    out: PathBuf,
    meta: ShardMeta,
    per_shard: usize,
    eos: i32,
    current: Vec<i32>,
    /// The loss mask of `current` (1 = trained), written once a document has had one.
    current_mask: Vec<u8>,
    masked: bool,
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
    fn new(opts: &'a PrepareOptions, out: PathBuf, meta: ShardMeta, per_shard: usize, eos: i32) -> Packer<'a> {
        let current = Vec::with_capacity(opts.seq_len);
        let summary = PrepareSummary::default();
        Packer {
            opts,
            out,
            meta,
            per_shard,
            eos,
            current,
            current_mask: Vec::with_capacity(opts.seq_len),
            masked: false,
            doc_starts: Vec::new(),
            doc_pending: false,
            doc_tokens: 0,
            doc_first_sequence: 0,
            writer: None,
            summary,
        }
    }

    /// One record's document: a text gets EOS (and BOS), a conversation goes in as rendered.
    fn document(&mut self, doc: &Document) -> Result<(), DataError> {
        self.masked |= doc.mask.is_some();
        self.begin_doc();
        self.push_masked(&doc.tokens, doc.mask.as_deref())?;
        if doc.text {
            self.end_doc()
        } else {
            self.finish_doc();
            Ok(())
        }
    }

    fn begin_doc(&mut self) {
        self.doc_pending = true;
        self.doc_tokens = 0;
    }

    /// Ends the document with EOS; an empty document is skipped.
    fn end_doc(&mut self) -> Result<(), DataError> {
        if self.doc_tokens > 0 {
            self.push(&[self.eos])?;
        }
        self.finish_doc();
        Ok(())
    }

    /// Counts the document just placed (none if it was empty).
    fn finish_doc(&mut self) {
        self.doc_pending = false;
        if self.doc_tokens == 0 {
            return;
        }
        self.summary.documents += 1;
        self.summary.lengths.add(self.doc_tokens);
        // A document that ended exactly at a sequence's end did not cross into the next one.
        let last = self.summary.sequences - u64::from(self.current.is_empty());
        if last > self.doc_first_sequence {
            self.summary.split_documents += 1;
        }
    }

    fn push(&mut self, tokens: &[i32]) -> Result<(), DataError> {
        self.push_masked(tokens, None)
    }

    /// Places `tokens` with their loss mask (None: all trained), opening the document first.
    fn push_masked(&mut self, tokens: &[i32], mask: Option<&[u8]>) -> Result<(), DataError> {
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
                // A BOS is trained where its document is (not before a masked prompt).
                self.place(&[bos], mask.map(|_| &[0u8][..]))?;
            }
        }
        self.place(tokens, mask)
    }

    fn place(&mut self, mut tokens: &[i32], mut mask: Option<&[u8]>) -> Result<(), DataError> {
        self.doc_tokens += tokens.len() as u64;
        self.summary.tokens += tokens.len() as u64;
        self.summary.trained_tokens += mask.map_or(tokens.len(), |m| m.iter().filter(|&&x| x == 1).count()) as u64;
        while !tokens.is_empty() {
            let take = (self.opts.seq_len - self.current.len()).min(tokens.len());
            self.current.extend_from_slice(&tokens[..take]);
            tokens = &tokens[take..];
            match mask {
                Some(m) => {
                    self.current_mask.extend_from_slice(&m[..take]);
                    mask = Some(&m[take..]);
                }
                None => self.current_mask.resize(self.current.len(), 1),
            }
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
        self.current_mask.resize(self.opts.seq_len, 0);
        self.emit(pad_start)
    }

    fn emit(&mut self, pad_start: usize) -> Result<(), DataError> {
        if self.writer.is_none() {
            let path = self.out.join(shard_name(self.summary.shards.len()));
            let writer = ShardWriter::create(&path, self.opts.seq_len, &self.meta, true)?;
            let writer = if self.opts.layout == Layout::Pad { writer.with_padding() } else { writer };
            self.writer = Some(if self.masked { writer.with_loss_mask()? } else { writer });
        }
        let writer = self.writer.as_mut().expect("created above");
        let mask = self.masked.then_some(self.current_mask.as_slice());
        writer.push_masked(&self.current, mask, &self.doc_starts, pad_start)?;
        self.summary.sequences += 1;
        self.current.clear();
        self.current_mask.clear();
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
