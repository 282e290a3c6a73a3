//! ZeRO parameter sharding. Parameters are grouped in units (the embedding, each decoder layer,
//! the head); a unit's tensors are flattened into one vector, padded to a multiple of the world
//! size, and at stage 3 each rank keeps one slice of it: fp32 master weights, gradient and Adam
//! moments. A unit is all-gathered just before use and dropped after; its gradients are
//! reduce-scattered, which also sums the partial weight gradients of the SP ranks. At stage 0
//! every rank keeps the whole vector and gradients are all-reduced. The update of the shards is
//! the optimizer's (`crate::optim`).
use crate::comm::{Collective, CommError};
use crate::config::ZeroStage;
use crate::ffi::transfer::{self, CopyEvent, TransferError};
use crate::model::spec::ModelSpec;
use std::fmt;
use tch::{Device, Kind, Tensor};

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

/// A collective of the shards failed, or (optimizer offload) a gradient's copy to host memory.
#[derive(Debug, thiserror::Error)]
pub enum ZeroError {
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error("gradient offload to host memory: {0}")]
    Offload(#[from] TransferError),
}

/// Per-unit optimizer state of this rank: the slice `[rank·len, (rank+1)·len)` of the flat unit.
pub struct Shard {
    pub master: Tensor,
    pub grad: Tensor,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
}

/// The fp32 states a checkpoint saves and restores (the gradient is always zero between steps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Master,
    ExpAvg,
    ExpAvgSq,
}

impl State {
    /// Every state a checkpoint holds, in the order it stores them.
    pub const ALL: [State; 3] = [State::Master, State::ExpAvg, State::ExpAvgSq];

    /// The state's name in checkpoint files.
    pub fn name(self) -> &'static str {
        match self {
            State::Master => "master",
            State::ExpAvg => "exp_avg",
            State::ExpAvgSq => "exp_avg_sq",
        }
    }
}

impl Shard {
    fn state(&self, which: State) -> &Tensor {
        match which {
            State::Master => &self.master,
            State::ExpAvg => &self.exp_avg,
            State::ExpAvgSq => &self.exp_avg_sq,
        }
    }

    fn state_mut(&mut self, which: State) -> &mut Tensor {
        match which {
            State::Master => &mut self.master,
            State::ExpAvg => &mut self.exp_avg,
            State::ExpAvgSq => &mut self.exp_avg_sq,
        }
    }
}

pub struct ShardedParams {
    units: Vec<Unit>,
    shards: Vec<Shard>,
    stage: ZeroStage,
    rank: i64,
    /// Where the fp32 state lives (CPU when the optimizer is offloaded).
    pub state_device: Device,
    /// With the optimizer offloaded: each unit's reduced gradient on its way to pinned host
    /// memory (a side-stream copy started as soon as the reduce-scatter is queued), added to
    /// the shard's gradient by `land_grads`. The backward pass never waits for these copies.
    in_flight: Vec<Option<(Tensor, CopyEvent)>>,
}

impl ShardedParams {
    /// Builds the shards from full fp32 tensors that `full(unit)` returns for each unit (in the
    /// unit's tensor order); only this rank's slice is kept.
    pub fn new(
        spec: &ModelSpec,
        stage: ZeroStage,
        world: &dyn Collective,
        state_device: Device,
        mut full: impl FnMut(&Unit) -> Vec<Tensor>,
    ) -> ShardedParams {
        let rank = world.rank() as i64;
        let shards_count = shard_count(stage, world);
        let units = model_units(spec, shards_count);
        let shards = units
            .iter()
            .map(|u| {
                let flat = flatten_padded(&full(u), u.padded);
                let len = u.padded / shards_count;
                let start = if stage == ZeroStage::Sharded { rank * len } else { 0 };
                let master = flat.narrow(0, start, len).to_device(state_device).copy();
                let zeros = || Tensor::zeros([len], (Kind::Float, state_device));
                Shard { master, grad: zeros(), exp_avg: zeros(), exp_avg_sq: zeros() }
            })
            .collect();
        let in_flight = units.iter().map(|_| None).collect();
        ShardedParams { units, shards, stage, rank, state_device, in_flight }
    }

    /// Shards of zeros, allocated at their size on `state_device` (no whole unit is ever built),
    /// for a checkpoint to fill in place (`shard_state_mut`).
    pub fn zeroed(spec: &ModelSpec, stage: ZeroStage, world: &dyn Collective, state_device: Device) -> ShardedParams {
        let shards_count = shard_count(stage, world);
        let units = model_units(spec, shards_count);
        let shards = units
            .iter()
            .map(|u| {
                let zeros = || Tensor::zeros([u.padded / shards_count], (Kind::Float, state_device));
                Shard { master: zeros(), grad: zeros(), exp_avg: zeros(), exp_avg_sq: zeros() }
            })
            .collect();
        let in_flight = units.iter().map(|_| None).collect();
        ShardedParams { units, shards, stage, rank: world.rank() as i64, state_device, in_flight }
    }

