//! `ulysses data prepare | synth | inspect`: thin wrappers that parse arguments, show progress and
//! print summaries; the work happens in the library functions they call.
use super::chat::TrainOn;
use super::documents::{spread, summarize};
use super::format::TOKENS;
use super::needle::SynthTask;
use super::prepare::{prepare, InputFormat, Layout, PrepareOptions, PrepareSummary, HELD_OUT_DIR};
use super::shard::{read_i64_attr, read_str_attr};
use super::split::Split;
use super::synth::{synth, SynthOptions};
use super::tokenizer::TextTokenizer;
use super::{DataError, Dataset};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

#[derive(clap::Subcommand)]
pub enum DataCommand {
    /// Tokenize texts and conversations (JSONL, Parquet, Arrow, datasets folders, plain text)
    /// into HDF5 shards of fixed-length sequences.
    Prepare {
        /// Input files: JSONL (`.jsonl`/`.json`, also `.gz`/`.zst`), Parquet, Arrow IPC, folders
        /// written by `datasets.save_to_disk`, or plain text (one document per file).
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// Output folder; receives shard-00000.h5, shard-00001.h5, ...
        #[arg(long)]
        out: PathBuf,
        /// Tokens per sequence (must equal data.seq_len of the experiment).
        #[arg(long)]
        seq_len: usize,
        /// `byte` (built-in byte-level: bytes 0..=255, BOS 256, EOS 257), a tokenizer.json, or a
        /// Hugging Face model folder (tokenizer.json, tokenizer_config.json: EOS, BOS, chat
        /// template).
        #[arg(long, default_value = "byte")]
        tokenizer: String,
        /// EOS token (default: tokenizer_config.json's `eos_token`, else generation_config.json's
        /// `eos_token_id`; for a bare tokenizer.json the first of the usual names it has).
        #[arg(long)]
        eos_token: Option<String>,
        /// How to read the inputs: auto (Parquet and Arrow by their first bytes, .jsonl/.json
        /// as JSONL, anything else as text), jsonl, parquet, arrow or text.
        #[arg(long, value_enum, default_value_t = InputFormat::Auto)]
        format: InputFormat,
        /// Record field holding a document's text.
        #[arg(long, default_value = "text")]
        text_field: String,
        /// Record field holding a conversation: a list of {role, content}, rendered with the
        /// tokenizer's chat template.
        #[arg(long, default_value = "messages")]
        messages_field: String,
        /// Record field holding a prompt (with --response-field): the pair is rendered as a user
        /// and an assistant message.
        #[arg(long, requires = "response_field")]
        prompt_field: Option<String>,
        /// Record field holding the response to --prompt-field.
        #[arg(long, requires = "prompt_field")]
        response_field: Option<String>,
        /// Which tokens of a conversation are trained: assistant (every assistant turn, header
        /// excluded, end-of-turn included), last-assistant, or all.
        #[arg(long, value_enum, default_value_t = TrainOn::Assistant)]
        train_on: TrainOn,
        /// Target shard size in MiB (a shard holds at least one sequence).
        #[arg(long, default_value_t = 1024.0)]
        shard_mib: f64,
        /// Replace shard-*.h5 files already in the output folder.
        #[arg(long)]
        force: bool,
        /// pack: documents back to back, cut into sequences (the last partial one dropped);
        /// pad: each document starts a sequence, the rest of its last sequence is padding (never
        /// a target).
        #[arg(long, value_enum, default_value_t = Layout::Pack)]
        layout: Layout,
        /// Begin every document with BOS (the byte tokenizer's 256, or a tokenizer.json's).
        #[arg(long)]
        bos: bool,
        /// BOS token of a tokenizer.json for --bos (default: the first of the usual names it has).
        #[arg(long)]
        bos_token: Option<String>,
        /// Hold out documents for `data.eval_paths`, written to OUT/heldout/: a fraction (0.01:
        /// each document with that probability) or a number of documents (200: exactly that
        /// many, drawn uniformly). The same inputs and --seed hold out the same documents.
        #[arg(long)]
        split: Option<Split>,
        /// Seed of --split.
        #[arg(long, default_value_t = 0, requires = "split")]
        seed: u64,
    },
    /// Write a synthetic long-context set (no download): passkey or needle-in-a-haystack
    /// retrieval (niah), or random tokens.
    Synth {
        /// passkey: a pass key hidden in repeated filler, asked for at the end; niah: a magic
        /// number among varied sentences; random: uniform random tokens (no answer).
        #[arg(long, value_enum)]
        task: SynthTask,
        /// Tokens per sequence (must equal data.seq_len of the experiment).
        #[arg(long)]
        seq_len: usize,
        /// Number of sequences.
        #[arg(long)]
        num: usize,
        /// Seed of the keys, depths and filler: the same seed gives the same file.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// A .h5 file, or a folder that receives shard-00000.h5.
        #[arg(long)]
        out: PathBuf,
        /// Needle depths (fractions of the context, 0 = start, 1 = end) used in turn, e.g.
        /// 0,0.5,1; random depths when absent.
        #[arg(long, value_delimiter = ',')]
        depths: Option<Vec<f32>>,
        /// `byte` or a tokenizer.json path (the key is then tokenized as text).
        #[arg(long, default_value = "byte")]
        tokenizer: String,
        /// EOS token of a tokenizer.json (default: the first of the usual names it has).
        #[arg(long)]
        eos_token: Option<String>,
        /// Digits of the pass key.
        #[arg(long, default_value_t = 5)]
        key_digits: u32,
        /// `--task random` only: pack each sequence with documents of this many tokens (recorded
        /// in `docs/*`, for `data.documents = "mask"`); the last one of a sequence may be shorter.
        #[arg(long)]
        doc_len: Option<usize>,
        /// Replace an existing output.
        #[arg(long)]
        force: bool,
    },
    /// Check a shard and print its attributes, shape, chunking and a few tokens.
    Inspect {
        /// The shard (.h5 file) to check.
        file: PathBuf,
        /// Tokens of the first sequence to print.
        #[arg(long, default_value_t = 16)]
        tokens: usize,
        /// Also read every sequence and check every token id (training checks each span it
        /// reads; this finds bad ids up front).
        #[arg(long)]
        scan: bool,
        /// The sequence shown with its trained tokens marked (shards with a loss mask).
        #[arg(long, default_value_t = 0)]
        sample: usize,
    },
}

