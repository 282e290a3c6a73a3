//! LoRA on tch: a projection's weight becomes `W + scale · B · A`, computed as
//! `x·Wᵀ + scale · (x·Aᵀ)·Bᵀ` so the full-size product never exists and, with W frozen (no
//! gradient), backward does only rank-r matmuls beside the input's gradient. A layer's adapters
//! travel inside its `LayerWeights` (`adapters`), so every segment function composes them in the
//! one place a projection is applied (`LayerWeights::project`). Also: PEFT's initialisation, the
//! adapter folder PEFT reads and writes, and merging adapters into the base weights.
use super::adapter::LayerAdapters;
use super::error::WeightsError;
use super::params::{LayerWeights, ModelWeights};
use super::spec::adapter::{
    layer_adapter_shapes, peft_key, trainable_shapes, ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX,
};
use super::spec::ModelSpec;
use crate::config::lora::{LoraConfig, LoraTarget};
use crate::rng::splitmix64;
use std::path::Path;
use tch::{Device, Kind, Tensor};

impl LayerWeights {
    /// The base weight [out, in] and bias of projection `target`.
    pub fn weight(&self, target: LoraTarget) -> (&Tensor, Option<&Tensor>) {
        match target {
            LoraTarget::Q => (&self.wq, self.bq.as_ref()),
            LoraTarget::K => (&self.wk, self.bk.as_ref()),
            LoraTarget::V => (&self.wv, self.bv.as_ref()),
            LoraTarget::O => (&self.wo, self.bo.as_ref()),
            LoraTarget::Gate => (&self.w_gate, None),
            LoraTarget::Up => (&self.w_up, None),
            LoraTarget::Down => (&self.w_down, None),
        }
    }

    /// The projection `target` of x: `x·Wᵀ (+ bias) + scale·(x·Aᵀ)·Bᵀ` when it has an adapter.
    pub fn project(&self, target: LoraTarget, x: &Tensor) -> Tensor {
        let (w, bias) = self.weight(target);
        let y = x.linear(w, bias);
        match self.adapters.delta(target, x) {
            Some(delta) => y + delta,
            None => y,
        }
    }

    /// These weights for the tokens `start..start + len` of the layer's input (an MLP tile), so
    /// that the adapters' dropout masks follow the tokens; None without dropout (the weights
    /// themselves serve any tile).
    pub fn tokens(&self, start: i64, len: i64) -> Option<LayerWeights> {
        let adapters = self.adapters.tokens(start, len)?;
        let c = |t: &Tensor| t.shallow_clone();
        let o = |t: &Option<Tensor>| t.as_ref().map(c);
        Some(LayerWeights {
            attn_norm: c(&self.attn_norm),
            wq: c(&self.wq),
            wk: c(&self.wk),
            wv: c(&self.wv),
            wo: c(&self.wo),
            mlp_norm: c(&self.mlp_norm),
            w_gate: c(&self.w_gate),
            w_up: c(&self.w_up),
            w_down: c(&self.w_down),
            bq: o(&self.bq),
            bk: o(&self.bk),
            bv: o(&self.bv),
            bo: o(&self.bo),
            q_norm: o(&self.q_norm),
            k_norm: o(&self.k_norm),
            adapters,
        })
    }
}

