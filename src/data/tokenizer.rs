//! Text to token ids for `prepare` and `synth`: the built-in byte-level tokenizer (what the tiny
//! model uses) or a Hugging Face `tokenizer.json`.
use super::format::ShardMeta;
use super::DataError;
use std::path::{Path, PathBuf};

/// Built-in byte-level tokenizer: bytes are 0..=255, BOS 256 (emitted only by `prepare --bos`),
/// EOS 257.
pub const BYTE_BOS: i32 = 256;
pub const BYTE_EOS: i32 = 257;
pub const BYTE_VOCAB: i64 = 258;

/// End-of-text tokens of common tokenizer families, tried in order when `--eos-token` is absent.
const EOS_CANDIDATES: &[&str] = &["<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]"];

/// Beginning-of-text tokens of common tokenizer families, tried in order when `--bos-token` is
/// absent.
const BOS_CANDIDATES: &[&str] = &["<|begin_of_text|>", "<|startoftext|>", "<s>", "<bos>", "[CLS]"];

pub enum TextTokenizer {
    Byte,
    HuggingFace { tokenizer: Box<tokenizers::Tokenizer>, path: PathBuf, eos_id: u32, vocab_size: i64, hash: u64 },
}

/// FNV-1a over the tokenizer.json bytes: identifies the tokenizer across shards without a
/// crypto dependency (this guards against mix-ups, not against adversaries).
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

/// The identity shards record for a tokenizer.json with these bytes (`Dataset::tokenizer`).
pub fn identity(tokenizer_json: &[u8]) -> String {
    hash_identity(fnv1a64(tokenizer_json))
}

fn hash_identity(hash: u64) -> String {
    format!("huggingface fnv1a64:{hash:016x}")
}

impl TextTokenizer {
    /// `spec` is `byte` or the path of a `tokenizer.json`; `eos_token` overrides the EOS lookup.
    pub fn load(spec: &str, eos_token: Option<&str>) -> Result<TextTokenizer, DataError> {
        if spec == "byte" {
            return match eos_token {
                None => Ok(TextTokenizer::Byte),
                Some(_) => Err(DataError::Usage(
                    "--eos-token applies only to a tokenizer.json; the byte tokenizer's EOS is 257".into(),
                )),
            };
        }
        let path = PathBuf::from(spec);
        let err = |message: String| DataError::Tokenizer { path: path.clone(), message };
        let bytes = std::fs::read(&path)
            .map_err(|e| err(format!("cannot read ({e}); pass `byte` or a tokenizer.json path")))?;
        let tokenizer = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| err(format!("is not a valid tokenizer.json ({e})")))?;
        let eos_id = match eos_token {
            Some(t) => {
                tokenizer.token_to_id(t).ok_or_else(|| err(format!("has no token \"{t}\" (from --eos-token)")))?
            }
            None => EOS_CANDIDATES.iter().find_map(|t| tokenizer.token_to_id(t)).ok_or_else(|| {
                err(format!(
                    "has none of the usual EOS tokens ({}); name it with --eos-token",
                    EOS_CANDIDATES.join(", ")
                ))
            })?,
        };
        // The largest id + 1, not the token count: ids of added tokens may leave gaps.
        let vocab_size = tokenizer.get_vocab(true).values().max().map_or(0, |&m| m as i64 + 1);
        Ok(TextTokenizer::HuggingFace {
            tokenizer: Box::new(tokenizer),
            path,
            eos_id,
            vocab_size,
            hash: fnv1a64(&bytes),
        })
    }

    /// Token ids of `text`, without special tokens (documents are joined with EOS by the caller).
    pub fn encode(&self, text: &str) -> Result<Vec<i32>, DataError> {
        match self {
            TextTokenizer::Byte => Ok(text.bytes().map(i32::from).collect()),
            TextTokenizer::HuggingFace { tokenizer, path, .. } => {
                let enc = tokenizer.encode(text, false).map_err(|e| DataError::Tokenizer {
                    path: path.clone(),
                    message: format!("encoding failed: {e}"),
                })?;
                Ok(enc.get_ids().iter().map(|&i| i as i32).collect())
            }
        }
    }

    pub fn vocab_size(&self) -> i64 {
        match self {
            TextTokenizer::Byte => BYTE_VOCAB,
            TextTokenizer::HuggingFace { vocab_size, .. } => *vocab_size,
        }
    }

    pub fn eos_id(&self) -> i32 {
        match self {
            TextTokenizer::Byte => BYTE_EOS,
            TextTokenizer::HuggingFace { eos_id, .. } => *eos_id as i32,
        }
    }

    /// The BOS id `prepare --bos` begins documents with: `bos_token` if given, else the usual
    /// names a tokenizer.json has (256 for the byte tokenizer).
    pub fn bos_id(&self, bos_token: Option<&str>) -> Result<i32, DataError> {
        match self {
            TextTokenizer::Byte => match bos_token {
                None => Ok(BYTE_BOS),
                Some(_) => Err(DataError::Usage(
                    "--bos-token applies only to a tokenizer.json; the byte tokenizer's BOS is 256".into(),
                )),
            },
            TextTokenizer::HuggingFace { tokenizer, path, .. } => {
                let err = |message: String| DataError::Tokenizer { path: path.clone(), message };
                let id = match bos_token {
                    Some(t) => tokenizer
                        .token_to_id(t)
                        .ok_or_else(|| err(format!("has no token \"{t}\" (from --bos-token)")))?,
                    None => BOS_CANDIDATES.iter().find_map(|t| tokenizer.token_to_id(t)).ok_or_else(|| {
                        err(format!(
                            "has none of the usual BOS tokens ({}); name it with --bos-token",
                            BOS_CANDIDATES.join(", ")
                        ))
                    })?,
                };
                Ok(id as i32)
            }
        }
    }

    /// What identifies the tokenizer: `byte`, or a tokenizer.json's `identity` (its hash), as
    /// shards record it.
    pub fn name(&self) -> String {
        match self {
            TextTokenizer::Byte => "byte".to_string(),
            TextTokenizer::HuggingFace { hash, .. } => hash_identity(*hash),
        }
    }

    /// The attributes a shard made with this tokenizer carries.
    pub fn shard_meta(&self, task: &str) -> ShardMeta {
        let tokenizer_source = match self {
            TextTokenizer::Byte => "built-in".to_string(),
            TextTokenizer::HuggingFace { path, .. } => source_name(path),
        };
        ShardMeta {
            vocab_size: self.vocab_size(),
            eos_id: self.eos_id() as i64,
            tokenizer: self.name(),
            tokenizer_source,
            task: task.into(),
        }
    }
}

fn source_name(path: &Path) -> String {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()).display().to_string()
}

/// The tokenizer.json that `data prepare` (or `synth`) made `ds` with, if the shards name one
/// that is still there with the same contents (the hash the shards record); None for the byte
/// tokenizer, or when the file moved or changed since.
pub fn recorded_tokenizer(ds: &super::Dataset) -> Option<PathBuf> {
    let shard = *ds.shard_paths().first()?;
    let file = hdf5::File::open(shard).ok()?;
    let path = PathBuf::from(super::shard::read_str_attr(&file, shard, "tokenizer_source").ok()?);
    let bytes = std::fs::read(&path).ok()?;
    (identity(&bytes) == ds.tokenizer()).then_some(path)
}