/// One set's line of the `data prepare` summary.
fn sets_line(s: &PrepareSummary, seq_len: usize, layout: Layout, dir: &Path) -> String {
    let rest = match layout {
        Layout::Pack => format!("{} trailing tokens dropped", s.dropped_tokens),
        Layout::Pad => format!("{} padding tokens", s.padding_tokens),
    };
    format!(
        "{} documents, {} tokens -> {} sequences of {seq_len} tokens in {} shard(s) under {} ({rest})",
        s.documents,
        s.tokens,
        s.sequences,
        s.shards.len(),
        dir.display(),
    )
}

/// Sequences `data inspect` reads the documents of without `--scan`.
const INSPECT_SEQUENCES: usize = 4096;

pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Prepare {
            inputs,
            out,
            seq_len,
            tokenizer,
            eos_token,
            format,
            text_field,
            messages_field,
            prompt_field,
            response_field,
            train_on,
            shard_mib,
            force,
            layout,
            bos,
            bos_token,
            split,
            seed,
        } => {
            let tok = TextTokenizer::load(&tokenizer, eos_token.as_deref())?;
            if bos_token.is_some() && !bos {
                anyhow::bail!("--bos-token names the BOS that --bos adds; pass --bos too");
            }
            let bos = if bos { Some(tok.bos_id(bos_token.as_deref())?) } else { None };
            let total: u64 = inputs.iter().filter_map(|p| std::fs::metadata(p).ok()).map(|m| m.len()).sum();
            let bar = indicatif::ProgressBar::new(total);
            let style = "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}";
            bar.set_style(indicatif::ProgressStyle::with_template(style).context("progress bar template")?);
            let pair_fields = prompt_field.zip(response_field);
            let opts = PrepareOptions {
                inputs,
                format,
                text_field,
                messages_field,
                pair_fields,
                train_on,
                seq_len,
                shard_mib,
                out,
                force,
                layout,
                bos,
                split,
                seed,
            };
            let prepared = prepare(&opts, &tok, &mut |n| bar.inc(n));
            bar.finish_and_clear();
            let prepared = prepared?;
            let s = &prepared.train;
            println!("prepared {}", sets_line(s, seq_len, layout, &opts.out));
            println!("documents crossing into the next sequence: {} of {}", s.split_documents, s.documents);
            if s.trained_tokens < s.tokens {
                let share = 100.0 * s.trained_tokens as f64 / s.tokens.max(1) as f64;
                println!("trained tokens (loss mask): {} of {} ({share:.1}%)", s.trained_tokens, s.tokens);
            }
            if let Some(h) = &prepared.held_out {
                let dir = opts.out.join(HELD_OUT_DIR);
                println!("held out {}", sets_line(h, seq_len, layout, &dir));
                println!(
                    "  evaluate it during training with data.eval_paths = [\"{}\"] and train.eval_every = N",
                    dir.display()
                );
            }
            println!("document lengths (tokens, with EOS{}):", if bos.is_some() { " and BOS" } else { "" });
            for line in s.lengths.render() {
                println!("  {line}");
            }
            println!(
                "train with data.documents = \"mask\" (attention within documents) or \"ignore\" (the default: across them); docs/data.md"
            );
        }
        DataCommand::Synth {
            task,
            seq_len,
            num,
            seed,
            out,
            depths,
            tokenizer,
            eos_token,
            key_digits,
            doc_len,
            force,
        } => {
            let tok = TextTokenizer::load(&tokenizer, eos_token.as_deref())?;
            let opts = SynthOptions { task, seq_len, num, seed, out, depths, key_digits, doc_len, force };
            let path = synth(&opts, &tok)?;
            println!("wrote {num} {} sequences of {seq_len} tokens (seed {seed}) to {}", task.name(), path.display());
        }
        DataCommand::Inspect { file, tokens, scan, sample } => inspect(&file, tokens, scan, sample)?,
    }
    Ok(())
}

