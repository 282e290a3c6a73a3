//! What can be wrong with model weights, reading a Hugging Face checkpoint (weights.rs) or matching
//! named tensors to the config (params.rs): one error for both, in a file of its own so that
//! params.rs needs nothing of weights.rs (which builds on it), with the checkpoint file names its
//! messages name. Public as `model::weights::WeightsError`.
/// A Hugging Face checkpoint's weights: one file, or shards listed by an index.
pub(super) const SINGLE_FILE: &str = "model.safetensors";
pub(super) const INDEX_FILE: &str = "model.safetensors.index.json";

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("cannot read {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path} is not a readable safetensors file (truncated or corrupt?): {message}")]
    Corrupt { path: String, message: String },
    #[error("{path}: tensor `{tensor}` has dtype {found}; model weights must be bf16, fp16, fp32 or fp64")]
    Dtype { path: String, tensor: String, found: String },
    #[error("{path}: {problem}")]
    Index { path: String, problem: String },
    #[error("no Hugging Face weights in {path}: expected {SINGLE_FILE} or {INDEX_FILE}")]
    NotFound { path: String },
    #[error("{origin}: tensor `{tensor}` has shape {found:?}, expected {expected:?} for this model config")]
    Shape { origin: String, tensor: String, expected: Vec<i64>, found: Vec<i64> },
    #[error(
        "{origin}: tensors do not match the model config ({}); is the config the one of these weights?",
        describe_names(.missing, .unexpected)
    )]
    Names { origin: String, missing: Vec<String>, unexpected: Vec<String> },
    #[error("{origin}: tensor `{tensor}` appears more than once")]
    Duplicate { origin: String, tensor: String },
    #[error("tensor `{tensor}` is {found}, but all weights must be {expected} like `{reference}`")]
    Placement { tensor: String, found: String, expected: String, reference: String },
    #[error("cannot write {path}: {message}")]
    Write { path: String, message: String },
    #[error("{path} is not a usable tokenizer file ({message}); checkpoints and final/ carry it for AutoTokenizer: replace it with a complete one, or remove it")]
    Tokenizer { path: String, message: String },
}

/// "missing [a, b]; unexpected [c]", at most 8 names each so a wrong config stays readable.
fn describe_names(missing: &[String], unexpected: &[String]) -> String {
    let list = |what: &str, names: &[String]| {
        let shown = names.iter().take(8).map(String::as_str).collect::<Vec<_>>().join(", ");
        let more = if names.len() > 8 { format!(" and {} more", names.len() - 8) } else { String::new() };
        format!("{} {what}: [{shown}]{more}", names.len())
    };
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(list("missing", missing));
    }
    if !unexpected.is_empty() {
        parts.push(list("unexpected", unexpected));
    }
    parts.join("; ")
}
