//! Model architectures: the families we train (Llama, Qwen3, Qwen2 / Qwen2.5, Mistral), their
//! presets, and Hugging Face `config.json` (read in `hf`). Plain data (no tch), so the config
//! validator and the memory plan can use it without touching libtorch.
pub mod adapter;
mod hf;
mod units;

pub use hf::SourceConfig;
use serde::{Deserialize, Serialize};
use std::path::Path;
pub use units::UnitId;

/// A decoder-only family, named by `config.json`'s `model_type`. All share Llama's layer (RMSNorm,
/// grouped-query attention with RoPE, SwiGLU MLP); they differ in the spec's switches below.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Llama,
    /// Per-head RMSNorm of q and k before RoPE; `head_dim` independent of hidden / heads.
    Qwen3,
    /// Qwen2 and Qwen2.5: biases on the q, k and v projections.
    Qwen2,
    /// Llama's layer; a sliding window when `sliding_window` is set.
    Mistral,
}

impl Family {
    pub const ALL: [Family; 4] = [Family::Llama, Family::Qwen3, Family::Qwen2, Family::Mistral];

    /// `config.json`'s `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen3 => "qwen3",
            Family::Qwen2 => "qwen2",
            Family::Mistral => "mistral",
        }
    }

    /// The transformers class that loads a checkpoint of this family (`architectures`).
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Mistral => "MistralForCausalLM",
        }
    }
}

/// `rope_type = "llama3"` (Llama 3.1+): long wavelengths stretched by `factor`, short ones kept,
/// a smooth blend between.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: i64,
}

/// `rope_type = "yarn"` (Qwen's long-context recipe), with every default resolved as
/// transformers resolves it (`_compute_yarn_parameters`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct YarnRopeScaling {
    pub factor: f64,
    pub original_max_position_embeddings: i64,
    /// Multiplies cos and sin (so q·k by its square): `attention_factor`, else from `factor`
    /// (and `mscale`, `mscale_all_dim`) as transformers derives it.
    pub attention_factor: f64,
    pub beta_fast: f64,
    pub beta_slow: f64,
    /// Round the correction range to whole dimensions (transformers' default: true).
    pub truncate: bool,
}

/// How RoPE's frequencies are rescaled for contexts beyond the pre-training length.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    /// `rope_type = "linear"`: every frequency divided by `factor` (positions interpolated).
    Linear {
        factor: f64,
    },
    Llama3(Llama3RopeScaling),
    Yarn(YarnRopeScaling),
}

impl RopeScaling {
    /// `rope_type` as config.json writes it.
    pub fn rope_type(&self) -> &'static str {
        match self {
            RopeScaling::Linear { .. } => "linear",
            RopeScaling::Llama3(_) => "llama3",
            RopeScaling::Yarn(_) => "yarn",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub family: Family,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: i64,
    pub tie_word_embeddings: bool,
    /// Biases on the q, k and v projections (Qwen2 always; Llama and Qwen3 with `attention_bias`).
    pub qkv_bias: bool,
    /// A bias on the o projection (Llama and Qwen3 with `attention_bias = true`).
    pub o_bias: bool,
    /// Per-head RMSNorm of q and k (weights `[head_dim]`) before RoPE (Qwen3).
    pub qk_norm: bool,
    /// The attention window of the layers that have one (Mistral's `sliding_window`, Qwen's with
    /// `use_sliding_window`); None: every layer attends causally over the whole sequence. Training
    /// and evaluation refuse sequences longer than the window (`check_seq_len`).
    pub sliding_window: Option<i64>,
    pub bos_token_id: Option<i64>,
    pub eos_token_id: Option<i64>,
    /// The config.json this spec was read from (None for presets), written back into checkpoints.
    #[serde(skip)]
    pub source: SourceConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read model config {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("model config {path} is not valid JSON: {source}")]
    Json { path: String, source: serde_json::Error },
    #[error("model config {path}: {}", describe(.problems))]
    Fields { path: String, problems: Vec<FieldProblem> },
}

/// One problem of a config.json: the field (a JSON path such as `rope_scaling.factor`) and what
/// is wrong with it, with what would be valid.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldProblem {
    pub field: String,
    pub problem: String,
}