/// Validates the shard as training would (every check of `Dataset::open`) and prints it.
fn inspect(path: &Path, n_tokens: usize, scan: bool, sample: usize) -> Result<()> {
    let (seq_len, lines) = layout(path)?;
    let ds = Dataset::open(&[path.to_path_buf()], seq_len)?;
    println!("{}", path.display());
    for line in &lines {
        println!("  {line}");
    }
    println!("  tokenizer       {}", ds.tokenizer());
    println!("  vocab_size      {}   eos_id {}", ds.vocab_size(), ds.eos_id());
    if ds.is_empty() {
        println!("  (no sequences)");
        return Ok(());
    }
    let first = ds.read_span(0, 0, n_tokens.min(ds.seq_len()))?;
    println!("  sequence 0      {first:?}");
    if ds.tokenizer() == "byte" {
        let bytes: Vec<u8> = first.iter().filter_map(|&t| u8::try_from(t).ok()).collect();
        println!("  as text         {:?}", String::from_utf8_lossy(&bytes));
    }
    if let Some(docs) = ds.doc_starts(0)? {
        println!("  doc starts      {docs:?}");
    }
    // Every sequence's documents with --scan, else a spread of them (two small reads each).
    let indices = if scan { (0..ds.len()).collect() } else { spread(ds.len(), INSPECT_SEQUENCES) };
    if let Some(d) = summarize(&ds, &indices)? {
        let p = &d.per_sequence;
        let of = if d.sequences < ds.len() { format!(" (of {}; --scan reads all)", ds.len()) } else { String::new() };
        println!(
            "  documents       {} in {} sequences{of} ({:.1} per sequence, at most {}), {} padded; as cut into sequences:",
            d.lengths.count(),
            d.sequences,
            p.mean(),
            p.max(),
            d.padded
        );
        for line in d.lengths.render() {
            println!("    {line}");
        }
        println!(
            "  attention       within documents costs {:.2}% of full causal attention (data.documents = \"mask\")",
            100.0 * d.attention_share
        );
    }
    if ds.has_loss_mask() {
        show_trained(
            &ds,
            sample.min(ds.len() - 1),
            if scan { (0..ds.len()).collect() } else { spread(ds.len(), INSPECT_SEQUENCES) },
        )?;
    }
    if let Some(p) = ds.passkey(0)? {
        println!(
            "  passkey         key {}, depth {:.3}, needle at {}, answer at {} = {:?}",
            p.key, p.depth, p.needle_start, p.answer_start, p.answer_tokens
        );
    }
    if scan {
        for i in 0..ds.len() {
            ds.read_span(i, 0, ds.seq_len())?;
        }
        println!("  ok: {} sequences, every token id in [0, {})", ds.len(), ds.vocab_size());
    } else {
        let n = ds.len();
        println!("  ok: {n} sequences; layout and attributes pass (--scan checks every token id)");
    }
    Ok(())
}

