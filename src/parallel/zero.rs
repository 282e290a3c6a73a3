//! ZeRO parameter sharding. Parameters are grouped in units (the embedding, each decoder layer,
//! the head); a unit's tensors are flattened into one vector, padded to a multiple of the world
//! size, and at stage 3 each rank keeps one slice of it: fp32 master weights, gradient and Adam
//! moments. A unit is all-gathered just before use and dropped after; its gradients are
//! reduce-scattered, which also sums the partial weight gradients of the SP ranks. At stage 0
//! every rank keeps the whole vector and gradients are all-reduced. The update of the shards is
//! the optimizer's (`crate::optim`). Each unit's shard lives where the memory plan put it
//! (`StateTiers`): on the GPU, in host memory (its master weights and gradient page-locked, as
//! they cross to the GPU every step), or in a file (`parallel::tiers`). The update of a shard in
//! host memory can run on a worker thread (`defer`) while the GPU goes on; every use of that
//! unit's state waits for it.
use crate::comm::{Collective, CommError};
use crate::config::ZeroStage;
use crate::ffi::cuda::{pinned_zeros, HostRegistration};
use crate::ffi::transfer::{self, CopyEvent, TransferError};
use crate::model::spec::ModelSpec;
use crate::parallel::deferred::{Deferred, HostJob};
use crate::parallel::tiers::{DiskError, DiskShard, Region};
pub use crate::parallel::units::{model_units, Unit, UnitId};
use crate::plan::memory::Place;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

/// A collective of the shards failed, a gradient's copy to host memory, or the disk tier.
#[derive(Debug, thiserror::Error)]
pub enum ZeroError {
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error("gradient offload to host memory: {0}")]
    Offload(#[from] TransferError),
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("page-locking the optimizer state in host memory: {0}")]
    Pin(String),
    #[error("the optimizer update of {unit} in host memory: {reason}")]
    Update { unit: UnitId, reason: String },
}

/// Per-unit optimizer state of this rank in memory (the GPU, or host memory): the slice
/// `[rank·len, (rank+1)·len)` of the flat unit.
pub struct Shard {
    /// In host memory beside a GPU: the master weights and gradient page-locked, as they cross
    /// to and from the GPU every step (the moments never do). First, to be dropped first.
    _pinned: Vec<HostRegistration>,
    pub master: Tensor,
    pub grad: Tensor,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    /// Whether `grad` is all zeros (fresh, or cleared by the optimizer): a gradient for host
    /// memory is then copied straight into it instead of through a staging buffer.
    pub grad_zero: bool,
}

