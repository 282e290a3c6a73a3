//! Needle-retrieval sequences: `[filler .. needle .. filler][question][answer]`, exactly `seq_len`
//! tokens. `ulysses data synth` writes sets of them for training; `ulysses eval` builds its
//! length × depth grid one sequence at a time with `needle_sample`, so a grid cell looks exactly
//! like training data of that length.
//! - passkey: the fixed filler cycle "The grass is green. The sky is blue. ..." and the needle
//!   "The pass key is NNNNN. Remember it. NNNNN is the pass key. ".
//! - niah: varied filler sentences drawn at random and a single fact "The special magic number is
//!   NNNNN. " (needle-in-a-haystack style), asked for at the end.
use super::tokenizer::TextTokenizer;
use super::{DataError, PasskeyInfo};
use crate::rng::SplitMix64;

const PASSKEY_FILLER: &[&str] =
    &["The grass is green. ", "The sky is blue. ", "The sun is yellow. ", "Here we go. ", "There and back again. "];
const PASSKEY_QUESTION: &str = "What is the pass key? The pass key is ";

// No digits in the filler: the key is the only number in the text.
const NIAH_FILLER: &[&str] = &[
    "The old library kept its rarest maps in a room without windows. ",
    "Most rivers in the valley freeze for a few weeks each winter. ",
    "A good loaf of bread needs time more than it needs skill. ",
    "The committee met twice before agreeing on the colour of the doors. ",
    "Engineers at the plant replaced the pumps one at a time. ",
    "Few people remember who planted the orchard behind the school. ",
    "The train to the coast stops at every village on Sundays. ",
    "She wrote her notes in pencil so that she could change her mind. ",
    "Clouds gathered over the hills long before the first drops fell. ",
    "The museum moved its clocks to the east wing last spring. ",
    "Learning a language is easier with someone to talk to. ",
    "The harbour was quiet except for the gulls and a single ferry. ",
    "Every map is a choice about what to leave out. ",
    "The recipe called for three eggs, but the baker used four. ",
    "Small companies often grow by solving one problem very well. ",
    "The path along the cliff is closed after heavy rain. ",
    "He kept the letters in a tin box under the stairs. ",
    "Good tools last longer when they are cleaned after use. ",
    "The festival drew visitors from towns across the region. ",
    "Old bridges were built to carry carts, not trucks. ",
];
const NIAH_QUESTION: &str =
    "What is the special magic number mentioned in the text above? The special magic number is ";

/// The tasks `ulysses data synth` writes: the two needle tasks, whose text this file builds, and
/// random tokens (synth.rs). Defined here because synth.rs builds on this file, not the reverse;
/// evaluation's grid picks its task from it too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SynthTask {
    /// Pass-key retrieval: "The pass key is NNNNN." hidden in repeated filler, asked for at the end.
    Passkey,
    /// Needle in a haystack: varied filler, "The special magic number is NNNNN."
    Niah,
    /// Uniform random tokens (no answer).
    Random,
}

impl SynthTask {
    /// The shard's `task` attribute.
    pub fn name(self) -> &'static str {
        match self {
            SynthTask::Passkey => "passkey",
            SynthTask::Niah => "niah",
            SynthTask::Random => "random",
        }
    }
}

/// The tokenized pieces every sequence of one task is built from.
pub(crate) struct NeedleParts {
    task: SynthTask,
    filler: Vec<Vec<i32>>,
    question: Vec<i32>,
}

impl NeedleParts {
    pub(crate) fn new(tokenizer: &TextTokenizer, task: SynthTask) -> Result<NeedleParts, DataError> {
        let (filler, question) = match task {
            SynthTask::Passkey => (PASSKEY_FILLER, PASSKEY_QUESTION),
            SynthTask::Niah => (NIAH_FILLER, NIAH_QUESTION),
            SynthTask::Random => {
                return Err(DataError::Usage("the random task has no needle; use passkey or niah".into()))
            }
        };
        Ok(NeedleParts {
            task,
            filler: filler.iter().map(|s| tokenizer.encode(s)).collect::<Result<_, _>>()?,
            question: tokenizer.encode(question)?,
        })
    }