/// Characters of the marked sample `data inspect` prints.
const MARKED_CHARS: usize = 4000;

/// The share of trained tokens over `indices`, and sequence `sample` as text (ids where the
/// tokenizer is not at hand) with every trained span between `[[` and `]]`.
fn show_trained(ds: &Dataset, sample: usize, indices: Vec<usize>) -> Result<()> {
    let (mut trained, mut total) = (0u64, 0u64);
    for &i in &indices {
        let end = ds.pad_start(i)?.unwrap_or(ds.seq_len());
        let mask = ds.loss_mask(i, 0, end)?.unwrap_or_else(|| vec![1; end]);
        trained += mask.iter().map(|&m| u64::from(m)).sum::<u64>();
        total += end as u64;
    }
    let share = 100.0 * trained as f64 / total.max(1) as f64;
    let of = if indices.len() < ds.len() { " (--scan reads all)" } else { "" };
    println!("  loss mask       {trained} of {total} tokens trained ({share:.1}%) in {} sequences{of}", indices.len());
    let end = ds.pad_start(sample)?.unwrap_or(ds.seq_len());
    let tokens = ds.read_span(sample, 0, end)?;
    let mask = ds.loss_mask(sample, 0, end)?.unwrap_or_else(|| vec![1; end]);
    let decoder = decoder(ds);
    let mut text = String::new();
    let mut start = 0;
    while start < tokens.len() {
        let run = mask[start..].iter().take_while(|&&m| m == mask[start]).count();
        let piece = decoder(&tokens[start..start + run]);
        if mask[start] == 1 {
            text.push_str(&format!("[[{piece}]]"));
        } else {
            text.push_str(&piece);
        }
        start += run;
    }
    let cut = text.char_indices().nth(MARKED_CHARS).map_or(text.len(), |(i, _)| i);
    let more = if cut < text.len() {
        format!(" ... ({} more characters)", text[cut..].chars().count())
    } else {
        String::new()
    };
    println!(
        "  sequence {sample} with its trained tokens between [[ and ]] (labels of the positions before them count):"
    );
    println!("{}{more}", &text[..cut]);
    Ok(())
}

/// Token ids to text with the dataset's tokenizer: bytes for the byte tokenizer, the recorded
/// tokenizer.json if it is still there, else the ids themselves.
fn decoder(ds: &Dataset) -> Box<dyn Fn(&[i32]) -> String> {
    if ds.tokenizer() == "byte" {
        return Box::new(|ids| {
            let bytes: Vec<u8> = ids.iter().map(|&t| u8::try_from(t).unwrap_or(b'?')).collect();
            String::from_utf8_lossy(&bytes).into_owned()
        });
    }
    let tokenizer = super::tokenizer::recorded_tokenizer(ds).and_then(|p| tokenizers::Tokenizer::from_file(p).ok());
    match tokenizer {
        Some(t) => Box::new(move |ids| {
            let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
            t.decode(&ids, false).unwrap_or_else(|_| format!("{ids:?}"))
        }),
        None => Box::new(|ids| format!("{ids:?}")),
    }
}

/// What `Dataset` does not expose: the raw layout of `tokens` and the informational attributes.
/// Returns the file's sequence length (so `Dataset::open` checks the rest) and lines to print.
fn layout(path: &Path) -> Result<(usize, Vec<String>), DataError> {
    if !path.exists() {
        return Err(DataError::NotFound { path: path.into() });
    }
    let file = hdf5::File::open(path).map_err(|e| DataError::Open { path: path.into(), detail: e.to_string() })?;
    let tokens = file.dataset(TOKENS).map_err(|_| DataError::Missing {
        path: path.into(),
        what: "dataset",
        name: TOKENS.into(),
    })?;
    let shape = tokens.shape();
    let mut lines =
        vec![format!("tokens          shape {shape:?}, chunks {:?}, filters {:?}", tokens.chunk(), tokens.filters())];
    if let Ok(v) = read_i64_attr(&file, path, "format_version") {
        lines.push(format!("format_version  {v}"));
    }
    for name in ["format", "task", "tokenizer_source"] {
        if let Ok(v) = read_str_attr(&file, path, name) {
            lines.push(format!("{name:<15} {v}"));
        }
    }
    Ok((shape.get(1).copied().unwrap_or(1).max(1), lines))
}
