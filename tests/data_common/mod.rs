//! Helpers shared by the tests/data_*.rs suites: shards with recognizable tokens.
#![allow(dead_code)] // each suite uses a different subset
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper, TokenizerBuilder,
};
use ulysses::data::format::{ShardMeta, ShardWriter};

/// Vocabulary of the recognizable shards: token (i, p) = i * 1000 + p fits for i < 100.
pub const VOCAB: i64 = 100_000;

/// Token at position `p` of global sequence `i`: every token names its sample and position, so a
/// wrong slice cannot go unnoticed.
pub fn token(i: usize, p: usize) -> i32 {
    (i * 1000 + p) as i32
}

pub fn meta(vocab_size: i64) -> ShardMeta {
    ShardMeta { vocab_size, eos_id: 0, tokenizer: "test".into(), tokenizer_source: "tests".into(), task: "test".into() }
}

/// Writes sequences `first .. first + n` of the recognizable pattern into one shard.
pub fn write_shard(path: &Path, first: usize, n: usize, seq_len: usize) -> PathBuf {
    let mut w = ShardWriter::create(path, seq_len, &meta(VOCAB), false).unwrap();
    for i in first..first + n {
        let seq: Vec<i32> = (0..seq_len).map(|p| token(i, p)).collect();
        w.push(&seq, &[]).unwrap();
    }
    w.finish().unwrap()
}

/// The `ulysses` binary with `args`; returns (exit code, stdout, stderr).
pub fn ulysses(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ulysses"))
        .args(args)
        .env("HDF5_USE_FILE_LOCKING", "FALSE")
        .output()
        .unwrap();
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    (out.status.code().unwrap_or(-1), text(out.stdout), text(out.stderr))
}

/// A byte-level BPE (GPT-2 style) trained on the corpus with the `tokenizers` crate.
pub fn train_tokenizer(corpus: &Path, out: &Path) {
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(400)
        .min_frequency(0)
        .special_tokens(vec![AddedToken::from("<|endoftext|>", true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tok =
        TokenizerBuilder::<BPE, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper>::new()
            .with_model(BPE::default())
            .with_normalizer(None)
            .with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(ByteLevel::default())))
            .with_post_processor(None)
            .with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())))
            .build()
            .unwrap();
    tok.train_from_files(&mut trainer, vec![corpus.display().to_string()]).unwrap();
    tok.save(out, false).unwrap();
}
