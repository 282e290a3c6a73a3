//! LoRA adapters as plain data: which tensors a `[lora]` section adds to a model and their
//! shapes, and a PEFT adapter folder read without libtorch (adapter_config.json and the
//! safetensors header), checked against the model and the section, so `ulysses check` and the
//! start of a run refuse an adapter of another model with one message.
use super::ModelSpec;
use crate::config::lora::{FullModule, LoraConfig, LoraTarget};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

/// PEFT's file names in an adapter folder.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The prefix PEFT puts before a model's own tensor names in an adapter file.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// Names (relative to `model.layers.{l}.`) and shapes of one layer's adapter tensors, in target
/// order: for each target `{module}.lora_A.weight` [r, in] then `{module}.lora_B.weight` [out, r].
pub fn layer_adapter_shapes(spec: &ModelSpec, lora: &LoraConfig) -> Vec<(String, Vec<i64>)> {
    let base = spec.layer_shapes();
    let mut targets = lora.targets.clone();
    targets.sort();
    targets.dedup();
    let mut out = Vec::new();
    for t in targets {
        let weight = format!("{}.weight", t.module());
        let shape = &base.iter().find(|(n, _)| *n == weight).expect("every family has the seven projections").1;
        let (rows, cols) = (shape[0], shape[1]);
        out.push((format!("{}.lora_A.weight", t.module()), vec![lora.rank, cols]));
        out.push((format!("{}.lora_B.weight", t.module()), vec![rows, lora.rank]));
    }
    out
}

/// Every trainable tensor of a LoRA run by its full name: each layer's adapters, then the
/// modules trained in full (with tied embeddings the LM head is the embedding).
pub fn trainable_shapes(spec: &ModelSpec, lora: &LoraConfig) -> Vec<(String, Vec<i64>)> {
    let mut out = Vec::new();
    for l in 0..spec.num_hidden_layers {
        out.extend(layer_adapter_shapes(spec, lora).into_iter().map(|(n, s)| (format!("model.layers.{l}.{n}"), s)));
    }
    out.extend(full_module_shapes(spec, lora));
    out
}

/// The tensors of the modules trained in full, by their Hugging Face names.
pub fn full_module_shapes(spec: &ModelSpec, lora: &LoraConfig) -> Vec<(String, Vec<i64>)> {
    let embed = lora.trains(FullModule::Embed) || (spec.tie_word_embeddings && lora.trains(FullModule::LmHead));
    let head = lora.trains(FullModule::LmHead) && !spec.tie_word_embeddings;
    spec.outer_shapes()
        .into_iter()
        .filter(|(n, _)| (embed && *n == "model.embed_tokens.weight") || (head && *n == "lm_head.weight"))
        .map(|(n, s)| (n.to_string(), s))
        .collect()
}

/// Parameters that train and parameters that stay frozen under `lora`.
pub fn param_counts(spec: &ModelSpec, lora: &LoraConfig) -> (i64, i64) {
    let count = |shapes: &[(String, Vec<i64>)]| shapes.iter().map(|(_, s)| s.iter().product::<i64>()).sum::<i64>();
    let adapters = count(&trainable_shapes(spec, lora)) - count(&full_module_shapes(spec, lora));
    let full = count(&full_module_shapes(spec, lora));
    (adapters + full, spec.total_params() - full)
}

/// The adapter's name in a PEFT file of a tensor named `name` in the model.
pub fn peft_key(name: &str) -> String {
    format!("{PEFT_PREFIX}{name}")
}