impl std::fmt::Display for FieldProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "field `{}` {}", self.field, self.problem)
    }
}

fn describe(problems: &[FieldProblem]) -> String {
    problems.iter().map(FieldProblem::to_string).collect::<Vec<_>>().join("; ")
}

impl SpecError {
    /// Each problem as its own message naming the file (`Io` and `Json` are one problem).
    pub fn messages(&self) -> Vec<String> {
        match self {
            SpecError::Fields { path, problems } => {
                problems.iter().map(|p| format!("model config {path}: {p}")).collect()
            }
            other => vec![other.to_string()],
        }
    }
}

/// A named architecture (`model.preset`), written as its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Preset {
    /// Small enough for CPU tests under mpirun.
    Tiny,
    Llama32_1b,
    Llama31_8b,
    Qwen3_8b,
    Qwen25_7b,
    Mistral7b,
}

impl Preset {
    pub const ALL: [Preset; 6] =
        [Preset::Tiny, Preset::Llama32_1b, Preset::Llama31_8b, Preset::Qwen3_8b, Preset::Qwen25_7b, Preset::Mistral7b];

    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Llama32_1b => "llama3.2-1b",
            Preset::Llama31_8b => "llama3.1-8b",
            Preset::Qwen3_8b => "qwen3-8b",
            Preset::Qwen25_7b => "qwen2.5-7b",
            Preset::Mistral7b => "mistral-7b",
        }
    }

    /// "tiny, llama3.2-1b, ...": the valid names, for messages.
    pub fn names() -> String {
        Preset::ALL.map(Preset::name).join(", ")
    }
}

impl TryFrom<String> for Preset {
    type Error = String;
    fn try_from(name: String) -> Result<Preset, String> {
        Preset::ALL
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| format!("model.preset: \"{name}\" is not a known preset; use one of {}", Preset::names()))
    }
}

impl From<Preset> for String {
    fn from(p: Preset) -> String {
        p.name().to_string()
    }
}

impl std::fmt::Display for Preset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn llama3_scaling(factor: f64) -> Option<RopeScaling> {
    Some(RopeScaling::Llama3(Llama3RopeScaling {
        factor,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    }))
}

impl ModelSpec {
    /// Named architectures; all but `tiny` match their published config.json (dimensions only:
    /// the weights are a seeded initialisation unless `model.weights` gives them).
    pub fn preset(preset: Preset) -> ModelSpec {
        // Llama-3.1-8B's config.json; the other presets change what differs.
        let llama8b = ModelSpec {
            family: Family::Llama,
            vocab_size: 128256,
            hidden_size: 4096,
            intermediate_size: 14336,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: 8,
            head_dim: 128,
            rms_norm_eps: 1e-5,
            rope_theta: 500000.0,
            rope_scaling: llama3_scaling(8.0),
            max_position_embeddings: 131072,
            tie_word_embeddings: false,
            qkv_bias: false,
            o_bias: false,
            qk_norm: false,
            sliding_window: None,
            bos_token_id: Some(128000),
            eos_token_id: Some(128001),
            source: SourceConfig::default(),
        };
        match preset {
            // Small enough for CPU tests under mpirun, with GQA (4 query / 2 KV heads) and the
            // llama3 rope scaling so every code path of the big models runs.
            Preset::Tiny => ModelSpec {
                vocab_size: 512,
                hidden_size: 64,
                intermediate_size: 176,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                num_key_value_heads: 2,
                head_dim: 16,
                rope_scaling: Some(RopeScaling::Llama3(Llama3RopeScaling {
                    factor: 8.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 256,
                })),
                // The built-in byte-level tokenizer: bytes are 0..=255, BOS 256, EOS 257.
                bos_token_id: Some(256),
                eos_token_id: Some(257),
                ..llama8b
            },
            Preset::Llama32_1b => ModelSpec {
                hidden_size: 2048,
                intermediate_size: 8192,
                num_hidden_layers: 16,
                head_dim: 64,
                rope_scaling: llama3_scaling(32.0),
                tie_word_embeddings: true,
                ..llama8b
            },
            Preset::Llama31_8b => llama8b,
            // Qwen/Qwen3-8B.
            Preset::Qwen3_8b => ModelSpec {
                family: Family::Qwen3,
                vocab_size: 151936,
                intermediate_size: 12288,
                num_hidden_layers: 36,
                rms_norm_eps: 1e-6,
                rope_theta: 1000000.0,
                rope_scaling: None,
                max_position_embeddings: 40960,
                qk_norm: true,
                bos_token_id: Some(151643),
                eos_token_id: Some(151645),
                ..llama8b
            },
            // Qwen/Qwen2.5-7B.
            Preset::Qwen25_7b => ModelSpec {
                family: Family::Qwen2,
                vocab_size: 152064,
                hidden_size: 3584,
                intermediate_size: 18944,
                num_hidden_layers: 28,
                num_attention_heads: 28,
                num_key_value_heads: 4,
                rms_norm_eps: 1e-6,
                rope_theta: 1000000.0,
                rope_scaling: None,
                qkv_bias: true,
                bos_token_id: Some(151643),
                eos_token_id: Some(151643),
                ..llama8b
            },
            // mistralai/Mistral-7B-v0.3 (no sliding window).
            Preset::Mistral7b => ModelSpec {
                family: Family::Mistral,
                vocab_size: 32768,
                rope_theta: 1000000.0,
                rope_scaling: None,
                max_position_embeddings: 32768,
                bos_token_id: Some(1),
                eos_token_id: Some(2),
                ..llama8b
            },
        }
    }

