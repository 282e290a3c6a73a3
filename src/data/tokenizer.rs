//! Text to token ids for `prepare` and `synth`: the built-in byte-level tokenizer (what the tiny
//! model uses) or a Hugging Face tokenizer: a `tokenizer.json`, or a model folder with its
//! `tokenizer_config.json` (EOS, BOS, chat template) and `generation_config.json`.
use super::format::ShardMeta;
use super::model_files::TokenizerConfig;
use super::template::ChatTemplate;
use super::DataError;
use std::path::{Path, PathBuf};

/// Built-in byte-level tokenizer: bytes are 0..=255, BOS 256 (emitted only by `prepare --bos`),
/// EOS 257.
pub const BYTE_BOS: i32 = 256;
pub const BYTE_EOS: i32 = 257;
pub const BYTE_VOCAB: i64 = 258;

/// End-of-text tokens of common tokenizer families, tried in order for a bare tokenizer.json (no
/// tokenizer_config.json beside it) when `--eos-token` is absent.
const EOS_CANDIDATES: &[&str] = &["<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]"];

/// Beginning-of-text tokens of common tokenizer families, tried in order for a bare tokenizer.json
/// when `--bos-token` is absent.
const BOS_CANDIDATES: &[&str] = &["<|begin_of_text|>", "<|startoftext|>", "<s>", "<bos>", "[CLS]"];

