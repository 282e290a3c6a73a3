//! Llama architecture dimensions: presets and Hugging Face `config.json`. Plain data (no tch), so
//! the config validator and the memory plan can use it without touching libtorch.
use serde::{Deserialize, Serialize};
use std::path::Path;

/// `rope_scaling` of Llama 3.x (`rope_type = "llama3"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub max_position_embeddings: i64,
    pub tie_word_embeddings: bool,
    pub bos_token_id: i64,
    pub eos_token_id: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read model config {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("model config {path} is not valid JSON: {source}")]
    Json { path: String, source: serde_json::Error },
    #[error("model config {path}: field `{field}` {problem}")]
    Field { path: String, field: String, problem: String },
}

/// A named architecture (`model.preset`), written as its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Preset {
    /// Small enough for CPU tests under mpirun.
    Tiny,
    Llama32_1b,
    Llama31_8b,
}

impl Preset {
    pub const ALL: [Preset; 3] = [Preset::Tiny, Preset::Llama32_1b, Preset::Llama31_8b];

    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Llama32_1b => "llama3.2-1b",
            Preset::Llama31_8b => "llama3.1-8b",
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

fn llama3_scaling(factor: f64) -> Option<Llama3RopeScaling> {
    Some(Llama3RopeScaling {
        factor,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    })
}

impl ModelSpec {
    /// Named architectures; the two Meta models match their published config.json.
    pub fn preset(preset: Preset) -> ModelSpec {
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
                rms_norm_eps: 1e-5,
                rope_theta: 500000.0,
                rope_scaling: Some(Llama3RopeScaling {
                    factor: 8.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 256,
                }),
                max_position_embeddings: 131072,
                tie_word_embeddings: false,
                // The built-in byte-level tokenizer: bytes are 0..=255, BOS 256, EOS 257.
                bos_token_id: 256,
                eos_token_id: 257,
            },
            Preset::Llama32_1b => ModelSpec {
                vocab_size: 128256,
                hidden_size: 2048,
                intermediate_size: 8192,
                num_hidden_layers: 16,
                num_attention_heads: 32,
                num_key_value_heads: 8,
                head_dim: 64,
                rms_norm_eps: 1e-5,
                rope_theta: 500000.0,
                rope_scaling: llama3_scaling(32.0),
                max_position_embeddings: 131072,
                tie_word_embeddings: true,
                bos_token_id: 128000,
                eos_token_id: 128001,
            },
            Preset::Llama31_8b => ModelSpec {
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
                bos_token_id: 128000,
                eos_token_id: 128001,
            },
        }
    }

    /// Reads a Hugging Face Llama `config.json`.
    pub fn from_hf_config(path: &Path) -> Result<ModelSpec, SpecError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Io { path: p.clone(), source })?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| SpecError::Json { path: p.clone(), source })?;
        Self::from_hf_json(&v, &p)
    }

    pub fn from_hf_json(v: &serde_json::Value, path: &str) -> Result<ModelSpec, SpecError> {
        let field_err = |field: &str, problem: &str| SpecError::Field {
            path: path.to_string(),
            field: field.to_string(),
            problem: problem.to_string(),
        };
        let int = |k: &str| -> Result<i64, SpecError> {
            v.get(k).and_then(|x| x.as_i64()).ok_or_else(|| field_err(k, "is missing or not an integer"))
        };
        let float_or = |k: &str, d: f64| v.get(k).and_then(|x| x.as_f64()).unwrap_or(d);
        if let Some(mt) = v.get("model_type").and_then(|x| x.as_str()) {
            if mt != "llama" {
                return Err(field_err("model_type", &format!("is \"{mt}\"; only \"llama\" models are supported")));
            }
        }
        let heads = int("num_attention_heads")?;
        let hidden = int("hidden_size")?;
        let head_dim = match v.get("head_dim").and_then(|x| x.as_i64()) {
            Some(d) => d,
            None => hidden / heads.max(1),
        };
        // transformers 4.x writes `rope_scaling`, 5.x `rope_parameters` (which also holds rope_theta).
        let rope = v.get("rope_parameters").or_else(|| v.get("rope_scaling")).filter(|r| !r.is_null());
        let rope_theta = rope
            .and_then(|r| r.get("rope_theta"))
            .and_then(|x| x.as_f64())
            .unwrap_or_else(|| float_or("rope_theta", 10000.0));
        let rope_scaling = match rope {
            None => None,
            Some(r) => {
                let kind = r.get("rope_type").or_else(|| r.get("type")).and_then(|x| x.as_str()).unwrap_or("default");
                match kind {
                    "default" => None,
                    "llama3" => {
                        let f = |k: &str| {
                            r.get(k)
                                .and_then(|x| x.as_f64())
                                .ok_or_else(|| field_err(&format!("rope_scaling.{k}"), "is missing"))
                        };
                        Some(Llama3RopeScaling {
                            factor: f("factor")?,
                            low_freq_factor: f("low_freq_factor")?,
                            high_freq_factor: f("high_freq_factor")?,
                            original_max_position_embeddings: f("original_max_position_embeddings")? as i64,
                        })
                    }
                    other => {
                        return Err(field_err(
                            "rope_scaling.rope_type",
                            &format!("is \"{other}\"; supported: \"default\", \"llama3\""),
                        ))
                    }
                }
            }
        };
        let token = |k: &str, d: i64| match v.get(k) {
            Some(serde_json::Value::Array(a)) => a.first().and_then(|x| x.as_i64()).unwrap_or(d),
            Some(x) => x.as_i64().unwrap_or(d),
            None => d,
        };
        Ok(ModelSpec {
            vocab_size: int("vocab_size")?,
            hidden_size: hidden,
            intermediate_size: int("intermediate_size")?,
            num_hidden_layers: int("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: v.get("num_key_value_heads").and_then(|x| x.as_i64()).unwrap_or(heads),
            head_dim,
            rms_norm_eps: float_or("rms_norm_eps", 1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: v.get("max_position_embeddings").and_then(|x| x.as_i64()).unwrap_or(131072),
            tie_word_embeddings: v.get("tie_word_embeddings").and_then(|x| x.as_bool()).unwrap_or(false),
            bos_token_id: token("bos_token_id", 1),
            eos_token_id: token("eos_token_id", 2),
        })
    }

    /// The Hugging Face `config.json` for this architecture (written into checkpoints).
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut rope = serde_json::json!({ "rope_type": "default", "rope_theta": self.rope_theta });
        if let Some(s) = &self.rope_scaling {
            rope = serde_json::json!({
                "rope_type": "llama3",
                "rope_theta": self.rope_theta,
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            });
        }
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": if self.rope_scaling.is_some() { rope.clone() } else { serde_json::Value::Null },
            "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "hidden_act": "silu",
            "attention_bias": false,
            "mlp_bias": false,
            "torch_dtype": "float32",
        })
    }

    /// Parameters of one decoder layer (q, k, v, o, gate, up, down, two norms).
    pub fn layer_params(&self) -> i64 {
        self.layer_shapes().iter().map(|(_, s)| s.iter().product::<i64>()).sum()
    }

    /// Embedding, final norm and (unless tied) the LM head.
    pub fn outer_params(&self) -> i64 {
        self.outer_shapes().iter().map(|(_, s)| s.iter().product::<i64>()).sum()
    }

    /// Shapes of one decoder layer's tensors, by their Hugging Face name suffix (after
    /// `model.layers.{i}.`), in a fixed order that parameter sharding relies on.
    pub fn layer_shapes(&self) -> Vec<(&'static str, Vec<i64>)> {
        let (h, d, f) = (self.hidden_size, self.head_dim, self.intermediate_size);
        let (q, kv) = (self.num_attention_heads * d, self.num_key_value_heads * d);
        vec![
            ("input_layernorm.weight", vec![h]),
            ("self_attn.q_proj.weight", vec![q, h]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.o_proj.weight", vec![h, q]),
            ("post_attention_layernorm.weight", vec![h]),
            ("mlp.gate_proj.weight", vec![f, h]),
            ("mlp.up_proj.weight", vec![f, h]),
            ("mlp.down_proj.weight", vec![h, f]),
        ]
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
}
