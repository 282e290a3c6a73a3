//! Hugging Face safetensors checkpoints: `load_hf` reads a single `model.safetensors` or a sharded
//! checkpoint with `model.safetensors.index.json`; `save_hf` writes one that transformers'
//! `from_pretrained` loads (config.json, shards, index).
pub use super::error::WeightsError;

use super::error::{INDEX_FILE, SINGLE_FILE};
use super::params::ModelWeights;
use super::spec::ModelSpec;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Loads HF Llama weights from a checkpoint folder or a single `.safetensors` file, converting
/// every tensor to `kind` on `device`, and checks names and shapes against `spec`.
pub fn load_hf(dir_or_file: &Path, spec: &ModelSpec, kind: Kind, device: Device) -> Result<ModelWeights, WeightsError> {
    let (files, whole) = checkpoint_files(dir_or_file)?;
    let mut named = Vec::new();
    let mut file_of: HashMap<String, String> = HashMap::new();
    for file in &files {
        let path = file.display().to_string();
        std::fs::metadata(file).map_err(|source| WeightsError::Io { path: path.clone(), source })?;
        let tensors = Tensor::read_safetensors(file).map_err(|e| {
            // tch's message repeats the path; keep only the safetensors reason.
            let message = match e {
                tch::TchError::SafeTensorError { err, .. } => err.to_string(),
                other => other.to_string(),
            };
            WeightsError::Corrupt { path: path.clone(), message }
        })?;
        for (name, t) in tensors {
            if !matches!(t.kind(), Kind::BFloat16 | Kind::Half | Kind::Float | Kind::Double) {
                return Err(WeightsError::Dtype { path, tensor: name, found: format!("{:?}", t.kind()) });
            }
            if let Some(first) = file_of.insert(name.clone(), path.clone()) {
                return Err(WeightsError::Duplicate { origin: format!("{first} and {path}"), tensor: name });
            }
            // Convert file by file so at most one file's worth of tensors exists in both forms.
            named.push((name, t.to_kind(kind).to_device(device)));
        }
    }
    let origin = |name: &str| file_of.get(name).cloned().unwrap_or_else(|| whole.clone());
    ModelWeights::from_named_in(spec, named, &origin, &whole)
}

/// The safetensors files of a checkpoint and the path that names the checkpoint as a whole.
fn checkpoint_files(path: &Path) -> Result<(Vec<PathBuf>, String), WeightsError> {
    let shown = path.display().to_string();
    if path.is_file() {
        return Ok((vec![path.to_path_buf()], shown));
    }
    if !path.is_dir() {
        let source = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory");
        return Err(WeightsError::Io { path: shown, source });
    }
    let index = path.join(INDEX_FILE);
    if !index.exists() {
        let single = path.join(SINGLE_FILE);
        if single.exists() {
            return Ok((vec![single.clone()], single.display().to_string()));
        }
        return Err(WeightsError::NotFound { path: shown });
    }
    let index_path = index.display().to_string();
    let bad = |problem: String| WeightsError::Index { path: index_path.clone(), problem };
    let text =
        std::fs::read_to_string(&index).map_err(|source| WeightsError::Io { path: index_path.clone(), source })?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("has no `weight_map` object".to_string()))?;
    let mut files = Vec::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| bad(format!("weight_map[\"{tensor}\"] is not a file name")))?;
        // A weight file lives in the model folder: an index is never a way to open other files.
        let plain = std::path::Path::new(file).components().all(|c| matches!(c, std::path::Component::Normal(_)));
        if !plain {
            return Err(bad(format!(
                "weight_map[\"{tensor}\"] = \"{file}\" is not a file inside the model folder (no absolute paths or '..')"
            )));
        }
        let file = path.join(file);
        if !files.contains(&file) {
            files.push(file);
        }
    }
    files.sort();
    Ok((files, index_path))
}

