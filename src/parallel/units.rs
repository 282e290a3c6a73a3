//! The ZeRO units: the groups of parameters that are sharded, gathered and updated together
//! (the embedding, each decoder layer, the head), with their flat layout.
use crate::model::spec::ModelSpec;
use std::fmt;

/// A parameter unit by what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnitId {
    /// The token embedding (also the LM head when the two are tied).
    Embedding,
    /// Decoder layer l.
    Layer(usize),
    /// The final norm and, unless tied, the LM head.
    Head,
}

impl fmt::Display for UnitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnitId::Embedding => f.write_str("embedding"),
            UnitId::Layer(l) => write!(f, "layer {l}"),
            UnitId::Head => f.write_str("head"),
        }
    }
}

impl UnitId {
    /// The unit's name in checkpoint files: `embedding`, `layers.3`, `head`.
    pub fn key(self) -> String {
        match self {
            UnitId::Embedding => "embedding".into(),
            UnitId::Layer(l) => format!("layers.{l}"),
            UnitId::Head => "head".into(),
        }
    }
}

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

/// The units of a model, in the order the step uses them: embedding, one per decoder layer, then
/// the head (final norm and, unless tied, the LM head).
pub fn model_units(spec: &ModelSpec, shards: i64) -> Vec<Unit> {
    let outer = spec.outer_shapes();
    let named = |n: &str| outer.iter().filter(|(k, _)| *k == n).map(|(k, s)| (k.to_string(), s.clone())).collect();
    let mut units = vec![Unit::new(UnitId::Embedding, named("model.embed_tokens.weight"), shards)];
    for i in 0..spec.num_hidden_layers as usize {
        let t = spec.layer_shapes().into_iter().map(|(k, s)| (format!("model.layers.{i}.{k}"), s)).collect();
        units.push(Unit::new(UnitId::Layer(i), t, shards));
    }
    let mut head: Vec<(String, Vec<i64>)> = named("model.norm.weight");
    head.extend(named("lm_head.weight"));
    units.push(Unit::new(UnitId::Head, head, shards));
    units
}