    /// Reads a Hugging Face `config.json` of one of the families, checking every field that
    /// changes the computation (`hf`); every problem of the file is reported at once.
    pub fn from_hf_config(path: &Path) -> Result<ModelSpec, SpecError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Io { path: p.clone(), source })?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| SpecError::Json { path: p.clone(), source })?;
        Self::from_hf_json(&v, &p)
    }

    /// `from_hf_config` on parsed JSON; `path` names it in errors.
    pub fn from_hf_json(v: &serde_json::Value, path: &str) -> Result<ModelSpec, SpecError> {
        hf::read(v).map_err(|problems| SpecError::Fields { path: path.to_string(), problems })
    }

    /// The Hugging Face `config.json` for this architecture (written into checkpoints): the file
    /// it was read from, unchanged, or for a preset the family's config as transformers writes it.
    pub fn to_hf_json(&self) -> serde_json::Value {
        match &self.source.json {
            Some(json) => serde_json::Value::Object(json.as_ref().clone()),
            None => hf::write(self),
        }
    }

    /// Why `seq_len` tokens cannot be attended as one causal sequence by this model, if they
    /// cannot: a sliding window shorter than the sequence (not implemented; docs/models.md).
    pub fn check_seq_len(&self, seq_len: usize) -> Result<(), String> {
        match self.sliding_window {
            Some(w) if (w as usize) < seq_len => Err(format!(
                "the model's sliding_window = {w} is shorter than the sequence of {seq_len} tokens; ulysses attends \
                 causally over the whole sequence and does not implement sliding-window attention: use sequences of \
                 at most {w} tokens, or a config with \"sliding_window\": null (docs/models.md)"
            )),
            _ => Ok(()),
        }
    }

    /// Parameters of one decoder layer.
    pub fn layer_params(&self) -> i64 {
        self.layer_shapes().iter().map(|(_, s)| s.iter().product::<i64>()).sum()
    }

    /// Embedding, final norm and (unless tied) the LM head.
    pub fn outer_params(&self) -> i64 {
        self.outer_shapes().iter().map(|(_, s)| s.iter().product::<i64>()).sum()
    }

    /// Shapes of one decoder layer's tensors, by their Hugging Face name suffix (after
    /// `model.layers.{i}.`), in a fixed order that parameter sharding relies on: the nine tensors
    /// of every family, with the family's biases and q/k norms after the matrices they belong to.
    pub fn layer_shapes(&self) -> Vec<(&'static str, Vec<i64>)> {
        let (h, d, f) = (self.hidden_size, self.head_dim, self.intermediate_size);
        let (q, kv) = (self.num_attention_heads * d, self.num_key_value_heads * d);
        let mut s = vec![("input_layernorm.weight", vec![h]), ("self_attn.q_proj.weight", vec![q, h])];
        if self.qkv_bias {
            s.push(("self_attn.q_proj.bias", vec![q]));
        }
        s.push(("self_attn.k_proj.weight", vec![kv, h]));
        if self.qkv_bias {
            s.push(("self_attn.k_proj.bias", vec![kv]));
        }
        s.push(("self_attn.v_proj.weight", vec![kv, h]));
        if self.qkv_bias {
            s.push(("self_attn.v_proj.bias", vec![kv]));
        }
        s.push(("self_attn.o_proj.weight", vec![h, q]));
        if self.o_bias {
            s.push(("self_attn.o_proj.bias", vec![h]));
        }
        if self.qk_norm {
            s.push(("self_attn.q_norm.weight", vec![d]));
            s.push(("self_attn.k_norm.weight", vec![d]));
        }
        s.extend([
            ("post_attention_layernorm.weight", vec![h]),
            ("mlp.gate_proj.weight", vec![f, h]),
            ("mlp.up_proj.weight", vec![f, h]),
            ("mlp.down_proj.weight", vec![h, f]),
        ]);
        s
    }

    /// Shapes of the tensors outside the decoder layers, by full Hugging Face name.
    pub fn outer_shapes(&self) -> Vec<(&'static str, Vec<i64>)> {
        let (v, h) = (self.vocab_size, self.hidden_size);
        let mut s = vec![("model.embed_tokens.weight", vec![v, h]), ("model.norm.weight", vec![h])];
        if !self.tie_word_embeddings {
            s.push(("lm_head.weight", vec![v, h]));
        }
        s
    }

    pub fn total_params(&self) -> i64 {
        self.num_hidden_layers * self.layer_params() + self.outer_params()
    }

    /// "qwen3: q/k norm, ..." — the family and what its layer adds to Llama's, for the plan.
    pub fn describe_family(&self) -> String {
        let mut features = Vec::new();
        if self.qk_norm {
            features.push("per-head q/k RMSNorm".to_string());
        }
        match (self.qkv_bias, self.o_bias) {
            (true, true) => features.push("q/k/v/o biases".to_string()),
            (true, false) => features.push("q/k/v biases".to_string()),
            _ => {}
        }
        if self.tie_word_embeddings {
            features.push("tied embeddings".to_string());
        }
        let rope = match &self.rope_scaling {
            None => format!("rope θ {}", self.rope_theta),
            Some(s) => format!("rope θ {} ({})", self.rope_theta, s.rope_type()),
        };
        features.push(rope);
        format!("{} ({})", self.family.model_type(), features.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn family_layers_add_their_tensors_in_the_fixed_order() {
        let names = |p: Preset| ModelSpec::preset(p).layer_shapes().into_iter().map(|(n, _)| n).collect::<Vec<_>>();
        assert_eq!(names(Preset::Llama31_8b).len(), 9);
        assert_eq!(names(Preset::Mistral7b), names(Preset::Llama31_8b));
        let qwen3 = names(Preset::Qwen3_8b);
        assert_eq!(&qwen3[5..7], ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]);
        let qwen2 = names(Preset::Qwen25_7b);
        assert_eq!(qwen2[2], "self_attn.q_proj.bias");
        assert_eq!(qwen2.len(), 12);
        let s = ModelSpec::preset(Preset::Qwen3_8b);
        assert_eq!(s.layer_shapes()[5].1, vec![128], "q_norm is per head: [head_dim]");
    }

    #[test]
    fn only_a_window_shorter_than_the_sequence_is_refused() {
        let mut s = ModelSpec::preset(Preset::Mistral7b);
        assert!(s.check_seq_len(1 << 20).is_ok());
        s.sliding_window = Some(4096);
        assert!(s.check_seq_len(4096).is_ok(), "a window as long as the sequence is plain causal attention");
        let e = s.check_seq_len(8192).unwrap_err();
        assert!(e.contains("sliding_window = 4096") && e.contains("8192"), "{e}");
    }
}