/// PEFT's default initial adapters: A kaiming-uniform (bound 1/√in), B zeros, so training starts
/// at the base model. A is drawn from a counter-based generator keyed by (seed, its name), like
/// `ModelWeights::init`: the same values on any device or layout.
pub fn init_adapters(spec: &ModelSpec, lora: &LoraConfig, seed: u64) -> Vec<(String, Tensor)> {
    trainable_shapes(spec, lora)
        .into_iter()
        .filter(|(n, _)| n.contains(".lora_"))
        .map(|(name, shape)| {
            let t = if name.ends_with("lora_A.weight") {
                let key = name.bytes().fold(splitmix64(seed), |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
                let bound = 1.0 / (shape[1] as f64).sqrt();
                let n = shape.iter().product::<i64>() as u64;
                let v: Vec<f32> = (0..n)
                    .map(|i| {
                        ((2.0 * ((splitmix64(key ^ splitmix64(i)) >> 11) as f64 / (1u64 << 53) as f64) - 1.0) * bound)
                            as f32
                    })
                    .collect();
                Tensor::from_slice(&v).view(shape.as_slice())
            } else {
                Tensor::zeros(shape.as_slice(), (Kind::Float, Device::Cpu))
            };
            (name, t)
        })
        .collect()
}

/// Reads a PEFT adapter folder (checked against the model first: `adapter::check_adapter`) as
/// fp32 CPU tensors by their names in the model (`model.layers.0.self_attn.q_proj.lora_A.weight`,
/// and the modules trained in full).
pub fn load_peft(dir: &Path, spec: &ModelSpec, lora: &LoraConfig) -> Result<Vec<(String, Tensor)>, WeightsError> {
    super::spec::adapter::check_adapter(dir, spec, lora)
        .map_err(|p| WeightsError::Index { path: dir.display().to_string(), problem: p.join("; ") })?;
    let path = dir.join(ADAPTER_WEIGHTS);
    let tensors = Tensor::read_safetensors(&path)
        .map_err(|e| WeightsError::Corrupt { path: path.display().to_string(), message: e.to_string() })?;
    // A tied model's head tensor (`ensure_weight_tying`) is its embedding's copy.
    Ok(tensors
        .into_iter()
        .map(|(n, t)| (n.strip_prefix(PEFT_PREFIX).unwrap_or(&n).to_string(), t.to_kind(Kind::Float)))
        .filter(|(n, _)| !(spec.tie_word_embeddings && n == "lm_head.weight"))
        .collect())
}

/// Writes the trainable tensors `named` (names in the model) as a PEFT adapter folder that
/// `peft.PeftModel.from_pretrained(base, dir)` loads: adapter_model.safetensors with PEFT's keys
/// and adapter_config.json. `base` names the base model in the config.
pub fn save_peft(
    dir: &Path,
    spec: &ModelSpec,
    lora: &LoraConfig,
    named: &[(String, Tensor)],
    kind: Kind,
    base: &str,
) -> Result<(), WeightsError> {
    let write_err = |path: &Path, e: &dyn std::fmt::Display| WeightsError::Write {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(|e| write_err(dir, &e))?;
    let full: Vec<&str> = super::spec::adapter::full_module_shapes(spec, lora)
        .iter()
        .map(|(n, _)| if n.starts_with("lm_head") { "lm_head" } else { "embed_tokens" })
        .collect();
    // A tied embedding trained in full is also the head. peft keeps the head on the base's
    // embedding unless `ensure_weight_tying`, which then wants the head's tensor too (the same).
    let tied = spec.tie_word_embeddings && !full.is_empty();
    let mut host: Vec<(String, Tensor)> = named
        .iter()
        .map(|(n, t)| (peft_key(n), t.detach().to_device(Device::Cpu).to_kind(kind).contiguous()))
        .collect();
    if let Some(embed) = host.iter().find(|(n, _)| *n == peft_key("model.embed_tokens.weight")).filter(|_| tied) {
        host.push((peft_key("lm_head.weight"), embed.1.copy()));
    }
    let path = dir.join(ADAPTER_WEIGHTS);
    Tensor::write_safetensors(&host, &path).map_err(|e| write_err(&path, &e))?;
    let mut targets: Vec<&str> = lora.targets.iter().map(|t| t.peft_name()).collect();
    targets.sort();
    targets.dedup();
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": targets,
        "modules_to_save": if full.is_empty() { serde_json::Value::Null } else { full.into() },
        "bias": "none",
        "use_rslora": false,
        "use_dora": false,
        "ensure_weight_tying": tied,
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
    });
    let text = serde_json::to_string_pretty(&config).map_err(|e| write_err(dir, &e))? + "\n";
    let path = dir.join(ADAPTER_CONFIG);
    std::fs::write(&path, text).map_err(|e| write_err(&path, &e))
}

/// Puts the trainable tensors `named` into `w`: the modules trained in full replace the base's,
/// each layer's adapters go to its `adapters`. Tensors keep their autograd state.
pub fn attach(w: &mut ModelWeights, spec: &ModelSpec, lora: &LoraConfig, named: &[(String, Tensor)]) {
    let find = |name: &str| named.iter().find(|(n, _)| n == name).map(|(_, t)| t.shallow_clone());
    if let Some(e) = find("model.embed_tokens.weight") {
        w.embed = e;
    }
    if let Some(h) = find("lm_head.weight") {
        w.lm_head = Some(h);
    }
    for (l, layer) in w.layers.iter_mut().enumerate() {
        let tensors = layer_adapter_shapes(spec, lora)
            .iter()
            .map(|(n, _)| find(&format!("model.layers.{l}.{n}")).expect("every adapter tensor of the layer"))
            .collect();
        layer.adapters = LayerAdapters::from_ordered(spec, lora, tensors);
    }
}

/// Merges every layer's adapters into its base weights (`W += scale · B·A`, in fp32, then back
/// to W's dtype) and drops them: the model transformers loads without peft.
pub fn merge(w: &mut ModelWeights) {
    tch::no_grad(|| {
        for layer in &mut w.layers {
            let adapters = std::mem::take(&mut layer.adapters);
            for (target, a) in adapters {
                let base = layer.weight(target).0;
                let delta = a.b.to_kind(Kind::Float).mm(&a.a.to_kind(Kind::Float)) * a.scale;
                let merged = (base.to_kind(Kind::Float) + delta.to_device(base.device())).to_kind(base.kind());
                base.shallow_clone().copy_(&merged);
            }
        }
    });
}
