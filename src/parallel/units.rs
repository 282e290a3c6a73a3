//! The ZeRO units: the groups of parameters that are sharded, gathered and updated together
//! (the embedding, each decoder layer, the head), with their flat layout.
pub use crate::model::spec::UnitId;

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