/// Checks a PEFT adapter folder against the model and the `[lora]` section: its config (LoRA,
/// no rsLoRA / DoRA / biases, the same rank, alpha and targets) and every tensor's name and
/// shape. Each problem is one sentence naming the file and what would be valid.
pub fn check_adapter(dir: &Path, spec: &ModelSpec, lora: &LoraConfig) -> Result<(), Vec<String>> {
    let config_path = dir.join(ADAPTER_CONFIG);
    let shown = config_path.display().to_string();
    let text = std::fs::read_to_string(&config_path).map_err(|e| {
        vec![format!("cannot read {shown}: {e}; give a PEFT adapter folder (adapter_config.json, {ADAPTER_WEIGHTS})")]
    })?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| vec![format!("{shown} is not valid JSON: {e}")])?;
    let mut problems = Vec::new();
    let field = |k: &str| json.get(k).cloned().unwrap_or(serde_json::Value::Null);
    if field("peft_type").as_str() != Some("LORA") {
        problems.push(format!("{shown}: peft_type = {} but only LORA adapters are read", field("peft_type")));
    }
    for (key, ok) in [("use_rslora", false), ("use_dora", false)] {
        if field(key).as_bool().unwrap_or(false) != ok {
            problems.push(format!("{shown}: {key} = true is not supported; only plain LoRA (alpha / r scaling)"));
        }
    }
    if !matches!(field("bias").as_str(), None | Some("none")) {
        problems.push(format!("{shown}: bias = {} is not supported; only \"none\"", field("bias")));
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if field(key).as_object().is_some_and(|m| !m.is_empty()) {
            problems.push(format!("{shown}: a non-empty {key} is not supported (one rank and alpha for all)"));
        }
    }
    if field("r").as_i64() != Some(lora.rank) {
        problems.push(format!(
            "{shown}: r = {} but lora.rank = {}; set lora.rank to the adapter's",
            field("r"),
            lora.rank
        ));
    }
    if field("lora_alpha").as_f64() != Some(lora.alpha) {
        problems.push(format!(
            "{shown}: lora_alpha = {} but lora.alpha = {}; set lora.alpha to the adapter's",
            field("lora_alpha"),
            lora.alpha
        ));
    }
    match peft_targets(&field("target_modules")) {
        Ok(mut found) => {
            let mut want = lora.targets.clone();
            want.sort();
            want.dedup();
            found.sort();
            if found != want {
                let names = |t: &[LoraTarget]| t.iter().map(|t| t.peft_name()).collect::<Vec<_>>().join(", ");
                problems.push(format!(
                    "{shown}: target_modules = [{}] but lora.targets = [{}]; set lora.targets to the adapter's",
                    names(&found),
                    names(&want)
                ));
            }
        }
        Err(e) => problems.push(format!("{shown}: {e}")),
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let weights = dir.join(ADAPTER_WEIGHTS);
    let found = safetensors_shapes(&weights).map_err(|e| vec![e])?;
    let base = field("base_model_name_or_path");
    let base = base.as_str().map_or(String::new(), |b| format!(" (its base_model_name_or_path is \"{b}\")"));
    let wanted: BTreeMap<String, Vec<i64>> =
        trainable_shapes(spec, lora).into_iter().map(|(n, s)| (peft_key(&n), s)).collect();
    let shown = weights.display();
    for (name, shape) in &wanted {
        match found.get(name) {
            None => problems.push(format!("{shown}: has no tensor `{name}`")),
            Some(s) if s != shape => problems.push(format!(
                "{shown}: `{name}` has shape {s:?} but this model needs {shape:?}: the adapter belongs to another \
                 model{base}"
            )),
            Some(_) => {}
        }
    }
    // A tied model's embedding trained in full comes with the head's copy (`ensure_weight_tying`).
    let tied_head = |n: &str| spec.tie_word_embeddings && n == peft_key("lm_head.weight");
    let extra: Vec<&String> = found.keys().filter(|n| !wanted.contains_key(*n) && !tied_head(n)).collect();
    if !extra.is_empty() {
        let shown_extra = extra.iter().take(4).map(|s| s.as_str()).collect::<Vec<_>>().join(", ");
        problems.push(format!(
            "{shown}: {} tensor(s) this model and [lora] section do not have (e.g. {shown_extra}): the adapter \
             belongs to another model{base}, or lora.train_fully differs",
            extra.len()
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// The `[lora]` section a PEFT adapter folder was made with (rank, alpha, dropout, targets, the
/// modules trained in full) and its `base_model_name_or_path` (None when empty or absent): what
/// reading it back needs when no experiment says so (`ulysses export --merge`, `eval`).
pub fn adapter_section(dir: &Path) -> Result<(LoraConfig, Option<String>), String> {
    let path = dir.join(ADAPTER_CONFIG);
    let shown = path.display();
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{shown} is not valid JSON: {e}"))?;
    let number = |k: &str| json.get(k).and_then(|v| v.as_f64());
    let (Some(rank), Some(alpha)) = (json.get("r").and_then(|v| v.as_i64()), number("lora_alpha")) else {
        return Err(format!("{shown}: needs the integer `r` and the number `lora_alpha` of a LoRA adapter"));
    };
    let targets = peft_targets(json.get("target_modules").unwrap_or(&serde_json::Value::Null))
        .map_err(|e| format!("{shown}: {e}"))?;
    let mut train_fully = Vec::new();
    for name in json.get("modules_to_save").and_then(|v| v.as_array()).into_iter().flatten() {
        let module = [FullModule::Embed, FullModule::LmHead].into_iter().find(|m| name.as_str() == Some(m.peft_name()));
        train_fully.push(module.ok_or_else(|| {
            format!("{shown}: modules_to_save names {name}; ulysses reads only \"embed_tokens\" and \"lm_head\"")
        })?);
    }
    let lora =
        LoraConfig { rank, alpha, dropout: number("lora_dropout").unwrap_or(0.0), targets, train_fully, adapter: None };
    let base = json.get("base_model_name_or_path").and_then(|v| v.as_str()).filter(|b| !b.is_empty());
    Ok((lora, base.map(str::to_string)))
}

/// PEFT's `target_modules`: a list of module names (or one name) among q_proj ... down_proj.
fn peft_targets(v: &serde_json::Value) -> Result<Vec<LoraTarget>, String> {
    let names: Vec<&str> = match v {
        serde_json::Value::String(s) => vec![s.as_str()],
        serde_json::Value::Array(a) => a.iter().filter_map(|x| x.as_str()).collect(),
        other => return Err(format!("target_modules = {other} is not a list of module names")),
    };
    names
        .into_iter()
        .map(|n| {
            LoraTarget::from_peft_name(n).ok_or_else(|| {
                format!("target_modules names `{n}`, which is not one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj")
            })
        })
        .collect()
}

/// The name and shape of every tensor of a safetensors file, from its header alone.
pub fn safetensors_shapes(path: &Path) -> Result<BTreeMap<String, Vec<i64>>, String> {
    let shown = path.display();
    let bad = |e: &dyn std::fmt::Display| format!("{shown} is not a readable safetensors file: {e}");
    let mut f = std::fs::File::open(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| bad(&e))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(bad(&format!("a header of {len} bytes")));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).map_err(|e| bad(&e))?;
    let json: serde_json::Value = serde_json::from_slice(&header).map_err(|e| bad(&e))?;
    let map = json.as_object().ok_or_else(|| bad(&"the header is not a JSON object"))?;
    Ok(map
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let shape = v["shape"].as_array().map_or(Vec::new(), |a| a.iter().filter_map(|x| x.as_i64()).collect());
            (k.clone(), shape)
        })
        .collect())
}