/// Writes `w` as a Hugging Face checkpoint into `dir`: config.json (the one the spec was read
/// from, with only the dtype changed: the files hold `w`'s), then shards of at most
/// `max_shard_bytes` (a tensor larger than that gets a shard of its own; 0 means one file) named
/// like transformers names them, plus the index when there is more than one. Earlier weight files
/// in `dir` are removed first so a stale shard cannot be mixed in.
pub fn save_hf(w: &ModelWeights, spec: &ModelSpec, dir: &Path, max_shard_bytes: u64) -> Result<(), WeightsError> {
    // Refuse to write a checkpoint that does not match its config.json. (`from_named` tolerates
    // the stored head of a tied model, as transformers does on load; we never write one.)
    if spec.tie_word_embeddings && w.lm_head.is_some() {
        let unexpected = vec!["lm_head.weight".to_string()];
        return Err(WeightsError::Names { origin: "weights to save".to_string(), missing: Vec::new(), unexpected });
    }
    ModelWeights::from_named(spec, w.named_tensors())?;
    let write_err = |path: &Path, e: &dyn std::fmt::Display| WeightsError::Write {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(|e| write_err(dir, &e))?;
    remove_weight_files(dir).map_err(|e| write_err(dir, &e))?;

    let mut shards: Vec<Vec<(String, Tensor)>> = vec![Vec::new()];
    let (mut shard_bytes, mut total_bytes) = (0u64, 0u64);
    for (name, t) in w.named_tensors() {
        let bytes = (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        let current = shards.last().map_or(0, Vec::len);
        if max_shard_bytes > 0 && current > 0 && shard_bytes + bytes > max_shard_bytes {
            shards.push(Vec::new());
            shard_bytes = 0;
        }
        shard_bytes += bytes;
        total_bytes += bytes;
        shards.last_mut().unwrap_or_else(|| unreachable!("starts with one shard")).push((name, t));
    }
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.into_iter().enumerate() {
        let file = if n == 1 { SINGLE_FILE.to_string() } else { format!("model-{:05}-of-{n:05}.safetensors", i + 1) };
        // safetensors stores host bytes of contiguous tensors.
        let host: Vec<(String, Tensor)> =
            shard.into_iter().map(|(name, t)| (name, t.detach().to_device(Device::Cpu).contiguous())).collect();
        let path = dir.join(&file);
        Tensor::write_safetensors(&host, &path).map_err(|e| write_err(&path, &e))?;
        weight_map.extend(host.into_iter().map(|(name, _)| (name, file.clone())));
    }
    if n > 1 {
        let index = serde_json::json!({ "metadata": { "total_size": total_bytes }, "weight_map": weight_map });
        write_json(&dir.join(INDEX_FILE), &index).map_err(|e| write_err(&dir.join(INDEX_FILE), &e))?;
    }
    let mut config = spec.to_hf_json();
    // transformers 4.x reads `torch_dtype`, 5.x `dtype`: both say what the files hold.
    let dtype = dtype_name(w.embed.kind());
    config["torch_dtype"] = dtype.into();
    config["dtype"] = dtype.into();
    write_json(&dir.join("config.json"), &config).map_err(|e| write_err(&dir.join("config.json"), &e))
}

/// The files besides config.json and the weights that make a model folder usable by
/// `AutoTokenizer`, `pipeline` and `generate`: the tokenizer in its fast and slow forms, its
/// special tokens and chat template, and the generation defaults.
pub const TOKENIZER_FILES: [&str; 9] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
];

/// The `TOKENIZER_FILES` that folder `dir` has: (path, name in a model folder).
pub fn tokenizer_files(dir: &Path) -> Vec<(PathBuf, &'static str)> {
    TOKENIZER_FILES.iter().map(|&f| (dir.join(f), f)).filter(|(p, _)| p.is_file()).collect()
}

/// Reads each of `files` (path, name) that is JSON, tokenizer.json as a tokenizer: a truncated
/// or broken one is refused at the start of a run, not copied into every checkpoint and `final/`
/// for AutoTokenizer to fail on later.
pub fn check_tokenizer_files(files: &[(PathBuf, &str)]) -> Result<(), WeightsError> {
    for (path, name) in files {
        let bad = |message: String| WeightsError::Tokenizer { path: path.display().to_string(), message };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        if *name == "tokenizer.json" {
            <tokenizers::Tokenizer as std::str::FromStr>::from_str(&text).map_err(|e| bad(e.to_string()))?;
        } else if name.ends_with(".json") {
            serde_json::from_str::<serde_json::Value>(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        }
    }
    Ok(())
}

/// Copies each of `files` (path, name) into the checkpoint folder `dir` under its name, as new
/// files with the run's own modes (a world-writable source does not make world-writable copies).
pub fn copy_tokenizer_files(files: &[(PathBuf, &str)], dir: &Path) -> Result<(), WeightsError> {
    for (file, name) in files {
        let dest = dir.join(name);
        crate::files::copy(file, &dest).map_err(|e| WeightsError::Write {
            path: dest.display().to_string(),
            message: format!("copying {}: {e}", file.display()),
        })?;
    }
    Ok(())
}

fn write_json(path: &Path, value: &serde_json::Value) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
    crate::files::write(path, (text + "\n").as_bytes())
}

fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        Kind::Double => "float64",
        _ => "float32",
    }
}

/// Removes `model.safetensors`, `model-*-of-*.safetensors` and the index from `dir`.
fn remove_weight_files(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        let shard = name.starts_with("model-") && name.contains("-of-") && name.ends_with(".safetensors");
        if name == SINGLE_FILE || name == INDEX_FILE || shard {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}