pub enum TextTokenizer {
    Byte,
    HuggingFace {
        tokenizer: Box<tokenizers::Tokenizer>,
        /// The tokenizer.json.
        path: PathBuf,
        eos_id: u32,
        /// tokenizer_config.json's `bos_token` (None: no config, or it names none).
        bos_id: Option<u32>,
        vocab_size: i64,
        hash: u64,
        /// The model's chat template (tokenizer_config.json or chat_template.jinja).
        chat_template: Option<Box<ChatTemplate>>,
    },
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
    /// `spec` is `byte`, the path of a `tokenizer.json` or a model folder holding one. The EOS is
    /// `eos_token` if given, else the one tokenizer_config.json (beside the tokenizer.json) or
    /// generation_config.json names; a bare tokenizer.json falls back to the usual names.
    pub fn load(spec: &str, eos_token: Option<&str>) -> Result<TextTokenizer, DataError> {
        if spec == "byte" {
            return match eos_token {
                None => Ok(TextTokenizer::Byte),
                Some(_) => Err(DataError::Usage(
                    "--eos-token applies only to a tokenizer.json; the byte tokenizer's EOS is 257".into(),
                )),
            };
        }
        let given = PathBuf::from(spec);
        let path = if given.is_dir() { given.join("tokenizer.json") } else { given.clone() };
        let err = |message: String| DataError::Tokenizer { path: path.clone(), message };
        let bytes = std::fs::read(&path).map_err(|e| {
            err(format!("cannot read ({e}); pass `byte`, a tokenizer.json or a model folder that holds one"))
        })?;
        let tokenizer = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| err(format!("is not a valid tokenizer.json ({e})")))?;
        let config = TokenizerConfig::read(path.parent().unwrap_or(Path::new(".")))?;
        let id_of = |token: &str, origin: &str| {
            tokenizer.token_to_id(token).ok_or_else(|| err(format!("has no token \"{token}\" (from {origin})")))
        };
        let eos_id = match (eos_token, &config) {
            (Some(t), _) => id_of(t, "--eos-token")?,
            (None, Some(c)) => match (&c.eos_token, c.generation_eos.first()) {
                (Some(t), _) => id_of(t, "tokenizer_config.json `eos_token`")?,
                (None, Some(&id)) => id as u32,
                (None, None) => {
                    return Err(err(format!(
                        "names no EOS: {} has no `eos_token` and no generation_config.json `eos_token_id` is beside it; name it with --eos-token",
                        c.path.display()
                    )))
                }
            },
            (None, None) => EOS_CANDIDATES.iter().find_map(|t| tokenizer.token_to_id(t)).ok_or_else(|| {
                err(format!(
                    "has none of the usual EOS tokens ({}) and no tokenizer_config.json beside it; name it with --eos-token",
                    EOS_CANDIDATES.join(", ")
                ))
            })?,
        };
        let bos_id = match config.as_ref().and_then(|c| c.bos_token.as_deref()) {
            Some(t) => Some(id_of(t, "tokenizer_config.json `bos_token`")?),
            None => None,
        };
        let chat_template = match config.as_ref().and_then(|c| c.chat_template.as_ref()) {
            Some((source, origin)) => {
                let special = config.as_ref().map(|c| c.special_tokens.clone()).unwrap_or_default();
                let template = ChatTemplate::new(source.clone(), special).map_err(|e| DataError::Tokenizer {
                    path: origin.clone(),
                    message: format!("the chat template does not compile: {e}"),
                })?;
                Some(Box::new(template))
            }
            None => None,
        };
        // The largest id + 1, not the token count: ids of added tokens may leave gaps.
        let vocab_size = tokenizer.get_vocab(true).values().max().map_or(0, |&m| m as i64 + 1);
        Ok(TextTokenizer::HuggingFace {
            tokenizer: Box::new(tokenizer),
            path,
            eos_id,
            bos_id,
            vocab_size,
            hash: fnv1a64(&bytes),
            chat_template,
        })
    }

    /// The model's chat template, if the tokenizer came with one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        match self {
            TextTokenizer::Byte => None,
            TextTokenizer::HuggingFace { chat_template, .. } => chat_template.as_deref(),
        }
    }

    /// Token ids of `text` as `apply_chat_template` tokenizes a rendered conversation (special
    /// tokens in the text are matched, none are added), with each token's byte range in `text`.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<i32>, Vec<(usize, usize)>), DataError> {
        match self {
            TextTokenizer::Byte => {
                Ok((text.bytes().map(i32::from).collect(), (0..text.len()).map(|i| (i, i + 1)).collect()))
            }
            TextTokenizer::HuggingFace { tokenizer, path, .. } => {
                let enc = tokenizer.encode(text, false).map_err(|e| DataError::Tokenizer {
                    path: path.clone(),
                    message: format!("encoding failed: {e}"),
                })?;
                Ok((enc.get_ids().iter().map(|&i| i as i32).collect(), enc.get_offsets().to_vec()))
            }
        }
    }

    /// Whether `id` is one of the tokenizer's added tokens (`<|im_end|>`, `<|eot_id|>`, ...).
    pub fn is_added_token(&self, id: i32) -> bool {
        match self {
            TextTokenizer::Byte => false,
            TextTokenizer::HuggingFace { tokenizer, .. } => {
                u32::try_from(id).is_ok_and(|id| tokenizer.get_added_tokens_decoder().contains_key(&id))
            }
        }
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

    /// The BOS id `prepare --bos` begins documents with: `bos_token` if given, else
    /// tokenizer_config.json's, else the usual names a bare tokenizer.json has (256 for the byte
    /// tokenizer).
    pub fn bos_id(&self, bos_token: Option<&str>) -> Result<i32, DataError> {
        match self {
            TextTokenizer::Byte => match bos_token {
                None => Ok(BYTE_BOS),
                Some(_) => Err(DataError::Usage(
                    "--bos-token applies only to a tokenizer.json; the byte tokenizer's BOS is 256".into(),
                )),
            },
            TextTokenizer::HuggingFace { tokenizer, path, bos_id, .. } => {
                let err = |message: String| DataError::Tokenizer { path: path.clone(), message };
                let id = match (bos_token, bos_id) {
                    (Some(t), _) => tokenizer
                        .token_to_id(t)
                        .ok_or_else(|| err(format!("has no token \"{t}\" (from --bos-token)")))?,
                    (None, Some(id)) => *id,
                    (None, None) => BOS_CANDIDATES.iter().find_map(|t| tokenizer.token_to_id(t)).ok_or_else(|| {
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
