//! `ulysses data synth`: long-context data that needs no download, deterministic for a seed.
//! - passkey: filler sentences with "The pass key is NNNNN. Remember it. NNNNN is the pass key."
//!   hidden at a recorded depth, ending in "What is the pass key? The pass key is NNNNN"; the
//!   answer's position and tokens are recorded per sequence (`passkey/*` datasets).
//! - niah: the same layout with varied filler and "The special magic number is NNNNN." (needle.rs).
//! - random: uniform token ids, for throughput runs; with `doc_len`, packed into documents of that
//!   many tokens (recorded in `docs/*`), for document-masked throughput runs.
use super::format::{claim_output_dir, shard_name, ShardWriter};
use super::needle::{check_key_digits, draw_key, NeedleParts, SynthTask};
use super::tokenizer::TextTokenizer;
use super::{DataError, PasskeyInfo};
use crate::rng::SplitMix64;
use ndarray::{Array1, Array2};
use std::path::{Path, PathBuf};

pub struct SynthOptions {
    pub task: SynthTask,
    pub seq_len: usize,
    pub num: usize,
    pub seed: u64,
    /// A `.h5` file, or a folder that receives `shard-00000.h5`.
    pub out: PathBuf,
    /// Needle depths in [0, 1], used in turn; random depths when absent.
    pub depths: Option<Vec<f32>>,
    /// Digits of the pass key (1..=18).
    pub key_digits: u32,
    /// Random task: record documents of this many tokens (the last of a sequence may be shorter).
    pub doc_len: Option<usize>,
    pub force: bool,
}

/// Writes the synthetic set and returns the shard's path.
pub fn synth(opts: &SynthOptions, tokenizer: &TextTokenizer) -> Result<PathBuf, DataError> {
    check(opts)?;
    let path = if opts.out.extension().is_some_and(|e| e == "h5") {
        if opts.out.exists() && !opts.force {
            return Err(DataError::Usage(format!("{} exists; pass --force to replace it", opts.out.display())));
        }
        if let Some(dir) = opts.out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        }
        opts.out.clone()
    } else {
        claim_output_dir(&opts.out, opts.force)?;
        opts.out.join(shard_name(0))
    };
    let meta = tokenizer.shard_meta(opts.task.name());
    let mut writer = ShardWriter::create(&path, opts.seq_len, &meta, opts.doc_len.is_some())?;
    let mut rng = SplitMix64::new(opts.seed);
    match opts.task {
        SynthTask::Random => {
            let vocab = tokenizer.vocab_size() as u64;
            let starts: Vec<i32> = match opts.doc_len {
                Some(len) => (0..opts.seq_len).step_by(len).map(|p| p as i32).collect(),
                None => Vec::new(),
            };
            for _ in 0..opts.num {
                let seq: Vec<i32> = (0..opts.seq_len).map(|_| rng.below(vocab) as i32).collect();
                writer.push(&seq, &starts)?;
            }
        }
        SynthTask::Passkey | SynthTask::Niah => {
            let parts = NeedleParts::new(tokenizer, opts.task)?;
            let mut infos = Vec::with_capacity(opts.num);
            for i in 0..opts.num {
                let key = draw_key(&mut rng, opts.key_digits);
                let depth = match &opts.depths {
                    Some(d) => d[i % d.len()],
                    None => rng.unit_f64() as f32,
                };
                let (seq, info) = parts.sequence(tokenizer, opts.seq_len, key, depth, &mut rng)?;
                writer.push(&seq, &[])?;
                infos.push(info);
            }
            write_passkey(writer.file(), writer.partial_path(), &infos)?;
        }
    }
    writer.finish()
}

fn check(opts: &SynthOptions) -> Result<(), DataError> {
    if opts.seq_len == 0 || opts.num == 0 {
        return Err(DataError::Usage("--seq-len and --num must be at least 1".into()));
    }
    check_key_digits(opts.key_digits)?;
    match opts.doc_len {
        Some(0) => return Err(DataError::Usage("--doc-len 0: give a document length of at least 1 token".into())),
        Some(len) if opts.task != SynthTask::Random => {
            return Err(DataError::Usage(format!(
                "--doc-len {len} applies to --task random; a {} sequence is one document",
                opts.task.name()
            )))
        }
        _ => {}
    }
    match &opts.depths {
        Some(d) if d.is_empty() || d.iter().any(|x| !(0.0..=1.0).contains(x)) => Err(DataError::Usage(format!(
            "--depths {d:?}: give one or more fractions in [0, 1], e.g. 0,0.25,0.5,0.75,1"
        ))),
        _ => Ok(()),
    }
}

fn write_passkey(file: &hdf5::File, path: &Path, infos: &[PasskeyInfo]) -> Result<(), DataError> {
    let group = file.create_group("passkey").map_err(|e| DataError::write(path, "passkey", e))?;
    let write_1d = |name: &str, v: Vec<i64>| {
        group
            .new_dataset_builder()
            .with_data(&Array1::from(v))
            .create(name)
            .map(|_| ())
            .map_err(|e| DataError::write(path, &format!("passkey/{name}"), e))
    };
    write_1d("key", infos.iter().map(|p| p.key as i64).collect())?;
    write_1d("needle_start", infos.iter().map(|p| p.needle_start as i64).collect())?;
    write_1d("answer_start", infos.iter().map(|p| p.answer_start as i64).collect())?;
    write_1d("answer_len", infos.iter().map(|p| p.answer_tokens.len() as i64).collect())?;
    let depth = Array1::from(infos.iter().map(|p| p.depth).collect::<Vec<f32>>());
    group
        .new_dataset_builder()
        .with_data(&depth)
        .create("depth")
        .map_err(|e| DataError::write(path, "passkey/depth", e))?;
    // Answers of a tokenizer.json may differ in length: pad the rows with -1.
    let width = infos.iter().map(|p| p.answer_tokens.len()).max().unwrap_or(0);
    let mut answers = Array2::from_elem((infos.len(), width), -1i32);
    for (row, p) in infos.iter().enumerate() {
        answers.row_mut(row).iter_mut().zip(&p.answer_tokens).for_each(|(a, &t)| *a = t);
    }
    group
        .new_dataset_builder()
        .with_data(&answers)
        .create("answer_tokens")
        .map_err(|e| DataError::write(path, "passkey/answer_tokens", e))?;
    Ok(())
}
