//! `ulysses data synth`: long-context data that needs no download, deterministic for a seed.
//! - passkey: filler sentences with "The pass key is NNNNN. Remember it. NNNNN is the pass key."
//!   hidden at a recorded depth, ending in "What is the pass key? The pass key is NNNNN"; the
//!   answer's position and tokens are recorded per sequence (`passkey/*` datasets).
//! - random: uniform token ids, for throughput runs.
use super::format::{claim_output_dir, shard_name, ShardWriter};
use super::order::SplitMix64;
use super::tokenizer::TextTokenizer;
use super::{DataError, PasskeyInfo};
use ndarray::{Array1, Array2};
use std::path::{Path, PathBuf};

const FILLER: &[&str] = &[
    "The grass is green. ",
    "The sky is blue. ",
    "The sun is yellow. ",
    "Here we go. ",
    "There and back again. ",
];
const QUESTION: &str = "What is the pass key? The pass key is ";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SynthTask {
    Passkey,
    Random,
}

impl SynthTask {
    /// The shard's `task` attribute.
    pub fn name(self) -> &'static str {
        match self {
            SynthTask::Passkey => "passkey",
            SynthTask::Random => "random",
        }
    }
}

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
    pub force: bool,
}

/// Writes the synthetic set and returns the shard's path.
pub fn synth(opts: &SynthOptions, tokenizer: &TextTokenizer) -> Result<PathBuf, DataError> {
    check(opts)?;
    let path = if opts.out.extension().is_some_and(|e| e == "h5") {
        if opts.out.exists() && !opts.force {
            return Err(DataError::Usage(format!(
                "{} exists; pass --force to replace it",
                opts.out.display()
            )));
        }
        if let Some(dir) = opts.out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        }
        opts.out.clone()
    } else {
        claim_output_dir(&opts.out, opts.force)?;
        opts.out.join(shard_name(0))
    };
    let mut writer = ShardWriter::create(
        &path,
        opts.seq_len,
        &tokenizer.shard_meta(opts.task.name()),
        false,
    )?;
    let mut rng = SplitMix64::new(opts.seed);
    match opts.task {
        SynthTask::Random => {
            let vocab = tokenizer.vocab_size() as u64;
            for _ in 0..opts.num {
                let seq: Vec<i32> = (0..opts.seq_len).map(|_| rng.below(vocab) as i32).collect();
                writer.push(&seq, &[])?;
            }
        }
        SynthTask::Passkey => {
            let parts = PasskeyParts::new(tokenizer)?;
            let mut infos = Vec::with_capacity(opts.num);
            let low = 10u64.pow(opts.key_digits - 1);
            for i in 0..opts.num {
                let key = low + rng.below(9 * low);
                let depth = match &opts.depths {
                    Some(d) => d[i % d.len()],
                    None => rng.unit_f64() as f32,
                };
                let (seq, info) = parts.sequence(tokenizer, opts.seq_len, key, depth)?;
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
        return Err(DataError::Usage(
            "--seq-len and --num must be at least 1".into(),
        ));
    }
    if !(1..=18).contains(&opts.key_digits) {
        return Err(DataError::Usage(format!(
            "--key-digits {} must be in 1..=18",
            opts.key_digits
        )));
    }
    match &opts.depths {
        Some(d) if d.is_empty() || d.iter().any(|x| !(0.0..=1.0).contains(x)) => {
            Err(DataError::Usage(format!(
                "--depths {d:?}: give one or more fractions in [0, 1], e.g. 0,0.25,0.5,0.75,1"
            )))
        }
        _ => Ok(()),
    }
}

/// The tokenized pieces every passkey sequence is built from.
struct PasskeyParts {
    filler: Vec<Vec<i32>>,
    question: Vec<i32>,
}

impl PasskeyParts {
    fn new(tokenizer: &TextTokenizer) -> Result<PasskeyParts, DataError> {
        let filler = FILLER
            .iter()
            .map(|s| tokenizer.encode(s))
            .collect::<Result<_, _>>()?;
        Ok(PasskeyParts {
            filler,
            question: tokenizer.encode(QUESTION)?,
        })
    }

    /// [filler .. needle .. filler][question][answer]: exactly `seq_len` tokens. The needle goes
    /// to the filler sentence boundary at or before `depth` of the filler; the answer (the key
    /// tokenized as text on its own) ends the sequence.
    fn sequence(
        &self,
        tokenizer: &TextTokenizer,
        seq_len: usize,
        key: u64,
        depth: f32,
    ) -> Result<(Vec<i32>, PasskeyInfo), DataError> {
        let needle = tokenizer.encode(&format!(
            "The pass key is {key}. Remember it. {key} is the pass key. "
        ))?;
        let answer = tokenizer.encode(&key.to_string())?;
        let fixed = needle.len() + self.question.len() + answer.len();
        if seq_len < fixed {
            let message = format!("--seq-len {seq_len} is too short for a passkey sequence; it needs at least {fixed} tokens");
            return Err(DataError::Usage(message));
        }
        let filler_len = seq_len - fixed;
        let (mut filler, mut boundaries) = (Vec::with_capacity(filler_len), Vec::new());
        for sentence in self.filler.iter().cycle() {
            if filler.len() >= filler_len {
                break;
            }
            boundaries.push(filler.len());
            filler.extend_from_slice(sentence);
        }
        filler.truncate(filler_len);
        boundaries.push(filler_len);
        let target = (depth as f64 * filler_len as f64).round() as usize;
        let needle_start = boundaries
            .iter()
            .copied()
            .take_while(|&b| b <= target)
            .last()
            .unwrap_or(0);
        let mut seq = Vec::with_capacity(seq_len);
        seq.extend_from_slice(&filler[..needle_start]);
        seq.extend_from_slice(&needle);
        seq.extend_from_slice(&filler[needle_start..]);
        seq.extend_from_slice(&self.question);
        let answer_start = seq.len();
        seq.extend_from_slice(&answer);
        Ok((
            seq,
            PasskeyInfo {
                depth,
                key,
                needle_start,
                answer_start,
                answer_tokens: answer,
            },
        ))
    }
}

fn write_passkey(file: &hdf5::File, path: &Path, infos: &[PasskeyInfo]) -> Result<(), DataError> {
    let group = file
        .create_group("passkey")
        .map_err(|e| DataError::write(path, "passkey", e))?;
    let write_1d = |name: &str, v: Vec<i64>| {
        group
            .new_dataset_builder()
            .with_data(&Array1::from(v))
            .create(name)
            .map(|_| ())
            .map_err(|e| DataError::write(path, &format!("passkey/{name}"), e))
    };
    write_1d("key", infos.iter().map(|p| p.key as i64).collect())?;
    write_1d(
        "needle_start",
        infos.iter().map(|p| p.needle_start as i64).collect(),
    )?;
    write_1d(
        "answer_start",
        infos.iter().map(|p| p.answer_start as i64).collect(),
    )?;
    write_1d(
        "answer_len",
        infos.iter().map(|p| p.answer_tokens.len() as i64).collect(),
    )?;
    let depth = Array1::from(infos.iter().map(|p| p.depth).collect::<Vec<f32>>());
    group
        .new_dataset_builder()
        .with_data(&depth)
        .create("depth")
        .map_err(|e| DataError::write(path, "passkey/depth", e))?;
    // Answers of a tokenizer.json may differ in length: pad the rows with -1.
    let width = infos
        .iter()
        .map(|p| p.answer_tokens.len())
        .max()
        .unwrap_or(0);
    let mut answers = Array2::from_elem((infos.len(), width), -1i32);
    for (row, p) in infos.iter().enumerate() {
        answers
            .row_mut(row)
            .iter_mut()
            .zip(&p.answer_tokens)
            .for_each(|(a, &t)| *a = t);
    }
    group
        .new_dataset_builder()
        .with_data(&answers)
        .create("answer_tokens")
        .map_err(|e| DataError::write(path, "passkey/answer_tokens", e))?;
    Ok(())
}
