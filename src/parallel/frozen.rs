//! The frozen base of a LoRA run: every unit of the model sharded like ZeRO-3's master weights,
//! but held in the compute dtype (bf16 on GPUs) and nothing else: no fp32 master, no gradient,
//! no Adam moments, no update. A unit is all-gathered just before use like a trained one; its
//! tensors are never leaves, so backward computes no gradient for them.
use super::units::{model_units, Unit, UnitId};
use super::zero::{flatten_padded, split_flat};
use crate::comm::{Collective, CommError};
use crate::config::ZeroStage;
use crate::model::spec::ModelSpec;
use tch::{Device, Kind, Tensor};

pub struct FrozenParams {
    units: Vec<Unit>,
    /// This rank's slice of each flat unit, in `kind`, on `device`.
    shards: Vec<Tensor>,
    stage: ZeroStage,
}

impl FrozenParams {
    /// Shards of the whole model from full tensors that `full(unit)` returns for each unit (in
    /// the unit's tensor order), kept as `kind` on `device`: one slice per rank at stage 3, the
    /// whole unit at stage 0.
    pub fn new(
        spec: &ModelSpec,
        stage: ZeroStage,
        world: &dyn Collective,
        kind: Kind,
        device: Device,
        mut full: impl FnMut(&Unit) -> Vec<Tensor>,
    ) -> FrozenParams {
        let shards_count = match stage {
            ZeroStage::Replicated => 1,
            ZeroStage::Sharded => world.size() as i64,
        };
        let rank = if shards_count == 1 { 0 } else { world.rank() as i64 };
        let units = model_units(spec, shards_count);
        let shards = units
            .iter()
            .map(|u| {
                let len = u.padded / shards_count;
                flatten_padded(&full(u), u.padded).narrow(0, rank * len, len).to_kind(kind).to_device(device)
            })
            .collect();
        FrozenParams { units, shards, stage }
    }

    /// A unit's tensors, whole, in the stored dtype on its device (views into one gathered buffer).
    pub fn gather(&self, world: &dyn Collective, id: UnitId) -> Result<Vec<Tensor>, CommError> {
        let u = self.units.iter().position(|u| u.id == id).expect("every unit of the model is frozen");
        let flat = match self.stage {
            ZeroStage::Replicated => self.shards[u].shallow_clone(),
            ZeroStage::Sharded => world.all_gather(&self.shards[u])?,
        };
        Ok(split_flat(&flat, &self.units[u]))
    }

    /// Bytes this rank holds.
    pub fn bytes(&self) -> i64 {
        self.shards.iter().map(|t| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64).sum()
    }
}