    /// Every unit, in the order of `model_units`.
    pub fn units(&self) -> &[Unit] {
        &self.units
    }

    /// Where this rank's shard of a unit lies in the flat, padded unit: `(start, len)` (stage 0:
    /// the whole padded unit).
    pub fn shard_range(&self, id: UnitId) -> (i64, i64) {
        let unit = self.index(id);
        (self.shard_start(unit), self.shard_len(unit))
    }

    /// One fp32 state of this rank's shard of a unit (`[len]`, on `state_device`), for a
    /// checkpoint to write, or to fill in place (`copy_`) when one is loaded.
    pub fn shard_state(&self, id: UnitId, which: State) -> &Tensor {
        self.shards[self.index(id)].state(which)
    }

    /// The position of a unit in `units()`.
    fn index(&self, id: UnitId) -> usize {
        let layers = self.units.len() - 2;
        match id {
            UnitId::Embedding => 0,
            UnitId::Layer(l) => {
                assert!(l < layers, "layer {l} of a {layers}-layer model");
                1 + l
            }
            UnitId::Head => layers + 1,
        }
    }

    fn shard_len(&self, unit: usize) -> i64 {
        self.shards[unit].master.size()[0]
    }

    /// Where this rank's shard starts in the flat unit.
    fn shard_start(&self, unit: usize) -> i64 {
        match self.stage {
            ZeroStage::Replicated => 0,
            ZeroStage::Sharded => self.rank * self.shard_len(unit),
        }
    }

    /// The whole unit as tensors of `kind` on `device` (views into one gathered buffer).
    pub fn gather(
        &self,
        world: &dyn Collective,
        id: UnitId,
        kind: Kind,
        device: Device,
    ) -> Result<Vec<Tensor>, CommError> {
        self.gather_state(world, id, State::Master, kind, device)
    }

    /// One state of the whole unit, like `gather`.
    pub fn gather_state(
        &self,
        world: &dyn Collective,
        id: UnitId,
        which: State,
        kind: Kind,
        device: Device,
    ) -> Result<Vec<Tensor>, CommError> {
        let unit = self.index(id);
        let local = self.shards[unit].state(which).to_device(device).to_kind(kind);
        let flat = match self.stage {
            ZeroStage::Replicated => local,
            ZeroStage::Sharded => world.all_gather(&local)?,
        };
        Ok(split_flat(&flat, &self.units[unit]))
    }

    /// Replaces one state of a unit with this rank's slice of the whole unit, which `root` gives
    /// as full tensors in the unit's order (the other ranks pass `None`) and broadcasts: only the
    /// root reads a checkpoint, and any world size or stage can load what any other wrote.
    pub fn load_state(
        &mut self,
        world: &dyn Collective,
        id: UnitId,
        which: State,
        root: usize,
        full: Option<&[Tensor]>,
    ) -> Result<(), CommError> {
        let unit = self.index(id);
        let u = &self.units[unit];
        let flat = match full {
            Some(tensors) => flatten_padded(tensors, u.padded),
            None => Tensor::zeros([u.padded], (Kind::Float, Device::Cpu)),
        };
        let flat = world.broadcast(&flat.to_device(self.state_device), root)?;
        let (start, len) = (self.shard_start(unit), self.shard_len(unit));
        *self.shards[unit].state_mut(which) = flat.narrow(0, start, len).copy();
        Ok(())
    }

    /// Adds this rank's gradients of a unit (full tensors, any float dtype) into the shards:
    /// summed over every rank in fp32, then each rank keeps its slice.
    pub fn accumulate(&mut self, world: &dyn Collective, id: UnitId, grads: &[Tensor]) -> Result<(), ZeroError> {
        let unit = self.index(id);
        let flat = flatten_padded(grads, self.units[unit].padded);
        let mine = match self.stage {
            ZeroStage::Replicated => world.all_reduce(&flat)?,
            ZeroStage::Sharded => world.reduce_scatter(&flat)?,
        };
        if mine.device() == self.state_device {
            let _ = self.shards[unit].grad.g_add_(&mine);
            return Ok(());
        }
        // Offloaded optimizer: stream the shard to host memory instead of a synchronous copy
        // that would stall the host until the GPU drained its queue, once per unit.
        self.land_unit(unit)?;
        self.land_arrived()?;
        self.in_flight[unit] = Some(transfer::to_host(&mine)?);
        Ok(())
    }