/// This rank's shard of a unit wherever it lives, for the optimizer.
pub enum ShardMut<'a> {
    Memory(&'a mut Shard),
    Disk(&'a mut DiskShard),
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

    /// Where the state lies in a disk shard's file.
    pub fn region(self) -> Region {
        match self {
            State::Master => Region::Master,
            State::ExpAvg => Region::ExpAvg,
            State::ExpAvgSq => Region::ExpAvgSq,
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

    fn zeros(len: i64, device: Device) -> Shard {
        let zeros = || Tensor::zeros([len], (Kind::Float, device));
        Shard {
            _pinned: Vec::new(),
            master: zeros(),
            grad: zeros(),
            exp_avg: zeros(),
            exp_avg_sq: zeros(),
            grad_zero: true,
        }
    }

    /// Zeros in host memory, for a run computing on `compute` (the master weights and gradient
    /// page-locked where that is a GPU).
    fn host(len: i64, compute: Device) -> Result<Shard, ZeroError> {
        let mut shard = Shard::zeros(len, Device::Cpu);
        if let Device::Cuda(gpu) = compute {
            let (master, m) = pinned_zeros(len, gpu).map_err(ZeroError::Pin)?;
            let (grad, g) = pinned_zeros(len, gpu).map_err(ZeroError::Pin)?;
            shard = Shard { _pinned: vec![m, g], master, grad, ..shard };
        }
        Ok(shard)
    }
}

/// Where each unit's state lives (the memory plan's `Placement::state`): `Place::Device` on the
/// compute device, `Place::Host` in host memory, `Place::Disk` in unlinked files in `dir`.
#[derive(Debug, Clone)]
pub struct StateTiers {
    /// Per unit of the model in `model_units` order; None: every unit on `device`.
    pub places: Option<Vec<Place>>,
    pub device: Device,
    pub dir: PathBuf,
}

impl From<Device> for StateTiers {
    /// Every unit's state on `device`.
    fn from(device: Device) -> StateTiers {
        StateTiers { places: None, device, dir: PathBuf::new() }
    }
}

impl StateTiers {
    /// Where unit `id` goes: by its position among all the model's units, so a run that shards
    /// only some of them (LoRA's trainable units) places each where the plan placed it.
    fn place(&self, id: UnitId) -> Place {
        self.places.as_ref().map_or(Place::Device, |p| p[id.index(p.len() - UnitId::count(0))])
    }
}

/// Where a unit's shard lives.
enum Slot {
    /// Four tensors on the GPU or in host memory.
    Memory(Shard),
    Disk(DiskShard),
}

pub struct ShardedParams {
    /// Per unit: the job on its state in host memory that a worker thread may still be running
    /// (`defer`). First, to be dropped first: dropping waits for the jobs.
    deferred: Deferred,
    units: Vec<Unit>,
    slots: Vec<Slot>,
    stage: ZeroStage,
    rank: i64,
    /// The compute device: gathers and gradients arrive there.
    device: Device,
    /// For state off the compute device: each unit's reduced gradient on its way to host memory
    /// (a side-stream copy started as soon as the reduce-scatter is queued), finished by
    /// `land_unit`. The backward pass never waits for these copies.
    in_flight: Vec<Option<Landing>>,
}

/// A gradient on its way to host memory.
struct Landing {
    /// The pinned buffer it is copied into, to be added to the shard's gradient (in memory or in
    /// its file); None: copied straight into a cleared gradient in host memory.
    staged: Option<Tensor>,
    copied: CopyEvent,
}

impl ShardedParams {
    /// Builds the shards from full fp32 tensors that `full(unit)` returns for each unit (in the
    /// unit's tensor order); only this rank's slice is kept, where `state` places it.
    pub fn new(
        spec: &ModelSpec,
        stage: ZeroStage,
        world: &dyn Collective,
        state: impl Into<StateTiers>,
        full: impl FnMut(&Unit) -> Vec<Tensor>,
    ) -> Result<ShardedParams, ZeroError> {
        Self::new_units(|shards| model_units(spec, shards), stage, world, state, full)
    }

    /// Shards of zeros, allocated at their size where `state` places them (no whole unit is ever
    /// built), for a checkpoint to fill (`write_state`).
    pub fn zeroed(
        spec: &ModelSpec,
        stage: ZeroStage,
        world: &dyn Collective,
        state: impl Into<StateTiers>,
    ) -> Result<ShardedParams, ZeroError> {
        Self::zeroed_units(|shards| model_units(spec, shards), stage, world, state)
    }

    /// `new` for the units `units(shards)` gives (e.g. `lora_units`) instead of the whole model.
    pub fn new_units(
        units: impl FnOnce(i64) -> Vec<Unit>,
        stage: ZeroStage,
        world: &dyn Collective,
        state: impl Into<StateTiers>,
        mut full: impl FnMut(&Unit) -> Vec<Tensor>,
    ) -> Result<ShardedParams, ZeroError> {
        let params = ShardedParams::zeroed_units(units, stage, world, state)?;
        for u in 0..params.units.len() {
            let unit = &params.units[u];
            let flat = flatten_padded(&full(unit), unit.padded);
            let (start, len) = (params.shard_start(u), params.shard_len(u));
            params.write_state(unit.id, State::Master, 0, &flat.narrow(0, start, len))?;
        }
        Ok(params)
    }

    /// `zeroed` for the units `units(shards)` gives.
    pub fn zeroed_units(
        units: impl FnOnce(i64) -> Vec<Unit>,
        stage: ZeroStage,
        world: &dyn Collective,
        state: impl Into<StateTiers>,
    ) -> Result<ShardedParams, ZeroError> {
        let state = state.into();
        let shards_count = shard_count(stage, world);
        let units = units(shards_count);
        let rank = world.rank();
        let slots = units
            .iter()
            .map(|u| {
                let len = u.padded / shards_count;
                Ok(match state.place(u.id) {
                    Place::Device => Slot::Memory(Shard::zeros(len, state.device)),
                    Place::Host => Slot::Memory(Shard::host(len, state.device)?),
                    Place::Disk => {
                        let name = format!("ulysses-state-{}-rank{rank}-{}", std::process::id(), u.id.key());
                        Slot::Disk(DiskShard::create(&state.dir, &name, u.id.to_string(), len)?)
                    }
                })
            })
            .collect::<Result<Vec<Slot>, ZeroError>>()?;
        let in_flight = units.iter().map(|_| None).collect();
        let deferred = Deferred::new(units.len());
        Ok(ShardedParams { units, slots, stage, rank: rank as i64, device: state.device, in_flight, deferred })
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

    /// Where a unit's state lives: `Place::Device` on the compute device (a CPU run's memory),
    /// `Place::Host` in host memory, `Place::Disk` in a file.
    pub fn place(&self, id: UnitId) -> Place {
        match &self.slots[self.index(id)] {
            Slot::Memory(s) if s.master.device() == self.device => Place::Device,
            Slot::Memory(_) => Place::Host,
            Slot::Disk(_) => Place::Disk,
        }
    }

    /// One fp32 state of this rank's shard of a unit in memory (`[len]`, on the GPU or in host
    /// memory), for a checkpoint to write where it lies; None for a unit on disk.
    pub fn memory_state(&self, id: UnitId, which: State) -> Option<&Tensor> {
        self.assert_settled(id);
        match &self.slots[self.index(id)] {
            Slot::Memory(s) => Some(s.state(which)),
            Slot::Disk(_) => None,
        }
    }

    /// The disk shard of a unit whose state is on disk.
    pub fn disk_shard(&self, id: UnitId) -> Option<&DiskShard> {
        self.assert_settled(id);
        match &self.slots[self.index(id)] {
            Slot::Disk(d) => Some(d),
            Slot::Memory(_) => None,
        }
    }

    /// Elements `[at, at + n)` of one state of this rank's shard of a unit: a view where it lies
    /// in memory, a new CPU tensor read from its file on disk.
    pub fn read_state(&self, id: UnitId, which: State, at: i64, n: i64) -> Result<Tensor, DiskError> {
        self.assert_settled(id);
        match &self.slots[self.index(id)] {
            Slot::Memory(s) => Ok(s.state(which).narrow(0, at, n)),
            Slot::Disk(d) => d.read(which.region(), at, n),
        }
    }

    /// Overwrites elements `[at, at + len(src))` of one state of this rank's shard of a unit.
    pub fn write_state(&self, id: UnitId, which: State, at: i64, src: &Tensor) -> Result<(), DiskError> {
        self.assert_settled(id);
        match &self.slots[self.index(id)] {
            Slot::Memory(s) => {
                s.state(which).narrow(0, at, src.numel() as i64).copy_(src);
                Ok(())
            }
            Slot::Disk(d) => d.write(which.region(), at, &src.to_device(Device::Cpu)),
        }
    }

    /// The position of a unit in `units()`.
    fn index(&self, id: UnitId) -> usize {
        self.units.iter().position(|u| u.id == id).unwrap_or_else(|| panic!("{id} is not a unit of these shards"))
    }

    /// Whether these shards hold unit `id` (a LoRA run's trainable units leave some out).
    pub fn has(&self, id: UnitId) -> bool {
        self.units.iter().any(|u| u.id == id)
    }

    fn shard_len(&self, unit: usize) -> i64 {
        match &self.slots[unit] {
            Slot::Memory(s) => s.master.size()[0],
            Slot::Disk(d) => d.len(),
        }
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
    ) -> Result<Vec<Tensor>, ZeroError> {
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
    ) -> Result<Vec<Tensor>, ZeroError> {
        let unit = self.index(id);
        self.wait(unit)?;
        let local = match &self.slots[unit] {
            Slot::Memory(s) => s.state(which).to_device(device).to_kind(kind),
            Slot::Disk(d) => d.read(which.region(), 0, d.len())?.to_device(device).to_kind(kind),
        };
        let flat = match self.stage {
            ZeroStage::Replicated => local,
            ZeroStage::Sharded => world.all_gather(&local)?,
        };
        Ok(split_flat(&flat, &self.units[unit]))
    }

    /// Adds this rank's gradients of a unit (full tensors, any float dtype) into the shards:
    /// summed over every rank in fp32, then each rank keeps its slice.
    pub fn accumulate(&mut self, world: &dyn Collective, id: UnitId, grads: &[Tensor]) -> Result<(), ZeroError> {
        let unit = self.index(id);
        self.wait(unit)?;
        let flat = flatten_padded(grads, self.units[unit].padded);
        let mine = match self.stage {
            ZeroStage::Replicated => world.all_reduce(&flat)?,
            ZeroStage::Sharded => world.reduce_scatter(&flat)?,
        };
        if let Slot::Memory(s) = &self.slots[unit] {
            if mine.device() == s.grad.device() {
                let _ = s.grad.shallow_clone().g_add_(&mine);
                return Ok(());
            }
        }
        if mine.device() == Device::Cpu {
            // A CPU run's unit on disk: the gradient is already in host memory.
            return self.add_landed(unit, &mine);
        }
        // State off the GPU: stream the shard to host memory instead of a synchronous copy
        // that would stall the host until the GPU drained its queue, once per unit.
        self.land_unit(unit)?;
        self.land_arrived()?;
        let landing = match &mut self.slots[unit] {
            Slot::Memory(s) if s.grad_zero => {
                s.grad_zero = false;
                let ready = CopyEvent::record_current(mine.device())?;
                Landing { staged: None, copied: transfer::side_copy(&s.grad, &mine, Some(&ready))? }
            }
            _ => {
                let (staged, copied) = transfer::to_host(&mine)?;
                Landing { staged: Some(staged), copied }
            }
        };
        self.in_flight[unit] = Some(landing);
        Ok(())
    }

    /// Adds the in-flight gradients whose copies have finished, so that only the last unit or two
    /// hold pinned staging memory (a layer's backward outlasts its copy by far).
    fn land_arrived(&mut self) -> Result<(), ZeroError> {
        for u in 0..self.units.len() {
            let arrived = match &self.in_flight[u] {
                Some(landing) => landing.copied.is_complete()?,
                None => false,
            };
            if arrived {
                self.land_unit(u)?;
            }
        }
        Ok(())
    }

    /// Waits for a unit's gradient copy to host memory, if one is in flight, and adds it.
    fn land_unit(&mut self, unit: usize) -> Result<(), ZeroError> {
        if let Some(landing) = self.in_flight[unit].take() {
            landing.copied.synchronize()?;
            if let Some(staged) = landing.staged {
                self.add_landed(unit, &staged)?;
            }
        }
        Ok(())
    }

    /// Adds a gradient in host memory to a unit's shard off the GPU.
    fn add_landed(&mut self, unit: usize, grad: &Tensor) -> Result<(), ZeroError> {
        match &mut self.slots[unit] {
            Slot::Memory(s) => {
                let _ = s.grad.g_add_(grad);
                s.grad_zero = false;
            }
            Slot::Disk(d) => d.add_grad(grad)?,
        }
        Ok(())
    }

    /// This rank's shards with where each starts in its flat unit, for the optimizer, once every
    /// gradient still on its way to host memory has landed.
    pub fn shards_mut(&mut self) -> Result<impl Iterator<Item = (&Unit, i64, ShardMut<'_>)>, ZeroError> {
        self.settle()?;
        (0..self.units.len()).try_for_each(|u| self.land_unit(u))?;
        let starts: Vec<i64> = (0..self.units.len()).map(|u| self.shard_start(u)).collect();
        Ok(self.units.iter().zip(starts).zip(self.slots.iter_mut()).map(|((u, start), s)| {
            let shard = match s {
                Slot::Memory(m) => ShardMut::Memory(m),
                Slot::Disk(d) => ShardMut::Disk(d),
            };
            (u, start, shard)
        }))
    }

    /// Hands `jobs` (each on the state of its unit in host memory, in the order given: the order
    /// the next forward gathers them) to the worker thread and returns at once. Each unit's
    /// next use waits for its job: a gather, a load or a gradient (`wait`), the optimizer
    /// (`shards_mut`); the other accessors need `settle` first.
    pub fn defer(&mut self, jobs: Vec<(UnitId, HostJob)>) -> Result<(), ZeroError> {
        for (id, job) in jobs {
            let unit = self.index(id);
            self.deferred.push(unit, job).map_err(|reason| ZeroError::Update { unit: id, reason })?;
        }
        Ok(())
    }

    /// Waits for every deferred job; fails with the first that failed.
    pub fn settle(&self) -> Result<(), ZeroError> {
        (0..self.units.len()).try_for_each(|u| self.wait(u))
    }

    /// Waits for a unit's deferred job, if one is pending.
    fn wait(&self, unit: usize) -> Result<(), ZeroError> {
        self.deferred.wait(unit).map_err(|reason| ZeroError::Update { unit: self.units[unit].id, reason })
    }

    /// A use of the state that cannot wait (it returns no ZeroError) comes after `settle`.
    fn assert_settled(&self, id: UnitId) {
        let pending = self.deferred.is_pending(self.index(id));
        assert!(!pending, "the state of {id} used while its deferred update may run: settle() first");
    }

    /// Whether gradients are summed over ranks into shards (stage 3: the shards of all ranks
    /// together hold the model) or replicated (stage 0: every rank holds all of it).
    pub fn stage(&self) -> ZeroStage {
        self.stage
    }

    /// This rank's accumulated gradient of a unit as named tensors; the whole gradient when the
    /// shard is the whole unit (stage 0, or a world of one rank).
    pub fn unit_grads(&self, id: UnitId) -> Result<Vec<(String, Tensor)>, DiskError> {
        self.assert_settled(id);
        let unit = self.index(id);
        assert!(self.in_flight[unit].is_none(), "unit_grads before the gradients landed (shards_mut)");
        let u = &self.units[unit];
        assert_eq!(self.shard_len(unit), u.padded, "unit_grads needs whole (unsharded) units");
        let grad = match &self.slots[unit] {
            Slot::Memory(s) => s.grad.shallow_clone(),
            Slot::Disk(d) => d.read(Region::Grad, 0, d.len())?,
        };
        Ok(u.tensors.iter().map(|(n, _)| n.clone()).zip(split_flat(&grad, u)).collect())
    }

    /// Every parameter, gathered whole in fp32 on the CPU, by Hugging Face name.
    pub fn gather_named(&self, world: &dyn Collective) -> Result<Vec<(String, Tensor)>, ZeroError> {
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
    ) -> Result<Vec<(String, Tensor)>, ZeroError> {
        let mut out = Vec::new();
        for u in &self.units {
            let tensors = self.gather_state(world, u.id, which, Kind::Float, world.device())?;
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
pub(crate) fn flatten_padded(tensors: &[Tensor], padded: i64) -> Tensor {
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
pub(crate) fn split_flat(flat: &Tensor, unit: &Unit) -> Vec<Tensor> {
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
