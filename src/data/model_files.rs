//! What a Hugging Face model folder says about its tokens, read from the files transformers reads:
//! tokenizer_config.json (special tokens, chat template), chat_template.jinja (the template as
//! transformers 4.5x+ saves it; it takes precedence, as there), generation_config.json and
//! config.json (EOS ids). The EOS is what these files say, never guessed from token names.
use super::DataError;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub struct TokenizerConfig {
    /// The file the special tokens came from (for messages).
    pub path: PathBuf,
    pub eos_token: Option<String>,
    pub bos_token: Option<String>,
    /// Every `*_token` entry as text (`bos_token`, `eos_token`, `pad_token`, ...): what
    /// transformers passes to a chat template.
    pub special_tokens: BTreeMap<String, String>,
    /// The template's source and the file it came from.
    pub chat_template: Option<(String, PathBuf)>,
    /// generation_config.json's `eos_token_id` (one id or a list).
    pub generation_eos: Vec<i64>,
}

fn read_json(path: &Path) -> Result<Option<Value>, DataError> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    let value = serde_json::from_str(&text).map_err(|e| DataError::Input {
        path: path.into(),
        line: e.line() as u64,
        message: format!("not valid JSON ({e})"),
    })?;
    Ok(Some(value))
}

/// A special token as tokenizer_config.json writes it: a string or `{"content": ...}`.
fn token_text(v: &Value) -> Option<String> {
    v.as_str().or_else(|| v.get("content").and_then(Value::as_str)).map(str::to_string)
}

/// One id or a list of ids (`eos_token_id` in generation_config.json and config.json).
fn ids(v: Option<&Value>) -> Vec<i64> {
    match v {
        Some(Value::Array(list)) => list.iter().filter_map(Value::as_i64).collect(),
        Some(v) => v.as_i64().into_iter().collect(),
        None => Vec::new(),
    }
}

impl TokenizerConfig {
    /// The tokenizer files of folder `dir`; None when it has neither tokenizer_config.json nor
    /// chat_template.jinja (a bare tokenizer.json).
    pub fn read(dir: &Path) -> Result<Option<TokenizerConfig>, DataError> {
        let path = dir.join("tokenizer_config.json");
        let jinja = dir.join("chat_template.jinja");
        let config = read_json(&path)?;
        if config.is_none() && !jinja.is_file() {
            return Ok(None);
        }
        let config = config.unwrap_or(Value::Null);
        let special_tokens: BTreeMap<String, String> = config
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| k.ends_with("_token"))
            .filter_map(|(k, v)| token_text(v).map(|t| (k.clone(), t)))
            .collect();
        let chat_template = if jinja.is_file() {
            Some((std::fs::read_to_string(&jinja).map_err(|e| DataError::io(&jinja, e))?, jinja))
        } else {
            template_in_config(&config, &path)?.map(|t| (t, path.clone()))
        };
        let generation = read_json(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);
        Ok(Some(TokenizerConfig {
            eos_token: special_tokens.get("eos_token").cloned(),
            bos_token: special_tokens.get("bos_token").cloned(),
            special_tokens,
            chat_template,
            generation_eos: ids(generation.get("eos_token_id")),
            path,
        }))
    }
}

/// tokenizer_config.json's `chat_template`: a string, or a list of `{name, template}` of which
/// transformers uses "default".
fn template_in_config(config: &Value, path: &Path) -> Result<Option<String>, DataError> {
    match config.get("chat_template") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(list)) => {
            let default = list.iter().find(|t| t.get("name").and_then(Value::as_str) == Some("default"));
            match default.and_then(|t| t.get("template")).and_then(Value::as_str) {
                Some(t) => Ok(Some(t.to_string())),
                None => Err(DataError::Input {
                    path: path.into(),
                    line: 1,
                    message: "`chat_template` is a list without a {\"name\": \"default\", \"template\": ...} entry"
                        .into(),
                }),
            }
        }
        Some(_) => Err(DataError::Input {
            path: path.into(),
            line: 1,
            message: "`chat_template` is neither a string nor a list of {name, template}".into(),
        }),
    }
}

/// Every id model folder `dir` calls an end of sequence: tokenizer_config.json's `eos_token`,
/// generation_config.json's and config.json's `eos_token_id`. Empty when it names none.
pub fn model_eos_ids(dir: &Path) -> Result<Vec<i64>, DataError> {
    let mut found = Vec::new();
    if let Some(config) = TokenizerConfig::read(dir)? {
        found.extend(config.generation_eos.iter().copied());
        let tokenizer = dir.join("tokenizer.json");
        if let (Some(eos), true) = (&config.eos_token, tokenizer.is_file()) {
            let tok = tokenizers::Tokenizer::from_file(&tokenizer).map_err(|e| DataError::Tokenizer {
                path: tokenizer.clone(),
                message: format!("is not a valid tokenizer.json ({e})"),
            })?;
            found.extend(tok.token_to_id(eos).map(i64::from));
        }
    }
    found.extend(ids(read_json(&dir.join("config.json"))?.as_ref().and_then(|c| c.get("eos_token_id"))));
    found.sort_unstable();
    found.dedup();
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_tokens_and_templates_come_from_the_files_transformers_reads() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert!(TokenizerConfig::read(d).unwrap().is_none(), "a bare folder has no config");
        let config = serde_json::json!({
            "eos_token": {"content": "<|im_end|>", "lstrip": false}, "bos_token": null, "pad_token": "<pad>",
            "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
        });
        std::fs::write(d.join("tokenizer_config.json"), config.to_string()).unwrap();
        std::fs::write(d.join("generation_config.json"), r#"{"eos_token_id": [7, 3]}"#).unwrap();
        std::fs::write(d.join("config.json"), r#"{"eos_token_id": 5}"#).unwrap();
        let c = TokenizerConfig::read(d).unwrap().unwrap();
        assert_eq!((c.eos_token.as_deref(), c.bos_token.as_deref()), (Some("<|im_end|>"), None));
        assert_eq!(c.special_tokens.get("pad_token").map(String::as_str), Some("<pad>"));
        assert_eq!(c.chat_template.as_ref().map(|(t, _)| t.as_str()), Some("D"), "the default of a list");
        assert_eq!(c.generation_eos, vec![7, 3]);
        assert_eq!(model_eos_ids(d).unwrap(), vec![3, 5, 7], "no tokenizer.json: the eos_token is not counted");
        std::fs::write(d.join("chat_template.jinja"), "J").unwrap();
        let c = TokenizerConfig::read(d).unwrap().unwrap();
        assert_eq!(c.chat_template.as_ref().map(|(t, _)| t.as_str()), Some("J"), "the .jinja file wins");
        std::fs::write(d.join("tokenizer_config.json"), r#"{"chat_template": [{"name": "x", "template": "T"}]}"#)
            .unwrap();
        std::fs::remove_file(d.join("chat_template.jinja")).unwrap();
        let err = TokenizerConfig::read(d).err().unwrap().to_string();
        assert!(err.contains("tokenizer_config.json") && err.contains("\"default\""), "{err}");
    }
}