    /// Adds the in-flight gradients whose copies have finished, so that only the last unit or two
    /// hold pinned staging memory (a layer's backward outlasts its copy by far).
    fn land_arrived(&mut self) -> Result<(), TransferError> {
        for u in 0..self.units.len() {
            let arrived = match &self.in_flight[u] {
                Some((_, copied)) => copied.is_complete()?,
                None => false,
            };
            if arrived {
                self.land_unit(u)?;
            }
        }
        Ok(())
    }

    /// Waits for a unit's gradient copy to host memory, if one is in flight, and adds it.
    fn land_unit(&mut self, unit: usize) -> Result<(), TransferError> {
        if let Some((host, copied)) = self.in_flight[unit].take() {
            copied.synchronize()?;
            let _ = self.shards[unit].grad.g_add_(&host);
        }
        Ok(())
    }

    /// This rank's shards with where each starts in its flat unit, for the optimizer, once every
    /// gradient still on its way to host memory (optimizer offload) has landed.
    pub fn local_shards(&mut self) -> Result<impl Iterator<Item = (&Unit, i64, &mut Shard)>, ZeroError> {
        (0..self.units.len()).try_for_each(|u| self.land_unit(u))?;
        let starts: Vec<i64> = (0..self.units.len()).map(|u| self.shard_start(u)).collect();
        Ok(self.units.iter().zip(starts).zip(self.shards.iter_mut()).map(|((u, start), s)| (u, start, s)))
    }

    /// Whether gradients are summed over ranks into shards (stage 3: the shards of all ranks
    /// together hold the model) or replicated (stage 0: every rank holds all of it).
    pub fn stage(&self) -> ZeroStage {
        self.stage
    }

    /// This rank's accumulated gradient of a unit as named tensors; the whole gradient when the
    /// shard is the whole unit (stage 0, or a world of one rank).
    pub fn unit_grads(&self, id: UnitId) -> Vec<(String, Tensor)> {
        let unit = self.index(id);
        assert!(self.in_flight[unit].is_none(), "unit_grads before the gradients landed (local_shards)");
        let u = &self.units[unit];
        assert_eq!(self.shard_len(unit), u.padded, "unit_grads needs whole (unsharded) units");
        u.tensors.iter().map(|(n, _)| n.clone()).zip(split_flat(&self.shards[unit].grad, u)).collect()
    }

    /// Every parameter, gathered whole in fp32 on the CPU, by Hugging Face name.
    pub fn gather_named(&self, world: &dyn Collective) -> Result<Vec<(String, Tensor)>, CommError> {
        self.gather_named_state(world, State::Master, true)
    }

    /// One state of every parameter, gathered whole in fp32 on the CPU, by Hugging Face name;
    /// kept only where `keep` (a checkpoint keeps it on the writing rank alone, so the other
    /// ranks hold one unit at a time).
    pub fn gather_named_state(
        &self,
        world: &dyn Collective,
        which: State,
        keep: bool,
    ) -> Result<Vec<(String, Tensor)>, CommError> {
        let mut out = Vec::new();
        for u in &self.units {
            let tensors = self.gather_state(world, u.id, which, Kind::Float, self.state_device)?;
            if keep {
                for ((name, _), t) in u.tensors.iter().zip(tensors) {
                    out.push((name.clone(), t.to_device(Device::Cpu).copy()));
                }
            }
        }
        Ok(out)
    }
}

/// Shards of each unit: one per rank at stage 3, one whole copy at stage 0.
fn shard_count(stage: ZeroStage, world: &dyn Collective) -> i64 {
    match stage {
        ZeroStage::Replicated => 1,
        ZeroStage::Sharded => world.size() as i64,
    }
}

/// Copies tensors, flattened and as fp32, into one zero-padded vector of `padded` elements
/// (one allocation: a unit's gradients can be a gigabyte).
fn flatten_padded(tensors: &[Tensor], padded: i64) -> Tensor {
    let flat = Tensor::zeros([padded], (Kind::Float, tensors[0].device()));
    let mut at = 0;
    for t in tensors {
        let n = t.numel() as i64;
        flat.narrow(0, at, n).copy_(&t.reshape([-1]));
        at += n;
    }
    flat
}

/// Splits a flat unit buffer back into its tensors (views sharing the buffer).
fn split_flat(flat: &Tensor, unit: &Unit) -> Vec<Tensor> {
    let mut at = 0;
    unit.tensors
        .iter()
        .map(|(_, shape)| {
            let n: i64 = shape.iter().product();
            let t = flat.narrow(0, at, n).view(shape.as_slice());
            at += n;
            t
        })
        .collect()
}
