//! `[lora]`: train low-rank adapters on the projections of every decoder layer instead of every
//! parameter. The base model stays frozen; only the adapters (and the modules named in
//! `train_fully`) get gradients and optimizer state. Absent: every parameter trains.
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::PathBuf;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    /// The adapters' rank r: A is [r, in], B is [out, r].
    pub rank: i64,
    /// The update is scaled by alpha / rank (PEFT's `lora_alpha`).
    pub alpha: f64,
    /// Dropout on the adapters' input in training, in [0, 1) (`model::dropout`: the mask is a
    /// function of the step, layer, projection, sample, token position and feature).
    pub dropout: f64,
    /// The projections that get adapters: any of q, k, v, o, gate, up, down (PEFT's module names
    /// q_proj, ..., down_proj also read). Default: all seven.
    pub targets: Vec<LoraTarget>,
    /// Modules trained in full beside the adapters: "embed" (the token embedding), "lm_head".
    pub train_fully: Vec<FullModule>,
    /// A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) to start from; its
    /// rank, alpha and targets must be the ones above. Unset: A random, B zero (PEFT's default).
    pub adapter: Option<PathBuf>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            rank: 16,
            alpha: 32.0,
            dropout: 0.0,
            targets: LoraTarget::ALL.to_vec(),
            train_fully: Vec::new(),
            adapter: None,
        }
    }
}

impl LoraConfig {
    /// The factor of the adapters' product: alpha / rank.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    pub fn trains(&self, module: FullModule) -> bool {
        self.train_fully.contains(&module)
    }
}

/// A projection of a decoder layer that can carry an adapter.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum LoraTarget {
    #[serde(alias = "q_proj")]
    Q,
    #[serde(alias = "k_proj")]
    K,
    #[serde(alias = "v_proj")]
    V,
    #[serde(alias = "o_proj")]
    O,
    #[serde(alias = "gate_proj")]
    Gate,
    #[serde(alias = "up_proj")]
    Up,
    #[serde(alias = "down_proj")]
    Down,
}

impl LoraTarget {
    pub const ALL: [LoraTarget; 7] = [
        LoraTarget::Q,
        LoraTarget::K,
        LoraTarget::V,
        LoraTarget::O,
        LoraTarget::Gate,
        LoraTarget::Up,
        LoraTarget::Down,
    ];

    /// The module's path inside a decoder layer, as Hugging Face names it.
    pub fn module(self) -> &'static str {
        match self {
            LoraTarget::Q => "self_attn.q_proj",
            LoraTarget::K => "self_attn.k_proj",
            LoraTarget::V => "self_attn.v_proj",
            LoraTarget::O => "self_attn.o_proj",
            LoraTarget::Gate => "mlp.gate_proj",
            LoraTarget::Up => "mlp.up_proj",
            LoraTarget::Down => "mlp.down_proj",
        }
    }

    /// PEFT's `target_modules` name: the module's last path component.
    pub fn peft_name(self) -> &'static str {
        let m = self.module();
        &m[m.rfind('.').map_or(0, |i| i + 1)..]
    }

    /// The target whose PEFT name is `name` (q_proj, ...).
    pub fn from_peft_name(name: &str) -> Option<LoraTarget> {
        LoraTarget::ALL.into_iter().find(|t| t.peft_name() == name)
    }
}

impl fmt::Display for LoraTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.peft_name())
    }
}

/// A module outside the decoder layers that can be trained in full beside the adapters.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FullModule {
    /// The token embedding (`model.embed_tokens`).
    #[serde(alias = "embed_tokens")]
    Embed,
    /// The LM head (`lm_head`; with tied embeddings, the embedding itself).
    LmHead,
}

impl FullModule {
    /// PEFT's `modules_to_save` name.
    pub fn peft_name(self) -> &'static str {
        match self {
            FullModule::Embed => "embed_tokens",
            FullModule::LmHead => "lm_head",
        }
    }
}

/// Every problem of a `[lora]` section for model `spec` (when the model could be read), as
/// (TOML path, message).
pub fn problems(lora: &LoraConfig, spec: Option<&crate::model::spec::ModelSpec>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut bad = |path: &str, msg: String| out.push((path.to_string(), msg));
    if lora.rank < 1 {
        bad("lora.rank", format!("= {} must be at least 1 (typical: 8 to 64)", lora.rank));
    }
    if !(lora.alpha > 0.0 && lora.alpha.is_finite()) {
        bad("lora.alpha", format!("= {} must be a positive number (the update is scaled by alpha / rank)", lora.alpha));
    }
    if !(0.0..1.0).contains(&lora.dropout) {
        bad(
            "lora.dropout",
            format!(
                "= {} is outside [0, 1): the probability that an element of an adapter's input is dropped \
                 (0: no dropout; PEFT's usual 0.05 or 0.1)",
                lora.dropout
            ),
        );
    }
    if lora.targets.is_empty() {
        bad("lora.targets", "is empty; name some of q, k, v, o, gate, up, down".into());
    }
    let mut seen = Vec::new();
    for t in &lora.targets {
        if seen.contains(t) {
            bad("lora.targets", format!("names {t} twice"));
        }
        seen.push(*t);
    }
    if let (Some(dir), Some(spec)) = (&lora.adapter, spec) {
        if lora.rank >= 1 && !lora.targets.is_empty() {
            if let Err(found) = crate::model::spec::adapter::check_adapter(dir, spec, lora) {
                found.into_iter().for_each(|m| bad("lora.adapter", m));
            }
        }
    }
    out
}
