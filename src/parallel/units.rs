//! The ZeRO units: the groups of parameters that are sharded, gathered and updated together
//! (the embedding, each decoder layer, the head), with their flat layout.
pub use crate::model::spec::UnitId;

use crate::config::LoraConfig;
use crate::model::spec::adapter::{full_module_shapes, layer_adapter_shapes};
use crate::model::spec::ModelSpec;

/// One gathered-together group of parameters.
#[derive(Debug, Clone)]
pub struct Unit {
    pub id: UnitId,
    /// Full Hugging Face names and shapes, in flattening order.
    pub tensors: Vec<(String, Vec<i64>)>,
    pub numel: i64,
    /// `numel` rounded up to a multiple of the shard count.
    pub padded: i64,
}

impl Unit {
    fn new(id: UnitId, tensors: Vec<(String, Vec<i64>)>, shards: i64) -> Unit {
        let numel = tensors.iter().map(|(_, s)| s.iter().product::<i64>()).sum::<i64>();
        let padded = (numel + shards - 1) / shards * shards;
        Unit { id, tensors, numel, padded }
    }
}

/// The units of a model in `UnitId::all`'s order, with their tensors: the embedding, each decoder
/// layer, the head (final norm and, unless tied, the LM head).
pub fn model_units(spec: &ModelSpec, shards: i64) -> Vec<Unit> {
    let outer = spec.outer_shapes();
    let named = |n: &str| -> Vec<(String, Vec<i64>)> {
        outer.iter().filter(|(k, _)| *k == n).map(|(k, s)| (k.to_string(), s.clone())).collect()
    };
    let tensors = |id: UnitId| match id {
        UnitId::Embedding => named("model.embed_tokens.weight"),
        UnitId::Layer(i) => {
            spec.layer_shapes().into_iter().map(|(k, s)| (format!("model.layers.{i}.{k}"), s)).collect()
        }
        UnitId::Head => [named("model.norm.weight"), named("lm_head.weight")].concat(),
    };
    UnitId::all(spec.num_hidden_layers as usize).map(|id| Unit::new(id, tensors(id), shards)).collect()
}

/// The trainable units of a LoRA run: each decoder layer's adapters (`layer_adapter_shapes`),
/// and the embedding and the LM head when they train in full; a unit with nothing to train is
/// left out (the step then takes that part from the frozen base).
pub fn lora_units(spec: &ModelSpec, lora: &LoraConfig, shards: i64) -> Vec<Unit> {
    let full = full_module_shapes(spec, lora);
    let named = |n: &str| full.iter().filter(|(k, _)| k == n).cloned().collect::<Vec<_>>();
    let mut units = Vec::new();
    let embed = named("model.embed_tokens.weight");
    if !embed.is_empty() {
        units.push(Unit::new(UnitId::Embedding, embed, shards));
    }
    for l in 0..spec.num_hidden_layers as usize {
        let t =
            layer_adapter_shapes(spec, lora).into_iter().map(|(k, s)| (format!("model.layers.{l}.{k}"), s)).collect();
        units.push(Unit::new(UnitId::Layer(l), t, shards));
    }
    let head = named("lm_head.weight");
    if !head.is_empty() {
        units.push(Unit::new(UnitId::Head, head, shards));
    }
    units
}
