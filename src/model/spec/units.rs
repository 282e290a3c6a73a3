//! The ZeRO units by name, and their order: the groups of parameters that are sharded, gathered,
//! updated, checkpointed and placed in memory together. Plain data, so the memory plan counts
//! and places units in the same order as `parallel::units` lays them out.
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
    /// The units of a model of `layers` decoder layers, in the order the step uses them and
    /// every flat layout, checkpoint and placement lists them: the embedding, each layer, the head.
    pub fn all(layers: usize) -> impl DoubleEndedIterator<Item = UnitId> {
        std::iter::once(UnitId::Embedding).chain((0..layers).map(UnitId::Layer)).chain(std::iter::once(UnitId::Head))
    }

    /// How many units `all(layers)` gives.
    pub fn count(layers: usize) -> usize {
        layers + 2
    }

    /// This unit's position in `all(layers)`.
    pub fn index(self, layers: usize) -> usize {
        match self {
            UnitId::Embedding => 0,
            UnitId::Layer(l) => {
                assert!(l < layers, "layer {l} of a {layers}-layer model");
                1 + l
            }
            UnitId::Head => layers + 1,
        }
    }

    /// The unit's name in checkpoint files: `embedding`, `layers.3`, `head`.
    pub fn key(self) -> String {
        match self {
            UnitId::Embedding => "embedding".into(),
            UnitId::Layer(l) => format!("layers.{l}"),
            UnitId::Head => "head".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::UnitId;

    #[test]
    fn index_count_and_all_state_one_order() {
        let all: Vec<UnitId> = UnitId::all(3).collect();
        assert_eq!(all, [UnitId::Embedding, UnitId::Layer(0), UnitId::Layer(1), UnitId::Layer(2), UnitId::Head]);
        assert_eq!(all.len(), UnitId::count(3));
        for (i, id) in all.into_iter().enumerate() {
            assert_eq!(id.index(3), i, "{id}");
        }
    }
}