    fn needle_text(&self, key: u64) -> String {
        match self.task {
            SynthTask::Niah => format!("The special magic number is {key}. "),
            _ => format!("The pass key is {key}. Remember it. {key} is the pass key. "),
        }
    }

    /// [filler .. needle .. filler][question][answer]: exactly `seq_len` tokens. The needle goes
    /// to the filler sentence boundary at or before `depth` of the filler; the answer (the key
    /// tokenized as text on its own) ends the sequence. Passkey filler cycles in a fixed order
    /// (`rng` unused); niah filler sentences are drawn from `rng`.
    pub(crate) fn sequence(
        &self,
        tokenizer: &TextTokenizer,
        seq_len: usize,
        key: u64,
        depth: f32,
        rng: &mut SplitMix64,
    ) -> Result<(Vec<i32>, PasskeyInfo), DataError> {
        let needle = tokenizer.encode(&self.needle_text(key))?;
        let answer = tokenizer.encode(&key.to_string())?;
        let fixed = needle.len() + self.question.len() + answer.len();
        if seq_len < fixed {
            return Err(DataError::Usage(format!(
                "sequence length {seq_len} is too short for a {} sequence; it needs at least {fixed} tokens",
                self.task.name()
            )));
        }
        let filler_len = seq_len - fixed;
        let (mut filler, mut boundaries) = (Vec::with_capacity(filler_len), Vec::new());
        let mut next = 0;
        while filler.len() < filler_len {
            let sentence = match self.task {
                SynthTask::Niah => rng.below(self.filler.len() as u64) as usize,
                _ => next % self.filler.len(),
            };
            next += 1;
            boundaries.push(filler.len());
            filler.extend_from_slice(&self.filler[sentence]);
        }
        filler.truncate(filler_len);
        boundaries.push(filler_len);
        let target = (depth as f64 * filler_len as f64).round() as usize;
        let needle_start = boundaries.iter().copied().take_while(|&b| b <= target).last().unwrap_or(0);
        let mut seq = Vec::with_capacity(seq_len);
        seq.extend_from_slice(&filler[..needle_start]);
        seq.extend_from_slice(&needle);
        seq.extend_from_slice(&filler[needle_start..]);
        seq.extend_from_slice(&self.question);
        let answer_start = seq.len();
        seq.extend_from_slice(&answer);
        let info = PasskeyInfo { depth, key, needle_start, answer_start, answer_tokens: answer };
        Ok((seq, info))
    }
}

/// A uniform key of exactly `digits` digits (1..=18).
pub(crate) fn draw_key(rng: &mut SplitMix64, digits: u32) -> u64 {
    let low = 10u64.pow(digits - 1);
    low + rng.below(9 * low)
}

pub(crate) fn check_key_digits(digits: u32) -> Result<(), DataError> {
    if (1..=18).contains(&digits) {
        Ok(())
    } else {
        Err(DataError::Usage(format!("--key-digits {digits} must be in 1..=18")))
    }
}

/// One sequence of a needle task (passkey or niah) of `seq_len` tokens with the needle at
/// `depth` (fraction of the filler, 0 = start, 1 = end); the key (`key_digits` digits) and, for
/// niah, the filler are drawn from `seed`. Deterministic: every rank of an SP group builds the
/// same sequence.
pub fn needle_sample(
    tokenizer: &TextTokenizer,
    task: SynthTask,
    seq_len: usize,
    depth: f32,
    key_digits: u32,
    seed: u64,
) -> Result<(Vec<i32>, PasskeyInfo), DataError> {
    check_key_digits(key_digits)?;
    if !(0.0..=1.0).contains(&depth) {
        return Err(DataError::Usage(format!("depth {depth} must be a fraction in [0, 1]")));
    }
    let parts = NeedleParts::new(tokenizer, task)?;
    let mut rng = SplitMix64::new(seed);
    let key = draw_key(&mut rng, key_digits);
    parts.sequence(tokenizer, seq_len, key, depth, &mut rng)
}
